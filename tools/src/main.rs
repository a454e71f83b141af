//! `registrar-node`: the companion client of Registrar. It registers a node the way the
//! upstream `ijamreg` C client does (same wire bytes, same state file), and changes its
//! state; scripts read the outcome from the exit code.

mod exit;
mod hostile;
mod ijam;
mod load;
mod load_pubkey;
mod node_file;
mod pubkey;

use registrar::core::random;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use registrar::wire::ijam::{
    NetworkId, NodeArch, NodeKey, NodeType, Passphrase, RegisterRequest, StateCode, Status,
    parse_reply_status,
};
use serde_json::json;

use exit::{EXIT_CODES_HELP, Kind, Port, classify, fail, refused};
use ijam::{Server, Transport};
use node_file::NodeInfo;

/// Companion client for Registrar: register a node and drive its state.
///
/// `registrar-node ijam register` speaks the JAMScript-OTA `ijam` protocol byte for byte
/// (it also registers with the upstream Node.js server) and keeps the node's identity
/// in a state file laid out as the C client `ijamreg` keeps its `.env`.
#[derive(Parser, Debug)]
#[command(version, after_help = EXIT_CODES_HELP)]
struct Cli {
    /// Print the outcome as one JSON object on stdout (also on failure).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The `ijam` flow: RSA-encrypted registration with a one-time network passphrase,
    /// then AES-encrypted state changes.
    #[command(subcommand)]
    Ijam(IjamCommand),
    /// The `pubkey` flow on the envelope port: register a device's P-256 public key
    /// under its 16-byte id, then attest (sign a server challenge) with it.
    #[command(subcommand)]
    Pubkey(pubkey::PubkeyCommand),
    /// Load generators for benchmarks: many concurrent clients, a summary at the end.
    #[command(subcommand)]
    Load(LoadCommand),
    /// Hostile traffic for measurements (tools/perf/hostile.sh): held connections and
    /// datagram floods from loopback source addresses, and what the listener did with
    /// them. Loopback only.
    #[command(subcommand)]
    Hostile(hostile::HostileCommand),
}

#[derive(Subcommand, Debug)]
enum LoadCommand {
    /// Offer ijam registrations to a listener and report registrations/s, latency
    /// percentiles (p50/p90/p99/max) and outcome counts by status.
    ///
    /// Creates its own network and passphrases through --data-dir/--store (or reads
    /// --passphrase-file), encrypts every request before the timed window, then runs
    /// --connections clients for --count requests or --duration, open-loop at --rate
    /// when given. With --listener-pid it also reports the listener's CPU time. Every
    /// report ends with the machine's CPU over the window: the share of all cores that
    /// was busy and the CPU per registration of the whole machine and of this tool (on
    /// shared cores, cores ÷ that figure is the most any listener could do).
    Ijam(load::LoadIjamArgs),
    /// Offer pubkey registrations (--mode register) or Challenge → Attest round trips
    /// (--mode attest) on the envelope port and report operations/s, latency
    /// percentiles, outcome counts by status and the machine's CPU per operation.
    Pubkey(load_pubkey::LoadPubkeyArgs),
}

#[derive(Subcommand, Debug)]
enum IjamCommand {
    /// Register this node and save its id and key in the state file.
    ///
    /// Fetches the server's RSA key, sends the encrypted request and prints the node id
    /// (lower-case UUID) alone on stdout. With an existing state file the node
    /// re-registers under its stored id (a new key, status back to offline), as
    /// `ijamreg` does; every registration consumes one passphrase.
    #[command(after_help = EXIT_CODES_HELP)]
    Register(RegisterArgs),
    /// Tell the server this node is online, offline or loading.
    ///
    /// Allowed: online from offline, online or loading; loading from online; offline
    /// from any. The new status is saved in the state file on success.
    #[command(after_help = EXIT_CODES_HELP)]
    State(StateArgs),
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// Server host name or IP address.
    #[arg(long, env = "REGISTRAR_SERVER")]
    server: String,
    /// Use UDP instead of TCP (the certificate is always fetched over TCP). A request
    /// without a reply is resent, byte for byte, --retries times.
    #[arg(long)]
    udp: bool,
    /// How long to wait to connect and for each reply (e.g. 500ms, 5s).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// UDP: resends after a timeout.
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// The node's state file (id, network, key, type, status; mode 0600).
    #[arg(long, env = "REGISTRAR_NODE_STATE", default_value = "./node.bin")]
    state_file: PathBuf,
}

