//! Faults injected for real: a Redis with an fsynced AOF killed mid-load, a Redis
//! stopped (SIGSTOP) mid-load, the listener itself SIGKILLed and stopped mid-load on
//! both stores, two listeners racing on one Redis. The promises: an acknowledged
//! registration is never lost; an error reply never hides a write (a request answered
//! with an error has no node); a passphrase is consumed iff its node exists; and a
//! retry of the same bytes settles every unanswered request, after which the nodes
//! are exactly the acknowledged registrations.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};

use crate::support::ijam_client::*;
use crate::support::listener::{Backend, Key, Listener};
use crate::support::redis_server::PrivateRedis;
use uuid::Uuid;

const TOTAL: usize = 120;

/// One request of the load: its node name, ciphertext and key.
struct Planned {
    name: String,
    ciphertext: Vec<u8>,
    key: [u8; 32],
}

/// Mints `TOTAL` passphrases for nodes `n-1 … n-TOTAL` and encrypts one request each.
fn plan(l: &Listener) -> Vec<Planned> {
    l.create_network("net", "alice");
    let out = l.admin_ok(&[
        "passphrase",
        "add",
        "net",
        "--node-name",
        "n",
        "--count",
        &TOTAL.to_string(),
    ]);
    let pk = public_key(l.ports.cert);
    out.lines()
        .enumerate()
        .map(|(i, p)| {
            let key = random_key();
            Planned {
                name: format!("n-{}", i + 1),
                ciphertext: pk
                    .encrypt(&request(None, "net", p, key).to_bytes())
                    .unwrap(),
                key,
            }
        })
        .collect()
}

/// What the client of one request learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// 200 with this node id.
    Acknowledged(Uuid),
    /// An error reply (503 during an outage): nothing may have been written.
    Refused(Vec<u8>),
    /// No reply: the connection broke or was closed (the outcome was unknown).
    Unanswered,
}

/// One request on a connection of its own, however it ends.
fn try_exchange(addr: SocketAddr, p: &Planned) -> Answer {
    let attempt = || -> Option<Vec<u8>> {
        let mut stream = TcpStream::connect(addr).ok()?;
        stream.set_read_timeout(Some(TIMEOUT)).ok()?;
        stream.write_all(&p.ciphertext).ok()?;
        stream.shutdown(Shutdown::Write).ok()?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).ok()?;
        (!reply.is_empty()).then_some(reply)
    };
    match attempt() {
        Some(reply) if reply.starts_with(&[0xc8, 0x00]) => {
            Answer::Acknowledged(decode_reply_upstream(&reply, &p.key))
        }
        Some(reply) => Answer::Refused(reply),
        None => Answer::Unanswered,
    }
}

/// Where the load pauses so the fault lands mid-load: threads 0 and 1 stop after a
/// quarter of their requests until the fault is in place; threads 2 and 3 never stop,
/// so some requests are in flight when it strikes.
struct Midpoint {
    reached: std::sync::Barrier,
    go_on: std::sync::Barrier,
}

impl Midpoint {
    fn new() -> Arc<Self> {
        Arc::new(Midpoint {
            reached: std::sync::Barrier::new(3),
            go_on: std::sync::Barrier::new(3),
        })
    }
}

