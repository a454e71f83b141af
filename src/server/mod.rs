//! tokio glue: listeners on already-bound sockets, one task per TCP connection, one
//! task per UDP datagram, all tracked for a graceful shutdown.
//!
//! Only a dead socket ends a listener: a bad peer is logged and dropped.

pub mod admission;
pub mod envelope;
pub mod metrics;
pub mod pool;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::codec::FixedFrameCodec;
use crate::flow::ijam::{IjamError, IjamFlow, RegisterRandomness};
use crate::store::Store;
use crate::wire::ijam::{self, CERT_REQUEST, STATE_REQUEST_LEN};
use admission::RateLimiter;
use pool::CryptoPool;

/// Largest UDP datagram we read whole; longer ones are truncated and so rejected.
pub(crate) const MAX_DATAGRAM: usize = 65_536;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A TCP connection with no complete frame for this long is closed (idle, or a
    /// partial frame dribbled in).
    pub idle_timeout: Duration,
    /// Open TCP connections across all ports; more are closed on accept. Every server
    /// built from clones of one config shares it.
    pub connections: ConnectionLimit,
    /// Undecryptable or malformed frames in a row before a TCP connection is closed.
    pub max_bad_frames: u32,
    /// UDP requests in flight per port; datagrams beyond it are dropped.
    pub max_udp_in_flight: usize,
    /// Registrations per second per source address (0: no limit), and the burst.
    pub rate_per_source: f64,
    pub burst: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            idle_timeout: Duration::from_secs(30),
            connections: ConnectionLimit::new(10_000),
            max_bad_frames: 4,
            max_udp_in_flight: 4096,
            rate_per_source: 100.0,
            burst: 1000,
        }
    }
}

/// The cap on open TCP connections, one for all the ports of a listener: cloning it
/// shares it.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Self {
        ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A permit for one more connection, held while it is open; `None` at the cap.
    pub fn try_acquire(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.permits).try_acquire_owned().ok()
    }
}

/// The five sockets of the ijam flow, bound by the caller (tests bind port 0).
pub struct IjamSockets {
    pub cert: TcpListener,
    pub reg_tcp: TcpListener,
    pub reg_udp: UdpSocket,
    pub state_tcp: TcpListener,
    pub state_udp: UdpSocket,
}

