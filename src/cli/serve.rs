//! `registrar serve` and `registrar init`: bind every socket, make what is missing of
//! the data dir and the store, then run the listener on the store `--store` names.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use clap::builder::TypedValueParser;
use registrar::core::clock::now_ms;
use registrar::core::crypto::ecdsa::SigningKey;
use registrar::core::crypto::seal::SealKey;
use registrar::core::crypto::{KeyRing, StorageKey};
use registrar::core::datadir::{DataDir, KeyOrigin};
use registrar::core::random;
use registrar::flow::ijam::IjamFlow;
use registrar::server::envelope::{EnvelopeFlows, EnvelopeServer, EnvelopeSockets};
use registrar::server::pool::CryptoPool;
use registrar::server::{ConnectionLimit, IjamServer, IjamSockets, ServerConfig};
use registrar::store::ijam::{AtRest, IjamStore};
use registrar::store::{Creation, Stores};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{Common, on_store};

#[derive(Args, Debug)]
pub struct InitArgs {
    /// RSA modulus size of the ijam key, if one is made.
    #[arg(long, env = "REGISTRAR_RSA_BITS", default_value_t = 2048,
          value_parser = clap::builder::PossibleValuesParser::new(["2048", "3072", "4096"])
              .map(|s| s.parse::<usize>().expect("listed values are numbers")))]
    rsa_bits: usize,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (all five sockets).
    #[arg(long, env = "REGISTRAR_BIND", default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Certificate port (TCP): 4-byte magic in, PEM public key out.
    #[arg(long, env = "REGISTRAR_CERT_PORT", default_value_t = 8444)]
    cert_port: u16,
    /// Registration port (TCP and UDP). 0 picks a free port.
    #[arg(long, env = "REGISTRAR_REG_PORT", default_value_t = 8445)]
    reg_port: u16,
    /// State port (TCP and UDP). 0 picks a free port.
    #[arg(long, env = "REGISTRAR_STATE_PORT", default_value_t = 8446)]
    state_port: u16,
    /// Envelope port (TCP and UDP) of the pubkey flow and core Hello. 0 picks a free port.
    #[arg(long, env = "REGISTRAR_ENVELOPE_PORT", default_value_t = 8447)]
    envelope_port: u16,
    /// Largest envelope payload accepted, in bytes (the declared length in the frame
    /// header); a frame declaring more gets 400 and its TCP connection is closed.
    #[arg(long, env = "REGISTRAR_MAX_FRAME", default_value_t = registrar::wire::envelope::DEFAULT_MAX_PAYLOAD,
          value_parser = clap::value_parser!(u32).range(256..=1_048_576))]
    max_frame: u32,
    /// RSA modulus size, used only when the key is first generated.
    #[arg(long, env = "REGISTRAR_RSA_BITS", default_value_t = 2048,
          value_parser = clap::builder::PossibleValuesParser::new(["2048", "3072", "4096"])
              .map(|s| s.parse::<usize>().expect("listed values are numbers")))]
    rsa_bits: usize,
    /// Close a TCP connection this long after it opened or after its last request
    /// that did work (a registration, a state change, a signed envelope request):
    /// silence, a dribbled frame, Hellos or certificate fetches do not keep it open.
    #[arg(long, env = "REGISTRAR_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Open TCP connections at most, all ports together. At the cap a new connection
    /// takes the place of the one idle the longest; if every one is busy with a
    /// request, the new one is closed on accept.
    #[arg(long, env = "REGISTRAR_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Open TCP connections at most from one source address; more from it are closed
    /// on accept. The default fits a NAT gateway of a few hundred devices registering
    /// at once.
    #[arg(long, env = "REGISTRAR_MAX_CONNECTIONS_PER_SOURCE",
          default_value_t = registrar::server::DEFAULT_CONNECTIONS_PER_SOURCE)]
    max_connections_per_source: usize,
    /// Request bytes all TCP connections together may buffer (e.g. 64MiB, 512KiB).
    /// When it is spent, connections stop reading; when it stays spent for 100 ms, the
    /// connection holding the most is closed.
    #[arg(long, env = "REGISTRAR_MAX_BUFFERED", default_value = "64MiB", value_parser = parse_size)]
    max_buffered: usize,
    /// Threads for the private-key and signature work (default: one per core).
    #[arg(long, env = "REGISTRAR_CRYPTO_THREADS")]
    crypto_threads: Option<usize>,
    /// Threads for the network I/O, the store client and the logs (default: one per
    /// four cores, at least one). The crypto threads take the cores' real work; raise
    /// this on many cores with busy pipelined clients (docs/performance.md).
    #[arg(long, env = "REGISTRAR_IO_THREADS")]
    io_threads: Option<usize>,
    /// Requests waiting for a crypto thread at most; more are shed with 503 (TCP) or
    /// dropped (UDP).
    #[arg(long, env = "REGISTRAR_CRYPTO_QUEUE", default_value_t = 256)]
    crypto_queue: usize,
    /// Sojourn-time target of the crypto queue: when every request has waited longer
    /// than this for 100 ms, late requests are shed (503 on TCP, dropped on UDP) until
    /// one is on time again, so admitted requests keep their latency under sustained
    /// overload while a short burst is served in full. 0 disables.
    #[arg(long, env = "REGISTRAR_MAX_QUEUE_WAIT", default_value = "20ms", value_parser = humantime::parse_duration)]
    max_queue_wait: Duration,
    /// Nice value of the crypto threads (0–19, Linux, per thread). Higher values let the
    /// I/O thread (and a Redis and clients in the listener's session or cgroup) preempt
    /// the RSA work: lower latency under overload, at some cost in maximum throughput
    /// (docs/performance.md has the figures). Keep 0 where other CPU-bound work shares
    /// the listener's group.
    #[arg(long, env = "REGISTRAR_CRYPTO_NICE", default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    crypto_nice: i32,
    /// Requests per second allowed per source IP address, sustained (0: no limit), for
    /// each kind of work apart (registrations, state changes, signed envelope
    /// requests) and for TCP and UDP apart. Over it a request gets 429 before any
    /// crypto; only a request past the cheap checks (length, framing) spends a token.
    #[arg(long, env = "REGISTRAR_RATE_PER_SOURCE", default_value_t = 100.0)]
    rate_per_source: f64,
    /// Requests a source may send at once before --rate-per-source applies.
    #[arg(long, env = "REGISTRAR_BURST", default_value_t = 1000)]
    burst: u32,
    /// State changes per second one node may make (0: no limit); beyond it 429. A
    /// state frame carries no freshness, so a captured one can be replayed: this
    /// bounds how fast that flips a node.
    #[arg(long, env = "REGISTRAR_STATE_RATE_PER_NODE",
          default_value_t = registrar::server::DEFAULT_STATE_RATE_PER_NODE)]
    state_rate_per_node: f64,
    /// State changes one node may make at once before --state-rate-per-node applies.
    #[arg(long, env = "REGISTRAR_STATE_BURST_PER_NODE",
          default_value_t = registrar::server::DEFAULT_STATE_BURST_PER_NODE)]
    state_burst_per_node: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9844; off when
    /// not given).
    #[arg(long, env = "REGISTRAR_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// How long a byte-identical retry of a registration gets the same node id back.
    #[arg(long, env = "REGISTRAR_REPLAY_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    replay_ttl: Duration,
    /// How long in-flight requests may take to finish after SIGTERM or Ctrl-C.
    #[arg(long, env = "REGISTRAR_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
}

