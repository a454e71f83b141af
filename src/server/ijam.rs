//! The ijam ports (schemas/ijam.md): certificate (TCP), registration and state (TCP
//! and UDP). Raw fixed-size frames, not the envelope; admission, the log line and the
//! metrics are the server's shared ones.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;
use uuid::Uuid;

use super::admission::{Admission, RateLimiter};
use super::listen::{
    BindError, Connection, DatagramPort, Wake, accept_loop, bind_pair, listen, serve_datagrams,
    wait_for_request,
};
use super::pool::CryptoPool;
use super::{Arrival, Ending, Fault, ServerConfig, Transport, finish, metrics, rejected};
use crate::core::{clock, random};
use crate::flow::ijam::{IjamError, IjamFlow, RegisterRandomness};
use crate::flow::{Offload, Refusal};
use crate::store::ijam::IjamStore;
use crate::wire::ijam::{
    self, CERT_REQUEST, REASON_BUSY, REASON_RATE_LIMITED, STATE_REQUEST_LEN, StateRequest,
};

/// The five sockets of the ijam flow, bound by the caller (tests bind port 0).
pub struct IjamSockets {
    pub cert: TcpListener,
    pub reg_tcp: TcpListener,
    pub reg_udp: UdpSocket,
    pub state_tcp: TcpListener,
    pub state_udp: UdpSocket,
}

impl IjamSockets {
    /// Binds all five; a reg or state port of 0 picks one free port for TCP and UDP.
    pub async fn bind(
        ip: std::net::IpAddr,
        cert_port: u16,
        reg_port: u16,
        state_port: u16,
    ) -> Result<Self, BindError> {
        let cert = listen(ip, cert_port).map_err(|source| BindError {
            port: "certificate port",
            option: "--cert-port",
            addr: (ip, cert_port).into(),
            source,
        })?;
        let (reg_tcp, reg_udp) = bind_pair(ip, reg_port, "registration port", "--reg-port").await?;
        let (state_tcp, state_udp) =
            bind_pair(ip, state_port, "state port", "--state-port").await?;
        Ok(IjamSockets {
            cert,
            reg_tcp,
            reg_udp,
            state_tcp,
            state_udp,
        })
    }

    /// The stable start-up line tests and operators read the ports from.
    pub fn describe(&self) -> std::io::Result<String> {
        Ok(format!(
            "cert_tcp={} reg_tcp={} reg_udp={} state_tcp={} state_udp={}",
            self.cert.local_addr()?,
            self.reg_tcp.local_addr()?,
            self.reg_udp.local_addr()?,
            self.state_tcp.local_addr()?,
            self.state_udp.local_addr()?
        ))
    }
}

const REGISTER: &str = "ijam_register";
const STATE: &str = "ijam_state";
const CERT: &str = "ijam_cert";

/// What a reply is, for the connection that sends it.
struct Answer {
    reply: Vec<u8>,
    /// Undecryptable or malformed: too many in a row close a TCP connection.
    bad: bool,
    /// The request was admitted and did its work (whatever its outcome): it moves the
    /// connection's deadline.
    progress: bool,
}

/// Everything a connection task needs.
pub struct IjamServer<S> {
    pub flow: Arc<IjamFlow<S>>,
    pub pool: CryptoPool,
    pub config: ServerConfig,
    /// Registrations (RSA work) and state changes each spend a budget of their own.
    admission: Admission,
    state_admission: Admission,
    /// State changes per node: the frames carry no freshness, so a captured one can be
    /// replayed; this bounds how fast a node's status can be flipped that way.
    state_per_node: Option<RateLimiter<Uuid>>,
    /// Cancelled at shutdown: connections stop reading new requests, but a request
    /// already read is answered.
    shutdown: CancellationToken,
}

impl<S: IjamStore> IjamServer<S> {
    pub fn new(
        flow: Arc<IjamFlow<S>>,
        pool: CryptoPool,
        config: ServerConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(IjamServer {
            admission: Admission::new(config.rate_per_source, config.burst),
            state_admission: Admission::new(config.rate_per_source, config.burst),
            state_per_node: RateLimiter::new(
                config.state_rate_per_node,
                config.state_burst_per_node,
            ),
            flow,
            pool,
            config,
            shutdown,
        })
    }

