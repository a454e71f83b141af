//! Cryptography, all from aws-lc-rs (constant-time RSA; see README "Why aws-lc-rs"):
//! the server's RSA-OAEP key ([`rsa`]), the ijam AES-256-CBC node format
//! ([`aes_cbc`]), the storage key that hashes passphrases and seals node keys at rest
//! ([`storage_key`]), ECDSA P-256 ([`ecdsa`]) and generated passphrases
//! ([`passphrase`]).

pub mod aes_cbc;
pub mod ecdsa;
pub mod passphrase;
pub mod rsa;
pub mod seal;
pub mod storage_key;

pub use aes_cbc::{aes_cbc_decrypt, aes_cbc_encrypt};
pub use rsa::{KeyRing, MAX_MODULUS_LEN, RsaKey, RsaPublicKey};
pub use storage_key::{
    AtRest, PassphraseHash, ReplayKey, SealedNodeKey, StorageKey, StoredNodeKey, StoredPassphrase,
};

use super::random::RandomError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// Deliberately without detail: every decryption failure must read the same.
    #[error("decryption failed")]
    Decrypt,
    #[error("RSA key size {0} is not supported (2048, 3072 or 4096)")]
    KeySize(usize),
    #[error("key rejected: {0}")]
    KeyRejected(String),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("sealed node key does not open for this node under this storage key")]
    Unseal,
    #[error(transparent)]
    Random(#[from] RandomError),
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}
