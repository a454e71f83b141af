//! AES-256-CBC over whole blocks, the cipher of every ijam reply and state request.

use aws_lc_rs::cipher::{
    AES_256, DecryptingKey, DecryptionContext, EncryptingKey, EncryptionContext, UnboundCipherKey,
};
use aws_lc_rs::iv::FixedLength;

use crate::core::ids::NodeKey;

/// AES-256-CBC without padding over whole blocks (the protocol lays out its own
/// padding, see `wire::ijam::checksummed_plaintext`).
pub fn aes_cbc_encrypt(key: &NodeKey, iv: [u8; 16], blocks: &mut [u8]) {
    assert!(blocks.len().is_multiple_of(16), "whole AES blocks only");
    let key = UnboundCipherKey::new(&AES_256, &key.0).expect("32-byte AES-256 key");
    let key = EncryptingKey::cbc(key).expect("CBC is supported");
    key.less_safe_encrypt(blocks, EncryptionContext::Iv128(FixedLength::from(iv)))
        .expect("whole blocks and a 16-byte IV");
}

pub fn aes_cbc_decrypt(key: &NodeKey, iv: [u8; 16], blocks: &mut [u8]) {
    assert!(blocks.len().is_multiple_of(16), "whole AES blocks only");
    let key = UnboundCipherKey::new(&AES_256, &key.0).expect("32-byte AES-256 key");
    let key = DecryptingKey::cbc(key).expect("CBC is supported");
    key.decrypt(blocks, DecryptionContext::Iv128(FixedLength::from(iv)))
        .expect("whole blocks and a 16-byte IV");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_cbc_round_trips() {
        let key = NodeKey([3; 32]);
        let mut data = [0x11u8; 32];
        aes_cbc_encrypt(&key, [9; 16], &mut data);
        assert_ne!(data, [0x11; 32]);
        aes_cbc_decrypt(&key, [9; 16], &mut data);
        assert_eq!(data, [0x11; 32]);
    }
}
