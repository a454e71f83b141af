//! The envelope and the pubkey flow end to end over real TCP and UDP, against the real
//! `registrar` binary, on both stores (`envelope_battery!`): every row of the pubkey
//! table, Hello, pipelining, bad frames, and racers on one nonce.

use std::io::Write;
use std::net::Shutdown;
use std::sync::{Arc, Barrier};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use registrar::client::pubkey::{self, DeviceKey};
use registrar::core::crypto::ecdsa::SigningKey;
use registrar::core::datadir::DataDir;
use registrar::flow::pubkey::{NONCE_VALIDITY_MS, issue_nonce};
use registrar::wire::core::{HELLO, HelloReply, KEYS, KeysReply};
use registrar::wire::envelope::{self, Flags, Flow, Header, Kind, Status};
use registrar::wire::pubkey::{
    ATTEST, CHALLENGE, DeviceId, Nonce, P256Spki, REGISTER, RegisterRequest, parse_attest_reply,
};
use registrar::wire::pubkey::{AttestRequest, Signature};
use serde_json::Value;

use crate::support::envelope_client::{self as client, Device, Reply, exchange};
use crate::support::ijam_client::Transport::{self, Tcp, Udp};
use crate::support::listener::{Backend, Key, Listener};

const BOTH: [Transport; 2] = [Tcp, Udp];

macro_rules! envelope_battery {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $test() { super::$test("sqlite") })*
        }
        mod redis {
            $(#[test] fn $test() { super::$test("redis") })*
        }
    };
}

envelope_battery!(
    hello_over_tcp_and_udp,
    keys_over_tcp_and_udp,
    register_rows,
    challenge_and_attest_rows,
    a_revoked_device_is_refused_everywhere,
    pipelined_requests_are_answered_with_their_ids,
    bad_frames_get_400_and_close_tcp_and_reach_no_flow,
    bad_headers_get_400_on_a_connection_that_stays_open,
    hundred_racers_on_one_nonce_one_success,
    device_admin_commands,
);