impl ServeArgs {
    /// `--io-threads`, or one per four cores; at least one.
    pub fn io_threads(&self) -> usize {
        self.io_threads
            .unwrap_or_else(|| cores().div_ceil(4))
            .max(1)
    }
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What `init` and `serve` found or made in the data dir.
struct Prepared {
    data: DataDir,
    keys: KeyRing,
    storage: StorageKey,
    signing: SigningKey,
    seal: SealKey,
    /// What this start made, for the first-start guide (empty: all was there).
    made: Vec<String>,
}

/// Makes whatever is missing of the data dir (0700) and its keys (0600).
fn prepare(common: &Common, rsa_bits: usize) -> Result<Prepared> {
    let data = DataDir::create(&common.data_dir)?;
    let mut made = Vec::new();
    let (keys, origin) = data.rsa_keyring(rsa_bits, now_ms())?;
    if origin == KeyOrigin::Generated {
        info!(path = %data.rsa_key_path().display(), bits = keys.current().bits(), "generated a new RSA key pair");
        made.push(format!(
            "RSA-{} key {}",
            keys.current().bits(),
            data.rsa_key_path().display()
        ));
    }
    let (storage, origin) = data.ensure_storage_key()?;
    if origin == KeyOrigin::Generated {
        made.push(format!("storage key {}", data.storage_key_path().display()));
    }
    let (signing, origin) = data.signing_key()?;
    if origin == KeyOrigin::Generated {
        info!(path = %data.signing_key_path().display(), "generated a new ECDSA P-256 signing key");
        made.push(format!("signing key {}", data.signing_key_path().display()));
    }
    let (seal, origin) = data.seal_key()?;
    if origin == KeyOrigin::Generated {
        info!(path = %data.seal_key_path().display(), "generated a new X25519 key for sealed payloads");
        made.push(format!("sealing key {}", data.seal_key_path().display()));
    }
    if common.store == "sqlite" && !data.sqlite_path().exists() {
        made.push(format!("SQLite store {}", data.sqlite_path().display()));
    }
    Ok(Prepared {
        data,
        keys,
        storage,
        signing,
        seal,
        made,
    })
}

/// The admin command prefix for this data dir and every non-default store option, so
/// a hint pasted as printed reaches the same store.
fn admin_prefix(common: &Common, data: &DataDir) -> String {
    let mut prefix = format!("registrar --data-dir {}", data.path().display());
    if common.store != "sqlite" {
        prefix.push_str(&format!(
            " --store {}",
            registrar::store::redis::redact_url(&common.store)
        ));
    }
    prefix
}

/// What to do next, after a start that made the data dir's contents.
fn first_start_guide(common: &Common, prepared: &Prepared) -> String {
    let prefix = admin_prefix(common, &prepared.data);
    let mut guide = String::from("first start: made ");
    guide.push_str(&prepared.made.join(", "));
    guide.push_str(&format!(
        "\nadd a network:    {prefix} network create NETWORK --owner USER\n\
         add a passphrase: {prefix} passphrase add NETWORK --node-name NAME"
    ));
    if common.store.contains('@') {
        guide.push_str("\n(the store URL's password is shown as ***: give it as REGISTRAR_STORE)");
    }
    guide
}

pub async fn init(common: &Common, args: InitArgs) -> Result<()> {
    let prepared = prepare(common, args.rsa_bits)?;
    let store = on_store!(common, prepared.data, Creation::IfMissing, describe_store,)
        .context("cannot open the store")?;
    if common.json {
        println!(
            "{}",
            serde_json::json!({
                "data_dir": prepared.data.path(),
                "store": store,
                "made": prepared.made,
                "rsa_bits": prepared.keys.current().bits(),
            })
        );
    } else if prepared.made.is_empty() {
        println!(
            "{} and its store {store} were already complete; nothing made",
            prepared.data.path().display(),
        );
    } else {
        println!("{}", first_start_guide(common, &prepared));
    }
    Ok(())
}

async fn describe_store<S: Stores>(store: S) -> Result<String> {
    Ok(store.describe())
}

pub async fn serve(common: &Common, args: ServeArgs) -> Result<()> {
    // Every socket first: a port in use is an error naming it, before any file is made.
    let sockets = Sockets {
        ijam: IjamSockets::bind(args.bind, args.cert_port, args.reg_port, args.state_port).await?,
        envelope: EnvelopeSockets::bind(args.bind, args.envelope_port).await?,
        metrics: match args.metrics_addr {
            Some(addr) => {
                Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                    format!("cannot listen on {addr} (metrics, --metrics-addr)")
                })?)
            }
            None => None,
        },
    };
    let prepared = prepare(common, args.rsa_bits)?;
    let data = prepared.data.clone();
    on_store!(
        common,
        data,
        Creation::IfMissing,
        listen,
        common,
        args,
        sockets,
        prepared
    )
}

