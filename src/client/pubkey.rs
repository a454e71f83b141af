//! The device side of the envelope and the `pubkey` flow, sans-I/O: the frames a
//! device sends and how it reads the replies (schemas/envelope.md, schemas/pubkey.md).
//! `registrar-node pubkey`, its load tool and the test suites all build frames here.
//!
//! ```no_run
//! use registrar::client::pubkey::{self, DeviceKey};
//! use registrar::wire::pubkey::DeviceId;
//! let key = DeviceKey::generate().unwrap();
//! let id = DeviceId::new([7; 16]).unwrap();
//! let frame: Vec<u8> = pubkey::register_frame(1, id, &key).unwrap(); // send it, read one frame back
//! ```

use crate::core::crypto::CryptoError;
use crate::wire::core::HELLO;
use crate::wire::envelope::{self, BadFrame, Flow, Header, Kind};
use crate::wire::pubkey::{
    ATTEST, AttestRequest, CHALLENGE, ChallengeRequest, DeviceId, Nonce, P256Spki, REGISTER,
    RegisterRequest, Signature,
};

/// A device's ECDSA P-256 key pair (PKCS#8 PEM on disk).
pub use crate::core::crypto::ecdsa::SigningKey as DeviceKey;

/// A request frame of any flow and kind.
pub fn request_frame(flow: Flow, kind: Kind, request_id: u32, payload: &[u8]) -> Vec<u8> {
    envelope::to_vec(&Header::request(flow, kind, request_id), payload)
}

/// Core Hello (flow 0, kind 1, empty payload).
pub fn hello_frame(request_id: u32) -> Vec<u8> {
    request_frame(Flow::CORE, HELLO, request_id, &[])
}

/// Zero bytes a Hello carries over UDP, so that its reply stays within 3x the request
/// (the UDP rules): 84 bytes in, up to 252 back.
pub const UDP_HELLO_PADDING: usize = 64;

/// A Hello padded with [`UDP_HELLO_PADDING`] zero bytes, as sent over UDP.
pub fn padded_hello_frame(request_id: u32) -> Vec<u8> {
    request_frame(Flow::CORE, HELLO, request_id, &[0; UDP_HELLO_PADDING])
}

/// A signed Register request: `key`'s SPKI under `device_id`, proven by a signature
/// over `"registrar/pubkey/register/v1" ‖ device_id ‖ spki`.
pub fn register_request(
    device_id: DeviceId,
    key: &DeviceKey,
) -> Result<RegisterRequest, CryptoError> {
    let spki = P256Spki::new(key.public_key_der())
        .map_err(|e| CryptoError::KeyRejected(format!("not a P-256 key: {e}")))?;
    let signature = key.sign(&RegisterRequest::signed_message(&device_id, &spki))?;
    Ok(RegisterRequest {
        device_id,
        spki,
        signature: Signature(signature),
    })
}

/// The whole Register frame (flow 1, kind 1). Each call signs afresh (ECDSA nonces are
/// random), so two frames for the same device differ in their signature bytes.
pub fn register_frame(
    request_id: u32,
    device_id: DeviceId,
    key: &DeviceKey,
) -> Result<Vec<u8>, CryptoError> {
    let request = register_request(device_id, key)?;
    Ok(request_frame(
        Flow::PUBKEY,
        REGISTER,
        request_id,
        &request.to_bytes(),
    ))
}

/// The Challenge frame (flow 1, kind 2).
pub fn challenge_frame(request_id: u32, device_id: DeviceId) -> Vec<u8> {
    let payload = ChallengeRequest { device_id }.to_bytes();
    request_frame(Flow::PUBKEY, CHALLENGE, request_id, &payload)
}

/// The Attest frame (flow 1, kind 3) for a nonce from a Challenge reply: a signature
/// over `"registrar/pubkey/attest/v1" ‖ nonce ‖ device_id`.
pub fn attest_frame(
    request_id: u32,
    device_id: DeviceId,
    nonce: Nonce,
    key: &DeviceKey,
) -> Result<Vec<u8>, CryptoError> {
    let signature = key.sign(&AttestRequest::signed_message(&device_id, &nonce))?;
    let request = AttestRequest {
        device_id,
        nonce,
        signature: Signature(signature),
    };
    Ok(request_frame(
        Flow::PUBKEY,
        ATTEST,
        request_id,
        &request.to_bytes(),
    ))
}

/// One reply frame (a whole UDP datagram, or one frame read off TCP): its header
/// and payload. Any payload length up to `max_payload` is accepted.
pub fn parse_reply(bytes: &[u8], max_payload: u32) -> Result<(Header, &[u8]), BadFrame> {
    envelope::parse_datagram(bytes, max_payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::crypto::ecdsa;
    use crate::wire::envelope::{DEFAULT_MAX_PAYLOAD, Status};
    use crate::wire::pubkey::Request;

    #[test]
    fn frames_parse_back_and_signatures_verify() {
        let key = DeviceKey::generate().unwrap();
        let id = DeviceId::new([5; 16]).unwrap();
        let frame = register_frame(42, id, &key).unwrap();
        let (h, payload) = parse_reply(&frame, DEFAULT_MAX_PAYLOAD).unwrap();
        assert_eq!(h, Header::request(Flow::PUBKEY, REGISTER, 42));
        let Request::Register(r) = Request::parse(h.kind, payload).unwrap() else {
            panic!("not a register request")
        };
        assert_eq!((r.device_id, &r.spki.0[..]), (id, key.public_key_der()));
        let msg = RegisterRequest::signed_message(&id, &r.spki);
        assert_eq!(
            ecdsa::verify(key.public_key_der(), &msg, &r.signature.0),
            Ok(())
        );

        let nonce = Nonce([9; 32]);
        let frame = attest_frame(43, id, nonce, &key).unwrap();
        let (h, payload) = parse_reply(&frame, DEFAULT_MAX_PAYLOAD).unwrap();
        let Request::Attest(a) = Request::parse(h.kind, payload).unwrap() else {
            panic!("not an attest request")
        };
        let msg = AttestRequest::signed_message(&id, &nonce);
        assert!(ecdsa::verify_registered(
            key.public_key_der(),
            &msg,
            &a.signature.0
        ));

        let challenge = challenge_frame(44, id);
        let (h, payload) = parse_reply(&challenge, 64).unwrap();
        assert_eq!((h.kind, payload), (CHALLENGE, &[5u8; 16][..]));
        let hello = hello_frame(45);
        let (h, payload) = parse_reply(&hello, 64).unwrap();
        assert_eq!(
            (h.flow, h.kind, h.status, payload.len()),
            (Flow::CORE, HELLO, Status::REQUEST, 0)
        );
    }
}
