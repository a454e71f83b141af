//! The storage key: the 32-byte secret in the data dir under which secrets are kept
//! at rest. Passphrases and replay records are stored as keyed hashes, node keys
//! sealed, pubkey nonces tagged; each purpose has a sub-key of its own.

use std::fmt;

use aws_lc_rs::{aead, hmac};

use super::CryptoError;
use crate::core::ids::NodeKey;

/// HMAC-SHA256 of (network id, passphrase) under the storage key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PassphraseHash(pub [u8; 32]);

impl fmt::Debug for PassphraseHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PassphraseHash(..)")
    }
}

/// HMAC-SHA256 of a whole registration plaintext under the storage key: the key of
/// the replay cache, so only the holder of the plaintext can hit an entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplayKey(pub [u8; 32]);

impl fmt::Debug for ReplayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplayKey(..)")
    }
}

/// A node's AES key sealed with AES-256-GCM under the storage key (nonce ‖ ct ‖ tag).
#[derive(Clone, PartialEq, Eq)]
pub struct SealedNodeKey(pub Vec<u8>);

impl fmt::Debug for SealedNodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealedNodeKey(..)")
    }
}

impl SealedNodeKey {
    /// The length of a value in the first format, nonce ‖ ct ‖ tag under a constant
    /// associated data: one such value opens in any node's record, so these are
    /// re-sealed at start and never opened to serve.
    pub const LEGACY_LEN: usize = aead::NONCE_LEN + 32 + aead::MAX_TAG_LEN;

    /// Whether this value is in the first format (told apart by its length alone:
    /// its first byte is a random nonce's).
    pub fn is_legacy(&self) -> bool {
        self.0.len() == Self::LEGACY_LEN
    }
}

/// How a store keeps passphrases and node keys: protected (keyed hashes, sealed keys:
/// every native store), or in clear (the JAMScript-OTA portal's own Redis layout,
/// whose web pages read them as typed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtRest {
    Protected,
    Clear,
}

/// A passphrase as a store keeps it. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub enum StoredPassphrase {
    Hash(PassphraseHash),
    Clear(String),
}

impl fmt::Debug for StoredPassphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoredPassphrase(..)")
    }
}

/// A node key as a store keeps it. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub enum StoredNodeKey {
    Sealed(SealedNodeKey),
    Clear(NodeKey),
    /// Erased (a revoked or expired node).
    None,
}

impl fmt::Debug for StoredNodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoredNodeKey(..)")
    }
}

/// A fresh AES-GCM nonce for one sealing, drawn by the caller (`core::random`).
pub type SealNonce = [u8; aead::NONCE_LEN];

const SEAL_AAD: &[u8] = b"registrar/node-key/v1";

/// The 32-byte secret kept in the data dir beside the RSA key. Sub-keys are derived
/// per purpose, so a passphrase hash can never be confused with a replay key.
pub struct StorageKey {
    passphrase: hmac::Key,
    replay: hmac::Key,
    seal: aead::LessSafeKey,
    challenge: hmac::Key,
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StorageKey(..)")
    }
}

impl StorageKey {
    pub const LEN: usize = 32;

    pub fn from_bytes(master: &[u8; Self::LEN]) -> Self {
        let master = hmac::Key::new(hmac::HMAC_SHA256, master);
        let derive = |label: &[u8]| hmac::sign(&master, label);
        let seal_key = derive(b"registrar/storage/seal-node-key/v1");
        let seal = aead::UnboundKey::new(&aead::AES_256_GCM, seal_key.as_ref())
            .expect("32-byte AES-256-GCM key");
        StorageKey {
            passphrase: hmac::Key::new(
                hmac::HMAC_SHA256,
                derive(b"registrar/storage/passphrase/v1").as_ref(),
            ),
            replay: hmac::Key::new(
                hmac::HMAC_SHA256,
                derive(b"registrar/storage/replay/v1").as_ref(),
            ),
            seal: aead::LessSafeKey::new(seal),
            challenge: hmac::Key::new(
                hmac::HMAC_SHA256,
                derive(b"registrar/storage/pubkey-challenge/v1").as_ref(),
            ),
        }
    }

    /// HMAC-SHA256 under the challenge sub-key: the tag of a stateless pubkey nonce
    /// (`flow::pubkey`), so every listener sharing the storage key can check it.
    pub fn challenge_tag(&self, data: &[u8]) -> [u8; 32] {
        hmac::sign(&self.challenge, data)
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes")
    }

