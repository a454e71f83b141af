//! The JAMScript-OTA portal's own Redis layout, served as it stands (`ota+redis://`):
//! networks, passphrases as typed, node hashes with their key in hex, read and written
//! the way the portal's web pages and its three servers read and write them, so an
//! existing deployment switches its servers to Registrar and keeps its portal.
//!
//! What differs from the portal's servers, on purpose: each registration is one script
//! (two racers with one passphrase get one winner; the portal answered both), a
//! revoked node asking for its old id gets a fresh one, a node that moved networks
//! leaves its old network's set, and byte-identical retries find their answer under
//! `registrar:replay:…` (keys the portal never reads). Passphrases have no expiry
//! here and nothing is imported: the layout has no place for either.
//!
//! The layout has no hash tags, so it lives on one Redis: a cluster is refused at
//! connect. The pubkey flow keeps its native keys in the same Redis.

use std::collections::HashMap;

use redis::Script;
use uuid::Uuid;

use super::ijam::{passphrase_revoked, passphrases_added, settle_within, transitioned};
use super::keys::portal as keys;
use super::{RedisStore, SETTLE_WITHIN, field, tag, unexpected};
use crate::core::ids::{DeviceId, NodeKey};
use crate::store::ijam::{
    AtRest, IjamStore, Network, NewPassphrase, Node, NodeStatus, PendingPassphrase, RegisterOp,
    RegisterOutcome, Reregistration, SealedNodeKey, StateFrameDigest, StoredNodeKey,
    StoredPassphrase, TransitionOutcome,
};
use crate::store::pubkey::{AttestOp, AttestOutcome, Device, DeviceRegisterOutcome, PubkeyStore};
use crate::store::{StoreError, Stores};

/// A node counts as expired this long after `lastRegisteredOn`, as the portal has it.
pub const REGISTRATION_EXPIRY_MS: i64 = 90 * 24 * 60 * 60 * 1000;

/// How long the last frame that changed a node is remembered (`registrar:state:<id>`):
/// it bounds what Registrar adds to the portal's Redis for a node deleted there.
const LAST_STATE_TTL_MS: i64 = 30 * 24 * 60 * 60 * 1000;

/// How often a registration reads the requested node again when it moved meanwhile.
const STALE_RETRIES: usize = 3;

/// Why the layout cannot take the `minted` rule (networks keep no rule; every
/// re-registration follows the portal's, `owner`).
const NO_MINTED_RULE: &str = "the portal's layout keeps no re-registration rule: its \
     networks follow the original's (owner: any passphrase of the owner re-registers any \
     of the owner's nodes); migrate to a native store for --reregistration minted";

/// The portal's scripts.
struct PortalScripts {
    create_network: Script,
    delete_network: Script,
    add_passphrases: Script,
    revoke_passphrase: Script,
    register: Script,
    transition: Script,
    revoke_node: Script,
}

impl PortalScripts {
    fn new() -> Self {
        PortalScripts {
            create_network: super::script("portal/create_network.lua"),
            delete_network: super::script("portal/delete_network.lua"),
            add_passphrases: super::script("portal/add_passphrases.lua"),
            revoke_passphrase: super::script("portal/revoke_passphrase.lua"),
            register: super::script("portal/register.lua"),
            transition: super::script("portal/transition.lua"),
            revoke_node: super::script("portal/revoke_node.lua"),
        }
    }
}

/// A portal's Redis. Secrets stay in clear, as the portal keeps them
/// ([`AtRest::Clear`]); `registrar migrate` moves a deployment to a native store.
pub struct PortalStore {
    redis: RedisStore,
    scripts: PortalScripts,
}

impl std::fmt::Debug for PortalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortalStore")
            .field("url", &self.redis.inner.url)
            .finish_non_exhaustive()
    }
}

