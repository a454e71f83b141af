//! Property tests across the envelope and its payloads: every message round-trips
//! (build → parse → same value), and parsing arbitrary bytes never panics.

use proptest::prelude::*;

use super::core::{HelloReply, KeysReply};
use super::envelope::{self, DEFAULT_MAX_PAYLOAD, Flags, Flow, Header, Kind, Status};
use super::pubkey::{
    self, AttestRequest, ChallengeRequest, DeviceId, MAX_SIGNATURE_LEN, Nonce, P256_SPKI_LEN,
    P256_SPKI_PREFIX, P256Spki, RegisterRequest, Request, Signature,
};

fn header() -> impl Strategy<Value = Header> {
    (
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        any::<u16>(),
        any::<u32>(),
    )
        .prop_map(|(flow, kind, flags, status, request_id)| Header {
            flow: Flow(flow),
            kind: Kind(kind),
            flags: Flags(flags),
            status: Status(status),
            request_id,
        })
}

fn device_id() -> impl Strategy<Value = DeviceId> {
    any::<[u8; 16]>()
        .prop_filter("all zero is no device id", |b| b.iter().any(|&x| x != 0))
        .prop_map(|b| DeviceId::new(b).unwrap())
}

fn spki() -> impl Strategy<Value = P256Spki> {
    prop::collection::vec(any::<u8>(), P256_SPKI_LEN - P256_SPKI_PREFIX.len()).prop_map(|tail| {
        let der = [P256_SPKI_PREFIX.as_slice(), &tail].concat();
        P256Spki::new(&der).unwrap()
    })
}

fn signature() -> impl Strategy<Value = Signature> {
    prop::collection::vec(any::<u8>(), 1..=MAX_SIGNATURE_LEN)
        .prop_map(|d| Signature::new(&d).unwrap())
}

fn nonce() -> impl Strategy<Value = Nonce> {
    (any::<u64>(), any::<[u8; 8]>(), any::<[u8; 16]>()).prop_map(|(t, r, m)| Nonce::new(t, r, m))
}

proptest! {
    #[test]
    fn envelope_frames_round_trip(h in header(), payload in prop::collection::vec(any::<u8>(), 0..600)) {
        let frame = envelope::to_vec(&h, &payload);
        let (parsed, body) = envelope::parse_datagram(&frame, DEFAULT_MAX_PAYLOAD).unwrap();
        prop_assert_eq!(parsed, h);
        prop_assert_eq!(body, payload.as_slice());
    }

    #[test]
    fn envelope_parsing_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..700)) {
        let _ = envelope::check(&bytes, DEFAULT_MAX_PAYLOAD);
        let _ = envelope::missing(&bytes, DEFAULT_MAX_PAYLOAD);
        if let Ok((h, body)) = envelope::parse_datagram(&bytes, DEFAULT_MAX_PAYLOAD) {
            prop_assert_eq!(envelope::to_vec(&h, body), bytes);
        }
    }

    #[test]
    fn register_requests_round_trip(device_id in device_id(), spki in spki(), signature in signature()) {
        let r = RegisterRequest { device_id, spki, signature };
        prop_assert_eq!(RegisterRequest::parse(&r.to_bytes()), Ok(r));
    }

    #[test]
    fn challenge_requests_round_trip(device_id in device_id()) {
        let r = ChallengeRequest { device_id };
        prop_assert_eq!(ChallengeRequest::parse(&r.to_bytes()), Ok(r));
    }

    #[test]
    fn attest_requests_round_trip(device_id in device_id(), nonce in nonce(), signature in signature()) {
        let r = AttestRequest { device_id, nonce, signature };
        prop_assert_eq!(AttestRequest::parse(&r.to_bytes()), Ok(r));
    }

    #[test]
    fn replies_round_trip(ms in any::<u64>(), n in nonce()) {
        prop_assert_eq!(pubkey::parse_attest_reply(&pubkey::attest_reply(ms)), Ok(ms));
        prop_assert_eq!(pubkey::parse_challenge_reply(&n.0), Ok(n));
    }

    #[test]
    fn payload_parsing_never_panics(kind in any::<u8>(), bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(request) = Request::parse(Kind(kind), &bytes) {
            let again = match &request {
                Request::Register(r) => r.to_bytes(),
                Request::Challenge(r) => r.to_bytes().to_vec(),
                Request::Attest(r) => r.to_bytes(),
            };
            prop_assert_eq!(again, bytes.clone());
        }
        if let Ok(hello) = HelloReply::parse(&bytes) {
            prop_assert_eq!(hello.to_bytes(), bytes.clone());
        }
        if let Ok(keys) = KeysReply::parse(&bytes) {
            prop_assert_eq!(keys.to_bytes(), bytes.clone());
        }
        let _ = pubkey::parse_challenge_reply(&bytes);
        let _ = pubkey::parse_attest_reply(&bytes);
    }
}

// ---- ijam: every message that has a builder round-trips through its parser ----------

use super::ijam::{
    self as ijam_wire, NodeArch, NodeKey, NodeType, RawStateRequest,
    RegisterRequest as IjamRequest, StateCode,
};
use uuid::Uuid;
use zerocopy::{FromBytes, IntoBytes};

