//! Persistent state, one store trait per flow: [`ijam::IjamStore`] (networks, one-time
//! passphrases, nodes, the replay cache) and [`pubkey::PubkeyStore`] (devices and used
//! challenge nonces). Each has two implementations, in `sqlite/<flow>.rs` and
//! `redis/<flow>.rs`, and one conformance battery run on both.
//!
//! Every operation a flow needs is ONE atomic call (a Lua script on Redis, whose keys
//! share one cluster slot; one transaction on SQLite), so two listeners racing for the
//! same passphrase get exactly one winner. Secrets never reach the store as sent:
//! passphrases arrive as keyed hashes and node keys sealed (`core::crypto::storage_key`);
//! the store never sees a key that could unseal them.
//!
//! Time comes in as an argument (`now_ms`, milliseconds since the Unix epoch), so the
//! conformance suite drives every store on a fixed clock.

pub mod ijam;
pub mod pubkey;
pub mod redis;
pub mod sqlite;

use uuid::Uuid;

use crate::core::ids::DeviceId;

/// Errors of the store layer. `Unavailable` is the only one a flow turns into a
/// 503 reply; the others are admin-facing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached, or refused the operation; nothing was written.
    #[error("store unavailable ({url}): {cause}")]
    Unavailable { url: String, cause: String },
    /// The operation was sent and the store did not answer (connection lost, no reply
    /// in time), and re-running it could not tell within the time allowed whether it
    /// took effect: the request must get no answer at all, never an error that could
    /// hide a write (its byte-identical retry is answered from the replay record).
    #[error("store outcome unknown ({url}): {cause}")]
    OutcomeUnknown { url: String, cause: String },
    /// An admin command found no store where it looked (it never makes one).
    #[error(
        "no store at {url}: `registrar init` (or the first `registrar serve`) makes it; \
         for a Redis store give --store redis://host:port/db"
    )]
    Missing { url: String },
    #[error("network {0:?} does not exist")]
    UnknownNetwork(String),
    #[error("network {0:?} already exists")]
    NetworkExists(String),
    #[error("a passphrase for node {node_name:?} is already pending in network {network:?}")]
    PassphraseNameTaken { network: String, node_name: String },
    #[error("that passphrase is already pending in network {0:?}")]
    PassphraseTaken(String),
    #[error("no pending passphrase for node {node_name:?} in network {network:?}")]
    UnknownPassphraseName { network: String, node_name: String },
    #[error("node {0} does not exist")]
    UnknownNode(Uuid),
    /// A passphrase minted for a node that is not one of the network's.
    #[error("node {node} is not a node of network {network:?}")]
    NodeNotInNetwork { network: String, node: Uuid },
    #[error("device {0} does not exist")]
    UnknownDevice(DeviceId),
    /// What this store's layout cannot keep (the portal's: passphrase expiry,
    /// passphrases minted for a node, the `minted` re-registration rule).
    #[error("{0}")]
    Unsupported(String),
    /// The store holds data this version cannot read (hand-edited, or newer schema).
    #[error("corrupt store record: {0}")]
    Corrupt(String),
}

/// Whether opening a store may make it: the listener and `init` make the embedded
/// store on first use; the admin commands never do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    IfMissing,
    Never,
}

/// What `--store` names: the backend, chosen once at start; the listener and the
/// admin commands are generic over it from there on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// The embedded store in the data dir.
    Sqlite,
    /// A Redis server: `redis://`, `rediss://` or `redis+unix://`.
    Redis(String),
    /// The JAMScript-OTA portal's Redis, in its own layout: `ota+redis://host:port/db`
    /// (held here as the `redis://` URL to connect to).
    Portal(String),
}

impl StoreUrl {
    pub fn parse(spec: &str) -> Result<StoreUrl, StoreError> {
        if spec == "sqlite" {
            return Ok(StoreUrl::Sqlite);
        }
        if ["redis://", "rediss://", "redis+unix://"]
            .iter()
            .any(|p| spec.starts_with(p))
        {
            return Ok(StoreUrl::Redis(spec.to_owned()));
        }
        if let Some(rest) = spec.strip_prefix("ota+") {
            return Ok(StoreUrl::Portal(rest.to_owned()));
        }
        let scheme = spec.split_once("://").map_or(spec, |(scheme, _)| scheme);
        Err(StoreError::Unavailable {
            url: redis::redact_url(spec),
            cause: format!(
                "unknown store {scheme:?}: use `sqlite`, a redis://host:port/db URL, or \
                 ota+redis://host:port/db for a JAMScript-OTA portal's Redis"
            ),
        })
    }
}

/// Runs `$run(store, $args…)` — an async function generic over the store — on the
/// store `$spec` names (`--store`), its SQLite file at `$sqlite_path`, and returns what
/// it returns (a `Result` whose error takes a `StoreError`). The one place a backend is
/// picked by name: the listener and every command are generic from there on.
#[macro_export]
macro_rules! with_store {
    ($spec:expr, $sqlite_path:expr, $creation:expr, $run:path, $($arg:expr),* $(,)?) => {
        match $crate::store::StoreUrl::parse($spec)? {
            $crate::store::StoreUrl::Sqlite => {
                let store = $crate::store::sqlite::SqliteStore::open($sqlite_path, $creation)?;
                $run(store, $($arg),*).await
            }
            $crate::store::StoreUrl::Redis(url) => {
                let store = $crate::store::redis::RedisStore::connect(&url).await?;
                $run(store, $($arg),*).await
            }
            $crate::store::StoreUrl::Portal(url) => {
                let store = $crate::store::redis::portal::PortalStore::connect(&url).await?;
                $run(store, $($arg),*).await
            }
        }
    };
}

/// Every flow's store: what the listener and the admin commands need of a backend.
pub trait Stores: ijam::IjamStore + pubkey::PubkeyStore {
    /// A URL-ish description for logs and errors (never includes a password).
    fn describe(&self) -> String;
}
