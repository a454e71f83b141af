//! Sealed payloads (schemas/envelope.md "Sealed payloads"): a request sealed to the
//! server's HPKE key (RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
//! AES-256-GCM), its header as the associated data, and the reply sealed under keys
//! both sides export from that request's context. Functions on bytes: randomness (the
//! key's and the sender's) comes in as arguments.

use std::convert::Infallible;
use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};

/// The KEM identifier the `Keys` reply announces.
pub const KEM_ID: u16 = 0x0020;
/// The encapsulated key that leads a sealed request's payload.
pub const ENC_LEN: usize = 32;
/// The AES-GCM tag that ends every sealed payload.
pub const TAG_LEN: usize = 16;
/// An HPKE public (and private) key of this suite.
pub const KEY_LEN: usize = 32;

const INFO: &[u8] = b"registrar/seal/v1";
const REPLY_KEY: &[u8] = b"registrar/seal/reply-key/v1";
const REPLY_NONCE: &[u8] = b"registrar/seal/reply-nonce/v1";

type Kem = X25519HkdfSha256;

/// Why a sealed payload did not open. Deliberately without detail: every failure
/// reads the same (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("sealed payload does not open")]
    Open,
    #[error("not an X25519 public key")]
    PublicKey,
}

/// The payload length of a request or reply sealing `plaintext_len` bytes.
pub fn sealed_request_len(plaintext_len: usize) -> usize {
    ENC_LEN + plaintext_len + TAG_LEN
}

pub fn sealed_reply_len(plaintext_len: usize) -> usize {
    plaintext_len + TAG_LEN
}

/// `info`: what a sealed request is for (its flow and kind), so a sealed payload
/// cannot be replayed under another kind.
fn info(flow: u8, kind: u8) -> [u8; INFO.len() + 2] {
    let mut out = [0u8; INFO.len() + 2];
    out[..INFO.len()].copy_from_slice(INFO);
    out[INFO.len()] = flow;
    out[INFO.len() + 1] = kind;
    out
}

/// The server's HPKE key pair, made once in the data dir. Debug shows the public half.
pub struct SealKey {
    private: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; KEY_LEN],
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealKey(public {})", hex::encode(self.public))
    }
}

impl SealKey {
    /// The key pair derived from 32 random bytes (RFC 9180 DeriveKeyPair).
    pub fn derive(ikm: &[u8; 32]) -> SealKey {
        let (private, public) = Kem::derive_keypair(ikm);
        SealKey {
            public: public.to_bytes().into(),
            private,
        }
    }

    /// From the private key's 32 bytes as [`SealKey::private_bytes`] wrote them.
    pub fn from_private_bytes(bytes: &[u8]) -> Result<SealKey, SealError> {
        let private =
            <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes).map_err(|_| SealError::PublicKey)?;
        let public = <Kem as hpke::Kem>::sk_to_pk(&private);
        Ok(SealKey {
            public: public.to_bytes().into(),
            private,
        })
    }

    /// The private key, for the data dir file (mode 0600). Never logged.
    pub fn private_bytes(&self) -> [u8; KEY_LEN] {
        self.private.to_bytes().into()
    }

    pub fn public_key(&self) -> [u8; KEY_LEN] {
        self.public
    }

    /// Opens a sealed request of `flow` and `kind`: `header` is its 16-byte header as it
    /// arrived (the associated data), `payload` is `enc ‖ ciphertext ‖ tag`. Gives the
    /// plaintext, and what seals the reply.
    pub fn open(
        &self,
        flow: u8,
        kind: u8,
        header: &[u8],
        payload: &[u8],
    ) -> Result<(Vec<u8>, ReplySealer), SealError> {
        let (enc, ciphertext) = payload.split_at_checked(ENC_LEN).ok_or(SealError::Open)?;
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(|_| SealError::Open)?;
        let mut ctx = hpke::setup_receiver::<AesGcm256, HkdfSha256, Kem>(
            &OpModeR::Base,
            &self.private,
            &enc,
            &info(flow, kind),
        )
        .map_err(|_| SealError::Open)?;
        let plaintext = ctx.open(ciphertext, header).map_err(|_| SealError::Open)?;
        let mut key = [0u8; 32];
        let mut nonce = [0u8; 12];
        ctx.export(REPLY_KEY, &mut key)
            .and_then(|()| ctx.export(REPLY_NONCE, &mut nonce))
            .map_err(|_| SealError::Open)?;
        Ok((plaintext, ReplySealer(ReplyKey { key, nonce })))
    }
}

