//! `registrar-node load ijam`: the load generator behind the README's performance
//! table.
//!
//! Everything costly for the client happens before the timed window: it mints its own
//! network and passphrases through the store (as the admin commands do) or reads a
//! file of them, and RSA-encrypts every request up front, so that during the window it
//! only writes ciphertexts and reads replies. Latency is measured from the moment a
//! request was due (open loop with `--rate`), so a stalled server shows up in the tail
//! instead of silently slowing the offered load.

use registrar::core::random;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use registrar::core::clock;
use registrar::core::crypto::{RsaKey, RsaPublicKey, passphrase};
use registrar::core::datadir::DataDir;
use registrar::flow::ijam::{
    REASON_BUSY, REASON_INVALID_PASSPHRASE, REASON_RATE_LIMITED, REASON_REQUEST, REASON_UNAVAILABLE,
};
use registrar::store::ijam::{IjamStore, NewPassphrase, Reregistration};
use registrar::store::{Creation, Stores};
use registrar::wire::ijam::{NetworkId, NodeArch, NodeKey, NodeType, Passphrase, RegisterRequest};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

#[derive(Args, Debug)]
pub struct LoadIjamArgs {
    /// Server host name or IP address.
    #[arg(long, env = "REGISTRAR_SERVER")]
    server: String,
    #[arg(long, default_value_t = 8444)]
    cert_port: u16,
    #[arg(long, default_value_t = 8445)]
    reg_port: u16,
    /// Concurrent clients, each with its own connection (or UDP socket).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Offered load in registrations per second across all connections (open loop);
    /// without it every connection sends its next request as soon as it has a reply.
    #[arg(long)]
    rate: Option<f64>,
    /// Run for this long (needs --rate, or mints --max-count passphrases).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "count")]
    duration: Option<Duration>,
    /// Send exactly this many registrations.
    #[arg(long)]
    count: Option<usize>,
    /// With --duration and no --rate: how many requests to prepare at most.
    #[arg(long, default_value_t = 200_000)]
    max_count: usize,
    /// Send over UDP: one datagram per request; a request without a reply within
    /// --timeout counts as `no_reply` (shed requests are dropped by the server).
    #[arg(long)]
    udp: bool,
    /// Fetch the RSA public key from the certificate port instead of reading it from
    /// --data-dir.
    #[arg(long)]
    rsa_key_from_server: bool,
    /// Data dir shared with the listener (its RSA key and storage key).
    #[arg(long, env = "REGISTRAR_DATA_DIR", default_value = "./registrar-data")]
    data_dir: PathBuf,
    /// The listener's store, where the load network and its passphrases are minted.
    #[arg(long, env = "REGISTRAR_STORE", default_value = "sqlite")]
    store: String,
    /// Use these passphrases (one per line, for --network) instead of minting them.
    #[arg(long, requires = "network")]
    passphrase_file: Option<PathBuf>,
    /// Keep the `load-XXXXXXXX` network this run made, with its nodes (it is deleted
    /// at the end otherwise).
    #[arg(long)]
    keep_network: bool,
    /// Network of --passphrase-file; without a file a fresh `load-XXXXXXXX` network is made.
    #[arg(long)]
    network: Option<String>,
    /// Per-request reply timeout.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The listener's process id: report its CPU time (user + sys) over the window and
    /// its memory (RSS) at the end.
    #[arg(long)]
    listener_pid: Option<u32>,
    /// Open this many idle TCP connections to the certificate port before the window
    /// and hold them through it (memory per connection; start the listener with a
    /// long --idle-timeout).
    #[arg(long, default_value_t = 0)]
    idle_connections: usize,
}

/// What one request ended as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Status(u16),
    BadReply,
    NoReply,
    IoError,
}

impl Outcome {
    fn name(self) -> String {
        match self {
            Outcome::Status(s) => s.to_string(),
            Outcome::BadReply => "bad_reply".into(),
            Outcome::NoReply => "no_reply".into(),
            Outcome::IoError => "io_error".into(),
        }
    }
}

struct Prepared {
    ciphertext: Vec<u8>,
    key: NodeKey,
}

