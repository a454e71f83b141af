//! Flow 0, core: what a device asks before any other flow. Layout:
//! `schemas/envelope.json` (`hello_reply`), semantics: `schemas/envelope.md`.
//!
//! ```text
//! Hello request   (kind 1)     empty, or zero padding
//! Keys request    (kind 2)     empty, or zero padding
//! Keys reply 200  (kind 0x82)  u16 len ‖ signing key SPKI DER ‖ u16 kem_id (0x0020)
//!                              ‖ u16 len ‖ HPKE public key ‖ u16 len ‖ DER ECDSA-SHA256
//!                              over "registrar/core/keys/v1" ‖ kem_id ‖ HPKE public key
//! Hello reply 200 (kind 0x81)  u16 len ‖ server version (UTF-8)
//!                              ‖ u16 len ‖ flows served (one byte each)
//!                              ‖ u32 max payload length
//!                              ‖ u16 len ‖ the server's signing key (P-256 SPKI DER)
//! ```

use super::DecodeError;
use super::envelope::{Flow, Kind, put_prefixed, take_prefixed};

pub const HELLO: Kind = Kind(1);
pub const KEYS: Kind = Kind(2);

/// What the signing key signs in a `Keys` reply: the HPKE key and its KEM.
pub const KEYS_SIGNED_PREFIX: &[u8] = b"registrar/core/keys/v1";

/// `Keys` 200: the server's signing key, and its HPKE key signed by it (so a device that
/// trusts the signing key trusts the sealing key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysReply {
    /// SubjectPublicKeyInfo DER of the ECDSA P-256 signing key.
    pub signing_key: Vec<u8>,
    pub kem_id: u16,
    pub hpke_public_key: Vec<u8>,
    /// DER ECDSA-SHA256 by the signing key over [`KeysReply::signed_message`].
    pub signature: Vec<u8>,
}

impl KeysReply {
    pub fn signed_message(kem_id: u16, hpke_public_key: &[u8]) -> Vec<u8> {
        let mut m = KEYS_SIGNED_PREFIX.to_vec();
        m.extend_from_slice(&kem_id.to_be_bytes());
        m.extend_from_slice(hpke_public_key);
        m
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            8 + self.signing_key.len() + self.hpke_public_key.len() + self.signature.len(),
        );
        put_prefixed(&mut out, &self.signing_key);
        out.extend_from_slice(&self.kem_id.to_be_bytes());
        put_prefixed(&mut out, &self.hpke_public_key);
        put_prefixed(&mut out, &self.signature);
        out
    }

    pub fn parse(payload: &[u8]) -> Result<KeysReply, DecodeError> {
        let (signing_key, rest) = take_prefixed("signing_key", payload)?;
        let (kem, rest) = rest.split_first_chunk::<2>().ok_or(DecodeError::Length {
            expected: 2,
            got: rest.len(),
        })?;
        let (hpke_public_key, rest) = take_prefixed("hpke_public_key", rest)?;
        let (signature, rest) = take_prefixed("signature", rest)?;
        if !rest.is_empty() {
            return Err(DecodeError::Length {
                expected: payload.len() - rest.len(),
                got: payload.len(),
            });
        }
        Ok(KeysReply {
            signing_key: signing_key.to_vec(),
            kem_id: u16::from_be_bytes(*kem),
            hpke_public_key: hpke_public_key.to_vec(),
            signature: signature.to_vec(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    pub server_version: String,
    pub flows: Vec<Flow>,
    pub max_payload: u32,
    /// SubjectPublicKeyInfo DER of the server's ECDSA P-256 signing key.
    pub signing_key: Vec<u8>,
}

impl HelloReply {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.signing_key.len());
        put_prefixed(&mut out, self.server_version.as_bytes());
        let flows: Vec<u8> = self.flows.iter().map(|f| f.0).collect();
        put_prefixed(&mut out, &flows);
        out.extend_from_slice(&self.max_payload.to_be_bytes());
        put_prefixed(&mut out, &self.signing_key);
        out
    }

    pub fn parse(payload: &[u8]) -> Result<HelloReply, DecodeError> {
        let (version, rest) = take_prefixed("server_version", payload)?;
        let server_version = std::str::from_utf8(version)
            .map_err(|e| DecodeError::BadByte {
                field: "server_version",
                offset: e.valid_up_to(),
            })?
            .to_owned();
        let (flows, rest) = take_prefixed("flows", rest)?;
        let (max, rest) = rest.split_first_chunk::<4>().ok_or(DecodeError::Length {
            expected: 4,
            got: rest.len(),
        })?;
        let (signing_key, rest) = take_prefixed("signing_key", rest)?;
        if !rest.is_empty() {
            return Err(DecodeError::Length {
                expected: payload.len() - rest.len(),
                got: payload.len(),
            });
        }
        Ok(HelloReply {
            server_version,
            flows: flows.iter().map(|&f| Flow(f)).collect(),
            max_payload: u32::from_be_bytes(*max),
            signing_key: signing_key.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HelloReply {
        HelloReply {
            server_version: "0.1.0".into(),
            flows: vec![Flow::CORE, Flow::PUBKEY],
            max_payload: 16384,
            signing_key: vec![0x30, 0x59, 0xaa],
        }
    }

    #[test]
    fn byte_table() {
        let bytes = [
            0, 5, b'0', b'.', b'1', b'.', b'0', // server version
            0, 2, 0, 1, // flows
            0, 0, 0x40, 0, // max payload 16384
            0, 3, 0x30, 0x59, 0xaa, // signing key
        ];
        assert_eq!(sample().to_bytes(), bytes);
        assert_eq!(HelloReply::parse(&bytes), Ok(sample()));
    }

    #[test]
    fn truncated_trailing_and_random_payloads_are_errors_not_panics() {
        let bytes = sample().to_bytes();
        for len in 0..bytes.len() {
            assert!(HelloReply::parse(&bytes[..len]).is_err(), "{len}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            HelloReply::parse(&long),
            Err(DecodeError::Length {
                expected: 20,
                got: 21
            })
        );
        let mut x: u32 = 0x1234_5678;
        for len in [0usize, 2, 7, 20, 64] {
            for _ in 0..2000 {
                let b: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        (x % 7) as u8
                    })
                    .collect();
                if let Ok(h) = HelloReply::parse(&b) {
                    assert_eq!(h.to_bytes(), b);
                }
            }
        }
    }

    #[test]
    fn keys_replies_refuse_truncated_and_trailing_bytes() {
        let keys = KeysReply {
            signing_key: vec![1; 91],
            kem_id: 0x0020,
            hpke_public_key: vec![2; 32],
            signature: vec![3; 70],
        };
        let bytes = keys.to_bytes();
        assert_eq!(bytes.len(), 2 + 91 + 2 + 2 + 32 + 2 + 70);
        assert_eq!(&bytes[93..95], &[0x00, 0x20]);
        assert_eq!(KeysReply::parse(&bytes), Ok(keys));
        for len in 0..bytes.len() {
            assert!(KeysReply::parse(&bytes[..len]).is_err(), "{len}");
        }
        let mut long = bytes;
        long.push(0);
        assert!(KeysReply::parse(&long).is_err());
        assert_eq!(
            KeysReply::signed_message(0x0020, &[9; 2]),
            b"registrar/core/keys/v1\x00\x20\x09\x09"
        );
    }
}
