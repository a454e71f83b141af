//! `registrar migrate`: copies a JAMScript-OTA portal's Redis into a native store,
//! passphrases hashed and node keys sealed under this data dir's storage key, for an
//! operator leaving the portal (whose layout keeps both in clear).

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use registrar::core::clock::now_ms;
use registrar::core::crypto::StorageKey;
use registrar::core::random;
use registrar::store::ijam::{
    AtRest, IjamStore, NewPassphrase, Node, NodeStatus, StoredNodeKey, StoredPassphrase,
};
use registrar::store::redis::portal::{PortalStore, REGISTRATION_EXPIRY_MS};
use registrar::store::{StoreError, StoreUrl};
use serde::Serialize;

use super::{ADMIN, Common, existing_data_dir, on_store};

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The portal's Redis: ota+redis://host:port/db. It is only read.
    #[arg(long, env = "REGISTRAR_MIGRATE_FROM")]
    pub from: String,
}

/// What one run copied and what it found there already (a second run copies nothing).
#[derive(Debug, Default, Serialize)]
struct Copied {
    networks: u64,
    networks_present: u64,
    passphrases: u64,
    passphrases_present: u64,
    nodes: u64,
    nodes_present: u64,
    /// Nodes the portal would call expired (90 days after their last registration):
    /// copied as expired, their key erased.
    nodes_expired: u64,
}

pub async fn migrate(common: &Common, args: MigrateArgs) -> Result<()> {
    let url = match StoreUrl::parse(&args.from)? {
        StoreUrl::Portal(url) => url,
        _ => bail!(
            "--from {:?} is not a portal's Redis: give it as ota+redis://host:port/db",
            registrar::store::redis::redact_url(&args.from)
        ),
    };
    if matches!(StoreUrl::parse(&common.store)?, StoreUrl::Portal(_)) {
        bail!(
            "--store names a portal's Redis: migrate copies into a native store (sqlite or \
             redis://…), the one the listener will use afterwards"
        );
    }
    let data = existing_data_dir(common)?;
    let storage = data.storage_key()?;
    let portal = PortalStore::connect(&url).await?;
    on_store!(common, data, ADMIN, migrate_into, &portal, &storage, common)
}

async fn migrate_into<S: IjamStore>(
    store: S,
    portal: &PortalStore,
    storage: &StorageKey,
    common: &Common,
) -> Result<()> {
    let now = now_ms();
    let mut copied = Copied::default();
    for net in portal.networks().await? {
        match store
            .create_network(
                &net.id,
                &net.owner,
                &net.name,
                net.reregistration,
                net.created_ms,
            )
            .await
        {
            Ok(_) => copied.networks += 1,
            Err(StoreError::NetworkExists(_)) => {
                let present = store
                    .network(&net.id)
                    .await?
                    .ok_or_else(|| anyhow!("network {} vanished while migrating", net.id))?;
                if present.owner != net.owner {
                    bail!(
                        "network {} is owned by {:?} in the portal but by {:?} in --store: \
                         nothing of it was copied; delete one of them first",
                        net.id,
                        net.owner,
                        present.owner
                    );
                }
                copied.networks_present += 1;
            }
            Err(e) => return Err(e.into()),
        }
        for (typed, node_name) in portal.typed_passphrases(&net.id).await? {
            let StoredPassphrase::Clear(text) = typed else {
                unreachable!("the portal keeps passphrases as typed")
            };
            let pending = NewPassphrase {
                passphrase: storage.store_passphrase(store.at_rest(), &net.id, &text),
                node_name,
                expires_ms: None,
                for_node: None,
            };
            // One at a time: a second run finds each one there and goes on.
            match store.add_passphrases(&net.id, vec![pending], now).await {
                Ok(()) => copied.passphrases += 1,
                Err(StoreError::PassphraseTaken(_) | StoreError::PassphraseNameTaken { .. }) => {
                    copied.passphrases_present += 1
                }
                Err(e) => return Err(e.into()),
            }
        }
        for node in portal.nodes(Some(&net.id)).await? {
            let (node, expired) = protect(node, storage, store.at_rest(), now)?;
            let id = node.id;
            if store
                .import_node(node)
                .await
                .with_context(|| format!("copying node {id}"))?
            {
                copied.nodes += 1;
                copied.nodes_expired += u64::from(expired);
            } else {
                copied.nodes_present += 1;
            }
        }
    }
    if common.json {
        println!("{}", serde_json::to_string(&copied)?);
    } else {
        println!(
            "copied {} networks, {} passphrases, {} nodes ({} of them expired) into {}",
            copied.networks, copied.passphrases, copied.nodes, copied.nodes_expired, common.store
        );
        if copied.networks_present + copied.passphrases_present + copied.nodes_present > 0 {
            println!(
                "already there, left as they were: {} networks, {} passphrases, {} nodes",
                copied.networks_present, copied.passphrases_present, copied.nodes_present
            );
        }
        println!(
            "serve with --store {} and this --data-dir: its storage key opens what was copied",
            common.store
        );
    }
    Ok(())
}

/// The node as the native store keeps it: its key sealed, or erased when the portal
/// would call it expired. Returns whether it was.
fn protect(
    mut node: Node,
    storage: &StorageKey,
    at_rest: AtRest,
    now_ms: i64,
) -> Result<(Node, bool)> {
    let expired = node.registered_ms != 0
        && node.registered_ms < now_ms - REGISTRATION_EXPIRY_MS
        && !matches!(node.status, NodeStatus::Revoked | NodeStatus::Expired);
    if expired {
        node.status = NodeStatus::Expired;
        node.key = StoredNodeKey::None;
    }
    node.key = match &node.key {
        StoredNodeKey::Clear(key) => {
            storage.store_node_key(at_rest, key, random::bytes()?, node.id)?
        }
        other => other.clone(),
    };
    Ok((node, expired))
}