impl PortalStore {
    /// Connects to the portal's Redis at `url` (a `redis://` URL: the `ota+` prefix
    /// already taken off). A server in cluster mode is refused: the portal's keys
    /// have no hash tags, so its scripts could not run there.
    pub async fn connect(url: &str) -> Result<PortalStore, StoreError> {
        let redis = RedisStore::connect(url).await?;
        let (info,): (String,) = redis
            .inner
            .query(redis::pipe().cmd("INFO").arg("cluster"))
            .await?;
        if info.lines().any(|l| l.trim() == "cluster_enabled:1") {
            return Err(StoreError::Unavailable {
                url: format!("ota+{}", redis.inner.url),
                cause: "a server in cluster mode: the portal's layout has no hash tags and \
                        lives on one Redis (migrate to a native store to scale out)"
                    .into(),
            });
        }
        Ok(PortalStore {
            redis,
            scripts: PortalScripts::new(),
        })
    }

    /// `HGETALL` of each key, in one round trip.
    async fn hashes(&self, keys: &[String]) -> Result<Vec<HashMap<String, String>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.hgetall(key);
        }
        self.redis.inner.query(&pipe).await
    }

    /// The network's record and counts, if it exists.
    async fn read_network(&self, id: &str) -> Result<Option<Network>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.hgetall(keys::network(id))
            .scard(keys::passphrases(id))
            .scard(keys::nodes(id));
        let (record, pending, nodes): (HashMap<String, String>, u64, u64) =
            self.redis.inner.query(&pipe).await?;
        if record.is_empty() {
            return Ok(None);
        }
        let what = format!("network:{id}");
        Ok(Some(Network {
            id: id.to_owned(),
            owner: field(&what, &record, "username")?.to_owned(),
            name: field(&what, &record, "name")?.to_owned(),
            created_ms: portal_time(&what, &record, "createdOn")?,
            reregistration: Reregistration::Owner,
            pending_passphrases: pending,
            nodes,
        }))
    }

    /// The node ids in a network's set.
    async fn members(&self, network: &str) -> Result<Vec<Uuid>, StoreError> {
        let (members,): (Vec<String>,) = self
            .redis
            .inner
            .query(redis::pipe().smembers(keys::nodes(network)))
            .await?;
        members
            .iter()
            .map(|m| {
                Uuid::try_parse(m).map_err(|_| {
                    StoreError::Corrupt(format!("{}: member {m:?}", keys::nodes(network)))
                })
            })
            .collect()
    }

    /// The nodes of `ids` that exist.
    async fn read_nodes(&self, ids: &[Uuid]) -> Result<Vec<Node>, StoreError> {
        let records = self
            .hashes(&ids.iter().map(|id| keys::node(*id)).collect::<Vec<_>>())
            .await?;
        ids.iter()
            .zip(records)
            .filter(|(_, record)| !record.is_empty())
            .map(|(id, record)| parse_node(*id, &record))
            .collect()
    }
}

impl PortalStore {
    /// The pending passphrases of `network` as typed, with their node names: what
    /// `registrar migrate` hashes into a native store. Never shown.
    pub async fn typed_passphrases(
        &self,
        network: &str,
    ) -> Result<Vec<(StoredPassphrase, String)>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.smembers(keys::passphrases(network))
            .hgetall(keys::passphrase_names(network));
        let (pending, mut names): (Vec<String>, HashMap<String, String>) =
            self.redis.inner.query(&pipe).await?;
        Ok(pending
            .into_iter()
            .filter_map(|p| {
                let name = names.remove(&p)?;
                Some((StoredPassphrase::Clear(p), name))
            })
            .collect())
    }
}