    /// The stored form of a passphrase: bound to its network, so the same word in two
    /// networks gives two unrelated hashes.
    pub fn passphrase_hash(&self, network: &str, passphrase: &str) -> PassphraseHash {
        let mut ctx = hmac::Context::with_key(&self.passphrase);
        ctx.update(&(network.len() as u32).to_be_bytes());
        ctx.update(network.as_bytes());
        ctx.update(passphrase.as_bytes());
        PassphraseHash(ctx.sign().as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }

    /// Replay-cache key of a whole registration plaintext.
    pub fn replay_key(&self, plaintext: &[u8]) -> ReplayKey {
        let tag = hmac::sign(&self.replay, plaintext);
        ReplayKey(tag.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }

    /// Seals a node key with AES-256-GCM under a fresh `nonce`. Not bound to the node
    /// id: the store picks the final id inside its atomic call, after sealing.
    pub fn seal_node_key(
        &self,
        key: &NodeKey,
        nonce_bytes: SealNonce,
    ) -> Result<SealedNodeKey, CryptoError> {
        let mut in_out = key.0.to_vec();
        self.seal
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce_bytes),
                aead::Aad::from(SEAL_AAD),
                &mut in_out,
            )
            .map_err(|_| CryptoError::Unseal)?;
        let mut sealed = nonce_bytes.to_vec();
        sealed.extend_from_slice(&in_out);
        Ok(SealedNodeKey(sealed))
    }

    /// `passphrase` of `network` as a store keeping secrets `at_rest` keeps it.
    pub fn store_passphrase(
        &self,
        at_rest: AtRest,
        network: &str,
        passphrase: &str,
    ) -> StoredPassphrase {
        match at_rest {
            AtRest::Protected => StoredPassphrase::Hash(self.passphrase_hash(network, passphrase)),
            AtRest::Clear => StoredPassphrase::Clear(passphrase.to_owned()),
        }
    }

    /// `key` as a store keeping secrets `at_rest` keeps it (sealed under `nonce`).
    pub fn store_node_key(
        &self,
        at_rest: AtRest,
        key: &NodeKey,
        nonce: SealNonce,
    ) -> Result<StoredNodeKey, CryptoError> {
        match at_rest {
            AtRest::Protected => self.seal_node_key(key, nonce).map(StoredNodeKey::Sealed),
            AtRest::Clear => Ok(StoredNodeKey::Clear(key.clone())),
        }
    }

    /// The node key a store kept; `Unseal` when it does not open or was erased.
    pub fn node_key(&self, stored: &StoredNodeKey) -> Result<NodeKey, CryptoError> {
        match stored {
            StoredNodeKey::Sealed(sealed) => self.open_node_key(sealed),
            StoredNodeKey::Clear(key) => Ok(key.clone()),
            StoredNodeKey::None => Err(CryptoError::Unseal),
        }
    }

    pub fn open_node_key(&self, sealed: &SealedNodeKey) -> Result<NodeKey, CryptoError> {
        let (nonce, ct) = sealed
            .0
            .split_at_checked(aead::NONCE_LEN)
            .ok_or(CryptoError::Unseal)?;
        let nonce =
            aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Unseal)?;
        let mut in_out = ct.to_vec();
        let plain = self
            .seal
            .open_in_place(nonce, aead::Aad::from(SEAL_AAD), &mut in_out)
            .map_err(|_| CryptoError::Unseal)?;
        let key: [u8; 32] = (&*plain).try_into().map_err(|_| CryptoError::Unseal)?;
        Ok(NodeKey(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_node_keys_open_only_under_their_storage_key() {
        let storage = StorageKey::from_bytes(&[1; 32]);
        let key = NodeKey([42; 32]);
        let sealed = storage.seal_node_key(&key, [5; 12]).unwrap();
        assert_eq!(sealed.0.len(), 12 + 32 + 16);
        assert_ne!(
            storage.seal_node_key(&key, [6; 12]).unwrap(),
            sealed,
            "another nonce, another sealing"
        );
        assert_eq!(storage.open_node_key(&sealed).unwrap(), key);
        let other = StorageKey::from_bytes(&[2; 32]);
        assert!(other.open_node_key(&sealed).is_err());
        let mut tampered = sealed.clone();
        tampered.0[20] ^= 1;
        assert!(storage.open_node_key(&tampered).is_err());
        assert!(
            storage
                .open_node_key(&SealedNodeKey(vec![1, 2, 3]))
                .is_err()
        );
    }

    #[test]
    fn passphrase_hashes_are_keyed_and_bound_to_the_network() {
        let a = StorageKey::from_bytes(&[1; 32]);
        let b = StorageKey::from_bytes(&[2; 32]);
        assert_eq!(
            a.passphrase_hash("net", "pw"),
            a.passphrase_hash("net", "pw")
        );
        assert_ne!(
            a.passphrase_hash("net", "pw"),
            b.passphrase_hash("net", "pw")
        );
        assert_ne!(
            a.passphrase_hash("net", "pw"),
            a.passphrase_hash("ne", "tpw")
        );
    }
}