fn ijam_text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(b"abcXYZ019".to_vec()), 1..=max)
        .prop_map(|b| String::from_utf8(b).unwrap())
}

fn ijam_request() -> impl Strategy<Value = IjamRequest> {
    (
        any::<[u8; 16]>(),
        ijam_text(16),
        ijam_text(15),
        any::<[u8; 32]>(),
        prop::sample::select(NodeType::ALL.to_vec()),
        prop::sample::select(NodeArch::ACCEPTED.to_vec()),
    )
        .prop_map(|(id, net, pass, key, node_type, node_arch)| IjamRequest {
            node_id: Some(Uuid::from_bytes(id)).filter(|id| !id.is_nil()),
            network_id: ijam_wire::NetworkId::new(&net).unwrap(),
            passphrase: ijam_wire::Passphrase::new(&pass).unwrap(),
            node_key: NodeKey(key),
            node_type,
            node_arch,
        })
}

proptest! {
    #[test]
    fn hello_replies_round_trip(
        // Variable fields are never empty (schemas/envelope.md): the builder's callers
        // always have a version, a flow and a key.
        server_version in ".{1,40}",
        flows in prop::collection::vec(any::<u8>(), 1..8),
        max_payload in any::<u32>(),
        signing_key in prop::collection::vec(any::<u8>(), 1..200),
    ) {
        let hello = HelloReply {
            server_version,
            flows: flows.into_iter().map(Flow).collect(),
            max_payload,
            signing_key,
        };
        prop_assert_eq!(HelloReply::parse(&hello.to_bytes()), Ok(hello));
    }

    #[test]
    fn keys_replies_round_trip(
        signing_key in prop::collection::vec(any::<u8>(), 1..120),
        kem_id in any::<u16>(),
        hpke_public_key in prop::collection::vec(any::<u8>(), 1..64),
        signature in prop::collection::vec(any::<u8>(), 1..80),
    ) {
        let keys = KeysReply { signing_key, kem_id, hpke_public_key, signature };
        prop_assert_eq!(KeysReply::parse(&keys.to_bytes()), Ok(keys));
    }

    #[test]
    fn ijam_register_requests_round_trip(request in ijam_request()) {
        prop_assert_eq!(IjamRequest::parse(&request.to_bytes()), Ok(request));
    }

    #[test]
    fn ijam_register_replies_round_trip(id in any::<[u8; 16]>(), iv in any::<[u8; 16]>(), body in any::<[u8; 32]>()) {
        let id = Uuid::from_bytes(id);
        let plain = ijam_wire::register_reply_plaintext(id);
        prop_assert_eq!(ijam_wire::parse_register_reply_plaintext(&plain), Ok(id));
        let reply = ijam_wire::register_reply(iv, body);
        let (status, rest) = ijam_wire::parse_reply_status(&reply).unwrap();
        prop_assert_eq!(status, ijam_wire::Status::OK);
        prop_assert_eq!(rest.to_vec(), [iv.as_slice(), &body].concat());
    }

    #[test]
    fn ijam_error_replies_round_trip(status in any::<u16>(), reason in "[ -~]{0,40}") {
        let reply = ijam_wire::error_reply(ijam_wire::Status(status), &reason);
        let (parsed, text) = ijam_wire::parse_reply_status(&reply).unwrap();
        prop_assert_eq!(parsed, ijam_wire::Status(status));
        prop_assert_eq!(text, reason.as_bytes());
    }

    #[test]
    fn ijam_state_frames_round_trip(
        id in any::<[u8; 16]>(),
        iv in any::<[u8; 16]>(),
        code in prop::sample::select(StateCode::ALL.to_vec()),
    ) {
        let block = code.plaintext();
        prop_assert_eq!(StateCode::parse_plaintext(&block), Ok(code));
        let raw = RawStateRequest { node_id: id, iv, body: block };
        let parsed = RawStateRequest::ref_from_bytes(raw.as_bytes()).unwrap();
        prop_assert_eq!((parsed.node_id, parsed.iv, parsed.body), (id, iv, block));
    }

    #[test]
    fn ijam_checksummed_blocks_round_trip(data in prop::collection::vec(any::<u8>(), 0..15)) {
        let block: [u8; 16] = ijam_wire::checksummed_plaintext(&data);
        prop_assert_eq!(ijam_wire::open_checksummed(&block), Ok(data.as_slice()));
    }

    #[test]
    fn ijam_parsers_reproduce_what_they_accept(bytes in prop::collection::vec(any::<u8>(), 0..100)) {
        if let Ok(request) = IjamRequest::parse(&bytes) {
            prop_assert_eq!(IjamRequest::parse(&request.to_bytes()), Ok(request));
        }
        if let Ok(code) = StateCode::parse_plaintext(&bytes) {
            prop_assert_eq!(code.plaintext().to_vec(), bytes.clone());
        }
        if let Ok(id) = ijam_wire::parse_register_reply_plaintext(&bytes) {
            prop_assert_eq!(ijam_wire::register_reply_plaintext(id).to_vec(), bytes.clone());
        }
    }
}
