//! The embedded store: SQLite (bundled) in WAL mode, one writer thread per process.
//!
//! Every operation is a closure run by the writer thread inside a SAVEPOINT; the
//! thread drains whatever operations are queued into ONE transaction and one fsync
//! (group commit), and answers their callers only after that commit. A failing
//! operation rolls back its own savepoint and leaves the others of its batch alone.
//! Admin commands open their own writer on the same file; SQLite's lock and the busy
//! timeout serialise them with a running listener.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{
    AttestOp, AttestOutcome, Creation, Device, DeviceRegisterOutcome, DeviceStatus, Network,
    NewPassphrase, Node, NodeStatus, PendingPassphrase, RegisterOp, RegisterOutcome, SealedNodeKey,
    Store, StoreError, TransitionOutcome,
};
use crate::wire::pubkey::DeviceId;

/// Operations committed together at most; bounds the latency one batch adds.
const MAX_BATCH: usize = 256;
const STATEMENT_CACHE: usize = 64;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS networks (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS passphrases (
    network TEXT NOT NULL REFERENCES networks(id),
    hash BLOB NOT NULL,
    node_name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER,
    PRIMARY KEY (network, hash),
    UNIQUE (network, node_name)
);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    network TEXT NOT NULL REFERENCES networks(id),
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    arch TEXT NOT NULL,
    status TEXT NOT NULL,
    sealed_key BLOB NOT NULL,
    ip TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    registered_ms INTEGER NOT NULL,
    online_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS nodes_by_network ON nodes (network, created_ms);
CREATE TABLE IF NOT EXISTS replay (
    network TEXT NOT NULL,
    key BLOB NOT NULL,
    node_id TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (network, key)
);
CREATE INDEX IF NOT EXISTS replay_by_expiry ON replay (expires_ms);
CREATE TABLE IF NOT EXISTS devices (
    id BLOB PRIMARY KEY,
    public_key BLOB NOT NULL,
    status TEXT NOT NULL,
    registered_ms INTEGER NOT NULL,
    attested_ms INTEGER NOT NULL,
    attestations INTEGER NOT NULL,
    revoked_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_by_time ON devices (registered_ms, id);
CREATE TABLE IF NOT EXISTS used_nonces (
    device BLOB NOT NULL,
    nonce BLOB NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (device, nonce)
);
CREATE INDEX IF NOT EXISTS used_nonces_by_expiry ON used_nonces (expires_ms);
";

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// Runs one operation on the connection, or fails it when no transaction could begin.
type Job = Box<dyn FnOnce(Result<&Connection, StoreError>) -> Completion + Send>;

pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens the database and starts its writer thread. With `Creation::IfMissing` a
    /// missing file is made, mode 0600 (SQLite gives its -wal and -shm files the
    /// database's mode); with `Creation::Never` it is `StoreError::Missing`.
    pub fn open(path: &Path, creation: Creation) -> Result<SqliteStore, StoreError> {
        let unavailable = |e: rusqlite::Error| unavailable(path, e);
        let io_unavailable = |e: std::io::Error| StoreError::Unavailable {
            url: describe(path),
            cause: if e.kind() == std::io::ErrorKind::PermissionDenied {
                "permission denied: run as the user that owns the data dir, or fix its mode".into()
            } else {
                e.to_string()
            },
        };
        if !path.exists() {
            if creation == Creation::Never {
                return Err(StoreError::Missing {
                    url: describe(path),
                });
            }
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => {}
                // Another process made it first.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_unavailable(e)),
            }
        }
        // Never SQLite's own create: the file above carries the mode.
        let flags =
            rusqlite::OpenFlags::default().difference(rusqlite::OpenFlags::SQLITE_OPEN_CREATE);
        let conn = Connection::open_with_flags(path, flags).map_err(unavailable)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
        // WAL lets admin commands read while the listener writes; FULL makes each
        // commit durable before any reply goes out.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(unavailable)?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        // Every statement the writer runs stays prepared (rusqlite's default keeps 16;
        // the writer has about 30).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread_path = path.to_path_buf();
        thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer(conn, queue, &thread_path))
            .map_err(|e| StoreError::Unavailable {
                url: describe(path),
                cause: format!("cannot start writer thread: {e}"),
            })?;
        Ok(SqliteStore {
            jobs,
            path: path.to_path_buf(),
        })
    }

    async fn call<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let path = self.path.clone();
        let job: Job = Box::new(move |conn| {
            let result = conn.and_then(|conn| in_savepoint(conn, &path, op));
            Box::new(move |committed: Result<(), StoreError>| {
                let _ = reply.send(committed.and(result));
            })
        });
        let gone = || StoreError::Unavailable {
            url: describe(&self.path),
            cause: "the SQLite writer thread stopped".into(),
        };
        self.jobs.send(job).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

