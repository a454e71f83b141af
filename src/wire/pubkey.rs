//! The `pubkey` flow (flow 1) messages: a device registers an ECDSA P-256 public key
//! under a 16-byte device id, then proves possession of the key on request. Layout:
//! `schemas/pubkey.json`; semantics and the nonce layout: `schemas/pubkey.md`.
//!
//! ```text
//! Register  (kind 1)  device_id (16) ‖ u16 len ‖ SPKI DER (91) ‖ u16 len ‖ DER signature
//!                      signature over "registrar/pubkey/register/v1" ‖ device_id ‖ SPKI
//!           reply      empty payload; status 201, 409, 403 or 400
//! Challenge (kind 2)  device_id (16)
//!           reply 200  nonce (32) = issued_ms u64 ‖ random (8) ‖ tag (16)
//! Attest    (kind 3)  device_id (16) ‖ nonce (32) ‖ u16 len ‖ DER signature
//!                      signature over "registrar/pubkey/attest/v1" ‖ nonce ‖ device_id
//!           reply 200  attested_ms u64
//! ```
//!
//! The checks here are structural (lengths, an all-zero id, the fixed P-256 SPKI
//! prefix); whether the point is on the curve and the signature verifies is
//! `crate::core::crypto::ecdsa`'s business.

use std::fmt;

use zerocopy::byteorder::network_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::DecodeError;
use super::envelope::{Kind, put_prefixed, take_prefixed};
pub use crate::core::ids::DeviceId;

pub const REGISTER: Kind = Kind(1);
pub const CHALLENGE: Kind = Kind(2);
pub const ATTEST: Kind = Kind(3);

/// Domain-separation prefixes of the two signed messages.
pub const REGISTER_DOMAIN: &[u8] = b"registrar/pubkey/register/v1";
pub const ATTEST_DOMAIN: &[u8] = b"registrar/pubkey/attest/v1";

pub const DEVICE_ID_LEN: usize = DeviceId::LEN;
pub const NONCE_LEN: usize = 32;
pub const ATTEST_REPLY_LEN: usize = 8;

/// SubjectPublicKeyInfo DER of a P-256 key, named curve, uncompressed point: always
/// these 27 bytes, then X (32) and Y (32).
pub const P256_SPKI_PREFIX: [u8; 27] = [
    0x30, 0x59, // SEQUENCE, 89 bytes
    0x30, 0x13, // SEQUENCE, 19 bytes: AlgorithmIdentifier
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, // OID 1.2.840.10045.2.1 ecPublicKey
    0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01,
    0x07, // OID 1.2.840.10045.3.1.7 P-256
    0x03, 0x42, 0x00, // BIT STRING, 66 bytes, no unused bits
    0x04, // uncompressed point
];
pub const P256_SPKI_LEN: usize = 91;

/// A DER ECDSA-P256 signature is SEQUENCE { INTEGER r, INTEGER s }, each at most 33
/// bytes: at most 72 bytes in all.
pub const MAX_SIGNATURE_LEN: usize = 72;

fn device_id(bytes: &[u8]) -> Result<(DeviceId, &[u8]), DecodeError> {
    let (id, rest) = bytes
        .split_first_chunk::<DEVICE_ID_LEN>()
        .ok_or(DecodeError::Length {
            expected: DEVICE_ID_LEN,
            got: bytes.len(),
        })?;
    let id = DeviceId::new(*id).map_err(|_| DecodeError::Invalid { field: "device_id" })?;
    Ok((id, rest))
}

fn no_trailing(payload: &[u8], rest: &[u8]) -> Result<(), DecodeError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Length {
            expected: payload.len() - rest.len(),
            got: payload.len(),
        })
    }
}

/// The SPKI DER of a P-256 public key, structurally checked (the canonical 91-byte
/// form). Whether the point is on the curve is checked by `crypto::ecdsa`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct P256Spki(pub [u8; P256_SPKI_LEN]);

impl P256Spki {
    pub fn new(der: &[u8]) -> Result<P256Spki, DecodeError> {
        let field = "public_key";
        let bytes: [u8; P256_SPKI_LEN] = der.try_into().map_err(|_| DecodeError::Length {
            expected: P256_SPKI_LEN,
            got: der.len(),
        })?;
        if bytes[..P256_SPKI_PREFIX.len()] != P256_SPKI_PREFIX {
            return Err(DecodeError::Invalid { field });
        }
        Ok(P256Spki(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for P256Spki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "P256Spki({})",
            hex::encode(&self.0[P256_SPKI_PREFIX.len()..])
        )
    }
}

/// A DER ECDSA signature, bounded in length (its DER is checked by the verifier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature(pub Vec<u8>);

impl Signature {
    pub fn new(der: &[u8]) -> Result<Signature, DecodeError> {
        if der.is_empty() || der.len() > MAX_SIGNATURE_LEN {
            return Err(DecodeError::Length {
                expected: MAX_SIGNATURE_LEN,
                got: der.len(),
            });
        }
        Ok(Signature(der.to_vec()))
    }
}

/// The challenge nonce as laid out on the wire (schemas/pubkey.md "Nonce"): when it
/// was issued, randomness, and a MAC over (device id, issued_ms, random) under a
/// server secret. Opaque to devices; stateless for the server.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RawNonce {
    pub issued_ms: U64,
    pub random: [u8; 8],
    pub tag: [u8; 16],
}
const _: () = assert!(size_of::<RawNonce>() == NONCE_LEN);

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; NONCE_LEN]);

