//! The ijam exchanges over blocking std sockets (DESIGN.md "The `ijam` flow"). The
//! frames, AES and RSA come from the `registrar` library; this module only moves
//! bytes and classifies what goes wrong (see `exit.rs`).

use registrar::core::random;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Result;
use registrar::core::crypto::RsaPublicKey;
use registrar::wire::ijam::{self, CERT_REPLY_MIN_LEN, CERT_REQUEST, NodeKey, StateCode, Status};
use uuid::Uuid;

use crate::exit::{Kind, fail};

/// A PEM longer than this is not a public key we could use.
const MAX_CERT_REPLY: usize = 16 * 1024;
/// Error replies are a status and a short reason; the rest is ignored.
const MAX_ERROR_REPLY: usize = 2 + 64;
const _: () = assert!(ijam::REGISTER_REPLY_LEN <= MAX_ERROR_REPLY);
/// After the status of an error reply, how long to wait for more of its reason.
const REASON_GRACE: Duration = Duration::from_millis(200);
const PEM_END: &[u8] = b"-----END PUBLIC KEY-----";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// Where the server is and how patient to be with it.
#[derive(Debug, Clone)]
pub struct Server {
    pub host: String,
    /// Per exchange (connect, or each UDP attempt), and per reply.
    pub timeout: Duration,
    /// UDP only: resends of the same datagram after a timeout.
    pub retries: u32,
}

/// What a port is called in messages.
fn what(port_name: &str, port: u16, transport: Transport) -> String {
    format!("{port_name} port {port}/{}", transport.name())
}

