//! The pubkey flow's store: devices bound to a P-256 key, and the challenge nonces
//! already used.

use std::future::Future;

use serde::Serialize;

pub use crate::core::ids::DeviceId;

use super::StoreError;

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
    /// The challenge nonce as the device signed it (its 32 bytes), to be used once.
    pub nonce: [u8; 32],
    pub now_ms: i64,
    /// Until when the used nonce must be remembered (past its validity on every
    /// listener); `> now_ms`.
    pub nonce_expires_ms: i64,
    /// Random, made for this request by the caller: the used nonce remembers it, so a
    /// re-run of this very request (its first outcome lost with the connection) is
    /// told it attested, while any other request with the nonce is told it is used.
    pub attempt: [u8; 16],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttestOutcome {
    /// The nonce was fresh: it is now used, and the device's attestation recorded.
    Attested,
    NonceUsed,
    Revoked,
    UnknownDevice,
}

/// The pubkey flow's atomic operations and the admin commands' reads and writes.
pub trait PubkeyStore: Send + Sync + 'static {
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