fn describe(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

fn unavailable(path: &Path, e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable {
        url: describe(path),
        cause: e.to_string(),
    }
}

fn writer(conn: Connection, queue: mpsc::Receiver<Job>, path: &Path) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.exec("BEGIN IMMEDIATE", []) {
            let e = unavailable(path, e);
            tracing::error!(store = %describe(path), error = %e, "cannot begin transaction");
            for job in batch {
                job(Err(clone_unavailable(&e)))(Ok(()));
            }
            continue;
        }
        let completions: Vec<Completion> = batch.into_iter().map(|job| job(Ok(&conn))).collect();
        let committed = conn
            .exec("COMMIT", [])
            .map(|_| ())
            .map_err(|e| unavailable(path, e));
        if committed.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for complete in completions {
            complete(match &committed {
                Ok(()) => Ok(()),
                Err(e) => Err(clone_unavailable(e)),
            });
        }
    }
}

fn clone_unavailable(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable { url, cause } => StoreError::Unavailable {
            url: url.clone(),
            cause: cause.clone(),
        },
        other => StoreError::Unavailable {
            url: String::new(),
            cause: other.to_string(),
        },
    }
}

/// Runs `op` inside a savepoint: its writes stay only if it returns `Ok`.
fn in_savepoint<T>(
    conn: &Connection,
    path: &Path,
    op: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.exec("SAVEPOINT op", [])
        .map_err(|e| unavailable(path, e))?;
    let result = op(conn).map_err(|e| match e {
        StoreError::Unavailable { cause, .. } => StoreError::Unavailable {
            url: describe(path),
            cause,
        },
        other => other,
    });
    let ended = if result.is_ok() {
        conn.exec("RELEASE op", [])
    } else {
        conn.exec("ROLLBACK TO op", [])
            .and_then(|_| conn.exec("RELEASE op", []))
    };
    ended.map_err(|e| unavailable(path, e))?;
    result
}

/// Statements through SQLite's prepared-statement cache: the register path runs the
/// same few statements thousands of times a second, and parsing them each time cost
/// more CPU than running them.
trait Cached {
    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize>;
    fn row<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

/// Errors inside an operation: rusqlite failures are store failures.
trait OrUnavailable<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> OrUnavailable<T> for Result<T, rusqlite::Error> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Unavailable {
            url: "sqlite".into(),
            cause: e.to_string(),
        })
    }
}

fn read_network(conn: &Connection, id: &str) -> Result<Option<Network>, StoreError> {
    conn.row(
        "SELECT id, owner, name, created_ms,
                (SELECT count(*) FROM passphrases WHERE network = n.id),
                (SELECT count(*) FROM nodes WHERE network = n.id)
         FROM networks n WHERE id = ?1",
        [id],
        network_from_row,
    )
    .optional()
    .db()
}

fn network_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Network> {
    Ok(Network {
        id: row.get(0)?,
        owner: row.get(1)?,
        name: row.get(2)?,
        created_ms: row.get(3)?,
        pending_passphrases: row.get::<_, i64>(4)? as u64,
        nodes: row.get::<_, i64>(5)? as u64,
    })
}

