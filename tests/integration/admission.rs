//! Admission control and metrics, over real sockets: shedding, per-source rate limits,
//! the connection cap, idle and dribbling peers, and the counters that show them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use registrar::wire::envelope::Status;
use registrar::wire::pubkey::DeviceId;

use crate::support::envelope_client;
use crate::support::ijam_client::*;
use crate::support::listener::{Backend, Key, Listener};

const BUSY: &[u8] = b"\xf7\x01Server busy.";
const RATE_LIMITED: &[u8] = b"\xad\x01Too many requests.";
const REPLY_401: &[u8] = b"\x91\x01Invalid passphrase.";

fn start(extra: &[&str]) -> (Listener, SocketAddr) {
    let mut args = vec!["--metrics-addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let l = Listener::start(Backend::Sqlite, Key::Vector2048, &args);
    let metrics = l
        .metrics_addr()
        .expect("metrics address on the start-up line");
    (l, metrics)
}

/// `GET /metrics`, the whole text.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    text
}

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

/// Waits until the listener's once-a-second refusal summaries add up to `expected` for
/// `field` (`shed` or `rate_limited`), and checks they do not go past it.
fn wait_for_refusals_logged(l: &Listener, field: &str, expected: u64) {
    wait_for_summed(l, "requests refused under load", field, expected)
}

/// Waits until the summary lines holding `summary` add up `field` to `expected` (and
/// never beyond it).
fn wait_for_summed(l: &Listener, summary: &str, field: &str, expected: u64) {
    let prefix = format!("{field}=");
    for lines in 1.. {
        l.wait_for_log_count(summary, lines);
        let logged: u64 = l
            .log()
            .lines()
            .filter(|line| line.contains(summary))
            .flat_map(|line| {
                line.split_whitespace()
                    .filter_map(|t| t.strip_prefix(prefix.as_str()))
                    .map(|n| n.parse::<u64>().unwrap())
                    .collect::<Vec<_>>()
            })
            .sum();
        assert!(
            logged <= expected,
            "{logged} > {expected} {field}:\n{}",
            l.log()
        );
        if logged == expected {
            return;
        }
    }
}

fn bogus_request(l: &Listener) -> Vec<u8> {
    let pk = public_key(l.ports.cert);
    pk.encrypt(&request(None, "net", "nosuchpass", random_key()).to_bytes())
        .unwrap()
}

#[test]
fn a_full_crypto_queue_sheds_tcp_with_503_and_counts_it() {
    // One crypto thread and no queue: while it decrypts, every other request is shed.
    let (l, metrics) = start(&["--crypto-threads", "1", "--crypto-queue", "0"]);
    let ct = bogus_request(&l);
    let replies = tcp_exchange_all_at_once(l.ports.reg_tcp, vec![ct.clone(); 64]);
    let shed = replies.iter().filter(|r| r.as_slice() == BUSY).count();
    let served = replies.iter().filter(|r| r.as_slice() == REPLY_401).count();
    assert_eq!(shed + served, 64, "every request gets its reply");
    assert!(shed > 0 && served > 0, "shed {shed}, served {served}");
    let text = scrape(metrics);
    assert_eq!(
        sample(
            &text,
            "registrar_shed_total{flow=\"ijam_register\",transport=\"tcp\"}"
        ),
        shed as f64
    );
    // The log sums the sheds once a second instead of a line each.
    wait_for_refusals_logged(&l, "shed", shed as u64);
    // The listener is still there for the next request.
    assert_eq!(tcp_exchange(l.ports.reg_tcp, &ct), REPLY_401);
}

