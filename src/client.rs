//! The node side of the ijam flow, sans-I/O: what `registrar-node` and the test
//! suites send and how they read replies. Kept here so there is one implementation.
//! The device side of the envelope and the pubkey flow lives in [`pubkey`].

pub mod pubkey;

use uuid::Uuid;
use zerocopy::{FromBytes, IntoBytes};

use crate::core::crypto;
use crate::wire::DecodeError;
use crate::wire::ijam::{self, NodeKey, RawRegisterReply, RawStateRequest, StateCode};

/// The node id in a 200 registration reply, decoded as the upstream C client does:
/// AES-256-CBC-decrypt IV ‖ body (all 48 bytes) under a zero IV, drop the first
/// (garbage) block, then check the padding and XOR checksum of the rest.
pub fn open_register_reply(reply: &[u8], key: &NodeKey) -> Result<Uuid, DecodeError> {
    let raw = RawRegisterReply::ref_from_bytes(reply).map_err(|_| DecodeError::Length {
        expected: ijam::REGISTER_REPLY_LEN,
        got: reply.len(),
    })?;
    let mut blocks = [0u8; 48];
    blocks[..16].copy_from_slice(&raw.iv);
    blocks[16..].copy_from_slice(&raw.body);
    crypto::aes_cbc_decrypt(key, [0; 16], &mut blocks);
    ijam::parse_register_reply_plaintext(&blocks[16..])
}

/// `node_id ‖ IV ‖ AES-256-CBC(node_key, IV, block)`: a state request around any
/// 16-byte plaintext (tests use malformed ones).
pub fn seal_state_block(
    node_id: Uuid,
    key: &NodeKey,
    iv: [u8; 16],
    mut block: [u8; 16],
) -> [u8; 48] {
    crypto::aes_cbc_encrypt(key, iv, &mut block);
    let raw = RawStateRequest {
        node_id: node_id.into_bytes(),
        iv,
        body: block,
    };
    let mut out = [0u8; ijam::STATE_REQUEST_LEN];
    out.copy_from_slice(raw.as_bytes());
    out
}

/// The state request asking for `code`.
pub fn seal_state_request(node_id: Uuid, key: &NodeKey, iv: [u8; 16], code: StateCode) -> [u8; 48] {
    seal_state_block(node_id, key, iv, code.plaintext())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_requests_decrypt_to_their_code() {
        let key = NodeKey([5; 32]);
        let frame =
            seal_state_request(Uuid::from_bytes([3; 16]), &key, [7; 16], StateCode::Loading);
        let raw = RawStateRequest::ref_from_bytes(&frame).unwrap();
        assert_eq!((raw.node_id, raw.iv), ([3; 16], [7; 16]));
        let mut block = raw.body;
        crypto::aes_cbc_decrypt(&key, raw.iv, &mut block);
        assert_eq!(StateCode::parse_plaintext(&block), Ok(StateCode::Loading));
    }

    #[test]
    fn register_replies_open_only_under_their_key_and_length() {
        let key = NodeKey([9; 32]);
        let id = Uuid::from_bytes([0x24; 16]);
        let mut body = ijam::register_reply_plaintext(id);
        crypto::aes_cbc_encrypt(&key, [1; 16], &mut body);
        let reply = ijam::register_reply([1; 16], body);
        assert_eq!(open_register_reply(&reply, &key), Ok(id));
        assert!(open_register_reply(&reply, &NodeKey([8; 32])).is_err());
        assert_eq!(
            open_register_reply(&reply[..49], &key),
            Err(DecodeError::Length {
                expected: 50,
                got: 49
            })
        );
    }
}
