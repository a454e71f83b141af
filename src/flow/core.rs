//! Flow 0 (core): `Hello` tells a device what this server speaks and which key it
//! signs with. No store, no clock; the reply is built once at start-up.

use bytes::Bytes;

use crate::wire::DecodeError;
use crate::wire::core::{HELLO, HelloReply};
use crate::wire::envelope::{Flow, Kind, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    #[error("malformed request: {0}")]
    Malformed(DecodeError),
}

impl CoreError {
    /// The one place core errors become wire statuses.
    pub fn status(&self) -> Status {
        match self {
            CoreError::Malformed(_) => Status::BAD_REQUEST,
        }
    }

    pub fn outcome(&self) -> &'static str {
        match self {
            CoreError::Malformed(_) => "malformed",
        }
    }
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

    /// A core request: the reply status and payload.
    pub fn handle(&self, kind: Kind, payload: &[u8]) -> Result<(Status, Bytes), CoreError> {
        match kind {
            HELLO if payload.is_empty() => Ok((Status::OK, self.hello.clone())),
            HELLO => Err(CoreError::Malformed(DecodeError::Length {
                expected: 0,
                got: payload.len(),
            })),
            other => Err(CoreError::Malformed(DecodeError::Unknown {
                field: "kind",
                value: other.0.into(),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_answers_version_flows_limit_and_key() {
        let core = CoreFlow::new(&[Flow::CORE, Flow::PUBKEY], 4096, &[1, 2, 3]);
        let (status, payload) = core.handle(HELLO, &[]).unwrap();
        assert_eq!(status, Status::OK);
        let hello = HelloReply::parse(&payload).unwrap();
        assert_eq!(hello.server_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hello.flows, [Flow::CORE, Flow::PUBKEY]);
        assert_eq!(
            (hello.max_payload, hello.signing_key),
            (4096, vec![1, 2, 3])
        );
        assert_eq!(
            core.handle(HELLO, &[0]).unwrap_err().status(),
            Status::BAD_REQUEST
        );
        assert_eq!(
            core.handle(Kind(2), &[]).unwrap_err().status(),
            Status::BAD_REQUEST
        );
    }
}