impl Nonce {
    pub fn new(issued_ms: u64, random: [u8; 8], tag: [u8; 16]) -> Nonce {
        let raw = RawNonce {
            issued_ms: U64::new(issued_ms),
            random,
            tag,
        };
        let mut out = [0u8; NONCE_LEN];
        out.copy_from_slice(raw.as_bytes());
        Nonce(out)
    }

    pub fn raw(&self) -> &RawNonce {
        RawNonce::ref_from_bytes(&self.0).expect("32 bytes")
    }

    /// What the tag authenticates: device_id ‖ issued_ms ‖ random (24 + 16 bytes).
    pub fn mac_input(device: &DeviceId, issued_ms: u64, random: &[u8; 8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..16].copy_from_slice(&device.0);
        out[16..24].copy_from_slice(&issued_ms.to_be_bytes());
        out[24..].copy_from_slice(random);
        out
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({})", hex::encode(self.0))
    }
}

/// Kind 1: bind `spki` to `device_id`, proven by a signature under that key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterRequest {
    pub device_id: DeviceId,
    pub spki: P256Spki,
    pub signature: Signature,
}

impl RegisterRequest {
    pub fn parse(payload: &[u8]) -> Result<Self, DecodeError> {
        let (device_id, rest) = device_id(payload)?;
        let (spki, rest) = take_prefixed("public_key", rest)?;
        let (signature, rest) = take_prefixed("signature", rest)?;
        no_trailing(payload, rest)?;
        Ok(RegisterRequest {
            device_id,
            spki: P256Spki::new(spki)?,
            signature: Signature::new(signature)?,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DEVICE_ID_LEN + 4 + P256_SPKI_LEN + MAX_SIGNATURE_LEN);
        out.extend_from_slice(&self.device_id.0);
        put_prefixed(&mut out, &self.spki.0);
        put_prefixed(&mut out, &self.signature.0);
        out
    }

    /// `"registrar/pubkey/register/v1" ‖ device_id ‖ spki`: what the signature covers.
    pub fn signed_message(device_id: &DeviceId, spki: &P256Spki) -> Vec<u8> {
        [REGISTER_DOMAIN, &device_id.0, &spki.0].concat()
    }
}

/// Kind 2: ask for a nonce to sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChallengeRequest {
    pub device_id: DeviceId,
}

impl ChallengeRequest {
    pub fn parse(payload: &[u8]) -> Result<Self, DecodeError> {
        let (device_id, rest) = device_id(payload)?;
        no_trailing(payload, rest)?;
        Ok(ChallengeRequest { device_id })
    }

    pub fn to_bytes(&self) -> [u8; DEVICE_ID_LEN] {
        self.device_id.0
    }
}

/// The 200 reply to a challenge: the nonce alone.
pub fn parse_challenge_reply(payload: &[u8]) -> Result<Nonce, DecodeError> {
    let nonce: [u8; NONCE_LEN] = payload.try_into().map_err(|_| DecodeError::Length {
        expected: NONCE_LEN,
        got: payload.len(),
    })?;
    Ok(Nonce(nonce))
}

/// Kind 3: the nonce, signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestRequest {
    pub device_id: DeviceId,
    pub nonce: Nonce,
    pub signature: Signature,
}