const NODE_COLUMNS: &str = "id, network, owner, name, type, arch, status, sealed_key, ip, \
                            created_ms, registered_ms, online_ms";

fn node_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Node, StoreError>> {
    let id: String = row.get(0)?;
    let status: String = row.get(6)?;
    let (Ok(id), Some(status)) = (Uuid::parse_str(&id), NodeStatus::parse(&status)) else {
        return Ok(Err(StoreError::Corrupt(format!(
            "node {id:?} with status {status:?}"
        ))));
    };
    Ok(Ok(Node {
        id,
        network: row.get(1)?,
        owner: row.get(2)?,
        name: row.get(3)?,
        node_type: row.get(4)?,
        arch: row.get(5)?,
        status,
        sealed_key: SealedNodeKey(row.get(7)?),
        ip: row.get(8)?,
        created_ms: row.get(9)?,
        registered_ms: row.get(10)?,
        online_ms: row.get(11)?,
    }))
}

fn read_node(conn: &Connection, id: Uuid) -> Result<Option<Node>, StoreError> {
    conn.row(
        &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?1"),
        [id.to_string()],
        node_from_row,
    )
    .optional()
    .db()?
    .transpose()
}

/// Deletes expired replay entries, at most once a second (lookups ignore expired
/// entries anyway, so the sweep only bounds the table's size).
fn sweep_replay(conn: &Connection, now_ms: i64) -> Result<(), StoreError> {
    // Per writer thread, so per store.
    thread_local!(static NEXT_SWEEP_MS: Cell<i64> = const { Cell::new(i64::MIN) });
    if now_ms < NEXT_SWEEP_MS.get() {
        return Ok(());
    }
    NEXT_SWEEP_MS.set(now_ms + 1000);
    conn.exec("DELETE FROM replay WHERE expires_ms <= ?1", [now_ms])
        .db()?;
    Ok(())
}

const REPLAY_LOOKUP: &str =
    "SELECT node_id FROM replay WHERE network = ?1 AND key = ?2 AND expires_ms > ?3";
/// The owner comes from a subquery, not a join: with a join, SQLite (built with
/// STAT4, as rusqlite's bundled copy is) re-prepared this statement on every run,
/// which cost the writer thread a sixth of its time.
const PASSPHRASE_LOOKUP: &str =
    "SELECT p.node_name, (SELECT owner FROM networks WHERE id = p.network)
     FROM passphrases p
     WHERE p.network = ?1 AND p.hash = ?2 AND (p.expires_ms IS NULL OR p.expires_ms > ?3)";