#[derive(Default)]
struct Tally {
    outcomes: BTreeMap<Outcome, u64>,
}

pub fn run(args: &LoadIjamArgs) -> Result<serde_json::Value> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: &LoadIjamArgs) -> Result<serde_json::Value> {
    let count = match (args.count, args.duration, args.rate) {
        (Some(n), _, _) => n,
        (None, Some(d), Some(rate)) => (d.as_secs_f64() * rate).ceil() as usize,
        (None, Some(_), None) => args.max_count,
        (None, None, _) => bail!("give --count N or --duration D"),
    };
    if count == 0 || args.connections == 0 {
        bail!("--count and --connections must be at least 1");
    }
    let addr = resolve(&args.server, args.reg_port)?;
    let public_key = if args.rsa_key_from_server {
        fetch_public_key(&args.server, args.cert_port).await?
    } else {
        let data = DataDir::existing(&args.data_dir)?;
        let pem = std::fs::read_to_string(data.rsa_key_path()).with_context(|| {
            format!(
                "{}: use --rsa-key-from-server to fetch the key instead",
                data.rsa_key_path().display()
            )
        })?;
        let key = RsaKey::from_pkcs8_pem(&pem)?;
        RsaPublicKey::from_pem(key.public_pem().as_bytes())?
    };

    let minted = args.passphrase_file.is_none();
    let (network, passphrases) = match &args.passphrase_file {
        Some(file) => {
            let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
            let list: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            if list.len() < count {
                bail!(
                    "{} holds {} passphrases; {count} are needed",
                    file.display(),
                    list.len()
                );
            }
            (args.network.clone().expect("clap requires --network"), list)
        }
        None => mint(args, count).await?,
    };

    eprintln!("preparing {count} requests for network {network} …");
    let prepared = Arc::new(encrypt_all(&public_key, &network, &passphrases[..count])?);

    let mut idle = Vec::with_capacity(args.idle_connections);
    if args.idle_connections > 0 {
        let cert = resolve(&args.server, args.cert_port)?;
        for _ in 0..args.idle_connections {
            idle.push(
                TcpStream::connect(cert)
                    .await
                    .context("opening idle connections")?,
            );
        }
        eprintln!("holding {} idle connections", idle.len());
    }
    let rss_before = args.listener_pid.map(process_rss_kib).transpose()?;
    let cpu_before = args.listener_pid.map(process_cpu_seconds).transpose()?;
    let threads_before = args.listener_pid.map(thread_cpu_seconds).transpose()?;
    let machine_before = MachineCpu::now();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + d);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        let worker = Worker {
            addr,
            udp: args.udp,
            timeout: args.timeout,
            rate: args.rate,
            started,
            deadline,
            next: Arc::clone(&next),
            done: Arc::clone(&done),
            prepared: Arc::clone(&prepared),
        };
        workers.spawn(worker.run());
    }
    let (progress, ticker) = self::progress(count, &done);
    let mut from_due = latency_histogram()?;
    let mut from_sent = latency_histogram()?;
    let mut tally = Tally::default();
    while let Some(result) = workers.join_next().await {
        let (due, sent, t) = result??;
        from_due.add(&due)?;
        from_sent.add(&sent)?;
        for (k, v) in t.outcomes {
            *tally.outcomes.entry(k).or_default() += v;
        }
    }
    let elapsed = started.elapsed();
    ticker.abort();
    progress.set_position(done.load(Ordering::Relaxed));
    progress.finish_and_clear();
    let cpu = match (args.listener_pid, cpu_before) {
        (Some(pid), Some(before)) => Some(process_cpu_seconds(pid)? - before),
        _ => None,
    };
    let threads_after = args.listener_pid.map(thread_cpu_seconds).transpose()?;
    let machine_after = MachineCpu::now();
    let rss_after = args.listener_pid.map(process_rss_kib).transpose()?;
    drop(idle);

    let sent: u64 = tally.outcomes.values().sum();
    let ok = tally
        .outcomes
        .get(&Outcome::Status(200))
        .copied()
        .unwrap_or(0);
    let mut warnings = Vec::new();
    if let Some(&limited) = tally.outcomes.get(&Outcome::Status(429)) {
        warnings.push(format!(
            "{limited} of {sent} requests were refused with 429 by the listener's per-source \
             rate limit: this run measured that limit, not the listener. Start the listener \
             with --rate-per-source 0 for a load test."
        ));
    }
    if minted && !args.keep_network {
        delete_network(args, &network).await?;
    }
    let secs = elapsed.as_secs_f64();
    let outcomes: serde_json::Map<String, serde_json::Value> = tally
        .outcomes
        .iter()
        .map(|(k, v)| (k.name(), json!(v)))
        .collect();
    Ok(json!({
        "network": network,
        "transport": if args.udp { "udp" } else { "tcp" },
        "connections": args.connections,
        "offered_rate": args.rate,
        "sent": sent,
        "registrations": ok,
        "seconds": secs,
        "registrations_per_second": ok as f64 / secs,
        "requests_per_second": sent as f64 / secs,
        "latency_ms": latency_json(&from_due),
        "latency_ms_from_sent": latency_json(&from_sent),
        "warnings": warnings,
        "network_deleted": minted && !args.keep_network,
        "offered_achieved_per_second": sent as f64 / secs,
        "outcomes": outcomes,
        "listener_cpu_seconds": cpu,
        "listener_cpu_us_per_registration": cpu.filter(|_| ok > 0).map(|c| c * 1e6 / ok as f64),
        "listener_cpu_us_per_registration_by_thread": match (&threads_before, &threads_after) {
            (Some(b), Some(a)) => thread_cpu_us_per_op(b, a, ok),
            _ => serde_json::Value::Null,
        },
        "machine_cpu": MachineCpu::report(&machine_before, &machine_after, ok),
        "idle_connections": args.idle_connections,
        "listener_rss_kib": { "before": rss_before, "after": rss_after },
    }))
}

