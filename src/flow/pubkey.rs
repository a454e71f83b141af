//! Flow 1, `pubkey` (schemas/pubkey.md): a device binds an ECDSA P-256 key to its
//! 16-byte id once and for all, then answers signed challenges. The signature checks
//! run on the server's crypto pool ([`Offload`]); time and the nonce's random bytes
//! come in with the request ([`Context`]).
//!
//! [`PubkeyFlow::classify`] is the one place errors become wire statuses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::constant_time;
use bytes::Bytes;

use super::{Classified, Context, EnvelopeFlow, Failure, Offload, OrRefused, Reply};
use crate::core::crypto::StorageKey;
use crate::core::crypto::ecdsa::{self, VerifyError};
use crate::core::ids::DeviceId;
use crate::store::StoreError;
use crate::store::pubkey::{
    AttestOp, AttestOutcome, DeviceRegisterOutcome, DeviceStatus, PubkeyStore,
};
use crate::wire::DecodeError;
use crate::wire::envelope::{Flow, Kind, Status};
use crate::wire::pubkey::{
    AttestRequest, ChallengeRequest, Nonce, RegisterRequest, Request, attest_reply,
};

/// A challenge nonce is good for this long after it was issued.
pub const NONCE_VALIDITY_MS: i64 = 60_000;
/// How far apart the clocks of listeners sharing a store may be: a nonce issued "in
/// the future" by up to this much is accepted, and a used nonce is remembered this
/// much longer than its validity.
pub const MAX_CLOCK_SKEW_MS: i64 = 60_000;

/// Why a request failed; each variant is one reply class.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PubkeyError {
    #[error("not a valid P-256 public key")]
    InvalidKey,
    #[error("registration signature does not verify")]
    RegisterSignature,
    #[error("device id is bound to another key")]
    BoundToAnotherKey,
    #[error("device is revoked")]
    Revoked,
    #[error("unknown device")]
    UnknownDevice,
    #[error("nonce was not issued by this service for this device")]
    ForeignNonce,
    #[error("nonce expired")]
    NonceExpired,
    #[error("nonce already used")]
    NonceUsed,
    #[error("attestation signature does not verify")]
    AttestSignature,
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// What a successful request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// 201: the id is now bound to the key.
    Registered,
    /// 409: the id was already bound to this same key (a success for the device).
    AlreadyRegistered,
    /// 200: a fresh nonce to sign.
    Challenged(Nonce),
    /// 200: the attestation was recorded at this time.
    Attested { at_ms: i64 },
}

impl Done {
    pub fn status(&self) -> Status {
        match self {
            Done::Registered => Status::CREATED,
            Done::AlreadyRegistered => Status::CONFLICT,
            Done::Challenged(_) | Done::Attested { .. } => Status::OK,
        }
    }

    pub fn payload(&self) -> Vec<u8> {
        match self {
            Done::Registered | Done::AlreadyRegistered => Vec::new(),
            Done::Challenged(nonce) => nonce.0.to_vec(),
            Done::Attested { at_ms } => attest_reply(*at_ms as u64).to_vec(),
        }
    }