fn register(conn: &Connection, op: RegisterOp) -> Result<RegisterOutcome, StoreError> {
    sweep_replay(conn, op.now_ms)?;
    let replayed: Option<String> = conn
        .row(
            REPLAY_LOOKUP,
            params![op.network, op.replay_key.0, op.now_ms],
            |row| row.get(0),
        )
        .optional()
        .db()?;
    if let Some(id) = replayed {
        let node_id = Uuid::parse_str(&id).map_err(|_| StoreError::Corrupt(id))?;
        return Ok(RegisterOutcome::Replayed { node_id });
    }

    let pending: Option<(String, Option<String>)> = conn
        .row(
            PASSPHRASE_LOOKUP,
            params![op.network, op.passphrase.0, op.now_ms],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .db()?;
    let Some((name, Some(owner))) = pending else {
        return Ok(RegisterOutcome::InvalidPassphrase);
    };
    conn.exec(
        "DELETE FROM passphrases WHERE network = ?1 AND hash = ?2",
        params![op.network, op.passphrase.0],
    )
    .db()?;

    let existing = match op.requested_id {
        Some(id) => read_node(conn, id)?,
        None => None,
    };
    let outcome = match (op.requested_id, existing) {
        (Some(id), Some(node)) if node.owner == owner && node.status != NodeStatus::Revoked => {
            conn.exec(
                "UPDATE nodes SET status = 'offline', sealed_key = ?2, type = ?3, arch = ?4,
                        name = ?5, network = ?6, registered_ms = ?7 WHERE id = ?1",
                params![
                    id.to_string(),
                    op.sealed_key.0,
                    op.node_type,
                    op.arch,
                    name,
                    op.network,
                    op.now_ms
                ],
            )
            .db()?;
            RegisterOutcome::Reregistered { node_id: id }
        }
        (requested, existing) => {
            let id = match (requested, existing) {
                (Some(id), None) => id,
                _ => op.fresh_id,
            };
            let inserted = conn
                .exec(
                    "INSERT OR IGNORE INTO nodes (id, network, owner, name, type, arch, status,
                         sealed_key, ip, created_ms, registered_ms, online_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'offline', ?7, '', ?8, ?8, 0)",
                    params![
                        id.to_string(),
                        op.network,
                        owner,
                        name,
                        op.node_type,
                        op.arch,
                        op.sealed_key.0,
                        op.now_ms
                    ],
                )
                .db()?;
            if inserted == 0 {
                return Err(StoreError::Corrupt(format!(
                    "fresh node id {id} already exists"
                )));
            }
            RegisterOutcome::Created { node_id: id }
        }
    };
    let node_id = match outcome {
        RegisterOutcome::Created { node_id } | RegisterOutcome::Reregistered { node_id } => node_id,
        _ => unreachable!("only the two outcomes above reach here"),
    };
    conn.exec(
        "INSERT OR REPLACE INTO replay (network, key, node_id, expires_ms) VALUES (?1, ?2, ?3, ?4)",
        params![
            op.network,
            op.replay_key.0,
            node_id.to_string(),
            op.now_ms + op.replay_ttl_ms
        ],
    )
    .db()?;
    Ok(outcome)
}

const DEVICE_COLUMNS: &str =
    "id, public_key, status, registered_ms, attested_ms, attestations, revoked_ms";

fn device_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Device, StoreError>> {
    let id: Vec<u8> = row.get(0)?;
    let status: String = row.get(2)?;
    let parsed = <[u8; 16]>::try_from(id.as_slice())
        .ok()
        .and_then(|b| DeviceId::new(b).ok());
    let (Some(id), Some(status)) = (parsed, DeviceStatus::parse(&status)) else {
        return Ok(Err(StoreError::Corrupt(format!(
            "device {} with status {status:?}",
            hex::encode(&id)
        ))));
    };
    Ok(Ok(Device {
        id,
        public_key: row.get(1)?,
        status,
        registered_ms: row.get(3)?,
        attested_ms: row.get(4)?,
        attestations: row.get::<_, i64>(5)? as u64,
        revoked_ms: row.get(6)?,
    }))
}

fn read_device(conn: &Connection, id: DeviceId) -> Result<Option<Device>, StoreError> {
    conn.row(
        &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"),
        [id.0.as_slice()],
        device_from_row,
    )
    .optional()
    .db()?
    .transpose()
}

fn register_device(
    conn: &Connection,
    id: DeviceId,
    public_key: &[u8],
    now_ms: i64,
) -> Result<DeviceRegisterOutcome, StoreError> {
    let inserted = conn
        .exec(
            "INSERT OR IGNORE INTO devices (id, public_key, status, registered_ms, attested_ms,
                 attestations, revoked_ms)
             VALUES (?1, ?2, 'active', ?3, 0, 0, 0)",
            params![id.0.as_slice(), public_key, now_ms],
        )
        .db()?;
    if inserted == 1 {
        return Ok(DeviceRegisterOutcome::Created);
    }
    let existing = read_device(conn, id)?
        .ok_or_else(|| StoreError::Corrupt(format!("device {id} neither inserted nor found")))?;
    Ok(if existing.status == DeviceStatus::Revoked {
        DeviceRegisterOutcome::Revoked
    } else if existing.public_key == public_key {
        DeviceRegisterOutcome::SameKey
    } else {
        DeviceRegisterOutcome::OtherKey
    })
}

