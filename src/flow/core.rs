//! Flow 0 (core): `Hello` tells a device what this server speaks and which key it
//! signs with; `Keys` gives its HPKE key for sealed payloads, signed by that key. No
//! store, no clock; the replies are built once at start-up.

use std::convert::Infallible;

use bytes::Bytes;

use super::{Classified, Context, EnvelopeFlow, Failure, Offload, Reply};
use crate::core::crypto::CryptoError;
use crate::core::crypto::ecdsa::SigningKey;
use crate::core::crypto::seal;
use crate::wire::DecodeError;
use crate::wire::core::{HELLO, HelloReply, KEYS, KeysReply};
use crate::wire::envelope::{Flow, Kind, Status};

/// A core request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreRequest {
    Hello,
    Keys,
}

pub struct CoreFlow {
    hello: Bytes,
    keys: Bytes,
}

impl CoreFlow {
    /// `flows`: what this listener serves (core included); `signing`: the server's
    /// signing key; `seal_public`: its HPKE public key.
    pub fn new(
        flows: &[Flow],
        max_payload: u32,
        signing: &SigningKey,
        seal_public: &[u8; seal::KEY_LEN],
    ) -> Result<CoreFlow, CryptoError> {
        let hello = HelloReply {
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            flows: flows.to_vec(),
            max_payload,
            signing_key: signing.public_key_der().to_vec(),
        };
        let keys = KeysReply {
            signing_key: signing.public_key_der().to_vec(),
            kem_id: seal::KEM_ID,
            hpke_public_key: seal_public.to_vec(),
            signature: signing.sign(&KeysReply::signed_message(seal::KEM_ID, seal_public))?,
        };
        Ok(CoreFlow {
            hello: Bytes::from(hello.to_bytes()),
            keys: Bytes::from(keys.to_bytes()),
        })
    }
}

impl EnvelopeFlow for CoreFlow {
    const FLOW: Flow = Flow::CORE;
    const NAME: &'static str = "core";
    type Request = CoreRequest;
    type Error = Infallible;

    fn parse(&self, kind: Kind, payload: &[u8]) -> Result<CoreRequest, DecodeError> {
        match kind {
            // Zero bytes pad a request over UDP up to a third of its reply's size.
            HELLO | KEYS if payload.iter().any(|&b| b != 0) => {
                Err(DecodeError::Invalid { field: "padding" })
            }
            HELLO => Ok(CoreRequest::Hello),
            KEYS => Ok(CoreRequest::Keys),
            other => Err(DecodeError::Unknown {
                field: "kind",
                value: other.0.into(),
            }),
        }
    }

    /// A Hello and Keys are answered from memory.
    fn rate_limited(&self, _kind: Kind) -> bool {
        false
    }

    fn subject(_request: &CoreRequest) -> Option<String> {
        None
    }

    async fn handle<O: Offload>(
        &self,
        request: CoreRequest,
        _ctx: Context<'_, O>,
    ) -> Result<Reply, Failure<Infallible>> {
        match request {
            CoreRequest::Hello => Ok(Reply {
                status: Status::OK,
                payload: self.hello.clone(),
                outcome: "hello",
            }),
            CoreRequest::Keys => Ok(Reply {
                status: Status::OK,
                payload: self.keys.clone(),
                outcome: "keys",
            }),
        }
    }

    fn classify(error: &Infallible) -> Classified {
        match *error {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Inline;

    impl Offload for Inline {
        async fn run<T, W>(&self, work: W) -> Result<T, super::super::Refusal>
        where
            T: Send + 'static,
            W: FnOnce() -> T + Send + 'static,
        {
            Ok(work())
        }
    }

    #[tokio::test]
    async fn hello_answers_version_flows_limit_and_key() {
        let signing = SigningKey::generate().unwrap();
        let core = CoreFlow::new(&[Flow::CORE, Flow::PUBKEY], 4096, &signing, &[7; 32]).unwrap();
        let request = core.parse(HELLO, &[]).unwrap();
        let ctx = Context {
            now_ms: 0,
            random: [0; 32],
            offload: &Inline,
        };
        let reply = core.handle(request, ctx).await.unwrap();
        assert_eq!(reply.status, Status::OK);
        let hello = HelloReply::parse(&reply.payload).unwrap();
        assert_eq!(hello.server_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hello.flows, [Flow::CORE, Flow::PUBKEY]);
        assert_eq!(
            (hello.max_payload, hello.signing_key.as_slice()),
            (4096, signing.public_key_der())
        );
        assert_eq!(
            core.parse(HELLO, &[0; 64]),
            Ok(CoreRequest::Hello),
            "padding"
        );
        assert!(core.parse(HELLO, &[0, 1]).is_err());
        assert!(core.parse(Kind(3), &[]).is_err());
        // Keys: the HPKE key, signed by the signing key.
        let request = core.parse(KEYS, &[0; 16]).unwrap();
        let ctx = Context {
            now_ms: 0,
            random: [0; 32],
            offload: &Inline,
        };
        let reply = core.handle(request, ctx).await.unwrap();
        let keys = KeysReply::parse(&reply.payload).unwrap();
        assert_eq!(keys.kem_id, 0x0020);
        assert_eq!(keys.hpke_public_key, [7; 32]);
        crate::core::crypto::ecdsa::verify(
            signing.public_key_der(),
            &KeysReply::signed_message(0x0020, &[7; 32]),
            &keys.signature,
        )
        .expect("signed by the signing key");
    }
}
