//! The ijam flow's store: networks, one-time passphrases (kept as keyed hashes), nodes
//! and the replay cache of byte-identical retries.

use std::future::Future;

use serde::Serialize;
use uuid::Uuid;

pub use crate::core::crypto::{
    AtRest, PassphraseHash, ReplayKey, SealedNodeKey, StoredNodeKey, StoredPassphrase,
};

use super::StoreError;

/// Who may re-register an existing node through a network: its rule, set per network
/// (`network create --reregistration`, `network set`). The rule applies to the
/// registrations that name this network, whichever network the node is in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reregistration {
    /// The JAMScript-OTA rule, which deployments rely on: any passphrase of the
    /// network re-registers any node of the network's owner that names its id.
    #[default]
    Owner,
    /// Only a passphrase minted for that node ([`NewPassphrase::for_node`])
    /// re-registers an existing node; any other gets the 401 and is not consumed.
    Minted,
}

impl Reregistration {
    pub fn as_str(self) -> &'static str {
        match self {
            Reregistration::Owner => "owner",
            Reregistration::Minted => "minted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "owner" => Some(Reregistration::Owner),
            "minted" => Some(Reregistration::Minted),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Network {
    pub id: String,
    pub owner: String,
    pub name: String,
    pub created_ms: i64,
    pub reregistration: Reregistration,
    /// Passphrases not yet consumed (expired ones included).
    pub pending_passphrases: u64,
    pub nodes: u64,
}

#[derive(Debug, Clone)]
pub struct NewPassphrase {
    pub passphrase: StoredPassphrase,
    pub node_name: String,
    pub expires_ms: Option<i64>,
    /// Minted for this node of the network: it re-registers that node and nothing
    /// else (under either rule). The node must be in the network when it is added.
    pub for_node: Option<Uuid>,
}

/// What `passphrase list` shows: never the secret, not even its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingPassphrase {
    pub node_name: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub for_node: Option<Uuid>,
}

/// Node status as stored. The ijam wire codes (4/8/16) live in `wire::ijam`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Offline,
    Online,
    Loading,
    Revoked,
    /// The portal's layout: 90 days after its last registration (never on a native
    /// store).
    Expired,
    /// The portal's `created` or `none`: a status its enum has and nothing sets.
    Created,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Offline => "offline",
            NodeStatus::Online => "online",
            NodeStatus::Loading => "loading",
            NodeStatus::Revoked => "revoked",
            NodeStatus::Expired => "expired",
            NodeStatus::Created => "created",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "offline" => NodeStatus::Offline,
            "online" => NodeStatus::Online,
            "loading" => NodeStatus::Loading,
            "revoked" => NodeStatus::Revoked,
            "expired" => NodeStatus::Expired,
            "created" | "none" => NodeStatus::Created,
            _ => return None,
        })
    }

    /// The statuses from which a node may move to `self` (schemas/ijam.md, state requests).
    pub fn allowed_origins(self) -> &'static [NodeStatus] {
        match self {
            NodeStatus::Online => &[NodeStatus::Offline, NodeStatus::Online, NodeStatus::Loading],
            NodeStatus::Loading => &[NodeStatus::Online],
            NodeStatus::Offline => &[NodeStatus::Offline, NodeStatus::Online, NodeStatus::Loading],
            NodeStatus::Revoked | NodeStatus::Expired | NodeStatus::Created => &[],
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
    pub key: StoredNodeKey,
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
    pub passphrase: StoredPassphrase,
    pub replay_key: ReplayKey,
    pub replay_ttl_ms: i64,
    /// The node id the client sent; `None` when it sent all zeros.
    pub requested_id: Option<Uuid>,
    /// Used when `requested_id` is `None` or belongs to another owner (or is revoked).
    /// Made by the caller from a CSPRNG, so stores stay deterministic under test.
    pub fresh_id: Uuid,
    /// The node key as kept for `fresh_id`. A sealed key is bound to its node's id, and
    /// which id this registration gets is decided inside the store's atomic call, so
    /// the flow seals it for each id it may get and the store keeps the one that fits.
    pub fresh_node_key: StoredNodeKey,
    /// The node key as kept for `requested_id`: present exactly when that is.
    pub requested_node_key: Option<StoredNodeKey>,
    pub node_type: &'static str,
    pub arch: &'static str,
    pub now_ms: i64,
}

impl RegisterOp {
    /// The node key as kept for `id`, the id the store picked (`requested_id` or
    /// `fresh_id`); anything else is a programming error.
    pub fn node_key_for(&self, id: Uuid) -> Result<&StoredNodeKey, StoreError> {
        if self.requested_id == Some(id) {
            self.requested_node_key.as_ref().ok_or_else(|| {
                StoreError::Corrupt(format!("no node key kept for the requested id {id}"))
            })
        } else if self.fresh_id == id {
            Ok(&self.fresh_node_key)
        } else {
            Err(StoreError::Corrupt(format!(
                "no node key kept for node {id}, neither requested nor fresh"
            )))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// A new node record was created under `node_id`.
    Created { node_id: Uuid },
    /// The requested id existed with the same owner: status offline, new key.
    Reregistered { node_id: Uuid },
    /// A byte-identical request was answered within the replay TTL; nothing changed.
    Replayed { node_id: Uuid },
    /// Unknown network, unknown / used / expired passphrase, a passphrase minted for
    /// another use, or a re-registration the network's rule refuses: one outcome, so
    /// one reply. Nothing changed; the passphrase is still pending.
    InvalidPassphrase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionOutcome {
    Changed {
        from: NodeStatus,
    },
    NotAllowed {
        from: NodeStatus,
    },
    UnknownNode,
    /// The frame is byte-identical to the last one that changed this node: a replay
    /// or a retry. Nothing changed (not even the recorded address).
    Repeated {
        status: NodeStatus,
    },
}

/// SHA-256 of a whole state frame as it arrived: what a node record remembers of the
/// last frame that changed it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StateFrameDigest(pub [u8; 32]);

impl std::fmt::Debug for StateFrameDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateFrameDigest({})", hex::encode(&self.0[..4]))
    }
}

/// The ijam flow's atomic operations and the admin commands' reads and writes.
pub trait IjamStore: Send + Sync + 'static {
    /// How this store keeps passphrases and node keys: what it takes in
    /// [`NewPassphrase`] and [`RegisterOp`] and gives back in [`Node`].
    fn at_rest(&self) -> AtRest {
        AtRest::Protected
    }