    /// Serves until `cancel`, then stops accepting; in-flight requests finish on
    /// `tracker`, which the caller waits on (with its grace period).
    pub fn spawn(
        self: &Arc<Self>,
        sockets: IjamSockets,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) {
        let IjamSockets {
            cert,
            reg_tcp,
            reg_udp,
            state_tcp,
            state_udp,
        } = sockets;
        let limit = self.config.connections.clone();
        let s = Arc::clone(self);
        tracker.spawn(accept_loop(
            "cert",
            cert,
            limit.clone(),
            cancel.clone(),
            tracker.clone(),
            move |stream, peer, connection| {
                let s = Arc::clone(&s);
                async move { s.cert_connection(stream, peer, connection).await }
            },
        ));
        let s = Arc::clone(self);
        tracker.spawn(accept_loop(
            "reg",
            reg_tcp,
            limit.clone(),
            cancel.clone(),
            tracker.clone(),
            move |stream, peer, connection| {
                let s = Arc::clone(&s);
                async move { s.register_connection(stream, peer, connection).await }
            },
        ));
        let s = Arc::clone(self);
        tracker.spawn(accept_loop(
            "state",
            state_tcp,
            limit,
            cancel.clone(),
            tracker.clone(),
            move |stream, peer, connection| {
                let s = Arc::clone(&s);
                async move { s.state_connection(stream, peer, connection).await }
            },
        ));
        let s = Arc::clone(self);
        tracker.spawn(serve_datagrams(
            reg_udp,
            DatagramPort {
                name: "reg",
                flow: REGISTER,
                max_in_flight: self.config.max_udp_in_flight,
                too_large: nothing_instead,
            },
            cancel.clone(),
            tracker.clone(),
            move |datagram, peer| {
                let s = Arc::clone(&s);
                async move {
                    s.register(datagram, peer, Transport::Udp)
                        .await
                        .map(|a| a.reply)
                }
            },
        ));
        let s = Arc::clone(self);
        tracker.spawn(serve_datagrams(
            state_udp,
            DatagramPort {
                name: "state",
                flow: STATE,
                max_in_flight: self.config.max_udp_in_flight,
                too_large: nothing_instead,
            },
            cancel,
            tracker.clone(),
            move |datagram, peer| {
                let s = Arc::clone(&s);
                async move {
                    s.state(datagram, peer, Transport::Udp)
                        .await
                        .map(|a| a.reply)
                }
            },
        ));
    }

    /// Certificate fetches are no progress: the connection closes `--idle-timeout` after
    /// it opened, however many it asks for.
    async fn cert_connection(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        connection: Connection,
    ) {
        let deadline = tokio::time::Instant::now() + self.config.idle_timeout;
        let mut request = [0u8; 4];
        loop {
            match wait_for_request(&stream, &connection, &self.shutdown, deadline).await {
                Wake::Readable => {}
                Wake::Deadline => {
                    debug!(flow = "ijam", port = "cert", %peer, "deadline; closing");
                    metrics::connection_closed("cert", "idle");
                    return;
                }
                Wake::End => return,
            }
            let read = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = connection.evicted().cancelled() => return,
                read = tokio::time::timeout_at(deadline, stream.read_exact(&mut request)) => read,
            };
            let started = Instant::now();
            match read {
                Ok(Ok(_)) if request == CERT_REQUEST => {
                    let keys = self.flow.keys();
                    let sent = stream.write_all(keys.certificate_reply()).await;
                    let at = Arrival {
                        flow: CERT,
                        port: "cert",
                        transport: Transport::Tcp,
                        peer,
                        quiet: true,
                    };
                    let ending = Ending::Served {
                        outcome: "certificate",
                    };
                    finish(at, None, started.elapsed(), ending);
                    if sent.is_err() {
                        return;
                    }
                }
                Ok(Ok(_)) => {
                    let why = "not a certificate request; closing";
                    rejected(CERT, "cert", Transport::Tcp, peer, "bad_request", &why);
                    metrics::connection_closed("cert", "bad_request");
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => {
                    debug!(flow = "ijam", port = "cert", %peer, "magic dribbled past the deadline; closing");
                    metrics::connection_closed("cert", "partial_frame");
                    return;
                }
            }
        }
    }

