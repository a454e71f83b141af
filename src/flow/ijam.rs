//! The ijam business rules (schemas/ijam.md; docs/design.md "The ijam wire, in brief"): validate → one atomic store call
//! → reply. Transport-agnostic; time and randomness come in as arguments.
//!
//! Error replies are uniform by class, so a reply tells an attacker nothing beyond
//! it: every decryption or parse failure reads `400 "request"`; an unknown network,
//! a wrong, used, expired or badly checked passphrase all read
//! `401 "Invalid passphrase."`. [`IjamError::reply`] is the one place that maps
//! errors to wire status codes.

use std::sync::{Arc, RwLock};

use futures_util::{StreamExt, TryStreamExt, stream};
use uuid::Uuid;

use crate::core::crypto::storage_key::SealNonce;
use crate::core::crypto::{self, CryptoError, KeyRing, MAX_MODULUS_LEN, StorageKey};
use crate::core::random::RandomError;
use crate::store::StoreError;
use crate::store::ijam::{
    IjamStore, NodeStatus, RegisterOp, RegisterOutcome, StateFrameDigest, TransitionOutcome,
};
use crate::wire::DecodeError;
use crate::wire::ijam::{self, RegisterRequest, StateCode, StateRequest, Status};

/// How long a byte-identical retry gets the same node id back.
pub const DEFAULT_REPLAY_TTL_MS: i64 = 10 * 60 * 1000;

/// Why a request failed; each variant is one reply class.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IjamError {
    #[error("undecryptable ciphertext")]
    Undecryptable,
    #[error("malformed request: {0}")]
    Malformed(#[from] DecodeError),
    #[error("invalid passphrase or unknown network")]
    InvalidPassphrase,
    #[error("unknown node")]
    UnknownNode,
    /// Revoked, or expired (the portal's layout): its key is gone.
    #[error("node is {0}")]
    Unusable(&'static str),
    /// The key stored for the node does not open for it: sealed for another node (a
    /// value copied between records), of the first format, under another storage key,
    /// or erased. Its frames cannot be checked, as under a wrong key.
    #[error("the node's stored key does not open for it")]
    StoredKeyRefused,
    #[error("transition from {from} to {to} not allowed")]
    TransitionNotAllowed {
        from: &'static str,
        to: &'static str,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("crypto: {0}")]
    Crypto(CryptoError),
}

pub use crate::wire::ijam::{
    REASON_BUSY, REASON_INVALID_PASSPHRASE, REASON_NODE_NOT_FOUND, REASON_RATE_LIMITED,
    REASON_REQUEST, REASON_UNAVAILABLE,
};

impl IjamError {
    /// The wire status of this failure and the reason text of a registration reply:
    /// the single mapping point.
    pub fn status_and_reason(&self) -> (Status, &'static str) {
        match self {
            IjamError::Undecryptable | IjamError::Malformed(_) | IjamError::StoredKeyRefused => {
                (Status::BAD_REQUEST, REASON_REQUEST)
            }
            IjamError::InvalidPassphrase => (Status::UNAUTHORIZED, REASON_INVALID_PASSPHRASE),
            IjamError::UnknownNode => (Status::NOT_FOUND, REASON_NODE_NOT_FOUND),
            IjamError::Unusable(_) | IjamError::TransitionNotAllowed { .. } => {
                (Status::FORBIDDEN, "Transition not allowed.")
            }
            IjamError::Store(_) | IjamError::Crypto(_) => {
                (Status::SERVICE_UNAVAILABLE, REASON_UNAVAILABLE)
            }
        }
    }

    /// A registration-port error reply: status ‖ reason.
    pub fn register_reply(&self) -> Vec<u8> {
        let (status, reason) = self.status_and_reason();
        ijam::error_reply(status, reason)
    }

    /// A state-port reply: the status, and the original's text where it tells the
    /// peer nothing it could not learn otherwise — a refused transition (the peer
    /// holds the node's key) and an unknown node (ids are random). A frame that does
    /// not decrypt or check gets the status alone: telling a bad checksum from a bad
    /// code would help forge frames through the IV.
    pub fn state_reply(&self) -> Vec<u8> {
        let (status, _) = self.status_and_reason();
        match self {
            IjamError::TransitionNotAllowed { from, to } => ijam::error_reply(
                status,
                &format!("Cannot transition node from {from} to {to}."),
            ),
            IjamError::UnknownNode => ijam::error_reply(status, REASON_NODE_NOT_FOUND),
            _ => ijam::state_reply(status).to_vec(),
        }
    }

    /// A short word for the request log.
    pub fn outcome(&self) -> &'static str {
        match self {
            IjamError::Undecryptable => "undecryptable",
            IjamError::Malformed(_) => "malformed",
            IjamError::InvalidPassphrase => "invalid_passphrase",
            IjamError::UnknownNode => "unknown_node",
            IjamError::Unusable(_) => "unusable",
            IjamError::StoredKeyRefused => "stored_key_refused",
            IjamError::TransitionNotAllowed { .. } => "transition_not_allowed",
            IjamError::Store(StoreError::OutcomeUnknown { .. }) => "outcome_unknown",
            IjamError::Store(_) => "store_unavailable",
            IjamError::Crypto(_) => "crypto_error",
        }
    }

    /// The store could not tell whether the request took effect: it gets no reply at
    /// all (a TCP connection is closed), never an error that could hide a write; its
    /// byte-identical retry is answered from the replay record.
    pub fn withholds_reply(&self) -> bool {
        matches!(self, IjamError::Store(StoreError::OutcomeUnknown { .. }))
    }
}

/// What a state request that succeeded did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateChange {
    Changed,
    /// The same frame as the last one that changed the node: nothing changed.
    Repeated,
}