    /// Writes a node as it stands, into an existing network (`registrar migrate`);
    /// false when a node of that id exists already (nothing changes).
    fn import_node(&self, node: Node) -> impl Future<Output = Result<bool, StoreError>> + Send;

    fn create_network(
        &self,
        id: &str,
        owner: &str,
        name: &str,
        reregistration: Reregistration,
        now_ms: i64,
    ) -> impl Future<Output = Result<Network, StoreError>> + Send;
    /// Changes the network's re-registration rule; returns the network as it is now
    /// (unknown network: `UnknownNetwork`).
    fn set_reregistration(
        &self,
        id: &str,
        reregistration: Reregistration,
    ) -> impl Future<Output = Result<Network, StoreError>> + Send;
    fn network(&self, id: &str)
    -> impl Future<Output = Result<Option<Network>, StoreError>> + Send;
    fn networks(&self) -> impl Future<Output = Result<Vec<Network>, StoreError>> + Send;
    /// Removes a network with its pending passphrases, replay records and nodes;
    /// returns how many nodes went with it (unknown network: `UnknownNetwork`).
    fn delete_network(&self, id: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Adds all or none: an unknown network, a taken node name, a duplicate secret or a
    /// passphrase minted for a node that is not in the network (`NodeNotInNetwork`)
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

    /// Consume the passphrase and create or re-register the node, atomically, under the
    /// rules of schemas/ijam.md ("Registration"). Beyond the original's, a passphrase
    /// minted for a node ([`NewPassphrase::for_node`]) re-registers that node only:
    /// the registration must name it and it must be in the network and not revoked;
    /// and in a network whose rule is [`Reregistration::Minted`], re-registering an
    /// existing node of the owner takes a passphrase minted for it. Whatever these
    /// refuse is `InvalidPassphrase`, with nothing written.
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
    /// Moves `id` to `target` if its current status is in `target.allowed_origins()`,
    /// and remembers `frame` as the last frame that changed it; a frame equal to that
    /// one changes nothing (`Repeated`). `ip` is recorded (and `online_ms` set) when the
    /// target is `Online`.
    fn transition(
        &self,
        id: Uuid,
        target: NodeStatus,
        ip: &str,
        now_ms: i64,
        frame: StateFrameDigest,
    ) -> impl Future<Output = Result<TransitionOutcome, StoreError>> + Send;
    /// Status `revoked`, key erased; later state requests get 403 and a registration
    /// naming this id gets a fresh one.
    fn revoke_node(&self, id: Uuid) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every node key still sealed in the first format ([`SealedNodeKey::is_legacy`]),
    /// with its node's id: what `registrar serve` re-seals, bound to that id, before it
    /// serves. Reads every node (SCAN on Redis): a start-up path, never a request's.
    fn legacy_sealed_keys(
        &self,
    ) -> impl Future<Output = Result<Vec<(Uuid, SealedNodeKey)>, StoreError>> + Send;
    /// Replaces node `id`'s sealed key by `new` only while it is still `current`, so a
    /// registration that re-keyed the node meanwhile keeps its key, and an erased key
    /// stays erased; true when replaced (false: changed meanwhile, erased, no such node).
    fn replace_sealed_key(
        &self,
        id: Uuid,
        current: &SealedNodeKey,
        new: &SealedNodeKey,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// The keyed hash of a passphrase a protected store takes; any other form is a
/// programming error (the flow asks the store how it keeps secrets).
pub(crate) fn protected_passphrase(p: &StoredPassphrase) -> Result<&PassphraseHash, StoreError> {
    match p {
        StoredPassphrase::Hash(hash) => Ok(hash),
        StoredPassphrase::Clear(_) => Err(StoreError::Corrupt(
            "a passphrase in clear offered to a store that keeps keyed hashes".into(),
        )),
    }
}

/// The sealed node key a protected store takes (erased: empty).
pub(crate) fn protected_key(key: &StoredNodeKey) -> Result<&[u8], StoreError> {
    match key {
        StoredNodeKey::Sealed(sealed) => Ok(&sealed.0),
        StoredNodeKey::None => Ok(&[]),
        StoredNodeKey::Clear(_) => Err(StoreError::Corrupt(
            "a node key in clear offered to a store that keeps sealed keys".into(),
        )),
    }
}

/// A protected store's sealed key bytes, as a [`StoredNodeKey`] (empty: erased).
pub(crate) fn sealed_key(bytes: Vec<u8>) -> StoredNodeKey {
    if bytes.is_empty() {
        StoredNodeKey::None
    } else {
        StoredNodeKey::Sealed(SealedNodeKey(bytes))
    }
}
