//! The envelope port (docs/design.md "The envelope", default 8447, TCP and UDP): frames
//! from `codec::EnvelopeCodec`, dispatched by flow to `flow::core` and `flow::pubkey`.
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
//! `--burst`) in front of every pubkey request (429), the crypto pool for signature
//! checks (full: 503 on TCP, dropped on UDP), the connection cap and idle timeout.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::admission::RateLimiter;
use super::pool::CryptoPool;
use super::{ServerConfig, bind_pair, metrics, now_ms};
use crate::codec::{EnvelopeCodec, EnvelopeCodecError, EnvelopeFrame};
use crate::crypto::{self, StorageKey, ecdsa::SigningKey};
use crate::flow::core::CoreFlow;
use crate::flow::pubkey::{PubkeyError, PubkeyFlow};
use crate::store::Store;
use crate::wire::DecodeError;
use crate::wire::envelope::{BadFrame, Flags, Flow, Header, Status};
use crate::wire::pubkey::Request;

/// Frames of one TCP connection handled at once; the next is read when one finishes.
pub const PIPELINE_DEPTH: usize = 64;

/// After closing a connection for garbage, how long its remaining input is read and
/// discarded, so the close is a FIN after the 400 rather than a reset that could
/// destroy the 400 before the peer reads it.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_MAX_BYTES: usize = 64 * 1024;

/// What the envelope port serves, for the core Hello.
pub const FLOWS: [Flow; 2] = [Flow::CORE, Flow::PUBKEY];

/// The envelope's two sockets, on one port number, bound by the caller.
pub struct EnvelopeSockets {
    pub tcp: TcpListener,
    pub udp: UdpSocket,
}

impl EnvelopeSockets {
    /// TCP and UDP on `port`; 0 picks one free port for both.
    pub async fn bind(ip: std::net::IpAddr, port: u16) -> Result<Self, super::BindError> {
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
    core: CoreFlow,
    pubkey: Arc<PubkeyFlow<S>>,
    pool: CryptoPool,
    config: ServerConfig,
    max_payload: u32,
    limiter: Option<RateLimiter>,
    /// Cancelled at shutdown: stop reading; what was read is answered.
    shutdown: CancellationToken,
}

impl<S: Store> EnvelopeServer<S> {
    /// The server `serve` runs: core Hello publishing `signing`'s public key, and the
    /// pubkey flow over `store` with nonces keyed by `storage`.
    pub fn build(
        store: Arc<S>,
        storage: StorageKey,
        signing: &SigningKey,
        pool: CryptoPool,
        config: ServerConfig,
        max_payload: u32,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let core = CoreFlow::new(&FLOWS, max_payload, signing.public_key_der());
        let pubkey = Arc::new(PubkeyFlow::new(storage, store));
        Self::new(core, pubkey, pool, config, max_payload, shutdown)
    }

    pub fn new(
        core: CoreFlow,
        pubkey: Arc<PubkeyFlow<S>>,
        pool: CryptoPool,
        config: ServerConfig,
        max_payload: u32,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(EnvelopeServer {
            core,
            pubkey,
            pool,
            limiter: RateLimiter::new(config.rate_per_source, config.burst),
            config,
            max_payload,
            shutdown,
        })
    }

    /// Serves until the shutdown token; tasks run on `tracker`, which the caller waits
    /// on.
    pub fn spawn(self: &Arc<Self>, sockets: EnvelopeSockets, tracker: &TaskTracker) {
        tracker.spawn(Arc::clone(self).accept_loop(sockets.tcp, tracker.clone()));
        tracker.spawn(Arc::clone(self).udp_loop(sockets.udp, tracker.clone()));
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, tracker: TaskTracker) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(port = "envelope", error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Some(permit) = self.config.connections.try_acquire() else {
                debug!(%peer, max = self.config.connections.max(), "connection limit reached; closing");
                metrics::connection_refused("envelope");
                continue;
            };
            let server = Arc::clone(&self);
            tracker.spawn(async move {
                let _open = metrics::OpenConnection::new();
                server.connection(stream, peer).await;
                drop(permit);
            });
        }
    }

    /// One TCP connection: a reader that hands each frame to its own task, and one
    /// writer that sends replies as they finish.
    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let codec = EnvelopeCodec::new(self.max_payload);
        let (read, write) = stream.into_split();
        let mut frames = FramedRead::new(read, codec);
        let mut sink = FramedWrite::new(write, codec);
        let (replies, mut outbox) = mpsc::channel::<EnvelopeFrame>(PIPELINE_DEPTH);

