//! Persistent state: networks, one-time passphrases, nodes, and the replay cache of
//! the `ijam` flow; devices and used challenge nonces of the `pubkey` flow.
//!
//! Every operation a flow needs is ONE atomic call (a Lua script on Redis, one
//! transaction on SQLite), so two listeners racing for the same passphrase get
//! exactly one winner (docs/design.md "Stores"). Secrets never reach the store as sent:
//! passphrases arrive as keyed hashes ([`PassphraseHash`]) and node keys sealed
//! ([`SealedNodeKey`]); the store never sees a key that could unseal them.
//!
//! Time comes in as an argument (`now_ms`, milliseconds since the Unix epoch), so the
//! conformance suite drives every store on a fixed clock.

pub mod redis;
pub mod sqlite;

use std::fmt;
use std::future::Future;

use serde::Serialize;
use uuid::Uuid;

use crate::wire::pubkey::{DeviceId, Nonce};

/// Errors of the store layer. `Unavailable` is the only one a flow turns into a
/// 503 reply; the others are admin-facing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached or failed mid-operation; nothing was written.
    #[error("store unavailable ({url}): {cause}")]
    Unavailable { url: String, cause: String },
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
    #[error("device {0} does not exist")]
    UnknownDevice(DeviceId),
    /// The store holds data this version cannot read (hand-edited, or newer schema).
    #[error("corrupt store record: {0}")]
    Corrupt(String),
}

/// HMAC-SHA256 of (network id, passphrase) under the storage key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PassphraseHash(pub [u8; 32]);

impl fmt::Debug for PassphraseHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PassphraseHash(..)")
    }
}

/// HMAC-SHA256 of a whole registration plaintext under the storage key: the key of
/// the replay cache, so only the holder of the plaintext can hit an entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplayKey(pub [u8; 32]);

impl fmt::Debug for ReplayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplayKey(..)")
    }
}

/// A node's AES key sealed with AES-256-GCM under the storage key (nonce ‖ ct ‖ tag).
#[derive(Clone, PartialEq, Eq)]
pub struct SealedNodeKey(pub Vec<u8>);

impl fmt::Debug for SealedNodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealedNodeKey(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Network {
    pub id: String,
    pub owner: String,
    pub name: String,
    pub created_ms: i64,
    /// Passphrases not yet consumed (expired ones included).
    pub pending_passphrases: u64,
    pub nodes: u64,
}

#[derive(Debug, Clone)]
pub struct NewPassphrase {
    pub hash: PassphraseHash,
    pub node_name: String,
    pub expires_ms: Option<i64>,
}

/// What `passphrase list` shows: never the secret, not even its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingPassphrase {
    pub node_name: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
}

/// Node status as stored. The ijam wire codes (4/8/16) live in `wire::ijam`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Offline,
    Online,
    Loading,
    Revoked,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Offline => "offline",
            NodeStatus::Online => "online",
            NodeStatus::Loading => "loading",
            NodeStatus::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "offline" => NodeStatus::Offline,
            "online" => NodeStatus::Online,
            "loading" => NodeStatus::Loading,
            "revoked" => NodeStatus::Revoked,
            _ => return None,
        })
    }

    /// The statuses from which a node may move to `self` (schemas/ijam.md, state requests).
    pub fn allowed_origins(self) -> &'static [NodeStatus] {
        match self {
            NodeStatus::Online => &[NodeStatus::Offline, NodeStatus::Online, NodeStatus::Loading],
            NodeStatus::Loading => &[NodeStatus::Online],
            NodeStatus::Offline => &[NodeStatus::Offline, NodeStatus::Online, NodeStatus::Loading],
            NodeStatus::Revoked => &[],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub id: Uuid,
    pub network: String,
    pub owner: String,
    pub name: String,
    /// "device", "fog" or "cloud".
    pub node_type: String,
    /// "x86_ubuntu", "rpi_linux", "wsl", "macos" or "esp32".
    pub arch: String,
    pub status: NodeStatus,
    #[serde(skip)]
    pub sealed_key: SealedNodeKey,
    /// Peer address of the last `online` transition, empty before.
    pub ip: String,
    pub created_ms: i64,
    pub registered_ms: i64,
    pub online_ms: i64,
}