/// Every socket of the listener, bound before anything else happens.
struct Sockets {
    ijam: IjamSockets,
    envelope: EnvelopeSockets,
    metrics: Option<tokio::net::TcpListener>,
}

/// Runs the listener on `store` until SIGTERM or Ctrl-C.
async fn listen<S: Stores>(
    store: S,
    common: &Common,
    args: ServeArgs,
    sockets: Sockets,
    prepared: Prepared,
) -> Result<()> {
    let guide = (!prepared.made.is_empty()).then(|| first_start_guide(common, &prepared));
    let Prepared {
        data,
        keys,
        storage,
        signing,
        seal,
        ..
    } = prepared;
    let Sockets {
        ijam: ijam_sockets,
        envelope: envelope_sockets,
        metrics: metrics_listener,
    } = sockets;
    let mut ports = format!(
        "{} {}",
        ijam_sockets.describe()?,
        envelope_sockets.describe()?
    );
    let store = Arc::new(store);
    let store_url = store.describe();
    let flow = Arc::new(IjamFlow::new(
        keys,
        storage,
        Arc::clone(&store),
        args.replay_ttl.as_millis() as i64,
    ));
    // Before anything is served: from here on a key of the first format is never opened.
    let resealed = flow
        .reseal_legacy_node_keys(random::bytes)
        .await
        .context("cannot re-seal the node keys of the first format")?;
    info!(
        resealed = resealed.resealed,
        changed_meanwhile = resealed.changed,
        unopenable = resealed.unopenable,
        "node keys of the first format sealed again, bound to their node id"
    );
    if resealed.unopenable > 0 {
        warn!(
            unopenable = resealed.unopenable,
            "node keys of the first format that do not open under this data dir's storage key \
             were left as they are: those nodes' state requests are refused until they register again"
        );
    }
    let threads = args.crypto_threads.unwrap_or_else(cores);
    let pool = CryptoPool::new(
        threads,
        args.crypto_queue,
        Some(args.max_queue_wait).filter(|w| !w.is_zero()),
        args.crypto_nice,
    )
    .context("cannot start the crypto pool")?;
    let config = ServerConfig {
        idle_timeout: args.idle_timeout,
        connections: ConnectionLimit::new(
            args.max_connections,
            args.max_connections_per_source,
            args.max_buffered,
        ),
        rate_per_source: args.rate_per_source,
        burst: args.burst,
        state_rate_per_node: args.state_rate_per_node,
        state_burst_per_node: args.state_burst_per_node,
        ..ServerConfig::default()
    };
    let cancel = CancellationToken::new();
    if let Some(listener) = metrics_listener {
        let handle = registrar::server::metrics::install().map_err(anyhow::Error::msg)?;
        ports = format!(
            "{ports} {}",
            registrar::server::metrics::describe(listener.local_addr()?)
        );
        let udp_ports = vec![
            ("reg", ijam_sockets.reg_udp.local_addr()?.port()),
            ("state", ijam_sockets.state_udp.local_addr()?.port()),
            ("envelope", envelope_sockets.udp.local_addr()?.port()),
        ];
        tokio::spawn(registrar::server::metrics::serve(
            listener,
            handle,
            cancel.clone(),
            udp_ports,
        ));
    }
    let flows = EnvelopeFlows::new(store, data.storage_key()?, &signing, &seal, args.max_frame)
        .context("cannot sign the Keys reply")?;
    let envelope = EnvelopeServer::new(
        flows,
        Arc::new(seal),
        pool.clone(),
        config.clone(),
        args.max_frame,
        cancel.clone(),
    );
    let server = IjamServer::new(Arc::clone(&flow), pool, config, cancel.clone());
    let tracker = TaskTracker::new();
    server.spawn(ijam_sockets, cancel.clone(), &tracker);
    envelope.spawn(envelope_sockets, &tracker);
    tokio::spawn(watch_rsa_keys(
        data.clone(),
        Arc::clone(&flow),
        args.rsa_bits,
        cancel.clone(),
    ));
    tracker.spawn(registrar::server::metrics::report(cancel.clone()));
    tracker.close();

    if flow.store().at_rest() == AtRest::Clear {
        warn!(store = %store_url, "this store keeps passphrases and node keys in clear, as the JAMScript-OTA portal does; `registrar migrate` copies it into a native store that does not");
    }
    info!(store = %store_url, rsa_bits = flow.keys().current().bits(), crypto_threads = threads, crypto_nice = args.crypto_nice, io_threads = args.io_threads(), "registrar started");
    // Stable line: tests and scripts read the bound ports from it.
    println!("registrar listening {ports} store={store_url}");
    if let Some(guide) = guide {
        println!("{guide}");
    }

    wait_for_shutdown_signal().await;
    info!(grace = ?args.shutdown_grace, "shutting down: no new connections");
    cancel.cancel();
    if tokio::time::timeout(args.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!("shutdown grace period over; exiting with requests in flight");
    }
    info!("stopped");
    Ok(())
}