impl AttestRequest {
    pub fn parse(payload: &[u8]) -> Result<Self, DecodeError> {
        let (device_id, rest) = device_id(payload)?;
        let (nonce, rest) = rest
            .split_first_chunk::<NONCE_LEN>()
            .ok_or(DecodeError::Length {
                expected: NONCE_LEN,
                got: rest.len(),
            })?;
        let (signature, rest) = take_prefixed("signature", rest)?;
        no_trailing(payload, rest)?;
        Ok(AttestRequest {
            device_id,
            nonce: Nonce(*nonce),
            signature: Signature::new(signature)?,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DEVICE_ID_LEN + NONCE_LEN + 2 + MAX_SIGNATURE_LEN);
        out.extend_from_slice(&self.device_id.0);
        out.extend_from_slice(&self.nonce.0);
        put_prefixed(&mut out, &self.signature.0);
        out
    }

    /// `"registrar/pubkey/attest/v1" ‖ nonce ‖ device_id`: what the signature covers.
    pub fn signed_message(device_id: &DeviceId, nonce: &Nonce) -> Vec<u8> {
        [ATTEST_DOMAIN, &nonce.0, &device_id.0].concat()
    }
}

/// The 200 reply to an attestation: when it was recorded (ms since the Unix epoch).
pub fn attest_reply(attested_ms: u64) -> [u8; ATTEST_REPLY_LEN] {
    attested_ms.to_be_bytes()
}

pub fn parse_attest_reply(payload: &[u8]) -> Result<u64, DecodeError> {
    let ms: [u8; ATTEST_REPLY_LEN] = payload.try_into().map_err(|_| DecodeError::Length {
        expected: ATTEST_REPLY_LEN,
        got: payload.len(),
    })?;
    Ok(u64::from_be_bytes(ms))
}

/// Any pubkey request, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Register(RegisterRequest),
    Challenge(ChallengeRequest),
    Attest(AttestRequest),
}

impl Request {
    pub fn parse(kind: Kind, payload: &[u8]) -> Result<Request, DecodeError> {
        match kind {
            REGISTER => RegisterRequest::parse(payload).map(Request::Register),
            CHALLENGE => ChallengeRequest::parse(payload).map(Request::Challenge),
            ATTEST => AttestRequest::parse(payload).map(Request::Attest),
            other => Err(DecodeError::Unknown {
                field: "kind",
                value: other.0.into(),
            }),
        }
    }

