//! `registrar`: the listener (`serve`) and its administration commands, one binary
//! sharing `--data-dir` and `--store`, so admin commands work while a listener runs.

mod admin;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};
use registrar::crypto::KeyRing;
use registrar::datadir::{DataDir, KeyOrigin};
use registrar::flow::ijam::IjamFlow;
use registrar::server::envelope::{EnvelopeServer, EnvelopeSockets};
use registrar::server::pool::CryptoPool;
use registrar::server::{ConnectionLimit, IjamServer, IjamSockets, ServerConfig, now_ms};
use registrar::store::{AnyStore, Creation, Store};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Registrar: a device-registration listener, wire-compatible with the JAMScript-OTA
/// `ijam` protocol, with envelope flows (pubkey) on a port of its own.
///
/// Start with `registrar init` (or just `registrar serve`, which makes the data dir on
/// its first start); add a network and passphrases with `registrar network create` and
/// `registrar passphrase add` (they work while the listener runs, against the same
/// --data-dir and --store).
#[derive(Parser, Debug)]
#[command(
    version,
    propagate_version = true,
    after_help = "Environment:\n  \
        REGISTRAR_LOG   log level: error, warn, info (default), debug or trace, or tracing\n                  \
        directives such as `registrar=debug,redis=warn`; a value that is neither is an error\n  \
        REGISTRAR_*     every option also reads its variable, shown in each command's --help"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Directory holding the RSA key, the storage key and the embedded SQLite store.
    #[arg(
        long,
        global = true,
        env = "REGISTRAR_DATA_DIR",
        default_value = "./registrar-data"
    )]
    pub data_dir: PathBuf,
    /// `sqlite` (the embedded store in --data-dir) or `redis://host:port/db`.
    #[arg(long, global = true, env = "REGISTRAR_STORE", default_value = "sqlite")]
    pub store: String,
    /// Print machine-readable JSON instead of tables (admin commands).
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the listener: certificate, registration and state ports (TCP, and UDP for
    /// registration and state) and the envelope port. On its first start it makes the
    /// data dir, its keys and the embedded store, as `init` does.
    Serve(ServeArgs),
    /// Make the data dir (mode 0700), its keys (0600) and, with --store sqlite, the
    /// embedded store; what already exists is kept. The admin commands never make a
    /// store: run them where `init` or `serve` made one.
    Init(InitArgs),
    /// Create, list and inspect networks.
    #[command(subcommand)]
    Network(admin::NetworkCommand),
    /// Mint, list and revoke one-time network passphrases.
    #[command(subcommand)]
    Passphrase(admin::PassphraseCommand),
    /// Rotate and inspect the listener's RSA key.
    #[command(subcommand)]
    Key(admin::KeyCommand),
    /// List, inspect and revoke registered nodes.
    #[command(subcommand)]
    Node(admin::NodeCommand),
    /// List, inspect and revoke the devices of the pubkey flow (envelope port).
    #[command(subcommand)]
    Device(admin::DeviceCommand),
}

#[derive(Args, Debug)]
struct InitArgs {
    /// RSA modulus size of the ijam key, if one is made.
    #[arg(long, env = "REGISTRAR_RSA_BITS", default_value_t = 2048,
          value_parser = clap::builder::PossibleValuesParser::new(["2048", "3072", "4096"])
              .map(|s| s.parse::<usize>().expect("listed values are numbers")))]
    rsa_bits: usize,
}

