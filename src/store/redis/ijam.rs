//! The ijam flow on Redis. Every script runs in the slot of the network's owner
//! ([`keys::Owner`]); the network and node indexes lead there from a network id or a
//! node id. The indexes never change while what they point at lives, so a listener
//! remembers what it read of them ([`Caches`]); a script that finds nothing where a
//! remembered entry led says so, and the entry is read again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use super::keys::{self, Owner};
use super::{RedisStore, SETTLE_WITHIN, field, int_field, tag, unexpected};
use crate::store::StoreError;
use crate::store::ijam::{
    IjamStore, Network, NewPassphrase, Node, NodeStatus, PendingPassphrase, RegisterOp,
    RegisterOutcome, Reregistration, SealedNodeKey, StateFrameDigest, TransitionOutcome,
    protected_key, protected_passphrase, sealed_key,
};

/// Records read per round trip by a listing that reads every node.
const LISTING_CHUNK: usize = 1000;

/// Index entries remembered per listener, at most this many of each (a forgotten one
/// costs one read).
const CACHE_CAPACITY: usize = 65_536;

/// What a listener remembers of the network and node indexes.
#[derive(Default)]
pub(super) struct Caches {
    network_owners: Mutex<HashMap<String, Arc<str>>>,
    node_owners: Mutex<HashMap<Uuid, Arc<str>>>,
}

fn remember<K: std::hash::Hash + Eq + Clone>(
    map: &Mutex<HashMap<K, Arc<str>>>,
    key: K,
    owner: Arc<str>,
) {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= CACHE_CAPACITY
        && !map.contains_key(&key)
        && let Some(old) = map.keys().next().cloned()
    {
        map.remove(&old);
    }
    map.insert(key, owner);
}

fn forget<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, Arc<str>>>, key: &K) {
    map.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
}

fn recall<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, Arc<str>>>, key: &K) -> Option<Arc<str>> {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(key)
        .cloned()
}

/// Where the node index puts a requested node id, as `register.lua` takes it.
fn indexed(owner: &str, found: Option<&str>) -> &'static str {
    match found {
        Some(o) if o == owner => "mine",
        Some(_) => "other",
        None => "none",
    }
}

impl RedisStore {
    /// The owner of `network` from the index; `fresh` skips what this listener
    /// remembers.
    async fn network_owner(
        &self,
        network: &str,
        fresh: bool,
    ) -> Result<Option<Arc<str>>, StoreError> {
        let cache = &self.ijam.network_owners;
        if !fresh && let Some(owner) = recall(cache, &network.to_owned()) {
            return Ok(Some(owner));
        }
        let (owner,): (Option<String>,) = self
            .inner
            .query(redis::pipe().get(keys::network_owner(network)))
            .await?;
        Ok(owner.map(|owner| {
            let owner: Arc<str> = owner.into();
            remember(cache, network.to_owned(), Arc::clone(&owner));
            owner
        }))
    }

    /// The owner of node `id` from the index (see [`RedisStore::network_owner`]).
    async fn node_owner(&self, id: Uuid, fresh: bool) -> Result<Option<Arc<str>>, StoreError> {
        let cache = &self.ijam.node_owners;
        if !fresh && let Some(owner) = recall(cache, &id) {
            return Ok(Some(owner));
        }
        let (owner,): (Option<String>,) = self
            .inner
            .query(redis::pipe().get(keys::node_owner(id)))
            .await?;
        Ok(owner.map(|owner| {
            let owner: Arc<str> = owner.into();
            remember(cache, id, Arc::clone(&owner));
            owner
        }))
    }

