//! `registrar-node pubkey`: the device side of the pubkey flow on the envelope port
//! (schemas/pubkey.md). The device's identity is an ECDSA P-256 key (PKCS#8 PEM,
//! mode 0600) and a 16-byte id kept beside it (`<key>.id` with the extension
//! replaced: `device.pem` → `device.id`, 32 hex digits); both are made on the first
//! `register`. Frames come from `registrar::client::pubkey`; this module moves them
//! over TCP or UDP and turns statuses into exit codes (`exit.rs`).

use registrar::core::random;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use registrar::client::pubkey::{self as client, DeviceKey};
use registrar::wire::envelope::{self, Flow, Header, Kind as FrameKind, Status};
use registrar::wire::pubkey::{self as wire, DeviceId};
use serde_json::json;

use crate::exit::{EXIT_CODES_HELP, Kind, Port, fail, refused};
use crate::node_file;

/// Largest reply payload read (replies of this flow are at most 32 bytes).
const MAX_REPLY_PAYLOAD: u32 = 4096;

#[derive(Subcommand, Debug)]
pub enum PubkeyCommand {
    /// Register this device's public key under its id (made on first use).
    ///
    /// Creates the P-256 key (--key, PKCS#8 PEM, mode 0600) and a random 16-byte
    /// device id (saved beside the key as <key>.id) if they do not exist yet, signs
    /// the registration and sends it; prints the device id and the outcome. 201
    /// (registered) and 409 (already registered with this key) are successes; 403
    /// (the id is bound to another key, or revoked) and 400 (key or signature
    /// refused) exit 8: the device is locked out under this identity.
    #[command(after_help = EXIT_CODES_HELP)]
    Register(PubkeyArgs),
    /// Prove possession of the registered key: Challenge, then Attest the nonce.
    ///
    /// Prints the device id and the attestation time. 401 (bad signature) exits 3,
    /// 403 (revoked) exits 8, 404 (unknown device: register first), 409 (nonce used)
    /// and 410 (nonce expired) exit 4.
    #[command(after_help = EXIT_CODES_HELP)]
    Attest(PubkeyArgs),
}

#[derive(Args, Debug)]
pub struct PubkeyArgs {
    /// Server host name or IP address.
    #[arg(long, env = "REGISTRAR_SERVER")]
    server: String,
    /// Envelope port (TCP or UDP).
    #[arg(long, default_value_t = 8447)]
    envelope_port: u16,
    /// The device's private key (PKCS#8 PEM, mode 0600); created by the first
    /// `register`. The device id lives beside it (<key>.id).
    #[arg(long, env = "REGISTRAR_DEVICE_KEY", default_value = "./device.pem")]
    key: PathBuf,
    /// Device id, 32 hex digits (default: the one saved beside the key, or a fresh
    /// random one on the first `register`).
    #[arg(long)]
    device_id: Option<DeviceId>,
    /// Use UDP instead of TCP. A request without a reply is resent, byte for byte,
    /// --retries times.
    #[arg(long)]
    udp: bool,
    /// How long to wait to connect and for each reply (e.g. 500ms, 5s).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// UDP: resends after a timeout.
    #[arg(long, default_value_t = 3)]
    retries: u32,
}

/// What the command prints: text without --json, the object with it.
pub type Printed = (Option<String>, serde_json::Value);

pub fn run(cmd: &PubkeyCommand) -> Result<Printed> {
    match cmd {
        PubkeyCommand::Register(args) => register(args),
        PubkeyCommand::Attest(args) => attest(args),
    }
}

/// `device.pem` → `device.id`.
pub fn id_path(key: &Path) -> PathBuf {
    key.with_extension("id")
}