/// The progress bar both load tools show on stderr, and the task that moves it.
pub(crate) fn progress(
    count: usize,
    done: &Arc<AtomicU64>,
) -> (ProgressBar, tokio::task::JoinHandle<()>) {
    let bar = ProgressBar::with_draw_target(Some(count as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let (ticking, done) = (bar.clone(), Arc::clone(done));
    let ticker = tokio::spawn(async move {
        loop {
            ticking.set_position(done.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (bar, ticker)
}

/// Latency in microseconds, 1 µs to 60 s at 3 significant digits.
pub(crate) fn latency_histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// p50/p90/p99/max of a latency histogram, in milliseconds.
pub(crate) fn latency_json(h: &Histogram<u64>) -> serde_json::Value {
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "max": h.max() as f64 / 1000.0,
    })
}

/// The human-readable summary of a `run` result.
pub fn summary(r: &serde_json::Value) -> String {
    let outcomes: Vec<String> = r["outcomes"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}: {v}")).collect())
        .unwrap_or_default();
    let mut text = String::new();
    for warning in r["warnings"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "WARNING: {}\n",
            warning.as_str().unwrap_or_default()
        ));
    }
    text.push_str(&format!(
        "{} registrations in {:.2} s over {} {} connections: {:.1} registrations/s\n\
         latency of the registrations, ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}\n\
         outcomes by status: {}",
        r["registrations"],
        r["seconds"].as_f64().unwrap_or(0.0),
        r["connections"],
        r["transport"].as_str().unwrap_or(""),
        r["registrations_per_second"].as_f64().unwrap_or(0.0),
        r["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        r["latency_ms"]["p90"].as_f64().unwrap_or(0.0),
        r["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
        r["latency_ms"]["max"].as_f64().unwrap_or(0.0),
        outcomes.join(", "),
    ));
    if let (Some(cpu), Some(per)) = (
        r["listener_cpu_seconds"].as_f64(),
        r["listener_cpu_us_per_registration"].as_f64(),
    ) {
        text.push_str(&format!(
            "\nlistener CPU: {cpu:.2} s user+sys, {per:.1} µs per registration"
        ));
    }
    text.push_str(&threads_summary(
        &r["listener_cpu_us_per_registration_by_thread"],
    ));
    text.push_str(&machine_summary(
        &r["machine_cpu"],
        r["listener_cpu_us_per_registration"].as_f64(),
        "registration",
    ));
    text
}

/// "crypto 231.0, io 30.5, …" from a by-thread CPU object, or "".
pub(crate) fn threads_summary(by_thread: &serde_json::Value) -> String {
    let Some(kinds) = by_thread.as_object() else {
        return String::new();
    };
    let parts: Vec<String> = kinds
        .iter()
        .map(|(kind, us)| format!("{kind} {}", us.as_f64().unwrap_or(0.0)))
        .collect();
    format!("\nof which, µs by thread: {}", parts.join(", "))
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow!("{host}: no address"))
}

async fn fetch_public_key(host: &str, port: u16) -> Result<RsaPublicKey> {
    let mut stream = TcpStream::connect(resolve(host, port)?).await?;
    stream
        .write_all(&registrar::wire::ijam::CERT_REQUEST)
        .await?;
    let mut reply = vec![0u8; registrar::wire::ijam::CERT_REPLY_MIN_LEN];
    stream.read_exact(&mut reply).await?;
    Ok(RsaPublicKey::from_pem(&reply)?)
}

/// Removes the network `mint` made, with the nodes the run registered.
async fn delete_network(args: &LoadIjamArgs, network: &str) -> Result<()> {
    let data = DataDir::existing(&args.data_dir)?;
    registrar::with_store!(
        &args.store,
        &data.sqlite_path(),
        Creation::Never,
        delete_network_on,
        network
    )
}

async fn delete_network_on<S: IjamStore>(store: S, network: &str) -> Result<()> {
    store
        .delete_network(network)
        .await
        .with_context(|| format!("deleting the load network {network}"))?;
    Ok(())
}

/// A fresh network and `count` passphrases, minted through the store.
async fn mint(args: &LoadIjamArgs, count: usize) -> Result<(String, Vec<String>)> {
    let data = DataDir::existing(&args.data_dir)?;
    registrar::with_store!(
        &args.store,
        &data.sqlite_path(),
        Creation::Never,
        mint_on,
        &data,
        count
    )
}

async fn mint_on<S: Stores>(
    store: S,
    data: &DataDir,
    count: usize,
) -> Result<(String, Vec<String>)> {
    let storage = data.storage_key()?;
    let suffix: [u8; 4] = random::bytes()?;
    let network = format!("load-{}", hex::encode(suffix));
    let now = clock::now_ms();
    store
        .create_network(
            &network,
            "load",
            "load test",
            Reregistration::default(),
            now,
        )
        .await?;
    eprintln!("minting {count} passphrases in {} …", store.describe());
    let mut all = Vec::with_capacity(count);
    for chunk_start in (0..count).step_by(5000) {
        let n = 5000.min(count - chunk_start);
        let mut batch = Vec::with_capacity(n);
        for i in chunk_start..chunk_start + n {
            let p = passphrase::generate()?;
            batch.push(NewPassphrase {
                passphrase: storage.store_passphrase(store.at_rest(), &network, &p),
                node_name: format!("load-{}", i + 1),
                expires_ms: None,
                for_node: None,
            });
            all.push(p);
        }
        store.add_passphrases(&network, batch, now).await?;
    }
    Ok((network, all))
}

/// RSA-encrypts every request, on all cores, before the timed window.
fn encrypt_all(key: &RsaPublicKey, network: &str, passphrases: &[String]) -> Result<Vec<Prepared>> {
    let network = NetworkId::new(network).map_err(|e| anyhow!("network {network:?}: {e}"))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = passphrases.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = passphrases
            .chunks(chunk.max(1))
            .map(|part| {
                let network = network.clone();
                scope.spawn(move || -> Result<Vec<Prepared>> {
                    part.iter()
                        .map(|p| {
                            let node_key = NodeKey(random::bytes()?);
                            let request = RegisterRequest {
                                node_id: None,
                                network_id: network.clone(),
                                passphrase: Passphrase::new(p)
                                    .map_err(|e| anyhow!("passphrase: {e}"))?,
                                node_key: node_key.clone(),
                                node_type: NodeType::Device,
                                node_arch: NodeArch::X86Ubuntu,
                            };
                            Ok(Prepared {
                                ciphertext: key.encrypt(&request.to_bytes())?,
                                key: node_key,
                            })
                        })
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(passphrases.len());
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow!("encryption thread panicked"))??,
            );
        }
        Ok(all)
    })
}

/// Resident memory of a process in KiB, from /proc/PID/status.
fn process_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("--listener-pid {pid}: no such process"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for process {pid}"))
}

/// The whole machine's CPU time and the load tool's own, at one instant. Between two
/// of them: how busy the cores were, and where a completed operation's CPU went
/// beside the listener's (the load tool, and the rest: Redis, the kernel's threads).
/// On shared cores that is what bounds the throughput: cores ÷ machine µs per operation.
pub(crate) struct MachineCpu {
    busy_s: f64,
    steal_s: f64,
    total_s: f64,
    own_s: f64,
}

impl MachineCpu {
    /// `None` where /proc is not there (not Linux): the report then says `null` rather
    /// than failing a run over an extra figure.
    pub(crate) fn now() -> Option<Self> {
        Self::read().ok()
    }

    /// What [`until`](Self::until) says, or `null` when either instant is unknown.
    pub(crate) fn report(
        before: &Option<Self>,
        after: &Option<Self>,
        ops: u64,
    ) -> serde_json::Value {
        match (before, after) {
            (Some(before), Some(after)) => before.until(after, ops),
            _ => serde_json::Value::Null,
        }
    }

    fn read() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("/proc/stat")?;
        let (busy_s, steal_s, total_s) = proc_stat_cpu_seconds(&stat)?;
        let own = std::fs::read_to_string("/proc/self/stat").context("/proc/self/stat")?;
        Ok(MachineCpu {
            busy_s,
            steal_s,
            total_s,
            own_s: stat_cpu_seconds(&own)?,
        })
    }

    /// `busy_share` and `steal_share` (of all cores' time: the hypervisor's steal is
    /// busy time the machine did not get), and per completed operation the CPU µs of
    /// the whole machine and of the load tool; `null` figures when nothing completed.
    fn until(&self, now: &MachineCpu, ops: u64) -> serde_json::Value {
        let total = now.total_s - self.total_s;
        // Clamped: the ticks are sums of floats, and a share past 1 only by rounding
        // would read as more than all cores.
        let share = |secs: f64| {
            if total > 0.0 {
                (secs / total).clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        let per_op = |secs: f64| (ops > 0).then(|| (secs * 1e7 / ops as f64).round() / 10.0);
        json!({
            "busy_share": share(now.busy_s - self.busy_s),
            "steal_share": share(now.steal_s - self.steal_s),
            "us_per_op": per_op(now.busy_s - self.busy_s),
            "load_tool_us_per_op": per_op(now.own_s - self.own_s),
        })
    }
}

/// Busy, stolen and total CPU seconds over all cores, from the `cpu` line of /proc/stat
/// (user nice system idle iowait irq softirq steal …; guest time is already in user).
fn proc_stat_cpu_seconds(stat: &str) -> Result<(f64, f64, f64)> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("odd /proc/stat")?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks[..] else {
        bail!("odd /proc/stat: {line}");
    };
    let busy = user + nice + system + irq + softirq + steal;
    // USER_HZ is 100 on every Linux this runs on.
    Ok((busy / 100.0, steal / 100.0, (busy + idle + iowait) / 100.0))
}

/// "machine CPU: …" from a `MachineCpu::until` object, or "".
pub(crate) fn machine_summary(
    machine: &serde_json::Value,
    listener_per_op: Option<f64>,
    unit: &str,
) -> String {
    let (Some(share), Some(per)) = (
        machine["busy_share"].as_f64(),
        machine["us_per_op"].as_f64(),
    ) else {
        return String::new();
    };
    let tool = machine["load_tool_us_per_op"].as_f64().unwrap_or(0.0);
    let steal = machine["steal_share"].as_f64().unwrap_or(0.0);
    let mut text = format!(
        "\nmachine CPU: {:.0}% of all cores busy ({:.1}% stolen by the hypervisor), {per:.1} µs per {unit}: load tool {tool:.1}",
        share * 100.0,
        steal * 100.0
    );
    if let Some(listener) = listener_per_op {
        text.push_str(&format!(
            ", listener {listener:.1}, rest {:.1}",
            per - tool - listener
        ));
    }
    text
}

/// CPU seconds (user + sys) a process has used, from /proc/PID/stat.
pub(crate) fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("--listener-pid {pid}: no such process"))?;
    stat_cpu_seconds(&stat)
}