fn attest_device(conn: &Connection, op: AttestOp) -> Result<AttestOutcome, StoreError> {
    conn.exec(
        "DELETE FROM used_nonces WHERE expires_ms <= ?1",
        [op.now_ms],
    )
    .db()?;
    let status: Option<String> = conn
        .row(
            "SELECT status FROM devices WHERE id = ?1",
            [op.device.0.as_slice()],
            |row| row.get(0),
        )
        .optional()
        .db()?;
    match status.as_deref().map(DeviceStatus::parse) {
        None => return Ok(AttestOutcome::UnknownDevice),
        Some(Some(DeviceStatus::Revoked)) => return Ok(AttestOutcome::Revoked),
        Some(Some(DeviceStatus::Active)) => {}
        Some(None) => {
            return Err(StoreError::Corrupt(format!(
                "device {} with status {status:?}",
                op.device
            )));
        }
    }
    let fresh = conn
        .exec(
            "INSERT OR IGNORE INTO used_nonces (device, nonce, expires_ms) VALUES (?1, ?2, ?3)",
            params![
                op.device.0.as_slice(),
                op.nonce.0.as_slice(),
                op.nonce_expires_ms
            ],
        )
        .db()?;
    if fresh == 0 {
        return Ok(AttestOutcome::NonceUsed);
    }
    conn.exec(
        "UPDATE devices SET attested_ms = ?2, attestations = attestations + 1 WHERE id = ?1",
        params![op.device.0.as_slice(), op.now_ms],
    )
    .db()?;
    Ok(AttestOutcome::Attested)
}

impl Store for SqliteStore {
    fn describe(&self) -> String {
        describe(&self.path)
    }

    async fn create_network(
        &self,
        id: &str,
        owner: &str,
        name: &str,
        now_ms: i64,
    ) -> Result<Network, StoreError> {
        let (id, owner, name) = (id.to_owned(), owner.to_owned(), name.to_owned());
        self.call(move |conn| {
            let inserted = conn
                .exec(
                    "INSERT OR IGNORE INTO networks (id, owner, name, created_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![id, owner, name, now_ms],
                )
                .db()?;
            if inserted == 0 {
                return Err(StoreError::NetworkExists(id));
            }
            read_network(conn, &id)?.ok_or_else(|| StoreError::Corrupt("network vanished".into()))
        })
        .await
    }

    async fn network(&self, id: &str) -> Result<Option<Network>, StoreError> {
        let id = id.to_owned();
        self.call(move |conn| read_network(conn, &id)).await
    }

    async fn delete_network(&self, id: &str) -> Result<u64, StoreError> {
        let id = id.to_owned();
        self.call(move |conn| {
            for table in ["replay", "passphrases"] {
                conn.exec(&format!("DELETE FROM {table} WHERE network = ?1"), [&id])
                    .db()?;
            }
            let nodes = conn
                .exec("DELETE FROM nodes WHERE network = ?1", [&id])
                .db()?;
            if conn
                .exec("DELETE FROM networks WHERE id = ?1", [&id])
                .db()?
                == 0
            {
                return Err(StoreError::UnknownNetwork(id));
            }
            Ok(nodes as u64)
        })
        .await
    }

