//! The battery of [`PubkeyStore`]: devices, attestations, used nonces.

use std::sync::Arc;
use std::time::{Duration, Instant};

use registrar::core::ids::DeviceId;
use registrar::store::StoreError;
use registrar::store::pubkey::{
    AttestOp, AttestOutcome, Device, DeviceRegisterOutcome, DeviceStatus, PubkeyStore,
};

crate::store::battery!(crate::store::pubkey;
    by_ref:
        device_register_outcomes,
        device_attest_once,
        device_revoke,
        device_used_nonce_expires,
        a_rerun_of_one_attempt_is_told_it_attested,
        devices_sorted;
    shared: concurrent_attestations,
);

const NOW: i64 = 1_700_000_000_000;
const TTL: i64 = 60_000;

/// 32 bytes derived from a label, distinct for distinct labels in practice.
fn bytes(label: &str) -> [u8; 32] {
    let l = label.as_bytes();
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = l[i % l.len()].wrapping_mul(31).wrapping_add(i as u8) ^ (l.len() as u8);
    }
    out[31] = l
        .iter()
        .fold(0u8, |a, b| a.wrapping_mul(131).wrapping_add(*b));
    out
}

fn dev(n: u8) -> DeviceId {
    DeviceId::new([n; 16]).unwrap()
}

/// A stand-in public key: the store keeps whatever bytes the flow validated.
fn key(label: &str) -> Vec<u8> {
    bytes(&format!("spki:{label}")).repeat(3)[..91].to_vec()
}

fn nonce(n: u8) -> [u8; 32] {
    [n; 32]
}

/// Each call is a request of its own: an attempt id never used before.
fn next_attempt() -> [u8; 16] {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    u128::from(n).to_be_bytes()
}

fn attest(device: DeviceId, n: u8, now_ms: i64) -> AttestOp {
    AttestOp {
        device,
        nonce: nonce(n),
        now_ms,
        nonce_expires_ms: now_ms + TTL,
        attempt: next_attempt(),
    }
}

pub async fn device_register_outcomes<S: PubkeyStore>(s: &S) {
    assert_eq!(s.device(dev(1)).await.unwrap(), None);
    assert_eq!(
        s.register_device(dev(1), &key("a"), NOW).await.unwrap(),
        DeviceRegisterOutcome::Created
    );
    let stored = Device {
        id: dev(1),
        public_key: key("a"),
        status: DeviceStatus::Active,
        registered_ms: NOW,
        attested_ms: 0,
        attestations: 0,
        revoked_ms: 0,
    };
    assert_eq!(s.device(dev(1)).await.unwrap(), Some(stored.clone()));
    assert_eq!(
        s.register_device(dev(1), &key("a"), NOW + 1).await.unwrap(),
        DeviceRegisterOutcome::SameKey
    );
    assert_eq!(
        s.register_device(dev(1), &key("b"), NOW + 2).await.unwrap(),
        DeviceRegisterOutcome::OtherKey
    );
    // Nothing overwrites a binding, not even its registration time.
    assert_eq!(s.device(dev(1)).await.unwrap(), Some(stored));
    assert_eq!(s.devices().await.unwrap().len(), 1);
}

pub async fn device_attest_once<S: PubkeyStore>(s: &S) {
    assert_eq!(
        s.attest_device(attest(dev(1), 1, NOW)).await.unwrap(),
        AttestOutcome::UnknownDevice
    );
    s.register_device(dev(1), &key("a"), NOW).await.unwrap();
    s.register_device(dev(2), &key("b"), NOW).await.unwrap();
    assert_eq!(
        s.attest_device(attest(dev(1), 1, NOW + 10)).await.unwrap(),
        AttestOutcome::Attested
    );
    assert_eq!(
        s.attest_device(attest(dev(1), 1, NOW + 20)).await.unwrap(),
        AttestOutcome::NonceUsed
    );
    // Used nonces are per device.
    assert_eq!(
        s.attest_device(attest(dev(2), 1, NOW + 30)).await.unwrap(),
        AttestOutcome::Attested
    );
    assert_eq!(
        s.attest_device(attest(dev(1), 2, NOW + 40)).await.unwrap(),
        AttestOutcome::Attested
    );
    let d = s.device(dev(1)).await.unwrap().unwrap();
    assert_eq!((d.attested_ms, d.attestations), (NOW + 40, 2));
    let d = s.device(dev(2)).await.unwrap().unwrap();
    assert_eq!((d.attested_ms, d.attestations), (NOW + 30, 1));
    assert_eq!(
        s.device(dev(9)).await.unwrap(),
        None,
        "an attestation creates nothing"
    );
}

