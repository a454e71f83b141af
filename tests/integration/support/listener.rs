//! Runs the real `registrar` binary on port 0 and reads the bound ports from its
//! stable start-up line; admin commands run as the same binary on the same data dir.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use tempfile::TempDir;

use super::redis_server::PrivateRedis;

pub const BIN: &str = env!("CARGO_BIN_EXE_registrar");

pub fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/ijam")
}

pub fn vector(name: &str) -> Vec<u8> {
    let path = vectors_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Which store the listener runs on.
pub enum Backend {
    Sqlite,
    Redis(PrivateRedis),
    /// A private Redis served in the JAMScript-OTA portal's layout (`ota+redis://`).
    Portal(PrivateRedis),
    /// A store another listener owns (e.g. a second listener on the same Redis).
    Shared(String),
}

impl Backend {
    /// `None` when the backend's server is not installed (the suite prints "skipped").
    pub fn named(name: &str) -> Option<Backend> {
        match name {
            "sqlite" => Some(Backend::Sqlite),
            "redis" => PrivateRedis::start().map(Backend::Redis),
            "portal" => PrivateRedis::start().map(Backend::Portal),
            other => panic!("unknown backend {other}"),
        }
    }

    fn store_arg(&self) -> String {
        match self {
            Backend::Sqlite => "sqlite".into(),
            Backend::Redis(redis) => redis.url(),
            Backend::Portal(redis) => format!("ota+{}", redis.url()),
            Backend::Shared(url) => url.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub cert: SocketAddr,
    pub reg_tcp: SocketAddr,
    pub reg_udp: SocketAddr,
    pub state_tcp: SocketAddr,
    pub state_udp: SocketAddr,
    pub envelope_tcp: SocketAddr,
    pub envelope_udp: SocketAddr,
}

pub struct Listener {
    child: Child,
    pub ports: Ports,
    pub data_dir: TempDir,
    store: String,
    /// The start-up line, `registrar listening …`.
    line: String,
    /// Everything logged so far, and a signal for each new chunk.
    stderr: Arc<(Mutex<Vec<u8>>, Condvar)>,
    /// Everything printed on stdout so far, likewise.
    stdout: Arc<(Mutex<Vec<u8>>, Condvar)>,
    _backend: Backend,
}

/// Which RSA key the data dir starts with.
#[derive(Debug, Clone, Copy)]
pub enum Key {
    /// The upstream capture's 2048-bit key (no key generation in the test).
    Vector2048,
    Vector4096,
    /// Let the listener generate one.
    Generate,
}

impl Listener {
    pub fn start(backend: Backend, key: Key, extra: &[&str]) -> Listener {
        let data_dir = tempfile::tempdir().expect("temp data dir");
        let pem = match key {
            Key::Vector2048 => Some("rsa2048_private_key.pem"),
            Key::Vector4096 => Some("rsa4096_private_key.pem"),
            Key::Generate => None,
        };
        if let Some(pem) = pem {
            std::fs::write(data_dir.path().join("rsa_private_key.pem"), vector(pem)).unwrap();
        }
        Self::start_in(backend, data_dir, extra)
    }

    /// Starts on an existing data dir (restart tests).
    pub fn start_in(backend: Backend, data_dir: TempDir, extra: &[&str]) -> Listener {
        let store = backend.store_arg();
        let mut child = Command::new(BIN)
            .args([
                "--data-dir",
                data_dir.path().to_str().unwrap(),
                "--store",
                &store,
                "serve",
            ])
            .args(["--bind", "127.0.0.1", "--cert-port", "0", "--reg-port", "0"])
            .args(["--state-port", "0", "--envelope-port", "0"])
            // Sojourn shedding answers 503 once requests have queued for 100 ms, which on
            // a slow or busy machine (the suites run in parallel) a burst of RSA work can
            // take: these suites test what a request gets, so it is off; pool.rs tests
            // the shedding itself, and admission.rs the 503 of a full queue.
            .args(
                ["--max-queue-wait", "0"]
                    .iter()
                    .filter(|_| !extra.contains(&"--max-queue-wait")),
            )
            .args(extra)
            .env("REGISTRAR_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn registrar");
        let stderr = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.0.lock().unwrap().extend_from_slice(&buf[..n]);
                sink.1.notify_all();
            }
        });
        let (line_tx, line_rx) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        let stdout = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = Arc::clone(&stdout);
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if line.starts_with("registrar listening ") {
                    let _ = line_tx.send(line.clone());
                }
                let mut text = sink.0.lock().unwrap();
                text.extend_from_slice(line.as_bytes());
                text.push(b'\n');
                sink.1.notify_all();
            }
        });
        let line = match line_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "registrar did not start; stderr:\n{}",
                    String::from_utf8_lossy(&stderr.0.lock().unwrap())
                );
            }
        };
        let addr = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("{key} missing from {line:?}"))
                .parse()
                .unwrap()
        };
        let ports = Ports {
            cert: addr("cert_tcp"),
            reg_tcp: addr("reg_tcp"),
            reg_udp: addr("reg_udp"),
            state_tcp: addr("state_tcp"),
            state_udp: addr("state_udp"),
            envelope_tcp: addr("envelope_tcp"),
            envelope_udp: addr("envelope_udp"),
        };
        Listener {
            child,
            ports,
            data_dir,
            store,
            line,
            stderr,
            stdout,
            _backend: backend,
        }
    }

    /// A second listener on the same store with the same keys (as a fleet of listeners
    /// behind a balancer shares them).
    pub fn start_sibling(&self, extra: &[&str]) -> Listener {
        let data_dir = tempfile::tempdir().expect("temp data dir");
        for file in ["rsa_private_key.pem", "storage.key", "signing_key.pem"] {
            let from = self.data_dir.path().join(file);
            if from.exists() {
                std::fs::copy(&from, data_dir.path().join(file)).unwrap();
            }
        }
        Listener::start_in(Backend::Shared(self.store.clone()), data_dir, extra)
    }

    /// The metrics listener, when started with `--metrics-addr`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.line.split_whitespace().find_map(|kv| {
            kv.strip_prefix("metrics=http://")?
                .strip_suffix("/metrics")?
                .parse()
                .ok()
        })
    }

    /// The `--store` argument this listener runs with.
    pub fn store_url(&self) -> &str {
        &self.store
    }

    /// Everything the listener logged so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.stderr.0.lock().unwrap()).into_owned()
    }

    /// Runs an admin command against this listener's data dir and store.
    pub fn admin(&self, args: &[&str]) -> Output {
        admin(self.data_dir.path(), &self.store, args)
    }

    /// Runs an admin command that must succeed; returns its stdout.
    pub fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin(args);
        assert!(
            out.status.success(),
            "registrar {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn create_network(&self, network: &str, owner: &str) {
        self.admin_ok(&["network", "create", network, "--owner", owner]);
    }

    /// Mints one passphrase and returns it.
    pub fn add_passphrase(&self, network: &str, node_name: &str) -> String {
        let out = self.admin_ok(&["passphrase", "add", network, "--node-name", node_name]);
        out.trim().to_string()
    }

    pub fn nodes_json(&self) -> Vec<serde_json::Value> {
        let out = self.admin_ok(&["--json", "node", "list"]);
        serde_json::from_str(&out).unwrap()
    }

    pub fn node_json(&self, id: uuid::Uuid) -> serde_json::Value {
        let out = self.admin_ok(&["--json", "node", "show", &id.to_string()]);
        serde_json::from_str(&out).unwrap()
    }

    /// The private Redis behind this listener, if it runs on one.
    pub fn redis(&mut self) -> Option<&mut PrivateRedis> {
        match &mut self._backend {
            Backend::Redis(redis) | Backend::Portal(redis) => Some(redis),
            Backend::Sqlite | Backend::Shared(_) => None,
        }
    }

    /// Blocks until `needle` appears `count` times in the log (bounded: panics after
    /// a minute, printing the log).
    pub fn wait_for_log_count(&self, needle: &str, count: usize) {
        wait_for(&self.stderr, "logged", needle, count);
    }

    /// Blocks until any of `needles` was logged; returns which (bounded like
    /// [`Listener::wait_for_log_count`]).
    pub fn wait_for_log_any(&self, needles: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let (text, grew) = &*self.stderr;
        let mut text = text.lock().unwrap();
        loop {
            let log = String::from_utf8_lossy(&text);
            if let Some(found) = needles.iter().find(|n| log.contains(**n)) {
                return (*found).to_owned();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "none of {needles:?} was logged:\n{log}");
            drop(log);
            text = grew.wait_timeout(text, left).unwrap().0;
        }
    }

    /// Blocks until the listener printed a line holding `needle` on stdout; returns
    /// everything it printed so far.
    pub fn wait_for_stdout(&self, needle: &str) -> String {
        wait_for(&self.stdout, "printed", needle, 1);
        String::from_utf8_lossy(&self.stdout.0.lock().unwrap()).into_owned()
    }

    /// Sends a signal (`TERM`, `INT`, `KILL`) to the listener.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the listener to exit by itself.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait for registrar")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Stops the listener (SIGKILL) and hands back its data dir and backend.
    pub fn stop(mut self) -> (TempDir, Backend) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let data_dir = std::mem::replace(&mut self.data_dir, tempfile::tempdir().unwrap());
        let backend = std::mem::replace(&mut self._backend, Backend::Sqlite);
        (data_dir, backend)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Blocks until `needle` appears `count` times in `text` (bounded: panics after a
/// minute, printing what there is).
fn wait_for(text: &(Mutex<Vec<u8>>, Condvar), verb: &str, needle: &str, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (text, grew) = text;
    let mut text = text.lock().unwrap();
    while String::from_utf8_lossy(&text).matches(needle).count() < count {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(
            !left.is_zero(),
            "{needle:?} ×{count} never {verb}:\n{}",
            String::from_utf8_lossy(&text)
        );
        text = grew.wait_timeout(text, left).unwrap().0;
    }
}

pub fn admin(data_dir: &Path, store: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["--data-dir", data_dir.to_str().unwrap(), "--store", store])
        .args(args)
        .env("REGISTRAR_LOG", "warn")
        .output()
        .expect("run registrar")
}

/// The resident set of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}