/// The device's key and id; `create` makes what is missing (register), otherwise a
/// missing key is a local error (attest).
fn identity(args: &PubkeyArgs, create: bool) -> Result<(DeviceKey, DeviceId)> {
    let key = match fs::read_to_string(&args.key) {
        Ok(pem) => DeviceKey::from_pkcs8_pem(&pem).map_err(|e| {
            fail(
                Kind::Local,
                format!("{} is not a P-256 PKCS#8 key: {e}", args.key.display()),
            )
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            let key = DeviceKey::generate().context("cannot generate a P-256 key")?;
            let pem = key.to_pkcs8_pem().context("cannot encode the key")?;
            node_file::write_atomically(&args.key, pem.as_bytes())
                .with_context(|| format!("cannot write the key {}", args.key.display()))?;
            eprintln!("note: new P-256 key written to {}", args.key.display());
            key
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(fail(
                Kind::Local,
                format!(
                    "no key at {}: register first (registrar-node pubkey register)",
                    args.key.display()
                ),
            ));
        }
        Err(e) => {
            return Err(fail(
                Kind::Local,
                format!("cannot read {}: {e}", args.key.display()),
            ));
        }
    };
    let id_file = id_path(&args.key);
    let saved = match fs::read_to_string(&id_file) {
        Ok(text) => Some(DeviceId::from_hex(&text).map_err(|e| {
            fail(
                Kind::Local,
                format!(
                    "{} is not a device id ({e}): 32 hex digits, not all zero",
                    id_file.display()
                ),
            )
        })?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(fail(
                Kind::Local,
                format!("cannot read {}: {e}", id_file.display()),
            ));
        }
    };
    let id = match (saved, args.device_id) {
        (Some(saved), Some(given)) if saved != given => {
            return Err(fail(
                Kind::Local,
                format!(
                    "{} holds device id {saved}, not {given}: pass the same id, or another --key",
                    id_file.display()
                ),
            ));
        }
        (Some(saved), _) => saved,
        (None, given) if create => {
            let id = match given {
                Some(id) => id,
                None => random_id()?,
            };
            node_file::write_atomically(&id_file, format!("{id}\n").as_bytes())
                .with_context(|| format!("cannot write the device id {}", id_file.display()))?;
            id
        }
        (None, Some(given)) => given,
        (None, None) => {
            return Err(fail(
                Kind::Local,
                format!(
                    "no device id at {} and no --device-id: register first",
                    id_file.display()
                ),
            ));
        }
    };
    Ok((key, id))
}

fn random_id() -> Result<DeviceId> {
    loop {
        let bytes: [u8; 16] = random::bytes().context("no randomness for the device id")?;
        if let Ok(id) = DeviceId::new(bytes) {
            return Ok(id);
        }
    }
}

fn request_id() -> Result<u32> {
    Ok(u32::from_be_bytes(
        random::bytes().context("no randomness for the request id")?,
    ))
}

fn register(args: &PubkeyArgs) -> Result<Printed> {
    let (key, id) = identity(args, true)?;
    let rid = request_id()?;
    let frame = client::register_frame(rid, id, &key).context("cannot sign the registration")?;
    let (header, _) = exchange(args, &frame, rid, wire::REGISTER)?;
    let outcome = match header.status {
        Status::CREATED => "registered",
        Status::CONFLICT => "already registered",
        status => {
            let why = match status {
                Status::FORBIDDEN => "the id is bound to another key, or revoked",
                Status::BAD_REQUEST => "key, id or signature refused",
                _ => reason(status),
            };
            return Err(refused(
                registrar::wire::ijam::Status(status.0),
                Port::PubkeyRegister,
                format!("registration refused: {status} {why} (device {id})"),
            ));
        }
    };
    Ok((
        Some(format!("{id} {outcome}")),
        json!({"device_id": id.to_hex(), "status": header.status.0, "outcome": outcome}),
    ))
}

fn attest(args: &PubkeyArgs) -> Result<Printed> {
    let (key, id) = identity(args, false)?;
    let rid = request_id()?;
    let (header, payload) = exchange(
        args,
        &client::challenge_frame(rid, id),
        rid,
        wire::CHALLENGE,
    )?;
    if header.status != Status::OK {
        return Err(refused(
            registrar::wire::ijam::Status(header.status.0),
            Port::PubkeyAttest,
            format!(
                "challenge refused: {} {} (device {id})",
                header.status,
                reason(header.status)
            ),
        ));
    }
    let nonce = wire::parse_challenge_reply(&payload)
        .map_err(|e| fail(Kind::BadReply, format!("challenge reply: {e}")))?;
    let rid = request_id()?;
    let frame = client::attest_frame(rid, id, nonce, &key).context("cannot sign the nonce")?;
    let (header, payload) = exchange(args, &frame, rid, wire::ATTEST)?;
    if header.status != Status::OK {
        return Err(refused(
            registrar::wire::ijam::Status(header.status.0),
            Port::PubkeyAttest,
            format!(
                "attestation refused: {} {} (device {id})",
                header.status,
                reason(header.status)
            ),
        ));
    }
    let at_ms = wire::parse_attest_reply(&payload)
        .map_err(|e| fail(Kind::BadReply, format!("attest reply: {e}")))?;
    let at = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(at_ms));
    Ok((
        Some(format!("{id} attested at {at}")),
        json!({"device_id": id.to_hex(), "status": 200, "attested_ms": at_ms}),
    ))
}

/// What a status means for this flow, for messages.
fn reason(status: Status) -> &'static str {
    match status {
        Status::BAD_REQUEST => "bad request",
        Status::UNAUTHORIZED => "signature or nonce refused",
        Status::FORBIDDEN => "device revoked",
        Status::NOT_FOUND => "unknown device: register first",
        Status::CONFLICT => "nonce already used",
        Status::GONE => "nonce expired",
        Status::TOO_MANY_REQUESTS => "too many requests",
        Status::SERVICE_UNAVAILABLE => "service unavailable",
        _ => "unexpected status",
    }
}

