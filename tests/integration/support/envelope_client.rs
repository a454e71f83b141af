//! A minimal envelope client over blocking std sockets: frames from
//! `registrar::client::pubkey`, replies read whole and CRC-checked.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use registrar::client::pubkey::{self, DeviceKey};
use registrar::wire::envelope::{self, Header, Status};
use registrar::wire::pubkey::{DeviceId, Nonce};

use super::ijam_client::Transport;
use super::listener::Listener;

pub const TIMEOUT: Duration = Duration::from_secs(20);
/// Replies are small; this bounds what the client accepts.
const MAX_REPLY_PAYLOAD: u32 = 64 * 1024;

/// A parsed reply frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub header: Header,
    pub payload: Vec<u8>,
}

impl Reply {
    pub fn status(&self) -> Status {
        self.header.status
    }

    fn parse(bytes: &[u8]) -> Reply {
        let (header, payload) = pubkey::parse_reply(bytes, MAX_REPLY_PAYLOAD)
            .unwrap_or_else(|e| panic!("reply is no frame ({e}): {bytes:02x?}"));
        Reply {
            header,
            payload: payload.to_vec(),
        }
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// Reads one whole frame; `None` at a clean end of stream (or a reset, which the
/// server's close after garbage may cause).
pub fn read_frame(stream: &mut TcpStream) -> Option<Reply> {
    let mut header = [0u8; envelope::HEADER_LEN];
    if let Err(e) = stream.read_exact(&mut header) {
        return match e.kind() {
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset => None,
            _ => panic!("reading a reply header: {e}"),
        };
    }
    let len = u32::from_be_bytes(header[12..16].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; len + envelope::TRAILER_LEN];
    stream
        .read_exact(&mut rest)
        .expect("the rest of the reply frame");
    Some(Reply::parse(&[&header[..], &rest].concat()))
}

/// Everything that arrives until the server closes: replies, then EOF.
pub fn read_to_close(stream: &mut TcpStream) -> Vec<Reply> {
    std::iter::from_fn(|| read_frame(stream)).collect()
}

/// One request on a fresh connection: write, read one reply.
pub fn tcp_exchange(addr: SocketAddr, frame: &[u8]) -> Reply {
    let mut stream = connect(addr);
    stream.write_all(frame).unwrap();
    let reply = read_frame(&mut stream).expect("a reply before the connection closed");
    let _ = stream.shutdown(Shutdown::Both);
    reply
}

pub fn udp_exchange(addr: SocketAddr, datagram: &[u8]) -> Reply {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    socket.send_to(datagram, addr).unwrap();
    let mut buf = vec![0u8; 70_000];
    let (n, from) = socket.recv_from(&mut buf).expect("udp reply");
    assert_eq!(from, addr);
    Reply::parse(&buf[..n])
}

pub fn exchange(transport: Transport, l: &Listener, frame: &[u8]) -> Reply {
    match transport {
        Transport::Tcp => tcp_exchange(l.ports.envelope_tcp, frame),
        Transport::Udp => udp_exchange(l.ports.envelope_udp, frame),
    }
}

/// A device: its id and key.
pub struct Device {
    pub id: DeviceId,
    pub key: DeviceKey,
}

impl Device {
    pub fn new(n: u8) -> Device {
        let mut id = [n; 16];
        id[0] = 0xd0; // never all zero
        Device {
            id: DeviceId::new(id).unwrap(),
            key: DeviceKey::generate().unwrap(),
        }
    }

    pub fn register(&self, t: Transport, l: &Listener) -> Reply {
        exchange(
            t,
            l,
            &pubkey::register_frame(1, self.id, &self.key).unwrap(),
        )
    }

    pub fn challenge(&self, t: Transport, l: &Listener) -> Reply {
        exchange(t, l, &pubkey::challenge_frame(2, self.id))
    }

    /// A fresh nonce (the challenge must succeed).
    pub fn nonce(&self, t: Transport, l: &Listener) -> Nonce {
        let reply = self.challenge(t, l);
        assert_eq!(reply.status(), Status::OK, "challenge: {reply:?}");
        registrar::wire::pubkey::parse_challenge_reply(&reply.payload).unwrap()
    }

    pub fn attest(&self, t: Transport, l: &Listener, nonce: Nonce) -> Reply {
        exchange(
            t,
            l,
            &pubkey::attest_frame(3, self.id, nonce, &self.key).unwrap(),
        )
    }
}
