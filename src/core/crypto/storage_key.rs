//! The storage key: the 32-byte secret in the data dir under which secrets are kept
//! at rest. Passphrases and replay records are stored as keyed hashes, node keys
//! sealed for their node, pubkey nonces tagged; each purpose has a sub-key of its own.

use std::fmt;

use aws_lc_rs::{aead, hmac};
use uuid::Uuid;

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

/// A node's AES key sealed with AES-256-GCM under the storage key and bound to its
/// node's id: `0x02` ‖ nonce ‖ ct ‖ tag. Stores made before the binding may still hold
/// values of the first format ([`SealedNodeKey::is_legacy`]).
#[derive(Clone, PartialEq, Eq)]
pub struct SealedNodeKey(pub Vec<u8>);

impl fmt::Debug for SealedNodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealedNodeKey(..)")
    }
}

impl SealedNodeKey {
    /// The length of a value bound to its node.
    pub const LEN: usize = 1 + Self::LEGACY_LEN;

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

/// The first byte of a sealed node key bound to its node.
const SEALED_VERSION: u8 = 0x02;
/// The associated data of a sealed node key, followed by the node's 16 id bytes: a
/// value copied into another node's record does not open there.
const SEAL_AAD: &[u8] = b"registrar/ijam/node-key/v2";
/// The first format's associated data, the same for every node: such a value is only
/// ever opened to be sealed again, bound to its node.
const LEGACY_SEAL_AAD: &[u8] = b"registrar/node-key/v1";

/// The associated data that binds a sealed node key to node `node`.
fn seal_aad(node: Uuid) -> [u8; SEAL_AAD.len() + 16] {
    let mut aad = [0u8; SEAL_AAD.len() + 16];
    aad[..SEAL_AAD.len()].copy_from_slice(SEAL_AAD);
    aad[SEAL_AAD.len()..].copy_from_slice(node.as_bytes());
    aad
}

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