impl Server {
    fn resolve(&self, port: u16) -> Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = (self.host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| {
                fail(
                    Kind::Unreachable,
                    format!("cannot resolve {}: {e}", self.host),
                )
            })?
            .collect();
        if addrs.is_empty() {
            return Err(fail(
                Kind::Unreachable,
                format!("{} has no address", self.host),
            ));
        }
        Ok(addrs)
    }

    /// A TCP read or write that failed mid-exchange: the server went away or stalled.
    fn tcp_failure(
        &self,
        peer: std::net::SocketAddr,
        port_name: &str,
        port: u16,
        e: &io::Error,
    ) -> anyhow::Error {
        fail(
            Kind::Unreachable,
            format!(
                "{peer} ({}): {}",
                what(port_name, port, Transport::Tcp),
                io_reason(e, self.timeout)
            ),
        )
    }

    fn connect(&self, port: u16, port_name: &str) -> Result<TcpStream> {
        let mut last = None;
        for addr in self.resolve(port)? {
            match TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(stream) => {
                    stream.set_write_timeout(Some(self.timeout))?;
                    stream.set_nodelay(true)?;
                    return Ok(stream);
                }
                Err(e) => last = Some((addr, e)),
            }
        }
        let (addr, e) = last.expect("at least one address");
        Err(fail(
            Kind::Unreachable,
            format!(
                "cannot connect to {addr} ({}): {}",
                what(port_name, port, Transport::Tcp),
                io_reason(&e, self.timeout)
            ),
        ))
    }

    /// Fetches the server's RSA public key from the certificate port (always TCP).
    pub fn public_key(&self, port: u16) -> Result<RsaPublicKey> {
        let name = "certificate";
        let mut stream = self.connect(port, name)?;
        let peer = stream.peer_addr()?;
        let io_fail = |e: io::Error| self.tcp_failure(peer, name, port, &e);
        stream.write_all(&CERT_REQUEST).map_err(io_fail)?;
        // The server keeps the connection open: read until the PEM's END line, the
        // padded minimum, or the server's close, whichever comes first.
        let deadline = Instant::now() + self.timeout;
        let mut reply = Vec::with_capacity(CERT_REPLY_MIN_LEN);
        let mut buf = [0u8; 4096];
        while !cert_reply_complete(&reply) {
            if reply.len() >= MAX_CERT_REPLY {
                return Err(fail(
                    Kind::BadReply,
                    format!(
                        "certificate reply from {peer}: no PEM end within {MAX_CERT_REPLY} bytes"
                    ),
                ));
            }
            let want = if reply.len() < CERT_REPLY_MIN_LEN {
                CERT_REPLY_MIN_LEN - reply.len()
            } else {
                buf.len()
            };
            let n = read_before(&mut stream, &mut buf[..want], deadline).map_err(io_fail)?;
            if n == 0 {
                if reply.is_empty() {
                    return Err(fail(
                        Kind::Unreachable,
                        format!("{peer} closed the certificate connection without a reply"),
                    ));
                }
                // A shorter, unpadded PEM from a server that closes: use what came.
                break;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        RsaPublicKey::from_pem(&reply).map_err(|e| {
            fail(
                Kind::BadReply,
                format!("certificate reply from {peer} is not a usable public key: {e}"),
            )
        })
    }

    /// One registration: the ciphertext out, the raw reply back. Over UDP the same
    /// bytes are resent on timeout (the server's replay cache answers a byte-identical
    /// retry with the same node id; OAEP is randomised, so never re-encrypt).
    pub fn register(&self, port: u16, transport: Transport, ciphertext: &[u8]) -> Result<Vec<u8>> {
        let name = "registration";
        match transport {
            Transport::Udp => self.udp_exchange(port, name, ciphertext),
            Transport::Tcp => {
                let mut stream = self.connect(port, name)?;
                self.tcp_exchange(&mut stream, port, name, ciphertext, |status| {
                    if status == Status::OK {
                        Some(ijam::REGISTER_REPLY_LEN)
                    } else {
                        None
                    }
                })
            }
        }
    }

    /// One state request (48 bytes); the reply is the 2-byte status, and a reason
    /// text after a refusal.
    pub fn state(&self, port: u16, transport: Transport, frame: &[u8]) -> Result<Vec<u8>> {
        let name = "state";
        match transport {
            Transport::Udp => self.udp_exchange(port, name, frame),
            Transport::Tcp => {
                let mut stream = self.connect(port, name)?;
                // A refusal carries the original's text after the status.
                self.tcp_exchange(&mut stream, port, name, frame, |status| {
                    (status == Status::OK).then_some(ijam::STATE_REPLY_LEN)
                })
            }
        }
    }

    /// Writes `request`, reads the 2-byte status, then as many bytes as `total_len`
    /// says for that status; `None` means an error reply: its reason is read until a
    /// short pause or [`MAX_ERROR_REPLY`].
    fn tcp_exchange(
        &self,
        stream: &mut TcpStream,
        port: u16,
        port_name: &str,
        request: &[u8],
        total_len: impl Fn(Status) -> Option<usize>,
    ) -> Result<Vec<u8>> {
        let peer = stream.peer_addr()?;
        let io_fail = |e: io::Error| self.tcp_failure(peer, port_name, port, &e);
        stream.write_all(request).map_err(io_fail)?;
        let deadline = Instant::now() + self.timeout;
        let mut reply = [0u8; MAX_ERROR_REPLY];
        let mut len = 0;
        while len < 2 {
            let n = read_before(stream, &mut reply[len..2], deadline).map_err(io_fail)?;
            if n == 0 {
                return Err(if len == 0 {
                    fail(
                        Kind::Unreachable,
                        format!("{peer} closed the {port_name} connection without a reply"),
                    )
                } else {
                    fail(
                        Kind::BadReply,
                        format!("{port_name} reply from {peer}: 1 byte"),
                    )
                });
            }
            len += n;
        }
        let status = Status(u16::from_le_bytes([reply[0], reply[1]]));
        match total_len(status) {
            Some(total) => {
                while len < total {
                    let n =
                        read_before(stream, &mut reply[len..total], deadline).map_err(io_fail)?;
                    if n == 0 {
                        return Err(fail(
                            Kind::BadReply,
                            format!(
                                "{port_name} reply from {peer}: status {status} then only {len} of \
                                 {total} bytes before the connection closed"
                            ),
                        ));
                    }
                    len += n;
                }
            }
            None => {
                let grace = Instant::now() + REASON_GRACE;
                while len < MAX_ERROR_REPLY {
                    match read_before(stream, &mut reply[len..MAX_ERROR_REPLY], grace) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                }
            }
        }
        Ok(reply[..len].to_vec())
    }

    fn udp_exchange(&self, port: u16, port_name: &str, request: &[u8]) -> Result<Vec<u8>> {
        let addr = self.resolve(port)?[0];
        let local: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local)?;
        let where_ = format!("{addr} ({})", what(port_name, port, Transport::Udp));
        // Connected: replies from anyone else are filtered out, and an ICMP "port
        // unreachable" surfaces as ConnectionRefused.
        socket.connect(addr)?;
        socket.set_read_timeout(Some(self.timeout))?;
        let attempts = 1 + self.retries;
        let mut buf = [0u8; 2048];
        for attempt in 1..=attempts {
            socket.send(request).map_err(|e| {
                fail(
                    Kind::Unreachable,
                    format!("{where_}: {}", io_reason(&e, self.timeout)),
                )
            })?;
            match socket.recv(&mut buf) {
                Ok(n) => return Ok(buf[..n].to_vec()),
                Err(e) if is_timeout(&e) => {
                    if attempt < attempts {
                        eprintln!(
                            "note: no reply from {where_} within {}; resending the same \
                             request (attempt {} of {attempts})",
                            humantime::format_duration(self.timeout),
                            attempt + 1
                        );
                    }
                }
                Err(e) => {
                    return Err(fail(
                        Kind::Unreachable,
                        format!("{where_}: {}", io_reason(&e, self.timeout)),
                    ));
                }
            }
        }
        Err(fail(
            Kind::Unreachable,
            format!(
                "no reply from {where_} after {attempts} attempt{} of {} each",
                if attempts == 1 { "" } else { "s" },
                humantime::format_duration(self.timeout)
            ),
        ))
    }
}