/// CPU seconds (user + sys) in the text of a /proc stat file.
fn stat_cpu_seconds(stat: &str) -> Result<f64> {
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("odd /proc stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow!("odd /proc stat"))?
            .parse()?)
    };
    // USER_HZ is 100 on every Linux this runs on.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// CPU seconds used so far by each kind of thread of a process (threads named
/// `crypto-0`, `crypto-1`… count as `crypto`), from /proc/PID/task: where a
/// listener's time goes beside the private-key work, whatever the machine's speed.
pub(crate) fn thread_cpu_seconds(pid: u32) -> Result<BTreeMap<String, f64>> {
    let mut by_kind = BTreeMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("--listener-pid {pid}: no such process"))?;
    for task in tasks {
        let dir = task?.path();
        // A thread may end between listing and reading: it is simply not counted.
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue;
        };
        let comm = comm.trim_end();
        let kind = comm
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .trim_end_matches('-');
        *by_kind.entry(kind.to_string()).or_default() += stat_cpu_seconds(&stat)?;
    }
    Ok(by_kind)
}

/// CPU µs per completed operation by thread kind, between two `thread_cpu_seconds`.
pub(crate) fn thread_cpu_us_per_op(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    ops: u64,
) -> serde_json::Value {
    if ops == 0 {
        return serde_json::Value::Null;
    }
    after
        .iter()
        .map(|(kind, secs)| {
            let used = secs - before.get(kind).copied().unwrap_or(0.0);
            (
                kind.clone(),
                json!((used * 1e7 / ops as f64).round() / 10.0),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

struct Worker {
    addr: SocketAddr,
    udp: bool,
    timeout: Duration,
    rate: Option<f64>,
    started: Instant,
    deadline: Option<Instant>,
    next: Arc<AtomicUsize>,
    done: Arc<AtomicU64>,
    prepared: Arc<Vec<Prepared>>,
}

enum Conn {
    Tcp(Option<TcpStream>),
    Udp(UdpSocket),
}

impl Worker {
    /// Latency of the admitted (200) requests from when each was due and from when it
    /// was sent, and the outcome counts.
    async fn run(self) -> Result<(Histogram<u64>, Histogram<u64>, Tally)> {
        let mut from_due = latency_histogram()?;
        let mut from_sent = latency_histogram()?;
        let mut tally = Tally::default();
        let mut conn = if self.udp {
            let bind: SocketAddr = if self.addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()?;
            let socket = UdpSocket::bind(bind).await?;
            socket.connect(self.addr).await?;
            Conn::Udp(socket)
        } else {
            Conn::Tcp(None)
        };
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(request) = self.prepared.get(i) else {
                break;
            };
            let due = match self.rate {
                Some(rate) => {
                    let due = self.started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    due
                }
                None => Instant::now(),
            };
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let sent = Instant::now();
            let outcome = self.exchange(&mut conn, request).await;
            // Only registrations count: a refusal (429, 503) is answered at once and
            // would make the listener look faster than it is.
            if outcome == Outcome::Status(200) {
                from_due.saturating_record(due.elapsed().as_micros().max(1) as u64);
                // The server's view: from the moment the request left, whatever the
                // client's own backlog (which `from_due` includes).
                from_sent.saturating_record(sent.elapsed().as_micros().max(1) as u64);
            }
            *tally.outcomes.entry(outcome).or_default() += 1;
            self.done.fetch_add(1, Ordering::Relaxed);
        }
        Ok((from_due, from_sent, tally))
    }

    async fn exchange(&self, conn: &mut Conn, request: &Prepared) -> Outcome {
        let reply = match conn {
            Conn::Udp(socket) => {
                if socket.send(&request.ciphertext).await.is_err() {
                    return Outcome::IoError;
                }
                let mut buf = [0u8; 128];
                match tokio::time::timeout(self.timeout, socket.recv(&mut buf)).await {
                    Ok(Ok(n)) => buf[..n].to_vec(),
                    Ok(Err(_)) => return Outcome::IoError,
                    Err(_) => return Outcome::NoReply,
                }
            }
            Conn::Tcp(stream) => {
                if stream.is_none() {
                    match TcpStream::connect(self.addr).await {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            *stream = Some(s);
                        }
                        Err(_) => return Outcome::IoError,
                    }
                }
                let s = stream.as_mut().expect("connected above");
                match tokio::time::timeout(self.timeout, tcp_exchange(s, &request.ciphertext)).await
                {
                    Ok(Ok(reply)) => reply,
                    Ok(Err(_)) => {
                        *stream = None;
                        return Outcome::IoError;
                    }
                    Err(_) => {
                        *stream = None;
                        return Outcome::NoReply;
                    }
                }
            }
        };
        match registrar::wire::ijam::parse_reply_status(&reply) {
            Ok((status, _)) if status.0 == 200 => {
                match registrar::client::open_register_reply(&reply, &request.key) {
                    Ok(_) => Outcome::Status(200),
                    Err(_) => Outcome::BadReply,
                }
            }
            Ok((status, _)) => Outcome::Status(status.0),
            Err(_) => Outcome::BadReply,
        }
    }
}

/// One request and its reply on a persistent connection. Error replies carry no
/// length, so their length comes from the fixed reason texts (schemas/ijam.md).
async fn tcp_exchange(stream: &mut TcpStream, ciphertext: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(ciphertext).await?;
    let mut reply = vec![0u8; 2];
    stream.read_exact(&mut reply).await?;
    let status = u16::from_le_bytes([reply[0], reply[1]]);
    let body = match status {
        200 => 48,
        400 => REASON_REQUEST.len(),
        401 => REASON_INVALID_PASSPHRASE.len(),
        429 => REASON_RATE_LIMITED.len(),
        503 => {
            let mut head = vec![0u8; REASON_BUSY.len()];
            stream.read_exact(&mut head).await?;
            reply.extend_from_slice(&head);
            if head != REASON_BUSY.as_bytes() {
                let mut tail = vec![0u8; REASON_UNAVAILABLE.len() - REASON_BUSY.len()];
                stream.read_exact(&mut tail).await?;
                reply.extend_from_slice(&tail);
            }
            return Ok(reply);
        }
        _ => 0,
    };
    let start = reply.len();
    reply.resize(start + body, 0);
    stream.read_exact(&mut reply[start..]).await?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_counts_steal_and_interrupts_as_busy_and_iowait_as_idle() {
        // user nice system idle iowait irq softirq steal guest guest_nice, in ticks.
        let stat = "cpu  700 100 200 900 50 10 30 10 40 0\ncpu0 350 50 100 450 25 5 15 5 20 0\n";
        let (busy, steal, total) = proc_stat_cpu_seconds(stat).unwrap();
        assert!((steal - 0.1).abs() < 1e-9, "{steal}");
        assert!((busy - 10.5).abs() < 1e-9, "{busy}");
        assert!((total - 20.0).abs() < 1e-9, "{total}");
    }

    #[test]
    fn odd_proc_stat_is_an_error() {
        for stat in [
            "",
            "cpu0 1 2 3 4 5 6 7 8\n",
            "cpu  1 2 3\n",
            "cpu  1 2 x 4 5 6 7 8\n",
        ] {
            assert!(proc_stat_cpu_seconds(stat).is_err(), "{stat:?}");
        }
    }
}
