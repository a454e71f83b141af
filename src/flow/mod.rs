//! Business rules, one module per flow: validate → one atomic store call → reply. No
//! sockets, no clock, no randomness of their own: the server hands each request its
//! time, its random bytes and the executor for private-key work ([`Context`]).
//!
//! Every flow of the envelope port implements [`EnvelopeFlow`]; the server serves them
//! all on one path (admission, timing, the request log line, metrics, the UDP rules),
//! and a flow says only what is its own: its flow number, how to parse its kinds, what
//! to do, and — in ONE function, [`EnvelopeFlow::classify`] — what each of its errors
//! means on the wire. Refusals under load (429, 503) are the server's ([`Refusal`]),
//! never a variant of a flow's error enum.

pub mod core;
pub mod ijam;
pub mod pubkey;

use std::future::Future;

use bytes::Bytes;

use crate::wire::DecodeError;
use crate::wire::envelope::{Flow, Kind, Status};

/// A request the server refused for its own reasons, before or during the flow's
/// work: the same for every flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The crypto queue was full or standing: 503 over TCP, dropped over UDP.
    #[error("overloaded: crypto queue full or standing")]
    Overloaded,
    /// The source spent its budget: 429.
    #[error("rate limited")]
    RateLimited,
}

/// How a request failed: refused by the server, or failed by its flow.
#[derive(Debug)]
pub enum Failure<E> {
    Refused(Refusal),
    Flow(E),
}

impl<E> From<Refusal> for Failure<E> {
    fn from(refusal: Refusal) -> Self {
        Failure::Refused(refusal)
    }
}

/// `?` on a flow's own `Result` inside a function that may also be refused.
pub trait OrRefused<T, E> {
    fn flow_err(self) -> Result<T, Failure<E>>;
}

impl<T, E> OrRefused<T, E> for Result<T, E> {
    fn flow_err(self) -> Result<T, Failure<E>> {
        self.map_err(Failure::Flow)
    }
}

/// Where private-key and signature work runs (the server's crypto pool): off the
/// I/O threads, and refused at once when the queue is full.
pub trait Offload: Send + Sync {
    fn run<T, W>(&self, work: W) -> impl Future<Output = Result<T, Refusal>> + Send
    where
        T: Send + 'static,
        W: FnOnce() -> T + Send + 'static;
}

/// What the server gives a flow with each request.
pub struct Context<'a, O> {
    /// The request's arrival, ms since the Unix epoch.
    pub now_ms: i64,
    /// Fresh random bytes, the request's own (nonces, ids).
    pub random: [u8; 32],
    pub offload: &'a O,
}

/// A success: the reply's status and payload, and a word for the log and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    pub payload: Bytes,
    pub outcome: &'static str,
}

/// What a flow's error means: its status on the wire, a word for the log and metrics,
/// and whether the store failed (503: counted as a store error) rather than the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    pub status: Status,
    pub outcome: &'static str,
    pub store_failed: bool,
    /// The store could not tell whether the request took effect: no reply at all (a
    /// TCP connection is closed), never an error that could hide a write.
    pub withhold: bool,
}

/// A flow served on the envelope port.
pub trait EnvelopeFlow: Send + Sync + 'static {
    /// The flow number in the header.
    const FLOW: Flow;
    /// The flow's name in logs and metrics.
    const NAME: &'static str;
    type Request: Send + 'static;
    type Error: std::error::Error + Send + 'static;

    /// The request of `kind` in `payload`.
    fn parse(&self, kind: Kind, payload: &[u8]) -> Result<Self::Request, DecodeError>;

    /// Whether a request of `kind` spends its source's budget (`--rate-per-source`):
    /// work worth limiting (a signature check, a store call).
    fn rate_limited(&self, kind: Kind) -> bool;

    /// Whether requests of `kind` must be sealed (flags bit 0, schemas/envelope.md
    /// "Sealed payloads"): the server opens them before [`EnvelopeFlow::parse`] and
    /// seals a 2xx reply with a payload; an unsealed one, or a sealed request of a kind
    /// that is not, gets 400.
    fn sealed(&self, _kind: Kind) -> bool {
        false
    }

    /// What the request names, for the log line (a device id); never a secret.
    fn subject(request: &Self::Request) -> Option<String>;

    fn handle<O: Offload>(
        &self,
        request: Self::Request,
        ctx: Context<'_, O>,
    ) -> impl Future<Output = Result<Reply, Failure<Self::Error>>> + Send;

    /// The one place this flow's errors become wire statuses.
    fn classify(error: &Self::Error) -> Classified;
}