        // Cancelled when the writer gives up (peer gone, or not reading its replies for
        // the idle timeout): the reader stops too.
        let dead = CancellationToken::new();
        let write_timeout = self.config.idle_timeout;
        let writer_dead = dead.clone();
        let writer = async move {
            let _dead = writer_dead.drop_guard();
            while let Some(first) = outbox.recv().await {
                let batch = async {
                    sink.feed(first).await?;
                    // Whatever else is ready goes out in the same write.
                    while let Ok(more) = outbox.try_recv() {
                        sink.feed(more).await?;
                    }
                    sink.flush().await
                };
                match tokio::time::timeout(write_timeout, batch).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        debug!(%peer, port = "envelope", "peer not reading its replies; closing");
                        metrics::connection_closed("envelope", "write_timeout");
                        return;
                    }
                }
            }
            let _ = sink.close().await;
        };

        let reader = async move {
            let slots = Arc::new(Semaphore::new(PIPELINE_DEPTH));
            let mut tasks = JoinSet::new();
            let mut garbage = false;
            loop {
                let slot = tokio::select! {
                    _ = dead.cancelled() => break,
                    slot = Arc::clone(&slots).acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                };
                let next = tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = dead.cancelled() => break,
                    next = tokio::time::timeout(self.config.idle_timeout, frames.next()) => next,
                };
                match next {
                    Ok(Some(Ok(frame))) => {
                        let (server, replies) = (Arc::clone(&self), replies.clone());
                        tasks.spawn(async move {
                            if let Some(reply) = server.handle(frame, peer, "tcp").await {
                                let _ = replies.send(reply).await;
                            }
                            drop(slot);
                        });
                    }
                    Ok(Some(Err(EnvelopeCodecError::Frame(bad)))) => {
                        if let Some(reply) = self.bad_frame(&bad, peer, "tcp") {
                            let _ = replies.send(reply).await;
                        }
                        metrics::connection_closed("envelope", "bad_frame");
                        garbage = true;
                        break;
                    }
                    Ok(Some(Err(EnvelopeCodecError::Io(_))) | None) => break,
                    Err(_) => {
                        let pending = frames.read_buffer().len();
                        debug!(%peer, port = "envelope", pending, "idle or partial frame; closing");
                        let reason = if pending == 0 {
                            "idle"
                        } else {
                            "partial_frame"
                        };
                        metrics::connection_closed("envelope", reason);
                        break;
                    }
                }
                while tasks.try_join_next().is_some() {}
            }
            // Answer everything already read before the writer closes the connection.
            while tasks.join_next().await.is_some() {}
            drop(replies);
            garbage.then_some(frames)
        };

        let (garbage, ()) = tokio::join!(reader, writer);
        if let Some(frames) = garbage {
            linger(frames.into_inner()).await;
        }
    }

    async fn udp_loop(self: Arc<Self>, socket: UdpSocket, tracker: TaskTracker) {
        let codec = EnvelopeCodec::new(self.max_payload);
        let (max_in_flight, cancel) = (self.config.max_udp_in_flight, self.shutdown.clone());
        super::serve_datagrams(
            socket,
            max_in_flight,
            "envelope",
            cancel,
            tracker,
            move |datagram, peer| {
                let server = Arc::clone(&self);
                async move {
                    let reply = match codec.decode_datagram(datagram) {
                        Ok(frame) => server.handle(frame, peer, "udp").await,
                        Err(bad) => server.bad_frame(&bad, peer, "udp"),
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
        transport: &'static str,
    ) -> Option<EnvelopeFrame> {
        warn!(port = "envelope", transport, %peer, error = %bad.error, "not a frame");
        metrics::request("envelope", transport, "bad_frame", Default::default());
        bad.echo
            .map(|echo| EnvelopeFrame::new(echo.reply(Status::BAD_REQUEST), Bytes::new()))
    }

    /// One frame, whatever the transport: the reply, or `None` when a UDP request is
    /// shed (dropped, as a datagram can be).
    pub async fn handle(
        &self,
        frame: EnvelopeFrame,
        peer: SocketAddr,
        transport: &'static str,
    ) -> Option<EnvelopeFrame> {
        let h = frame.header;
        if let Err(why) = request_header(&h) {
            info!(port = "envelope", transport, %peer, flow = h.flow.0, kind = h.kind.0, error = %why, "refused header");
            metrics::request("envelope", transport, "bad_header", Default::default());
            return Some(reply(&h, Status::BAD_REQUEST, Bytes::new()));
        }
        match h.flow {
            Flow::CORE => {
                let started = Instant::now();
                let (status, payload, outcome) = match self.core.handle(h.kind, &frame.payload) {
                    Ok((status, payload)) => (status, payload, "hello"),
                    Err(e) => (e.status(), Bytes::new(), e.outcome()),
                };
                debug!(flow = "core", transport, %peer, kind = h.kind.0, outcome);
                metrics::request("core", transport, outcome, started.elapsed());
                Some(reply(&h, status, payload))
            }
            Flow::PUBKEY => {
                self.pubkey_request(&h, &frame.payload, peer, transport)
                    .await
            }
            other => {
                info!(port = "envelope", transport, %peer, flow = other.0, "flow not served");
                metrics::request("envelope", transport, "unknown_flow", Default::default());
                Some(reply(&h, Status::BAD_REQUEST, Bytes::new()))
            }
        }
    }

    async fn pubkey_request(
        &self,
        h: &Header,
        payload: &[u8],
        peer: SocketAddr,
        transport: &'static str,
    ) -> Option<EnvelopeFrame> {
        const FLOW: &str = "pubkey";
        let started = Instant::now();
        let mut device = None;
        let result = async {
            if let Some(limiter) = &self.limiter
                && !limiter.admit(peer.ip(), started)
            {
                return Err(PubkeyError::RateLimited);
            }
            let request = Request::parse(h.kind, payload)?;
            device = Some(request.device_id());
            let random = crypto::random().map_err(PubkeyError::Crypto)?;
            let pool = self.pool.clone();
            self.pubkey
                .handle(request, now_ms(), random, |check| async move {
                    let checked = pool.run(move || check.run()).await;
                    metrics::crypto_queue_depth(pool.depth());
                    checked.map_err(|_| PubkeyError::Overloaded)?
                })
                .await
        }
        .await;
        let latency = started.elapsed();
        let latency_us = latency.as_micros() as u64;
        let device = device.map(|d| d.to_hex()).unwrap_or_default();
        match result {
            Ok(done) => {
                info!(flow = FLOW, kind = h.kind.0, transport, %peer, outcome = done.outcome(), device, latency_us);
                metrics::request(FLOW, transport, done.outcome(), latency);
                Some(reply(h, done.status(), Bytes::from(done.payload())))
            }
            Err(e) => {
                match &e {
                    PubkeyError::Store(_) | PubkeyError::Crypto(_) => {
                        warn!(flow = FLOW, kind = h.kind.0, transport, %peer, outcome = e.outcome(), error = %e, device, latency_us)
                    }
                    // Summed once a second by metrics::report_refusals.
                    PubkeyError::Overloaded | PubkeyError::RateLimited => {
                        debug!(flow = FLOW, kind = h.kind.0, transport, %peer, outcome = e.outcome(), error = %e, device, latency_us)
                    }
                    _ => {
                        info!(flow = FLOW, kind = h.kind.0, transport, %peer, outcome = e.outcome(), error = %e, device, latency_us)
                    }
                }
                metrics::request(FLOW, transport, e.outcome(), latency);
                match &e {
                    PubkeyError::Overloaded => metrics::shed(FLOW, transport),
                    PubkeyError::RateLimited => metrics::rate_limited(FLOW, transport),
                    PubkeyError::Store(_) => metrics::store_error(FLOW),
                    _ => {}
                }
                if matches!(e, PubkeyError::Overloaded) && transport == "udp" {
                    return None;
                }
                Some(reply(h, e.status(), Bytes::new()))
            }
        }
    }
}

/// Reads and discards what the peer still sends, until its EOF, [`LINGER`] or
/// [`LINGER_MAX_BYTES`], whichever comes first (our FIN is already out).
async fn linger(mut read: tokio::net::tcp::OwnedReadHalf) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let mut total = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while total < LINGER_MAX_BYTES {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

fn reply(request: &Header, status: Status, payload: Bytes) -> EnvelopeFrame {
    EnvelopeFrame::new(request.reply(status), payload)
}

/// A request has bit 7 of its kind clear, status 0 and no flags (sealed payloads are
/// not served yet).
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
    if h.flags != Flags::NONE {
        return Err(DecodeError::Unknown {
            field: "flags",
            value: h.flags.0.into(),
        });
    }
    Ok(())
}
