//! The ijam flow's admin commands: networks, passphrases, nodes, the RSA key.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use registrar::core::clock::now_ms;
use registrar::core::crypto::passphrase;
use registrar::core::datadir::DataDir;
use registrar::store::ijam::{IjamStore, Network, NewPassphrase, Node, Reregistration};
use registrar::wire::ijam::{NetworkId, Passphrase};
use serde_json::json;
use uuid::Uuid;

use super::output::{natural_order, print_table, time};
use super::{ADMIN, Common, existing_data_dir, on_store};

#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Create a network; its nodes will be owned by USER.
    Create {
        /// Network id as nodes send it: 1–16 printable ASCII characters, no spaces.
        network: String,
        /// The owner of every node registered in this network.
        #[arg(long)]
        owner: String,
        /// A human-readable name (defaults to the id).
        #[arg(long)]
        name: Option<String>,
        #[arg(
            long,
            value_name = "RULE",
            default_value = "owner",
            value_parser = reregistration_rule(),
            help = RULE_SHORT_HELP,
            long_help = RULE_HELP
        )]
        reregistration: Reregistration,
    },
    /// Change a network's re-registration rule; it applies from the next registration.
    Set {
        network: String,
        #[arg(
            long,
            value_name = "RULE",
            value_parser = reregistration_rule(),
            help = RULE_SHORT_HELP,
            long_help = RULE_HELP
        )]
        reregistration: Reregistration,
    },
    /// List networks with their re-registration rule, pending passphrases and node
    /// counts.
    List,
    /// Show one network.
    Show { network: String },
    /// Delete a network with its pending passphrases and every node registered in it.
    Delete {
        network: String,
        /// Required: the nodes go too, and cannot be brought back.
        #[arg(long)]
        yes: bool,
    },
}

/// `--reregistration` of `network create` and `network set`: `-h`, then `--help`.
const RULE_SHORT_HELP: &str = "Who may re-register an existing node through this network: \
    owner (any passphrase of the network) or minted (only a passphrase minted for that node \
    with `passphrase add --for-node`)";
const RULE_HELP: &str = "Who may re-register an existing node (a registration naming its id) \
    through this network. `owner`, the original JAMScript-OTA rule: any passphrase of the \
    network re-registers any node of the network's owner, so whoever holds an unused one \
    can take over the owner's nodes (their ids travel in clear). `minted`: only a \
    passphrase minted for that node (`passphrase add --for-node ID`); any other gets the \
    401 and stays unused. New nodes register alike under both";

fn reregistration_rule() -> impl clap::builder::TypedValueParser<Value = Reregistration> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["owner", "minted"])
        .map(|rule| Reregistration::parse(&rule).expect("one of the possible values"))
}