/// Everything the atomic registration step needs; built by `flow::ijam`.
#[derive(Debug, Clone)]
pub struct RegisterOp {
    pub network: String,
    pub passphrase: PassphraseHash,
    pub replay_key: ReplayKey,
    pub replay_ttl_ms: i64,
    /// The node id the client sent; `None` when it sent all zeros.
    pub requested_id: Option<Uuid>,
    /// Used when `requested_id` is `None` or belongs to another owner (or is revoked).
    /// Made by the caller from a CSPRNG, so stores stay deterministic under test.
    pub fresh_id: Uuid,
    pub sealed_key: SealedNodeKey,
    pub node_type: &'static str,
    pub arch: &'static str,
    pub now_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// A new node record was created under `node_id`.
    Created { node_id: Uuid },
    /// The requested id existed with the same owner: status offline, new key.
    Reregistered { node_id: Uuid },
    /// A byte-identical request was answered within the replay TTL; nothing changed.
    Replayed { node_id: Uuid },
    /// Unknown network, unknown / used / expired passphrase: one outcome, so one reply.
    InvalidPassphrase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionOutcome {
    Changed { from: NodeStatus },
    NotAllowed { from: NodeStatus },
    UnknownNode,
}

/// Whether a device's key binding stands. Revocation is final for that id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    Active,
    Revoked,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Active => "active",
            DeviceStatus::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => DeviceStatus::Active,
            "revoked" => DeviceStatus::Revoked,
            _ => return None,
        })
    }
}

/// A device of the `pubkey` flow: a device id bound to a P-256 public key for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: DeviceId,
    /// SubjectPublicKeyInfo DER of the device's key, as registered; kept after
    /// revocation, for audit.
    pub public_key: Vec<u8>,
    pub status: DeviceStatus,
    pub registered_ms: i64,
    /// The last successful attestation; 0 before the first.
    pub attested_ms: i64,
    pub attestations: u64,
    /// 0 unless revoked.
    pub revoked_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRegisterOutcome {
    /// The id was free: it is now bound to the key.
    Created,
    /// The id was already bound to this same key; nothing changed.
    SameKey,
    /// The id is bound to another key; nothing changed.
    OtherKey,
    /// The id was revoked; nothing changed.
    Revoked,
}

/// Everything the atomic attestation step needs; built by `flow::pubkey` after the
/// nonce's tag, its age and the signature were checked.
#[derive(Debug, Clone, Copy)]
pub struct AttestOp {
    pub device: DeviceId,
    pub nonce: Nonce,
    pub now_ms: i64,
    /// Until when the used nonce must be remembered (past its validity on every
    /// listener); `> now_ms`.
    pub nonce_expires_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttestOutcome {
    /// The nonce was fresh: it is now used, and the device's attestation recorded.
    Attested,
    NonceUsed,
    Revoked,
    UnknownDevice,
}

/// One trait, two implementations, one conformance suite (`tests/integration/store.rs`).
pub trait Store: Send + Sync + 'static {
    /// A URL-ish description for error messages (never includes a password).
    fn describe(&self) -> String;

