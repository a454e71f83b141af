//! The ijam flow on SQLite: its tables are `ijam_networks`, `ijam_passphrases`,
//! `ijam_nodes` and `ijam_replay`.

use std::cell::Cell;

use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::{Cached, OrUnavailable, SqliteStore};
use crate::store::StoreError;
use crate::store::ijam::{
    IjamStore, Network, NewPassphrase, Node, NodeStatus, PendingPassphrase, RegisterOp,
    RegisterOutcome, Reregistration, SealedNodeKey, StateFrameDigest, TransitionOutcome,
    protected_key, protected_passphrase, sealed_key,
};

const NETWORK_COLUMNS: &str = "id, owner, name, created_ms, reregistration,
     (SELECT count(*) FROM ijam_passphrases WHERE network = n.id),
     (SELECT count(*) FROM ijam_nodes WHERE network = n.id)";

/// A network's re-registration rule, if it exists.
fn network_rule(conn: &Connection, id: &str) -> Result<Option<Reregistration>, StoreError> {
    let rule: Option<String> = conn
        .row(
            "SELECT reregistration FROM ijam_networks WHERE id = ?1",
            [id],
            |row| row.get(0),
        )
        .optional()
        .db()?;
    rule.map(|r| {
        Reregistration::parse(&r)
            .ok_or_else(|| StoreError::Corrupt(format!("network {id:?} with rule {r:?}")))
    })
    .transpose()
}

fn read_network(conn: &Connection, id: &str) -> Result<Option<Network>, StoreError> {
    conn.row(
        &format!("SELECT {NETWORK_COLUMNS} FROM ijam_networks n WHERE id = ?1"),
        [id],
        network_from_row,
    )
    .optional()
    .db()?
    .transpose()
}

fn network_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Network, StoreError>> {
    let id: String = row.get(0)?;
    let rule: String = row.get(4)?;
    let Some(reregistration) = Reregistration::parse(&rule) else {
        return Ok(Err(StoreError::Corrupt(format!(
            "network {id:?} with re-registration rule {rule:?}"
        ))));
    };
    Ok(Ok(Network {
        id,
        owner: row.get(1)?,
        name: row.get(2)?,
        created_ms: row.get(3)?,
        reregistration,
        pending_passphrases: row.get::<_, i64>(5)? as u64,
        nodes: row.get::<_, i64>(6)? as u64,
    }))
}

/// A node id as stored in a text column.
fn parse_node_id(id: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(id).map_err(|_| StoreError::Corrupt(format!("node id {id:?}")))
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
        key: sealed_key(row.get(7)?),
        ip: row.get(8)?,
        created_ms: row.get(9)?,
        registered_ms: row.get(10)?,
        online_ms: row.get(11)?,
    }))
}