#[test]
fn a_flood_of_refusals_is_logged_as_one_sum_a_second_and_each_at_debug() {
    let (l, _metrics) = start(&["--rate-per-source", "0.001", "--burst", "1"]);
    let ct = bogus_request(&l);
    assert_eq!(udp_exchange(l.ports.reg_udp, &ct), REPLY_401);
    const FLOOD: usize = 50;
    for _ in 0..FLOOD {
        assert_eq!(udp_exchange(l.ports.reg_udp, &ct), RATE_LIMITED);
    }
    // The envelope port has a bucket of its own: one admitted, then refusals.
    const ENVELOPE_FLOOD: usize = 10;
    let challenge = registrar::client::pubkey::challenge_frame(7, DeviceId([9; 16]));
    let first = envelope_client::exchange(Transport::Udp, &l, &challenge);
    assert_eq!(first.status(), Status::NOT_FOUND, "{first:?}");
    for _ in 0..ENVELOPE_FLOOD {
        let reply = envelope_client::exchange(Transport::Udp, &l, &challenge);
        assert_eq!(reply.status(), Status::TOO_MANY_REQUESTS, "{reply:?}");
    }
    wait_for_refusals_logged(&l, "rate_limited", (FLOOD + ENVELOPE_FLOOD) as u64);
    let log = l.log();
    let each: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("outcome=\"rate_limited\""))
        .collect();
    assert_eq!(each.len(), FLOOD + ENVELOPE_FLOOD, "{log}");
    assert!(
        each.iter().all(|line| line.contains("DEBUG")),
        "a refusal logged above debug:\n{log}"
    );
}

#[test]
fn a_source_over_its_budget_gets_429_before_any_rsa_work() {
    let (l, metrics) = start(&["--rate-per-source", "0.001", "--burst", "2"]);
    let ct = bogus_request(&l);
    // Each transport has its own budget of 2.
    for (exchange, addr) in [
        (
            tcp_exchange as fn(SocketAddr, &[u8]) -> Vec<u8>,
            l.ports.reg_tcp,
        ),
        (udp_exchange, l.ports.reg_udp),
    ] {
        assert_eq!(exchange(addr, &ct), REPLY_401);
        assert_eq!(exchange(addr, &ct), REPLY_401);
        assert_eq!(exchange(addr, &ct), RATE_LIMITED);
    }
    let text = scrape(metrics);
    assert_eq!(
        sample(
            &text,
            "registrar_rate_limited_total{flow=\"ijam_register\",transport=\"tcp\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "registrar_rate_limited_total{flow=\"ijam_register\",transport=\"udp\"}"
        ),
        1.0
    );
    // State requests have a budget of their own (the same rate and burst).
    let state = state_frame(
        uuid::Uuid::from_bytes([1; 16]),
        &random_key(),
        registrar::wire::ijam::StateCode::Online,
    );
    for _ in 0..2 {
        assert_eq!(
            tcp_exchange(l.ports.state_tcp, &state),
            b"\x94\x01Node not found."
        );
    }
    assert_eq!(
        tcp_exchange(l.ports.state_tcp, &state),
        429u16.to_le_bytes(),
        "the state port is rate limited too"
    );
}

/// What any source can send at line rate never reaches the log one line each: failed
/// requests are debug lines, summed once a second at INFO with the source that sent
/// the most.
#[test]
fn failed_requests_are_debug_lines_summed_once_a_second() {
    let (l, _) = start(&[]);
    let started = Instant::now();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let mut garbage = vec![0x5a; 30];
        garbage[8..12].copy_from_slice(&i.to_be_bytes());
        socket.send_to(&garbage, l.ports.envelope_udp).unwrap();
        // Unknown nodes, each its own (a node has a budget of its own too).
        let unknown = state_frame(
            uuid::Uuid::from_u128(u128::from(i) + 1),
            &random_key(),
            registrar::wire::ijam::StateCode::Online,
        );
        socket.send_to(&unknown, l.ports.state_udp).unwrap();
    }
    for _ in 0..20 {
        let mut stream = connect(l.ports.cert);
        stream.write_all(b"GET ").unwrap();
        let _ = stream.read_to_end(&mut Vec::new());
    }
    wait_for_summed(&l, "requests failed since the last report", "failed", 420);
    let log = l.log();
    for outcome in ["bad_frame", "unknown_node", "bad_request"] {
        let each: Vec<&str> = log
            .lines()
            .filter(|line| line.contains(&format!("outcome=\"{outcome}\"")))
            .collect();
        assert!(!each.is_empty(), "{outcome}:\n{log}");
        assert!(
            each.iter().all(|line| line.contains("DEBUG")),
            "a failure logged above debug:\n{log}"
        );
    }
    let summaries: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("requests failed since the last report"))
        .collect();
    assert!(
        summaries.iter().all(|line| line.contains(" INFO ")),
        "{log}"
    );
    assert!(
        summaries.len() as u64 <= started.elapsed().as_secs() + 1,
        "at most one summary a second: {summaries:#?}"
    );
    assert!(
        summaries[0].contains("top_source=127.0.0.1"),
        "{}",
        summaries[0]
    );
}

