//! The envelope port (docs/design.md "The envelope", default 8447, TCP and UDP): frames
//! from `codec::EnvelopeCodec`, dispatched by flow number to the flows registered in
//! [`EnvelopeFlows`], every one of them served by one path ([`EnvelopeServer::serve`]).
//!
//! - **TCP**: a connection pipelines: each frame is handled in its own task (at most
//!   [`PIPELINE_DEPTH`] at once per connection; beyond that the connection is not
//!   read), and replies go out through one writer in the order they finish, matched
//!   by request id. Bytes that are no frame (bad magic, version, length or CRC) get a
//!   400 naming the request id when it could be read, then the connection is closed.
//! - **UDP**: one frame per datagram, one task per datagram, the reply to the sender.
//!   A bad datagram gets the same 400 when its id is readable, and is otherwise
//!   dropped.
//!
//! Admission as on the ijam ports: the per-source token bucket (`--rate-per-source`,
//! `--burst`) in front of every request its flow says is worth limiting (429), the
//! crypto pool for signature checks (full: 503 on TCP, dropped on UDP), the connection
//! cap and idle timeout.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::admission::Admission;
use super::listen::{
    BindError, Connection, DatagramPort, Wake, accept_loop, bind_pair, serve_datagrams,
    wait_for_request,
};
use super::pool::CryptoPool;
use super::{Arrival, Ending, Fault, ServerConfig, Transport, finish, metrics, rejected};
use crate::codec::{EnvelopeCodec, EnvelopeCodecError, EnvelopeFrame};
use crate::core::crypto::ecdsa::SigningKey;
use crate::core::crypto::seal::{self, ReplySealer, SealKey};
use crate::core::crypto::{CryptoError, StorageKey};
use crate::core::{clock, random};
use crate::flow::core::CoreFlow;
use crate::flow::pubkey::PubkeyFlow;
use crate::flow::{Context, EnvelopeFlow, Failure, Offload, Refusal};
use crate::store::Stores;
use crate::wire::DecodeError;
use crate::wire::envelope::{BadFrame, Echo, Flags, Flow, Header, Status};

/// Frames of one TCP connection handled at once; the next is read when one finishes.
pub const PIPELINE_DEPTH: usize = 64;

/// After closing a connection for garbage, how long its remaining input is read and
/// discarded, so the close is a FIN after the 400 rather than a reset that could
/// destroy the 400 before the peer reads it.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_MAX_BYTES: usize = 64 * 1024;

/// The flows of the envelope port: one line each (its field and type). The port
/// serves them, Hello lists them, and an unknown flow number gets 400.
macro_rules! envelope_flows {
    ($($name:ident: $flow:ty),* $(,)?) => {
        /// Every flow the envelope port serves.
        pub struct EnvelopeFlows<S> {
            $(pub $name: $flow,)*
        }

        impl<S: Stores> EnvelopeFlows<S> {
            /// The flow numbers served, as the core Hello lists them.
            pub fn served() -> Vec<Flow> {
                vec![$(<$flow as EnvelopeFlow>::FLOW),*]
            }

            /// Whether a frame asks for work (a request its flow rate limits): only
            /// such requests move a connection's deadline.
            fn does_work(&self, header: &Header) -> bool {
                $(
                    if header.flow == <$flow as EnvelopeFlow>::FLOW {
                        return self.$name.rate_limited(header.kind);
                    }
                )*
                false
            }

            async fn dispatch(
                &self,
                server: &EnvelopeServer<S>,
                frame: EnvelopeFrame,
                peer: SocketAddr,
                transport: Transport,
            ) -> Option<EnvelopeFrame> {
                $(
                    if frame.header.flow == <$flow as EnvelopeFlow>::FLOW {
                        return server.serve(&self.$name, frame, peer, transport).await;
                    }
                )*
                server.unserved(&frame.header, peer, transport)
            }
        }
    };
}

envelope_flows! {
    core: CoreFlow,
    pubkey: PubkeyFlow<S>,
}

impl<S: Stores> EnvelopeFlows<S> {
    /// Every flow, over `store`, with the server's keys.
    pub fn new(
        store: Arc<S>,
        storage: StorageKey,
        signing: &SigningKey,
        seal: &SealKey,
        max_payload: u32,
    ) -> Result<Self, CryptoError> {
        Ok(EnvelopeFlows {
            core: CoreFlow::new(&Self::served(), max_payload, signing, &seal.public_key())?,
            pubkey: PubkeyFlow::new(storage, store),
        })
    }
}

/// The envelope's two sockets, on one port number, bound by the caller.
pub struct EnvelopeSockets {
    pub tcp: TcpListener,
    pub udp: UdpSocket,
}