fn read_node(conn: &Connection, id: Uuid) -> Result<Option<Node>, StoreError> {
    conn.row(
        &format!("SELECT {NODE_COLUMNS} FROM ijam_nodes WHERE id = ?1"),
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
    conn.exec("DELETE FROM ijam_replay WHERE expires_ms <= ?1", [now_ms])
        .db()?;
    Ok(())
}

const REPLAY_LOOKUP: &str =
    "SELECT node_id FROM ijam_replay WHERE network = ?1 AND key = ?2 AND expires_ms > ?3";
/// The network's owner and rule come from subqueries, not a join: with a join, SQLite
/// (built with STAT4, as rusqlite's bundled copy is) re-prepared this statement on
/// every run, which cost the writer thread a sixth of its time.
const PASSPHRASE_LOOKUP: &str = "SELECT p.node_name, p.for_node,
            (SELECT owner FROM ijam_networks WHERE id = p.network),
            (SELECT reregistration FROM ijam_networks WHERE id = p.network)
     FROM ijam_passphrases p
     WHERE p.network = ?1 AND p.hash = ?2 AND (p.expires_ms IS NULL OR p.expires_ms > ?3)";

/// A pending, unexpired passphrase as a registration finds it.
struct Usable {
    node_name: String,
    for_node: Option<Uuid>,
    owner: String,
    reregistration: Reregistration,
}

/// A row of [`PASSPHRASE_LOOKUP`]; `None` when its network is gone.
fn usable_from_row(
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<Result<Option<Usable>, StoreError>> {
    let (Some(owner), Some(rule)) = (
        row.get::<_, Option<String>>(2)?,
        row.get::<_, Option<String>>(3)?,
    ) else {
        return Ok(Ok(None));
    };
    let Some(reregistration) = Reregistration::parse(&rule) else {
        return Ok(Err(StoreError::Corrupt(format!(
            "a network with re-registration rule {rule:?}"
        ))));
    };
    let for_node = match row
        .get::<_, Option<String>>(1)?
        .as_deref()
        .map(parse_node_id)
    {
        None => None,
        Some(Ok(node)) => Some(node),
        Some(Err(e)) => return Ok(Err(e)),
    };
    Ok(Ok(Some(Usable {
        node_name: row.get(0)?,
        for_node,
        owner,
        reregistration,
    })))
}

fn register(conn: &Connection, op: RegisterOp) -> Result<RegisterOutcome, StoreError> {
    let passphrase = protected_passphrase(&op.passphrase)?.0;
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

    let usable = conn
        .row(
            PASSPHRASE_LOOKUP,
            params![op.network, passphrase, op.now_ms],
            usable_from_row,
        )
        .optional()
        .db()?
        .transpose()?
        .flatten();
    let Some(usable) = usable else {
        return Ok(RegisterOutcome::InvalidPassphrase);
    };

    let existing = match op.requested_id {
        Some(id) => read_node(conn, id)?,
        None => None,
    };
    // Everything is decided before the first write: a refusal commits nothing, so
    // the passphrase stays pending.
    let reregisterable = existing
        .as_ref()
        .is_some_and(|node| node.owner == usable.owner && node.status != NodeStatus::Revoked);
    let node_network_minted = match &existing {
        Some(node) if reregisterable => {
            network_rule(conn, &node.network)? == Some(Reregistration::Minted)
        }
        _ => false,
    };
    match usable.for_node {
        Some(minted_for) => {
            let names_it = op.requested_id == Some(minted_for)
                && existing
                    .as_ref()
                    .is_some_and(|node| node.network == op.network);
            if !(names_it && reregisterable) {
                return Ok(RegisterOutcome::InvalidPassphrase);
            }
        }
        // The rule of this network, and of the network the node is in: else a spare
        // passphrase of another network of the owner would take it over (and move it).
        None if reregisterable
            && (usable.reregistration == Reregistration::Minted || node_network_minted) =>
        {
            return Ok(RegisterOutcome::InvalidPassphrase);
        }
        None => {}
    }
    let (name, owner) = (usable.node_name, usable.owner);
    conn.exec(
        "DELETE FROM ijam_passphrases WHERE network = ?1 AND hash = ?2",
        params![op.network, passphrase],
    )
    .db()?;

    let outcome = match (op.requested_id, existing) {
        (Some(id), Some(_)) if reregisterable => {
            conn.exec(
                "UPDATE ijam_nodes SET status = 'offline', sealed_key = ?2, type = ?3, arch = ?4,
                        name = ?5, network = ?6, registered_ms = ?7 WHERE id = ?1",
                params![
                    id.to_string(),
                    protected_key(op.node_key_for(id)?)?,
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
                    "INSERT OR IGNORE INTO ijam_nodes (id, network, owner, name, type, arch, status,
                         sealed_key, ip, created_ms, registered_ms, online_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'offline', ?7, '', ?8, ?8, 0)",
                    params![
                        id.to_string(),
                        op.network,
                        owner,
                        name,
                        op.node_type,
                        op.arch,
                        protected_key(op.node_key_for(id)?)?,
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
        "INSERT OR REPLACE INTO ijam_replay (network, key, node_id, expires_ms) VALUES (?1, ?2, ?3, ?4)",
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

impl IjamStore for SqliteStore {
    async fn create_network(
        &self,
        id: &str,
        owner: &str,
        name: &str,
        reregistration: Reregistration,
        now_ms: i64,
    ) -> Result<Network, StoreError> {
        let (id, owner, name) = (id.to_owned(), owner.to_owned(), name.to_owned());
        self.call(move |conn| {
            let inserted = conn
                .exec(
                    "INSERT OR IGNORE INTO ijam_networks (id, owner, name, created_ms, reregistration)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![id, owner, name, now_ms, reregistration.as_str()],
                )
                .db()?;
            if inserted == 0 {
                return Err(StoreError::NetworkExists(id));
            }
            read_network(conn, &id)?.ok_or_else(|| StoreError::Corrupt("network vanished".into()))
        })
        .await
    }

    async fn set_reregistration(
        &self,
        id: &str,
        reregistration: Reregistration,
    ) -> Result<Network, StoreError> {
        let id = id.to_owned();
        self.call(move |conn| {
            conn.exec(
                "UPDATE ijam_networks SET reregistration = ?2 WHERE id = ?1",
                params![id, reregistration.as_str()],
            )
            .db()?;
            read_network(conn, &id)?.ok_or(StoreError::UnknownNetwork(id))
        })
        .await
    }

    async fn import_node(&self, node: Node) -> Result<bool, StoreError> {
        self.call(move |conn| {
            if read_network(conn, &node.network)?.is_none() {
                return Err(StoreError::UnknownNetwork(node.network));
            }
            let inserted = conn
                .exec(
                    "INSERT OR IGNORE INTO ijam_nodes (id, network, owner, name, type, arch, status,
                         sealed_key, ip, created_ms, registered_ms, online_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                    params![
                        node.id.to_string(),
                        node.network,
                        node.owner,
                        node.name,
                        node.node_type,
                        node.arch,
                        node.status.as_str(),
                        protected_key(&node.key)?,
                        node.ip,
                        node.created_ms,
                        node.registered_ms,
                        node.online_ms
                    ],
                )
                .db()?;
            Ok(inserted == 1)
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
            for table in ["ijam_replay", "ijam_passphrases"] {
                conn.exec(&format!("DELETE FROM {table} WHERE network = ?1"), [&id])
                    .db()?;
            }
            let nodes = conn
                .exec("DELETE FROM ijam_nodes WHERE network = ?1", [&id])
                .db()?;
            if conn
                .exec("DELETE FROM ijam_networks WHERE id = ?1", [&id])
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
                .prepare(&format!(
                    "SELECT {NETWORK_COLUMNS} FROM ijam_networks n ORDER BY id"
                ))
                .db()?;
            let rows = stmt.query_map([], network_from_row).db()?;
            rows.collect::<Result<Vec<_>, _>>()
                .db()?
                .into_iter()
                .collect()
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
                        "SELECT count(*) FROM ijam_passphrases WHERE network = ?1 AND node_name = ?2",
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
                if let Some(node) = p.for_node {
                    let in_network = conn
                        .row(
                            "SELECT count(*) FROM ijam_nodes WHERE id = ?1 AND network = ?2",
                            params![node.to_string(), network],
                            |row| row.get::<_, i64>(0),
                        )
                        .db()?
                        > 0;
                    if !in_network {
                        return Err(StoreError::NodeNotInNetwork { network, node });
                    }
                }
                let inserted = conn
                    .exec(
                        "INSERT OR IGNORE INTO ijam_passphrases
                             (network, hash, node_name, created_ms, expires_ms, for_node)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![
                            network,
                            protected_passphrase(&p.passphrase)?.0,
                            p.node_name,
                            now_ms,
                            p.expires_ms,
                            p.for_node.map(|node| node.to_string())
                        ],
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
                    "SELECT node_name, created_ms, expires_ms, for_node FROM ijam_passphrases
                     WHERE network = ?1 ORDER BY created_ms, node_name",
                )
                .db()?;
            let rows = stmt
                .query_map([&network], |row| {
                    Ok((
                        PendingPassphrase {
                            node_name: row.get(0)?,
                            created_ms: row.get(1)?,
                            expires_ms: row.get(2)?,
                            for_node: None,
                        },
                        row.get::<_, Option<String>>(3)?,
                    ))
                })
                .db()?;
            rows.map(|row| {
                let (pending, for_node) = row.db()?;
                Ok(PendingPassphrase {
                    for_node: for_node.as_deref().map(parse_node_id).transpose()?,
                    ..pending
                })
            })
            .collect()
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
                    "DELETE FROM ijam_passphrases WHERE network = ?1 AND node_name = ?2",
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
                    "SELECT {NODE_COLUMNS} FROM ijam_nodes WHERE ?1 IS NULL OR network = ?1
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
        frame: StateFrameDigest,
    ) -> Result<TransitionOutcome, StoreError> {
        let ip = ip.to_owned();
        self.call(move |conn| {
            let Some(node) = read_node(conn, id)? else {
                return Ok(TransitionOutcome::UnknownNode);
            };
            let last: Option<Vec<u8>> = conn
                .row(
                    "SELECT last_state FROM ijam_nodes WHERE id = ?1",
                    [id.to_string()],
                    |row| row.get(0),
                )
                .db()?;
            if last.as_deref() == Some(frame.0.as_slice()) {
                return Ok(TransitionOutcome::Repeated {
                    status: node.status,
                });
            }
            let from = node.status;
            if !target.allowed_origins().contains(&from) {
                return Ok(TransitionOutcome::NotAllowed { from });
            }
            if target == NodeStatus::Online {
                conn.exec(
                    "UPDATE ijam_nodes SET status = ?2, ip = ?3, online_ms = ?4, last_state = ?5 \
                     WHERE id = ?1",
                    params![
                        id.to_string(),
                        target.as_str(),
                        ip,
                        now_ms,
                        frame.0.as_slice()
                    ],
                )
            } else {
                conn.exec(
                    "UPDATE ijam_nodes SET status = ?2, last_state = ?3 WHERE id = ?1",
                    params![id.to_string(), target.as_str(), frame.0.as_slice()],
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
                    "UPDATE ijam_nodes SET status = 'revoked', sealed_key = x'' WHERE id = ?1",
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

    async fn legacy_sealed_keys(&self) -> Result<Vec<(Uuid, SealedNodeKey)>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT id, sealed_key FROM ijam_nodes WHERE length(sealed_key) = ?1 ORDER BY id",
                )
                .db()?;
            let rows = stmt
                .query_map([SealedNodeKey::LEGACY_LEN as i64], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?))
                })
                .db()?;
            rows.map(|row| {
                let (id, sealed) = row.db()?;
                let id = Uuid::parse_str(&id).map_err(|_| StoreError::Corrupt(format!("node {id:?}")))?;
                Ok((id, SealedNodeKey(sealed)))
            })
            .collect()
        })
        .await
    }

    async fn replace_sealed_key(
        &self,
        id: Uuid,
        current: &SealedNodeKey,
        new: &SealedNodeKey,
    ) -> Result<bool, StoreError> {
        let (current, new) = (current.0.clone(), new.0.clone());
        self.call(move |conn| {
            let replaced = conn
                .exec(
                    "UPDATE ijam_nodes SET sealed_key = ?3
                     WHERE id = ?1 AND sealed_key = ?2 AND length(sealed_key) > 0",
                    params![id.to_string(), current, new],
                )
                .db()?;
            Ok(replaced == 1)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::StatementStatus;

    use super::*;
    use crate::store::ijam::{
        PassphraseHash, ReplayKey, SealedNodeKey, StoredNodeKey, StoredPassphrase,
    };

    fn op(i: u8, now_ms: i64) -> RegisterOp {
        RegisterOp {
            network: "lab".into(),
            passphrase: StoredPassphrase::Hash(PassphraseHash([i; 32])),
            replay_key: ReplayKey([i; 32]),
            replay_ttl_ms: 60_000,
            requested_id: None,
            fresh_id: Uuid::from_bytes([i; 16]),
            fresh_node_key: StoredNodeKey::Sealed(SealedNodeKey(vec![i; 61])),
            requested_node_key: None,
            node_type: "device",
            arch: "x86_ubuntu",
            now_ms,
        }
    }

    /// A statement that SQLite re-prepares on every run costs the writer a parse and
    /// a query plan per registration; the lookups of the register path must not.
    #[test]
    fn register_lookups_stay_prepared() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::migrations::migrate(&mut conn, "memory").unwrap();
        conn.execute(
            "INSERT INTO ijam_networks (id, owner, name, created_ms) VALUES ('lab', 'alice', 'lab', 0)",
            [],
        )
        .unwrap();
        for i in 1..=20u8 {
            conn.execute(
                "INSERT INTO ijam_passphrases (network, hash, node_name, created_ms) VALUES ('lab', ?1, ?2, 0)",
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