/// The reply key and nonce both sides export from one request's context: each request
/// has its own, so a retry never reuses one.
struct ReplyKey {
    key: [u8; 32],
    nonce: [u8; 12],
}

impl ReplyKey {
    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.key).expect("a 32-byte key"))
    }
}

impl Drop for ReplyKey {
    fn drop(&mut self) {
        self.key.fill(0);
    }
}

/// Seals the reply to one opened request (server side).
pub struct ReplySealer(ReplyKey);

impl fmt::Debug for ReplySealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplySealer(..)")
    }
}

impl ReplySealer {
    /// `ciphertext ‖ tag` of `plaintext` under the reply's 16-byte `header` (with the
    /// sealed flag and the sealed length) as the associated data.
    pub fn seal(&self, header: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = plaintext.to_vec();
        self.0
            .aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(self.0.nonce),
                Aad::from(header),
                &mut out,
            )
            .expect("AES-GCM seals any length the envelope carries");
        out
    }
}

/// Opens the reply to one sealed request (client side).
pub struct ReplyOpener(ReplyKey);

impl fmt::Debug for ReplyOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplyOpener(..)")
    }
}

impl ReplyOpener {
    pub fn open(&self, header: &[u8], payload: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut buf = payload.to_vec();
        let plain = self
            .0
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(self.0.nonce),
                Aad::from(header),
                &mut buf,
            )
            .map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

/// Seals a request of `flow` and `kind` to the server's public key (client side):
/// `header` is the 16-byte header it will be sent with (sealed flag set, length
/// [`sealed_request_len`]). `seed` is 32 random bytes: the sender's ephemeral key comes
/// from them. Gives the payload and what opens the reply.
pub fn seal_request(
    server_key: &[u8; KEY_LEN],
    flow: u8,
    kind: u8,
    header: &[u8],
    plaintext: &[u8],
    seed: [u8; 32],
) -> Result<(Vec<u8>, ReplyOpener), SealError> {
    let public =
        <Kem as hpke::Kem>::PublicKey::from_bytes(server_key).map_err(|_| SealError::PublicKey)?;
    let mut rng = SeededRng::new(seed);
    let (enc, mut ctx) = hpke::setup_sender_with_rng::<AesGcm256, HkdfSha256, Kem>(
        &OpModeS::Base,
        &public,
        &info(flow, kind),
        &mut rng,
    )
    .map_err(|_| SealError::PublicKey)?;
    let sealed = ctx.seal(plaintext, header).map_err(|_| SealError::Open)?;
    let mut key = [0u8; 32];
    let mut nonce = [0u8; 12];
    ctx.export(REPLY_KEY, &mut key)
        .and_then(|()| ctx.export(REPLY_NONCE, &mut nonce))
        .map_err(|_| SealError::Open)?;
    let mut payload = enc.to_bytes().to_vec();
    payload.extend_from_slice(&sealed);
    Ok((payload, ReplyOpener(ReplyKey { key, nonce })))
}

/// The randomness the sender's key needs, expanded from a seed the caller drew from
/// the operating system (HMAC-SHA256 in counter mode): the crypto stays a function of
/// its inputs, and a test can fix them.
struct SeededRng {
    key: hmac::Key,
    counter: u64,
    block: [u8; 32],
    used: usize,
}

impl SeededRng {
    fn new(seed: [u8; 32]) -> Self {
        SeededRng {
            key: hmac::Key::new(hmac::HMAC_SHA256, &seed),
            counter: 0,
            block: [0; 32],
            used: 32,
        }
    }
}

impl rand_core::TryRng for SeededRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for byte in dst {
            if self.used == self.block.len() {
                let tag = hmac::sign(&self.key, &self.counter.to_be_bytes());
                self.block.copy_from_slice(tag.as_ref());
                self.counter += 1;
                self.used = 0;
            }
            *byte = self.block[self.used];
            self.used += 1;
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for SeededRng {}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: [u8; 16] = *b"RG\x01\x02\x02\x00\x01\x00\x00\x00\x00\x07\x00\x00\x00\x40";