    /// Seals the key of node `node` with AES-256-GCM under a fresh `nonce`, bound to
    /// that id: it opens for this node only, so a value copied into another node's
    /// record is refused there.
    pub fn seal_node_key(
        &self,
        key: &NodeKey,
        nonce_bytes: SealNonce,
        node: Uuid,
    ) -> Result<SealedNodeKey, CryptoError> {
        let mut in_out = key.0.to_vec();
        self.seal
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce_bytes),
                aead::Aad::from(seal_aad(node)),
                &mut in_out,
            )
            .map_err(|_| CryptoError::Unseal)?;
        let mut sealed = Vec::with_capacity(SealedNodeKey::LEN);
        sealed.push(SEALED_VERSION);
        sealed.extend_from_slice(&nonce_bytes);
        sealed.extend_from_slice(&in_out);
        Ok(SealedNodeKey(sealed))
    }

    /// Seals again, bound to `node`, a value of the first format found in that node's
    /// record: the one place such a value is opened (`registrar serve`, before it
    /// serves). It cannot tell where the value came from, so it binds it to the record
    /// it sits in.
    pub fn reseal_legacy_node_key(
        &self,
        legacy: &SealedNodeKey,
        nonce: SealNonce,
        node: Uuid,
    ) -> Result<SealedNodeKey, CryptoError> {
        if !legacy.is_legacy() {
            return Err(CryptoError::Unseal);
        }
        let key = self.open(&legacy.0, LEGACY_SEAL_AAD)?;
        self.seal_node_key(&key, nonce, node)
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

    /// The key of node `node` as a store keeping secrets `at_rest` keeps it (sealed
    /// for that node under `nonce`; a key in clear is bound to nothing).
    pub fn store_node_key(
        &self,
        at_rest: AtRest,
        key: &NodeKey,
        nonce: SealNonce,
        node: Uuid,
    ) -> Result<StoredNodeKey, CryptoError> {
        match at_rest {
            AtRest::Protected => self
                .seal_node_key(key, nonce, node)
                .map(StoredNodeKey::Sealed),
            AtRest::Clear => Ok(StoredNodeKey::Clear(key.clone())),
        }
    }

    /// The key a store kept for node `node`; `Unseal` when it does not open for that
    /// node or was erased.
    pub fn node_key(&self, stored: &StoredNodeKey, node: Uuid) -> Result<NodeKey, CryptoError> {
        match stored {
            StoredNodeKey::Sealed(sealed) => self.open_node_key(sealed, node),
            StoredNodeKey::Clear(key) => Ok(key.clone()),
            StoredNodeKey::None => Err(CryptoError::Unseal),
        }
    }

    /// Opens a value sealed for node `node`. Anything else is refused: a value sealed
    /// for another node, and a value of the first format, which is bound to no node
    /// (the start-up re-seal has bound every one the store held; one that turns up
    /// later was put there, from an old backup or by hand).
    pub fn open_node_key(
        &self,
        sealed: &SealedNodeKey,
        node: Uuid,
    ) -> Result<NodeKey, CryptoError> {
        match sealed.0.split_first() {
            Some((&SEALED_VERSION, rest)) if sealed.0.len() == SealedNodeKey::LEN => {
                self.open(rest, &seal_aad(node))
            }
            _ => Err(CryptoError::Unseal),
        }
    }

    /// A value of the first format, as releases before the binding sealed it: for
    /// tests of what happens to such values.
    #[cfg(test)]
    pub(crate) fn seal_legacy_node_key(&self, key: &NodeKey, nonce: SealNonce) -> SealedNodeKey {
        let mut in_out = key.0.to_vec();
        self.seal
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(LEGACY_SEAL_AAD),
                &mut in_out,
            )
            .expect("AES-GCM seals 32 bytes");
        SealedNodeKey([&nonce[..], &in_out].concat())
    }

    /// Opens nonce ‖ ct ‖ tag under the associated data `aad`.
    fn open(&self, nonce_ct_tag: &[u8], aad: &[u8]) -> Result<NodeKey, CryptoError> {
        let (nonce, ct) = nonce_ct_tag
            .split_at_checked(aead::NONCE_LEN)
            .ok_or(CryptoError::Unseal)?;
        let nonce =
            aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Unseal)?;
        let mut in_out = ct.to_vec();
        let plain = self
            .seal
            .open_in_place(nonce, aead::Aad::from(aad), &mut in_out)
            .map_err(|_| CryptoError::Unseal)?;
        let key: [u8; 32] = (&*plain).try_into().map_err(|_| CryptoError::Unseal)?;
        Ok(NodeKey(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    #[test]
    fn sealed_node_keys_open_only_for_their_node_under_their_storage_key() {
        let storage = StorageKey::from_bytes(&[1; 32]);
        let key = NodeKey([42; 32]);
        let sealed = storage.seal_node_key(&key, [5; 12], node(1)).unwrap();
        assert_eq!(sealed.0.len(), 1 + 12 + 32 + 16);
        assert_eq!(sealed.0[0], 0x02, "the version byte");
        assert!(!sealed.is_legacy());
        assert_ne!(
            storage.seal_node_key(&key, [6; 12], node(1)).unwrap(),
            sealed,
            "another nonce, another sealing"
        );
        assert_eq!(storage.open_node_key(&sealed, node(1)).unwrap(), key);

        // Copied into another node's record, it does not open there.
        assert!(storage.open_node_key(&sealed, node(2)).is_err());
        let mut neighbour = node(1).into_bytes();
        neighbour[15] ^= 1;
        assert!(
            storage
                .open_node_key(&sealed, Uuid::from_bytes(neighbour))
                .is_err()
        );
        // Another storage key.
        let other = StorageKey::from_bytes(&[2; 32]);
        assert!(other.open_node_key(&sealed, node(1)).is_err());
        // Any byte changed: the version, the nonce, the ciphertext, the tag.
        for at in [0, 1, 12, 13, 30, 44, 45, 60] {
            let mut tampered = sealed.clone();
            tampered.0[at] ^= 1;
            assert!(
                storage.open_node_key(&tampered, node(1)).is_err(),
                "byte {at}"
            );
        }
        // Cut, lengthened, or nothing like a sealed key.
        for wrong in [
            sealed.0[..60].to_vec(),
            sealed.0[1..].to_vec(),
            [&sealed.0[..], &[0]].concat(),
            vec![1, 2, 3],
            Vec::new(),
        ] {
            assert!(
                storage
                    .open_node_key(&SealedNodeKey(wrong), node(1))
                    .is_err()
            );
        }
    }

    /// A value of the first format opens in any record, so it is never opened to
    /// serve; the start-up re-seal binds it to the node whose record holds it.
    #[test]
    fn first_format_values_are_refused_and_only_resealed_bound_to_their_node() {
        let storage = StorageKey::from_bytes(&[1; 32]);
        let key = NodeKey([42; 32]);
        let legacy = storage.seal_legacy_node_key(&key, [5; 12]);
        assert!(legacy.is_legacy());
        assert_eq!(legacy.0.len(), SealedNodeKey::LEGACY_LEN);
        for id in [node(1), node(2)] {
            assert!(storage.open_node_key(&legacy, id).is_err());
        }
        // Not even with the version byte in front: its associated data is not bound.
        let dressed = SealedNodeKey([&[0x02][..], &legacy.0].concat());
        assert!(storage.open_node_key(&dressed, node(1)).is_err());

        let resealed = storage
            .reseal_legacy_node_key(&legacy, [6; 12], node(1))
            .unwrap();
        assert!(!resealed.is_legacy());
        assert_eq!(storage.open_node_key(&resealed, node(1)).unwrap(), key);
        assert!(storage.open_node_key(&resealed, node(2)).is_err());

        // Only a first-format value under this storage key is re-sealed.
        assert!(
            storage
                .reseal_legacy_node_key(&resealed, [7; 12], node(2))
                .is_err()
        );
        let other = StorageKey::from_bytes(&[2; 32]);
        assert!(
            other
                .reseal_legacy_node_key(&legacy, [7; 12], node(1))
                .is_err()
        );
        let mut tampered = legacy.clone();
        tampered.0[20] ^= 1;
        assert!(
            storage
                .reseal_legacy_node_key(&tampered, [7; 12], node(1))
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