/// Datagrams that fail the cheap checks (here: not the ciphertext's length) spend no
/// budget, so spoofed garbage "from" a client cannot lock it out; and a reply larger
/// than 3x its datagram is not sent.
#[test]
fn garbage_spends_no_budget_and_gets_no_amplified_reply() {
    let (l, metrics) = start(&["--rate-per-source", "0.001", "--burst", "2"]);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    for datagram in [&b""[..], b"x", b"xy"] {
        socket.send_to(datagram, l.ports.reg_udp).unwrap();
        socket.send_to(datagram, l.ports.state_udp).unwrap();
    }
    // (Few enough that every reply fits this socket's receive buffer.)
    for _ in 0..100 {
        socket.send_to(&[7u8; 100], l.ports.reg_udp).unwrap();
        socket.send_to(&[7u8; 20], l.ports.state_udp).unwrap();
    }
    // Poll the counters until all 206 datagrams are accounted for.
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let text = scrape(metrics);
        let bad = |flow: &str, outcome: &str| {
            sample(
                &text,
                &format!(
                    "registrar_requests_total{{flow=\"{flow}\",transport=\"udp\",outcome=\"{outcome}\"}}"
                ),
            )
        };
        let seen = bad("ijam_register", "undecryptable") + bad("ijam_state", "malformed");
        // The 9-byte 400 of the registration port is more than 3x a datagram of 0, 1
        // or 2 bytes; the state port's 2-byte 400, more than 3x only 0 bytes.
        let withheld = |port: &str| {
            sample(
                &text,
                &format!("registrar_udp_replies_withheld_total{{port=\"{port}\"}}"),
            )
        };
        if (seen, withheld("reg"), withheld("state")) == (206.0, 3.0, 1.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::yield_now();
    }
    // The other 400s were sent (within 3x); nothing else.
    let mut buf = [0u8; 64];
    let mut replies = 0;
    while let Ok((n, _)) = socket.recv_from(&mut buf) {
        assert!(matches!(&buf[..2], [0x90, 0x01]), "{:02x?}", &buf[..n]);
        replies += 1;
    }
    assert_eq!(replies, 202);
    // The budget is whole: a real request from the same source is served.
    let ct = bogus_request(&l);
    assert_eq!(udp_exchange(l.ports.reg_udp, &ct), REPLY_401);
    assert_eq!(udp_exchange(l.ports.reg_udp, &ct), REPLY_401);
}