pub async fn device_revoke<S: PubkeyStore>(s: &S) {
    s.register_device(dev(1), &key("a"), NOW).await.unwrap();
    s.attest_device(attest(dev(1), 1, NOW + 1)).await.unwrap();
    let before = s.device(dev(1)).await.unwrap().unwrap();
    s.revoke_device(dev(1), NOW + 5).await.unwrap();
    let after = s.device(dev(1)).await.unwrap().unwrap();
    assert_eq!(
        after,
        Device {
            status: DeviceStatus::Revoked,
            revoked_ms: NOW + 5,
            ..before
        },
        "the key stays, for audit"
    );
    s.revoke_device(dev(1), NOW + 9)
        .await
        .expect("revoking twice is fine");
    assert_eq!(s.device(dev(1)).await.unwrap(), Some(after.clone()));
    for k in ["a", "b"] {
        assert_eq!(
            s.register_device(dev(1), &key(k), NOW + 10).await.unwrap(),
            DeviceRegisterOutcome::Revoked
        );
    }
    assert_eq!(
        s.attest_device(attest(dev(1), 2, NOW + 11)).await.unwrap(),
        AttestOutcome::Revoked
    );
    assert_eq!(s.device(dev(1)).await.unwrap(), Some(after));
    match s.revoke_device(dev(7), NOW).await {
        Err(StoreError::UnknownDevice(id)) => assert_eq!(id, dev(7)),
        other => panic!("expected UnknownDevice, got {other:?}"),
    }
    assert_eq!(s.device(dev(7)).await.unwrap(), None);
}

/// The same attempt run again (its reply lost with the connection) is told it
/// attested, and nothing more is counted; another attempt with the nonce is told it
/// is used.
pub async fn a_rerun_of_one_attempt_is_told_it_attested<S: PubkeyStore>(s: &S) {
    s.register_device(dev(1), &key("a"), NOW).await.unwrap();
    let op = attest(dev(1), 1, NOW);
    assert_eq!(s.attest_device(op).await.unwrap(), AttestOutcome::Attested);
    let after_first = s.device(dev(1)).await.unwrap();
    assert_eq!(s.attest_device(op).await.unwrap(), AttestOutcome::Attested);
    assert_eq!(s.device(dev(1)).await.unwrap(), after_first, "counted once");
    assert_eq!(
        s.attest_device(attest(dev(1), 1, NOW)).await.unwrap(),
        AttestOutcome::NonceUsed
    );
}

/// A used nonce is remembered until `nonce_expires_ms`, then forgotten (memory
/// stays bounded; the flow refuses an expired nonce long before). SQLite reads the
/// expiry against `now_ms`; Redis holds it as a real key TTL, so the test polls.
pub async fn device_used_nonce_expires<S: PubkeyStore>(s: &S) {
    s.register_device(dev(1), &key("a"), NOW).await.unwrap();
    let mut op = attest(dev(1), 1, NOW);
    op.nonce_expires_ms = NOW + 50;
    assert_eq!(s.attest_device(op).await.unwrap(), AttestOutcome::Attested);
    // Another request with the nonce (a replay): its own attempt.
    let mut again = attest(dev(1), 1, NOW + 49);
    again.nonce_expires_ms = NOW + 10_000;
    assert_eq!(
        s.attest_device(again).await.unwrap(),
        AttestOutcome::NonceUsed
    );

    let mut later = attest(dev(1), 1, NOW + 1000);
    later.nonce_expires_ms = NOW + 2000;
    let deadline = Instant::now() + Duration::from_secs(5);
    let outcome = loop {
        match s.attest_device(later).await.unwrap() {
            AttestOutcome::NonceUsed if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            outcome => break outcome,
        }
    };
    assert_eq!(
        outcome,
        AttestOutcome::Attested,
        "the used nonce never expired"
    );
}

pub async fn devices_sorted<S: PubkeyStore>(s: &S) {
    for (n, at) in [(5, NOW + 20), (3, NOW + 10), (9, NOW + 10), (1, NOW + 30)] {
        s.register_device(dev(n), &key(&n.to_string()), at)
            .await
            .unwrap();
    }
    let ids: Vec<DeviceId> = s
        .devices()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, [dev(3), dev(9), dev(5), dev(1)]);
}

/// 100 racers on one nonce: exactly one attestation; and 20 racers registering one
/// id with 20 different keys: exactly one binding.
pub async fn concurrent_attestations<S: PubkeyStore>(s: &Arc<S>) {
    const RACERS: usize = 100;
    s.register_device(dev(1), &key("a"), NOW).await.unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
    let mut tasks = tokio::task::JoinSet::new();
    for racer in 0..RACERS {
        let (store, barrier) = (Arc::clone(s), Arc::clone(&barrier));
        tasks.spawn(async move {
            barrier.wait().await;
            store
                .attest_device(attest(dev(1), 7, NOW + racer as i64))
                .await
        });
    }
    let mut attested = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("racer panicked").expect("attest") {
            AttestOutcome::Attested => attested += 1,
            AttestOutcome::NonceUsed => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(attested, 1);
    assert_eq!(s.device(dev(1)).await.unwrap().unwrap().attestations, 1);

    const KEYS: usize = 20;
    let barrier = Arc::new(tokio::sync::Barrier::new(KEYS));
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..KEYS {
        let (store, barrier) = (Arc::clone(s), Arc::clone(&barrier));
        tasks.spawn(async move {
            barrier.wait().await;
            let outcome = store
                .register_device(dev(2), &key(&format!("k{k}")), NOW)
                .await;
            outcome.map(|o| (o == DeviceRegisterOutcome::Created).then_some(k))
        });
    }
    let mut winners = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Some(k) = joined.expect("racer panicked").expect("register") {
            winners.push(k);
        }
    }
    assert_eq!(winners.len(), 1);
    let bound = s.device(dev(2)).await.unwrap().unwrap();
    assert_eq!(bound.public_key, key(&format!("k{}", winners[0])));
}