impl EnvelopeSockets {
    /// TCP and UDP on `port`; 0 picks one free port for both.
    pub async fn bind(ip: std::net::IpAddr, port: u16) -> Result<Self, BindError> {
        let (tcp, udp) = bind_pair(ip, port, "envelope port", "--envelope-port").await?;
        Ok(EnvelopeSockets { tcp, udp })
    }

    /// For the stable start-up line.
    pub fn describe(&self) -> io::Result<String> {
        Ok(format!(
            "envelope_tcp={} envelope_udp={}",
            self.tcp.local_addr()?,
            self.udp.local_addr()?
        ))
    }
}

pub struct EnvelopeServer<S> {
    flows: EnvelopeFlows<S>,
    /// Opens sealed requests.
    seal_key: Arc<SealKey>,
    pool: CryptoPool,
    config: ServerConfig,
    max_payload: u32,
    admission: Admission,
    /// Cancelled at shutdown: stop reading; what was read is answered.
    shutdown: CancellationToken,
}

impl<S: Stores> EnvelopeServer<S> {
    pub fn new(
        flows: EnvelopeFlows<S>,
        seal_key: Arc<SealKey>,
        pool: CryptoPool,
        config: ServerConfig,
        max_payload: u32,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(EnvelopeServer {
            flows,
            seal_key,
            pool,
            admission: Admission::new(config.rate_per_source, config.burst),
            config,
            max_payload,
            shutdown,
        })
    }

    /// Serves until the shutdown token; tasks run on `tracker`, which the caller waits
    /// on.
    pub fn spawn(self: &Arc<Self>, sockets: EnvelopeSockets, tracker: &TaskTracker) {
        let server = Arc::clone(self);
        tracker.spawn(accept_loop(
            "envelope",
            sockets.tcp,
            self.config.connections.clone(),
            self.shutdown.clone(),
            tracker.clone(),
            move |stream, peer, connection| {
                let server = Arc::clone(&server);
                async move { server.connection(stream, peer, connection).await }
            },
        ));
        tracker.spawn(Arc::clone(self).udp_loop(sockets.udp, tracker.clone()));
    }