#[test]
fn idle_and_dribbling_connections_are_closed_and_counted() {
    let (l, metrics) = start(&["--idle-timeout", "1s"]);
    // Idle: connect and say nothing.
    let mut idle = connect(l.ports.reg_tcp);
    let mut buf = Vec::new();
    assert_eq!(idle.read_to_end(&mut buf).unwrap(), 0);

    // Dribbling: one byte every 100 ms never completes a 256-byte frame in time.
    let mut dribbler = connect(l.ports.reg_tcp);
    let mut sent = 0;
    let closed = loop {
        if dribbler.write_all(&[0x42]).is_err() {
            break true;
        }
        sent += 1;
        if sent == 255 {
            break false;
        }
        // The peer's behaviour under test, not synchronisation.
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(closed, "a dribbler got to 255 bytes without being cut off");
    let text = scrape(metrics);
    assert_eq!(
        sample(
            &text,
            "registrar_connections_closed_total{port=\"reg\",reason=\"idle\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "registrar_connections_closed_total{port=\"reg\",reason=\"partial_frame\"}"
        ),
        1.0
    );
}

/// A reply to `request` (a [`bogus_request`], made before: making one opens a
/// connection) proves the connection was accepted and has its place in the table.
fn accepted_on_reg(request: &[u8], stream: &mut TcpStream) {
    stream.write_all(request).unwrap();
    let mut reply = [0u8; 21];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(reply.as_slice(), REPLY_401);
}

/// Whether the server closed `stream` (EOF or reset).
fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    match stream.read_to_end(&mut buf) {
        Ok(_) => buf.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn a_full_table_makes_room_by_closing_the_connection_idle_the_longest() {
    let (l, metrics) = start(&["--max-connections", "2"]);
    let request = bogus_request(&l);
    let mut first = connect(l.ports.reg_tcp);
    accepted_on_reg(&request, &mut first);
    let mut second = connect(l.ports.reg_tcp);
    accepted_on_reg(&request, &mut second);
    assert_eq!(sample(&scrape(metrics), "registrar_open_connections"), 2.0);
    // A newcomer is let in: the first (idle the longest) goes, the second stays.
    let mut third = connect(l.ports.reg_tcp);
    accepted_on_reg(&request, &mut third);
    assert!(closed(&mut first), "the longest idle was closed");
    accepted_on_reg(&request, &mut second);
    let text = scrape(metrics);
    assert_eq!(
        sample(
            &text,
            "registrar_connections_closed_total{port=\"reg\",reason=\"evicted\"}"
        ),
        1.0,
        "{text}"
    );
}

/// One source cannot take every connection: past its own cap it is refused at accept,
/// and another source is still let in.
#[test]
fn a_source_past_its_connection_cap_is_refused_and_others_are_not() {
    let (l, metrics) = start(&["--max-connections-per-source", "2"]);
    let request = bogus_request(&l);
    let mut held = [connect(l.ports.reg_tcp), connect(l.ports.reg_tcp)];
    for stream in &mut held {
        accepted_on_reg(&request, stream);
    }
    let mut third = connect(l.ports.reg_tcp);
    let started = Instant::now();
    assert!(closed(&mut third));
    assert!(started.elapsed() < TIMEOUT, "closed, not left hanging");
    let mut other = connect_from("127.0.0.2:0".parse().unwrap(), l.ports.reg_tcp);
    accepted_on_reg(&request, &mut other);
    let text = scrape(metrics);
    assert_eq!(
        sample(
            &text,
            "registrar_connections_refused_total{port=\"reg\",reason=\"source_full\"}"
        ),
        1.0,
        "{text}"
    );
    // The held ones were never disturbed.
    for stream in &mut held {
        accepted_on_reg(&request, stream);
    }
}

/// Requests that cost nothing (a Hello, a certificate) and a dribbled magic do not keep
/// a connection past its deadline; requests that did work do.
#[test]
fn only_requests_that_did_work_keep_a_connection_open() {
    let (l, metrics) = start(&["--idle-timeout", "1s"]);
    // Hellos every 200 ms: closed about a second after it opened.
    let mut hellos = connect(l.ports.envelope_tcp);
    let opened = Instant::now();
    let mut answered = 0;
    loop {
        let hello = registrar::client::pubkey::hello_frame(answered);
        if hellos.write_all(&hello).is_err() {
            break;
        }
        match envelope_client::read_frame(&mut hellos) {
            Some(reply) => assert_eq!(reply.status(), Status::OK),
            None => break,
        }
        answered += 1;
        assert!(answered < 50, "Hellos kept the connection open");
        // The peer's behaviour under test, not synchronisation.
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(opened.elapsed() >= Duration::from_secs(1));
    // Challenges (rate limited: work) every 200 ms for 2 s: still open.
    let mut worker = connect(l.ports.envelope_tcp);
    let device = DeviceId([9; 16]);
    for i in 0..10 {
        let challenge = registrar::client::pubkey::challenge_frame(i, device);
        worker.write_all(&challenge).unwrap();
        let reply = envelope_client::read_frame(&mut worker).expect("still open");
        assert_eq!(reply.status(), Status::NOT_FOUND);
        std::thread::sleep(Duration::from_millis(200));
    }
    // Certificate fetches every 200 ms, and a magic dribbled a byte at a time: each
    // closed at its deadline.
    let mut fetcher = connect(l.ports.cert);
    let mut fetched = 0;
    while fetcher
        .write_all(&registrar::wire::ijam::CERT_REQUEST)
        .is_ok()
    {
        let mut pem = [0u8; 800];
        if fetcher.read_exact(&mut pem).is_err() {
            break;
        }
        fetched += 1;
        assert!(fetched < 50, "certificate fetches kept the connection open");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut dribbler = connect(l.ports.cert);
    for byte in registrar::wire::ijam::CERT_REQUEST.iter().take(3) {
        let _ = dribbler.write_all(&[*byte]);
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(closed(&mut dribbler));
    let text = scrape(metrics);
    // The Hello connection, and the worker a second after its last challenge.
    for (port, reason, count) in [
        ("envelope", "idle", 2.0),
        ("cert", "idle", 1.0),
        ("cert", "partial_frame", 1.0),
    ] {
        assert_eq!(
            sample(
                &text,
                &format!(
                    "registrar_connections_closed_total{{port=\"{port}\",reason=\"{reason}\"}}"
                )
            ),
            count,
            "{port} {reason}: {text}"
        );
    }
    drop(worker);
}

#[test]
fn metrics_count_requests_by_flow_transport_and_outcome() {
    let (l, metrics) = start(&[]);
    l.create_network("net", "alice");
    let p = l.add_passphrase("net", "n1");
    let pk = public_key(l.ports.cert);
    let key = random_key();
    let ct = pk
        .encrypt(&request(None, "net", &p, key).to_bytes())
        .unwrap();
    decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &ct), &key);
    decode_reply_upstream(&udp_exchange(l.ports.reg_udp, &ct), &key);
    assert_eq!(tcp_exchange(l.ports.reg_tcp, &bogus_request(&l)), REPLY_401);
    assert_eq!(udp_exchange(l.ports.reg_udp, &[0; 7]), b"\x90\x01request");
    let text = scrape(metrics);
    let series = |transport: &str, outcome: &str| {
        sample(
            &text,
            &format!(
                "registrar_requests_total{{flow=\"ijam_register\",transport=\"{transport}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(series("tcp", "created"), 1.0);
    assert_eq!(series("udp", "replayed"), 1.0);
    assert_eq!(series("tcp", "invalid_passphrase"), 1.0);
    assert_eq!(series("udp", "undecryptable"), 1.0);
    assert_eq!(
        sample(
            &text,
            "registrar_request_duration_seconds_count{flow=\"ijam_register\",transport=\"tcp\"}"
        ),
        2.0
    );
    assert!(text.contains("registrar_crypto_queue_depth"));
    // Anything but GET /metrics is a 404.
    let mut stream = TcpStream::connect(metrics).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
}

#[test]
fn a_frame_declaring_4_gib_is_refused_from_its_header_and_counted() {
    let (l, metrics) = start(&[]);
    // "RG" v1, flow 0, kind 1, no flags, status 0, request id 0x0a0b0c0d, length 2^32-1.
    let mut header = b"RG\x01\x00\x01\x00\x00\x00\x0a\x0b\x0c\x0d".to_vec();
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut stream = connect(l.ports.envelope_tcp);
    stream.write_all(&header).unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    assert!(
        reply.len() >= 16,
        "a 400 frame before the close: {reply:02x?}"
    );
    assert_eq!(&reply[6..8], &400u16.to_be_bytes());
    assert_eq!(
        &reply[8..12],
        &[0x0a, 0x0b, 0x0c, 0x0d],
        "the request id echoed"
    );
    let text = scrape(metrics);
    assert_eq!(
        sample(
            &text,
            "registrar_connections_closed_total{port=\"envelope\",reason=\"bad_frame\"}"
        ),
        1.0,
        "{text}"
    );
    // Nothing was reserved for it: the envelope port answers the next peer as before.
    let hello = registrar::client::pubkey::hello_frame(8);
    let reply = envelope_client::tcp_exchange(l.ports.envelope_tcp, &hello);
    assert_eq!(
        (reply.status(), reply.header.request_id),
        (Status::OK, 8),
        "{reply:?}"
    );
}

#[test]
fn a_udp_flood_from_one_source_is_cut_off_by_its_rate_limit_and_counted() {
    // 5,000 datagrams as fast as one socket sends them; 20 tokens, one more every 50 s,
    // so however slowly this machine works through the flood, the bucket stays empty.
    let (l, metrics) = start(&["--rate-per-source", "0.02", "--burst", "20"]);
    let ct = bogus_request(&l);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..5_000 {
        socket.send_to(&ct, l.ports.reg_udp).unwrap();
    }
    // Every datagram ends somewhere a counter sees: refused by the bucket, decrypted
    // (and answered 401), shed by the crypto queue, or dropped by the kernel because
    // the socket's receive buffer was full. Poll the counters until all are accounted.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let (limited, served, kernel) = loop {
        let text = scrape(metrics);
        let limited = sample(
            &text,
            "registrar_rate_limited_total{flow=\"ijam_register\",transport=\"udp\"}",
        );
        let served = sample(
            &text,
            "registrar_requests_total{flow=\"ijam_register\",transport=\"udp\",outcome=\"invalid_passphrase\"}",
        );
        let shed = sample(
            &text,
            "registrar_shed_total{flow=\"ijam_register\",transport=\"udp\"}",
        );
        let kernel = sample(&text, "registrar_udp_receive_buffer_drops{port=\"reg\"}");
        if limited + served + shed + kernel >= 5_000.0 || std::time::Instant::now() > deadline {
            break (limited, served, kernel);
        }
        std::thread::yield_now();
    };
    assert!(
        limited + kernel >= 4_700.0,
        "{limited} limited, {kernel} dropped by the kernel, {served} served"
    );
    // The 20 of the burst, and at most one refill however long the test ran.
    assert!(
        served <= 21.0,
        "{served} decryptions for one flooding source"
    );
    assert_eq!(
        udp_exchange(l.ports.reg_udp, &ct),
        RATE_LIMITED,
        "the same source stays limited over UDP"
    );
    // Spoofed datagrams "from" an address must not lock its TCP clients out: the
    // handshake proves a TCP source, and its budget is its own.
    assert_eq!(tcp_exchange(l.ports.reg_tcp, &ct), REPLY_401);
}

#[test]
fn a_full_crypto_queue_drops_udp_requests_without_a_reply_and_counts_them() {
    let (l, metrics) = start(&["--crypto-threads", "1", "--crypto-queue", "0"]);
    let ct = bogus_request(&l);
    const SENT: usize = 64;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    for _ in 0..SENT {
        socket.send_to(&ct, l.ports.reg_udp).unwrap();
    }
    // Wait until every datagram is accounted for: decrypted and answered, or shed.
    let deadline = Instant::now() + TIMEOUT;
    let (served, shed) = loop {
        let text = scrape(metrics);
        let served = sample(
            &text,
            "registrar_requests_total{flow=\"ijam_register\",transport=\"udp\",outcome=\"invalid_passphrase\"}",
        );
        let shed = sample(
            &text,
            "registrar_shed_total{flow=\"ijam_register\",transport=\"udp\"}",
        );
        if served + shed >= SENT as f64 {
            break (served as usize, shed as usize);
        }
        assert!(Instant::now() < deadline, "{served} served, {shed} shed");
        std::thread::yield_now();
    };
    assert_eq!(served + shed, SENT);
    assert!(shed > 0, "one crypto thread and no queue shed nothing");
    // The served ones are answered; a shed datagram gets nothing, not even a 503. A
    // final bad datagram (answered without crypto) marks the end of the replies.
    let mut buf = [0u8; 1500];
    let mut answered = 0;
    socket.send_to(&[0; 7], l.ports.reg_udp).unwrap();
    loop {
        let (n, _) = socket.recv_from(&mut buf).expect("a reply");
        match &buf[..n] {
            b"\x90\x01request" => break,
            reply => assert_eq!(reply, REPLY_401, "a shed request got a reply"),
        }
        answered += 1;
    }
    while answered < served {
        let (n, _) = socket
            .recv_from(&mut buf)
            .expect("a served request's reply");
        assert_eq!(&buf[..n], REPLY_401);
        answered += 1;
    }
    assert_eq!(answered, served);
    wait_for_refusals_logged(&l, "shed", shed as u64);
}

#[test]
fn a_standing_crypto_queue_is_shed_by_sojourn_time_not_only_when_full() {
    // A queue far larger than the burst, so it is never full: every 503 here comes
    // from the sojourn rule (requests waited over 1 ms for more than 100 ms).
    let (l, metrics) = start(&[
        "--crypto-threads",
        "1",
        "--crypto-queue",
        "4096",
        "--max-queue-wait",
        "1ms",
    ]);
    let pk = public_key(l.ports.cert);
    assert_eq!(pk.ciphertext_len(), 256);
    let ct = bogus_request(&l);
    const CLIENTS: usize = 400;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (ct, barrier, addr) = (ct.clone(), barrier.clone(), l.ports.reg_tcp);
            std::thread::spawn(move || {
                let mut stream = connect(addr);
                barrier.wait();
                stream.write_all(&ct).unwrap();
                stream.shutdown(std::net::Shutdown::Write).unwrap();
                let mut reply = Vec::new();
                stream.read_to_end(&mut reply).unwrap();
                reply
            })
        })
        .collect();
    let replies: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let shed = replies.iter().filter(|r| r.as_slice() == BUSY).count();
    let served = replies.iter().filter(|r| r.as_slice() == REPLY_401).count();
    assert_eq!(shed + served, CLIENTS, "every request gets its reply");
    assert!(shed > 0 && served > 0, "shed {shed}, served {served}");
    assert_eq!(
        sample(
            &scrape(metrics),
            "registrar_shed_total{flow=\"ijam_register\",transport=\"tcp\"}"
        ),
        shed as f64
    );
}

#[test]
fn every_port_counts_its_requests_and_every_series_is_described() {
    let (l, metrics) = start(&[]);
    fetch_certificate(l.ports.cert);
    assert_eq!(tcp_exchange(l.ports.cert, b"nope"), b"");
    let state = state_frame(
        uuid::Uuid::from_bytes([1; 16]),
        &random_key(),
        registrar::wire::ijam::StateCode::Online,
    );
    assert_eq!(
        tcp_exchange(l.ports.state_tcp, &state),
        b"\x94\x01Node not found."
    );
    assert_eq!(
        udp_exchange(l.ports.state_udp, &state),
        b"\x94\x01Node not found."
    );
    let hello = registrar::client::pubkey::hello_frame(1);
    assert_eq!(
        envelope_client::tcp_exchange(l.ports.envelope_tcp, &hello).status(),
        Status::OK
    );
    let text = scrape(metrics);
    for (series, value) in [
        (
            "registrar_requests_total{flow=\"ijam_cert\",transport=\"tcp\",outcome=\"certificate\"}",
            1.0,
        ),
        (
            "registrar_requests_total{flow=\"ijam_cert\",transport=\"tcp\",outcome=\"bad_request\"}",
            1.0,
        ),
        (
            "registrar_requests_total{flow=\"ijam_state\",transport=\"tcp\",outcome=\"unknown_node\"}",
            1.0,
        ),
        (
            "registrar_requests_total{flow=\"ijam_state\",transport=\"udp\",outcome=\"unknown_node\"}",
            1.0,
        ),
        (
            "registrar_requests_total{flow=\"core\",transport=\"tcp\",outcome=\"hello\"}",
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, series), value, "{series}\n{text}");
    }
    let described: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
    {
        assert!(described.contains(&name), "{name} has no # HELP:\n{text}");
    }
}

#[test]
fn one_connection_table_covers_every_port() {
    let (l, metrics) = start(&["--max-connections", "2"]);
    let request = bogus_request(&l);
    let mut reg = connect(l.ports.reg_tcp);
    accepted_on_reg(&request, &mut reg);
    let mut envelope = connect(l.ports.envelope_tcp);
    envelope
        .write_all(&registrar::client::pubkey::hello_frame(3))
        .unwrap();
    assert_eq!(
        envelope_client::read_frame(&mut envelope).unwrap().status(),
        Status::OK
    );
    // The table is full: a connection on a third port takes the place of the one idle
    // the longest, on another port.
    let mut cert = connect(l.ports.cert);
    cert.write_all(&registrar::wire::ijam::CERT_REQUEST)
        .unwrap();
    cert.read_exact(&mut [0u8; 800]).unwrap();
    assert!(closed(&mut reg));
    let text = scrape(metrics);
    assert_eq!(
        sample(
            &text,
            "registrar_connections_closed_total{port=\"reg\",reason=\"evicted\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(sample(&text, "registrar_open_connections"), 2.0);
    drop(envelope);
}

/// An idle connection holds no frame buffer and no room for a request's work: 500 idle
/// connections on the envelope port cost the listener well under 10 KB each (about
/// 3.5 KB; they cost 19 KB while every connection kept 16 KiB of buffers).
#[test]
fn idle_connections_hold_no_buffers() {
    let (l, metrics) = start(&[]);
    // Warm up: a served connection and a first idle one (the runtime's own growth).
    let mut warm = connect(l.ports.envelope_tcp);
    warm.write_all(&registrar::client::pubkey::hello_frame(1))
        .unwrap();
    envelope_client::read_frame(&mut warm).unwrap();
    let before = crate::support::listener::rss_kib(l.pid());
    let idle: Vec<TcpStream> = (0..500).map(|_| connect(l.ports.envelope_tcp)).collect();
    // Every one accepted and in the table before measuring.
    let deadline = Instant::now() + TIMEOUT;
    while sample(&scrape(metrics), "registrar_open_connections") < 501.0 {
        assert!(Instant::now() < deadline, "not all 500 were accepted");
        std::thread::yield_now();
    }
    let grown = crate::support::listener::rss_kib(l.pid()).saturating_sub(before);
    assert!(grown < 5_000, "500 idle connections cost {grown} KiB");
    drop(idle);
}

/// When the buffered bytes of all connections reach --max-buffered, readers wait and
/// then the connection holding the most is closed; the others go on.
#[test]
fn a_spent_buffer_budget_closes_the_largest_holder() {
    let (l, metrics) = start(&["--max-buffered", "256KiB", "--max-frame", "1048576"]);
    let header = |len: u32| {
        let mut frame = registrar::wire::envelope::to_vec(
            &registrar::wire::envelope::Header::request(
                registrar::wire::envelope::Flow::PUBKEY,
                registrar::wire::envelope::Kind(1),
                7,
            ),
            &vec![0u8; len as usize],
        );
        frame.truncate(registrar::wire::envelope::HEADER_LEN);
        frame
    };
    // The hoarder: a frame declaring 1 MiB, of which it sends 200 KiB.
    let mut hoarder = connect(l.ports.envelope_tcp);
    hoarder.write_all(&header(1 << 20)).unwrap();
    hoarder.write_all(&vec![0u8; 200 << 10]).unwrap();
    // A second sends 100 KiB of another large frame: together over the budget.
    let mut second = connect(l.ports.envelope_tcp);
    second.write_all(&header(1 << 20)).unwrap();
    let _ = second.write_all(&vec![0u8; 100 << 10]);
    assert!(closed(&mut hoarder), "the largest holder is closed");
    let text = scrape(metrics);
    assert_eq!(
        sample(
            &text,
            "registrar_connections_closed_total{port=\"envelope\",reason=\"buffer_budget\"}"
        ),
        1.0,
        "{text}"
    );
    // The port still serves.
    let reply = envelope_client::tcp_exchange(
        l.ports.envelope_tcp,
        &registrar::client::pubkey::hello_frame(2),
    );
    assert_eq!(reply.status(), Status::OK);
    drop(second);
}
