//! Flow 0, core: what a device asks before any other flow. Layout:
//! `schemas/envelope.json` (`hello_reply`), semantics: `schemas/envelope.md`.
//!
//! ```text
//! Hello request   (kind 1)     empty payload
//! Hello reply 200 (kind 0x81)  u16 len ‖ server version (UTF-8)
//!                              ‖ u16 len ‖ flows served (one byte each)
//!                              ‖ u32 max payload length
//!                              ‖ u16 len ‖ the server's signing key (P-256 SPKI DER)
//! ```

use super::DecodeError;
use super::envelope::{Flow, Kind, put_prefixed, take_prefixed};

pub const HELLO: Kind = Kind(1);

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
}