    pub fn device_id(&self) -> DeviceId {
        match self {
            Request::Register(r) => r.device_id,
            Request::Challenge(r) => r.device_id,
            Request::Attest(r) => r.device_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> DeviceId {
        DeviceId([0x11; 16])
    }

    fn spki() -> P256Spki {
        let mut der = [0x22u8; P256_SPKI_LEN];
        der[..27].copy_from_slice(&P256_SPKI_PREFIX);
        P256Spki(der)
    }

    fn register() -> RegisterRequest {
        RegisterRequest {
            device_id: id(),
            spki: spki(),
            signature: Signature(vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01]),
        }
    }

    fn attest() -> AttestRequest {
        AttestRequest {
            device_id: id(),
            nonce: Nonce([0x33; 32]),
            signature: Signature(vec![0x30, 0x00]),
        }
    }

    #[test]
    fn register_byte_table() {
        let bytes = register().to_bytes();
        assert_eq!(&bytes[..16], &[0x11; 16]);
        assert_eq!(&bytes[16..18], &[0, 91]);
        assert_eq!(&bytes[18..45], &P256_SPKI_PREFIX);
        assert_eq!(&bytes[45..109], &[0x22; 64]);
        assert_eq!(&bytes[109..111], &[0, 8]);
        assert_eq!(
            &bytes[111..],
            &[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01]
        );
        assert_eq!(bytes.len(), 119);
        assert_eq!(RegisterRequest::parse(&bytes), Ok(register()));
        assert_eq!(
            Request::parse(REGISTER, &bytes),
            Ok(Request::Register(register()))
        );
    }

    #[test]
    fn challenge_and_attest_byte_tables() {
        let c = ChallengeRequest { device_id: id() };
        assert_eq!(c.to_bytes(), [0x11; 16]);
        assert_eq!(ChallengeRequest::parse(&[0x11; 16]), Ok(c));

        let bytes = attest().to_bytes();
        let expected = [&[0x11u8; 16][..], &[0x33; 32], &[0, 2, 0x30, 0x00]].concat();
        assert_eq!(bytes, expected);
        assert_eq!(AttestRequest::parse(&bytes), Ok(attest()));

        assert_eq!(
            attest_reply(0x0102_0304_0506_0708),
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(
            parse_attest_reply(&[1, 2, 3, 4, 5, 6, 7, 8]),
            Ok(0x0102_0304_0506_0708)
        );
        assert_eq!(parse_challenge_reply(&[7; 32]), Ok(Nonce([7; 32])));
    }

    #[test]
    fn signed_messages_are_domain_separated() {
        let m = RegisterRequest::signed_message(&id(), &spki());
        assert_eq!(&m[..28], b"registrar/pubkey/register/v1");
        assert_eq!(&m[28..44], &[0x11; 16]);
        assert_eq!(&m[44..], &spki().0);
        let m = AttestRequest::signed_message(&id(), &Nonce([0x33; 32]));
        assert_eq!(&m[..26], b"registrar/pubkey/attest/v1");
        assert_eq!(&m[26..58], &[0x33; 32]);
        assert_eq!(&m[58..], &[0x11; 16]);
    }

    #[test]
    fn nonce_layout_encodes_into_a_prefilled_buffer() {
        let n = Nonce::new(0x0000_018b_cfe5_6800, [0xa1; 8], [0xb2; 16]);
        let mut buf = [0xa5u8; 32];
        buf.copy_from_slice(n.raw().as_bytes());
        assert_eq!(&buf[..8], &[0, 0, 0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00]);
        assert_eq!(&buf[8..16], &[0xa1; 8]);
        assert_eq!(&buf[16..], &[0xb2; 16]);
        assert_eq!(n.raw().issued_ms.get(), 0x0000_018b_cfe5_6800);
        let input = Nonce::mac_input(&id(), 5, &[9; 8]);
        assert_eq!(&input[..16], &[0x11; 16]);
        assert_eq!(&input[16..24], &[0, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(&input[24..], &[9; 8]);
    }

    #[test]
    fn bad_fields_are_typed_errors() {
        let good = register().to_bytes();
        let with = |offset: usize, b: &[u8]| {
            let mut v = good.clone();
            v[offset..offset + b.len()].copy_from_slice(b);
            RegisterRequest::parse(&v)
        };
        assert_eq!(
            with(0, &[0; 16]),
            Err(DecodeError::Invalid { field: "device_id" })
        );
        // Not P-256: another curve OID (P-384's last byte is 0x22, its length differs).
        assert_eq!(
            with(40, &[0x22]),
            Err(DecodeError::Invalid {
                field: "public_key"
            })
        );
        // A compressed point.
        assert_eq!(
            with(44, &[0x02]),
            Err(DecodeError::Invalid {
                field: "public_key"
            })
        );
        // A key of the wrong length (claims 90 bytes, so the rest misaligns).
        assert!(with(16, &[0, 90]).is_err());
        assert_eq!(
            ChallengeRequest::parse(&[0; 16]),
            Err(DecodeError::Invalid { field: "device_id" })
        );
        assert_eq!(
            Request::parse(Kind(9), &[0x11; 16]),
            Err(DecodeError::Unknown {
                field: "kind",
                value: 9
            })
        );
        let long_sig = AttestRequest {
            signature: Signature(vec![0x30; 73]),
            ..attest()
        };
        assert_eq!(
            AttestRequest::parse(&long_sig.to_bytes()),
            Err(DecodeError::Length {
                expected: 72,
                got: 73
            })
        );
        assert_eq!(
            ChallengeRequest::parse(&[0; 16]),
            Err(DecodeError::Invalid { field: "device_id" })
        );
    }

    #[test]
    fn truncated_and_oversized_payloads_are_length_errors() {
        for (kind, bytes) in [
            (REGISTER, register().to_bytes()),
            (ATTEST, attest().to_bytes()),
        ] {
            assert!(Request::parse(kind, &bytes).is_ok(), "{kind:?} whole");
            for len in 0..bytes.len() {
                assert!(
                    Request::parse(kind, &bytes[..len]).is_err(),
                    "{kind:?}: {len} bytes"
                );
            }
            let mut long = bytes.clone();
            long.push(0);
            let err = Request::parse(kind, &long).unwrap_err();
            assert!(
                matches!(err, DecodeError::Length { got, .. } if got == long.len()),
                "{kind:?} one byte over: {err:?}"
            );
        }
        assert_eq!(
            ChallengeRequest::parse(&[0x11; 17]),
            Err(DecodeError::Length {
                expected: 16,
                got: 17
            })
        );
        assert_eq!(
            ChallengeRequest::parse(&[0x11; 15]),
            Err(DecodeError::Length {
                expected: 16,
                got: 15
            })
        );
        assert!(parse_attest_reply(&[0; 9]).is_err());
        assert!(parse_challenge_reply(&[0; 31]).is_err());
    }

    #[test]
    fn random_payloads_never_panic_and_round_trip_when_they_parse() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        let template = register().to_bytes();
        for len in [0usize, 16, 17, 48, 50, 111, 119, 200] {
            for round in 0..2000 {
                let mut bytes: Vec<u8> = (0..len).map(|_| next()).collect();
                // Sometimes mutate a valid request instead, so deep paths run too.
                if round % 3 == 0 {
                    bytes = template.clone();
                    let i = next() as usize % bytes.len();
                    bytes[i] = next();
                }
                for kind in [REGISTER, CHALLENGE, ATTEST] {
                    if let Ok(req) = Request::parse(kind, &bytes) {
                        let again = match &req {
                            Request::Register(r) => r.to_bytes(),
                            Request::Challenge(r) => r.to_bytes().to_vec(),
                            Request::Attest(r) => r.to_bytes(),
                        };
                        assert_eq!(again, bytes);
                    }
                }
            }
        }
    }
}