/// Reloads the RSA keys when their files change (`registrar key rotate`, possibly run
/// on another host sharing the data dir), and drops the previous key when its grace
/// period ends. Checks once a second: a stat of three files.
async fn watch_rsa_keys<S: IjamStore>(
    data: DataDir,
    flow: Arc<IjamFlow<S>>,
    bits: usize,
    cancel: CancellationToken,
) {
    let mut stamp = data.rsa_key_stamp();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let current = data.rsa_key_stamp();
        let expired = flow
            .keys()
            .previous_until()
            .is_some_and(|until| until <= now);
        if current == stamp && !expired {
            continue;
        }
        match data.rsa_keyring(bits, now) {
            Ok((keys, _)) => {
                let until = keys.previous_until();
                let bits = keys.current().bits();
                flow.set_keys(keys);
                stamp = current;
                match until {
                    Some(until) => info!(
                        bits,
                        previous_until_ms = until,
                        "RSA key rotated: the previous key decrypts until its grace period ends"
                    ),
                    None => info!(bits, "RSA keys reloaded: only the current key decrypts"),
                }
            }
            // Mid-rotation, or a damaged file: keep serving the keys in force.
            Err(e) => warn!(error = %e, "cannot reload the RSA keys; keeping the ones in force"),
        }
    }
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A size in bytes: a number, optionally followed by KiB, MiB or GiB.
fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let (digits, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |at| text.split_at(at));
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?}: use B, KiB, MiB or GiB")),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{text:?} is not a size such as 64MiB"))
}
