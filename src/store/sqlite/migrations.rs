//! Versioned migrations of the embedded store. `PRAGMA user_version` counts the
//! migrations applied; each runs in one transaction with the bump of that number, so
//! a store is always at a version, never between two. A store made by a newer
//! Registrar (a version this one does not know) is refused, not guessed at.
//!
//! Release 0.1.0 made its tables without setting `user_version`: a store at version
//! 0 that has them is at version 1. Every later step is a new entry at the end of
//! [`MIGRATIONS`]; entries are never edited once released.

use rusqlite::{Connection, OptionalExtension};

use crate::store::StoreError;

/// One step of the schema.
pub struct Migration {
    /// What it does, for the log and errors.
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every step, in order; the store is at version `MIGRATIONS.len()` when current.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "the ijam and pubkey tables of release 0.1.0",
        sql: V1,
    },
    Migration {
        name: "tables named by the flow that owns them",
        sql: V2,
    },
    Migration {
        name: "what lets a request run again tell its own effect: the last state frame \
               that changed each node, the attempt that used each nonce",
        sql: OWN_EFFECTS,
    },
    Migration {
        name: "ijam: a re-registration rule per network, passphrases minted for a node",
        sql: REREGISTRATION,
    },
];

/// The schema of release 0.1.0, as it made it.
const V1: &str = "
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

/// Each flow owns its tables, named `<flow>_…`, so a new flow's migration adds its own
/// and none collide. SQLite rewrites the references of the renamed tables.
const V2: &str = "
ALTER TABLE networks RENAME TO ijam_networks;
ALTER TABLE passphrases RENAME TO ijam_passphrases;
ALTER TABLE nodes RENAME TO ijam_nodes;
ALTER TABLE replay RENAME TO ijam_replay;
ALTER TABLE devices RENAME TO pubkey_devices;
ALTER TABLE used_nonces RENAME TO pubkey_used_nonces;
";

/// A node remembers the digest of the last state frame that changed it: the same frame
/// again (a replay, or a retry) changes nothing. A used nonce remembers the attempt
/// that used it: that attempt run again is told it attested.
const OWN_EFFECTS: &str = "
ALTER TABLE ijam_nodes ADD COLUMN last_state BLOB;
ALTER TABLE pubkey_used_nonces ADD COLUMN attempt BLOB;
";

/// A network's re-registration rule (`owner`, the original's, for every network made
/// before), and the node a pending passphrase was minted for (NULL: any use). The
/// node is not a foreign key: a passphrase outlives nothing it names (deleting a
/// network deletes both), and a node revoked meanwhile simply refuses it.
const REREGISTRATION: &str = "
ALTER TABLE ijam_networks ADD COLUMN reregistration TEXT NOT NULL DEFAULT 'owner'
    CHECK (reregistration IN ('owner', 'minted'));
ALTER TABLE ijam_passphrases ADD COLUMN for_node TEXT;
";

/// The version of the store on `conn`.
pub fn version(conn: &Connection) -> rusqlite::Result<usize> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version == 0 && has_release_0_1_tables(conn)? {
        return Ok(1);
    }
    Ok(version.max(0) as usize)
}

fn has_release_0_1_tables(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'networks'",
        [],
        |_| Ok(()),
    )
    .optional()
    .map(|found| found.is_some())
}

/// Brings the store on `conn` to the current version; returns the migrations applied
/// (by name). Two processes opening one store at once serialise on the write lock,
/// and the second finds nothing left to do.
pub fn migrate(conn: &mut Connection, url: &str) -> Result<Vec<&'static str>, StoreError> {
    let failed = |step: &str, e: rusqlite::Error| StoreError::Unavailable {
        url: url.to_owned(),
        cause: format!("migration {step:?}: {e}"),
    };
    let mut applied = Vec::new();
    loop {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| failed("begin", e))?;
        let at = version(&tx).map_err(|e| failed("read the version", e))?;
        if at > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "{url} is at schema version {at}, made by a newer Registrar (this one knows {}): \
                 run that version, or restore a backup",
                MIGRATIONS.len()
            )));
        }
        let Some(step) = MIGRATIONS.get(at) else {
            return Ok(applied);
        };
        tx.execute_batch(step.sql)
            .map_err(|e| failed(step.name, e))?;
        tx.pragma_update(None, "user_version", (at + 1) as i64)
            .map_err(|e| failed(step.name, e))?;
        tx.commit().map_err(|e| failed(step.name, e))?;
        applied.push(step.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap();
        stmt.query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn an_empty_store_gets_every_step_and_a_second_run_none() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut conn, "mem").unwrap().len(), MIGRATIONS.len());
        assert_eq!(version(&conn).unwrap(), MIGRATIONS.len());
        assert!(migrate(&mut conn, "mem").unwrap().is_empty());
        assert_eq!(
            tables(&conn),
            [
                "ijam_networks",
                "ijam_nodes",
                "ijam_passphrases",
                "ijam_replay",
                "pubkey_devices",
                "pubkey_used_nonces"
            ]
        );
    }

    #[test]
    fn a_release_0_1_store_is_version_1_and_keeps_its_rows() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(V1).unwrap();
        conn.execute(
            "INSERT INTO networks (id, owner, name, created_ms) VALUES ('lab', 'alice', 'lab', 7)",
            [],
        )
        .unwrap();
        assert_eq!(version(&conn).unwrap(), 1);
        assert_eq!(
            migrate(&mut conn, "mem").unwrap(),
            MIGRATIONS[1..].iter().map(|m| m.name).collect::<Vec<_>>()
        );
        let owner: String = conn
            .query_row(
                "SELECT owner FROM ijam_networks WHERE id = 'lab'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(owner, "alice");
    }

    #[test]
    fn version_4_reads_every_earlier_network_as_owner_and_every_passphrase_as_unminted() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(V1).unwrap();
        conn.execute_batch(
            "INSERT INTO networks (id, owner, name, created_ms) VALUES ('lab', 'alice', 'lab', 7);
             INSERT INTO passphrases (network, hash, node_name, created_ms)
                 VALUES ('lab', x'00', 'n1', 7);",
        )
        .unwrap();
        migrate(&mut conn, "mem").unwrap();
        let (rule, for_node): (String, Option<String>) = conn
            .query_row(
                "SELECT n.reregistration, p.for_node FROM ijam_networks n
                 JOIN ijam_passphrases p ON p.network = n.id",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((rule.as_str(), for_node), ("owner", None));
        let refused = conn.execute(
            "UPDATE ijam_networks SET reregistration = 'anyone' WHERE id = 'lab'",
            [],
        );
        assert!(refused.is_err(), "only the two rules are stored");
    }

    #[test]
    fn a_store_from_a_newer_release_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        let err = migrate(&mut conn, "mem").unwrap_err().to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }
}