/// Sends one request and returns the reply to it (same flow, kind with bit 7, same
/// request id), over TCP or UDP.
fn exchange(
    args: &PubkeyArgs,
    frame: &[u8],
    request_id: u32,
    kind: FrameKind,
) -> Result<(Header, Vec<u8>)> {
    let addrs: Vec<SocketAddr> = (args.server.as_str(), args.envelope_port)
        .to_socket_addrs()
        .map_err(|e| {
            fail(
                Kind::Unreachable,
                format!("cannot resolve {}: {e}", args.server),
            )
        })?
        .collect();
    let addr = *addrs
        .first()
        .ok_or_else(|| fail(Kind::Unreachable, format!("{} has no address", args.server)))?;
    let transport = if args.udp { "udp" } else { "tcp" };
    let where_ = format!("{addr} (envelope port {}/{transport})", args.envelope_port);
    let io_fail = |e: io::Error| {
        fail(
            Kind::Unreachable,
            format!("{where_}: {}", io_reason(&e, args.timeout)),
        )
    };
    let mut reply = if args.udp {
        udp_exchange(args, addr, frame, request_id, &where_).map_err(io_fail)?
    } else {
        tcp_exchange(args, addrs.clone(), frame).map_err(io_fail)?
    };
    // 413 over UDP: the reply would have been more than 3x the request (the server's
    // anti-amplification rule). The same request over TCP gets it, and never has a
    // second effect (schemas/envelope.md).
    if args.udp
        && let Some(bytes) = &reply
        && let Ok((header, _)) = client::parse_reply(bytes, MAX_REPLY_PAYLOAD)
        && header.status == Status::PAYLOAD_TOO_LARGE
    {
        eprintln!("note: {where_} answered 413 (reply too large for UDP); retrying over TCP");
        reply = tcp_exchange(args, addrs, frame).map_err(io_fail)?;
    }
    let reply = reply.ok_or_else(|| {
        fail(
            Kind::Unreachable,
            format!("{where_} closed the connection without a reply"),
        )
    })?;
    let (header, payload) = client::parse_reply(&reply, MAX_REPLY_PAYLOAD).map_err(|e| {
        fail(
            Kind::BadReply,
            format!("reply from {where_} is no frame: {e}"),
        )
    })?;
    if header.request_id != request_id || header.kind != kind.reply() || header.flow != Flow::PUBKEY
    {
        return Err(fail(
            Kind::BadReply,
            format!(
                "reply from {where_} answers flow {} kind {:#04x} id {}, not kind {:#04x} id {request_id}",
                header.flow.0,
                header.kind.0,
                header.request_id,
                kind.reply().0
            ),
        ));
    }
    Ok((header, payload.to_vec()))
}

fn tcp_exchange(
    args: &PubkeyArgs,
    addrs: Vec<SocketAddr>,
    frame: &[u8],
) -> io::Result<Option<Vec<u8>>> {
    let mut last = None;
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, args.timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut stream = match stream {
        Some(s) => s,
        None => return Err(last.unwrap_or_else(|| io::ErrorKind::NotFound.into())),
    };
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(args.timeout))?;
    stream.write_all(frame)?;
    let deadline = Instant::now() + args.timeout;
    let mut header = [0u8; envelope::HEADER_LEN];
    if !read_exact_before(&mut stream, &mut header, deadline)? {
        return Ok(None);
    }
    let len = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
    if len > MAX_REPLY_PAYLOAD {
        // Not a reply of ours; the parse below reports it.
        return Ok(Some(header.to_vec()));
    }
    let mut rest = vec![0u8; len as usize + envelope::TRAILER_LEN];
    if !read_exact_before(&mut stream, &mut rest, deadline)? {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed in the middle of a reply",
        ));
    }
    Ok(Some([&header[..], &rest].concat()))
}

/// Fills `buf`; false on a clean EOF before the first byte.
fn read_exact_before(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn udp_exchange(
    args: &PubkeyArgs,
    addr: SocketAddr,
    frame: &[u8],
    request_id: u32,
    where_: &str,
) -> io::Result<Option<Vec<u8>>> {
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)?;
    // Connected: datagrams from anyone else are filtered out, and an ICMP "port
    // unreachable" surfaces as ConnectionRefused.
    socket.connect(addr)?;
    let attempts = 1 + args.retries;
    let mut buf = vec![0u8; 65_536];
    for attempt in 1..=attempts {
        socket.send(frame)?;
        let deadline = Instant::now() + args.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket.set_read_timeout(Some(left))?;
            match socket.recv(&mut buf) {
                // A late reply to an earlier attempt carries the same id: as good.
                Ok(n) if n >= envelope::ECHO_LEN && buf[8..12] == request_id.to_be_bytes() => {
                    return Ok(Some(buf[..n].to_vec()));
                }
                Ok(_) => continue,
                Err(e) if is_timeout(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if attempt < attempts {
            eprintln!(
                "note: no reply from {where_} within {}; resending the same request (attempt {} of {attempts})",
                humantime::format_duration(args.timeout),
                attempt + 1
            );
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "no reply after {attempts} attempt{} of {} each",
            if attempts == 1 { "" } else { "s" },
            humantime::format_duration(args.timeout)
        ),
    ))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn io_reason(e: &io::Error, timeout: Duration) -> String {
    if is_timeout(e) && e.get_ref().is_none() {
        format!("timed out after {}", humantime::format_duration(timeout))
    } else {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_file_sits_beside_the_key() {
        assert_eq!(
            id_path(Path::new("/x/device.pem")),
            Path::new("/x/device.id")
        );
        assert_eq!(id_path(Path::new("key")), Path::new("key.id"));
    }
}