    pub fn outcome(&self) -> &'static str {
        match self {
            Done::Registered => "registered",
            Done::AlreadyRegistered => "already_registered",
            Done::Challenged(_) => "challenged",
            Done::Attested { .. } => "attested",
        }
    }

    fn reply(self) -> Reply {
        Reply {
            status: self.status(),
            payload: Bytes::from(self.payload()),
            outcome: self.outcome(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Register,
    Attest,
}

/// One ECDSA verification (about 50 µs), owned so it can run on another thread.
#[derive(Debug, Clone)]
pub struct SignatureCheck {
    purpose: Purpose,
    public_key: Vec<u8>,
    message: Vec<u8>,
    signature: Vec<u8>,
}

impl SignatureCheck {
    /// Checks the key (registration only: a registered key was checked already) and
    /// the signature.
    pub fn run(&self) -> Result<(), PubkeyError> {
        match self.purpose {
            Purpose::Register => ecdsa::verify(&self.public_key, &self.message, &self.signature)
                .map_err(|e| match e {
                    VerifyError::Key => PubkeyError::InvalidKey,
                    VerifyError::Signature => PubkeyError::RegisterSignature,
                }),
            Purpose::Attest => {
                if ecdsa::verify_registered(&self.public_key, &self.message, &self.signature) {
                    Ok(())
                } else {
                    Err(PubkeyError::AttestSignature)
                }
            }
        }
    }
}

/// `issued_ms ‖ random ‖ HMAC-SHA256(challenge key, device_id ‖ issued_ms ‖ random)[..16]`
/// (schemas/pubkey.md "Nonce"). Any listener holding the same storage key checks it.
pub fn issue_nonce(
    storage: &StorageKey,
    device: &DeviceId,
    issued_ms: u64,
    random: [u8; 8],
) -> Nonce {
    Nonce::new(
        issued_ms,
        random,
        nonce_tag(storage, device, issued_ms, &random),
    )
}

fn nonce_tag(
    storage: &StorageKey,
    device: &DeviceId,
    issued_ms: u64,
    random: &[u8; 8],
) -> [u8; 16] {
    let mac = storage.challenge_tag(&Nonce::mac_input(device, issued_ms, random));
    mac[..16].try_into().expect("16 of 32 bytes")
}

pub struct PubkeyFlow<S> {
    storage: StorageKey,
    store: Arc<S>,
    keys: KnownKeys,
}

/// Public keys of devices this listener has looked up, by id, at most
/// [`KnownKeys::CAPACITY`]. A binding is permanent (only its status changes, and the
/// attest script checks that atomically), so a remembered key is never stale. It spares
/// an Attest the store round trip its Challenge just made: one atomic store call per
/// Attest instead of two.
#[derive(Default)]
struct KnownKeys {
    keys: Mutex<HashMap<DeviceId, Arc<[u8]>>>,
    /// Attests that had to read the key from the store.
    misses: AtomicU64,
}

impl KnownKeys {
    /// ~150 bytes each (id, 91-byte SPKI, table overhead): ~10 MB at most.
    const CAPACITY: usize = 65_536;

    fn get(&self, id: &DeviceId) -> Option<Arc<[u8]>> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.get(id).cloned()
    }

    fn remember(&self, id: DeviceId, key: &[u8]) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.len() >= Self::CAPACITY && !keys.contains_key(&id) {
            // Any one goes: a forgotten key costs only a store read.
            if let Some(old) = keys.keys().next().copied() {
                keys.remove(&old);
            }
        }
        keys.insert(id, key.into());
    }
}

impl<S: PubkeyStore> PubkeyFlow<S> {
    pub fn new(storage: StorageKey, store: Arc<S>) -> Self {
        PubkeyFlow {
            storage,
            store,
            keys: KnownKeys::default(),
        }
    }

