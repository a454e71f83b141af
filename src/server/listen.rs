//! Sockets: binding them (a port in use is an error naming it), the accept loop every
//! TCP port shares (the one connection table), and the datagram loop every UDP port
//! shares.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

pub use super::connections::{Connection, ConnectionLimit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::metrics;

/// Largest UDP datagram we read whole; longer ones are truncated and so rejected.
pub(crate) const MAX_DATAGRAM: usize = 65_536;

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

/// Accepts on `listener` until `cancel`, each connection given its place in `limit`
/// (none: closed at once, counted for `port`) and served by `serve` on `tracker`.
pub(crate) async fn accept_loop<F, Fut>(
    port: &'static str,
    listener: TcpListener,
    limit: ConnectionLimit,
    cancel: CancellationToken,
    tracker: TaskTracker,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Connection) -> Fut,
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
                warn!(port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let connection = match limit.try_open(peer.ip(), port, Instant::now()) {
            Ok(connection) => connection,
            Err(refused) => {
                // One line per refusal would flood the log under attack: the metric counts.
                debug!(%peer, port, reason = refused.as_str(), "connection refused; closing");
                metrics::connection_refused(port, refused.as_str());
                continue;
            }
        };
        let conn = serve(stream, peer, connection);
        tracker.spawn(async move {
            let _open = metrics::OpenConnection::new();
            // The connection ends itself at shutdown, after answering what it has
            // read; its place in the table goes with it.
            conn.await;
        });
    }
}

/// What a connection waiting for its next request woke up to.
pub(crate) enum Wake {
    /// Bytes to read.
    Readable,
    /// Its deadline passed with no request begun.
    Deadline,
    /// Shutdown, an eviction, the peer's close, or a dead socket: end without a word.
    End,
}

/// Waits, holding no buffer, until `stream` has something to read, `deadline` passes,
/// the listener shuts down or the table evicts `connection`.
pub(crate) async fn wait_for_request(
    stream: &TcpStream,
    connection: &Connection,
    shutdown: &CancellationToken,
    deadline: tokio::time::Instant,
) -> Wake {
    let mut first = [0u8; 1];
    tokio::select! {
        _ = shutdown.cancelled() => Wake::End,
        _ = connection.evicted().cancelled() => Wake::End,
        _ = tokio::time::sleep_until(deadline) => Wake::Deadline,
        // A peek, not `readable()`: readiness may be a false positive, and a request
        // must really have begun before the connection takes a buffer.
        peeked = stream.peek(&mut first) => match peeked {
            Ok(0) | Err(_) => Wake::End,
            Ok(_) => Wake::Readable,
        },
    }
}

/// A reply datagram is at most this many times the bytes of the datagram it answers
/// (anti-amplification: a spoofed source cannot be sent more than it sent).
pub const UDP_AMPLIFICATION: usize = 3;

/// The largest reply datagram payload: what fits an IPv6 minimum MTU path without IP
/// fragments.
pub const MAX_UDP_REPLY: usize = 1232;

/// Whether a reply of `reply_len` bytes may answer a datagram of `request_len`.
pub fn udp_reply_fits(request_len: usize, reply_len: usize) -> bool {
    reply_len <= UDP_AMPLIFICATION * request_len && reply_len <= MAX_UDP_REPLY
}

/// What a UDP port sends back under the rules: the reply if it fits, else what the
/// port offers instead (the envelope's 413) if that fits, else nothing (counted).
fn fitted(
    port: &'static str,
    request_len: usize,
    reply: Vec<u8>,
    too_large: fn(&[u8]) -> Option<Vec<u8>>,
) -> Option<Vec<u8>> {
    if udp_reply_fits(request_len, reply.len()) {
        return Some(reply);
    }
    match too_large(&reply) {
        Some(instead) if udp_reply_fits(request_len, instead.len()) => {
            metrics::udp_reply_replaced(port);
            Some(instead)
        }
        _ => {
            metrics::udp_reply_withheld(port);
            None
        }
    }
}

/// How one UDP port is served by [`serve_datagrams`].
pub(crate) struct DatagramPort {
    /// The port's name in logs and metrics (`reg`, `state`, `envelope`).
    pub name: &'static str,
    /// The flow its datagrams count as when shed.
    pub flow: &'static str,
    /// Requests in flight at most; datagrams beyond it are dropped.
    pub max_in_flight: usize,
    /// What to send instead of a reply that breaks the UDP rules, if anything.
    pub too_large: fn(&[u8]) -> Option<Vec<u8>>,
}

/// Serves a UDP socket until `cancel`: one task per datagram, at most
/// `port.max_in_flight` at once (the rest are dropped and counted as shed), each reply
/// sent back to its datagram's source under the UDP rules ([`udp_reply_fits`]). Only
/// a dead socket would end it; receive errors (ICMP from earlier sends) are skipped.
pub(crate) async fn serve_datagrams<F, Fut>(
    socket: UdpSocket,
    port: DatagramPort,
    cancel: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(Bytes, SocketAddr) -> Fut,
    Fut: Future<Output = Option<Vec<u8>>> + Send + 'static,
{
    let socket = Arc::new(socket);
    let in_flight = Arc::new(Semaphore::new(port.max_in_flight));
    let DatagramPort {
        name, too_large, ..
    } = port;
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
            metrics::shed(port.flow, super::Transport::Udp);
            continue;
        };
        let reply = handle(Bytes::copy_from_slice(&buf[..len]), peer);
        let socket = Arc::clone(&socket);
        tracker.spawn(async move {
            if let Some(reply) = reply.await
                && let Some(reply) = fitted(name, len, reply, too_large)
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