fn listener(backend: &str, extra: &[&str]) -> Option<Listener> {
    Backend::named(backend).map(|b| Listener::start(b, Key::Vector2048, extra))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn devices(l: &Listener) -> Vec<Value> {
    serde_json::from_str(&l.admin_ok(&["--json", "device", "list"])).unwrap()
}

fn device_json(l: &Listener, id: DeviceId) -> Value {
    serde_json::from_str(&l.admin_ok(&["--json", "device", "show", &id.to_hex()])).unwrap()
}

fn frame(flow: Flow, kind: Kind, id: u32, payload: &[u8]) -> Vec<u8> {
    pubkey::request_frame(flow, kind, id, payload)
}

/// A Register payload from its parts, for requests the client would never build.
fn register_payload(id: [u8; 16], spki: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut out = id.to_vec();
    envelope::put_prefixed(&mut out, spki);
    envelope::put_prefixed(&mut out, signature);
    out
}

fn expect(reply: &Reply, status: u16, request: Kind, request_id: u32) {
    assert_eq!(reply.status(), Status(status), "{reply:?}");
    assert_eq!(reply.header.flow, Flow::PUBKEY, "{reply:?}");
    assert_eq!(reply.header.kind, request.reply(), "{reply:?}");
    assert_eq!(reply.header.request_id, request_id, "{reply:?}");
}

// ---- core ---------------------------------------------------------------------------

fn hello_over_tcp_and_udp(backend: &str) {
    let Some(l) = listener(backend, &[]) else {
        return;
    };
    let pem = std::fs::read_to_string(l.data_dir.path().join("signing_key.pem")).unwrap();
    let signing = SigningKey::from_pkcs8_pem(&pem).unwrap();
    // Over UDP the 128-byte reply is more than 3x a bare 20-byte Hello: 413, empty.
    let bare = exchange(Transport::Udp, &l, &pubkey::hello_frame(0xfeed_beef));
    assert_eq!(
        bare.header,
        Header::request(Flow::CORE, HELLO, 0xfeed_beef).reply(Status::PAYLOAD_TOO_LARGE)
    );
    assert!(bare.payload.is_empty());
    for (t, frame) in [
        (Transport::Tcp, pubkey::hello_frame(0xfeed_beef)),
        (Transport::Udp, pubkey::padded_hello_frame(0xfeed_beef)),
    ] {
        let reply = exchange(t, &l, &frame);
        assert_eq!(reply.status(), Status::OK);
        assert_eq!(
            reply.header,
            Header::request(Flow::CORE, HELLO, 0xfeed_beef).reply(Status::OK)
        );
        let hello = HelloReply::parse(&reply.payload).unwrap();
        assert_eq!(hello.server_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hello.flows, [Flow::CORE, Flow::PUBKEY]);
        assert_eq!(hello.max_payload, envelope::DEFAULT_MAX_PAYLOAD);
        assert_eq!(hello.signing_key, signing.public_key_der());
        P256Spki::new(&hello.signing_key).expect("a P-256 SPKI");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(l.data_dir.path().join("signing_key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

/// Keys: the HPKE public key for sealed payloads and its KEM, signed by the signing
/// key Hello publishes; made in the data dir on the first start (0600) and kept.
fn keys_over_tcp_and_udp(backend: &str) {
    let Some(l) = listener(backend, &[]) else {
        return;
    };
    let hello = HelloReply::parse(
        &client::tcp_exchange(l.ports.envelope_tcp, &pubkey::hello_frame(1)).payload,
    )
    .unwrap();
    let keys_frame =
        |padding: usize| pubkey::request_frame(Flow::CORE, KEYS, 0xabcd, &vec![0; padding]);
    // Over UDP the ~200-byte reply needs a request of a third of that: padded.
    let bare = exchange(Udp, &l, &keys_frame(0));
    assert_eq!(bare.status(), Status::PAYLOAD_TOO_LARGE);
    for (t, frame) in [(Tcp, keys_frame(0)), (Udp, keys_frame(64))] {
        let reply = exchange(t, &l, &frame);
        assert_eq!(
            reply.header,
            Header::request(Flow::CORE, KEYS, 0xabcd).reply(Status::OK),
            "{t:?}"
        );
        let keys = KeysReply::parse(&reply.payload).unwrap();
        assert_eq!(keys.signing_key, hello.signing_key);
        assert_eq!(keys.kem_id, 0x0020);
        let file = std::fs::read_to_string(l.data_dir.path().join("seal_key")).unwrap();
        let key = registrar::core::crypto::seal::SealKey::from_private_bytes(
            &hex::decode(file.trim()).unwrap(),
        )
        .unwrap();
        assert_eq!(keys.hpke_public_key, key.public_key());
        registrar::core::crypto::ecdsa::verify(
            &hello.signing_key,
            &KeysReply::signed_message(keys.kem_id, &keys.hpke_public_key),
            &keys.signature,
        )
        .expect("signed by the signing key");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(l.data_dir.path().join("seal_key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // A payload that is not zero padding: 400.
    assert_eq!(
        exchange(
            Tcp,
            &l,
            &pubkey::request_frame(Flow::CORE, KEYS, 1, &[0, 1])
        )
        .status(),
        Status::BAD_REQUEST
    );
}

#[test]
fn max_frame_bounds_the_declared_length_and_hello_reports_it() {
    let Some(l) = listener("sqlite", &["--max-frame", "300"]) else {
        return;
    };
    let hello = HelloReply::parse(
        &client::tcp_exchange(l.ports.envelope_tcp, &pubkey::hello_frame(1)).payload,
    )
    .unwrap();
    assert_eq!(hello.max_payload, 300);
    // 300 bytes of payload are a frame (of an unknown flow: 400, connection kept) ...
    let mut stream = client::connect(l.ports.envelope_tcp);
    stream
        .write_all(&frame(Flow(9), Kind(1), 5, &[0; 300]))
        .unwrap();
    let reply = client::read_frame(&mut stream).unwrap();
    assert_eq!(
        (reply.status(), reply.header.request_id),
        (Status::BAD_REQUEST, 5)
    );
    stream.write_all(&pubkey::hello_frame(6)).unwrap();
    assert_eq!(
        client::read_frame(&mut stream).unwrap().status(),
        Status::OK
    );
    // ... 301 are not: 400 from the header alone, then the connection is closed.
    let too_long = frame(Flow(9), Kind(1), 7, &[0; 301]);
    stream.write_all(&too_long[..16]).unwrap();
    let replies = client::read_to_close(&mut stream);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(
        (replies[0].status(), replies[0].header.request_id),
        (Status::BAD_REQUEST, 7)
    );
    // Over UDP too.
    let reply = client::udp_exchange(l.ports.envelope_udp, &too_long);
    assert_eq!(
        (reply.status(), reply.header.request_id),
        (Status::BAD_REQUEST, 7)
    );
}

// ---- pubkey: the table ----------------------------------------------------------------

fn register_rows(backend: &str) {
    let Some(l) = listener(backend, &[]) else {
        return;
    };
    for (n, t) in BOTH.into_iter().enumerate() {
        let a = Device::new(n as u8);
        // 201 created, then 409 with the same key (a success for the device).
        let reply = a.register(t, &l);
        expect(&reply, 201, REGISTER, 1);
        assert!(reply.payload.is_empty());
        expect(&a.register(t, &l), 409, REGISTER, 1);
        // 403: the id is bound to another key, which changes nothing.
        let thief = Device {
            id: a.id,
            key: DeviceKey::generate().unwrap(),
        };
        expect(&thief.register(t, &l), 403, REGISTER, 1);
        let stored = device_json(&l, a.id);
        assert_eq!(stored["status"], "active");
        assert_eq!(
            pem::parse(stored["public_key"].as_str().unwrap())
                .unwrap()
                .contents(),
            a.key.public_key_der()
        );

        // 400: an all-zero id, signed properly.
        let key = DeviceKey::generate().unwrap();
        let spki = P256Spki::new(key.public_key_der()).unwrap();
        let zero = DeviceId([0; 16]);
        let sig = key
            .sign(&RegisterRequest::signed_message(&zero, &spki))
            .unwrap();
        let payload = register_payload([0; 16], &spki.0, &sig);
        expect(
            &exchange(t, &l, &frame(Flow::PUBKEY, REGISTER, 11, &payload)),
            400,
            REGISTER,
            11,
        );

        // 400: not P-256 (a P-384 key signing for itself).
        let b = Device::new(100 + n as u8);
        let p384 = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_ASN1_SIGNING).unwrap();
        let spki384 = aws_lc_rs::encoding::AsDer::as_der(p384.public_key()).unwrap();
        let msg = [
            b"registrar/pubkey/register/v1" as &[u8],
            &b.id.0,
            spki384.as_ref(),
        ]
        .concat();
        let sig = p384
            .sign(&aws_lc_rs::rand::SystemRandom::new(), &msg)
            .unwrap();
        let payload = register_payload(b.id.0, spki384.as_ref(), sig.as_ref());
        expect(
            &exchange(t, &l, &frame(Flow::PUBKEY, REGISTER, 12, &payload)),
            400,
            REGISTER,
            12,
        );

        // 400: a P-256 SPKI whose point is not on the curve.
        let mut off_curve = b.key.public_key_der().to_vec();
        off_curve[90] ^= 1;
        let sig = b
            .key
            .sign(&RegisterRequest::signed_message(
                &b.id,
                &P256Spki::new(&off_curve).unwrap(),
            ))
            .unwrap();
        let payload = register_payload(b.id.0, &off_curve, &sig);
        expect(
            &exchange(t, &l, &frame(Flow::PUBKEY, REGISTER, 13, &payload)),
            400,
            REGISTER,
            13,
        );

        // 400: signed by another key than the one registered; and signed over the
        // attest domain instead of the register domain.
        let spki = P256Spki::new(b.key.public_key_der()).unwrap();
        let other = DeviceKey::generate().unwrap();
        for sig in [
            other
                .sign(&RegisterRequest::signed_message(&b.id, &spki))
                .unwrap(),
            b.key
                .sign(&[b"registrar/pubkey/attest/v1" as &[u8], &b.id.0, &spki.0].concat())
                .unwrap(),
            vec![0x30, 0x00],
        ] {
            let payload = register_payload(b.id.0, &spki.0, &sig);
            expect(
                &exchange(t, &l, &frame(Flow::PUBKEY, REGISTER, 14, &payload)),
                400,
                REGISTER,
                14,
            );
        }
        // 400: truncated payload.
        let good = pubkey::register_request(b.id, &b.key).unwrap().to_bytes();
        let short = &good[..good.len() - 1];
        expect(
            &exchange(t, &l, &frame(Flow::PUBKEY, REGISTER, 15, short)),
            400,
            REGISTER,
            15,
        );
        assert!(
            l.admin(&["device", "show", &b.id.to_hex()]).status.code() == Some(1),
            "nothing of b was stored"
        );
    }
    assert_eq!(devices(&l).len(), 2);
}

fn challenge_and_attest_rows(backend: &str) {
    let Some(l) = listener(backend, &[]) else {
        return;
    };
    let storage = DataDir::existing(l.data_dir.path())
        .unwrap()
        .storage_key()
        .unwrap();
    for (n, t) in BOTH.into_iter().enumerate() {
        let a = Device::new(n as u8);
        // 404 before registration.
        expect(&a.challenge(t, &l), 404, CHALLENGE, 2);
        expect(&a.register(t, &l), 201, REGISTER, 1);

        // 200 with a 32-byte nonce, then 200 with the attestation time.
        let reply = a.challenge(t, &l);
        expect(&reply, 200, CHALLENGE, 2);
        assert_eq!(reply.payload.len(), 32);
        let nonce = Nonce(reply.payload.clone().try_into().unwrap());
        let reply = a.attest(t, &l, nonce);
        expect(&reply, 200, ATTEST, 3);
        let at = parse_attest_reply(&reply.payload).unwrap();
        let stored = device_json(&l, a.id);
        assert_eq!(stored["attested_ms"], at);
        assert_eq!(stored["attestations"], 1);

        // 409: the same nonce again, over either transport.
        for again in BOTH {
            expect(&a.attest(again, &l, nonce), 409, ATTEST, 3);
        }

        // 401: a bad signature; it does not burn the nonce.
        let nonce = a.nonce(t, &l);
        let impostor = Device {
            id: a.id,
            key: DeviceKey::generate().unwrap(),
        };
        expect(&impostor.attest(t, &l, nonce), 401, ATTEST, 3);
        expect(&a.attest(t, &l, nonce), 200, ATTEST, 3);

        // 401: a nonce we never issued, and one issued for another device.
        expect(&a.attest(t, &l, Nonce([0x5a; 32])), 401, ATTEST, 3);
        let b = Device::new(50 + n as u8);
        expect(&b.register(t, &l), 201, REGISTER, 1);
        let for_b = b.nonce(t, &l);
        expect(&a.attest(t, &l, for_b), 401, ATTEST, 3);

        // 410: a nonce older than its 60 s (made with the listener's own secret).
        let old = issue_nonce(
            &storage,
            &a.id,
            now_ms() - NONCE_VALIDITY_MS as u64 - 1,
            [1; 8],
        );
        expect(&a.attest(t, &l, old), 410, ATTEST, 3);

        // 404: a genuine nonce for an id the store does not know.
        let ghost = Device::new(200 + n as u8);
        let nonce = issue_nonce(&storage, &ghost.id, now_ms(), [2; 8]);
        expect(&ghost.attest(t, &l, nonce), 404, ATTEST, 3);

        // 400: malformed attest payloads (short, long signature, zero id).
        let good = AttestRequest {
            device_id: a.id,
            nonce: a.nonce(t, &l),
            signature: Signature(vec![0x30, 0x00]),
        }
        .to_bytes();
        for bad in [
            &good[..40],
            &[&good[..], &[0]].concat(),
            &[&[0u8; 16][..], &good[16..]].concat(),
        ] {
            expect(
                &exchange(t, &l, &frame(Flow::PUBKEY, ATTEST, 21, bad)),
                400,
                ATTEST,
                21,
            );
        }
        expect(
            &exchange(t, &l, &frame(Flow::PUBKEY, CHALLENGE, 22, &a.id.0[..15])),
            400,
            CHALLENGE,
            22,
        );

        let stored = device_json(&l, a.id);
        assert_eq!(stored["attestations"], 2, "{stored}");
    }
}

fn a_revoked_device_is_refused_everywhere(backend: &str) {
    let Some(l) = listener(backend, &[]) else {
        return;
    };
    let a = Device::new(1);
    expect(&a.register(Tcp, &l), 201, REGISTER, 1);
    let nonce = a.nonce(Udp, &l);
    let out = l.admin_ok(&["--json", "device", "revoke", &a.id.to_hex()]);
    let out: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        out,
        serde_json::json!({"device": a.id.to_hex(), "revoked": true})
    );
    for t in BOTH {
        expect(&a.attest(t, &l, nonce), 403, ATTEST, 3);
        expect(&a.challenge(t, &l), 403, CHALLENGE, 2);
        expect(&a.register(t, &l), 403, REGISTER, 1);
        let other_key = Device {
            id: a.id,
            key: DeviceKey::generate().unwrap(),
        };
        expect(&other_key.register(t, &l), 403, REGISTER, 1);
    }
    let stored = device_json(&l, a.id);
    assert_eq!(stored["status"], "revoked");
    assert_eq!(stored["attestations"], 0);
    assert_eq!(
        pem::parse(stored["public_key"].as_str().unwrap())
            .unwrap()
            .contents(),
        a.key.public_key_der(),
        "the key stays, for audit"
    );
}

// ---- the envelope on TCP: pipelining and garbage ---------------------------------------

fn pipelined_requests_are_answered_with_their_ids(backend: &str) {
    let Some(l) = listener(backend, &[]) else {
        return;
    };
    let a = Device::new(1);
    expect(&a.register(Tcp, &l), 201, REGISTER, 1);
    let nonce = a.nonce(Tcp, &l);
    // Sixty frames of four kinds in ONE write; ids chosen so no two collide.
    let mut batch = Vec::new();
    let mut expected = std::collections::HashMap::new();
    for i in 0..15u32 {
        batch.extend(pubkey::hello_frame(1000 + i));
        expected.insert(1000 + i, (Flow::CORE, HELLO, Status::OK));
        batch.extend(pubkey::challenge_frame(2000 + i, a.id));
        expected.insert(2000 + i, (Flow::PUBKEY, CHALLENGE, Status::OK));
        batch.extend(pubkey::register_frame(3000 + i, a.id, &a.key).unwrap());
        expected.insert(3000 + i, (Flow::PUBKEY, REGISTER, Status::CONFLICT));
        // One nonce, fifteen attestations: exactly one wins.
        batch.extend(pubkey::attest_frame(4000 + i, a.id, nonce, &a.key).unwrap());
        expected.insert(4000 + i, (Flow::PUBKEY, ATTEST, Status::CONFLICT));
    }
    let mut stream = client::connect(l.ports.envelope_tcp);
    stream.write_all(&batch).unwrap();
    let mut attested = 0;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..expected.len() {
        let reply = client::read_frame(&mut stream).expect("one reply per request");
        let id = reply.header.request_id;
        assert!(seen.insert(id), "two replies for {id}");
        let (flow, kind, status) = expected[&id];
        assert_eq!(
            (reply.header.flow, reply.header.kind),
            (flow, kind.reply()),
            "{reply:?}"
        );
        if kind == ATTEST && reply.status() == Status::OK {
            attested += 1;
        } else {
            assert_eq!(reply.status(), status, "{reply:?}");
        }
    }
    assert_eq!(attested, 1);
    // Nothing more: the half-close ends the connection cleanly.
    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(client::read_to_close(&mut stream), vec![]);
}

/// Deterministic bytes that are no frame (the first byte is not 'R').
fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    out[0] = 0;
    out
}

fn bad_frames_get_400_and_close_tcp_and_reach_no_flow(backend: &str) {
    let Some(l) = listener(backend, &[]) else {
        return;
    };
    let a = Device::new(1);
    expect(&a.register(Tcp, &l), 201, REGISTER, 1);
    let before = devices(&l);

    // A good Register frame of another device, spoiled in each way.
    let b = Device::new(2);
    let good = pubkey::register_frame(0x0a0b_0c0d, b.id, &b.key).unwrap();
    let with = |i: usize, v: u8| {
        let mut f = good.clone();
        f[i] = v;
        f
    };
    let last = good.len() - 1;
    let mut oversized = good[..16].to_vec();
    oversized[12..16].copy_from_slice(&(envelope::DEFAULT_MAX_PAYLOAD + 1).to_be_bytes());
    let random = garbage(64, 42);
    let random_id = u32::from_be_bytes(random[8..12].try_into().unwrap());
    // (case, bytes, half-close after writing, the id a 400 must carry)
    let cases: Vec<(&str, Vec<u8>, bool, Option<u32>)> = vec![
        (
            "bad crc",
            with(last, good[last] ^ 0xff),
            false,
            Some(0x0a0b_0c0d),
        ),
        (
            "payload bit flipped",
            with(30, good[30] ^ 1),
            false,
            Some(0x0a0b_0c0d),
        ),
        ("bad magic", with(1, b'X'), false, Some(0x0a0b_0c0d)),
        ("bad version", with(2, 2), false, Some(0x0a0b_0c0d)),
        ("oversized", oversized.clone(), false, Some(0x0a0b_0c0d)),
        (
            "truncated",
            good[..good.len() - 3].to_vec(),
            true,
            Some(0x0a0b_0c0d),
        ),
        ("truncated before the id", good[..10].to_vec(), true, None),
        ("random", random.clone(), false, Some(random_id)),
    ];
    for (case, bytes, half_close, id) in &cases {
        let mut stream = client::connect(l.ports.envelope_tcp);
        stream.write_all(bytes).unwrap();
        if *half_close {
            stream.shutdown(Shutdown::Write).unwrap();
        }
        let replies = client::read_to_close(&mut stream);
        match id {
            Some(id) => {
                assert_eq!(replies.len(), 1, "{case}: {replies:?}");
                assert_eq!(replies[0].status(), Status::BAD_REQUEST, "{case}");
                assert_eq!(replies[0].header.request_id, *id, "{case}");
                assert!(replies[0].header.kind.is_reply(), "{case}");
            }
            None => assert_eq!(replies, vec![], "{case}"),
        }
    }

    // Good frames before the garbage on the same connection are still answered.
    let mut stream = client::connect(l.ports.envelope_tcp);
    stream
        .write_all(&[pubkey::hello_frame(7), with(2, 9)].concat())
        .unwrap();
    let mut replies = client::read_to_close(&mut stream);
    replies.sort_by_key(|r| r.header.request_id);
    let got: Vec<(u32, Status)> = replies
        .iter()
        .map(|r| (r.header.request_id, r.status()))
        .collect();
    assert_eq!(got, [(7, Status::OK), (0x0a0b_0c0d, Status::BAD_REQUEST)]);

    // UDP: the same 400 when the id is readable.
    for bytes in [
        with(last, good[last] ^ 0xff),
        with(1, b'X'),
        with(2, 2),
        oversized,
        good[..good.len() - 3].to_vec(),
        [good.clone(), vec![0]].concat(),
    ] {
        let reply = client::udp_exchange(l.ports.envelope_udp, &bytes);
        assert_eq!(
            (reply.status(), reply.header.request_id),
            (Status::BAD_REQUEST, 0x0a0b_0c0d)
        );
    }
    let reply = client::udp_exchange(l.ports.envelope_udp, &random);
    assert_eq!(
        (reply.status(), reply.header.request_id),
        (Status::BAD_REQUEST, random_id)
    );

    // The listener keeps serving, and nothing reached the store.
    assert_eq!(
        exchange(Tcp, &l, &pubkey::hello_frame(8)).status(),
        Status::OK
    );
    assert_eq!(devices(&l), before);
    expect(&b.register(Udp, &l), 201, REGISTER, 1);
}

fn bad_headers_get_400_on_a_connection_that_stays_open(backend: &str) {
    let Some(l) = listener(backend, &[]) else {
        return;
    };
    let a = Device::new(1);
    let header = |kind: Kind, flags: Flags, status: Status, id: u32| Header {
        flow: Flow::PUBKEY,
        kind,
        flags,
        status,
        request_id: id,
    };
    let payload = a.id.0;
    let frames = [
        envelope::to_vec(
            &header(CHALLENGE.reply(), Flags::NONE, Status::REQUEST, 1),
            &payload,
        ),
        envelope::to_vec(&header(CHALLENGE, Flags::NONE, Status::OK, 2), &payload),
        envelope::to_vec(
            &header(CHALLENGE, Flags::SEALED, Status::REQUEST, 3),
            &payload,
        ),
        frame(Flow(4), Kind(1), 4, &payload),
        frame(Flow(77), Kind(1), 5, &payload),
        frame(Flow::PUBKEY, Kind(9), 6, &payload),
        frame(Flow::CORE, Kind(3), 7, &[]),
        frame(Flow::CORE, HELLO, 8, &[1]),
        pubkey::hello_frame(9),
    ];
    let mut stream = client::connect(l.ports.envelope_tcp);
    stream.write_all(&frames.concat()).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut replies = client::read_to_close(&mut stream);
    replies.sort_by_key(|r| r.header.request_id);
    let got: Vec<(u32, u16)> = replies
        .iter()
        .map(|r| (r.header.request_id, r.status().0))
        .collect();
    assert_eq!(
        got,
        [
            (1, 400),
            (2, 400),
            (3, 400),
            (4, 400),
            (5, 400),
            (6, 400),
            (7, 400),
            (8, 400),
            (9, 200)
        ]
    );
    for r in &replies {
        assert!(
            r.header.kind.is_reply() && r.header.flags == Flags::NONE,
            "{r:?}"
        );
    }
    assert_eq!(devices(&l), Vec::<Value>::new());
}

// ---- races ------------------------------------------------------------------------------

fn hundred_racers_on_one_nonce_one_success(backend: &str) {
    let Some(l) = listener(backend, &[]) else {
        return;
    };
    let a = Device::new(1);
    expect(&a.register(Tcp, &l), 201, REGISTER, 1);
    let nonce = a.nonce(Tcp, &l);
    let frame = pubkey::attest_frame(3, a.id, nonce, &a.key).unwrap();
    let statuses = race(100, &frame, |i| {
        let t = if i % 2 == 0 { Tcp } else { Udp };
        (t, l.ports.envelope_tcp, l.ports.envelope_udp)
    });
    assert_eq!(count(&statuses), (1, 99), "{statuses:?}");
    assert_eq!(device_json(&l, a.id)["attestations"], 1);
}

type Target = (Transport, std::net::SocketAddr, std::net::SocketAddr);

/// `n` threads send `frame` at once (after a barrier); their reply statuses.
fn race(n: usize, frame: &[u8], target: impl Fn(usize) -> Target) -> Vec<u16> {
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (t, tcp, udp) = target(i);
            let (barrier, frame) = (Arc::clone(&barrier), frame.to_vec());
            std::thread::spawn(move || match t {
                Tcp => {
                    let mut stream = client::connect(tcp);
                    barrier.wait();
                    stream.write_all(&frame).unwrap();
                    client::read_frame(&mut stream).unwrap().status().0
                }
                Udp => {
                    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                    socket.set_read_timeout(Some(client::TIMEOUT)).unwrap();
                    socket.connect(udp).unwrap();
                    barrier.wait();
                    socket.send(&frame).unwrap();
                    let mut buf = [0u8; 512];
                    let len = socket.recv(&mut buf).expect("udp reply");
                    pubkey::parse_reply(&buf[..len], 512).unwrap().0.status.0
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// (200s, 409s); anything else fails.
fn count(statuses: &[u16]) -> (usize, usize) {
    assert!(
        statuses.iter().all(|s| matches!(s, 200 | 409)),
        "{statuses:?}"
    );
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    (ok, statuses.len() - ok)
}

/// Two listeners on one Redis, sharing the storage key: a nonce from either is good
/// at the other, and of 100 racers split across both, exactly one attests.
#[test]
fn two_listeners_on_one_redis_share_nonces_and_race_for_one() {
    let Some(one) = listener("redis", &[]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for file in ["storage.key", "rsa_private_key.pem"] {
        std::fs::copy(one.data_dir.path().join(file), dir.path().join(file)).unwrap();
    }
    let two = Listener::start_in(Backend::Shared(one.store_url().to_owned()), dir, &[]);

    let a = Device::new(1);
    expect(&a.register(Udp, &one), 201, REGISTER, 1);
    expect(&a.register(Tcp, &two), 409, REGISTER, 1);
    let from_two = a.nonce(Tcp, &two);
    expect(&a.attest(Udp, &one, from_two), 200, ATTEST, 3);
    expect(&a.attest(Tcp, &two, from_two), 409, ATTEST, 3);

    let nonce = a.nonce(Udp, &one);
    let frame = pubkey::attest_frame(3, a.id, nonce, &a.key).unwrap();
    let statuses = race(100, &frame, |i| {
        let l = if i % 2 == 0 { &one } else { &two };
        let t = if i % 4 < 2 { Tcp } else { Udp };
        (t, l.ports.envelope_tcp, l.ports.envelope_udp)
    });
    assert_eq!(count(&statuses), (1, 99), "{statuses:?}");
    assert_eq!(device_json(&one, a.id)["attestations"], 2);
}

// ---- admin ------------------------------------------------------------------------------

fn device_admin_commands(backend: &str) {
    let Some(l) = listener(backend, &[]) else {
        return;
    };
    assert_eq!(devices(&l), Vec::<Value>::new());
    let (a, b) = (Device::new(1), Device::new(2));
    expect(&a.register(Tcp, &l), 201, REGISTER, 1);
    expect(&b.register(Udp, &l), 201, REGISTER, 1);
    let list = devices(&l);
    assert_eq!(list.len(), 2);
    let ids: Vec<&str> = list.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&a.id.to_hex().as_str()) && ids.contains(&b.id.to_hex().as_str()));
    let shown = device_json(&l, a.id);
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["attestations"], 0);
    assert_eq!(shown["revoked_ms"], 0);
    let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, a.key.public_key_der());
    assert_eq!(shown["key_sha256"], hex::encode(sha));

    let text = l.admin_ok(&["device", "show", &a.id.to_hex()]);
    assert!(
        text.contains(&a.id.to_hex()) && text.contains("-----BEGIN PUBLIC KEY-----"),
        "{text}"
    );
    let table = l.admin_ok(&["device", "list"]);
    assert!(table.starts_with("DEVICE"), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");

    l.admin_ok(&["device", "revoke", &a.id.to_hex()]);
    assert_eq!(device_json(&l, a.id)["status"], "revoked");
    assert_eq!(device_json(&l, b.id)["status"], "active");

    let unknown = Device::new(9).id.to_hex();
    for cmd in [
        ["device", "show", unknown.as_str()],
        ["device", "revoke", unknown.as_str()],
    ] {
        let out = l.admin(&cmd);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("does not exist"), "{err}");
    }
    let out = l.admin(&["device", "show", "not-hex"]);
    assert!(!out.status.success());
}