/// Sends every planned request from 4 threads; what each client learnt.
fn run_load(
    addr: SocketAddr,
    planned: &Arc<Vec<Planned>>,
    midpoint: &Arc<Midpoint>,
) -> Vec<Answer> {
    let results = Arc::new(Mutex::new(vec![Answer::Unanswered; planned.len()]));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (planned, results, midpoint) = (
                Arc::clone(planned),
                Arc::clone(&results),
                Arc::clone(midpoint),
            );
            std::thread::spawn(move || {
                for (n, i) in (t..planned.len()).step_by(4).enumerate() {
                    if t < 2 && n == planned.len() / 16 {
                        midpoint.reached.wait();
                        midpoint.go_on.wait();
                    }
                    results.lock().unwrap()[i] = try_exchange(addr, &planned[i]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    Arc::try_unwrap(results).unwrap().into_inner().unwrap()
}

/// The invariants, read through the admin commands: every acknowledged registration
/// is there under its id; no request answered with an error has a node; a passphrase
/// is consumed iff its node exists.
fn check_invariants(l: &Listener, planned: &[Planned], answers: &[Answer]) {
    let nodes = l.nodes_json();
    let pending: Vec<serde_json::Value> =
        serde_json::from_str(&l.admin_ok(&["--json", "passphrase", "list", "net"])).unwrap();
    let node_named = |name: &str| nodes.iter().find(|n| n["name"] == name);
    let is_pending = |name: &str| pending.iter().any(|p| p["node_name"] == name);
    for (p, answer) in planned.iter().zip(answers) {
        match answer {
            Answer::Acknowledged(id) => {
                let node = node_named(&p.name)
                    .unwrap_or_else(|| panic!("acknowledged {id} ({}) was lost", p.name));
                assert_eq!(node["id"], id.to_string(), "{}", p.name);
            }
            Answer::Refused(reply) => assert!(
                node_named(&p.name).is_none(),
                "{} was answered {reply:02x?} but its node was written",
                p.name
            ),
            Answer::Unanswered => {}
        }
        // Consumed iff its node exists: never consumed without a node, never both.
        assert_ne!(
            is_pending(&p.name),
            node_named(&p.name).is_some(),
            "{}",
            p.name
        );
    }
    assert_eq!(nodes.len() + pending.len(), planned.len());
}

/// Retries every unacknowledged request with the same bytes until it is answered 200
/// (a replay of a committed-but-unanswered registration, or a first success); then
/// the nodes are exactly the acknowledged registrations.
fn settle(l: &Listener, planned: &[Planned], answers: &mut [Answer]) {
    for (p, answer) in planned.iter().zip(answers.iter_mut()) {
        if !matches!(answer, Answer::Acknowledged(_)) {
            let reply = tcp_exchange(l.ports.reg_tcp, &p.ciphertext);
            *answer = Answer::Acknowledged(decode_reply_upstream(&reply, &p.key));
        }
    }
    check_invariants(l, planned, answers);
    assert_eq!(l.nodes_json().len(), planned.len(), "nodes == acknowledged");
}

#[test]
fn redis_with_an_fsynced_aof_killed_mid_load_loses_nothing_acknowledged() {
    let Some(redis) = PrivateRedis::start_durable() else {
        return;
    };
    let mut l = Listener::start(
        Backend::Redis(redis),
        Key::Vector2048,
        &["--rate-per-source", "0"],
    );
    let planned = Arc::new(plan(&l));
    let addr = l.ports.reg_tcp;
    let midpoint = Midpoint::new();
    let load = {
        let (planned, midpoint) = (Arc::clone(&planned), Arc::clone(&midpoint));
        std::thread::spawn(move || run_load(addr, &planned, &midpoint))
    };
    midpoint.reached.wait();
    l.redis().unwrap().kill();
    midpoint.go_on.wait();
    l.wait_for_log_count("outcome=\"store_unavailable\"", 3);
    l.redis().unwrap().resume();
    l.wait_for_log_count("store reachable again", 1);
    let mut answers = load.join().unwrap();
    assert!(
        answers
            .iter()
            .any(|a| !matches!(a, Answer::Acknowledged(_))),
        "the outage refused some requests"
    );
    check_invariants(&l, &planned, &answers);
    settle(&l, &planned, &mut answers);
    // One line when the store went away and one when it came back, not one per request.
    let log = l.log();
    assert_eq!(
        log.matches("store unavailable; requests get 503").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("store reachable again").count(), 1, "{log}");
}

fn listener_killed_mid_load(backend: &str) {
    let Some(b) = Backend::named(backend) else {
        return;
    };
    let l = Listener::start(b, Key::Vector2048, &["--rate-per-source", "0"]);
    let planned = Arc::new(plan(&l));
    let addr = l.ports.reg_tcp;
    let midpoint = Midpoint::new();
    let load = {
        let (planned, midpoint) = (Arc::clone(&planned), Arc::clone(&midpoint));
        std::thread::spawn(move || run_load(addr, &planned, &midpoint))
    };
    midpoint.reached.wait();
    let (data_dir, backend) = l.stop(); // SIGKILL
    midpoint.go_on.wait();
    let mut answers = load.join().unwrap();
    let l = Listener::start_in(backend, data_dir, &["--rate-per-source", "0"]);
    check_invariants(&l, &planned, &answers);
    settle(&l, &planned, &mut answers);
}

/// The listener stopped (SIGSTOP) for a second mid-load, then continued: every
/// request is answered, none twice, nothing lost.
fn listener_stopped_mid_load(backend: &str) {
    let Some(b) = Backend::named(backend) else {
        return;
    };
    let l = Listener::start(b, Key::Vector2048, &["--rate-per-source", "0"]);
    let planned = Arc::new(plan(&l));
    let addr = l.ports.reg_tcp;
    let midpoint = Midpoint::new();
    let load = {
        let (planned, midpoint) = (Arc::clone(&planned), Arc::clone(&midpoint));
        std::thread::spawn(move || run_load(addr, &planned, &midpoint))
    };
    midpoint.reached.wait();
    l.signal("STOP");
    midpoint.go_on.wait();
    // The fault under test: how long the listener stays stopped.
    std::thread::sleep(std::time::Duration::from_secs(1));
    l.signal("CONT");
    let mut answers = load.join().unwrap();
    check_invariants(&l, &planned, &answers);
    assert!(
        answers.iter().all(|a| matches!(a, Answer::Acknowledged(_))),
        "{answers:?}"
    );
    settle(&l, &planned, &mut answers);
}

#[test]
fn the_listener_stopped_mid_load_on_sqlite_answers_everything_once() {
    listener_stopped_mid_load("sqlite");
}

#[test]
fn the_listener_stopped_mid_load_on_redis_answers_everything_once() {
    listener_stopped_mid_load("redis");
}

/// Redis stopped (SIGSTOP) while registrations are in flight: their scripts were sent
/// and no reply comes. They are not answered 503 (their scripts run when Redis
/// continues): each is run again until Redis answers, and the replay record tells a
/// script that ran from one that did not.
#[test]
fn redis_stopped_mid_load_never_answers_an_error_that_hides_a_write() {
    let Some(b) = Backend::named("redis") else {
        return;
    };
    let mut l = Listener::start(b, Key::Vector2048, &["--rate-per-source", "0"]);
    let planned = Arc::new(plan(&l));
    let addr = l.ports.reg_tcp;
    let midpoint = Midpoint::new();
    let load = {
        let (planned, midpoint) = (Arc::clone(&planned), Arc::clone(&midpoint));
        std::thread::spawn(move || run_load(addr, &planned, &midpoint))
    };
    midpoint.reached.wait();
    l.redis().unwrap().pause();
    midpoint.go_on.wait();
    // Requests in flight found no reply in time (the store's response timeout): they
    // are run again (or, were they answered 503, the invariants below would fail).
    l.wait_for_log_any(&["outcome unknown; running it again", "store_unavailable"]);
    l.redis().unwrap().unpause();
    let mut answers = load.join().unwrap();
    check_invariants(&l, &planned, &answers);
    settle(&l, &planned, &mut answers);
}

#[test]
fn the_listener_killed_mid_load_on_sqlite_loses_nothing_and_reopens_cleanly() {
    listener_killed_mid_load("sqlite");
}

#[test]
fn the_listener_killed_mid_load_on_redis_loses_nothing() {
    listener_killed_mid_load("redis");
}

#[test]
fn two_listeners_on_one_redis_give_each_passphrase_exactly_one_winner() {
    let Some(b) = Backend::named("redis") else {
        return;
    };
    let first = Listener::start(b, Key::Vector2048, &["--rate-per-source", "0"]);
    let second = first.start_sibling(&["--rate-per-source", "0"]);
    first.create_network("race", "alice");
    let out = first.admin_ok(&[
        "passphrase",
        "add",
        "race",
        "--node-name",
        "r",
        "--count",
        "20",
    ]);
    let passphrases: Vec<String> = out.lines().map(str::to_owned).collect();
    let pk = public_key(first.ports.cert);
    assert_eq!(
        public_key_pem(&second),
        public_key_pem(&first),
        "one key for both"
    );
    let barrier = Arc::new(std::sync::Barrier::new(100));
    let handles: Vec<_> = (0..100)
        .map(|i| {
            let key = random_key();
            let ct = pk
                .encrypt(&request(None, "race", &passphrases[i % 20], key).to_bytes())
                .unwrap();
            let addr = if i % 2 == 0 {
                first.ports.reg_tcp
            } else {
                second.ports.reg_tcp
            };
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut stream = connect(addr);
                barrier.wait();
                stream.write_all(&ct).unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
                let mut reply = Vec::new();
                stream.read_to_end(&mut reply).unwrap();
                (reply, key)
            })
        })
        .collect();
    let mut winners = 0;
    for h in handles {
        let (reply, key) = h.join().unwrap();
        if reply.starts_with(&[0xc8, 0x00]) {
            decode_reply_upstream(&reply, &key);
            winners += 1;
        } else {
            assert_eq!(reply, b"\x91\x01Invalid passphrase.");
        }
    }
    assert_eq!(winners, 20);
    assert_eq!(first.nodes_json().len(), 20);
}

fn public_key_pem(l: &Listener) -> Vec<u8> {
    fetch_certificate(l.ports.cert)
}