#[derive(Args, Debug)]
struct ServeArgs {
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
    /// Close a TCP connection that completes no frame for this long (idle, or
    /// dribbling a partial frame).
    #[arg(long, env = "REGISTRAR_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Open TCP connections at most, all ports together; further ones are closed on
    /// accept.
    #[arg(long, env = "REGISTRAR_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
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
    /// Registrations per second allowed per source IP address, sustained (0: no limit).
    /// Over it a request gets 429 before any RSA work.
    #[arg(long, env = "REGISTRAR_RATE_PER_SOURCE", default_value_t = 100.0)]
    rate_per_source: f64,
    /// Registrations a source may send at once before --rate-per-source applies.
    #[arg(long, env = "REGISTRAR_BURST", default_value_t = 1000)]
    burst: u32,
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

/// The log filter from `REGISTRAR_LOG`: a level, or directives naming a target
/// (`registrar=debug`). A bare word that is neither is refused rather than read as a
/// target that matches nothing, which would silence the log.
fn log_filter() -> Result<tracing_subscriber::EnvFilter, String> {
    use tracing_subscriber::EnvFilter;
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let value = match std::env::var("REGISTRAR_LOG") {
        Ok(v) => v,
        Err(std::env::VarError::NotPresent) => return Ok(EnvFilter::new("info")),
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err("REGISTRAR_LOG is not valid UTF-8".into());
        }
    };
    let refuse = |why: String| {
        format!(
            "REGISTRAR_LOG={value:?} {why}: use error, warn, info, debug or trace, or \
             directives such as registrar=debug,redis=warn"
        )
    };
    for directive in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains('=') && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(refuse(format!("names no level ({directive:?})")));
        }
    }
    EnvFilter::try_new(&value).map_err(|e| refuse(e.to_string()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match log_filter() {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // One log line per request is thousands of lines a second: a background thread
    // writes them in batches instead of one write(2) each on the request path. Lines
    // are never dropped (a full buffer blocks); the guard flushes them at exit.
    let (log_writer, _flush_at_exit) =
        tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(false)
            .thread_name("log-writer")
            .finish(std::io::BufWriter::with_capacity(
                64 * 1024,
                std::io::stderr(),
            ));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(log_writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let io_threads = match &cli.command {
        Command::Serve(args) => args.io_threads(),
        _ => 1,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(io_threads)
        .thread_name("io")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(&cli.common, args).await,
            Command::Init(args) => init(&cli.common, args).await,
            Command::Network(cmd) => admin::network(&cli.common, cmd).await,
            Command::Passphrase(cmd) => admin::passphrase(&cli.common, cmd).await,
            Command::Node(cmd) => admin::node(&cli.common, cmd).await,
            Command::Key(cmd) => admin::key(&cli.common, cmd),
            Command::Device(cmd) => admin::device(&cli.common, cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl ServeArgs {
    /// `--io-threads`, or one per four cores; at least one.
    fn io_threads(&self) -> usize {
        self.io_threads
            .unwrap_or_else(|| cores().div_ceil(4))
            .max(1)
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What `init` and `serve` found or made in the data dir and the store.
struct Prepared {
    data: DataDir,
    keys: KeyRing,
    storage: registrar::crypto::StorageKey,
    signing: registrar::crypto::ecdsa::SigningKey,
    store: AnyStore,
    /// What this start made, for the first-start guide (empty: all was there).
    made: Vec<String>,
}

/// Makes whatever is missing of the data dir (0700), its keys (0600) and the store.
async fn prepare(common: &Common, rsa_bits: usize) -> Result<Prepared> {
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
    let sqlite = data.sqlite_path();
    let fresh_sqlite = common.store == "sqlite" && !sqlite.exists();
    let store = AnyStore::open(&common.store, &sqlite, Creation::IfMissing)
        .await
        .context("cannot open the store")?;
    if fresh_sqlite {
        made.push(format!("SQLite store {}", sqlite.display()));
    }
    Ok(Prepared {
        data,
        keys,
        storage,
        signing,
        store,
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

async fn init(common: &Common, args: InitArgs) -> Result<()> {
    let prepared = prepare(common, args.rsa_bits).await?;
    if common.json {
        println!(
            "{}",
            serde_json::json!({
                "data_dir": prepared.data.path(),
                "store": prepared.store.describe(),
                "made": prepared.made,
                "rsa_bits": prepared.keys.current().bits(),
            })
        );
    } else if prepared.made.is_empty() {
        println!(
            "{} and its store {} were already complete; nothing made",
            prepared.data.path().display(),
            prepared.store.describe()
        );
    } else {
        println!("{}", first_start_guide(common, &prepared));
    }
    Ok(())
}

async fn serve(common: &Common, args: ServeArgs) -> Result<()> {
    // Every socket first: a port in use is an error naming it, before any file is made.
    let sockets =
        IjamSockets::bind(args.bind, args.cert_port, args.reg_port, args.state_port).await?;
    let envelope_sockets = EnvelopeSockets::bind(args.bind, args.envelope_port).await?;
    let metrics_listener = match args.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (metrics, --metrics-addr)"))?,
        ),
        None => None,
    };
    let mut ports = format!("{} {}", sockets.describe()?, envelope_sockets.describe()?);

    let prepared = prepare(common, args.rsa_bits).await?;
    let guide = (!prepared.made.is_empty()).then(|| first_start_guide(common, &prepared));
    let Prepared {
        data,
        keys,
        storage,
        signing,
        store,
        ..
    } = prepared;
    let store = Arc::new(store);
    let store_url = store.describe();
    let flow = Arc::new(IjamFlow::new(
        keys,
        storage,
        Arc::clone(&store),
        args.replay_ttl.as_millis() as i64,
    ));
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
        connections: ConnectionLimit::new(args.max_connections),
        rate_per_source: args.rate_per_source,
        burst: args.burst,
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
            ("reg", sockets.reg_udp.local_addr()?.port()),
            ("state", sockets.state_udp.local_addr()?.port()),
            ("envelope", envelope_sockets.udp.local_addr()?.port()),
        ];
        tokio::spawn(registrar::server::metrics::serve(
            listener,
            handle,
            cancel.clone(),
            udp_ports,
        ));
    }
    let envelope = EnvelopeServer::build(
        store,
        data.storage_key()?,
        &signing,
        pool.clone(),
        config.clone(),
        args.max_frame,
        cancel.clone(),
    );
    let server = IjamServer::new(Arc::clone(&flow), pool, config, cancel.clone());
    let tracker = TaskTracker::new();
    server.spawn(sockets, cancel.clone(), &tracker);
    envelope.spawn(envelope_sockets, &tracker);
    tokio::spawn(watch_rsa_keys(
        data.clone(),
        Arc::clone(&flow),
        args.rsa_bits,
        cancel.clone(),
    ));
    tracker.spawn(registrar::server::metrics::report_refusals(cancel.clone()));
    tracker.close();

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
async fn watch_rsa_keys<S: Store>(
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