impl StateChange {
    pub fn outcome(self) -> &'static str {
        match self {
            StateChange::Changed => "changed",
            StateChange::Repeated => "repeated",
        }
    }
}

/// What a successful registration did, for the request log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    Created(Uuid),
    Reregistered(Uuid),
    Replayed(Uuid),
}

impl Registered {
    pub fn node_id(self) -> Uuid {
        match self {
            Registered::Created(id) | Registered::Reregistered(id) | Registered::Replayed(id) => id,
        }
    }

    pub fn outcome(self) -> &'static str {
        match self {
            Registered::Created(_) => "created",
            Registered::Reregistered(_) => "reregistered",
            Registered::Replayed(_) => "replayed",
        }
    }
}

/// Randomness a registration consumes, drawn by the caller.
#[derive(Debug, Clone, Copy)]
pub struct RegisterRandomness {
    /// The node's id if it gets a new one (a UUIDv4).
    pub fresh_id: Uuid,
    /// The reply's AES-CBC IV.
    pub iv: [u8; 16],
    /// The AES-GCM nonce that seals the node key at rest for `fresh_id`.
    pub fresh_seal_nonce: SealNonce,
    /// The one that seals it for the requested id (two sealings, two nonces).
    pub requested_seal_nonce: SealNonce,
}

impl RegisterRandomness {
    /// From 56 random bytes: the id's 16 (made a UUIDv4), the IV's 16, the two
    /// nonces' 12 each.
    pub fn from_bytes(bytes: [u8; 56]) -> Self {
        let (id, rest) = bytes.split_at(16);
        let (iv, rest) = rest.split_at(16);
        let (fresh_nonce, requested_nonce) = rest.split_at(12);
        RegisterRandomness {
            fresh_id: uuid::Builder::from_random_bytes(id.try_into().expect("16 bytes"))
                .into_uuid(),
            iv: iv.try_into().expect("16 bytes"),
            fresh_seal_nonce: fresh_nonce.try_into().expect("12 bytes"),
            requested_seal_nonce: requested_nonce.try_into().expect("12 bytes"),
        }
    }
}

/// What [`IjamFlow::reseal_legacy_node_keys`] did, in node keys.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resealed {
    /// Sealed again, bound to their node.
    pub resealed: u64,
    /// Changed between the listing and the replacement (a registration, or another
    /// listener starting at the same time): left as they are now.
    pub changed: u64,
    /// Not opening under this storage key: left as they are, and refused like any
    /// key that does not open, until the node registers again.
    pub unopenable: u64,
}

/// Replacements in flight at once while re-sealing: enough for SQLite to commit them
/// in groups and for Redis to pipeline them.
const RESEAL_CONCURRENCY: usize = 64;