impl PortalStore {
    /// One try of a registration (see [`Inner::settle`]: the replay record answers a
    /// re-run after a try whose outcome was lost).
    async fn register_once(&self, op: &RegisterOp) -> Result<RegisterOutcome, StoreError> {
        let net = op.network.as_str();
        let passphrase = clear_passphrase(&op.passphrase)?;
        // A key in clear is bound to no id: whichever id the script picks, one value.
        let enc_key = clear_key(&op.fresh_node_key)?;
        if let Some(requested) = &op.requested_node_key
            && clear_key(requested)? != enc_key
        {
            return Err(StoreError::Corrupt(
                "two different node keys in clear offered for one registration".into(),
            ));
        }
        for _ in 0..STALE_RETRIES {
            // The network the requested node is in now, for the set it leaves: a
            // script may only touch the keys it declares.
            let read_network = match op.requested_id {
                Some(id) => {
                    let (network,): (Option<String>,) = self
                        .redis
                        .inner
                        .query(redis::pipe().hget(keys::node(id), "networkId"))
                        .await?;
                    network.unwrap_or_default()
                }
                None => String::new(),
            };
            let mut script_keys = vec![
                keys::network(net),
                keys::passphrases(net),
                keys::passphrase_names(net),
                keys::nodes(net),
                keys::replay(net, &op.replay_key.0),
                keys::node(op.fresh_id),
            ];
            if let Some(id) = op.requested_id {
                script_keys.push(keys::node(id));
                if !read_network.is_empty() && read_network != net {
                    script_keys.push(keys::nodes(&read_network));
                }
            }
            let args = [
                op.network.clone(),
                passphrase.to_owned(),
                op.now_ms.to_string(),
                op.replay_ttl_ms.to_string(),
                op.fresh_id.hyphenated().to_string(),
                op.requested_id
                    .map(|id| id.hyphenated().to_string())
                    .unwrap_or_default(),
                enc_key.clone(),
                op.node_type.to_owned(),
                portal_arch(op.arch).to_owned(),
                read_network,
            ];
            let reply = self
                .redis
                .inner
                .run(&self.scripts.register, &script_keys, &args)
                .await?;
            let id = || {
                reply
                    .get(1)
                    .and_then(|s| Uuid::try_parse(s).ok())
                    .ok_or_else(|| unexpected("portal/register", &reply))
            };
            return match tag(&reply) {
                "stale" => continue,
                "invalid" => Ok(RegisterOutcome::InvalidPassphrase),
                "created" => Ok(RegisterOutcome::Created { node_id: id()? }),
                "reregistered" => Ok(RegisterOutcome::Reregistered { node_id: id()? }),
                "replayed" => Ok(RegisterOutcome::Replayed { node_id: id()? }),
                _ => Err(unexpected("portal/register", &reply)),
            };
        }
        Err(StoreError::Corrupt(format!(
            "register in network {net:?}: the requested node kept moving between networks"
        )))
    }
}

impl Stores for PortalStore {
    fn describe(&self) -> String {
        format!("ota+{}", self.redis.inner.url)
    }
}

impl IjamStore for PortalStore {
    fn at_rest(&self) -> AtRest {
        AtRest::Clear
    }

    async fn import_node(&self, node: Node) -> Result<bool, StoreError> {
        Err(StoreError::Unsupported(format!(
            "node {}: the portal's layout takes nodes only from registrations; \
             migrate into a native store instead",
            node.id
        )))
    }

    async fn create_network(
        &self,
        id: &str,
        owner: &str,
        name: &str,
        reregistration: Reregistration,
        now_ms: i64,
    ) -> Result<Network, StoreError> {
        if reregistration != Reregistration::Owner {
            return Err(StoreError::Unsupported(NO_MINTED_RULE.into()));
        }
        let reply = self
            .redis
            .inner
            .run(
                &self.scripts.create_network,
                &[keys::network(id), keys::user_networks(owner)],
                &[
                    id.to_owned(),
                    name.to_owned(),
                    now_ms.to_string(),
                    owner.to_owned(),
                ],
            )
            .await?;
        match tag(&reply) {
            "ok" => Ok(Network {
                id: id.to_owned(),
                owner: owner.to_owned(),
                name: name.to_owned(),
                created_ms: now_ms,
                reregistration,
                pending_passphrases: 0,
                nodes: 0,
            }),
            "exists" => Err(StoreError::NetworkExists(id.to_owned())),
            _ => Err(unexpected("portal/create_network", &reply)),
        }
    }

    async fn network(&self, id: &str) -> Result<Option<Network>, StoreError> {
        self.read_network(id).await
    }