/// A socket that could not be bound, named as the operator knows it.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({port}, {option}): {source}{}", bind_hint(.source, .option))]
pub struct BindError {
    /// Which port: "certificate port", "registration port", …
    pub port: &'static str,
    /// The option that sets it, for the hint.
    pub option: &'static str,
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

fn bind_hint(e: &io::Error, option: &str) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => format!(
            "; another program (a second registrar, or the servers it replaces) holds it: \
             stop that one, or choose another port with {option}"
        ),
        io::ErrorKind::PermissionDenied => {
            "; ports below 1024 need privileges (CAP_NET_BIND_SERVICE)".into()
        }
        io::ErrorKind::AddrNotAvailable => {
            "; that address is not on this host: check --bind".into()
        }
        _ => String::new(),
    }
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
    pub fn describe(&self) -> io::Result<String> {
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

/// A TCP listener with a deep accept backlog, so a burst of thousands of connects is
/// queued instead of falling back to SYN retries.
pub(crate) fn listen(ip: std::net::IpAddr, port: u16) -> io::Result<TcpListener> {
    let socket = if ip.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind((ip, port).into())?;
    socket.listen(4096)
}

/// What a UDP socket asks the kernel to buffer before the listener reads: a fleet that
/// powers on at once, or a gateway with requests in flight, sends datagrams in bursts,
/// and the default (~208 KiB, ~270 small datagrams) dropped some of a 256-datagram
/// burst. The kernel caps it at net.core.rmem_max.
pub const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// A UDP socket with a receive buffer of [`UDP_RECEIVE_BUFFER`] (or what the kernel
/// allows).
pub(crate) fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER) {
        warn!(%addr, error = %e, "cannot enlarge the UDP receive buffer; keeping the default");
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// TCP and UDP on the same port number; `port` and `option` name it in an error.
pub(crate) async fn bind_pair(
    ip: std::net::IpAddr,
    number: u16,
    port: &'static str,
    option: &'static str,
) -> Result<(TcpListener, UdpSocket), BindError> {
    let error = |addr, source| BindError {
        port,
        option,
        addr,
        source,
    };
    let addr = SocketAddr::from((ip, number));
    if number != 0 {
        let tcp = listen(ip, number).map_err(|e| error(addr, e))?;
        let udp = bind_udp(addr).map_err(|e| error(addr, e))?;
        return Ok((tcp, udp));
    }
    let mut last = io::Error::other("no free port for TCP and UDP");
    for _ in 0..64 {
        let tcp = listen(ip, 0).map_err(|e| error(addr, e))?;
        let local = tcp.local_addr().map_err(|e| error(addr, e))?;
        match bind_udp(local) {
            Ok(udp) => return Ok((tcp, udp)),
            Err(e) => last = e,
        }
    }
    Err(error(addr, last))
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Everything a connection task needs.
pub struct IjamServer<S> {
    pub flow: Arc<IjamFlow<S>>,
    pub pool: CryptoPool,
    pub config: ServerConfig,
    limiter: Option<RateLimiter>,
    /// Cancelled at shutdown: connections stop reading new requests, but a request
    /// already read is answered.
    shutdown: CancellationToken,
}

impl<S: Store> IjamServer<S> {
    pub fn new(
        flow: Arc<IjamFlow<S>>,
        pool: CryptoPool,
        config: ServerConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(IjamServer {
            limiter: RateLimiter::new(config.rate_per_source, config.burst),
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
        let s = Arc::clone(self);
        tracker.spawn(accept_loop(
            "cert",
            cert,
            Arc::clone(self),
            cancel.clone(),
            tracker.clone(),
            move |stream, peer| {
                let s = Arc::clone(&s);
                async move { s.cert_connection(stream, peer).await }
            },
        ));
        let s = Arc::clone(self);
        tracker.spawn(accept_loop(
            "reg",
            reg_tcp,
            Arc::clone(self),
            cancel.clone(),
            tracker.clone(),
            move |stream, peer| {
                let s = Arc::clone(&s);
                async move { s.register_connection(stream, peer).await }
            },
        ));
        let s = Arc::clone(self);
        tracker.spawn(accept_loop(
            "state",
            state_tcp,
            Arc::clone(self),
            cancel.clone(),
            tracker.clone(),
            move |stream, peer| {
                let s = Arc::clone(&s);
                async move { s.state_connection(stream, peer).await }
            },
        ));
        tracker.spawn(udp_loop(
            reg_udp,
            Arc::clone(self),
            cancel.clone(),
            tracker.clone(),
            Port::Register,
        ));
        tracker.spawn(udp_loop(
            state_udp,
            Arc::clone(self),
            cancel,
            tracker.clone(),
            Port::State,
        ));
    }

    async fn cert_connection(&self, mut stream: TcpStream, peer: SocketAddr) {
        let mut request = [0u8; 4];
        loop {
            let read = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                read = tokio::time::timeout(self.config.idle_timeout, stream.read_exact(&mut request)) => read,
            };
            let started = Instant::now();
            match read {
                Ok(Ok(_)) if request == CERT_REQUEST => {
                    info!(flow = "ijam", port = "cert", transport = "tcp", %peer, outcome = "certificate");
                    let keys = self.flow.keys();
                    let sent = stream.write_all(keys.certificate_reply()).await;
                    metrics::request("ijam_cert", "tcp", "certificate", started.elapsed());
                    if sent.is_err() {
                        return;
                    }
                }
                Ok(Ok(_)) => {
                    warn!(flow = "ijam", port = "cert", %peer, "not a certificate request; closing");
                    metrics::request("ijam_cert", "tcp", "bad_request", started.elapsed());
                    metrics::connection_closed("cert", "bad_request");
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => {
                    debug!(flow = "ijam", port = "cert", %peer, "idle; closing");
                    metrics::connection_closed("cert", "idle");
                    return;
                }
            }
        }
    }

    async fn register_connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        // A connection frames by the key in force when it opened (a rotation keeps
        // the size, see `registrar key rotate`).
        let frame_len = self.flow.keys().ciphertext_len();
        self.frame_loop(stream, peer, "reg", frame_len, |s, frame| async move {
            s.register_request(frame, peer, "tcp").await
        })
        .await
    }

    async fn state_connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        self.frame_loop(
            stream,
            peer,
            "state",
            STATE_REQUEST_LEN,
            |s, frame| async move { Some(s.state_request(frame, peer, "tcp").await) },
        )
        .await
    }

    /// Reads fixed-size frames until EOF, the idle timeout, or too many bad frames.
    async fn frame_loop<F, Fut>(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        port: &'static str,
        len: usize,
        handle: F,
    ) where
        F: Fn(Arc<Self>, Bytes) -> Fut,
        Fut: Future<Output = Option<(Vec<u8>, bool)>>,
    {
        let _ = stream.set_nodelay(true);
        let mut framed = Framed::new(stream, FixedFrameCodec::new(len));
        let mut bad_in_a_row = 0;
        loop {
            let next = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                next = tokio::time::timeout(self.config.idle_timeout, framed.next()) => next,
            };
            let frame = match next {
                Ok(Some(Ok(frame))) => frame.freeze(),
                Ok(Some(Err(_)) | None) => return,
                Err(_) => {
                    let pending = framed.read_buffer().len();
                    debug!(%peer, port, pending, "idle or partial frame; closing");
                    metrics::connection_closed(
                        port,
                        if pending == 0 {
                            "idle"
                        } else {
                            "partial_frame"
                        },
                    );
                    return;
                }
            };
            debug!(%peer, port, "request received");
            let Some((reply, bad)) = handle(Arc::clone(&self), frame).await else {
                continue;
            };
            if framed.send(Bytes::from(reply)).await.is_err() {
                return;
            }
            bad_in_a_row = if bad { bad_in_a_row + 1 } else { 0 };
            if bad_in_a_row >= self.config.max_bad_frames {
                warn!(%peer, port, bad_in_a_row, "too many bad frames in a row; closing");
                metrics::connection_closed(port, "bad_frames");
                return;
            }
        }
    }

    /// One registration, whatever the transport: the reply bytes and whether the
    /// frame was bad (undecryptable or malformed); `None` when a UDP request is shed
    /// (dropped without a reply, as a datagram can be).
    pub async fn register_request(
        &self,
        ciphertext: Bytes,
        peer: SocketAddr,
        transport: &'static str,
    ) -> Option<(Vec<u8>, bool)> {
        const FLOW: &str = "ijam_register";
        let started = Instant::now();
        let result = async {
            if let Some(limiter) = &self.limiter
                && !limiter.admit(peer.ip(), started)
            {
                return Err(IjamError::RateLimited);
            }
            let flow = Arc::clone(&self.flow);
            let now = now_ms();
            let opened = self
                .pool
                .run(move || flow.open_request(&ciphertext, now))
                .await;
            metrics::crypto_queue_depth(self.pool.depth());
            let request = opened.map_err(|_| IjamError::Overloaded)??;
            let rand = RegisterRandomness::from_os().map_err(IjamError::Crypto)?;
            self.flow
                .register(&request, now_ms(), rand)
                .await
                .map(|r| (r, request))
        }
        .await;
        let latency = started.elapsed();
        let latency_us = latency.as_micros() as u64;
        match result {
            Ok(((registered, reply), request)) => {
                info!(
                    flow = "ijam", port = "reg", transport, %peer,
                    outcome = registered.outcome(),
                    node_id = %registered.node_id(),
                    network = request.network_id.as_str(),
                    latency_us,
                );
                metrics::request(FLOW, transport, registered.outcome(), latency);
                Some((reply.to_vec(), false))
            }
            Err(e) => {
                log_failure("reg", transport, peer, &e, latency_us);
                metrics::request(FLOW, transport, e.outcome(), latency);
                match &e {
                    IjamError::Overloaded => metrics::shed(FLOW, transport),
                    IjamError::RateLimited => metrics::rate_limited(FLOW, transport),
                    IjamError::Store(_) => metrics::store_error(FLOW),
                    _ => {}
                }
                if matches!(e, IjamError::Overloaded) && transport == "udp" {
                    return None;
                }
                let bad = matches!(e, IjamError::Undecryptable | IjamError::Malformed(_));
                Some((e.register_reply(), bad))
            }
        }
    }

    pub async fn state_request(
        &self,
        frame: Bytes,
        peer: SocketAddr,
        transport: &'static str,
    ) -> (Vec<u8>, bool) {
        const FLOW: &str = "ijam_state";
        let started = Instant::now();
        let result = self
            .flow
            .change_state(&frame, &peer.ip().to_string(), now_ms())
            .await;
        let latency = started.elapsed();
        let latency_us = latency.as_micros() as u64;
        match result {
            Ok((node_id, code)) => {
                info!(flow = "ijam", port = "state", transport, %peer, outcome = "changed", %node_id, to = ?code, latency_us);
                metrics::request(FLOW, transport, "changed", latency);
                (ijam::state_reply(ijam::Status::OK).to_vec(), false)
            }
            Err(e) => {
                log_failure("state", transport, peer, &e, latency_us);
                metrics::request(FLOW, transport, e.outcome(), latency);
                if let IjamError::Store(_) = e {
                    metrics::store_error(FLOW);
                }
                let bad = matches!(e, IjamError::Malformed(_));
                (e.state_reply().to_vec(), bad)
            }
        }
    }
}

fn log_failure(
    port: &'static str,
    transport: &'static str,
    peer: SocketAddr,
    e: &IjamError,
    latency_us: u64,
) {
    match e {
        // The store's comings and goings are logged once per change by the store; a
        // crypto failure is the operator's concern; refusals under load are summed once
        // a second (metrics::report_refusals); the rest is the peer's.
        IjamError::Crypto(_) => {
            warn!(flow = "ijam", port, transport, %peer, outcome = e.outcome(), error = %e, latency_us)
        }
        IjamError::Overloaded | IjamError::RateLimited => {
            debug!(flow = "ijam", port, transport, %peer, outcome = e.outcome(), error = %e, latency_us)
        }
        _ => {
            info!(flow = "ijam", port, transport, %peer, outcome = e.outcome(), error = %e, latency_us)
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Port {
    Register,
    State,
}

impl Port {
    fn flow(self) -> &'static str {
        match self {
            Port::Register => "ijam_register",
            Port::State => "ijam_state",
        }
    }
}

async fn accept_loop<S, F, Fut>(
    port: &'static str,
    listener: TcpListener,
    server: Arc<IjamServer<S>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    serve: F,
) where
    S: Store,
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends pass; back off a little so we do not spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(permit) = server.config.connections.try_acquire() else {
            // One line per refusal would flood the log under attack: the metric counts.
            debug!(%peer, max = server.config.connections.max(), "connection limit reached; closing");
            metrics::connection_refused(port);
            continue;
        };
        let conn = serve(stream, peer);
        tracker.spawn(async move {
            let _open = metrics::OpenConnection::new();
            // The connection ends itself at shutdown, after answering what it has read.
            conn.await;
            drop(permit);
        });
    }
}

async fn udp_loop<S: Store>(
    socket: UdpSocket,
    server: Arc<IjamServer<S>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    port: Port,
) {
    let max_in_flight = server.config.max_udp_in_flight;
    serve_datagrams(
        socket,
        max_in_flight,
        port.flow(),
        cancel,
        tracker,
        move |datagram, peer| {
            let server = Arc::clone(&server);
            async move {
                let reply = match port {
                    Port::Register => server.register_request(datagram, peer, "udp").await,
                    Port::State => Some(server.state_request(datagram, peer, "udp").await),
                };
                reply.map(|(reply, _)| reply)
            }
        },
    )
    .await
}

/// Serves a UDP socket until `cancel`: one task per datagram, at most `max_in_flight`
/// at once (the rest are dropped and counted as shed for `flow`), each reply sent back
/// to its datagram's source. Only a dead socket would end it; receive errors (ICMP
/// from earlier sends) are skipped.
pub(crate) async fn serve_datagrams<F, Fut>(
    socket: UdpSocket,
    max_in_flight: usize,
    flow: &'static str,
    cancel: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(Bytes, SocketAddr) -> Fut,
    Fut: Future<Output = Option<Vec<u8>>> + Send + 'static,
{
    let socket = Arc::new(socket);
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let received = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        let (len, peer) = match received {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "udp receive error");
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            debug!(%peer, "udp requests in flight at their limit; dropping datagram");
            metrics::shed(flow, "udp");
            continue;
        };
        let reply = handle(Bytes::copy_from_slice(&buf[..len]), peer);
        let socket = Arc::clone(&socket);
        tracker.spawn(async move {
            if let Some(reply) = reply.await
                && let Err(e) = socket.send_to(&reply, peer).await
            {
                debug!(%peer, error = %e, "udp send failed");
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn udp_sockets_get_a_receive_buffer_for_bursts() {
        let (_tcp, udp) = bind_pair("127.0.0.1".parse().unwrap(), 0, "test port", "--test")
            .await
            .unwrap();
        let granted = socket2::SockRef::from(&udp).recv_buffer_size().unwrap();
        // Linux grants the smaller of the request and rmem_max, and reports it doubled
        // (bookkeeping overhead).
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(UDP_RECEIVE_BUFFER);
        assert!(
            granted >= 2 * UDP_RECEIVE_BUFFER.min(cap),
            "receive buffer {granted} B, rmem_max {cap} B"
        );
    }
}
