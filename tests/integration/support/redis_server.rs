//! A private, throwaway `redis-server` per test: its own loopback port and directory,
//! no persistence, killed on drop. Never the shared server on 6379.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const INSTALL_HINT: &str = "apt-get install -y redis-server";
/// How long a fresh server may take to answer PING.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// Ports tried before giving up (another process may grab a port between our probe
/// and redis-server's bind).
const PORT_ATTEMPTS: usize = 5;

pub struct PrivateRedis {
    child: Child,
    port: u16,
    dir: TempDir,
    mode: Mode,
}

/// How a private server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No persistence.
    Plain,
    /// AOF with `appendfsync always`: a restart finds every acknowledged write.
    Durable,
    /// `cluster-enabled yes`, one node owning every slot: a script that touches keys
    /// of two slots is refused, as on a real cluster.
    ClusterNode,
}

impl PrivateRedis {
    /// Starts a private server, or returns `None` (after one "skipped" line) when
    /// `redis-server` is not installed. Under CI (`CI` set) a missing server panics,
    /// so the Redis half of the suite cannot silently vanish.
    pub fn start() -> Option<PrivateRedis> {
        Self::start_with(Mode::Plain)
    }

    /// Like [`PrivateRedis::start`], in cluster mode: one node owning all 16,384
    /// slots, ready (`cluster_state:ok`) when this returns.
    pub fn start_cluster_node() -> Option<PrivateRedis> {
        let server = Self::start_with(Mode::ClusterNode)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, server.port));
        let added = command(addr, &["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        assert_eq!(added.as_deref(), Some("+OK"), "CLUSTER ADDSLOTSRANGE");
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let info = command(addr, &["CLUSTER", "INFO"]).unwrap_or_default();
            if info.contains("cluster_state:ok") {
                return Some(server);
            }
            assert!(
                Instant::now() < deadline,
                "the cluster node never reached cluster_state:ok: {info}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`PrivateRedis::start`], with an append-only file fsynced on every write,
    /// so [`PrivateRedis::kill`] + [`PrivateRedis::resume`] is a crash and a recovery.
    pub fn start_durable() -> Option<PrivateRedis> {
        Self::start_with(Mode::Durable)
    }

    fn start_with(mode: Mode) -> Option<PrivateRedis> {
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let mut child = match spawn(port, &dir, mode) {
                Ok(child) => child,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    if under_ci() {
                        panic!("redis-server is not on PATH; install it: {INSTALL_HINT}");
                    }
                    report_skip();
                    return None;
                }
                Err(e) => panic!("cannot run redis-server: {e}"),
            };
            match wait_ready(&mut child, port) {
                Ok(()) => {
                    return Some(PrivateRedis {
                        child,
                        port,
                        dir,
                        mode,
                    });
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    failures.push(format!("port {port}: {why}{}", server_log(&dir)));
                }
            }
        }
        panic!("redis-server did not start:\n{}", failures.join("\n"));
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL), leaving the port closed until [`PrivateRedis::resume`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port after [`PrivateRedis::kill`] (empty,
    /// unless durable).
    pub fn resume(&mut self) {
        self.restart();
    }

    /// Stops the server (SIGSTOP): connections stay open, nothing is answered, as a
    /// server stalled by a slow disk or a paused VM would be.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn unpause(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} redis-server");
    }

    /// Kills the server and starts a new one on the same port (empty: nothing is
    /// persisted). Clients see their connections drop.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(self.port, &self.dir, self.mode).expect("redis-server ran a moment ago");
        if let Err(why) = wait_ready(&mut self.child, self.port) {
            panic!(
                "redis-server did not restart on port {}: {why}{}",
                self.port,
                server_log(&self.dir)
            );
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `CI` set to anything but empty, `0` or `false` (as CI services and `.ci/run` set it).
pub fn under_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok(v) if !v.is_empty() && v != "0" && v != "false")
}

/// Says that a Redis suite was skipped where a person reads it: libtest captures
/// `println!` and `eprintln!` of a passing test, not writes to the stderr handle.
fn report_skip() {
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {}: redis-server is not on PATH ({INSTALL_HINT}); CI=1 makes this a failure",
        std::thread::current().name().unwrap_or("a Redis suite"),
    );
}

/// Polls until the server answers PING, exits, or `READY_WITHIN` passes.
fn wait_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + READY_WITHIN;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("redis-server exited with {status}"));
        }
        match server_pid(addr) {
            // PING answers once the data set is loaded (an AOF after a restart).
            Some(pid) if pid == child.id() && ping(addr) => return Ok(()),
            Some(pid) if pid == child.id() => {}
            // The port was taken between our probe and the server's bind, and another
            // test's server answers on it: ours will exit on its failed bind.
            Some(pid) => return Err(format!("port {port} is served by pid {pid}, not ours")),
            None => {}
        }
        if Instant::now() >= deadline {
            return Err(format!("no PONG within {READY_WITHIN:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spawn(port: u16, dir: &TempDir, mode: Mode) -> std::io::Result<Child> {
    let persistence: &[&str] = match mode {
        Mode::Durable => &["--appendonly", "yes", "--appendfsync", "always"],
        Mode::Plain => &["--appendonly", "no"],
        Mode::ClusterNode => &[
            "--appendonly",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ],
    };
    Command::new("redis-server")
        .arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir.path())
        .arg("--logfile")
        .arg(dir.path().join("redis.log"))
        .args(["--save", "", "--daemonize", "no"])
        .args(persistence)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// A port the kernel just handed out; free again once the listener is dropped.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The process id of the Redis server answering on `addr`, if one answers. The tests
/// compare it with their child's, so a server another test started on a recycled port
/// is never taken for their own.
fn server_pid(addr: SocketAddr) -> Option<u32> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    stream
        .write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
        .ok()?;
    // A bulk string: `$<len>\r\n<text>\r\n`; read until the text is whole.
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        let (len, body) = text.strip_prefix('$')?.split_once("\r\n")?;
        if body.len() >= len.parse::<usize>().ok()? {
            return body
                .lines()
                .find_map(|l| l.strip_prefix("process_id:"))
                .and_then(|pid| pid.trim().parse().ok());
        }
    }
}

/// Sends one command (RESP array of bulk strings); returns the reply's text (a status
/// line, or a bulk string's body), `None` when nothing answers.
pub fn command(addr: SocketAddr, args: &[&str]) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply).into_owned();
        if let Some(bulk) = text.strip_prefix('$') {
            let (len, body) = bulk.split_once("\r\n")?;
            let len: usize = len.parse().ok()?;
            if body.len() >= len {
                return Some(body[..len].to_owned());
            }
        } else if let Some(line) = text.strip_suffix("\r\n") {
            return Some(line.to_owned());
        }
    }
}

fn ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// The server's log, for failure messages.
fn server_log(dir: &TempDir) -> String {
    match std::fs::read_to_string(dir.path().join("redis.log")) {
        Ok(log) => format!("\nredis.log:\n{log}"),
        Err(_) => String::new(),
    }
}