    /// Attests that read the device's key from the store (it was not remembered from
    /// an earlier Challenge or Attest on this listener).
    pub fn key_lookups(&self) -> u64 {
        self.keys.misses.load(Ordering::Relaxed)
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// One request: validate → (signature check on the crypto pool) → one atomic store
    /// call → what happened.
    pub async fn run<O: Offload>(
        &self,
        request: Request,
        ctx: Context<'_, O>,
    ) -> Result<Done, Failure<PubkeyError>> {
        match request {
            Request::Register(r) => self.register(r, ctx).await,
            Request::Challenge(r) => {
                let random = ctx.random[..8].try_into().expect("8 of 32 bytes");
                self.challenge(r, ctx.now_ms, random).await.flow_err()
            }
            Request::Attest(r) => self.attest(r, ctx).await,
        }
    }

    async fn register<O: Offload>(
        &self,
        r: RegisterRequest,
        ctx: Context<'_, O>,
    ) -> Result<Done, Failure<PubkeyError>> {
        // Proof of possession first: nobody claims an id with a key they do not hold.
        let check = SignatureCheck {
            purpose: Purpose::Register,
            public_key: r.spki.0.to_vec(),
            message: RegisterRequest::signed_message(&r.device_id, &r.spki),
            signature: r.signature.0,
        };
        ctx.offload.run(move || check.run()).await?.flow_err()?;
        let outcome = self
            .store
            .register_device(r.device_id, &r.spki.0, ctx.now_ms)
            .await
            .map_err(PubkeyError::Store)
            .flow_err()?;
        match outcome {
            DeviceRegisterOutcome::Created => Ok(Done::Registered),
            DeviceRegisterOutcome::SameKey => Ok(Done::AlreadyRegistered),
            DeviceRegisterOutcome::OtherKey => Err(Failure::Flow(PubkeyError::BoundToAnotherKey)),
            DeviceRegisterOutcome::Revoked => Err(Failure::Flow(PubkeyError::Revoked)),
        }
    }

    async fn challenge(
        &self,
        r: ChallengeRequest,
        now_ms: i64,
        random: [u8; 8],
    ) -> Result<Done, PubkeyError> {
        self.usable_device_key(r.device_id).await?;
        Ok(Done::Challenged(self.issue_nonce(
            &r.device_id,
            now_ms.max(0) as u64,
            random,
        )))
    }

    async fn attest<O: Offload>(
        &self,
        r: AttestRequest,
        ctx: Context<'_, O>,
    ) -> Result<Done, Failure<PubkeyError>> {
        let now_ms = ctx.now_ms;
        let issued_ms = self
            .check_nonce(&r.device_id, &r.nonce, now_ms)
            .flow_err()?;
        let remembered = self.keys.get(&r.device_id);
        let public_key = match &remembered {
            // A revocation since is caught by the attest script below.
            Some(key) => key.to_vec(),
            None => {
                self.keys.misses.fetch_add(1, Ordering::Relaxed);
                self.usable_device_key(r.device_id).await.flow_err()?
            }
        };
        // Verified before the nonce is marked used: a forged signature cannot burn
        // the device's nonce.
        let check = SignatureCheck {
            purpose: Purpose::Attest,
            public_key,
            message: AttestRequest::signed_message(&r.device_id, &r.nonce),
            signature: r.signature.0,
        };
        let verified = ctx.offload.run(move || check.run()).await?;
        if let Err(PubkeyError::AttestSignature) = verified
            && remembered.is_some()
        {
            // The documented order puts 404/403 before 401: a remembered key skipped
            // that read, so a refused signature makes it now.
            self.usable_device_key(r.device_id).await.flow_err()?;
        }
        verified.flow_err()?;
        let op = AttestOp {
            device: r.device_id,
            nonce: r.nonce.0,
            now_ms,
            nonce_expires_ms: (issued_ms + NONCE_VALIDITY_MS + MAX_CLOCK_SKEW_MS).max(now_ms + 1),
            attempt: ctx.random[16..].try_into().expect("16 of 32 bytes"),
        };
        let outcome = self
            .store
            .attest_device(op)
            .await
            .map_err(PubkeyError::Store)
            .flow_err()?;
        match outcome {
            AttestOutcome::Attested => Ok(Done::Attested { at_ms: now_ms }),
            AttestOutcome::NonceUsed => Err(Failure::Flow(PubkeyError::NonceUsed)),
            AttestOutcome::Revoked => Err(Failure::Flow(PubkeyError::Revoked)),
            AttestOutcome::UnknownDevice => Err(Failure::Flow(PubkeyError::UnknownDevice)),
        }
    }

    /// The device's key from the store (and remembered), or 404 unknown / 403 revoked.
    async fn usable_device_key(&self, id: DeviceId) -> Result<Vec<u8>, PubkeyError> {
        let device = self
            .store
            .device(id)
            .await?
            .ok_or(PubkeyError::UnknownDevice)?;
        if device.status == DeviceStatus::Revoked {
            return Err(PubkeyError::Revoked);
        }
        self.keys.remember(id, &device.public_key);
        Ok(device.public_key)
    }

    pub fn issue_nonce(&self, device: &DeviceId, issued_ms: u64, random: [u8; 8]) -> Nonce {
        issue_nonce(&self.storage, device, issued_ms, random)
    }

    fn tag(&self, device: &DeviceId, issued_ms: u64, random: &[u8; 8]) -> [u8; 16] {
        nonce_tag(&self.storage, device, issued_ms, random)
    }

    /// The nonce's tag (constant-time) and age; returns when it was issued.
    fn check_nonce(
        &self,
        device: &DeviceId,
        nonce: &Nonce,
        now_ms: i64,
    ) -> Result<i64, PubkeyError> {
        let raw = nonce.raw();
        let issued = raw.issued_ms.get();
        let expected = self.tag(device, issued, &raw.random);
        constant_time::verify_slices_are_equal(&expected, &raw.tag)
            .map_err(|_| PubkeyError::ForeignNonce)?;
        let issued_ms = i64::try_from(issued).map_err(|_| PubkeyError::ForeignNonce)?;
        if issued_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            // Ours, but from a clock far ahead of this one: not usable here.
            return Err(PubkeyError::ForeignNonce);
        }
        if now_ms.saturating_sub(issued_ms) >= NONCE_VALIDITY_MS {
            return Err(PubkeyError::NonceExpired);
        }
        Ok(issued_ms)
    }
}