impl ServerArgs {
    fn server(&self) -> Server {
        Server {
            host: self.server.clone(),
            timeout: self.timeout,
            retries: self.retries,
        }
    }

    fn transport(&self) -> Transport {
        if self.udp {
            Transport::Udp
        } else {
            Transport::Tcp
        }
    }
}

#[derive(Args, Debug)]
struct RegisterArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Certificate port (TCP).
    #[arg(long, default_value_t = 8444)]
    cert_port: u16,
    /// Registration port (TCP or UDP).
    #[arg(long, default_value_t = 8445)]
    reg_port: u16,
    /// Network id (1–16 printable ASCII characters).
    #[arg(long)]
    network: String,
    /// One-time network passphrase (1–16 letters or digits; generated ones have 15, the
    /// last two a check value this command verifies); prefer the environment
    /// variable, which other users cannot read from the process list.
    #[arg(long, env = "REGISTRAR_PASSPHRASE", hide_env_values = true)]
    passphrase: String,
    /// Node type.
    #[arg(long = "type", default_value = "device", value_parser = node_type_parser())]
    node_type: NodeType,
    /// Node architecture.
    #[arg(long, default_value = "x86_ubuntu", value_parser = node_arch_parser())]
    arch: NodeArch,
}

#[derive(Args, Debug)]
struct StateArgs {
    /// The new status.
    #[arg(value_parser = state_parser())]
    state: StateCode,
    #[command(flatten)]
    server: ServerArgs,
    /// State port (TCP or UDP).
    #[arg(long, default_value_t = 8446)]
    state_port: u16,
}

fn node_type_parser() -> impl TypedValueParser<Value = NodeType> {
    PossibleValuesParser::new(NodeType::ALL.map(NodeType::as_str)).map(|s| {
        NodeType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .expect("one of the possible values")
    })
}

fn node_arch_parser() -> impl TypedValueParser<Value = NodeArch> {
    PossibleValuesParser::new(NodeArch::ALL.map(NodeArch::as_str)).map(|s| {
        NodeArch::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .expect("one of the possible values")
    })
}