    /// Claims `key` for `owner` (SET NX); returns the owner it belongs to afterwards.
    async fn claim(&self, key: String, owner: &str) -> Result<String, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&key)
            .arg(owner)
            .arg("NX")
            .ignore()
            .get(&key);
        let (held,): (Option<String>,) = self.inner.query(&pipe).await?;
        held.ok_or_else(|| StoreError::Corrupt(format!("{key} vanished right after its claim")))
    }

    /// Reads the records of `ids` in `owner`'s slot, skipping ids whose record is gone.
    async fn read_nodes(&self, owner: &str, ids: &[Uuid]) -> Result<Vec<Node>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hgetall(Owner(owner).node(*id));
        }
        let records: Vec<HashMap<String, String>> = self.inner.query(&pipe).await?;
        let mut nodes = Vec::with_capacity(ids.len());
        for (id, record) in ids.iter().zip(records) {
            if !record.is_empty() {
                nodes.push(parse_node(*id, &record)?);
            }
        }
        Ok(nodes)
    }

    /// The node ids of `network` in `owner`'s slot.
    async fn members(&self, owner: &str, network: &str) -> Result<Vec<(String, Uuid)>, StoreError> {
        let (from, to) = keys::network_members(network);
        let (members,): (Vec<String>,) = self
            .inner
            .query(redis::pipe().zrangebylex(Owner(owner).nodes(), from, to))
            .await?;
        members.iter().map(|m| parse_member(m)).collect()
    }

    /// Every network id, from the network index.
    async fn network_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self
            .inner
            .scan(keys::NETWORK_OWNERS)
            .await?
            .iter()
            .filter_map(|key| {
                key.strip_prefix("rg:{net:")
                    .and_then(|rest| rest.strip_suffix('}'))
                    .map(str::to_owned)
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The network's record and counts, if its owner's slot has it.
    async fn read_network(&self, id: &str, owner: &str) -> Result<Option<Network>, StoreError> {
        let slot = Owner(owner);
        let (from, to) = keys::network_members(id);
        let mut pipe = redis::pipe();
        pipe.hgetall(slot.network(id))
            .hlen(slot.passphrases(id))
            .zlexcount(slot.nodes(), from, to);
        let (record, pending, nodes): (HashMap<String, String>, u64, u64) =
            self.inner.query(&pipe).await?;
        if record.is_empty() {
            return Ok(None);
        }
        parse_network(id, owner, &record, pending, nodes).map(Some)
    }
}

impl RedisStore {
    /// One try of a registration: the script, and the node index around it. Every
    /// answer after the script may have written counts as unknown when it fails, so
    /// [`Inner::settle`] runs it again (the replay record answers the second time).
    async fn register_once(&self, op: &RegisterOp) -> Result<RegisterOutcome, StoreError> {
        let net = op.network.as_str();
        // At most: a stale remembered owner, then a claim of the requested id.
        let mut fresh_lookup = false;
        let mut claimed: Option<String> = None;
        for _ in 0..3 {
            let Some(owner) = self.network_owner(net, fresh_lookup).await? else {
                return Ok(RegisterOutcome::InvalidPassphrase);
            };
            let slot = Owner(&owner);
            let requested = match (op.requested_id, &claimed) {
                (None, _) => "",
                (Some(_), Some(holder)) => indexed(&owner, Some(holder.as_str())),
                (Some(id), None) => indexed(&owner, self.node_owner(id, false).await?.as_deref()),
            };
            let mut script_keys = vec![
                slot.network(net),
                slot.passphrases(net),
                slot.passphrase_names(net),
                slot.nodes(),
                slot.replay(net, &op.replay_key.0),
                slot.node(op.fresh_id),
            ];
            if let Some(id) = op.requested_id {
                script_keys.push(slot.node(id));
                script_keys.push(slot.minted_networks());
            }
            let args = [
                op.network.clone(),
                hex::encode(protected_passphrase(&op.passphrase)?.0),
                op.now_ms.to_string(),
                op.replay_ttl_ms.to_string(),
                op.fresh_id.hyphenated().to_string(),
                op.requested_id
                    .map(|id| id.hyphenated().to_string())
                    .unwrap_or_default(),
                hex::encode(protected_key(&op.fresh_node_key)?),
                match op.requested_id {
                    Some(id) => hex::encode(protected_key(op.node_key_for(id)?)?),
                    None => String::new(),
                },
                op.node_type.to_owned(),
                op.arch.to_owned(),
                owner.to_string(),
                requested.to_owned(),
            ];
            // The node index of the fresh id goes in the same round trip: it is what
            // almost every registration makes, and the other outcomes take it back.
            let fresh_index = keys::node_owner(op.fresh_id);
            let reply = self
                .inner
                .run_then(&self.scripts.register, &script_keys, &args, |pipe| {
                    pipe.cmd("SET")
                        .arg(&fresh_index)
                        .arg(&*owner)
                        .arg("NX")
                        .ignore();
                })
                .await?;
            let id = || {
                reply
                    .get(1)
                    .and_then(|s| Uuid::try_parse(s).ok())
                    .ok_or_else(|| unexpected("register", &reply))
            };
            let made_fresh = tag(&reply) == "created" && id().ok() == Some(op.fresh_id);
            if !made_fresh {
                self.inner
                    .query::<()>(redis::pipe().del(&fresh_index).ignore())
                    .await
                    .map_err(unknown_after_write)?;
            }
            let outcome = match tag(&reply) {
                "no_network" if !fresh_lookup => {
                    forget(&self.ijam.network_owners, &op.network);
                    fresh_lookup = true;
                    continue;
                }
                "no_network" | "invalid" => return Ok(RegisterOutcome::InvalidPassphrase),
                "claim" => {
                    let id = op
                        .requested_id
                        .ok_or_else(|| unexpected("register", &reply))?;
                    claimed = Some(self.claim(keys::node_owner(id), &owner).await?);
                    continue;
                }
                "created" => RegisterOutcome::Created { node_id: id()? },
                "reregistered" => RegisterOutcome::Reregistered { node_id: id()? },
                "replayed" => RegisterOutcome::Replayed { node_id: id()? },
                _ => return Err(unexpected("register", &reply)),
            };
            // The node index leads state requests to the owner's slot: a fresh id's
            // was set with the script; a requested id was found or claimed under this
            // owner; after a replay it is set again, in case the first answer died
            // before setting it.
            let node_id = outcome_node(outcome);
            if !made_fresh {
                self.inner
                    .query::<()>(
                        redis::pipe()
                            .cmd("SET")
                            .arg(keys::node_owner(node_id))
                            .arg(&*owner)
                            .arg("NX")
                            .ignore(),
                    )
                    .await
                    .map_err(unknown_after_write)?;
            }
            remember(&self.ijam.node_owners, node_id, owner);
            return Ok(outcome);
        }
        Err(StoreError::Corrupt(format!(
            "register in network {net:?}: the network and node indexes kept changing"
        )))
    }
}

impl IjamStore for RedisStore {
    async fn create_network(
        &self,
        id: &str,
        owner: &str,
        name: &str,
        reregistration: Reregistration,
        now_ms: i64,
    ) -> Result<Network, StoreError> {
        // The id is claimed across owners first; a claim left by a create that died
        // halfway is the same owner's, and this create finishes it.
        let holder = self.claim(keys::network_owner(id), owner).await?;
        if holder != owner {
            return Err(StoreError::NetworkExists(id.to_owned()));
        }
        let reply = self
            .inner
            .run(
                &self.scripts.create_network,
                &[Owner(owner).network(id), Owner(owner).minted_networks()],
                &[
                    name.to_owned(),
                    now_ms.to_string(),
                    reregistration.as_str().to_owned(),
                    id.to_owned(),
                ],
            )
            .await?;
        match tag(&reply) {
            "ok" => {
                remember(&self.ijam.network_owners, id.to_owned(), owner.into());
                Ok(Network {
                    id: id.to_owned(),
                    owner: owner.to_owned(),
                    name: name.to_owned(),
                    created_ms: now_ms,
                    reregistration,
                    pending_passphrases: 0,
                    nodes: 0,
                })
            }
            "exists" => Err(StoreError::NetworkExists(id.to_owned())),
            _ => Err(unexpected("create_network", &reply)),
        }
    }

    async fn set_reregistration(
        &self,
        id: &str,
        reregistration: Reregistration,
    ) -> Result<Network, StoreError> {
        let unknown = || StoreError::UnknownNetwork(id.to_owned());
        let owner = self.network_owner(id, true).await?.ok_or_else(unknown)?;
        let reply = self
            .inner
            .run(
                &self.scripts.set_reregistration,
                &[Owner(&owner).network(id), Owner(&owner).minted_networks()],
                &[reregistration.as_str().to_owned(), id.to_owned()],
            )
            .await?;
        match tag(&reply) {
            "ok" => self.read_network(id, &owner).await?.ok_or_else(unknown),
            "unknown" => Err(unknown()),
            _ => Err(unexpected("set_reregistration", &reply)),
        }
    }

    async fn network(&self, id: &str) -> Result<Option<Network>, StoreError> {
        match self.network_owner(id, true).await? {
            Some(owner) => self.read_network(id, &owner).await,
            None => Ok(None),
        }
    }

    async fn networks(&self) -> Result<Vec<Network>, StoreError> {
        let mut networks = Vec::new();
        for id in self.network_ids().await? {
            if let Some(owner) = self.network_owner(&id, true).await?
                && let Some(network) = self.read_network(&id, &owner).await?
            {
                networks.push(network);
            }
        }
        Ok(networks)
    }

    async fn delete_network(&self, id: &str) -> Result<u64, StoreError> {
        let Some(owner) = self.network_owner(id, true).await? else {
            return Err(StoreError::UnknownNetwork(id.to_owned()));
        };
        let slot = Owner(&owner);
        let (from, to) = keys::network_members(id);
        // Nodes registering meanwhile change the members: read them again.
        let members = loop {
            let members = self.members(&owner, id).await?;
            let mut script_keys = vec![
                slot.network(id),
                slot.passphrases(id),
                slot.passphrase_names(id),
                slot.nodes(),
            ];
            script_keys.extend(members.iter().map(|(_, node)| slot.node(*node)));
            let mut args = vec![from.clone(), to.clone()];
            args.extend(
                members
                    .iter()
                    .map(|(net, node)| keys::node_member(net, *node)),
            );
            let reply = self
                .inner
                .run(&self.scripts.delete_network, &script_keys, &args)
                .await?;
            match tag(&reply) {
                "ok" => break members,
                "changed" => continue,
                "unknown" => {
                    // A claim whose create died halfway: nothing to keep it for.
                    self.inner
                        .query::<()>(redis::pipe().del(keys::network_owner(id)).ignore())
                        .await?;
                    forget(&self.ijam.network_owners, &id.to_owned());
                    return Err(StoreError::UnknownNetwork(id.to_owned()));
                }
                _ => return Err(unexpected("delete_network", &reply)),
            }
        };
        // The indexes and the replay records, outside the owner's slot or found by
        // pattern: a retry of a registration finds no network, as register.lua
        // checks it first.
        let replays = self.inner.scan(&slot.replays(id)).await?;
        let mut pipe = redis::pipe();
        for (_, node) in &members {
            pipe.del(keys::node_owner(*node)).ignore();
            forget(&self.ijam.node_owners, node);
        }
        if !replays.is_empty() {
            pipe.del(replays).ignore();
        }
        pipe.del(keys::network_owner(id)).ignore();
        // Harmless if left (no node is in a deleted network; a network made again
        // under the id sets its own entry), but not kept for nothing.
        pipe.srem(slot.minted_networks(), id).ignore();
        self.inner.query::<()>(&pipe).await?;
        forget(&self.ijam.network_owners, &id.to_owned());
        Ok(members.len() as u64)
    }

    async fn import_node(&self, node: Node) -> Result<bool, StoreError> {
        let Some(owner) = self.network_owner(&node.network, true).await? else {
            return Err(StoreError::UnknownNetwork(node.network));
        };
        if self.claim(keys::node_owner(node.id), &owner).await? != *owner {
            return Ok(false);
        }
        let slot = Owner(&owner);
        let mut args = vec![node.network.clone(), node.id.hyphenated().to_string()];
        for (field, value) in [
            ("network", node.network.clone()),
            ("owner", owner.to_string()),
            ("name", node.name.clone()),
            ("type", node.node_type.clone()),
            ("arch", node.arch.clone()),
            ("status", node.status.as_str().to_owned()),
            ("key", hex::encode(protected_key(&node.key)?)),
            ("ip", node.ip.clone()),
            ("created_ms", node.created_ms.to_string()),
            ("registered_ms", node.registered_ms.to_string()),
            ("online_ms", node.online_ms.to_string()),
        ] {
            args.push(field.to_owned());
            args.push(value);
        }
        let script_keys = [
            slot.network(&node.network),
            slot.nodes(),
            slot.node(node.id),
        ];
        let reply = self
            .inner
            .run(&self.scripts.import_node, &script_keys, &args)
            .await?;
        match tag(&reply) {
            "ok" => Ok(true),
            "exists" => Ok(false),
            "unknown_network" => Err(StoreError::UnknownNetwork(node.network)),
            _ => Err(unexpected("import_node", &reply)),
        }
    }

    async fn add_passphrases(
        &self,
        network: &str,
        batch: Vec<NewPassphrase>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let Some(owner) = self.network_owner(network, true).await? else {
            return Err(StoreError::UnknownNetwork(network.to_owned()));
        };
        let slot = Owner(&owner);
        let mut args = Vec::with_capacity(2 + 4 * batch.len());
        args.push(now_ms.to_string());
        args.push(network.to_owned());
        for p in &batch {
            args.push(hex::encode(protected_passphrase(&p.passphrase)?.0));
            args.push(p.expires_ms.map(|e| e.to_string()).unwrap_or_default());
            args.push(
                p.for_node
                    .map(|node| node.hyphenated().to_string())
                    .unwrap_or_default(),
            );
            args.push(p.node_name.clone());
        }
        let script_keys = [
            slot.network(network),
            slot.passphrases(network),
            slot.passphrase_names(network),
            slot.nodes(),
        ];
        let reply = self
            .inner
            .run(&self.scripts.add_passphrases, &script_keys, &args)
            .await?;
        passphrases_added("add_passphrases", &reply, network)
    }

    async fn passphrases(&self, network: &str) -> Result<Vec<PendingPassphrase>, StoreError> {
        let unknown = || StoreError::UnknownNetwork(network.to_owned());
        let owner = self
            .network_owner(network, true)
            .await?
            .ok_or_else(unknown)?;
        let slot = Owner(&owner);
        let mut pipe = redis::pipe();
        pipe.exists(slot.network(network))
            .hvals(slot.passphrases(network));
        let (exists, entries): (bool, Vec<String>) = self.inner.query(&pipe).await?;
        if !exists {
            return Err(unknown());
        }
        let mut list = entries
            .iter()
            .map(|e| parse_passphrase(network, e))
            .collect::<Result<Vec<_>, _>>()?;
        list.sort_by(|a, b| (a.created_ms, &a.node_name).cmp(&(b.created_ms, &b.node_name)));
        Ok(list)
    }

    async fn revoke_passphrase(&self, network: &str, node_name: &str) -> Result<(), StoreError> {
        let Some(owner) = self.network_owner(network, true).await? else {
            return Err(StoreError::UnknownNetwork(network.to_owned()));
        };
        let slot = Owner(&owner);
        let script_keys = [
            slot.network(network),
            slot.passphrases(network),
            slot.passphrase_names(network),
        ];
        let reply = self
            .inner
            .run(
                &self.scripts.revoke_passphrase,
                &script_keys,
                &[node_name.to_owned()],
            )
            .await?;
        passphrase_revoked("revoke_passphrase", &reply, network, node_name)
    }

    async fn register(&self, op: RegisterOp) -> Result<RegisterOutcome, StoreError> {
        self.inner
            .settle(settle_within(op.replay_ttl_ms), || self.register_once(&op))
            .await
    }

    async fn node(&self, id: Uuid) -> Result<Option<Node>, StoreError> {
        let Some(owner) = self.node_owner(id, false).await? else {
            return Ok(None);
        };
        let found = self.read_nodes(&owner, &[id]).await?.pop();
        if found.is_none() {
            forget(&self.ijam.node_owners, &id);
        }
        Ok(found)
    }

    async fn nodes(&self, network: Option<&str>) -> Result<Vec<Node>, StoreError> {
        let networks = match network {
            Some(net) => {
                if self.network(net).await?.is_none() {
                    return Err(StoreError::UnknownNetwork(net.to_owned()));
                }
                vec![net.to_owned()]
            }
            None => self.network_ids().await?,
        };
        let mut nodes = Vec::new();
        for net in networks {
            if let Some(owner) = self.network_owner(&net, true).await? {
                let ids: Vec<Uuid> = self
                    .members(&owner, &net)
                    .await?
                    .into_iter()
                    .map(|(_, id)| id)
                    .collect();
                nodes.extend(self.read_nodes(&owner, &ids).await?);
            }
        }
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
        let Some(owner) = self.node_owner(id, false).await? else {
            return Ok(TransitionOutcome::UnknownNode);
        };
        let mut args = vec![
            target.as_str().to_owned(),
            if target == NodeStatus::Online {
                "1"
            } else {
                "0"
            }
            .to_owned(),
            ip.to_owned(),
            now_ms.to_string(),
            hex::encode(frame.0),
        ];
        args.extend(
            target
                .allowed_origins()
                .iter()
                .map(|s| s.as_str().to_owned()),
        );
        let script_keys = [Owner(&owner).node(id)];
        // A re-run after a lost outcome meets its own frame: 'repeated', nothing more.
        let reply = self
            .inner
            .settle(SETTLE_WITHIN, || {
                self.inner
                    .run(&self.scripts.transition, &script_keys, &args)
            })
            .await?;
        let outcome = transitioned("transition", &reply, id)?;
        if outcome == TransitionOutcome::UnknownNode {
            forget(&self.ijam.node_owners, &id);
        }
        Ok(outcome)
    }

    async fn revoke_node(&self, id: Uuid) -> Result<(), StoreError> {
        let Some(owner) = self.node_owner(id, true).await? else {
            return Err(StoreError::UnknownNode(id));
        };
        let reply = self
            .inner
            .run(&self.scripts.revoke_node, &[Owner(&owner).node(id)], &[])
            .await?;
        match tag(&reply) {
            "ok" => Ok(()),
            "unknown" => Err(StoreError::UnknownNode(id)),
            _ => Err(unexpected("revoke_node", &reply)),
        }
    }

    async fn legacy_sealed_keys(&self) -> Result<Vec<(Uuid, SealedNodeKey)>, StoreError> {
        let records: Vec<(String, Uuid)> = self
            .inner
            .scan(keys::NODE_RECORDS)
            .await?
            .into_iter()
            .filter_map(|key| keys::node_record_id(&key).map(|id| (key, id)))
            .collect();
        let mut legacy = Vec::new();
        for chunk in records.chunks(LISTING_CHUNK) {
            let mut pipe = redis::pipe();
            for (key, _) in chunk {
                pipe.hget(key, "key");
            }
            let values: Vec<Option<String>> = self.inner.query(&pipe).await?;
            for ((key, id), value) in chunk.iter().zip(values) {
                // None: deleted since the SCAN.
                let Some(value) = value else { continue };
                let sealed = SealedNodeKey(
                    hex::decode(&value)
                        .map_err(|_| StoreError::Corrupt(format!("{key}: key is not hex")))?,
                );
                if sealed.is_legacy() {
                    legacy.push((*id, sealed));
                }
            }
        }
        legacy.sort_by_key(|(id, _)| *id);
        Ok(legacy)
    }

    async fn replace_sealed_key(
        &self,
        id: Uuid,
        current: &SealedNodeKey,
        new: &SealedNodeKey,
    ) -> Result<bool, StoreError> {
        let Some(owner) = self.node_owner(id, true).await? else {
            return Ok(false);
        };
        let reply = self
            .inner
            .run(
                &self.scripts.replace_sealed_key,
                &[Owner(&owner).node(id)],
                &[hex::encode(&current.0), hex::encode(&new.0)],
            )
            .await?;
        match tag(&reply) {
            "replaced" => Ok(true),
            "changed" => Ok(false),
            _ => Err(unexpected("replace_sealed_key", &reply)),
        }
    }
}

/// The reply of an add_passphrases script (native and portal layouts alike).
pub(super) fn passphrases_added(
    script: &str,
    reply: &[String],
    network: &str,
) -> Result<(), StoreError> {
    match (tag(reply), reply.get(1)) {
        ("ok", _) => Ok(()),
        ("unknown_network", _) => Err(StoreError::UnknownNetwork(network.to_owned())),
        ("name_taken", Some(name)) => Err(StoreError::PassphraseNameTaken {
            network: network.to_owned(),
            node_name: name.clone(),
        }),
        ("passphrase_taken", _) => Err(StoreError::PassphraseTaken(network.to_owned())),
        ("not_in_network", Some(node)) => Err(StoreError::NodeNotInNetwork {
            network: network.to_owned(),
            node: Uuid::try_parse(node).map_err(|_| unexpected(script, reply))?,
        }),
        _ => Err(unexpected(script, reply)),
    }
}

/// The reply of a revoke_passphrase script.
pub(super) fn passphrase_revoked(
    script: &str,
    reply: &[String],
    network: &str,
    node_name: &str,
) -> Result<(), StoreError> {
    match tag(reply) {
        "ok" => Ok(()),
        "unknown_network" => Err(StoreError::UnknownNetwork(network.to_owned())),
        "unknown_name" => Err(StoreError::UnknownPassphraseName {
            network: network.to_owned(),
            node_name: node_name.to_owned(),
        }),
        _ => Err(unexpected(script, reply)),
    }
}

/// The reply of a transition script.
pub(super) fn transitioned(
    script: &str,
    reply: &[String],
    id: Uuid,
) -> Result<TransitionOutcome, StoreError> {
    let from = || {
        reply
            .get(1)
            .and_then(|s| NodeStatus::parse(s))
            .ok_or_else(|| StoreError::Corrupt(format!("node {id}: status {:?}", reply.get(1))))
    };
    match tag(reply) {
        "unknown" => Ok(TransitionOutcome::UnknownNode),
        "changed" => Ok(TransitionOutcome::Changed { from: from()? }),
        "not_allowed" => Ok(TransitionOutcome::NotAllowed { from: from()? }),
        "repeated" => Ok(TransitionOutcome::Repeated { status: from()? }),
        _ => Err(unexpected(script, reply)),
    }
}

/// How long a registration may re-run to learn whether it took effect: no longer
/// than its replay record surely lives (a re-run within it answers `replayed` if the
/// first try wrote), nor than [`SETTLE_WITHIN`].
pub(super) fn settle_within(replay_ttl_ms: i64) -> Duration {
    const MARGIN_MS: i64 = 100;
    let ttl = Duration::from_millis((replay_ttl_ms - MARGIN_MS).max(0) as u64);
    ttl.min(SETTLE_WITHIN)
}

/// A read or write after a script that may have written: failing, it leaves the
/// request's outcome unknown, never a plain "unavailable".
pub(super) fn unknown_after_write(e: StoreError) -> StoreError {
    match e {
        StoreError::Unavailable { url, cause } => StoreError::OutcomeUnknown { url, cause },
        other => other,
    }
}

fn outcome_node(outcome: RegisterOutcome) -> Uuid {
    match outcome {
        RegisterOutcome::Created { node_id }
        | RegisterOutcome::Reregistered { node_id }
        | RegisterOutcome::Replayed { node_id } => node_id,
        RegisterOutcome::InvalidPassphrase => unreachable!("no node to index"),
    }
}

/// `<network>\0<uuid>`, a member of [`Owner::nodes`].
fn parse_member(member: &str) -> Result<(String, Uuid), StoreError> {
    member
        .split_once('\0')
        .and_then(|(net, id)| Some((net.to_owned(), Uuid::try_parse(id).ok()?)))
        .ok_or_else(|| StoreError::Corrupt(format!("node member {member:?}")))
}

fn parse_network(
    id: &str,
    owner: &str,
    record: &HashMap<String, String>,
    pending_passphrases: u64,
    nodes: u64,
) -> Result<Network, StoreError> {
    let what = format!("network {id:?}");
    // A record from before the rules has none: the original's.
    let reregistration = match record.get("reregistration") {
        None => Reregistration::Owner,
        Some(rule) => Reregistration::parse(rule)
            .ok_or_else(|| StoreError::Corrupt(format!("{what}: re-registration rule {rule:?}")))?,
    };
    Ok(Network {
        id: id.to_owned(),
        owner: owner.to_owned(),
        name: field(&what, record, "name")?.to_owned(),
        created_ms: int_field(&what, record, "created_ms")?,
        reregistration,
        pending_passphrases,
        nodes,
    })
}

/// Parses `[for:<uuid>|]<created_ms>|<expires_ms or empty>|<node_name>`; the name may
/// hold `|`.
fn parse_passphrase(network: &str, entry: &str) -> Result<PendingPassphrase, StoreError> {
    let corrupt =
        || StoreError::Corrupt(format!("passphrase entry {entry:?} in network {network:?}"));
    let (for_node, rest) = match entry.strip_prefix("for:") {
        Some(minted) => {
            let (node, rest) = minted.split_once('|').ok_or_else(corrupt)?;
            (Some(Uuid::try_parse(node).map_err(|_| corrupt())?), rest)
        }
        None => (None, entry),
    };
    let mut parts = rest.splitn(3, '|');
    let (Some(created), Some(expires), Some(node_name)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(corrupt());
    };
    Ok(PendingPassphrase {
        node_name: node_name.to_owned(),
        created_ms: created.parse().map_err(|_| corrupt())?,
        expires_ms: match expires {
            "" => None,
            e => Some(e.parse().map_err(|_| corrupt())?),
        },
        for_node,
    })
}

fn parse_node(id: Uuid, record: &HashMap<String, String>) -> Result<Node, StoreError> {
    let what = format!("node {id}");
    let status = field(&what, record, "status")?;
    let key = field(&what, record, "key")?;
    Ok(Node {
        id,
        network: field(&what, record, "network")?.to_owned(),
        owner: field(&what, record, "owner")?.to_owned(),
        name: field(&what, record, "name")?.to_owned(),
        node_type: field(&what, record, "type")?.to_owned(),
        arch: field(&what, record, "arch")?.to_owned(),
        status: NodeStatus::parse(status)
            .ok_or_else(|| StoreError::Corrupt(format!("{what}: status {status:?}")))?,
        key: sealed_key(
            hex::decode(key).map_err(|_| StoreError::Corrupt(format!("{what}: key is not hex")))?,
        ),
        ip: field(&what, record, "ip")?.to_owned(),
        created_ms: int_field(&what, record, "created_ms")?,
        registered_ms: int_field(&what, record, "registered_ms")?,
        online_ms: int_field(&what, record, "online_ms")?,
    })
}