#[derive(Subcommand, Debug)]
pub enum PassphraseCommand {
    /// Mint one-time passphrases and print them on stdout, one per line.
    ///
    /// Generated passphrases are 15 letters and digits (as many as the C client
    /// `ijamreg` reads), the last two a check value that catches any single mistyped
    /// character. A typed one (--passphrase) may be 8–16 letters or digits. With
    /// --for-node the passphrase re-registers that node and nothing else: what a
    /// network whose rule is `minted` needs to re-register a node.
    Add {
        network: String,
        /// Name of the node that will register with it (with --count: NAME-1 … NAME-N).
        #[arg(long)]
        node_name: String,
        /// Use this passphrase instead of generating one: 8–16 letters or digits.
        #[arg(long, conflicts_with = "count")]
        passphrase: Option<String>,
        /// Accept a typed passphrase under 8 characters, as the JAMScript-OTA portal did
        /// (for nodes already configured with one; a short one is guessed in few tries).
        #[arg(long, requires = "passphrase")]
        allow_short: bool,
        /// Unused passphrases stop working after this long (e.g. 7d, 12h).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
        /// Mint N passphrases at once, for nodes NAME-1 … NAME-N.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        count: Option<u32>,
        /// Mint it for node ID of this network: it is valid only in a registration
        /// naming ID while ID is in the network and not revoked, and then re-registers
        /// ID (new key, status offline) whatever the network's rule. Refused when ID is
        /// not a node of the network.
        #[arg(long, value_name = "ID", conflicts_with = "count")]
        for_node: Option<Uuid>,
    },
    /// List pending passphrases: node names, the node each was minted for, expiry;
    /// never the secrets.
    List { network: String },
    /// Revoke the pending passphrase of a node.
    Revoke {
        network: String,
        #[arg(long)]
        node_name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Make a new RSA key; the old one keeps decrypting for --grace.
    ///
    /// The certificate port serves the new public key within a second (running
    /// listeners watch the data dir), while registrations encrypted to the old key are
    /// still accepted until the grace period ends, so a fleet mid-registration is not
    /// cut off. The new key has the current key's size.
    Rotate {
        /// How long the previous key still decrypts.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        grace: Duration,
    },
    /// Show the current key (size, SHA-256 of its public key) and the previous one.
    Show,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List registered nodes.
    List {
        /// Only the nodes of this network.
        #[arg(long)]
        network: Option<String>,
    },
    /// Show one node.
    Show { id: Uuid },
    /// Revoke a node: its state requests are refused from now on, and a registration
    /// naming its id gets a fresh one.
    Revoke { id: Uuid },
}

/// Typed passphrases shorter than this are refused.
const MIN_TYPED_PASSPHRASE: usize = 8;

/// A freshly generated passphrase.
fn generated() -> Result<Passphrase> {
    let text = passphrase::generate()?;
    Ok(Passphrase::new(&text).expect("generated passphrases are valid"))
}

fn network_id(s: &str) -> Result<NetworkId> {
    NetworkId::new(s).map_err(|e| {
        anyhow!("invalid network id {s:?} ({e}): use 1–16 printable ASCII characters, no spaces")
    })
}

pub async fn network(common: &Common, cmd: NetworkCommand) -> Result<()> {
    let data = existing_data_dir(common)?;
    on_store!(common, data, ADMIN, network_on, common, cmd)
}

async fn network_on<S: IjamStore>(store: S, common: &Common, cmd: NetworkCommand) -> Result<()> {
    match cmd {
        NetworkCommand::Create {
            network,
            owner,
            name,
            reregistration,
        } => {
            let id = network_id(&network)?;
            if owner.trim().is_empty() {
                bail!("--owner must not be empty");
            }
            let name = name.unwrap_or_else(|| id.to_string());
            let net = store
                .create_network(id.as_str(), &owner, &name, reregistration, now_ms())
                .await?;
            if common.json {
                println!("{}", serde_json::to_string(&net)?);
            } else {
                println!(
                    "created network {} (owner {}, name {:?}, re-registration {})",
                    net.id,
                    net.owner,
                    net.name,
                    net.reregistration.as_str()
                );
            }
        }
        NetworkCommand::Set {
            network,
            reregistration,
        } => {
            let net = store.set_reregistration(&network, reregistration).await?;
            if common.json {
                println!("{}", serde_json::to_string(&net)?);
            } else {
                println!(
                    "network {}: re-registration {}{}",
                    net.id,
                    net.reregistration.as_str(),
                    rule_meaning(&net)
                );
            }
        }
        NetworkCommand::List => {
            let nets = store.networks().await?;
            if common.json {
                println!("{}", serde_json::to_string(&nets)?);
            } else {
                let rows: Vec<Vec<String>> = nets
                    .iter()
                    .map(|n| {
                        vec![
                            n.id.clone(),
                            n.owner.clone(),
                            n.name.clone(),
                            n.reregistration.as_str().to_owned(),
                            n.pending_passphrases.to_string(),
                            n.nodes.to_string(),
                            time(n.created_ms),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "NETWORK",
                        "OWNER",
                        "NAME",
                        "REREGISTRATION",
                        "PENDING",
                        "NODES",
                        "CREATED",
                    ],
                    &rows,
                );
            }
        }
        NetworkCommand::Delete { network, yes } => {
            if !yes {
                bail!(
                    "deleting network {network:?} deletes its pending passphrases and every \
                     node registered in it: run again with --yes"
                );
            }
            let nodes = store.delete_network(&network).await?;
            if common.json {
                println!(
                    "{}",
                    json!({"network": network, "deleted": true, "nodes": nodes})
                );
            } else {
                println!("deleted network {network} and its {nodes} nodes");
            }
        }
        NetworkCommand::Show { network } => {
            let net = store
                .network(&network)
                .await?
                .ok_or_else(|| anyhow!("network {network:?} does not exist"))?;
            if common.json {
                println!("{}", serde_json::to_string(&net)?);
            } else {
                println!("network:             {}", net.id);
                println!("owner:               {}", net.owner);
                println!("name:                {}", net.name);
                println!(
                    "re-registration:     {}{}",
                    net.reregistration.as_str(),
                    rule_meaning(&net)
                );
                println!("created:             {}", time(net.created_ms));
                println!("pending passphrases: {}", net.pending_passphrases);
                println!("nodes:               {}", net.nodes);
            }
        }
    }
    Ok(())
}

/// What a network's rule means for its owner's nodes, after the rule's name.
fn rule_meaning(net: &Network) -> String {
    match net.reregistration {
        Reregistration::Owner => format!(
            " (a registration with any passphrase of {} may name and re-register any node of {})",
            net.id, net.owner
        ),
        Reregistration::Minted => {
            " (re-registering a node takes a passphrase minted for it: passphrase add --for-node)"
                .into()
        }
    }
}

pub async fn passphrase(common: &Common, cmd: PassphraseCommand) -> Result<()> {
    let data = existing_data_dir(common)?;
    on_store!(common, data, ADMIN, passphrase_on, common, &data, cmd)
}

async fn passphrase_on<S: IjamStore>(
    store: S,
    common: &Common,
    data: &DataDir,
    cmd: PassphraseCommand,
) -> Result<()> {
    match cmd {
        PassphraseCommand::Add {
            network,
            node_name,
            passphrase: typed,
            allow_short,
            expires_in,
            count,
            for_node,
        } => {
            let id = network_id(&network)?;
            if node_name.trim().is_empty() {
                bail!("--node-name must not be empty");
            }
            let now = now_ms();
            let expires_ms = expires_in.map(|d| now + d.as_millis() as i64);
            let minted: Vec<(String, Passphrase)> = match (typed, count) {
                (Some(p), _) => {
                    let p = Passphrase::new(&p).map_err(|e| {
                        anyhow!("invalid passphrase ({e}): use 8–16 ASCII letters or digits")
                    })?;
                    if p.expose().len() < MIN_TYPED_PASSPHRASE && !allow_short {
                        bail!(
                            "a typed passphrase needs at least {MIN_TYPED_PASSPHRASE} characters \
                             (this one has {}): a short one is guessed in few tries; omit \
                             --passphrase to generate one (or give --allow-short for a node \
                             that already has it)",
                            p.expose().len()
                        );
                    }
                    if p.expose().len() > passphrase::GENERATED_LEN {
                        eprintln!(
                            "note: the C client ijamreg reads at most {} characters of a \
                             passphrase; nodes using it cannot type this one",
                            passphrase::GENERATED_LEN
                        );
                    }
                    vec![(node_name, p)]
                }
                (None, None) => vec![(node_name, generated()?)],
                (None, Some(n)) => (1..=n)
                    .map(|i| Ok((format!("{node_name}-{i}"), generated()?)))
                    .collect::<Result<_>>()?,
            };
            let storage = data.storage_key()?;
            let batch = minted
                .iter()
                .map(|(name, p)| NewPassphrase {
                    passphrase: storage.store_passphrase(store.at_rest(), id.as_str(), p.expose()),
                    node_name: name.clone(),
                    expires_ms,
                    for_node,
                })
                .collect();
            store.add_passphrases(id.as_str(), batch, now).await?;
            if common.json {
                let items: Vec<_> = minted
                    .iter()
                    .map(|(name, p)| {
                        json!({"network": id.as_str(), "node_name": name, "passphrase": p.expose(), "expires_ms": expires_ms, "for_node": for_node})
                    })
                    .collect();
                println!("{}", serde_json::to_string(&items)?);
            } else {
                for (_, p) in &minted {
                    println!("{}", p.expose());
                }
            }
        }
        PassphraseCommand::List { network } => {
            let mut pending = store.passphrases(&network).await?;
            pending.sort_by(|a, b| natural_order(&a.node_name, &b.node_name));
            if common.json {
                println!("{}", serde_json::to_string(&pending)?);
            } else {
                let now = now_ms();
                let rows: Vec<Vec<String>> = pending
                    .iter()
                    .map(|p| {
                        let expiry = match p.expires_ms {
                            None => "never".to_string(),
                            Some(ms) if ms <= now => format!("{} (expired)", time(ms)),
                            Some(ms) => time(ms),
                        };
                        let for_node = p.for_node.map_or_else(|| "-".into(), |n| n.to_string());
                        vec![p.node_name.clone(), for_node, time(p.created_ms), expiry]
                    })
                    .collect();
                print_table(&["NODE NAME", "FOR NODE", "CREATED", "EXPIRES"], &rows);
            }
        }
        PassphraseCommand::Revoke { network, node_name } => {
            store.revoke_passphrase(&network, &node_name).await?;
            if common.json {
                println!(
                    "{}",
                    json!({"network": network, "node_name": node_name, "revoked": true})
                );
            } else {
                println!(
                    "revoked the pending passphrase of node {node_name:?} in network {network}"
                );
            }
        }
    }
    Ok(())
}

fn node_json(n: &Node) -> serde_json::Value {
    serde_json::to_value(n).expect("nodes serialise")
}

pub async fn node(common: &Common, cmd: NodeCommand) -> Result<()> {
    let data = existing_data_dir(common)?;
    on_store!(common, data, ADMIN, node_on, common, cmd)
}

async fn node_on<S: IjamStore>(store: S, common: &Common, cmd: NodeCommand) -> Result<()> {
    match cmd {
        NodeCommand::List { network } => {
            let nodes = store.nodes(network.as_deref()).await?;
            if common.json {
                let items: Vec<_> = nodes.iter().map(node_json).collect();
                println!("{}", serde_json::to_string(&items)?);
            } else {
                let rows: Vec<Vec<String>> = nodes
                    .iter()
                    .map(|n| {
                        vec![
                            n.id.to_string(),
                            n.network.clone(),
                            n.name.clone(),
                            n.node_type.clone(),
                            n.arch.clone(),
                            n.status.as_str().to_string(),
                            time(n.registered_ms),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "NODE",
                        "NETWORK",
                        "NAME",
                        "TYPE",
                        "ARCH",
                        "STATUS",
                        "REGISTERED",
                    ],
                    &rows,
                );
            }
        }
        NodeCommand::Show { id } => {
            let n = store
                .node(id)
                .await?
                .with_context(|| format!("node {id} does not exist"))?;
            if common.json {
                println!("{}", node_json(&n));
            } else {
                println!("node:        {}", n.id);
                println!("network:     {}", n.network);
                println!("owner:       {}", n.owner);
                println!("name:        {}", n.name);
                println!("type:        {}", n.node_type);
                println!("arch:        {}", n.arch);
                println!("status:      {}", n.status.as_str());
                println!("ip:          {}", if n.ip.is_empty() { "-" } else { &n.ip });
                println!("created:     {}", time(n.created_ms));
                println!("registered:  {}", time(n.registered_ms));
                println!("last online: {}", time(n.online_ms));
            }
        }
        NodeCommand::Revoke { id } => {
            store.revoke_node(id).await?;
            if common.json {
                println!("{}", json!({"node": id, "revoked": true}));
            } else {
                println!("revoked node {id}");
            }
        }
    }
    Ok(())
}

fn fingerprint(key: &registrar::core::crypto::RsaKey) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.public_pem().as_bytes());
    hex::encode(&digest.as_ref()[..16])
}

pub fn key(common: &Common, cmd: KeyCommand) -> Result<()> {
    let data = existing_data_dir(common)?;
    let now = now_ms();
    match cmd {
        KeyCommand::Rotate { grace } => {
            let rotation = data.rotate_rsa_key(None, grace.as_millis() as i64, now)?;
            let (keys, _) = data.rsa_keyring(rotation.bits, now)?;
            if common.json {
                println!(
                    "{}",
                    json!({"bits": rotation.bits, "fingerprint": fingerprint(keys.current()), "previous_until_ms": rotation.previous_until_ms})
                );
            } else {
                println!(
                    "new RSA-{} key {} in force; the previous key decrypts until {}",
                    rotation.bits,
                    fingerprint(keys.current()),
                    time(rotation.previous_until_ms)
                );
            }
        }
        KeyCommand::Show => {
            if !data.rsa_key_path().exists() {
                bail!(
                    "no RSA key in {}: start `registrar serve` once first",
                    data.path().display()
                );
            }
            let (keys, _) = data.rsa_keyring(2048, now)?;
            let until = keys.previous_until();
            if common.json {
                println!(
                    "{}",
                    json!({"bits": keys.current().bits(), "fingerprint": fingerprint(keys.current()), "previous_until_ms": until})
                );
            } else {
                println!(
                    "current:  RSA-{} {}",
                    keys.current().bits(),
                    fingerprint(keys.current())
                );
                match until {
                    Some(until) => println!("previous: decrypts until {}", time(until)),
                    None => println!("previous: none in force"),
                }
            }
        }
    }
    Ok(())
}
