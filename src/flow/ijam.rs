//! The ijam business rules (schemas/ijam.md; docs/design.md "The ijam wire, in brief"): validate → one atomic store call
//! → reply. Transport-agnostic; time and randomness come in as arguments.
//!
//! Error replies are uniform by class, so a reply tells an attacker nothing beyond
//! it: every decryption or parse failure reads `400 "request"`; an unknown network,
//! a wrong, used, expired or badly checked passphrase all read
//! `401 "Invalid passphrase."`. [`IjamError::reply`] is the one place that maps
//! errors to wire status codes.

use std::sync::{Arc, RwLock};

use uuid::Uuid;

use crate::core::crypto::{self, CryptoError, KeyRing, MAX_MODULUS_LEN, StorageKey};
use crate::store::StoreError;
use crate::store::ijam::{IjamStore, NodeStatus, RegisterOp, RegisterOutcome, TransitionOutcome};
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
            IjamError::Undecryptable | IjamError::Malformed(_) => {
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
            IjamError::TransitionNotAllowed { .. } => "transition_not_allowed",
            IjamError::Store(_) => "store_unavailable",
            IjamError::Crypto(_) => "crypto_error",
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
    /// The AES-GCM nonce that seals the node key at rest.
    pub seal_nonce: crypto::storage_key::SealNonce,
}

impl RegisterRandomness {
    /// From 44 random bytes: the id's 16 (made a UUIDv4), the IV's 16, the nonce's 12.
    pub fn from_bytes(bytes: [u8; 44]) -> Self {
        let (id, rest) = bytes.split_at(16);
        let (iv, nonce) = rest.split_at(16);
        RegisterRandomness {
            fresh_id: uuid::Builder::from_random_bytes(id.try_into().expect("16 bytes"))
                .into_uuid(),
            iv: iv.try_into().expect("16 bytes"),
            seal_nonce: nonce.try_into().expect("12 bytes"),
        }
    }
}

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
        let node_key = self
            .storage
            .store_node_key(at_rest, &request.node_key, rand.seal_nonce)
            .map_err(IjamError::Crypto)?;
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
            requested_node_key: request.node_id.map(|_| node_key.clone()),
            fresh_node_key: node_key,
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

    /// A state request: node id in clear → its key → decrypt → one atomic transition.
    pub async fn change_state(
        &self,
        request: &StateRequest,
        peer_ip: &str,
        now_ms: i64,
    ) -> Result<(Uuid, StateCode), IjamError> {
        let id = request.node_id;
        let node = self.store.node(id).await?.ok_or(IjamError::UnknownNode)?;
        if matches!(node.status, NodeStatus::Revoked | NodeStatus::Expired) {
            return Err(IjamError::Unusable(node.status.as_str()));
        }
        let key = self
            .storage
            .node_key(&node.key)
            .map_err(IjamError::Crypto)?;
        let mut block = request.body;
        crypto::aes_cbc_decrypt(&key, request.iv, &mut block);
        let code = StateCode::parse_plaintext(&block)?;
        let target = match code {
            StateCode::Offline => NodeStatus::Offline,
            StateCode::Loading => NodeStatus::Loading,
            StateCode::Online => NodeStatus::Online,
        };
        match self.store.transition(id, target, peer_ip, now_ms).await? {
            TransitionOutcome::Changed { .. } => Ok((id, code)),
            TransitionOutcome::NotAllowed { from } => Err(IjamError::TransitionNotAllowed {
                from: from.as_str(),
                to: target.as_str(),
            }),
            TransitionOutcome::UnknownNode => Err(IjamError::UnknownNode),
        }
    }
}