impl<S: PubkeyStore> EnvelopeFlow for PubkeyFlow<S> {
    const FLOW: Flow = Flow::PUBKEY;
    const NAME: &'static str = "pubkey";
    type Request = Request;
    type Error = PubkeyError;

    fn parse(&self, kind: Kind, payload: &[u8]) -> Result<Request, DecodeError> {
        Request::parse(kind, payload)
    }

    fn rate_limited(&self, _kind: Kind) -> bool {
        true
    }

    fn subject(request: &Request) -> Option<String> {
        Some(request.device_id().to_hex())
    }

    async fn handle<O: Offload>(
        &self,
        request: Request,
        ctx: Context<'_, O>,
    ) -> Result<Reply, Failure<PubkeyError>> {
        self.run(request, ctx).await.map(Done::reply)
    }

    fn classify(error: &PubkeyError) -> Classified {
        let (status, outcome, store_failed) = match error {
            PubkeyError::InvalidKey => (Status::BAD_REQUEST, "invalid_key", false),
            PubkeyError::RegisterSignature => (Status::BAD_REQUEST, "bad_signature", false),
            PubkeyError::ForeignNonce => (Status::UNAUTHORIZED, "foreign_nonce", false),
            PubkeyError::AttestSignature => (Status::UNAUTHORIZED, "bad_signature", false),
            PubkeyError::BoundToAnotherKey => (Status::FORBIDDEN, "bound_to_another_key", false),
            PubkeyError::Revoked => (Status::FORBIDDEN, "revoked", false),
            PubkeyError::UnknownDevice => (Status::NOT_FOUND, "unknown_device", false),
            PubkeyError::NonceUsed => (Status::CONFLICT, "nonce_used", false),
            PubkeyError::NonceExpired => (Status::GONE, "nonce_expired", false),
            PubkeyError::Store(StoreError::OutcomeUnknown { .. }) => {
                (Status::SERVICE_UNAVAILABLE, "outcome_unknown", true)
            }
            PubkeyError::Store(_) => (Status::SERVICE_UNAVAILABLE, "store_unavailable", true),
        };
        Classified {
            status,
            outcome,
            store_failed,
            withhold: matches!(error, PubkeyError::Store(StoreError::OutcomeUnknown { .. })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::crypto::ecdsa::SigningKey;
    use crate::store::sqlite::SqliteStore;
    use crate::wire::pubkey::{P256Spki, Signature};

    const NOW: i64 = 1_700_000_000_000;

    struct Fixture {
        flow: PubkeyFlow<SqliteStore>,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("db"), crate::store::Creation::IfMissing).unwrap();
        Fixture {
            flow: PubkeyFlow::new(StorageKey::from_bytes(&[7; 32]), Arc::new(store)),
            _dir: dir,
        }
    }

    /// Runs the signature checks on the caller's thread.
    struct Inline;

    impl Offload for Inline {
        async fn run<T, W>(&self, work: W) -> Result<T, super::super::Refusal>
        where
            T: Send + 'static,
            W: FnOnce() -> T + Send + 'static,
        {
            Ok(work())
        }
    }

    /// Each request's randomness: the nonce bytes fixed (the tests read them), the
    /// rest new each time, as a request's attempt id is.
    fn ctx(now_ms: i64) -> Context<'static, Inline> {
        static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut random = [3; 32];
        random[16..24].copy_from_slice(&n.to_be_bytes());
        Context {
            now_ms,
            random,
            offload: &Inline,
        }
    }

    async fn run_flow(
        flow: &PubkeyFlow<SqliteStore>,
        r: Request,
        now: i64,
    ) -> Result<Done, PubkeyError> {
        match flow.run(r, ctx(now)).await {
            Ok(done) => Ok(done),
            Err(Failure::Flow(e)) => Err(e),
            Err(Failure::Refused(r)) => panic!("refused inline: {r}"),
        }
    }

    fn status(e: &PubkeyError) -> Status {
        PubkeyFlow::<SqliteStore>::classify(e).status
    }

    fn register_req(id: DeviceId, key: &SigningKey) -> Request {
        let spki = P256Spki::new(key.public_key_der()).unwrap();
        let sig = key
            .sign(&RegisterRequest::signed_message(&id, &spki))
            .unwrap();
        Request::Register(RegisterRequest {
            device_id: id,
            spki,
            signature: Signature(sig),
        })
    }

    fn attest_req(id: DeviceId, nonce: Nonce, key: &SigningKey) -> Request {
        let sig = key
            .sign(&AttestRequest::signed_message(&id, &nonce))
            .unwrap();
        Request::Attest(AttestRequest {
            device_id: id,
            nonce,
            signature: Signature(sig),
        })
    }

    impl Fixture {
        async fn run(&self, r: Request, now: i64) -> Result<Done, PubkeyError> {
            run_flow(&self.flow, r, now).await
        }

        async fn nonce(&self, id: DeviceId, now: i64) -> Nonce {
            match self
                .run(Request::Challenge(ChallengeRequest { device_id: id }), now)
                .await
                .unwrap()
            {
                Done::Challenged(n) => n,
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn register_is_permanent_and_proves_possession() {
        let f = fixture();
        let (id, key, other) = (
            DeviceId([1; 16]),
            SigningKey::generate().unwrap(),
            SigningKey::generate().unwrap(),
        );
        assert_eq!(
            f.run(register_req(id, &key), NOW).await.unwrap(),
            Done::Registered
        );
        assert_eq!(
            f.run(register_req(id, &key), NOW + 1).await.unwrap(),
            Done::AlreadyRegistered
        );
        let err = f.run(register_req(id, &other), NOW + 2).await.unwrap_err();
        let class = PubkeyFlow::<SqliteStore>::classify(&err);
        assert_eq!(
            (class.status, class.outcome),
            (Status::FORBIDDEN, "bound_to_another_key")
        );

        // Signed by another key than the one it names: 400, and nothing is stored.
        let id2 = DeviceId([2; 16]);
        let Request::Register(mut forged) = register_req(id2, &key) else {
            unreachable!()
        };
        forged.signature = Signature(
            other
                .sign(&RegisterRequest::signed_message(&id2, &forged.spki))
                .unwrap(),
        );
        let err = f
            .run(Request::Register(forged.clone()), NOW)
            .await
            .unwrap_err();
        assert!(matches!(err, PubkeyError::RegisterSignature), "{err:?}");
        assert_eq!(status(&err), Status::BAD_REQUEST);
        // A point off the curve: 400 as a bad key.
        forged.spki.0[90] ^= 1;
        let err = f.run(Request::Register(forged), NOW).await.unwrap_err();
        assert!(matches!(err, PubkeyError::InvalidKey), "{err:?}");
        assert_eq!(f.flow.store().device(id2).await.unwrap(), None);

        f.flow.store().revoke_device(id, NOW + 3).await.unwrap();
        let err = f.run(register_req(id, &key), NOW + 4).await.unwrap_err();
        assert_eq!(status(&err), Status::FORBIDDEN);
    }

    #[tokio::test]
    async fn challenge_then_attest_once_within_sixty_seconds() {
        let f = fixture();
        let (id, key) = (DeviceId([1; 16]), SigningKey::generate().unwrap());
        let unknown = f
            .run(Request::Challenge(ChallengeRequest { device_id: id }), NOW)
            .await
            .unwrap_err();
        assert_eq!(status(&unknown), Status::NOT_FOUND);
        f.run(register_req(id, &key), NOW).await.unwrap();

        let nonce = f.nonce(id, NOW).await;
        assert_eq!(nonce.raw().issued_ms.get(), NOW as u64);
        assert_eq!(nonce.raw().random, [3; 8]);
        let done = f
            .run(attest_req(id, nonce, &key), NOW + 59_999)
            .await
            .unwrap();
        assert_eq!(
            done,
            Done::Attested {
                at_ms: NOW + 59_999
            }
        );
        assert_eq!(done.payload(), ((NOW + 59_999) as u64).to_be_bytes());
        let again = f
            .run(attest_req(id, nonce, &key), NOW + 59_999)
            .await
            .unwrap_err();
        assert_eq!(status(&again), Status::CONFLICT);
        let device = f.flow.store().device(id).await.unwrap().unwrap();
        assert_eq!((device.attested_ms, device.attestations), (NOW + 59_999, 1));

        // At 60 s the nonce is gone, whoever signs it.
        let nonce = f.nonce(id, NOW).await;
        let late = f
            .run(attest_req(id, nonce, &key), NOW + 60_000)
            .await
            .unwrap_err();
        assert_eq!(status(&late), Status::GONE);
    }

    #[tokio::test]
    async fn forged_foreign_or_tampered_nonces_and_bad_signatures_are_401() {
        let f = fixture();
        let (a, b) = (DeviceId([1; 16]), DeviceId([2; 16]));
        let (ka, kb) = (
            SigningKey::generate().unwrap(),
            SigningKey::generate().unwrap(),
        );
        f.run(register_req(a, &ka), NOW).await.unwrap();
        f.run(register_req(b, &kb), NOW).await.unwrap();

        let for_b = f.nonce(b, NOW).await;
        let err = f.run(attest_req(a, for_b, &ka), NOW).await.unwrap_err();
        assert!(matches!(err, PubkeyError::ForeignNonce), "{err:?}");
        let mut tampered = f.nonce(a, NOW).await;
        tampered.0[7] ^= 1; // issued_ms moved: the tag no longer matches
        let err = f.run(attest_req(a, tampered, &ka), NOW).await.unwrap_err();
        assert_eq!(status(&err), Status::UNAUTHORIZED);
        let other_server =
            PubkeyFlow::new(StorageKey::from_bytes(&[8; 32]), Arc::clone(f.flow.store()));
        let theirs = other_server.issue_nonce(&a, NOW as u64, [0; 8]);
        let err = f.run(attest_req(a, theirs, &ka), NOW).await.unwrap_err();
        assert_eq!(status(&err), Status::UNAUTHORIZED);

        // A good nonce signed by the wrong key: 401, and the nonce stays usable.
        let nonce = f.nonce(a, NOW).await;
        let err = f.run(attest_req(a, nonce, &kb), NOW).await.unwrap_err();
        assert!(matches!(err, PubkeyError::AttestSignature), "{err:?}");
        assert_eq!(status(&err), Status::UNAUTHORIZED);
        assert!(f.run(attest_req(a, nonce, &ka), NOW).await.is_ok());
    }

    #[tokio::test]
    async fn revoked_and_unknown_devices() {
        let f = fixture();
        let (id, key) = (DeviceId([1; 16]), SigningKey::generate().unwrap());
        f.run(register_req(id, &key), NOW).await.unwrap();
        let nonce = f.nonce(id, NOW).await;
        f.flow.store().revoke_device(id, NOW).await.unwrap();
        let err = f.run(attest_req(id, nonce, &key), NOW).await.unwrap_err();
        assert_eq!(status(&err), Status::FORBIDDEN);
        let err = f
            .run(Request::Challenge(ChallengeRequest { device_id: id }), NOW)
            .await
            .unwrap_err();
        assert_eq!(status(&err), Status::FORBIDDEN);

        // A valid nonce for an id the store does not know (e.g. a wiped store): 404.
        let ghost = DeviceId([9; 16]);
        let nonce = f.flow.issue_nonce(&ghost, NOW as u64, [1; 8]);
        let err = f
            .run(attest_req(ghost, nonce, &key), NOW)
            .await
            .unwrap_err();
        assert_eq!(status(&err), Status::NOT_FOUND);
    }

    #[tokio::test]
    async fn an_attest_after_its_challenge_reads_no_key_from_the_store() {
        let f = fixture();
        let (id, key) = (DeviceId([4; 16]), SigningKey::generate().unwrap());
        f.run(register_req(id, &key), NOW).await.unwrap();
        for i in 0..3 {
            let now = NOW + i * 1000;
            let nonce = f.nonce(id, now).await;
            f.run(attest_req(id, nonce, &key), now).await.unwrap();
        }
        assert_eq!(f.flow.key_lookups(), 0);

        // A nonce from another listener (same storage key, nothing remembered): one
        // lookup, then remembered.
        let other = PubkeyFlow::new(StorageKey::from_bytes(&[7; 32]), Arc::clone(f.flow.store()));
        for i in 0..2 {
            let nonce = f.flow.issue_nonce(&id, NOW as u64, [i; 8]);
            run_flow(&other, attest_req(id, nonce, &key), NOW)
                .await
                .unwrap();
        }
        assert_eq!(other.key_lookups(), 1);

        // Revoked after its key was remembered: refused with 403 whether the signature
        // is good or not (the documented order: 403 before 401).
        let now = NOW + 5000;
        let nonce = f.nonce(id, now).await;
        f.flow.store().revoke_device(id, now).await.unwrap();
        let wrong = SigningKey::generate().unwrap();
        let err = f.run(attest_req(id, nonce, &wrong), now).await.unwrap_err();
        assert_eq!(status(&err), Status::FORBIDDEN);
        let err = f.run(attest_req(id, nonce, &key), now).await.unwrap_err();
        assert_eq!(status(&err), Status::FORBIDDEN);
    }

    #[test]
    fn remembered_keys_stay_within_capacity() {
        let keys = KnownKeys::default();
        for i in 0..KnownKeys::CAPACITY as u32 + 10 {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            keys.remember(DeviceId(id), &[1, 2, 3]);
        }
        assert_eq!(keys.keys.lock().unwrap().len(), KnownKeys::CAPACITY);
        let last = (KnownKeys::CAPACITY as u32 + 9).to_be_bytes();
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&last);
        assert_eq!(keys.get(&DeviceId(id)).as_deref(), Some(&[1u8, 2, 3][..]));
    }

    #[test]
    fn every_error_has_its_documented_status() {
        use PubkeyError::*;
        let table = [
            (InvalidKey, 400),
            (RegisterSignature, 400),
            (BoundToAnotherKey, 403),
            (Revoked, 403),
            (UnknownDevice, 404),
            (ForeignNonce, 401),
            (NonceExpired, 410),
            (NonceUsed, 409),
            (AttestSignature, 401),
            (Store(StoreError::Corrupt("x".into())), 503),
        ];
        for (e, code) in table {
            assert_eq!(status(&e), Status(code), "{e:?}");
        }
        assert_eq!(Done::Registered.status(), Status::CREATED);
        assert_eq!(Done::AlreadyRegistered.status(), Status::CONFLICT);
    }
}