    #[test]
    fn a_sealed_request_opens_and_its_reply_opens_on_the_other_side() {
        let server = SealKey::derive(&[7; 32]);
        let (payload, opener) =
            seal_request(&server.public_key(), 2, 2, &HEADER, b"hello", [9; 32]).unwrap();
        assert_eq!(payload.len(), sealed_request_len(5));
        let (plain, sealer) = server.open(2, 2, &HEADER, &payload).unwrap();
        assert_eq!(plain, b"hello");
        let reply_header = [1u8; 16];
        let reply = sealer.seal(&reply_header, b"certificate");
        assert_eq!(reply.len(), sealed_reply_len(11));
        assert_eq!(opener.open(&reply_header, &reply).unwrap(), b"certificate");
        // The reply's header is bound too.
        assert_eq!(opener.open(&[2u8; 16], &reply), Err(SealError::Open));
    }

    #[test]
    fn the_header_flow_kind_and_key_are_bound() {
        let server = SealKey::derive(&[7; 32]);
        let (payload, _) =
            seal_request(&server.public_key(), 2, 2, &HEADER, b"hello", [9; 32]).unwrap();
        let mut other_header = HEADER;
        other_header[11] ^= 1;
        assert!(server.open(2, 2, &other_header, &payload).is_err());
        assert!(
            server.open(2, 3, &HEADER, &payload).is_err(),
            "another kind"
        );
        assert!(
            server.open(3, 2, &HEADER, &payload).is_err(),
            "another flow"
        );
        assert!(
            SealKey::derive(&[8; 32])
                .open(2, 2, &HEADER, &payload)
                .is_err()
        );
        for cut in [0, 1, ENC_LEN, ENC_LEN + TAG_LEN - 1, payload.len() - 1] {
            assert!(
                server.open(2, 2, &HEADER, &payload[..cut]).is_err(),
                "{cut}"
            );
        }
        let mut flipped = payload.clone();
        flipped[ENC_LEN + 1] ^= 0x80;
        assert!(server.open(2, 2, &HEADER, &flipped).is_err());
    }

    #[test]
    fn keys_survive_their_file_and_sealing_is_a_function_of_its_inputs() {
        let server = SealKey::derive(&[7; 32]);
        let again = SealKey::from_private_bytes(&server.private_bytes()).unwrap();
        assert_eq!(again.public_key(), server.public_key());
        let seal = |seed| {
            seal_request(&server.public_key(), 2, 2, &HEADER, b"x", seed)
                .unwrap()
                .0
        };
        assert_eq!(seal([1; 32]), seal([1; 32]));
        assert_ne!(seal([1; 32]), seal([2; 32]));
        assert!(SealKey::from_private_bytes(&[1; 31]).is_err());
    }

    /// A fixed vector: this server key, this seed, this header and plaintext give these
    /// bytes (tests/vectors/seal/), so an independent client can check its sealing.
    #[test]
    fn the_sealing_vector_is_reproduced() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/seal");
        let read = |name: &str| {
            hex::decode(std::fs::read_to_string(dir.join(name)).unwrap().trim()).unwrap()
        };
        let server = SealKey::from_private_bytes(&read("server_private_key.hex")).unwrap();
        assert_eq!(server.public_key().to_vec(), read("server_public_key.hex"));
        let header = read("request_header.hex");
        let seed: [u8; 32] = read("sender_seed.hex").try_into().unwrap();
        let (payload, opener) = seal_request(
            &server.public_key(),
            2,
            2,
            &header,
            &read("request_plaintext.hex"),
            seed,
        )
        .unwrap();
        assert_eq!(payload, read("request_payload.hex"));
        let (plain, sealer) = server.open(2, 2, &header, &payload).unwrap();
        assert_eq!(plain, read("request_plaintext.hex"));
        let reply_header = read("reply_header.hex");
        let reply = sealer.seal(&reply_header, &read("reply_plaintext.hex"));
        assert_eq!(reply, read("reply_payload.hex"));
        assert_eq!(
            opener.open(&reply_header, &reply).unwrap(),
            read("reply_plaintext.hex")
        );
    }
}
