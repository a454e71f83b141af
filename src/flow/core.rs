//! Flow 0 (core): `Hello` tells a device what this server speaks and which key it
//! signs with. No store, no clock; the reply is built once at start-up.

use std::convert::Infallible;

use bytes::Bytes;

use super::{Classified, Context, EnvelopeFlow, Failure, Offload, Reply};
use crate::wire::DecodeError;
use crate::wire::core::{HELLO, HelloReply};
use crate::wire::envelope::{Flow, Kind, Status};

/// A core request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreRequest {
    Hello,
}

pub struct CoreFlow {
    hello: Bytes,
}

impl CoreFlow {
    /// `flows`: what this listener serves (core included); `signing_key`: SPKI DER.
    pub fn new(flows: &[Flow], max_payload: u32, signing_key: &[u8]) -> CoreFlow {
        let reply = HelloReply {
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            flows: flows.to_vec(),
            max_payload,
            signing_key: signing_key.to_vec(),
        };
        CoreFlow {
            hello: Bytes::from(reply.to_bytes()),
        }
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
            HELLO if payload.iter().all(|&b| b == 0) => Ok(CoreRequest::Hello),
            HELLO => Err(DecodeError::Invalid { field: "padding" }),
            other => Err(DecodeError::Unknown {
                field: "kind",
                value: other.0.into(),
            }),
        }
    }

    /// A Hello is answered from memory.
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
        let core = CoreFlow::new(&[Flow::CORE, Flow::PUBKEY], 4096, &[1, 2, 3]);
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
            (hello.max_payload, hello.signing_key),
            (4096, vec![1, 2, 3])
        );
        assert_eq!(
            core.parse(HELLO, &[0; 64]),
            Ok(CoreRequest::Hello),
            "padding"
        );
        assert!(core.parse(HELLO, &[0, 1]).is_err());
        assert!(core.parse(Kind(2), &[]).is_err());
    }
}