fn state_parser() -> impl TypedValueParser<Value = StateCode> {
    PossibleValuesParser::new(StateCode::ALL.map(StateCode::as_str)).map(|s| {
        StateCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .expect("one of the possible values")
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are successes; every usage error exits 1.
            return if e.use_stderr() {
                Kind::Local.exit_code()
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match &cli.command {
        Command::Ijam(IjamCommand::Register(args)) => register(args),
        Command::Ijam(IjamCommand::State(args)) => change_state(args),
        Command::Pubkey(cmd) => pubkey::run(cmd).map(|(text, json)| Output { text, json }),
        Command::Load(LoadCommand::Ijam(args)) => load::run(args).map(|json| Output {
            text: Some(load::summary(&json)),
            json,
        }),
        Command::Load(LoadCommand::Pubkey(args)) => load_pubkey::run(args).map(|json| Output {
            text: Some(load_pubkey::summary(&json)),
            json,
        }),
        Command::Hostile(command) => hostile::run(command.clone()).map(|json| Output {
            text: Some(hostile::summary(&json)),
            json,
        }),
    };
    match result {
        Ok(out) => {
            if cli.json {
                // Warnings (a load run that measured a rate limit) go to stderr as
                // well, where a person watching a scripted run sees them.
                for warning in out.json["warnings"].as_array().into_iter().flatten() {
                    eprintln!("WARNING: {}", warning.as_str().unwrap_or_default());
                }
                println!("{}", out.json);
            } else if let Some(text) = out.text {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let (kind, status) = classify(&e);
            eprintln!("error: {e:#}");
            if cli.json {
                println!(
                    "{}",
                    json!({
                        "status": status.map(|s| s.0),
                        "error": format!("{e:#}"),
                        "exit_code": kind as u8,
                    })
                );
            }
            kind.exit_code()
        }
    }
}

/// What a successful command prints: `text` without --json, `json` with it.
struct Output {
    text: Option<String>,
    json: serde_json::Value,
}

fn register(args: &RegisterArgs) -> Result<Output> {
    let network_id = NetworkId::new(&args.network).map_err(|e| {
        fail(
            Kind::Local,
            format!("invalid --network {:?}: {e}", args.network),
        )
    })?;
    let passphrase = Passphrase::new(&args.passphrase).map_err(|e| {
        fail(
            Kind::Local,
            format!("invalid passphrase: {e} (use 1–16 ASCII letters or digits)"),
        )
    })?;
    let generated_len = registrar::core::crypto::passphrase::GENERATED_LEN;
    if args.passphrase.len() == generated_len
        && !registrar::core::crypto::passphrase::looks_generated(&args.passphrase)
    {
        // Typed passphrases may have this length too, so the server decides; but a
        // generated one with a character mistyped is caught here, before it is spent.
        eprintln!(
            "note: a generated passphrase has {generated_len} characters and a check value; \
             this one fails the check, so if it was generated, a character is mistyped"
        );
    }
    let state_file = &args.server.state_file;
    let previous = node_file::load(state_file)?;
    let node_key = NodeKey(random::bytes().context("no randomness for the node key")?);
    let request = RegisterRequest {
        node_id: previous
            .as_ref()
            .map(|p| p.node_id)
            .filter(|id| !id.is_nil()),
        network_id,
        passphrase,
        node_key: node_key.clone(),
        node_type: args.node_type,
        node_arch: args.arch,
    };

    let server = args.server.server();
    let transport = args.server.transport();
    let public_key = server.public_key(args.cert_port)?;
    let ciphertext = public_key
        .encrypt(&request.to_bytes())
        .context("cannot encrypt the request to the server's key")?;
    let reply = server.register(args.reg_port, transport, &ciphertext)?;
    let network = request.network_id.as_str();
    let (status, rest) = parse_reply_status(&reply)
        .map_err(|e| fail(Kind::BadReply, format!("registration reply: {e}")))?;
    if status != Status::OK {
        return Err(refused(
            status,
            Port::Register,
            format!(
                "registration refused: {status} {} (network {network:?})",
                ijam::reason_text(rest)
            ),
        ));
    }
    let node_id = ijam::decode_register_reply(&reply, &node_key)?;
    if let Some(prev) = &previous
        && prev.node_id != node_id
    {
        eprintln!(
            "note: the server assigned a new node id ({node_id}); the state file held {}",
            prev.node_id
        );
    }
    let info = NodeInfo {
        node_id,
        network_id: network.to_string(),
        node_key,
        node_type: args.node_type as u32,
        node_status: StateCode::Offline as u32,
    };
    node_file::save(state_file, &info)
        .with_context(|| format!("registered as {node_id}, but the node key could not be saved"))?;
    Ok(Output {
        text: Some(node_id.hyphenated().to_string()),
        json: json!({"node_id": node_id.hyphenated().to_string(), "status": status.0}),
    })
}

fn change_state(args: &StateArgs) -> Result<Output> {
    let state_file = &args.server.state_file;
    let mut info = node_file::load(state_file)?.ok_or_else(|| {
        fail(
            Kind::Local,
            format!(
                "no state file at {}: register first (registrar-node ijam register)",
                state_file.display()
            ),
        )
    })?;
    let frame = ijam::state_frame(info.node_id, &info.node_key, args.state)
        .context("no randomness for the IV")?;
    let server = args.server.server();
    let reply = server.state(args.state_port, args.server.transport(), &frame)?;
    let (status, rest) = parse_reply_status(&reply)
        .map_err(|e| fail(Kind::BadReply, format!("state reply: {e}")))?;
    if status == Status::OK && !rest.is_empty() {
        return Err(fail(
            Kind::BadReply,
            format!(
                "state reply: {} bytes, expected {}",
                reply.len(),
                registrar::wire::ijam::STATE_REPLY_LEN
            ),
        ));
    }
    let to = StateCode::as_str(args.state);
    if status != Status::OK {
        // A refusal may carry the server's reason (the original's texts).
        let reason = ijam::reason_text(rest);
        let why = match status {
            _ if !reason.is_empty() => reason.as_str(),
            Status::FORBIDDEN => "transition not allowed",
            Status::NOT_FOUND => "unknown node",
            Status::BAD_REQUEST => "bad request",
            Status::UNAUTHORIZED => "unauthorized",
            Status::TOO_MANY_REQUESTS => "too many requests",
            Status::SERVICE_UNAVAILABLE => "service unavailable",
            _ => "unexpected status",
        };
        return Err(refused(
            status,
            Port::State,
            format!(
                "state change refused: {status} {why} (node {}, {} → {to})",
                info.node_id,
                info.status_name()
            ),
        ));
    }
    let from = info.status_name();
    info.node_status = args.state as u32;
    node_file::save(state_file, &info)
        .with_context(|| format!("the server accepted {to}, but the state file was not updated"))?;
    Ok(Output {
        text: Some(format!("{} {from} → {to}", info.node_id)),
        json: json!({"status": status.0, "node_id": info.node_id.hyphenated().to_string(), "from": from, "to": to}),
    })
}
