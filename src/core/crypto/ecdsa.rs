//! ECDSA P-256 with SHA-256, DER signatures (aws-lc-rs): the server's signing key
//! (published by the core Hello), device keys on the client side, and the checks of
//! the `pubkey` flow. A verification costs about 50 µs: callers run it on the crypto
//! pool.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair, ParsedPublicKey,
    UnparsedPublicKey,
};

use super::CryptoError;

/// Why a public key or signature was refused. Small and `Copy`: the flow maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not a P-256 public key, or its point is not on the curve.
    #[error("not a valid P-256 public key")]
    Key,
    #[error("signature does not verify")]
    Signature,
}

/// Checks that `spki` (SubjectPublicKeyInfo DER) is a P-256 key whose point is on
/// the curve.
pub fn check_public_key(spki: &[u8]) -> Result<(), VerifyError> {
    ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, spki)
        .map(|_| ())
        .map_err(|_| VerifyError::Key)
}

/// Verifies a DER ECDSA-SHA256 signature over `message` under the P-256 key `spki`:
/// the key is checked first (`Key`), then the signature (`Signature`).
pub fn verify(spki: &[u8], message: &[u8], signature: &[u8]) -> Result<(), VerifyError> {
    let key = ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, spki).map_err(|_| VerifyError::Key)?;
    key.verify_sig(message, signature)
        .map_err(|_| VerifyError::Signature)
}

/// Verifies without telling a bad key from a bad signature (the key was checked when
/// it was registered).
pub fn verify_registered(spki: &[u8], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, spki)
        .verify(message, signature)
        .is_ok()
}

/// An ECDSA P-256 key pair: the server's signing key, or a device's key.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    spki: Vec<u8>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(P-256, ..)")
    }
}

impl SigningKey {
    pub fn generate() -> Result<SigningKey, CryptoError> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
            .map_err(|_| CryptoError::Random(crate::core::random::RandomError))?;
        Self::from_pair(pair)
    }

    pub fn from_pkcs8_der(der: &[u8]) -> Result<SigningKey, CryptoError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der)
            .map_err(|e| CryptoError::KeyRejected(e.to_string()))?;
        Self::from_pair(pair)
    }

    /// Loads a PKCS#8 PEM ("BEGIN PRIVATE KEY"), as `openssl genpkey -algorithm EC
    /// -pkeyopt ec_paramgen_curve:P-256` writes.
    pub fn from_pkcs8_pem(text: &str) -> Result<SigningKey, CryptoError> {
        let block = pem::parse(text).map_err(|e| CryptoError::Pem(e.to_string()))?;
        if block.tag() != "PRIVATE KEY" {
            return Err(CryptoError::Pem(format!(
                "expected a PKCS#8 \"PRIVATE KEY\" block, found {:?} \
                 (convert with `openssl pkcs8 -topk8 -nocrypt`)",
                block.tag()
            )));
        }
        Self::from_pkcs8_der(block.contents())
    }

    fn from_pair(pair: EcdsaKeyPair) -> Result<SigningKey, CryptoError> {
        let spki = pair
            .public_key()
            .as_der()
            .map_err(|e| CryptoError::KeyRejected(e.to_string()))?
            .as_ref()
            .to_vec();
        Ok(SigningKey { pair, spki })
    }

    /// PKCS#8 v1 PEM of the private key, for a 0600 file only.
    pub fn to_pkcs8_pem(&self) -> Result<String, CryptoError> {
        let doc = self
            .pair
            .to_pkcs8v1()
            .map_err(|e| CryptoError::KeyRejected(e.to_string()))?;
        Ok(super::rsa::encode_pem("PRIVATE KEY", doc.as_ref()))
    }

    /// SubjectPublicKeyInfo DER of the public key (91 bytes).
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    /// A DER ECDSA-SHA256 signature over `message` (randomised nonce).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.pair
            .sign(&SystemRandom::new(), message)
            .map(|sig| sig.as_ref().to_vec())
            .map_err(|_| CryptoError::Random(crate::core::random::RandomError))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::pubkey::{P256_SPKI_LEN, P256_SPKI_PREFIX};

    #[test]
    fn signatures_verify_under_their_key_only() {
        let key = SigningKey::generate().unwrap();
        let spki = key.public_key_der();
        assert_eq!(spki.len(), P256_SPKI_LEN);
        assert_eq!(&spki[..27], &P256_SPKI_PREFIX);
        let sig = key.sign(b"hello").unwrap();
        assert!(sig.len() <= 72 && sig[0] == 0x30);
        assert_eq!(verify(spki, b"hello", &sig), Ok(()));
        assert!(verify_registered(spki, b"hello", &sig));
        assert_eq!(verify(spki, b"hellO", &sig), Err(VerifyError::Signature));
        assert!(!verify_registered(spki, b"hellO", &sig));
        let other = SigningKey::generate().unwrap();
        assert_eq!(
            verify(other.public_key_der(), b"hello", &sig),
            Err(VerifyError::Signature)
        );
        assert_eq!(
            verify(spki, b"hello", &[0x30, 0]),
            Err(VerifyError::Signature)
        );
    }

    #[test]
    fn keys_off_the_curve_or_of_another_curve_are_refused() {
        let key = SigningKey::generate().unwrap();
        let mut spki = key.public_key_der().to_vec();
        assert_eq!(check_public_key(&spki), Ok(()));
        spki[90] ^= 1; // Y changed: (X, Y') is not on the curve.
        assert_eq!(check_public_key(&spki), Err(VerifyError::Key));
        assert_eq!(
            verify(&spki, b"m", &key.sign(b"m").unwrap()),
            Err(VerifyError::Key)
        );
        let mut zero = key.public_key_der().to_vec();
        zero[27..].fill(0);
        assert_eq!(check_public_key(&zero), Err(VerifyError::Key));
        assert_eq!(check_public_key(b"\x30\x00"), Err(VerifyError::Key));
    }

    #[test]
    fn pkcs8_pem_round_trips() {
        let key = SigningKey::generate().unwrap();
        let pem = key.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let again = SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(again.public_key_der(), key.public_key_der());
        let sig = again.sign(b"x").unwrap();
        assert_eq!(verify(key.public_key_der(), b"x", &sig), Ok(()));
        assert!(
            SigningKey::from_pkcs8_pem(
                "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n"
            )
            .is_err()
        );
    }
}