    fn create_network(
        &self,
        id: &str,
        owner: &str,
        name: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<Network, StoreError>> + Send;
    fn network(&self, id: &str)
    -> impl Future<Output = Result<Option<Network>, StoreError>> + Send;
    fn networks(&self) -> impl Future<Output = Result<Vec<Network>, StoreError>> + Send;
    /// Removes a network with its pending passphrases, replay records and nodes;
    /// returns how many nodes went with it (unknown network: `UnknownNetwork`).
    fn delete_network(&self, id: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Adds all or none: an unknown network, a taken node name or a duplicate secret
    /// fails the whole batch.
    fn add_passphrases(
        &self,
        network: &str,
        batch: Vec<NewPassphrase>,
        now_ms: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn passphrases(
        &self,
        network: &str,
    ) -> impl Future<Output = Result<Vec<PendingPassphrase>, StoreError>> + Send;
    fn revoke_passphrase(
        &self,
        network: &str,
        node_name: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Consume the passphrase and create or re-register the node, atomically.
    fn register(
        &self,
        op: RegisterOp,
    ) -> impl Future<Output = Result<RegisterOutcome, StoreError>> + Send;

    fn node(&self, id: Uuid) -> impl Future<Output = Result<Option<Node>, StoreError>> + Send;
    /// All nodes, or those of one network (unknown network: `UnknownNetwork`).
    fn nodes(
        &self,
        network: Option<&str>,
    ) -> impl Future<Output = Result<Vec<Node>, StoreError>> + Send;
    /// Moves `id` to `target` if its current status is in `target.allowed_origins()`.
    /// `ip` is recorded (and `online_ms` set) when the target is `Online`.
    fn transition(
        &self,
        id: Uuid,
        target: NodeStatus,
        ip: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<TransitionOutcome, StoreError>> + Send;
    /// Status `revoked`, key erased; later state requests get 403 and a registration
    /// naming this id gets a fresh one.
    fn revoke_node(&self, id: Uuid) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Binds `public_key` (SPKI DER) to `id` if the id is free; otherwise reports
    /// whether it is bound to the same key, another key, or revoked. Never overwrites.
    fn register_device(
        &self,
        id: DeviceId,
        public_key: &[u8],
        now_ms: i64,
    ) -> impl Future<Output = Result<DeviceRegisterOutcome, StoreError>> + Send;
    fn device(
        &self,
        id: DeviceId,
    ) -> impl Future<Output = Result<Option<Device>, StoreError>> + Send;
    /// All devices, by (registered_ms, id).
    fn devices(&self) -> impl Future<Output = Result<Vec<Device>, StoreError>> + Send;
    /// Checks the device is known and not revoked, marks the nonce used (once, ever,
    /// until `nonce_expires_ms`) and records the attestation, atomically.
    fn attest_device(
        &self,
        op: AttestOp,
    ) -> impl Future<Output = Result<AttestOutcome, StoreError>> + Send;
    /// Status `revoked` (the key is kept for audit); every later request naming the id
    /// gets 403. Revoking twice is fine; an unknown id is `UnknownDevice`.
    fn revoke_device(
        &self,
        id: DeviceId,
        now_ms: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Whether opening a store may make it: the listener and `init` make the embedded
/// store on first use; the admin commands never do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    IfMissing,
    Never,
}

/// The store a listener or admin command was configured with (`--store`).
pub enum AnyStore {
    Sqlite(sqlite::SqliteStore),
    Redis(redis::RedisStore),
}

impl AnyStore {
    /// `sqlite` (the file in the data dir) or a `redis://` / `rediss://` URL.
    pub async fn open(
        spec: &str,
        sqlite_path: &std::path::Path,
        creation: Creation,
    ) -> Result<Self, StoreError> {
        if spec == "sqlite" {
            Ok(AnyStore::Sqlite(sqlite::SqliteStore::open(
                sqlite_path,
                creation,
            )?))
        } else if ["redis://", "rediss://", "redis+unix://"]
            .iter()
            .any(|p| spec.starts_with(p))
        {
            Ok(AnyStore::Redis(redis::RedisStore::connect(spec).await?))
        } else {
            let scheme = spec.split_once("://").map_or(spec, |(scheme, _)| scheme);
            Err(StoreError::Unavailable {
                url: redis::redact_url(spec),
                cause: format!(
                    "unknown store {scheme:?}: use `sqlite` or a redis://host:port/db URL"
                ),
            })
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $call,
            AnyStore::Redis($s) => $call,
        }
    };
}

impl Store for AnyStore {
    fn describe(&self) -> String {
        delegate!(self, s => s.describe())
    }
    async fn create_network(
        &self,
        id: &str,
        owner: &str,
        name: &str,
        now_ms: i64,
    ) -> Result<Network, StoreError> {
        delegate!(self, s => s.create_network(id, owner, name, now_ms).await)
    }
    async fn network(&self, id: &str) -> Result<Option<Network>, StoreError> {
        delegate!(self, s => s.network(id).await)
    }
    async fn networks(&self) -> Result<Vec<Network>, StoreError> {
        delegate!(self, s => s.networks().await)
    }
    async fn delete_network(&self, id: &str) -> Result<u64, StoreError> {
        delegate!(self, s => s.delete_network(id).await)
    }
    async fn add_passphrases(
        &self,
        network: &str,
        batch: Vec<NewPassphrase>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        delegate!(self, s => s.add_passphrases(network, batch, now_ms).await)
    }
    async fn passphrases(&self, network: &str) -> Result<Vec<PendingPassphrase>, StoreError> {
        delegate!(self, s => s.passphrases(network).await)
    }
    async fn revoke_passphrase(&self, network: &str, node_name: &str) -> Result<(), StoreError> {
        delegate!(self, s => s.revoke_passphrase(network, node_name).await)
    }
    async fn register(&self, op: RegisterOp) -> Result<RegisterOutcome, StoreError> {
        delegate!(self, s => s.register(op).await)
    }
    async fn node(&self, id: Uuid) -> Result<Option<Node>, StoreError> {
        delegate!(self, s => s.node(id).await)
    }
    async fn nodes(&self, network: Option<&str>) -> Result<Vec<Node>, StoreError> {
        delegate!(self, s => s.nodes(network).await)
    }
    async fn transition(
        &self,
        id: Uuid,
        target: NodeStatus,
        ip: &str,
        now_ms: i64,
    ) -> Result<TransitionOutcome, StoreError> {
        delegate!(self, s => s.transition(id, target, ip, now_ms).await)
    }
    async fn revoke_node(&self, id: Uuid) -> Result<(), StoreError> {
        delegate!(self, s => s.revoke_node(id).await)
    }
    async fn register_device(
        &self,
        id: DeviceId,
        public_key: &[u8],
        now_ms: i64,
    ) -> Result<DeviceRegisterOutcome, StoreError> {
        delegate!(self, s => s.register_device(id, public_key, now_ms).await)
    }
    async fn device(&self, id: DeviceId) -> Result<Option<Device>, StoreError> {
        delegate!(self, s => s.device(id).await)
    }
    async fn devices(&self) -> Result<Vec<Device>, StoreError> {
        delegate!(self, s => s.devices().await)
    }
    async fn attest_device(&self, op: AttestOp) -> Result<AttestOutcome, StoreError> {
        delegate!(self, s => s.attest_device(op).await)
    }
    async fn revoke_device(&self, id: DeviceId, now_ms: i64) -> Result<(), StoreError> {
        delegate!(self, s => s.revoke_device(id, now_ms).await)
    }
}
