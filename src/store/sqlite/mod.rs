//! The embedded store: SQLite (bundled) in WAL mode, one writer thread per process.
//!
//! Every operation is a closure run by the writer thread inside a SAVEPOINT; the
//! thread drains whatever operations are queued into ONE transaction and one fsync
//! (group commit), and answers their callers only after that commit. A failing
//! operation rolls back its own savepoint and leaves the others of its batch alone.
//! Admin commands open their own writer on the same file; SQLite's lock and the busy
//! timeout serialise them with a running listener.

//!
//! The schema is versioned ([`migrations`]); each flow's operations are in a file of
//! their own ([`ijam`], [`pubkey`]), on the tables that flow owns.

mod ijam;
pub mod migrations;
mod pubkey;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::{Creation, StoreError, Stores};

/// Operations committed together at most; bounds the latency one batch adds.
const MAX_BATCH: usize = 256;
const STATEMENT_CACHE: usize = 64;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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
        let mut conn = Connection::open_with_flags(path, flags).map_err(unavailable)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
        // WAL lets admin commands read while the listener writes; FULL makes each
        // commit durable before any reply goes out.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(unavailable)?;
        for step in migrations::migrate(&mut conn, &describe(path))? {
            tracing::info!(store = %describe(path), migration = step, "store migrated");
        }
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

    pub(super) async fn call<T, F>(&self, op: F) -> Result<T, StoreError>
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

impl Stores for SqliteStore {
    fn describe(&self) -> String {
        describe(&self.path)
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
pub(super) trait Cached {
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
pub(super) trait OrUnavailable<T> {
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
