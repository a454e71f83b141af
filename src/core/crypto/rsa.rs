//! The listener's RSA-OAEP key and its rotation ring, and the client side that
//! encrypts to it. OAEP with SHA-1 and MGF1-SHA-1 and an empty label, as the
//! upstream client encrypts.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA1_MGF1SHA1, OaepPrivateDecryptingKey, OaepPublicEncryptingKey,
    PrivateDecryptingKey, PublicEncryptingKey,
};

use super::CryptoError;

/// The certificate reply is at least this long: the C client reads exactly 800
/// bytes (schemas/ijam.md).
pub const CERT_REPLY_MIN_LEN: usize = 800;

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
        if certificate_reply.len() < CERT_REPLY_MIN_LEN {
            certificate_reply.resize(CERT_REPLY_MIN_LEN, 0);
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

pub(crate) fn encode_pem(tag: &str, der: &[u8]) -> String {
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
