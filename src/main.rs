//! `registrar`: the listener (`serve`) and its administration commands, one binary
//! sharing `--data-dir` and `--store`, so admin commands work while a listener runs.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cli::Common;
use cli::serve::{InitArgs, ServeArgs};

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
    /// Create, list, inspect and set networks (their re-registration rule).
    #[command(subcommand)]
    Network(cli::ijam::NetworkCommand),
    /// Mint, list and revoke one-time network passphrases.
    #[command(subcommand)]
    Passphrase(cli::ijam::PassphraseCommand),
    /// Rotate and inspect the listener's RSA key.
    #[command(subcommand)]
    Key(cli::ijam::KeyCommand),
    /// List, inspect and revoke registered nodes.
    #[command(subcommand)]
    Node(cli::ijam::NodeCommand),
    /// List, inspect and revoke the devices of the pubkey flow (envelope port).
    #[command(subcommand)]
    Device(cli::pubkey::DeviceCommand),
    /// Copy a JAMScript-OTA portal's Redis (networks, unused passphrases, nodes) into
    /// --store, passphrases hashed and node keys sealed under this data dir's storage
    /// key. The portal is only read; running it again copies only what is new.
    ///
    /// Run `registrar init` first (with the --store and --data-dir the listener will
    /// use), then serve with them: nodes keep their ids and keys, pending passphrases
    /// keep working. Nodes the portal would call expired (90 days after their last
    /// registration) arrive expired, their key erased.
    Migrate(cli::migrate::MigrateArgs),
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
            Command::Serve(args) => cli::serve::serve(&cli.common, args).await,
            Command::Init(args) => cli::serve::init(&cli.common, args).await,
            Command::Network(cmd) => cli::ijam::network(&cli.common, cmd).await,
            Command::Passphrase(cmd) => cli::ijam::passphrase(&cli.common, cmd).await,
            Command::Node(cmd) => cli::ijam::node(&cli.common, cmd).await,
            Command::Key(cmd) => cli::ijam::key(&cli.common, cmd),
            Command::Device(cmd) => cli::pubkey::device(&cli.common, cmd).await,
            Command::Migrate(args) => cli::migrate::migrate(&cli.common, args).await,
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