    /// One TCP connection. While it waits for a request it holds no buffer; when bytes
    /// arrive it serves a burst ([`EnvelopeServer::burst`]) and, once every frame read
    /// is answered and no partial frame is left, gives its buffers back and waits again.
    /// It closes `--idle-timeout` after it opened or after its last request that did
    /// work (a Hello is none), whatever it sends meanwhile.
    async fn connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        connection: Connection,
    ) {
        let _ = stream.set_nodelay(true);
        let mut deadline = tokio::time::Instant::now() + self.config.idle_timeout;
        loop {
            match wait_for_request(&stream, &connection, &self.shutdown, deadline).await {
                Wake::Readable => {}
                Wake::Deadline => {
                    debug!(%peer, port = "envelope", "no request that did work before the deadline; closing");
                    metrics::connection_closed("envelope", "idle");
                    return;
                }
                Wake::End => return,
            }
            // Boxed: a burst (buffers, tasks, the writer) is a large future, and an
            // idle connection should not carry its room.
            let ended = Box::pin(self.burst(&mut stream, peer, &connection, &mut deadline)).await;
            connection.release();
            match ended {
                Burst::Drained => connection.idle(Instant::now()),
                Burst::Closed => return,
                Burst::Garbage => {
                    // The 400 is out: FIN, then read and discard what the peer still
                    // sends, so the close is not a reset that could destroy the 400.
                    let _ = stream.shutdown().await;
                    linger(stream).await;
                    return;
                }
            }
        }
    }

    /// Serves what arrives until the connection is drained (every frame answered, no
    /// partial frame) or ends: a reader that hands each frame to its own task (at most
    /// [`PIPELINE_DEPTH`] at once) and a writer that sends replies as they finish.
    async fn burst(
        self: &Arc<Self>,
        stream: &mut TcpStream,
        peer: SocketAddr,
        connection: &Connection,
        deadline: &mut tokio::time::Instant,
    ) -> Burst {
        let mut codec = EnvelopeCodec::new(self.max_payload);
        let idle_timeout = self.config.idle_timeout;
        let (mut read, write) = stream.split();
        let (replies, outbox) = mpsc::channel::<EnvelopeFrame>(PIPELINE_DEPTH);
        // Cancelled when the writer gives up (peer gone, or not reading its replies for
        // the idle timeout): the reader stops too.
        let dead = CancellationToken::new();
        let writer = write_replies(write, outbox, idle_timeout, dead.clone(), peer);

        let reader = async {
            let mut buf = BytesMut::new();
            let mut tasks = JoinSet::new();
            let ended = 'burst: loop {
                if buf.capacity() == buf.len() {
                    buf.reserve(READ_CHUNK);
                }
                if !connection.hold(buf.capacity()).await {
                    break Burst::Closed;
                }
                let room = tasks.len() < PIPELINE_DEPTH;
                tokio::select! {
                    _ = self.shutdown.cancelled() => break Burst::Closed,
                    _ = dead.cancelled() => break Burst::Closed,
                    _ = connection.evicted().cancelled() => break Burst::Closed,
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                    _ = tokio::time::sleep_until(*deadline) => {
                        debug!(%peer, port = "envelope", pending = buf.len(), "partial frame at the deadline; closing");
                        metrics::connection_closed("envelope", "partial_frame");
                        break Burst::Closed;
                    }
                    n = read.read_buf(&mut buf), if room => match n {
                        Ok(0) => {
                            // The peer is done: a frame cut short still gets its 400.
                            if let Err(EnvelopeCodecError::Frame(bad)) = codec.decode_eof(&mut buf)
                                && let Some(reply) = self.bad_frame(&bad, peer, Transport::Tcp)
                            {
                                let _ = replies.send(reply).await;
                            }
                            break Burst::Closed;
                        }
                        Ok(_) => {}
                        Err(_) => break Burst::Closed,
                    },
                }
                while tasks.len() < PIPELINE_DEPTH {
                    match codec.decode(&mut buf) {
                        Ok(Some(frame)) => {
                            if self.flows.does_work(&frame.header) {
                                *deadline = tokio::time::Instant::now() + idle_timeout;
                            }
                            connection.busy();
                            let (server, replies) = (Arc::clone(self), replies.clone());
                            let close = dead.clone();
                            tasks.spawn(async move {
                                match server.handle(frame, peer, Transport::Tcp).await {
                                    Some(reply) => {
                                        let _ = replies.send(reply).await;
                                    }
                                    // Its outcome is unknown: closing tells the client
                                    // at once to retry the same bytes.
                                    None => {
                                        metrics::connection_closed("envelope", "outcome_unknown");
                                        close.cancel();
                                    }
                                }
                            });
                        }
                        Ok(None) => break,
                        Err(EnvelopeCodecError::Frame(bad)) => {
                            if let Some(reply) = self.bad_frame(&bad, peer, Transport::Tcp) {
                                let _ = replies.send(reply).await;
                            }
                            metrics::connection_closed("envelope", "bad_frame");
                            break 'burst Burst::Garbage;
                        }
                        Err(EnvelopeCodecError::Io(_)) => break 'burst Burst::Closed,
                    }
                }
                if tasks.is_empty() {
                    if buf.is_empty() {
                        break Burst::Drained;
                    }
                    connection.idle(Instant::now());
                }
            };
            // Answer everything already read before the writer finishes.
            while tasks.join_next().await.is_some() {}
            drop(replies);
            ended
        };

        let (ended, ()) = tokio::join!(reader, writer);
        ended
    }

    async fn udp_loop(self: Arc<Self>, socket: UdpSocket, tracker: TaskTracker) {
        let codec = EnvelopeCodec::new(self.max_payload);
        let port = DatagramPort {
            name: "envelope",
            flow: "envelope",
            max_in_flight: self.config.max_udp_in_flight,
            too_large: payload_too_large,
        };
        serve_datagrams(
            socket,
            port,
            self.shutdown.clone(),
            tracker,
            move |datagram, peer| {
                let server = Arc::clone(&self);
                async move {
                    let reply = match codec.decode_datagram(datagram) {
                        Ok(frame) => server.handle(frame, peer, Transport::Udp).await,
                        Err(bad) => server.bad_frame(&bad, peer, Transport::Udp),
                    };
                    reply.map(|reply| reply.to_vec())
                }
            },
        )
        .await
    }

    /// Bytes that are no frame: logged, counted, and a 400 when the id was readable.
    fn bad_frame(
        &self,
        bad: &BadFrame,
        peer: SocketAddr,
        transport: Transport,
    ) -> Option<EnvelopeFrame> {
        rejected(
            "envelope",
            "envelope",
            transport,
            peer,
            "bad_frame",
            &bad.error,
        );
        bad.echo
            .map(|echo| EnvelopeFrame::new(echo.reply(Status::BAD_REQUEST), Bytes::new()))
    }

    /// One frame, whatever the transport: the reply, or `None` when a UDP request is
    /// shed (dropped, as a datagram can be) or its outcome is unknown (no reply; a TCP
    /// connection is closed).
    pub async fn handle(
        &self,
        frame: EnvelopeFrame,
        peer: SocketAddr,
        transport: Transport,
    ) -> Option<EnvelopeFrame> {
        let h = frame.header;
        if let Err(why) = request_header(&h) {
            rejected("envelope", "envelope", transport, peer, "bad_header", &why);
            return Some(reply(&h, Status::BAD_REQUEST, Bytes::new()));
        }
        self.flows.dispatch(self, frame, peer, transport).await
    }

    /// A frame of a flow this port does not serve: 400.
    fn unserved(
        &self,
        h: &Header,
        peer: SocketAddr,
        transport: Transport,
    ) -> Option<EnvelopeFrame> {
        let why = format!("flow {} not served", h.flow.0);
        rejected(
            "envelope",
            "envelope",
            transport,
            peer,
            "unknown_flow",
            &why,
        );
        Some(reply(h, Status::BAD_REQUEST, Bytes::new()))
    }

    /// The one serving path of every envelope flow: parse → admission → the flow's
    /// work (its private-key work on the crypto pool) → reply, one log line, metrics.
    async fn serve<F: EnvelopeFlow>(
        &self,
        flow: &F,
        frame: EnvelopeFrame,
        peer: SocketAddr,
        transport: Transport,
    ) -> Option<EnvelopeFrame> {
        let started = Instant::now();
        let h = frame.header;
        let at = Arrival {
            flow: F::NAME,
            port: "envelope",
            transport,
            peer,
            quiet: !flow.rate_limited(h.kind),
        };
        let malformed = |e: &dyn std::fmt::Display| {
            let ending = Ending::Failed {
                outcome: "malformed",
                error: e,
                fault: Fault::Peer,
            };
            finish(at, None, started.elapsed(), ending);
            Some(reply(&h, Status::BAD_REQUEST, Bytes::new()))
        };
        let sealed = flow.sealed(h.kind);
        if sealed != (h.flags == Flags::SEALED) {
            let why = if sealed {
                "this kind is sealed; the request was not"
            } else {
                "a sealed request of a kind that is not sealed"
            };
            return malformed(&why);
        }
        let refused = |refusal: Refusal, subject: Option<&str>| {
            finish(at, subject, started.elapsed(), Ending::Refused(refusal));
            match refusal {
                Refusal::Overloaded if transport == Transport::Udp => None,
                Refusal::Overloaded => Some(reply(&h, Status::SERVICE_UNAVAILABLE, Bytes::new())),
                Refusal::RateLimited => Some(reply(&h, Status::TOO_MANY_REQUESTS, Bytes::new())),
            }
        };
        let admit = || match flow.rate_limited(h.kind) {
            true => self.admission.admit(peer.ip(), transport, started),
            false => Ok(()),
        };
        // A sealed request spends its budget before it is opened: opening costs an
        // X25519 operation, on the crypto pool.
        let (request, sealer) = if sealed {
            if let Err(refusal) = admit() {
                return refused(refusal, None);
            }
            let (key, header) = (
                Arc::clone(&self.seal_key),
                h.to_bytes(frame.payload.len() as u32),
            );
            let payload = frame.payload.clone();
            let opened = self
                .pool
                .run(move || key.open(header[3], header[4], &header, &payload))
                .await;
            let (plaintext, sealer) = match opened {
                Err(refusal) => return refused(refusal, None),
                Ok(Err(e)) => return malformed(&e),
                Ok(Ok(opened)) => opened,
            };
            match flow.parse(h.kind, &plaintext) {
                Ok(request) => (request, Some(sealer)),
                Err(e) => return malformed(&e),
            }
        } else {
            let request = match flow.parse(h.kind, &frame.payload) {
                Ok(request) => request,
                Err(e) => return malformed(&e),
            };
            if let Err(refusal) = admit() {
                let subject = F::subject(&request);
                return refused(refusal, subject.as_deref());
            }
            (request, None)
        };
        let subject = F::subject(&request);
        let subject = subject.as_deref();
        let random = match random::bytes() {
            Ok(random) => random,
            Err(e) => {
                let ending = Ending::Failed {
                    outcome: "crypto_error",
                    error: &e,
                    fault: Fault::Server,
                };
                finish(at, subject, started.elapsed(), ending);
                return Some(reply(&h, Status::SERVICE_UNAVAILABLE, Bytes::new()));
            }
        };
        let ctx = Context {
            now_ms: clock::now_ms(),
            random,
            offload: &self.pool,
        };
        match flow.handle(request, ctx).await {
            Ok(done) => {
                let ending = Ending::Served {
                    outcome: done.outcome,
                };
                finish(at, subject, started.elapsed(), ending);
                Some(match sealer {
                    Some(sealer) if done.status.is_success() && !done.payload.is_empty() => {
                        sealed_reply(&h, done.status, &sealer, &done.payload)
                    }
                    _ => reply(&h, done.status, done.payload),
                })
            }
            Err(Failure::Flow(e)) => {
                let class = F::classify(&e);
                let withhold = class.withhold;
                let ending = Ending::Failed {
                    outcome: class.outcome,
                    error: &e,
                    fault: if class.store_failed {
                        Fault::Store
                    } else {
                        Fault::Peer
                    },
                };
                finish(at, subject, started.elapsed(), ending);
                if withhold {
                    return None;
                }
                Some(reply(&h, class.status, Bytes::new()))
            }
            Err(Failure::Refused(refusal)) => refused(refusal, subject),
        }
    }
}

