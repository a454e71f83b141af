//! Property tests across the envelope and its payloads: every message round-trips
//! (build → parse → same value), and parsing arbitrary bytes never panics.

use proptest::prelude::*;

use super::core::HelloReply;
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
        let _ = pubkey::parse_challenge_reply(&bytes);
        let _ = pubkey::parse_attest_reply(&bytes);
    }
}
