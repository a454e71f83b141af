//! End to end: the real `registrar` listener on port 0 and the real `registrar-node`
//! client, as separate processes over real sockets. Each test owns its listener and
//! data dir.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::json;
use tempfile::TempDir;

const NODE_BIN: &str = env!("CARGO_BIN_EXE_registrar-node");

/// The listener binary sits next to ours; `cargo test` at the workspace root (or
/// `cargo build`) puts it there.
fn registrar_bin() -> PathBuf {
    let path = Path::new(NODE_BIN).with_file_name("registrar");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build` first",
        path.display()
    );
    path
}

struct Listener {
    child: Child,
    root: TempDir,
    cert: SocketAddr,
    reg: SocketAddr,
    state: SocketAddr,
    envelope: SocketAddr,
}

impl Listener {
    fn start() -> Listener {
        Self::start_with_key("rsa2048_private_key.pem", &[])
    }

    /// `key`: a private key from the repository's vectors, copied into the data dir;
    /// `extra`: more `serve` options.
    fn start_with_key(key: &str, extra: &[&str]) -> Listener {
        let root = tempfile::tempdir().expect("temp dir");
        let data = root.path().join("data");
        fs::create_dir(&data).unwrap();
        let key = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/vectors/ijam")
            .join(key);
        // A known key saves a key generation per test.
        fs::copy(&key, data.join("rsa_private_key.pem"))
            .unwrap_or_else(|e| panic!("{}: {e}", key.display()));
        let stderr = fs::File::create(root.path().join("listener.stderr")).unwrap();
        let mut child = Command::new(registrar_bin())
            .arg("--data-dir")
            .arg(&data)
            .args(["serve", "--bind", "127.0.0.1"])
            .args(["--cert-port", "0", "--reg-port", "0", "--state-port", "0"])
            .args(["--envelope-port", "0"])
            // No sojourn shedding: a busy test machine must not turn replies into 503s.
            .args(["--max-queue-wait", "0"])
            .args(extra)
            .env("REGISTRAR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn registrar");
        let (tx, rx) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        // Keep draining stdout for the child's whole life, so it never blocks on it.
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if line.starts_with("registrar listening ") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "registrar did not start; stderr:\n{}",
                    fs::read_to_string(root.path().join("listener.stderr")).unwrap_or_default()
                );
            }
        };
        let addr = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("{key} missing from {line:?}"))
                .parse()
                .unwrap()
        };
        Listener {
            cert: addr("cert_tcp"),
            reg: addr("reg_tcp"),
            state: addr("state_tcp"),
            envelope: addr("envelope_tcp"),
            child,
            root,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// A path for a node's state file (not created).
    fn state_file(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Runs an admin command on the listener's data dir, whatever its outcome.
    fn admin_raw(&self, args: &[&str]) -> Output {
        Command::new(registrar_bin())
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .output()
            .expect("run registrar")
    }

    /// Runs an admin command that must succeed.
    fn admin(&self, args: &[&str]) -> Output {
        let out = self.admin_raw(args);
        assert!(
            out.status.success(),
            "registrar {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn create_network(&self, network: &str) {
        self.admin(&["network", "create", network, "--owner", "alice"]);
    }

    fn passphrase(&self, network: &str, node_name: &str) -> String {
        let out = self.admin(&["passphrase", "add", network, "--node-name", node_name]);
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn register(&self, network: &str, passphrase: &str, state_file: &Path, extra: &[&str]) -> Run {
        node(
            &[
                &["ijam", "register", "--server", "127.0.0.1"] as &[&str],
                &["--cert-port", &self.cert.port().to_string()],
                &["--reg-port", &self.reg.port().to_string()],
                &["--network", network, "--passphrase", passphrase],
                &["--state-file", state_file.to_str().unwrap()],
                extra,
            ]
            .concat(),
        )
    }

    fn state(&self, state: &str, state_file: &Path, extra: &[&str]) -> Run {
        node(
            &[
                &["ijam", "state", state, "--server", "127.0.0.1"] as &[&str],
                &["--state-port", &self.state.port().to_string()],
                &["--state-file", state_file.to_str().unwrap()],
                extra,
            ]
            .concat(),
        )
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One finished `registrar-node` run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit code; stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

fn node(args: &[&str]) -> Run {
    let out = Command::new(NODE_BIN)
        .args(args)
        .env_remove("REGISTRAR_SERVER")
        .env_remove("REGISTRAR_PASSPHRASE")
        .env_remove("REGISTRAR_NODE_STATE")
        .stdin(Stdio::null())
        .output()
        .expect("run registrar-node");
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn uuid_of(run: &Run) -> String {
    let id = run.stdout.trim().to_string();
    let parsed = uuid::Uuid::parse_str(&id).unwrap_or_else(|e| panic!("{id:?}: {e}"));
    assert_eq!(
        id,
        parsed.hyphenated().to_string(),
        "lower-case, hyphenated"
    );
    assert_eq!(run.stdout, format!("{id}\n"), "the id alone on stdout");
    id
}

/// The state file: length, mode, checksum (XOR of the 18 words before it), and
/// (node id, node status).
fn read_state_file(path: &Path) -> (String, u32) {
    let bytes = fs::read(path).unwrap();
    assert_eq!(bytes.len(), 76);
    let mode = fs::metadata(path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the state file holds the node key");
    let word = |i: usize| u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
    let checksum = (0..18).fold(0, |acc, i| acc ^ word(i));
    assert_eq!(checksum, word(18), "state file checksum");
    let id = uuid::Uuid::from_slice(&bytes[..16]).unwrap();
    (id.to_string(), word(17))
}

const OFFLINE: u32 = 4;
const LOADING: u32 = 8;
const ONLINE: u32 = 16;

#[test]
fn registers_over_tcp_and_the_listener_knows_the_node() {
    let l = Listener::start();
    l.create_network("net1");
    let pass = l.passphrase("net1", "n1");
    let file = l.state_file("node.bin");
    let run = l.register("net1", &pass, &file, &[]).expect(0);
    let id = uuid_of(&run);
    assert!(!run.stderr.contains(&pass), "never print the passphrase");
    let (stored, status) = read_state_file(&file);
    assert_eq!(stored, id);
    assert_eq!(status, OFFLINE);
    let bytes = fs::read(&file).unwrap();
    assert_eq!(&bytes[16..32], b"net1\0\0\0\0\0\0\0\0\0\0\0\0");
    assert_eq!(&bytes[64..68], &2u32.to_le_bytes(), "type device");

    let out = l.admin(&["--json", "node", "list"]);
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()], "{nodes}");
}

#[test]
fn registers_with_an_rsa_4096_key_whose_pem_is_exactly_800_bytes() {
    let l = Listener::start_with_key("rsa4096_private_key.pem", &[]);
    l.create_network("net1");
    let file = l.state_file("node.bin");
    let run = l
        .register("net1", &l.passphrase("net1", "n1"), &file, &[])
        .expect(0);
    assert_eq!(read_state_file(&file).0, uuid_of(&run));
}

#[test]
fn registers_over_udp_with_json_output() {
    let l = Listener::start();
    l.create_network("net1");
    let pass = l.passphrase("net1", "n1");
    let file = l.state_file("node.bin");
    let run = l
        .register(
            "net1",
            &pass,
            &file,
            &["--udp", "--json", "--type", "fog", "--arch", "rpi_linux"],
        )
        .expect(0);
    let out: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(out["status"], 200);
    let id = out["node_id"].as_str().unwrap();
    assert_eq!(read_state_file(&file).0, id);
    let shown = l.admin(&["--json", "node", "show", id]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["node_type"], "fog", "{shown}");
    assert_eq!(shown["arch"], "rpi_linux", "{shown}");
}

#[test]
fn a_used_passphrase_or_unknown_network_exits_3() {
    let l = Listener::start();
    l.create_network("net1");
    let pass = l.passphrase("net1", "n1");
    l.register("net1", &pass, &l.state_file("a.bin"), &[])
        .expect(0);

    let again = l
        .register("net1", &pass, &l.state_file("b.bin"), &[])
        .expect(3);
    assert!(
        again
            .stderr
            .contains("error: registration refused: 401 Invalid passphrase. (network \"net1\")"),
        "{}",
        again.stderr
    );
    assert!(again.stdout.is_empty());
    assert!(!l.state_file("b.bin").exists(), "no state file on failure");

    let pass2 = l.passphrase("net1", "n2");
    let unknown = l
        .register("nosuchnet", &pass2, &l.state_file("c.bin"), &["--json"])
        .expect(3);
    assert!(unknown.stderr.contains("401"), "{}", unknown.stderr);
    let out: serde_json::Value = serde_json::from_str(&unknown.stdout).unwrap();
    assert_eq!(out["status"], 401);
    assert_eq!(out["exit_code"], 3);
    assert!(!unknown.stderr.contains(&pass2) && !unknown.stdout.contains(&pass2));
}

#[test]
fn re_registering_with_the_state_file_keeps_the_node_id() {
    let l = Listener::start();
    l.create_network("net1");
    let file = l.state_file("node.bin");
    let first = l
        .register("net1", &l.passphrase("net1", "n1"), &file, &[])
        .expect(0);
    let key_before = fs::read(&file).unwrap()[32..64].to_vec();
    let second = l
        .register("net1", &l.passphrase("net1", "n1b"), &file, &["--udp"])
        .expect(0);
    assert_eq!(uuid_of(&first), uuid_of(&second));
    assert_ne!(
        fs::read(&file).unwrap()[32..64],
        key_before,
        "a fresh node key"
    );
    // The new key is the one the server now holds: a state change goes through.
    l.state("online", &file, &[]).expect(0);
}

#[test]
fn state_changes_follow_the_allowed_transitions() {
    let l = Listener::start();
    l.create_network("net1");
    let file = l.state_file("node.bin");
    l.register("net1", &l.passphrase("net1", "n1"), &file, &[])
        .expect(0);

    let run = l.state("loading", &file, &[]).expect(6);
    assert!(
        run.stderr.contains("state change refused: 403"),
        "{}",
        run.stderr
    );
    assert_eq!(read_state_file(&file).1, OFFLINE, "unchanged on refusal");

    let run = l.state("online", &file, &["--json"]).expect(0);
    let printed: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        (&printed["status"], &printed["from"], &printed["to"]),
        (&json!(200), &json!("offline"), &json!("online"))
    );
    assert_eq!(read_state_file(&file).1, ONLINE);
    let run = l.state("loading", &file, &["--udp"]).expect(0);
    assert!(
        run.stdout.trim().ends_with("online → loading"),
        "the outcome is printed: {}",
        run.stdout
    );
    assert_eq!(read_state_file(&file).1, LOADING);
}

#[test]
fn unknown_node_is_refused_with_6() {
    let l = Listener::start();
    l.create_network("net1");
    let file = l.state_file("node.bin");
    l.register("net1", &l.passphrase("net1", "n1"), &file, &[])
        .expect(0);
    // Another listener never heard of this node.
    let other = Listener::start();
    let run = other.state("online", &file, &[]).expect(6);
    assert!(run.stderr.contains("404"), "{}", run.stderr);
}

#[test]
fn nothing_listening_exits_2() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.bin");
    let port = closed.to_string();
    let run = node(&[
        "ijam",
        "register",
        "--server",
        "127.0.0.1",
        "--cert-port",
        &port,
        "--reg-port",
        &port,
        "--network",
        "net1",
        "--passphrase",
        "abc123",
        "--state-file",
        file.to_str().unwrap(),
        "--timeout",
        "2s",
    ])
    .expect(2);
    assert!(run.stderr.starts_with("error: "), "{}", run.stderr);
    assert!(!run.stderr.contains("abc123"), "never print the passphrase");
    assert!(!file.exists());
}

#[test]
fn a_damaged_or_missing_state_file_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.bin");
    let args = |f: &Path| {
        [
            "ijam",
            "state",
            "online",
            "--server",
            "127.0.0.1",
            "--state-port",
            "9",
            "--state-file",
        ]
        .into_iter()
        .map(String::from)
        .chain([f.to_str().unwrap().to_string()])
        .collect::<Vec<_>>()
    };
    let run = node(&args(&file).iter().map(String::as_str).collect::<Vec<_>>()).expect(1);
    assert!(run.stderr.contains("register first"), "{}", run.stderr);
    fs::write(&file, [0x5au8; 76]).unwrap();
    let run = node(&args(&file).iter().map(String::as_str).collect::<Vec<_>>()).expect(1);
    assert!(run.stderr.contains("checksum mismatch"), "{}", run.stderr);
    // Usage errors exit 1 too (clap's own default would be 2, which means "unreachable").
    node(&["ijam", "register", "--server", "x"]).expect(1);
    node(&["--help"]).expect(0);
}

#[test]
fn a_lost_udp_reply_is_retried_with_the_same_bytes() {
    let l = Listener::start();
    l.create_network("net1");
    let pass = l.passphrase("net1", "n1");
    // A relay in front of the registration port that loses the first reply.
    let relay = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    let server = l.reg;
    let forwarder = std::thread::spawn(move || {
        relay
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        upstream.connect(server).unwrap();
        upstream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 2048];
        for attempt in 0..2 {
            let (n, client) = relay.recv_from(&mut buf).unwrap();
            seen.push(buf[..n].to_vec());
            upstream.send(&buf[..n]).unwrap();
            let m = upstream.recv(&mut buf).unwrap();
            if attempt == 1 {
                relay.send_to(&buf[..m], client).unwrap();
            }
        }
        seen
    });
    let file = l.state_file("node.bin");
    let relay_port = relay_port.to_string();
    let run = node(&[
        "ijam",
        "register",
        "--server",
        "127.0.0.1",
        "--udp",
        "--timeout",
        "500ms",
        "--cert-port",
        &l.cert.port().to_string(),
        "--reg-port",
        &relay_port,
        "--network",
        "net1",
        "--passphrase",
        &pass,
        "--state-file",
        file.to_str().unwrap(),
    ])
    .expect(0);
    let seen = forwarder.join().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0], seen[1], "the retry resends the same ciphertext");
    assert!(run.stderr.contains("resending"), "{}", run.stderr);
    // The server's replay cache answered the retry with the node it created first.
    let id = uuid_of(&run);
    assert_eq!(read_state_file(&file).0, id);
    let out = l.admin(&["--json", "node", "list"]);
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");
    assert_eq!(nodes[0]["id"], id.as_str());
}

#[test]
fn the_load_tool_mints_its_passphrases_registers_them_all_and_reports() {
    let l = Listener::start();
    for transport in [&[] as &[&str], &["--udp"]] {
        let run = node(
            &[
                &["--json", "load", "ijam", "--server", "127.0.0.1"] as &[&str],
                &["--cert-port", &l.cert.port().to_string()],
                &["--reg-port", &l.reg.port().to_string()],
                &["--data-dir", l.data_dir().to_str().unwrap()],
                &["--count", "60", "--connections", "4"],
                &["--listener-pid", &l.child.id().to_string()],
                transport,
            ]
            .concat(),
        )
        .expect(0);
        let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(report["registrations"], 60, "{report}");
        assert_eq!(report["outcomes"]["200"], 60, "{report}");
        assert!(report["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
        assert!(report["listener_cpu_seconds"].as_f64().is_some());
        assert!(
            report["listener_cpu_us_per_registration_by_thread"]["crypto"].is_number(),
            "{report}"
        );
        let busy = report["machine_cpu"]["busy_share"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&busy), "{report}");
        assert!(report["machine_cpu"]["us_per_op"].is_number(), "{report}");
        assert!(
            report["machine_cpu"]["load_tool_us_per_op"].is_number(),
            "{report}"
        );
        assert_eq!(report["warnings"], json!([]), "{report}");
        // The run removes the network it made, with its nodes.
        assert_eq!(report["network_deleted"], true, "{report}");
        let network = report["network"].as_str().unwrap();
        assert!(!l.admin_raw(&["network", "show", network]).status.success());
        let nodes = l.admin(&["--json", "node", "list"]);
        let nodes: Vec<serde_json::Value> = serde_json::from_slice(&nodes.stdout).unwrap();
        assert!(nodes.is_empty(), "{nodes:?}");
    }
    // With the key fetched from the server and a rate: the text summary.
    let run = node(
        &[
            &[
                "load",
                "ijam",
                "--server",
                "127.0.0.1",
                "--rsa-key-from-server",
            ] as &[&str],
            &["--cert-port", &l.cert.port().to_string()],
            &["--reg-port", &l.reg.port().to_string()],
            &["--data-dir", l.data_dir().to_str().unwrap()],
            &["--count", "20", "--connections", "2", "--rate", "2000"],
        ]
        .concat(),
    )
    .expect(0);
    assert!(run.stdout.contains("20 registrations in"), "{}", run.stdout);
    assert!(
        run.stdout.contains("outcomes by status: 200: 20"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_load_run_that_met_the_rate_limit_says_so_and_times_registrations_only() {
    let l = Listener::start_with_key(
        "rsa2048_private_key.pem",
        &["--rate-per-source", "0.001", "--burst", "10"],
    );
    let (cert, reg, data) = (
        l.cert.port().to_string(),
        l.reg.port().to_string(),
        l.data_dir(),
    );
    let args = [
        &["load", "ijam", "--server", "127.0.0.1"] as &[&str],
        &["--cert-port", &cert],
        &["--reg-port", &reg],
        &["--data-dir", data.to_str().unwrap()],
        &["--count", "40", "--connections", "1"],
    ]
    .concat();
    let run = node(&[&["--json"], args.as_slice()].concat()).expect(0);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["outcomes"]["200"], 10, "{report}");
    assert_eq!(report["outcomes"]["429"], 30, "{report}");
    let warning = report["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("30 of 40 requests were refused with 429"),
        "{warning}"
    );
    assert!(run.stderr.contains("WARNING: 30 of 40"), "{}", run.stderr);
    // The percentiles are the ten registrations' alone.
    assert_eq!(report["latency_ms"]["count"], 10, "{report}");
    assert_eq!(report["latency_ms_from_sent"]["count"], 10, "{report}");
    let run = node(&args).expect(0);
    assert!(
        run.stdout
            .starts_with("WARNING: 40 of 40 requests were refused with 429"),
        "{}",
        run.stdout
    );
}

// ---- pubkey ---------------------------------------------------------------------------

impl Listener {
    fn pubkey(&self, cmd: &str, key: &Path, extra: &[&str]) -> Run {
        node(
            &[
                &["pubkey", cmd, "--server", "127.0.0.1"] as &[&str],
                &["--envelope-port", &self.envelope.port().to_string()],
                &["--key", key.to_str().unwrap()],
                extra,
            ]
            .concat(),
        )
    }
}

#[test]
fn pubkey_register_and_attest_map_statuses_to_exit_codes() {
    let l = Listener::start();
    let key = l.state_file("device.pem");

    // First use: a key (0600) and an id beside it; 201, exit 0, "<id> registered".
    let run = l.pubkey("register", &key, &[]).expect(0);
    let id = fs::read_to_string(l.state_file("device.id"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(id.len(), 32, "{id}");
    assert_eq!(run.stdout, format!("{id} registered\n"));
    let mode = fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let pem = fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");

    // Again (409, same key) over TCP and UDP: still a success.
    let run = l.pubkey("register", &key, &[]).expect(0);
    assert_eq!(run.stdout, format!("{id} already registered\n"));
    let run = l.pubkey("register", &key, &["--udp"]).expect(0);
    assert_eq!(run.stdout, format!("{id} already registered\n"));
    let run = node(
        &[
            &["--json", "pubkey", "register", "--server", "127.0.0.1"] as &[&str],
            &["--envelope-port", &l.envelope.port().to_string()],
            &["--key", key.to_str().unwrap()],
        ]
        .concat(),
    )
    .expect(0);
    let out: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(out["device_id"], id.as_str());
    assert_eq!(out["status"], 409);

    // Attest, both transports.
    let run = l.pubkey("attest", &key, &[]).expect(0);
    assert!(
        run.stdout.starts_with(&format!("{id} attested at ")),
        "{}",
        run.stdout
    );
    l.pubkey("attest", &key, &["--udp"]).expect(0);
    let shown = l.admin(&["--json", "device", "show", &id]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["attestations"], 2);

    // Another key claiming the same id: 403, the "locked" exit code 8.
    let thief = l.state_file("thief.pem");
    let run = l
        .pubkey("register", &thief, &["--device-id", &id])
        .expect(8);
    assert!(
        run.stderr.contains("registration refused: 403"),
        "{}",
        run.stderr
    );
    // The thief's id file now names that id; the thief cannot attest as it (401: 3).
    l.pubkey("attest", &thief, &[]).expect(3);

    // An --device-id that contradicts the id file: a local error, nothing sent.
    let other_id = "0123456789abcdef0123456789abcdef";
    l.pubkey("register", &key, &["--device-id", other_id])
        .expect(1);
    // No key yet: attest is a local error.
    l.pubkey("attest", &l.state_file("none.pem"), &[]).expect(1);
    // A key and id never registered: 404, exit 4.
    let fresh = l.state_file("fresh.pem");
    let pem = registrar::client::pubkey::DeviceKey::generate()
        .unwrap()
        .to_pkcs8_pem()
        .unwrap();
    fs::write(&fresh, pem).unwrap();
    let run = l
        .pubkey("attest", &fresh, &["--device-id", other_id])
        .expect(4);
    assert!(run.stderr.contains("404"), "{}", run.stderr);

    // Revoked: register and attest both exit 8.
    l.admin(&["device", "revoke", &id]);
    let run = l.pubkey("register", &key, &[]).expect(8);
    assert!(run.stderr.contains("403"), "{}", run.stderr);
    l.pubkey("attest", &key, &["--udp"]).expect(8);
    let run = node(
        &[
            &["--json", "pubkey", "attest", "--server", "127.0.0.1"] as &[&str],
            &["--envelope-port", &l.envelope.port().to_string()],
            &["--key", key.to_str().unwrap()],
        ]
        .concat(),
    )
    .expect(8);
    let out: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        (out["status"].as_u64(), out["exit_code"].as_u64()),
        (Some(403), Some(8))
    );

    // A malformed --device-id is a usage error; nothing listening is exit 2.
    l.pubkey("register", &key, &["--device-id", "xyz"])
        .expect(1);
    let closed = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    node(
        &[
            &["pubkey", "register", "--server", "127.0.0.1"] as &[&str],
            &["--envelope-port", &closed.to_string()],
            &[
                "--key",
                l.state_file("x.pem").to_str().unwrap(),
                "--timeout",
                "2s",
            ],
        ]
        .concat(),
    )
    .expect(2);
}

#[test]
fn the_pubkey_load_tool_registers_and_attests() {
    let l = Listener::start();
    for (mode, udp, success) in [
        ("register", false, "201"),
        ("register", true, "201"),
        ("attest", false, "200"),
        ("attest", true, "200"),
    ] {
        let udp_flag: &[&str] = if udp { &["--udp"] } else { &[] };
        let run = node(
            &[
                &["--json", "load", "pubkey", "--server", "127.0.0.1"] as &[&str],
                &["--envelope-port", &l.envelope.port().to_string()],
                &["--mode", mode, "--count", "40", "--connections", "4"],
                &["--listener-pid", &l.child.id().to_string()],
                udp_flag,
            ]
            .concat(),
        )
        .expect(0);
        let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(report["completed"], 40, "{report}");
        assert_eq!(report["outcomes"][success], 40, "{report}");
    }
    let devices = l.admin(&["--json", "device", "list"]);
    let devices: Vec<serde_json::Value> = serde_json::from_slice(&devices.stdout).unwrap();
    assert_eq!(
        devices.len(),
        40 + 40 + 4 + 4,
        "register runs plus one device per attest connection"
    );
}

#[test]
fn the_pubkey_load_tool_pipelines_requests_and_counts_every_one() {
    let l = Listener::start();
    let load = |mode: &str, count: &str, pipeline: &str, transport: &[&str]| {
        let run = node(
            &[
                &["--json", "load", "pubkey", "--server", "127.0.0.1"] as &[&str],
                &["--envelope-port", &l.envelope.port().to_string()],
                &["--mode", mode, "--count", count, "--connections", "2"],
                &["--pipeline", pipeline],
                &["--listener-pid", &l.child.id().to_string()],
                transport,
            ]
            .concat(),
        )
        .expect(0);
        serde_json::from_str::<serde_json::Value>(&run.stdout).unwrap()
    };
    for transport in [&[] as &[&str], &["--udp"]] {
        // 41 is not a multiple of 2 × 4: the last batch is a short one.
        let report = load("register", "41", "4", transport);
        assert_eq!(report["completed"], 41, "{report}");
        assert_eq!(report["outcomes"]["201"], 41, "{report}");
        assert!(
            report["listener_cpu_us_per_operation_by_thread"]["crypto"].is_number(),
            "{report}"
        );
        assert!(report["machine_cpu"]["us_per_op"].is_number(), "{report}");
        let report = load("attest", "30", "4", transport);
        assert_eq!(report["completed"], 30, "{report}");
        assert_eq!(report["outcomes"]["200"], 30, "{report}");
    }
    // Every registration reached the store: 2 × 41, plus the 2 devices each attest run
    // registers before its window.
    let out = l.admin(&["--json", "device", "list"]);
    let devices: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(devices.len(), 2 * 41 + 2 * 2);
}

/// A certificate server as the original: the 2048-bit PEM (451 bytes) unpadded, and the
/// connection held open. The client reads to the PEM's END line and goes on.
#[test]
fn registers_against_a_certificate_server_that_sends_an_unpadded_pem_and_stays_open() {
    let l = Listener::start();
    l.create_network("net1");
    let pem = fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/vectors/ijam/cert_response_rsa2048.pem"),
    )
    .unwrap();
    assert_eq!(pem.len(), 451);
    let original = TcpListener::bind("127.0.0.1:0").unwrap();
    let cert_port = original.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = original.accept().unwrap();
        use std::io::{Read, Write};
        let mut magic = [0u8; 4];
        conn.read_exact(&mut magic).unwrap();
        conn.write_all(&pem).unwrap();
        // Held open until the client is done with it.
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
    });
    let file = l.state_file("node.bin");
    let passphrase = l.passphrase("net1", "n1");
    let run = node(
        &[
            &["ijam", "register", "--server", "127.0.0.1"] as &[&str],
            &["--cert-port", &cert_port.to_string()],
            &["--reg-port", &l.reg.port().to_string()],
            &["--network", "net1", "--passphrase", &passphrase],
            &["--state-file", file.to_str().unwrap(), "--timeout", "20s"],
        ]
        .concat(),
    )
    .expect(0);
    assert!(!uuid_of(&run).is_empty());
    server.join().unwrap();
}

#[test]
fn a_mistyped_generated_passphrase_is_pointed_out_before_it_is_sent() {
    let l = Listener::start();
    l.create_network("net1");
    let good = l.passphrase("net1", "n1");
    assert_eq!(good.len(), 15);
    let mut typo = good.clone().into_bytes();
    typo[3] = if typo[3] == b'x' { b'y' } else { b'x' };
    let typo = String::from_utf8(typo).unwrap();
    let file = l.state_file("node.bin");
    let run = l.register("net1", &typo, &file, &[]).expect(3);
    assert!(
        run.stderr.contains("a character is mistyped"),
        "{}",
        run.stderr
    );
    let run = l.register("net1", &good, &file, &[]).expect(0);
    assert!(!run.stderr.contains("mistyped"), "{}", run.stderr);
}

/// A 413 over UDP (the reply would break the anti-amplification rule) sends the same
/// request again over TCP. The fake server answers 413 on UDP and 201 on TCP, on one
/// port number, as a listener's envelope port is.
#[test]
fn a_413_over_udp_is_retried_over_tcp() {
    use registrar::wire::envelope::{self, Status};
    use std::io::{Read, Write};
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let udp = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let answer = |request: &[u8], status: Status| {
        let (header, _) = envelope::parse_datagram(request, 1 << 16).unwrap();
        envelope::to_vec(&header.reply(status), &[])
    };
    let udp_side = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let (n, peer) = udp.recv_from(&mut buf).unwrap();
        udp.send_to(&answer(&buf[..n], Status::PAYLOAD_TOO_LARGE), peer)
            .unwrap();
    });
    let tcp_side = std::thread::spawn(move || {
        let (mut conn, _) = tcp.accept().unwrap();
        let mut head = [0u8; envelope::HEADER_LEN];
        conn.read_exact(&mut head).unwrap();
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap()) as usize;
        let mut rest = vec![0u8; len + envelope::TRAILER_LEN];
        conn.read_exact(&mut rest).unwrap();
        conn.write_all(&answer(&[&head[..], &rest].concat(), Status::CREATED))
            .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("device.pem");
    let run = node(
        &[
            &["pubkey", "register", "--server", "127.0.0.1", "--udp"] as &[&str],
            &["--envelope-port", &port.to_string()],
            &["--key", key.to_str().unwrap()],
        ]
        .concat(),
    )
    .expect(0);
    assert!(run.stdout.ends_with("registered\n"), "{}", run.stdout);
    assert!(run.stderr.contains("answered 413"), "{}", run.stderr);
    udp_side.join().unwrap();
    tcp_side.join().unwrap();
}
