//! A minimal ijam client over blocking std sockets, decoding replies the way the
//! upstream C client does.

use registrar::core::random;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use registrar::core::crypto::RsaPublicKey;
use registrar::wire::ijam::{
    CERT_REQUEST, NetworkId, NodeArch, NodeKey, NodeType, Passphrase, RegisterRequest, StateCode,
};
use uuid::Uuid;

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// The raw certificate reply (exactly what arrives for one request).
pub fn fetch_certificate(cert: SocketAddr) -> Vec<u8> {
    let mut stream = connect(cert);
    stream.write_all(&CERT_REQUEST).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    reply
}

pub fn public_key(cert: SocketAddr) -> RsaPublicKey {
    RsaPublicKey::from_pem(&fetch_certificate(cert)).expect("certificate reply parses")
}

pub fn request(
    node_id: Option<Uuid>,
    network: &str,
    passphrase: &str,
    key: [u8; 32],
) -> RegisterRequest {
    RegisterRequest {
        node_id,
        network_id: NetworkId::new(network).unwrap(),
        passphrase: Passphrase::new(passphrase).unwrap(),
        node_key: NodeKey(key),
        node_type: NodeType::Device,
        node_arch: NodeArch::X86Ubuntu,
    }
}

pub fn random_key() -> [u8; 32] {
    random::bytes().unwrap()
}

/// One request on a fresh connection: write, half-close, read the reply to EOF (a
/// reset counts as EOF: the server closes on garbage without reading all of it).
pub fn tcp_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = connect(addr);
    // The server may close first (garbage): then the write or the half-close fails,
    // and what it sent before closing is still read below.
    let _ = stream
        .write_all(bytes)
        .and_then(|()| stream.shutdown(Shutdown::Write));
    let mut reply = Vec::new();
    match stream.read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("reading the reply: {e}"),
    }
    reply
}

pub fn udp_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    socket.send_to(bytes, addr).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf).expect("udp reply");
    assert_eq!(from, addr);
    buf[..n].to_vec()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

pub fn exchange(transport: Transport, tcp: SocketAddr, udp: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    match transport {
        Transport::Tcp => tcp_exchange(tcp, bytes),
        Transport::Udp => udp_exchange(udp, bytes),
    }
}

/// Decodes a 200 reply as `ijamreg` does (`registrar::client::open_register_reply`).
pub fn decode_reply_upstream(reply: &[u8], key: &[u8; 32]) -> Uuid {
    assert_eq!(
        &reply[..2.min(reply.len())],
        &[0xc8, 0x00],
        "status 200: {reply:02x?}"
    );
    registrar::client::open_register_reply(reply, &NodeKey(*key)).expect("reply verifies")
}

pub fn state_frame(node_id: Uuid, key: &[u8; 32], code: StateCode) -> Vec<u8> {
    state_frame_from_block(node_id, key, code.plaintext())
}

pub fn state_frame_from_block(node_id: Uuid, key: &[u8; 32], block: [u8; 16]) -> Vec<u8> {
    let iv: [u8; 16] = random::bytes().unwrap();
    registrar::client::seal_state_block(node_id, &NodeKey(*key), iv, block).to_vec()
}

/// Each request on a connection of its own, all connected first and sent at once (a
/// barrier); the replies in request order.
pub fn tcp_exchange_all_at_once(addr: SocketAddr, requests: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(requests.len()));
    let senders: Vec<_> = requests
        .into_iter()
        .map(|bytes| {
            let barrier = std::sync::Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut stream = connect(addr);
                barrier.wait();
                stream.write_all(&bytes).unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
                let mut reply = Vec::new();
                stream.read_to_end(&mut reply).unwrap();
                reply
            })
        })
        .collect();
    senders.into_iter().map(|s| s.join().unwrap()).collect()
}

/// A TCP connection from a chosen local address, e.g. `127.0.0.2:0` for a source of its
/// own (std has no bind-before-connect).
pub fn connect_from(local: SocketAddr, remote: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(remote),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&remote.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}