    async fn networks(&self) -> Result<Vec<Network>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT id, owner, name, created_ms,
                            (SELECT count(*) FROM passphrases WHERE network = n.id),
                            (SELECT count(*) FROM nodes WHERE network = n.id)
                     FROM networks n ORDER BY id",
                )
                .db()?;
            let rows = stmt.query_map([], network_from_row).db()?;
            rows.collect::<Result<Vec<_>, _>>().db()
        })
        .await
    }

    async fn add_passphrases(
        &self,
        network: &str,
        batch: Vec<NewPassphrase>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let network = network.to_owned();
        self.call(move |conn| {
            if read_network(conn, &network)?.is_none() {
                return Err(StoreError::UnknownNetwork(network));
            }
            for p in batch {
                let name_taken: bool = conn
                    .row(
                        "SELECT count(*) FROM passphrases WHERE network = ?1 AND node_name = ?2",
                        params![network, p.node_name],
                        |row| row.get::<_, i64>(0),
                    )
                    .db()?
                    > 0;
                if name_taken {
                    return Err(StoreError::PassphraseNameTaken {
                        network,
                        node_name: p.node_name,
                    });
                }
                let inserted = conn
                    .exec(
                        "INSERT OR IGNORE INTO passphrases (network, hash, node_name, created_ms, expires_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![network, p.hash.0, p.node_name, now_ms, p.expires_ms],
                    )
                    .db()?;
                if inserted == 0 {
                    return Err(StoreError::PassphraseTaken(network));
                }
            }
            Ok(())
        })
        .await
    }

    async fn passphrases(&self, network: &str) -> Result<Vec<PendingPassphrase>, StoreError> {
        let network = network.to_owned();
        self.call(move |conn| {
            if read_network(conn, &network)?.is_none() {
                return Err(StoreError::UnknownNetwork(network));
            }
            let mut stmt = conn
                .prepare(
                    "SELECT node_name, created_ms, expires_ms FROM passphrases
                     WHERE network = ?1 ORDER BY created_ms, node_name",
                )
                .db()?;
            let rows = stmt
                .query_map([&network], |row| {
                    Ok(PendingPassphrase {
                        node_name: row.get(0)?,
                        created_ms: row.get(1)?,
                        expires_ms: row.get(2)?,
                    })
                })
                .db()?;
            rows.collect::<Result<Vec<_>, _>>().db()
        })
        .await
    }

    async fn revoke_passphrase(&self, network: &str, node_name: &str) -> Result<(), StoreError> {
        let (network, node_name) = (network.to_owned(), node_name.to_owned());
        self.call(move |conn| {
            if read_network(conn, &network)?.is_none() {
                return Err(StoreError::UnknownNetwork(network));
            }
            let deleted = conn
                .exec(
                    "DELETE FROM passphrases WHERE network = ?1 AND node_name = ?2",
                    params![network, node_name],
                )
                .db()?;
            if deleted == 0 {
                return Err(StoreError::UnknownPassphraseName { network, node_name });
            }
            Ok(())
        })
        .await
    }

    async fn register(&self, op: RegisterOp) -> Result<RegisterOutcome, StoreError> {
        self.call(move |conn| register(conn, op)).await
    }

    async fn node(&self, id: Uuid) -> Result<Option<Node>, StoreError> {
        self.call(move |conn| read_node(conn, id)).await
    }

    async fn nodes(&self, network: Option<&str>) -> Result<Vec<Node>, StoreError> {
        let network = network.map(str::to_owned);
        self.call(move |conn| {
            if let Some(net) = &network
                && read_network(conn, net)?.is_none()
            {
                return Err(StoreError::UnknownNetwork(net.clone()));
            }
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {NODE_COLUMNS} FROM nodes WHERE ?1 IS NULL OR network = ?1
                     ORDER BY created_ms, id"
                ))
                .db()?;
            let rows = stmt.query_map([&network], node_from_row).db()?;
            rows.collect::<Result<Vec<_>, _>>()
                .db()?
                .into_iter()
                .collect()
        })
        .await
    }

    async fn transition(
        &self,
        id: Uuid,
        target: NodeStatus,
        ip: &str,
        now_ms: i64,
    ) -> Result<TransitionOutcome, StoreError> {
        let ip = ip.to_owned();
        self.call(move |conn| {
            let Some(node) = read_node(conn, id)? else {
                return Ok(TransitionOutcome::UnknownNode);
            };
            let from = node.status;
            if !target.allowed_origins().contains(&from) {
                return Ok(TransitionOutcome::NotAllowed { from });
            }
            if target == NodeStatus::Online {
                conn.exec(
                    "UPDATE nodes SET status = ?2, ip = ?3, online_ms = ?4 WHERE id = ?1",
                    params![id.to_string(), target.as_str(), ip, now_ms],
                )
            } else {
                conn.exec(
                    "UPDATE nodes SET status = ?2 WHERE id = ?1",
                    params![id.to_string(), target.as_str()],
                )
            }
            .db()?;
            Ok(TransitionOutcome::Changed { from })
        })
        .await
    }

    async fn revoke_node(&self, id: Uuid) -> Result<(), StoreError> {
        self.call(move |conn| {
            let changed = conn
                .exec(
                    "UPDATE nodes SET status = 'revoked', sealed_key = x'' WHERE id = ?1",
                    [id.to_string()],
                )
                .db()?;
            if changed == 0 {
                return Err(StoreError::UnknownNode(id));
            }
            Ok(())
        })
        .await
    }

    async fn register_device(
        &self,
        id: DeviceId,
        public_key: &[u8],
        now_ms: i64,
    ) -> Result<DeviceRegisterOutcome, StoreError> {
        let public_key = public_key.to_vec();
        self.call(move |conn| register_device(conn, id, &public_key, now_ms))
            .await
    }

    async fn device(&self, id: DeviceId) -> Result<Option<Device>, StoreError> {
        self.call(move |conn| read_device(conn, id)).await
    }

    async fn devices(&self) -> Result<Vec<Device>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices ORDER BY registered_ms, id"
                ))
                .db()?;
            let rows = stmt.query_map([], device_from_row).db()?;
            rows.collect::<Result<Vec<_>, _>>()
                .db()?
                .into_iter()
                .collect()
        })
        .await
    }

    async fn attest_device(&self, op: AttestOp) -> Result<AttestOutcome, StoreError> {
        self.call(move |conn| attest_device(conn, op)).await
    }

    async fn revoke_device(&self, id: DeviceId, now_ms: i64) -> Result<(), StoreError> {
        self.call(move |conn| {
            let known = conn
                .exec(
                    "UPDATE devices SET status = 'revoked',
                         revoked_ms = CASE WHEN status = 'revoked' THEN revoked_ms ELSE ?2 END
                     WHERE id = ?1",
                    params![id.0.as_slice(), now_ms],
                )
                .db()?;
            if known == 0 {
                return Err(StoreError::UnknownDevice(id));
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::StatementStatus;

    use super::*;
    use crate::store::{PassphraseHash, ReplayKey};

    fn op(i: u8, now_ms: i64) -> RegisterOp {
        RegisterOp {
            network: "lab".into(),
            passphrase: PassphraseHash([i; 32]),
            replay_key: ReplayKey([i; 32]),
            replay_ttl_ms: 60_000,
            requested_id: None,
            fresh_id: Uuid::from_bytes([i; 16]),
            sealed_key: SealedNodeKey(vec![i; 60]),
            node_type: "device",
            arch: "x86_ubuntu",
            now_ms,
        }
    }

    /// A statement that SQLite re-prepares on every run costs the writer a parse and
    /// a query plan per registration; the lookups of the register path must not.
    #[test]
    fn register_lookups_stay_prepared() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute(
            "INSERT INTO networks (id, owner, name, created_ms) VALUES ('lab', 'alice', 'lab', 0)",
            [],
        )
        .unwrap();
        for i in 1..=20u8 {
            conn.execute(
                "INSERT INTO passphrases (network, hash, node_name, created_ms) VALUES ('lab', ?1, ?2, 0)",
                params![[i; 32].as_slice(), format!("n-{i}")],
            )
            .unwrap();
        }
        for i in 1..=20u8 {
            let outcome = register(&conn, op(i, 1_000 + i64::from(i))).unwrap();
            assert_eq!(
                outcome,
                RegisterOutcome::Created {
                    node_id: Uuid::from_bytes([i; 16])
                }
            );
        }
        for sql in [REPLAY_LOOKUP, PASSPHRASE_LOOKUP] {
            let stmt = conn.prepare_cached(sql).unwrap();
            assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0, "{sql}");
        }
    }
}