pub struct IjamFlow<S> {
    /// Swapped whole when the data dir's keys change (`registrar key rotate`).
    keys: RwLock<Arc<KeyRing>>,
    storage: StorageKey,
    store: Arc<S>,
    replay_ttl_ms: i64,
}

impl<S: IjamStore> IjamFlow<S> {
    pub fn new(keys: KeyRing, storage: StorageKey, store: Arc<S>, replay_ttl_ms: i64) -> Self {
        IjamFlow {
            keys: RwLock::new(Arc::new(keys)),
            storage,
            store,
            replay_ttl_ms,
        }
    }

    /// The keys in force now (cheap: one `Arc` clone).
    pub fn keys(&self) -> Arc<KeyRing> {
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts new keys in force; requests already decrypting finish with the old ring.
    pub fn set_keys(&self, keys: KeyRing) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The expensive, store-free half of a registration: RSA-OAEP decryption and
    /// parse. Runs on the crypto pool.
    pub fn open_request(
        &self,
        ciphertext: &[u8],
        now_ms: i64,
    ) -> Result<RegisterRequest, IjamError> {
        let mut buf = [0u8; MAX_MODULUS_LEN];
        let keys = self.keys();
        let plain = keys
            .decrypt(ciphertext, now_ms, &mut buf)
            .map_err(|_| IjamError::Undecryptable)?;
        let request = RegisterRequest::parse(plain)?;
        buf.fill(0);
        Ok(request)
    }

    /// The store half: one atomic call, then the 50-byte reply.
    pub async fn register(
        &self,
        request: &RegisterRequest,
        now_ms: i64,
        rand: RegisterRandomness,
    ) -> Result<(Registered, [u8; ijam::REGISTER_REPLY_LEN]), IjamError> {
        let network = request.network_id.as_str();
        let at_rest = self.store.at_rest();
        // Which id the node gets is decided inside the store's atomic call; the key is
        // bound to the id, so it is sealed for each id it may get.
        let keep_for = |node: Uuid, nonce: SealNonce| {
            self.storage
                .store_node_key(at_rest, &request.node_key, nonce, node)
                .map_err(IjamError::Crypto)
        };
        let op = RegisterOp {
            network: network.to_owned(),
            passphrase: self.storage.store_passphrase(
                at_rest,
                network,
                request.passphrase.expose(),
            ),
            replay_key: self.storage.replay_key(&request.to_bytes()),
            replay_ttl_ms: self.replay_ttl_ms,
            requested_id: request.node_id,
            fresh_id: rand.fresh_id,
            fresh_node_key: keep_for(rand.fresh_id, rand.fresh_seal_nonce)?,
            requested_node_key: request
                .node_id
                .map(|id| keep_for(id, rand.requested_seal_nonce))
                .transpose()?,
            node_type: request.node_type.as_str(),
            arch: request.node_arch.as_str(),
            now_ms,
        };
        let registered = match self.store.register(op).await? {
            RegisterOutcome::Created { node_id } => Registered::Created(node_id),
            RegisterOutcome::Reregistered { node_id } => Registered::Reregistered(node_id),
            RegisterOutcome::Replayed { node_id } => Registered::Replayed(node_id),
            RegisterOutcome::InvalidPassphrase => return Err(IjamError::InvalidPassphrase),
        };
        let mut body = ijam::register_reply_plaintext(registered.node_id());
        crypto::aes_cbc_encrypt(&request.node_key, rand.iv, &mut body);
        Ok((registered, ijam::register_reply(rand.iv, body)))
    }

    /// Seals again, bound to its node's id, every node key the store still holds in
    /// the first format (which would open in any node's record), so that from then on
    /// no such value is ever opened. Runs before the listener serves; `nonce` draws a
    /// fresh AES-GCM nonce for each key.
    pub async fn reseal_legacy_node_keys(
        &self,
        mut nonce: impl FnMut() -> Result<SealNonce, RandomError>,
    ) -> Result<Resealed, IjamError> {
        let mut done = Resealed::default();
        let mut replacements = Vec::new();
        for (id, legacy) in self.store.legacy_sealed_keys().await? {
            let nonce = nonce().map_err(|e| IjamError::Crypto(e.into()))?;
            match self.storage.reseal_legacy_node_key(&legacy, nonce, id) {
                Ok(bound) => replacements.push((id, legacy, bound)),
                Err(_) => done.unopenable += 1,
            }
        }
        let replaced: Vec<bool> = stream::iter(&replacements)
            .map(|(id, legacy, bound)| self.store.replace_sealed_key(*id, legacy, bound))
            .buffer_unordered(RESEAL_CONCURRENCY)
            .try_collect()
            .await?;
        for replaced in replaced {
            if replaced {
                done.resealed += 1;
            } else {
                done.changed += 1;
            }
        }
        Ok(done)
    }

    /// A state request: node id in clear → its key → decrypt → one atomic transition.
    /// A frame byte-identical to the last one that changed the node (a replay, or a
    /// retry whose reply was lost) is answered 200 and changes nothing: the protocol
    /// has no freshness, so this is what keeps a replay from rewriting the node's
    /// address, and what lets a retry after a lost outcome be answered truthfully.
    pub async fn change_state(
        &self,
        request: &StateRequest,
        peer_ip: &str,
        now_ms: i64,
    ) -> Result<(Uuid, StateCode, StateChange), IjamError> {
        let id = request.node_id;
        let node = self.store.node(id).await?.ok_or(IjamError::UnknownNode)?;
        if matches!(node.status, NodeStatus::Revoked | NodeStatus::Expired) {
            return Err(IjamError::Unusable(node.status.as_str()));
        }
        let key = self
            .storage
            .node_key(&node.key, id)
            .map_err(|_| IjamError::StoredKeyRefused)?;
        let mut block = request.body;
        crypto::aes_cbc_decrypt(&key, request.iv, &mut block);
        let code = StateCode::parse_plaintext(&block)?;
        let target = match code {
            StateCode::Offline => NodeStatus::Offline,
            StateCode::Loading => NodeStatus::Loading,
            StateCode::Online => NodeStatus::Online,
        };
        let frame = StateFrameDigest(crypto::sha256(&request.to_bytes()));
        match self
            .store
            .transition(id, target, peer_ip, now_ms, frame)
            .await?
        {
            TransitionOutcome::Changed { .. } => Ok((id, code, StateChange::Changed)),
            TransitionOutcome::Repeated { .. } => Ok((id, code, StateChange::Repeated)),
            TransitionOutcome::NotAllowed { from } => Err(IjamError::TransitionNotAllowed {
                from: from.as_str(),
                to: target.as_str(),
            }),
            TransitionOutcome::UnknownNode => Err(IjamError::UnknownNode),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::crypto::{RsaKey, StoredNodeKey};
    use crate::core::ids::NodeKey;
    use crate::store::Creation;
    use crate::store::ijam::{AtRest, NewPassphrase, Node, NodeStatus, Reregistration};
    use crate::store::sqlite::SqliteStore;
    use crate::wire::ijam::{NetworkId, NodeArch, NodeType, Passphrase};

    const NOW: i64 = 1_700_000_000_000;
    const STORAGE: [u8; 32] = [7; 32];

    struct Fixture {
        flow: IjamFlow<SqliteStore>,
        /// The flow's storage key, to look at what it kept.
        storage: StorageKey,
        _dir: tempfile::TempDir,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db"), Creation::IfMissing).unwrap();
        store
            .create_network("lab", "alice", "Lab", Reregistration::Owner, NOW)
            .await
            .unwrap();
        let rsa = RsaKey::from_pkcs8_pem(include_str!(
            "../../tests/vectors/ijam/rsa2048_private_key.pem"
        ))
        .unwrap();
        Fixture {
            flow: IjamFlow::new(
                KeyRing::new(rsa, None),
                StorageKey::from_bytes(&STORAGE),
                Arc::new(store),
                DEFAULT_REPLAY_TTL_MS,
            ),
            storage: StorageKey::from_bytes(&STORAGE),
            _dir: dir,
        }
    }

    fn id(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    impl Fixture {
        /// Registers through a fresh passphrase; returns the id the node got.
        async fn register(&self, requested: Option<Uuid>, key: &NodeKey, n: u8) -> Uuid {
            let passphrase = format!("pass{n:04}");
            let stored = self
                .storage
                .store_passphrase(AtRest::Protected, "lab", &passphrase);
            self.flow
                .store()
                .add_passphrases(
                    "lab",
                    vec![NewPassphrase {
                        passphrase: stored,
                        node_name: format!("node-{n}"),
                        expires_ms: None,
                        for_node: None,
                    }],
                    NOW,
                )
                .await
                .unwrap();
            let request = RegisterRequest {
                node_id: requested,
                network_id: NetworkId::new("lab").unwrap(),
                passphrase: Passphrase::new(&passphrase).unwrap(),
                node_key: key.clone(),
                node_type: NodeType::Device,
                node_arch: NodeArch::X86Ubuntu,
            };
            let mut random = [n; 56];
            random[44..].fill(n.wrapping_add(1));
            let (registered, _) = self
                .flow
                .register(&request, NOW, RegisterRandomness::from_bytes(random))
                .await
                .unwrap();
            registered.node_id()
        }

        async fn stored_key(&self, node: Uuid) -> StoredNodeKey {
            self.flow.store().node(node).await.unwrap().unwrap().key
        }
    }

    /// The key is sealed for each id a registration may get; what the store kept opens
    /// for the id the node got, and for no other.
    #[tokio::test]
    async fn the_key_kept_opens_for_the_id_the_node_got_only() {
        let f = fixture().await;
        let key = NodeKey([42; 32]);
        let fresh = f.register(None, &key, 1).await;
        let requested = f.register(Some(id(0x42)), &key, 2).await;
        assert_eq!(requested, id(0x42));
        let again = f.register(Some(fresh), &key, 3).await;
        assert_eq!(again, fresh, "re-registered");
        for (node, other) in [(fresh, requested), (requested, fresh)] {
            let stored = f.stored_key(node).await;
            assert!(matches!(&stored, StoredNodeKey::Sealed(s) if !s.is_legacy()));
            assert_eq!(f.storage.node_key(&stored, node).unwrap(), key);
            assert!(f.storage.node_key(&stored, other).is_err());
        }
    }

    /// Keys of the first format are sealed again for their node before serving; one
    /// that does not open under this storage key is left alone and counted.
    #[tokio::test]
    async fn keys_of_the_first_format_are_sealed_again_for_their_node() {
        let f = fixture().await;
        let key = NodeKey([42; 32]);
        let bound = f.register(None, &key, 1).await;
        let bound_before = f.stored_key(bound).await;
        let first_format = f.storage.seal_legacy_node_key(&key, [9; 12]);
        let foreign = StorageKey::from_bytes(&[8; 32]).seal_legacy_node_key(&key, [9; 12]);
        for (node, value) in [(id(2), first_format), (id(3), foreign.clone())] {
            let imported = Node {
                id: node,
                network: "lab".into(),
                owner: "alice".into(),
                name: format!("old-{node}"),
                node_type: "device".into(),
                arch: "x86_ubuntu".into(),
                status: NodeStatus::Offline,
                key: StoredNodeKey::Sealed(value),
                ip: String::new(),
                created_ms: NOW,
                registered_ms: NOW,
                online_ms: 0,
            };
            assert!(f.flow.store().import_node(imported).await.unwrap());
        }
        assert!(
            f.storage
                .node_key(&f.stored_key(id(2)).await, id(2))
                .is_err()
        );

        let mut nonces = 0u8;
        let mut nonce = || {
            nonces += 1;
            Ok([nonces; 12])
        };
        assert_eq!(
            f.flow.reseal_legacy_node_keys(&mut nonce).await.unwrap(),
            Resealed {
                resealed: 1,
                changed: 0,
                unopenable: 1
            }
        );
        let resealed = f.stored_key(id(2)).await;
        assert_eq!(f.storage.node_key(&resealed, id(2)).unwrap(), key);
        assert!(f.storage.node_key(&resealed, id(3)).is_err());
        assert_eq!(f.stored_key(id(3)).await, StoredNodeKey::Sealed(foreign));
        assert_eq!(f.stored_key(bound).await, bound_before, "bound keys stay");
        // A second start finds only the one it cannot open.
        assert_eq!(
            f.flow.reseal_legacy_node_keys(&mut nonce).await.unwrap(),
            Resealed {
                resealed: 0,
                changed: 0,
                unopenable: 1
            }
        );
    }
}