    async fn set_reregistration(
        &self,
        id: &str,
        reregistration: Reregistration,
    ) -> Result<Network, StoreError> {
        if reregistration != Reregistration::Owner {
            return Err(StoreError::Unsupported(NO_MINTED_RULE.into()));
        }
        // Already the rule of every network here: nothing to write.
        self.read_network(id)
            .await?
            .ok_or_else(|| StoreError::UnknownNetwork(id.to_owned()))
    }

    async fn networks(&self) -> Result<Vec<Network>, StoreError> {
        let mut ids: Vec<String> = self
            .redis
            .inner
            .scan(keys::NETWORKS)
            .await?
            .into_iter()
            .filter(|key| !keys::NETWORK_PARTS.iter().any(|part| key.ends_with(part)))
            .filter_map(|key| key.strip_prefix("network:").map(str::to_owned))
            .collect();
        ids.sort();
        let mut networks = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(network) = self.read_network(&id).await? {
                networks.push(network);
            }
        }
        Ok(networks)
    }

    async fn delete_network(&self, id: &str) -> Result<u64, StoreError> {
        let Some(network) = self.read_network(id).await? else {
            return Err(StoreError::UnknownNetwork(id.to_owned()));
        };
        // Nodes registering meanwhile change the members: read them again.
        let (deleted, members) = loop {
            let members = self.members(id).await?;
            let mut script_keys = vec![
                keys::network(id),
                keys::passphrases(id),
                keys::passphrase_names(id),
                keys::nodes(id),
                keys::user_networks(&network.owner),
            ];
            script_keys.extend(members.iter().map(|m| keys::node(*m)));
            let mut args = vec![id.to_owned()];
            args.extend(members.iter().map(|m| m.hyphenated().to_string()));
            let reply = self
                .redis
                .inner
                .run(&self.scripts.delete_network, &script_keys, &args)
                .await?;
            match (tag(&reply), reply.get(1)) {
                ("ok", Some(count)) => {
                    let count = count
                        .parse::<u64>()
                        .map_err(|_| unexpected("portal/delete_network", &reply))?;
                    break (count, members);
                }
                ("changed", _) => continue,
                ("unknown", _) => return Err(StoreError::UnknownNetwork(id.to_owned())),
                _ => return Err(unexpected("portal/delete_network", &reply)),
            }
        };
        // Registrar's own keys of the network and of its members.
        let mut own = self.redis.inner.scan(&keys::replays(id)).await?;
        own.extend(members.iter().map(|m| keys::last_state(*m)));
        if !own.is_empty() {
            self.redis
                .inner
                .query::<()>(redis::pipe().del(own).ignore())
                .await?;
        }
        Ok(deleted)
    }

    async fn add_passphrases(
        &self,
        network: &str,
        batch: Vec<NewPassphrase>,
        _now_ms: i64,
    ) -> Result<(), StoreError> {
        if batch.iter().any(|p| p.expires_ms.is_some()) {
            return Err(StoreError::Unsupported(
                "the portal's layout keeps no passphrase expiry: add them without one, \
                 or migrate to a native store"
                    .into(),
            ));
        }
        if batch.iter().any(|p| p.for_node.is_some()) {
            return Err(StoreError::Unsupported(
                "the portal's layout keeps no node a passphrase is minted for: every \
                 passphrase there may register or re-register any of the owner's nodes; \
                 add it without --for-node, or migrate to a native store"
                    .into(),
            ));
        }
        let mut args = Vec::with_capacity(2 * batch.len());
        for p in &batch {
            args.push(clear_passphrase(&p.passphrase)?.to_owned());
            args.push(p.node_name.clone());
        }
        let script_keys = [
            keys::network(network),
            keys::passphrases(network),
            keys::passphrase_names(network),
        ];
        let reply = self
            .redis
            .inner
            .run(&self.scripts.add_passphrases, &script_keys, &args)
            .await?;
        passphrases_added("portal/add_passphrases", &reply, network)
    }

    async fn passphrases(&self, network: &str) -> Result<Vec<PendingPassphrase>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.exists(keys::network(network))
            .smembers(keys::passphrases(network))
            .hgetall(keys::passphrase_names(network));
        let (exists, pending, names): (bool, Vec<String>, HashMap<String, String>) =
            self.redis.inner.query(&pipe).await?;
        if !exists {
            return Err(StoreError::UnknownNetwork(network.to_owned()));
        }
        // The portal registers only a passphrase that is both in the set and named.
        let mut list: Vec<PendingPassphrase> = pending
            .iter()
            .filter_map(|p| names.get(p))
            .map(|name| PendingPassphrase {
                node_name: name.clone(),
                created_ms: 0,
                expires_ms: None,
                for_node: None,
            })
            .collect();
        list.sort_by(|a, b| a.node_name.cmp(&b.node_name));
        Ok(list)
    }

    async fn revoke_passphrase(&self, network: &str, node_name: &str) -> Result<(), StoreError> {
        let script_keys = [
            keys::network(network),
            keys::passphrases(network),
            keys::passphrase_names(network),
        ];
        let reply = self
            .redis
            .inner
            .run(
                &self.scripts.revoke_passphrase,
                &script_keys,
                &[node_name.to_owned()],
            )
            .await?;
        passphrase_revoked("portal/revoke_passphrase", &reply, network, node_name)
    }

    async fn register(&self, op: RegisterOp) -> Result<RegisterOutcome, StoreError> {
        self.redis
            .inner
            .settle(settle_within(op.replay_ttl_ms), || self.register_once(&op))
            .await
    }

    async fn node(&self, id: Uuid) -> Result<Option<Node>, StoreError> {
        Ok(self.read_nodes(&[id]).await?.pop())
    }

    async fn nodes(&self, network: Option<&str>) -> Result<Vec<Node>, StoreError> {
        let mut nodes = match network {
            Some(net) => {
                if self.read_network(net).await?.is_none() {
                    return Err(StoreError::UnknownNetwork(net.to_owned()));
                }
                let mut nodes = self.read_nodes(&self.members(net).await?).await?;
                // A node that moved stays in its old set under the portal's servers.
                nodes.retain(|n| n.network == net);
                nodes
            }
            None => {
                let ids = self
                    .redis
                    .inner
                    .scan(keys::NODES)
                    .await?
                    .iter()
                    .filter_map(|key| key.strip_prefix("node:"))
                    .map(|id| {
                        Uuid::try_parse(id)
                            .map_err(|_| StoreError::Corrupt(format!("node key node:{id}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.read_nodes(&ids).await?
            }
        };
        nodes.sort_by_key(|n| (n.created_ms, n.id));
        Ok(nodes)
    }

    async fn transition(
        &self,
        id: Uuid,
        target: NodeStatus,
        ip: &str,
        now_ms: i64,
        frame: StateFrameDigest,
    ) -> Result<TransitionOutcome, StoreError> {
        let mut args = vec![
            target.as_str().to_owned(),
            ip.to_owned(),
            now_ms.to_string(),
            (now_ms - REGISTRATION_EXPIRY_MS).to_string(),
            hex::encode(frame.0),
            LAST_STATE_TTL_MS.to_string(),
        ];
        args.extend(
            target
                .allowed_origins()
                .iter()
                .map(|s| s.as_str().to_owned()),
        );
        let script_keys = [keys::node(id), keys::last_state(id)];
        // A re-run after a lost outcome meets its own frame: 'repeated', nothing more.
        let reply = self
            .redis
            .inner
            .settle(SETTLE_WITHIN, || {
                self.redis
                    .inner
                    .run(&self.scripts.transition, &script_keys, &args)
            })
            .await?;
        transitioned("portal/transition", &reply, id)
    }

    async fn revoke_node(&self, id: Uuid) -> Result<(), StoreError> {
        let reply = self
            .redis
            .inner
            .run(&self.scripts.revoke_node, &[keys::node(id)], &[])
            .await?;
        match tag(&reply) {
            "ok" => Ok(()),
            "unknown" => Err(StoreError::UnknownNode(id)),
            _ => Err(unexpected("portal/revoke_node", &reply)),
        }
    }

    /// Nothing is sealed here: the portal keeps node keys in clear.
    async fn legacy_sealed_keys(&self) -> Result<Vec<(Uuid, SealedNodeKey)>, StoreError> {
        Ok(Vec::new())
    }

    async fn replace_sealed_key(
        &self,
        _id: Uuid,
        _current: &SealedNodeKey,
        _new: &SealedNodeKey,
    ) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// The pubkey flow has no place in the portal's layout: its native keys, same Redis.
impl PubkeyStore for PortalStore {
    async fn register_device(
        &self,
        id: DeviceId,
        public_key: &[u8],
        now_ms: i64,
    ) -> Result<DeviceRegisterOutcome, StoreError> {
        self.redis.register_device(id, public_key, now_ms).await
    }

    async fn device(&self, id: DeviceId) -> Result<Option<Device>, StoreError> {
        self.redis.device(id).await
    }

    async fn devices(&self) -> Result<Vec<Device>, StoreError> {
        self.redis.devices().await
    }

    async fn attest_device(&self, op: AttestOp) -> Result<AttestOutcome, StoreError> {
        self.redis.attest_device(op).await
    }

    async fn revoke_device(&self, id: DeviceId, now_ms: i64) -> Result<(), StoreError> {
        self.redis.revoke_device(id, now_ms).await
    }
}

/// The passphrase as typed: what this layout keeps.
fn clear_passphrase(p: &StoredPassphrase) -> Result<&str, StoreError> {
    match p {
        StoredPassphrase::Clear(text) => Ok(text),
        StoredPassphrase::Hash(_) => Err(StoreError::Corrupt(
            "a hashed passphrase offered to the portal's layout, which keeps them as typed".into(),
        )),
    }
}

/// The node key in hex, as `encKey` holds it: what this layout keeps.
fn clear_key(key: &StoredNodeKey) -> Result<String, StoreError> {
    match key {
        StoredNodeKey::Clear(key) => Ok(hex::encode(key.0)),
        _ => Err(StoreError::Corrupt(
            "a protected node key offered to the portal's layout, which keeps keys in clear".into(),
        )),
    }
}

/// The portal spells the ESP32 `esp_32`; every other architecture as Registrar does.
fn portal_arch(arch: &str) -> &str {
    match arch {
        "esp32" => "esp_32",
        other => other,
    }
}

fn registrar_arch(arch: &str) -> &str {
    match arch {
        "esp_32" => "esp32",
        other => other,
    }
}

/// A time field the portal wrote with `Date.now()`: integer milliseconds.
fn portal_time(
    what: &str,
    record: &HashMap<String, String>,
    name: &str,
) -> Result<i64, StoreError> {
    let raw = field(what, record, name)?;
    raw.parse()
        .map_err(|_| StoreError::Corrupt(format!("{what}: {name} is {raw:?}, not milliseconds")))
}

fn parse_node(id: Uuid, record: &HashMap<String, String>) -> Result<Node, StoreError> {
    let what = format!("node:{id}");
    let status = field(&what, record, "status")?;
    let enc_key = field(&what, record, "encKey")?;
    let key = if enc_key.is_empty() {
        StoredNodeKey::None
    } else {
        let bytes: [u8; 32] = hex::decode(enc_key)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| StoreError::Corrupt(format!("{what}: encKey is not 32 bytes in hex")))?;
        StoredNodeKey::Clear(NodeKey(bytes))
    };
    Ok(Node {
        id,
        network: field(&what, record, "networkId")?.to_owned(),
        owner: field(&what, record, "username")?.to_owned(),
        name: field(&what, record, "name")?.to_owned(),
        node_type: field(&what, record, "type")?.to_owned(),
        arch: registrar_arch(field(&what, record, "arch")?).to_owned(),
        status: NodeStatus::parse(status)
            .ok_or_else(|| StoreError::Corrupt(format!("{what}: status {status:?}")))?,
        key,
        ip: field(&what, record, "ip")?.to_owned(),
        created_ms: portal_time(&what, record, "createdOn")?,
        registered_ms: portal_time(&what, record, "lastRegisteredOn")?,
        online_ms: portal_time(&what, record, "lastOnlineOn")?,
    })
}