    async fn register_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        connection: Connection,
    ) {
        // A connection frames by the key in force when it opened (a rotation keeps
        // the size, see `registrar key rotate`).
        let frame_len = self.flow.keys().ciphertext_len();
        self.frame_loop(
            stream,
            peer,
            connection,
            "reg",
            frame_len,
            |s, frame| async move { s.register(frame, peer, Transport::Tcp).await },
        )
        .await
    }

    async fn state_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        connection: Connection,
    ) {
        self.frame_loop(
            stream,
            peer,
            connection,
            "state",
            STATE_REQUEST_LEN,
            |s, frame| async move { s.state(frame, peer, Transport::Tcp).await },
        )
        .await
    }

    /// Reads fixed-size frames until EOF, the deadline, or too many bad frames. Between
    /// requests the connection holds no buffer; a frame's buffer is taken on its first
    /// byte. The deadline is `--idle-timeout` after the connection opened or after its
    /// last request that did work.
    async fn frame_loop<F, Fut>(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        connection: Connection,
        port: &'static str,
        len: usize,
        handle: F,
    ) where
        F: Fn(Arc<Self>, Bytes) -> Fut,
        Fut: Future<Output = Option<Answer>>,
    {
        let _ = stream.set_nodelay(true);
        let idle_timeout = self.config.idle_timeout;
        let mut deadline = tokio::time::Instant::now() + idle_timeout;
        let mut bad_in_a_row = 0;
        loop {
            match wait_for_request(&stream, &connection, &self.shutdown, deadline).await {
                Wake::Readable => {}
                Wake::Deadline => {
                    debug!(%peer, port, "no request before the deadline; closing");
                    metrics::connection_closed(port, "idle");
                    return;
                }
                Wake::End => return,
            }
            if !connection.hold(len).await {
                return;
            }
            let mut frame = vec![0u8; len];
            let read = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = connection.evicted().cancelled() => return,
                read = tokio::time::timeout_at(deadline, stream.read_exact(&mut frame)) => read,
            };
            match read {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    debug!(%peer, port, "partial frame at the deadline; closing");
                    metrics::connection_closed(port, "partial_frame");
                    return;
                }
            }
            debug!(%peer, port, "request received");
            connection.busy();
            // Boxed: the request's work is a large future, and an idle connection (most
            // of them, most of the time) should not carry its room.
            let answer = Box::pin(handle(Arc::clone(&self), Bytes::from(frame))).await;
            connection.release();
            let Some(answer) = answer else {
                // Over TCP only a request whose outcome is unknown goes unanswered:
                // closing tells the client at once to retry the same bytes.
                debug!(%peer, port, "outcome unknown; closing without a reply");
                metrics::connection_closed(port, "outcome_unknown");
                return;
            };
            let sent = tokio::time::timeout(idle_timeout, stream.write_all(&answer.reply)).await;
            if !matches!(sent, Ok(Ok(()))) {
                return;
            }
            connection.idle(Instant::now());
            if answer.progress {
                deadline = tokio::time::Instant::now() + idle_timeout;
            }
            bad_in_a_row = if answer.bad { bad_in_a_row + 1 } else { 0 };
            if bad_in_a_row >= self.config.max_bad_frames {
                debug!(%peer, port, bad_in_a_row, "too many bad frames in a row; closing");
                metrics::connection_closed(port, "bad_frames");
                return;
            }
        }
    }

    /// One registration, whatever the transport; `None` when a UDP request is shed
    /// (dropped without a reply, as a datagram can be) or when its outcome is unknown
    /// ([`IjamError::withholds_reply`]).
    async fn register(
        &self,
        ciphertext: Bytes,
        peer: SocketAddr,
        transport: Transport,
    ) -> Option<Answer> {
        let started = Instant::now();
        let at = Arrival {
            flow: REGISTER,
            port: "reg",
            transport,
            peer,
            quiet: false,
        };
        let result: Result<_, Result<IjamError, Refusal>> = async {
            // A datagram of the wrong size is garbage: refused before it can spend the
            // source's budget (a spoofed source's budget, over UDP).
            if ciphertext.len() != self.flow.keys().ciphertext_len() {
                return Err(Ok(IjamError::Undecryptable));
            }
            self.admission
                .admit(peer.ip(), transport, started)
                .map_err(Err)?;
            let flow = Arc::clone(&self.flow);
            let now = clock::now_ms();
            let request = self
                .pool
                .run(move || flow.open_request(&ciphertext, now))
                .await
                .map_err(Err)?
                .map_err(Ok)?;
            let rand = random::bytes()
                .map(RegisterRandomness::from_bytes)
                .map_err(|e| Ok(IjamError::Crypto(e.into())))?;
            let (registered, reply) = self
                .flow
                .register(&request, clock::now_ms(), rand)
                .await
                .map_err(Ok)?;
            Ok((registered, reply, request))
        }
        .await;
        let latency = started.elapsed();
        match result {
            Ok((registered, reply, request)) => {
                let subject = format!("{}/{}", request.network_id.as_str(), registered.node_id());
                finish(
                    at,
                    Some(subject.as_str()),
                    latency,
                    Ending::Served {
                        outcome: registered.outcome(),
                    },
                );
                Some(Answer {
                    reply: reply.to_vec(),
                    bad: false,
                    progress: true,
                })
            }
            Err(Ok(e)) => {
                finish(at, None, latency, failed(&e));
                if e.withholds_reply() {
                    return None;
                }
                let bad = matches!(e, IjamError::Undecryptable | IjamError::Malformed(_));
                Some(Answer {
                    reply: e.register_reply(),
                    bad,
                    progress: !bad,
                })
            }
            Err(Err(refusal)) => {
                finish(at, None, latency, Ending::Refused(refusal));
                let (status, reason) = match refusal {
                    Refusal::Overloaded if transport == Transport::Udp => return None,
                    Refusal::Overloaded => (ijam::Status::SERVICE_UNAVAILABLE, REASON_BUSY),
                    Refusal::RateLimited => (ijam::Status::TOO_MANY_REQUESTS, REASON_RATE_LIMITED),
                };
                Some(Answer {
                    reply: ijam::error_reply(status, reason),
                    bad: false,
                    progress: false,
                })
            }
        }
    }

    /// One state change; `None` when its outcome is unknown (no reply, see
    /// [`IjamError::withholds_reply`]).
    async fn state(&self, frame: Bytes, peer: SocketAddr, transport: Transport) -> Option<Answer> {
        let started = Instant::now();
        let at = Arrival {
            flow: STATE,
            port: "state",
            transport,
            peer,
            quiet: false,
        };
        let request = match StateRequest::parse(&frame) {
            Ok(request) => request,
            Err(e) => {
                let e = IjamError::Malformed(e);
                finish(at, None, started.elapsed(), failed(&e));
                return Some(Answer {
                    reply: e.state_reply(),
                    bad: true,
                    progress: false,
                });
            }
        };
        let per_node = |node| match &self.state_per_node {
            Some(limiter) if !limiter.admit(node, started) => Err(Refusal::RateLimited),
            _ => Ok(()),
        };
        if let Err(refusal) = self
            .state_admission
            .admit(peer.ip(), transport, started)
            .and_then(|()| per_node(request.node_id))
        {
            finish(at, None, started.elapsed(), Ending::Refused(refusal));
            return Some(Answer {
                reply: ijam::state_reply(ijam::Status::TOO_MANY_REQUESTS).to_vec(),
                bad: false,
                progress: false,
            });
        }
        let result = self
            .flow
            .change_state(&request, &peer.ip().to_string(), clock::now_ms())
            .await;
        let latency = started.elapsed();
        match result {
            Ok((node_id, code, change)) => {
                let subject = format!("{node_id} → {}", code.as_str());
                finish(
                    at,
                    Some(subject.as_str()),
                    latency,
                    Ending::Served {
                        outcome: change.outcome(),
                    },
                );
                Some(Answer {
                    reply: ijam::state_reply(ijam::Status::OK).to_vec(),
                    bad: false,
                    progress: true,
                })
            }
            Err(e) => {
                finish(at, None, latency, failed(&e));
                if e.withholds_reply() {
                    return None;
                }
                let bad = matches!(e, IjamError::Malformed(_));
                Some(Answer {
                    reply: e.state_reply().to_vec(),
                    bad,
                    progress: !bad,
                })
            }
        }
    }
}

/// The ijam protocol has no status for "too large": a reply that breaks the UDP rules
/// (only an error reply to a datagram far too short can) is not sent.
fn nothing_instead(_reply: &[u8]) -> Option<Vec<u8>> {
    None
}

/// An ijam failure, for [`finish`].
fn failed(e: &IjamError) -> Ending<'_> {
    Ending::Failed {
        outcome: e.outcome(),
        error: e,
        fault: match e {
            // A stored key that does not open (tampering with the store, or a listener
            // with another storage key) is the store's: summed at WARN.
            IjamError::Store(_) | IjamError::StoredKeyRefused => Fault::Store,
            IjamError::Crypto(_) => Fault::Server,
            _ => Fault::Peer,
        },
    }
}