/// The certificate reply is complete once the PEM has ended (its END line) or the
/// padded minimum is in: the original servers send a 2048-bit key's 451-byte PEM
/// unpadded and keep the connection open, Registrar pads to 800 bytes (what `ijamreg`
/// reads).
fn cert_reply_complete(reply: &[u8]) -> bool {
    let text = &reply[..reply.iter().position(|&b| b == 0).unwrap_or(reply.len())];
    let padded = text.len() < reply.len();
    text.windows(PEM_END.len()).any(|w| w == PEM_END)
        || (padded && reply.len() >= CERT_REPLY_MIN_LEN)
}

/// One read that gives up at `deadline` (TimedOut).
fn read_before(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn io_reason(e: &io::Error, timeout: Duration) -> String {
    if is_timeout(e) {
        format!("timed out after {}", humantime::format_duration(timeout))
    } else {
        e.to_string()
    }
}

/// The node id in a 200 registration reply, decoded as the upstream client does
/// (`registrar::client::open_register_reply`).
pub fn decode_register_reply(reply: &[u8], key: &NodeKey) -> Result<Uuid> {
    let id = registrar::client::open_register_reply(reply, key).map_err(|e| {
        fail(
            Kind::BadReply,
            format!("registration reply does not verify under our node key: {e}"),
        )
    })?;
    if id.is_nil() {
        return Err(fail(
            Kind::BadReply,
            "registration reply: the node id is all zeros",
        ));
    }
    Ok(id)
}

/// `node_id ‖ IV ‖ AES-256-CBC(node_key, IV, code)`, 48 bytes, with a fresh IV.
pub fn state_frame(node_id: Uuid, key: &NodeKey, code: StateCode) -> Result<Vec<u8>> {
    let iv: [u8; 16] = random::bytes()?;
    Ok(registrar::client::seal_state_request(node_id, key, iv, code).to_vec())
}

/// A reply's reason text, printable and bounded, for messages.
pub fn reason_text(rest: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(rest)
        .chars()
        .flat_map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                vec![c]
            } else {
                c.escape_default().collect()
            }
        })
        .collect();
    text.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn vector(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/vectors/ijam")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn decodes_the_captured_replies() {
        for (reply, key, id) in [
            (
                "reg4096_response.bin",
                "reg4096_node_key.bin",
                "reg4096_node_id.bin",
            ),
            (
                "reg2048_response.bin",
                "reg2048_node_key.bin",
                "reg2048_node_id.bin",
            ),
        ] {
            let key = NodeKey(vector(key).try_into().unwrap());
            let got = decode_register_reply(&vector(reply), &key).unwrap();
            assert_eq!(got.as_bytes().as_slice(), vector(id));
        }
    }

    #[test]
    fn a_reply_under_another_key_or_truncated_fails_verification() {
        let reply = vector("reg4096_response.bin");
        let wrong = NodeKey([1; 32]);
        let e = decode_register_reply(&reply, &wrong).unwrap_err();
        assert_eq!(crate::exit::classify(&e).0, Kind::BadReply);
        let key = NodeKey(vector("reg4096_node_key.bin").try_into().unwrap());
        let e = decode_register_reply(&reply[..49], &key).unwrap_err();
        assert_eq!(crate::exit::classify(&e).0, Kind::BadReply);
    }

    #[test]
    fn certificate_replies_end_at_the_pem_end_or_the_padded_minimum() {
        let pem4096 = vector("cert_response_rsa4096.pem");
        assert_eq!(pem4096.len(), CERT_REPLY_MIN_LEN);
        assert!(!cert_reply_complete(&pem4096[..700]));
        assert!(cert_reply_complete(&pem4096));
        // The original servers send a 2048-bit PEM unpadded and keep the socket open.
        let mut pem2048 = vector("cert_response_rsa2048.pem");
        assert_eq!(pem2048.len(), 451);
        assert!(cert_reply_complete(&pem2048), "its END line is in");
        assert!(!cert_reply_complete(&pem2048[..400]));
        pem2048.resize(CERT_REPLY_MIN_LEN, 0);
        assert!(cert_reply_complete(&pem2048));
        let mut long = vec![b'A'; CERT_REPLY_MIN_LEN + 10];
        assert!(!cert_reply_complete(&long), "a longer PEM still unfinished");
        long.extend_from_slice(PEM_END);
        assert!(cert_reply_complete(&long));
        assert!(RsaPublicKey::from_pem(&pem2048).is_ok());
    }

    #[test]
    fn reasons_are_printable() {
        assert_eq!(reason_text(b"Invalid passphrase."), "Invalid passphrase.");
        assert_eq!(reason_text(b"a\nb\x00"), "a\\nb\\u{0}");
    }
}