/// Reads and discards what the peer still sends, until its EOF, [`LINGER`] or
/// [`LINGER_MAX_BYTES`], whichever comes first (our FIN is already out).
async fn linger(mut stream: TcpStream) {
    // On the heap: a buffer here would be room every connection's future carries.
    let mut buf = vec![0u8; 4096];
    let mut total = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while total < LINGER_MAX_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// How a burst of a connection ended.
enum Burst {
    /// Every frame read was answered and nothing partial is left: wait for more.
    Drained,
    /// The peer closed, the deadline passed, the listener shuts down, or the
    /// connection was evicted: replies already due were sent.
    Closed,
    /// Bytes that are no frame: the 400 was sent; close the write side and linger.
    Garbage,
}

/// Bytes read at a time into an empty buffer (a frame's own length reserves more).
const READ_CHUNK: usize = 4096;

/// Sends replies as they come, those ready together in one write, until the reader
/// drops its sender; gives up (cancelling `dead`) when the peer stops reading for
/// `timeout`. Holds no buffer between writes.
async fn write_replies(
    mut write: tokio::net::tcp::WriteHalf<'_>,
    mut outbox: mpsc::Receiver<EnvelopeFrame>,
    timeout: std::time::Duration,
    dead: CancellationToken,
    peer: SocketAddr,
) {
    let _dead = dead.drop_guard();
    while let Some(first) = outbox.recv().await {
        let mut bytes = first.to_vec();
        while let Ok(more) = outbox.try_recv() {
            bytes.extend_from_slice(&more.to_vec());
        }
        match tokio::time::timeout(timeout, write.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                debug!(%peer, port = "envelope", "peer not reading its replies; closing");
                metrics::connection_closed("envelope", "write_timeout");
                return;
            }
        }
    }
}

