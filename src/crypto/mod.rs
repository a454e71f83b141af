//! Cryptography, all from aws-lc-rs (constant-time RSA; see README "Why aws-lc-rs"):
//! the server's RSA-OAEP key, the ijam AES-256-CBC node format, and the storage key
//! that hashes passphrases and seals node keys at rest.

pub mod ecdsa;
pub mod passphrase;

use std::fmt;

use aws_lc_rs::cipher::{
    AES_256, DecryptingKey, DecryptionContext, EncryptingKey, EncryptionContext, UnboundCipherKey,
};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA1_MGF1SHA1, OaepPrivateDecryptingKey, OaepPublicEncryptingKey,
    PrivateDecryptingKey, PublicEncryptingKey,
};
use aws_lc_rs::{aead, hmac, rand};
use uuid::Uuid;

use crate::store::{PassphraseHash, ReplayKey, SealedNodeKey};
use crate::wire::ijam::{NodeKey, RegisterRequest};

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
    #[error("sealed node key does not open under this storage key")]
    Unseal,
    #[error("the system random generator failed")]
    Random,
}

/// Largest modulus we accept, in bytes (RSA-4096).
pub const MAX_MODULUS_LEN: usize = 512;

/// The listener's RSA key pair. Decryption is RSA-OAEP with SHA-1 and MGF1-SHA-1 and
/// an empty label, as the upstream client encrypts.
pub struct RsaKey {
    oaep: OaepPrivateDecryptingKey,
    public_pem: String,
    private_pem: String,
}

impl fmt::Debug for RsaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RsaKey({} bits)", self.bits())
    }
}

impl RsaKey {
    pub fn generate(bits: usize) -> Result<Self, CryptoError> {
        let size = match bits {
            2048 => KeySize::Rsa2048,
            3072 => KeySize::Rsa3072,
            4096 => KeySize::Rsa4096,
            other => return Err(CryptoError::KeySize(other)),
        };
        let key = PrivateDecryptingKey::generate(size)
            .map_err(|e| CryptoError::KeyRejected(e.to_string()))?;
        Self::from_private(key)
    }

    /// Loads a PKCS#8 PEM ("BEGIN PRIVATE KEY"), as `openssl genpkey` writes.
    pub fn from_pkcs8_pem(pem_text: &str) -> Result<Self, CryptoError> {
        let block = pem::parse(pem_text).map_err(|e| CryptoError::Pem(e.to_string()))?;
        if block.tag() != "PRIVATE KEY" {
            return Err(CryptoError::Pem(format!(
                "expected a PKCS#8 \"PRIVATE KEY\" block, found {:?} \
                 (convert with `openssl pkcs8 -topk8 -nocrypt`)",
                block.tag()
            )));
        }
        let key = PrivateDecryptingKey::from_pkcs8(block.contents())
            .map_err(|e| CryptoError::KeyRejected(e.to_string()))?;
        Self::from_private(key)
    }

    fn from_private(key: PrivateDecryptingKey) -> Result<Self, CryptoError> {
        let bits = key.key_size_bits();
        if !matches!(bits, 2048 | 3072 | 4096) {
            return Err(CryptoError::KeySize(bits));
        }
        let der = key
            .as_der()
            .map_err(|e| CryptoError::KeyRejected(e.to_string()))?;
        let private_pem = encode_pem("PRIVATE KEY", der.as_ref());
        let spki = key
            .public_key()
            .as_der()
            .map_err(|e| CryptoError::KeyRejected(e.to_string()))?;
        let public_pem = encode_pem("PUBLIC KEY", spki.as_ref());
        let oaep = OaepPrivateDecryptingKey::new(key)
            .map_err(|e| CryptoError::KeyRejected(e.to_string()))?;
        Ok(RsaKey {
            oaep,
            public_pem,
            private_pem,
        })
    }

    pub fn bits(&self) -> usize {
        self.oaep.key_size_bits()
    }

    /// The ciphertext length of one registration request: the modulus size.
    pub fn ciphertext_len(&self) -> usize {
        self.oaep.key_size_bytes()
    }

    /// SubjectPublicKeyInfo PEM, byte-identical to OpenSSL's output.
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    /// PKCS#8 PEM of the private key, for the data dir only.
    pub fn private_pem(&self) -> &str {
        &self.private_pem
    }

    /// Decrypts one OAEP ciphertext into `out`, returning the plaintext.
    pub fn decrypt<'a>(
        &self,
        ciphertext: &[u8],
        out: &'a mut [u8; MAX_MODULUS_LEN],
    ) -> Result<&'a [u8], CryptoError> {
        let len = self.decrypt_len(ciphertext, out)?;
        Ok(&out[..len])
    }

    /// Like [`RsaKey::decrypt`], returning the plaintext's length in `out`.
    fn decrypt_len(
        &self,
        ciphertext: &[u8],
        out: &mut [u8; MAX_MODULUS_LEN],
    ) -> Result<usize, CryptoError> {
        if ciphertext.len() != self.ciphertext_len() {
            return Err(CryptoError::Decrypt);
        }
        self.oaep
            .decrypt(&OAEP_SHA1_MGF1SHA1, ciphertext, out, None)
            .map(|plain| plain.len())
            .map_err(|_| CryptoError::Decrypt)
    }
}

/// The listener's RSA keys: the one it serves, and during a rotation's grace period
/// the one it served before, which still decrypts (`registrar key rotate`), so a fleet
/// that fetched the old public key just before the rotation is not cut off.
#[derive(Debug)]
pub struct KeyRing {
    current: RsaKey,
    /// The previous key and the time (ms since the epoch) it stops decrypting.
    previous: Option<(RsaKey, i64)>,
    certificate_reply: Vec<u8>,
}

