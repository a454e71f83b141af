//! The soak test: 100,000 random and mutated frames at every port, over TCP and UDP,
//! while a legitimate client keeps registering from another source address.
//! Not in the default run: `cargo test --test integration -- --ignored soak`.
//!
//! Passes when the listener never panics or dies, every legitimate registration
//! succeeds, and its RSS at the end is within 10% of its RSS after warm-up.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::ijam_client::*;
use crate::support::listener::rss_kib;
use crate::support::listener::{Backend, Key, Listener};
use registrar::wire::envelope::{self, Flow, Header, Kind};
use registrar::wire::ijam::{self, StateCode};

const FRAMES: usize = 100_000;
/// RSS is sampled here: allocator caches, tokio workers and SQLite pages have grown by then.
const WARM_UP: usize = FRAMES / 2;

/// xorshift: reproducible garbage without a dependency.
struct Garbage(u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// A valid frame with a few bytes flipped, truncated or extended.
    fn mutate(&mut self, valid: &[u8]) -> Vec<u8> {
        let mut out = valid.to_vec();
        match self.next() % 4 {
            0 => {
                for _ in 0..1 + self.next() % 4 {
                    let i = (self.next() as usize) % out.len();
                    out[i] ^= 1 << (self.next() % 8);
                }
            }
            1 => out.truncate((self.next() as usize) % out.len()),
            2 => {
                let extra = 1 + (self.next() as usize) % 64;
                out.extend(self.bytes(extra));
            }
            _ => {
                let i = (self.next() as usize) % out.len();
                out[i..].iter_mut().for_each(|b| *b = 0xff);
            }
        }
        out
    }
}

#[test]
#[ignore = "soak: minutes of hostile traffic; run with --ignored"]
fn soak_hostile_frames_on_every_port_while_a_legitimate_client_registers() {
    let l = Listener::start(Backend::Sqlite, Key::Vector2048, &["--idle-timeout", "2s"]);
    l.create_network("soak", "alice");
    let pk = public_key(l.ports.cert);

    // Valid frames to mutate, one per port.
    let state = state_frame(
        uuid::Uuid::from_bytes([7; 16]),
        &random_key(),
        StateCode::Online,
    );
    let register = pk
        .encrypt(&request(None, "soak", "mutatedpass1", random_key()).to_bytes())
        .unwrap();
    let hello = envelope::to_vec(&Header::request(Flow(0), Kind(1), 7), &[]);
    let targets: Vec<(SocketAddr, bool, Vec<u8>)> = vec![
        (l.ports.cert, true, ijam::CERT_REQUEST.to_vec()),
        (l.ports.reg_tcp, true, register.clone()),
        (l.ports.reg_udp, false, register),
        (l.ports.state_tcp, true, state.clone()),
        (l.ports.state_udp, false, state),
        (l.ports.envelope_tcp, true, hello.clone()),
        (l.ports.envelope_udp, false, hello),
    ];

    // The legitimate client registers from 127.0.0.2, its own rate-limit bucket.
    let stop = Arc::new(AtomicBool::new(false));
    let registered = Arc::new(AtomicUsize::new(0));
    let legit = {
        let (stop, registered) = (Arc::clone(&stop), Arc::clone(&registered));
        let reg = l.ports.reg_tcp;
        let minted = l.admin_ok(&[
            "passphrase",
            "add",
            "soak",
            "--node-name",
            "legit",
            "--count",
            "600",
        ]);
        let passphrases: Vec<String> = minted.lines().map(str::to_owned).collect();
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            for p in passphrases {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let key = random_key();
                let ct = pk
                    .encrypt(&request(None, "soak", &p, key).to_bytes())
                    .unwrap();
                // A source address of its own (any 127/8 address is local).
                let mut stream = connect_from("127.0.0.2:0".parse().unwrap(), reg);
                stream.write_all(&ct).unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
                let mut reply = Vec::new();
                stream.read_to_end(&mut reply).unwrap();
                if reply.starts_with(&[0xc8, 0x00]) {
                    decode_reply_upstream(&reply, &key);
                    registered.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.push(reply);
                }
                // A device's pace, not synchronisation.
                std::thread::sleep(Duration::from_millis(20));
            }
            failures
        })
    };

    let pid = l.pid();
    let mut rng = Garbage(0x5eed_0f50_a4a4);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Waiting briefly for each reply keeps the flood at the pace the listener answers,
    // so every datagram is processed rather than dropped by a full socket buffer.
    udp.set_read_timeout(Some(Duration::from_millis(2)))
        .unwrap();
    let mut tcp: Vec<Option<TcpStream>> = targets.iter().map(|_| None).collect();
    let mut warm_rss = 0;
    for n in 0..FRAMES {
        if n == WARM_UP {
            warm_rss = rss_kib(pid);
        }
        let t = n % targets.len();
        let (addr, is_tcp, valid) = &targets[t];
        let frame = if rng.next().is_multiple_of(2) {
            rng.mutate(valid)
        } else {
            let len = (rng.next() as usize) % 600;
            rng.bytes(len)
        };
        if *is_tcp {
            if tcp[t].is_none() {
                tcp[t] = TcpStream::connect(addr).ok();
                if let Some(s) = &tcp[t] {
                    let _ = s.set_nonblocking(true);
                }
            }
            if let Some(s) = &mut tcp[t] {
                // Closed by the server for garbage: reconnect next time.
                if s.write_all(&frame).is_err() {
                    tcp[t] = None;
                } else {
                    let mut sink = [0u8; 4096];
                    while let Ok(k) = s.read(&mut sink) {
                        if k == 0 {
                            tcp[t] = None;
                            break;
                        }
                    }
                }
            }
        } else {
            let _ = udp.send_to(&frame, addr);
            let mut sink = [0u8; 2048];
            let _ = udp.recv_from(&mut sink);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let failures = legit.join().unwrap();
    let end_rss = rss_kib(pid);

    let mut l = l;
    assert!(l.is_running(), "the listener died:\n{}", l.log());
    assert!(
        !l.log().contains("panicked"),
        "a task panicked:\n{}",
        l.log()
    );
    assert!(
        failures.is_empty(),
        "legitimate registrations failed: {failures:02x?}"
    );
    assert!(registered.load(Ordering::Relaxed) > 0);
    println!(
        "soak: {FRAMES} hostile frames, {} legitimate registrations, RSS {warm_rss} KiB after warm-up, {end_rss} KiB at the end",
        registered.load(Ordering::Relaxed)
    );
    assert!(
        end_rss as f64 <= warm_rss as f64 * 1.10,
        "RSS grew from {warm_rss} to {end_rss} KiB"
    );
}