/// What a UDP reply too large for the rules becomes: a 413 with the same flow, kind and
/// request id, and an empty payload (the client retries over TCP, or pads).
fn payload_too_large(reply: &[u8]) -> Option<Vec<u8>> {
    let echo = Echo::read(reply)?;
    Some(EnvelopeFrame::new(echo.reply(Status::PAYLOAD_TOO_LARGE), Bytes::new()).to_vec())
}

/// A 2xx reply to a sealed request: sealed under the keys exported from the request's
/// context, its own header (sealed flag, sealed length) the associated data.
fn sealed_reply(
    request: &Header,
    status: Status,
    sealer: &ReplySealer,
    plaintext: &[u8],
) -> EnvelopeFrame {
    let mut header = request.reply(status);
    header.flags = Flags::SEALED;
    let len = seal::sealed_reply_len(plaintext.len()) as u32;
    let payload = sealer.seal(&header.to_bytes(len), plaintext);
    EnvelopeFrame::new(header, payload)
}

fn reply(request: &Header, status: Status, payload: Bytes) -> EnvelopeFrame {
    EnvelopeFrame::new(request.reply(status), payload)
}

/// A request has bit 7 of its kind clear, status 0, and no flag but the sealed one
/// (which kinds must be sealed is the flow's to say).
fn request_header(h: &Header) -> Result<(), DecodeError> {
    if h.kind.is_reply() {
        return Err(DecodeError::Invalid { field: "kind" });
    }
    if h.status != Status::REQUEST {
        return Err(DecodeError::Unknown {
            field: "status",
            value: h.status.0.into(),
        });
    }
    if h.flags != Flags::NONE && h.flags != Flags::SEALED {
        return Err(DecodeError::Unknown {
            field: "flags",
            value: h.flags.0.into(),
        });
    }
    Ok(())
}
