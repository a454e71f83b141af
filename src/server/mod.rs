//! tokio glue: listeners on already-bound sockets ([`listen`]), the ijam ports
//! ([`ijam`]) and the envelope port ([`envelope`]), admission before any expensive
//! work ([`admission`], [`pool`]), and what each request leaves behind: one log line
//! and its metrics ([`finish`], [`metrics`]). All of it once, for every flow.
//!
//! Only a dead socket ends a listener: a bad peer is logged and dropped.

pub mod admission;
pub mod connections;
pub mod envelope;
pub mod ijam;
pub mod listen;
pub mod metrics;
pub mod pool;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::flow::Refusal;
pub use ijam::{IjamServer, IjamSockets};
pub use listen::{BindError, ConnectionLimit, UDP_RECEIVE_BUFFER};

/// Connections one source address may hold: a NAT gateway in front of a few hundred
/// devices registering at once still fits.
pub const DEFAULT_CONNECTIONS_PER_SOURCE: usize = 512;

/// State changes a node may make per second, sustained, and at once: a node changes
/// state a few times a day; a replayed frame must not flip it at line rate.
pub const DEFAULT_STATE_RATE_PER_NODE: f64 = 1.0;
pub const DEFAULT_STATE_BURST_PER_NODE: u32 = 20;

/// Request bytes all connections together may hold in their buffers.
pub const DEFAULT_MAX_BUFFERED: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A TCP connection is closed this long after it opened or after its last request
    /// that did work (a registration, a state change, a signed request), whatever it
    /// sent meanwhile: silence, a dribbled frame, Hellos or certificate fetches.
    pub idle_timeout: Duration,
    /// The table of open TCP connections across all ports (caps, eviction, the buffer
    /// budget). Every server built from clones of one config shares it.
    pub connections: ConnectionLimit,
    /// Undecryptable or malformed frames in a row before a TCP connection is closed.
    pub max_bad_frames: u32,
    /// UDP requests in flight per port; datagrams beyond it are dropped.
    pub max_udp_in_flight: usize,
    /// Requests per second per source address (0: no limit), and the burst.
    pub rate_per_source: f64,
    pub burst: u32,
    /// State changes per second per node (0: no limit), and the burst.
    pub state_rate_per_node: f64,
    pub state_burst_per_node: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            idle_timeout: Duration::from_secs(30),
            connections: ConnectionLimit::new(
                10_000,
                DEFAULT_CONNECTIONS_PER_SOURCE,
                DEFAULT_MAX_BUFFERED,
            ),
            max_bad_frames: 4,
            max_udp_in_flight: 4096,
            rate_per_source: 100.0,
            burst: 1000,
            state_rate_per_node: DEFAULT_STATE_RATE_PER_NODE,
            state_burst_per_node: DEFAULT_STATE_BURST_PER_NODE,
        }
    }
}

/// What a request arrived over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a request came in, for its log line and metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrival {
    /// The flow's name in metrics (`ijam_register`, `pubkey`, …).
    pub flow: &'static str,
    /// The port's name in the log (`reg`, `state`, `envelope`).
    pub port: &'static str,
    pub transport: Transport,
    pub peer: SocketAddr,
    /// A cheap request (a Hello, a certificate): served, it logs at debug, as one
    /// costs the sender nothing to repeat.
    pub quiet: bool,
}

/// Whose doing a failure was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The peer's: a bad request, a used credential.
    Peer,
    /// The store's: counted as a store error; the store itself logs once when it goes
    /// and once when it is back, and the requests it failed are summed at WARN.
    Store,
    /// This listener's own (its keys, its randomness): the operator must see it.
    Server,
}

/// How a request ended.
pub(crate) enum Ending<'a> {
    /// Answered with success.
    Served { outcome: &'static str },
    /// Failed by the flow, for the reason `fault` says.
    Failed {
        outcome: &'static str,
        error: &'a dyn fmt::Display,
        fault: Fault,
    },
    /// Refused under load: one at debug each, summed at WARN once a second
    /// ([`metrics::report`]), so a flood cannot drown the log.
    Refused(Refusal),
}

impl Ending<'_> {
    pub fn outcome(&self) -> &'static str {
        match self {
            Ending::Served { outcome } | Ending::Failed { outcome, .. } => outcome,
            Ending::Refused(Refusal::Overloaded) => "shed",
            Ending::Refused(Refusal::RateLimited) => "rate_limited",
        }
    }
}

/// The one log line and the metrics of a request: every port and flow ends here.
/// `subject` names what the request was about (a node, a device), never a secret.
///
/// What any source can cause at line rate stays out of the log one by one: a served
/// cheap request, a failure of the peer's or the store's making, a refusal are `debug`
/// lines, and [`metrics::report`] sums the failures and refusals once a second. A
/// served request that did work is an INFO line (its rate is the per-source budget);
/// a failure of this listener's own is a WARN line.
pub(crate) fn finish(at: Arrival, subject: Option<&str>, latency: Duration, ending: Ending<'_>) {
    let Arrival {
        flow,
        port,
        transport,
        peer,
        quiet,
    } = at;
    let outcome = ending.outcome();
    let latency_us = latency.as_micros() as u64;
    match &ending {
        Ending::Served { .. } if quiet => {
            debug!(flow, port, %transport, %peer, outcome, subject, latency_us)
        }
        Ending::Served { .. } => {
            info!(flow, port, %transport, %peer, outcome, subject, latency_us)
        }
        Ending::Failed {
            error,
            fault: Fault::Server,
            ..
        } => {
            warn!(flow, port, %transport, %peer, outcome, subject, error = %error, latency_us)
        }
        Ending::Failed { error, fault, .. } => {
            debug!(flow, port, %transport, %peer, outcome, subject, error = %error, latency_us);
            metrics::failed(flow, outcome, peer.ip(), *fault == Fault::Store);
            if *fault == Fault::Store {
                metrics::store_error(flow);
            }
        }
        Ending::Refused(refusal) => {
            debug!(flow, port, %transport, %peer, outcome, subject, error = %refusal, latency_us);
            match refusal {
                Refusal::Overloaded => metrics::shed(flow, transport),
                Refusal::RateLimited => metrics::rate_limited(flow, transport),
            }
        }
    }
    metrics::request(flow, transport, outcome, latency);
}

/// Something on a port that was no request (bytes that are no frame, a header or flow
/// not served, a wrong certificate magic): a `debug` line, counted for the summary and
/// the metrics.
pub(crate) fn rejected(
    flow: &'static str,
    port: &'static str,
    transport: Transport,
    peer: SocketAddr,
    outcome: &'static str,
    error: &dyn fmt::Display,
) {
    debug!(flow, port, %transport, %peer, outcome, error = %error);
    metrics::failed(flow, outcome, peer.ip(), false);
    metrics::request(flow, transport, outcome, Duration::ZERO);
}