impl KeyRing {
    pub fn new(current: RsaKey, previous: Option<(RsaKey, i64)>) -> Self {
        let mut certificate_reply = current.public_pem().as_bytes().to_vec();
        if certificate_reply.len() < crate::wire::ijam::CERT_REPLY_MIN_LEN {
            certificate_reply.resize(crate::wire::ijam::CERT_REPLY_MIN_LEN, 0);
        }
        KeyRing {
            current,
            previous,
            certificate_reply,
        }
    }

    pub fn current(&self) -> &RsaKey {
        &self.current
    }

    /// The previous key's expiry, while it has one.
    pub fn previous_until(&self) -> Option<i64> {
        self.previous.as_ref().map(|(_, until)| *until)
    }

    /// The certificate reply: the current PEM, NUL-padded to at least 800 bytes.
    pub fn certificate_reply(&self) -> &[u8] {
        &self.certificate_reply
    }

    /// Frames on the registration port are this long (the current modulus).
    pub fn ciphertext_len(&self) -> usize {
        self.current.ciphertext_len()
    }

    /// Decrypts with the current key, then with the previous one while its grace
    /// period lasts. Failures are indistinguishable.
    pub fn decrypt<'a>(
        &self,
        ciphertext: &[u8],
        now_ms: i64,
        out: &'a mut [u8; MAX_MODULUS_LEN],
    ) -> Result<&'a [u8], CryptoError> {
        let len = match (self.current.decrypt_len(ciphertext, out), &self.previous) {
            (Ok(len), _) => len,
            (Err(_), Some((key, until))) if now_ms < *until => key.decrypt_len(ciphertext, out)?,
            (Err(e), _) => return Err(e),
        };
        Ok(&out[..len])
    }
}

fn encode_pem(tag: &str, der: &[u8]) -> String {
    let block = pem::Pem::new(tag, der);
    pem::encode_config(
        &block,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The client side of registration: encrypts a request to the server's public key.
pub struct RsaPublicKey(OaepPublicEncryptingKey);

impl RsaPublicKey {
    /// Accepts a SubjectPublicKeyInfo PEM, trailing NULs (the padded certificate
    /// reply) included.
    pub fn from_pem(pem_bytes: &[u8]) -> Result<Self, CryptoError> {
        let end = pem_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(pem_bytes.len());
        let text = std::str::from_utf8(&pem_bytes[..end])
            .map_err(|_| CryptoError::Pem("not UTF-8".into()))?;
        let block = pem::parse(text).map_err(|e| CryptoError::Pem(e.to_string()))?;
        if block.tag() != "PUBLIC KEY" {
            return Err(CryptoError::Pem(format!(
                "expected PUBLIC KEY, found {:?}",
                block.tag()
            )));
        }
        let key = PublicEncryptingKey::from_der(block.contents())
            .map_err(|e| CryptoError::KeyRejected(e.to_string()))?;
        OaepPublicEncryptingKey::new(key)
            .map(RsaPublicKey)
            .map_err(|e| CryptoError::KeyRejected(e.to_string()))
    }

    pub fn ciphertext_len(&self) -> usize {
        self.0.ciphertext_size()
    }

    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut out = vec![0u8; self.ciphertext_len()];
        let len = self
            .0
            .encrypt(&OAEP_SHA1_MGF1SHA1, plaintext, &mut out, None)
            .map_err(|e| CryptoError::KeyRejected(e.to_string()))?
            .len();
        out.truncate(len);
        Ok(out)
    }
}

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

/// Fills an array from the system CSPRNG.
pub fn random<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    rand::fill(&mut out).map_err(|_| CryptoError::Random)?;
    Ok(out)
}

/// A UUIDv4 from the system CSPRNG.
pub fn random_uuid() -> Result<Uuid, CryptoError> {
    Ok(uuid::Builder::from_random_bytes(random()?).into_uuid())
}

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
    pub fn replay_key(&self, request: &RegisterRequest) -> ReplayKey {
        let tag = hmac::sign(&self.replay, &request.to_bytes());
        ReplayKey(tag.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }

    /// Seals a node key with AES-256-GCM. Not bound to the node id: the store picks the
    /// final id inside its atomic call, after sealing.
    pub fn seal_node_key(&self, key: &NodeKey) -> Result<SealedNodeKey, CryptoError> {
        let nonce_bytes: [u8; aead::NONCE_LEN] = random()?;
        let mut in_out = key.0.to_vec();
        self.seal
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce_bytes),
                aead::Aad::from(SEAL_AAD),
                &mut in_out,
            )
            .map_err(|_| CryptoError::Random)?;
        let mut sealed = nonce_bytes.to_vec();
        sealed.extend_from_slice(&in_out);
        Ok(SealedNodeKey(sealed))
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
    fn aes_cbc_round_trips() {
        let key = NodeKey([3; 32]);
        let mut data = [0x11u8; 32];
        aes_cbc_encrypt(&key, [9; 16], &mut data);
        assert_ne!(data, [0x11; 32]);
        aes_cbc_decrypt(&key, [9; 16], &mut data);
        assert_eq!(data, [0x11; 32]);
    }

    #[test]
    fn sealed_node_keys_open_only_under_their_storage_key() {
        let storage = StorageKey::from_bytes(&[1; 32]);
        let key = NodeKey([42; 32]);
        let sealed = storage.seal_node_key(&key).unwrap();
        assert_eq!(sealed.0.len(), 12 + 32 + 16);
        assert_ne!(
            storage.seal_node_key(&key).unwrap(),
            sealed,
            "fresh nonce each time"
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

    #[test]
    fn random_uuids_are_version_4() {
        let id = random_uuid().unwrap();
        assert_eq!(id.get_version_num(), 4);
        assert_ne!(id, random_uuid().unwrap());
    }
}
