//! The Redis store: the production store, shared by any number of stateless listeners.
//!
//! Key layout, value formats and which script touches which key: `schemas/redis-keys.md`.
//! Every mutating operation is ONE Lua script (`src/store/redis/*.lua`), run with
//! EVALSHA (the `redis` crate reloads a script after NOSCRIPT), so two listeners racing
//! for one passphrase get exactly one winner. Reads are plain commands, pipelined.
//!
//! Scripts never compute timestamps or format numbers: `now_ms` and every stored number
//! arrive as decimal argument strings and are stored verbatim.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, FromRedisValue, RedisError, Script};
use uuid::Uuid;

use super::{
    AttestOp, AttestOutcome, Device, DeviceRegisterOutcome, DeviceStatus, Network, NewPassphrase,
    Node, NodeStatus, PendingPassphrase, RegisterOp, RegisterOutcome, SealedNodeKey, Store,
    StoreError, TransitionOutcome,
};
use crate::wire::pubkey::DeviceId;

/// How long one command may wait for its reply before the store reports `Unavailable`.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a connection may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Error code a script raises (`redis.error_reply('RGCORRUPT …')`) for unreadable data.
const CORRUPT_CODE: &str = "RGCORRUPT";

const NETWORKS_KEY: &str = "rg:networks";

fn net_key(id: &str) -> String {
    format!("rg:{{net:{id}}}")
}
fn pp_key(id: &str) -> String {
    format!("rg:{{net:{id}}}:pp")
}
fn ppnames_key(id: &str) -> String {
    format!("rg:{{net:{id}}}:ppnames")
}
fn nodes_key(id: &str) -> String {
    format!("rg:{{net:{id}}}:nodes")
}
fn replay_key(id: &str, key_hex: &str) -> String {
    format!("rg:{{net:{id}}}:replay:{key_hex}")
}
fn node_key(id: Uuid) -> String {
    format!("rg:{{node:{}}}", id.hyphenated())
}

const DEVICES_KEY: &str = "rg:devices";

fn device_key(id: DeviceId) -> String {
    format!("rg:{{dev:{id}}}")
}
fn used_nonce_key(id: DeviceId, nonce: &[u8]) -> String {
    format!("rg:{{dev:{id}}}:nonce:{}", hex::encode(nonce))
}

struct Scripts {
    create_network: Script,
    delete_network: Script,
    add_passphrases: Script,
    revoke_passphrase: Script,
    register: Script,
    transition: Script,
    revoke_node: Script,
    register_device: Script,
    attest_device: Script,
    revoke_device: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            create_network: Script::new(include_str!("redis/create_network.lua")),
            delete_network: Script::new(include_str!("redis/delete_network.lua")),
            add_passphrases: Script::new(include_str!("redis/add_passphrases.lua")),
            revoke_passphrase: Script::new(include_str!("redis/revoke_passphrase.lua")),
            register: Script::new(include_str!("redis/register.lua")),
            transition: Script::new(include_str!("redis/transition.lua")),
            revoke_node: Script::new(include_str!("redis/revoke_node.lua")),
            register_device: Script::new(include_str!("redis/register_device.lua")),
            attest_device: Script::new(include_str!("redis/attest_device.lua")),
            revoke_device: Script::new(include_str!("redis/revoke_device.lua")),
        }
    }
}

/// The connection in use and a generation number, bumped on every reconnect so that
/// many calls failing on the same dead connection replace it only once.
struct Live {
    conn: MultiplexedConnection,
    generation: u64,
    /// Set while the connection is dead and could not be replaced: calls fail at once
    /// (503) while a background task reconnects every `RECONNECT_INTERVAL`.
    broken_since: Option<std::time::Instant>,
    /// A background reconnect task is running.
    healing: bool,
}

/// How often the background task retries during an outage.
const RECONNECT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// A handle to one Redis server. Small (one pointer), so an enum over stores stays
/// small too.
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    config: AsyncConnectionConfig,
    live: Mutex<Live>,
    /// The URL with any password redacted; the only form that reaches logs and errors.
    url: String,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://[user:password@]host[:port][/db]`, `rediss://…`,
    /// `redis+unix://…`) and checks the server answers a PING, so a wrong URL fails at
    /// startup with `Unavailable` naming the URL (password redacted).
    pub async fn connect(url: &str) -> Result<RedisStore, StoreError> {
        let shown = redact_url(url);
        let unavailable = |cause: String| StoreError::Unavailable {
            url: shown.clone(),
            cause,
        };
        let client = Client::open(url).map_err(|e| unavailable(e.to_string()))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECTION_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if pong != "PONG" {
            return Err(unavailable(format!("unexpected PING reply {pong:?}")));
        }
        let inner = Inner {
            client,
            config,
            live: Mutex::new(Live {
                conn,
                generation: 0,
                broken_since: None,
                healing: false,
            }),
            url: shown,
            scripts: Scripts::new(),
        };
        Ok(RedisStore {
            inner: Arc::new(inner),
        })
    }
}

impl Inner {
    /// A clone of the current connection (cheap: a handle to one multiplexed socket);
    /// during an outage, `Unavailable` at once.
    fn conn(&self) -> Result<(MultiplexedConnection, u64), StoreError> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        match live.broken_since {
            None => Ok((live.conn.clone(), live.generation)),
            Some(_) => Err(self.unavailable("connection lost; reconnecting".into())),
        }
    }

    /// Replaces the connection of `generation` (if no one else did already).
    async fn reconnect(&self, generation: u64) -> bool {
        let attempt = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await;
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.generation != generation {
            return true;
        }
        match attempt {
            Ok(conn) => {
                if let Some(since) = live.broken_since.take() {
                    tracing::info!(store = %self.url, down_for = ?since.elapsed(), "store reachable again");
                }
                live.conn = conn;
                live.generation += 1;
                true
            }
            Err(e) => {
                if live.broken_since.is_none() {
                    live.broken_since = Some(std::time::Instant::now());
                    tracing::error!(store = %self.url, error = %e, "store unavailable; requests get 503 until it is back");
                }
                false
            }
        }
    }

    /// Turns a Redis error into a `StoreError`. A dead connection (a multiplexed
    /// connection never heals itself) is replaced at once if Redis answers; if not,
    /// a background task keeps trying, so the first request after Redis returns is
    /// served. The failed call itself is not retried (a script may or may not have run).
    /// Logs one line when the store goes away and one when it is back.
    async fn fail(self: &Arc<Self>, err: RedisError, generation: u64) -> StoreError {
        if err.code() == Some(CORRUPT_CODE) {
            return StoreError::Corrupt(err.detail().unwrap_or_default().to_owned());
        }
        if err.is_unrecoverable_error() && !self.reconnect(generation).await {
            let start_healing = {
                let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
                !std::mem::replace(&mut live.healing, true)
            };
            if start_healing {
                let inner = Arc::clone(self);
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(RECONNECT_INTERVAL).await;
                        let generation = inner
                            .live
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .generation;
                        if inner.reconnect(generation).await {
                            inner.live.lock().unwrap_or_else(|e| e.into_inner()).healing = false;
                            return;
                        }
                    }
                });
            }
        }
        self.unavailable(err.to_string())
    }

    fn unavailable(&self, cause: String) -> StoreError {
        StoreError::Unavailable {
            url: self.url.clone(),
            cause,
        }
    }

    /// Runs `script` with `keys` and `args`; the reply is a tag and its operands.
    async fn run(
        self: &Arc<Self>,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let (mut conn, generation) = self.conn()?;
        match invocation.invoke_async::<Vec<String>>(&mut conn).await {
            Ok(reply) if !reply.is_empty() => Ok(reply),
            Ok(_) => Err(StoreError::Corrupt("empty script reply".into())),
            Err(err) => Err(self.fail(err, generation).await),
        }
    }

    /// Runs a read-only pipeline.
    async fn query<T: redis::FromRedisValue>(
        self: &Arc<Self>,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let (mut conn, generation) = self.conn()?;
        match pipe.query_async(&mut conn).await {
            Ok(v) => Ok(v),
            Err(err) => Err(self.fail(err, generation).await),
        }
    }

    /// Reads the node records of `ids`, skipping ids whose record is gone, sorted by
    /// (created_ms, id).
    async fn read_nodes(self: &Arc<Self>, ids: Vec<Uuid>) -> Result<Vec<Node>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(node_key(*id));
        }
        let records: Vec<HashMap<String, String>> = self.query(&pipe).await?;
        let mut nodes = Vec::with_capacity(ids.len());
        for (id, record) in ids.into_iter().zip(records) {
            if !record.is_empty() {
                nodes.push(parse_node(id, &record)?);
            }
        }
        nodes.sort_by_key(|n| (n.created_ms, n.id));
        Ok(nodes)
    }
}

impl Store for RedisStore {
    fn describe(&self) -> String {
        self.inner.url.clone()
    }

    async fn create_network(
        &self,
        id: &str,
        owner: &str,
        name: &str,
        now_ms: i64,
    ) -> Result<Network, StoreError> {
        let reply = self
            .inner
            .run(
                &self.inner.scripts.create_network,
                &[net_key(id), NETWORKS_KEY.to_owned()],
                &[
                    id.to_owned(),
                    owner.to_owned(),
                    name.to_owned(),
                    now_ms.to_string(),
                ],
            )
            .await?;
        match tag(&reply) {
            "ok" => Ok(Network {
                id: id.to_owned(),
                owner: owner.to_owned(),
                name: name.to_owned(),
                created_ms: now_ms,
                pending_passphrases: 0,
                nodes: 0,
            }),
            "exists" => Err(StoreError::NetworkExists(id.to_owned())),
            _ => Err(unexpected("create_network", &reply)),
        }
    }

    async fn delete_network(&self, id: &str) -> Result<u64, StoreError> {
        let reply = self
            .inner
            .run(
                &self.inner.scripts.delete_network,
                &[
                    net_key(id),
                    pp_key(id),
                    ppnames_key(id),
                    nodes_key(id),
                    NETWORKS_KEY.to_owned(),
                ],
                &[id.to_owned()],
            )
            .await?;
        match tag(&reply) {
            "unknown" => Err(StoreError::UnknownNetwork(id.to_owned())),
            "ok" => {
                let nodes = &reply[1..];
                if !nodes.is_empty() {
                    let mut pipe = redis::pipe();
                    for node in nodes {
                        let node = Uuid::parse_str(node).map_err(|_| {
                            StoreError::Corrupt(format!("node id {node:?} in network {id:?}"))
                        })?;
                        pipe.del(node_key(node)).ignore();
                    }
                    self.inner.query::<()>(&pipe).await?;
                }
                // Replay records would answer a retry should a network of the same id
                // be made before they expire: found by pattern (admin only, rare).
                let pattern = format!("{}*", glob_escape(&replay_key(id, "")));
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<String>) = self
                        .inner
                        .query::<((u64, Vec<String>),)>(
                            redis::pipe()
                                .cmd("SCAN")
                                .arg(cursor)
                                .arg("MATCH")
                                .arg(&pattern)
                                .arg("COUNT")
                                .arg(1000),
                        )
                        .await?
                        .0;
                    if !keys.is_empty() {
                        self.inner
                            .query::<()>(redis::pipe().del(keys).ignore())
                            .await?;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
                Ok(nodes.len() as u64)
            }
            _ => Err(unexpected("delete_network", &reply)),
        }
    }

    async fn network(&self, id: &str) -> Result<Option<Network>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.hgetall(net_key(id))
            .hlen(pp_key(id))
            .scard(nodes_key(id));
        let (record, pending, nodes): (HashMap<String, String>, u64, u64) =
            self.inner.query(&pipe).await?;
        if record.is_empty() {
            return Ok(None);
        }
        parse_network(id, &record, pending, nodes).map(Some)
    }

    async fn networks(&self) -> Result<Vec<Network>, StoreError> {
        let (mut ids,): (Vec<String>,) = self
            .inner
            .query(redis::pipe().smembers(NETWORKS_KEY))
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        ids.sort();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(net_key(id))
                .hlen(pp_key(id))
                .scard(nodes_key(id));
        }
        let flat: Vec<redis::Value> = self.inner.query(&pipe).await?;
        if flat.len() != 3 * ids.len() {
            return Err(StoreError::Corrupt(format!(
                "networks: {} replies",
                flat.len()
            )));
        }
        let mut flat = flat.into_iter();
        let mut rows = Vec::with_capacity(ids.len());
        while let (Some(record), Some(pending), Some(nodes)) =
            (flat.next(), flat.next(), flat.next())
        {
            let bad = |e: redis::ParsingError| StoreError::Corrupt(format!("network record: {e}"));
            rows.push((
                HashMap::<String, String>::from_redis_value(record).map_err(bad)?,
                u64::from_redis_value(pending).map_err(bad)?,
                u64::from_redis_value(nodes).map_err(bad)?,
            ));
        }
        let mut networks = Vec::with_capacity(ids.len());
        for (id, (record, pending, nodes)) in ids.iter().zip(rows) {
            // A member whose hash is gone (deleted by hand) is not a network any more.
            if !record.is_empty() {
                networks.push(parse_network(id, &record, pending, nodes)?);
            }
        }
        Ok(networks)
    }

    async fn add_passphrases(
        &self,
        network: &str,
        batch: Vec<NewPassphrase>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut args = Vec::with_capacity(1 + 3 * batch.len());
        args.push(now_ms.to_string());
        for p in &batch {
            args.push(hex::encode(p.hash.0));
            args.push(p.expires_ms.map(|e| e.to_string()).unwrap_or_default());
            args.push(p.node_name.clone());
        }
        let keys = [net_key(network), pp_key(network), ppnames_key(network)];
        let reply = self
            .inner
            .run(&self.inner.scripts.add_passphrases, &keys, &args)
            .await?;
        match (tag(&reply), reply.get(1)) {
            ("ok", _) => Ok(()),
            ("unknown_network", _) => Err(StoreError::UnknownNetwork(network.to_owned())),
            ("name_taken", Some(name)) => Err(StoreError::PassphraseNameTaken {
                network: network.to_owned(),
                node_name: name.clone(),
            }),
            ("hash_taken", _) => Err(StoreError::PassphraseTaken(network.to_owned())),
            _ => Err(unexpected("add_passphrases", &reply)),
        }
    }

    async fn passphrases(&self, network: &str) -> Result<Vec<PendingPassphrase>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.exists(net_key(network)).hvals(pp_key(network));
        let (exists, entries): (bool, Vec<String>) = self.inner.query(&pipe).await?;
        if !exists {
            return Err(StoreError::UnknownNetwork(network.to_owned()));
        }
        let mut list = entries
            .iter()
            .map(|e| parse_passphrase(network, e))
            .collect::<Result<Vec<_>, _>>()?;
        list.sort_by(|a, b| (a.created_ms, &a.node_name).cmp(&(b.created_ms, &b.node_name)));
        Ok(list)
    }

    async fn revoke_passphrase(&self, network: &str, node_name: &str) -> Result<(), StoreError> {
        let keys = [net_key(network), pp_key(network), ppnames_key(network)];
        let reply = self
            .inner
            .run(
                &self.inner.scripts.revoke_passphrase,
                &keys,
                &[node_name.to_owned()],
            )
            .await?;
        match tag(&reply) {
            "ok" => Ok(()),
            "unknown_network" => Err(StoreError::UnknownNetwork(network.to_owned())),
            "unknown_name" => Err(StoreError::UnknownPassphraseName {
                network: network.to_owned(),
                node_name: node_name.to_owned(),
            }),
            _ => Err(unexpected("revoke_passphrase", &reply)),
        }
    }

    async fn register(&self, op: RegisterOp) -> Result<RegisterOutcome, StoreError> {
        let net = op.network.as_str();
        let mut keys = vec![
            net_key(net),
            pp_key(net),
            ppnames_key(net),
            nodes_key(net),
            replay_key(net, &hex::encode(op.replay_key.0)),
            node_key(op.fresh_id),
        ];
        if let Some(id) = op.requested_id {
            keys.push(node_key(id));
        }
        let args = [
            op.network.clone(),
            hex::encode(op.passphrase.0),
            op.now_ms.to_string(),
            op.replay_ttl_ms.to_string(),
            op.fresh_id.hyphenated().to_string(),
            op.requested_id
                .map(|id| id.hyphenated().to_string())
                .unwrap_or_default(),
            hex::encode(&op.sealed_key.0),
            op.node_type.to_owned(),
            op.arch.to_owned(),
        ];
        let reply = self
            .inner
            .run(&self.inner.scripts.register, &keys, &args)
            .await?;
        let id = || {
            reply
                .get(1)
                .and_then(|s| Uuid::try_parse(s).ok())
                .ok_or_else(|| unexpected("register", &reply))
        };
        match tag(&reply) {
            "invalid" => Ok(RegisterOutcome::InvalidPassphrase),
            "created" => Ok(RegisterOutcome::Created { node_id: id()? }),
            "reregistered" => Ok(RegisterOutcome::Reregistered { node_id: id()? }),
            "replayed" => Ok(RegisterOutcome::Replayed { node_id: id()? }),
            _ => Err(unexpected("register", &reply)),
        }
    }

    async fn node(&self, id: Uuid) -> Result<Option<Node>, StoreError> {
        let (record,): (HashMap<String, String>,) = self
            .inner
            .query(redis::pipe().hgetall(node_key(id)))
            .await?;
        if record.is_empty() {
            return Ok(None);
        }
        parse_node(id, &record).map(Some)
    }

    async fn nodes(&self, network: Option<&str>) -> Result<Vec<Node>, StoreError> {
        let members: Vec<String> = match network {
            Some(net) => {
                let mut pipe = redis::pipe();
                pipe.exists(net_key(net)).smembers(nodes_key(net));
                let (exists, members): (bool, Vec<String>) = self.inner.query(&pipe).await?;
                if !exists {
                    return Err(StoreError::UnknownNetwork(net.to_owned()));
                }
                members
            }
            None => {
                let (nets,): (Vec<String>,) = self
                    .inner
                    .query(redis::pipe().smembers(NETWORKS_KEY))
                    .await?;
                if nets.is_empty() {
                    return Ok(Vec::new());
                }
                let mut pipe = redis::pipe();
                for net in &nets {
                    pipe.smembers(nodes_key(net));
                }
                let sets: Vec<Vec<String>> = self.inner.query(&pipe).await?;
                sets.into_iter().flatten().collect()
            }
        };
        let mut ids = members
            .iter()
            .map(|m| {
                Uuid::try_parse(m)
                    .map_err(|_| StoreError::Corrupt(format!("node id {m:?} in a node set")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        ids.sort();
        ids.dedup();
        self.inner.read_nodes(ids).await
    }

    async fn transition(
        &self,
        id: Uuid,
        target: NodeStatus,
        ip: &str,
        now_ms: i64,
    ) -> Result<TransitionOutcome, StoreError> {
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
        ];
        args.extend(
            target
                .allowed_origins()
                .iter()
                .map(|s| s.as_str().to_owned()),
        );
        let reply = self
            .inner
            .run(&self.inner.scripts.transition, &[node_key(id)], &args)
            .await?;
        let from = || {
            reply
                .get(1)
                .and_then(|s| NodeStatus::parse(s))
                .ok_or_else(|| StoreError::Corrupt(format!("node {id}: status {:?}", reply.get(1))))
        };
        match tag(&reply) {
            "unknown" => Ok(TransitionOutcome::UnknownNode),
            "changed" => Ok(TransitionOutcome::Changed { from: from()? }),
            "not_allowed" => Ok(TransitionOutcome::NotAllowed { from: from()? }),
            _ => Err(unexpected("transition", &reply)),
        }
    }

    async fn revoke_node(&self, id: Uuid) -> Result<(), StoreError> {
        let reply = self
            .inner
            .run(&self.inner.scripts.revoke_node, &[node_key(id)], &[])
            .await?;
        match tag(&reply) {
            "ok" => Ok(()),
            "unknown" => Err(StoreError::UnknownNode(id)),
            _ => Err(unexpected("revoke_node", &reply)),
        }
    }
    async fn register_device(
        &self,
        id: DeviceId,
        public_key: &[u8],
        now_ms: i64,
    ) -> Result<DeviceRegisterOutcome, StoreError> {
        let reply = self
            .inner
            .run(
                &self.inner.scripts.register_device,
                &[device_key(id), DEVICES_KEY.to_owned()],
                &[id.to_hex(), hex::encode(public_key), now_ms.to_string()],
            )
            .await?;
        match tag(&reply) {
            "created" => Ok(DeviceRegisterOutcome::Created),
            "same_key" => Ok(DeviceRegisterOutcome::SameKey),
            "other_key" => Ok(DeviceRegisterOutcome::OtherKey),
            "revoked" => Ok(DeviceRegisterOutcome::Revoked),
            _ => Err(unexpected("register_device", &reply)),
        }
    }

    async fn device(&self, id: DeviceId) -> Result<Option<Device>, StoreError> {
        let (record,): (HashMap<String, String>,) = self
            .inner
            .query(redis::pipe().hgetall(device_key(id)))
            .await?;
        if record.is_empty() {
            return Ok(None);
        }
        parse_device(id, &record).map(Some)
    }

    async fn devices(&self) -> Result<Vec<Device>, StoreError> {
        let (members,): (Vec<String>,) = self
            .inner
            .query(redis::pipe().smembers(DEVICES_KEY))
            .await?;
        let mut ids = members
            .iter()
            .map(|m| {
                DeviceId::from_hex(m)
                    .map_err(|_| StoreError::Corrupt(format!("device id {m:?} in {DEVICES_KEY}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        ids.sort();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(device_key(*id));
        }
        let records: Vec<HashMap<String, String>> = self.inner.query(&pipe).await?;
        let mut devices = Vec::with_capacity(ids.len());
        for (id, record) in ids.into_iter().zip(records) {
            if !record.is_empty() {
                devices.push(parse_device(id, &record)?);
            }
        }
        devices.sort_by_key(|d| (d.registered_ms, d.id));
        Ok(devices)
    }

    async fn attest_device(&self, op: AttestOp) -> Result<AttestOutcome, StoreError> {
        let ttl_ms = (op.nonce_expires_ms - op.now_ms).max(1);
        let reply = self
            .inner
            .run(
                &self.inner.scripts.attest_device,
                &[
                    device_key(op.device),
                    used_nonce_key(op.device, &op.nonce.0),
                ],
                &[op.now_ms.to_string(), ttl_ms.to_string()],
            )
            .await?;
        match tag(&reply) {
            "attested" => Ok(AttestOutcome::Attested),
            "used" => Ok(AttestOutcome::NonceUsed),
            "revoked" => Ok(AttestOutcome::Revoked),
            "unknown" => Ok(AttestOutcome::UnknownDevice),
            _ => Err(unexpected("attest_device", &reply)),
        }
    }

    async fn revoke_device(&self, id: DeviceId, now_ms: i64) -> Result<(), StoreError> {
        let reply = self
            .inner
            .run(
                &self.inner.scripts.revoke_device,
                &[device_key(id)],
                &[now_ms.to_string()],
            )
            .await?;
        match tag(&reply) {
            "ok" => Ok(()),
            "unknown" => Err(StoreError::UnknownDevice(id)),
            _ => Err(unexpected("revoke_device", &reply)),
        }
    }
}

/// `text` as a literal in a SCAN MATCH pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn tag(reply: &[String]) -> &str {
    reply.first().map(String::as_str).unwrap_or_default()
}

fn unexpected(script: &str, reply: &[String]) -> StoreError {
    StoreError::Corrupt(format!("{script} script replied {reply:?}"))
}

fn field<'a>(
    what: &str,
    record: &'a HashMap<String, String>,
    name: &str,
) -> Result<&'a str, StoreError> {
    record
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| StoreError::Corrupt(format!("{what}: field {name:?} missing")))
}

fn int_field(what: &str, record: &HashMap<String, String>, name: &str) -> Result<i64, StoreError> {
    let raw = field(what, record, name)?;
    raw.parse().map_err(|_| {
        StoreError::Corrupt(format!("{what}: field {name:?} is {raw:?}, not an integer"))
    })
}

fn parse_network(
    id: &str,
    record: &HashMap<String, String>,
    pending_passphrases: u64,
    nodes: u64,
) -> Result<Network, StoreError> {
    let what = format!("network {id:?}");
    Ok(Network {
        id: id.to_owned(),
        owner: field(&what, record, "owner")?.to_owned(),
        name: field(&what, record, "name")?.to_owned(),
        created_ms: int_field(&what, record, "created_ms")?,
        pending_passphrases,
        nodes,
    })
}

/// Parses `<created_ms>|<expires_ms or empty>|<node_name>`; the name may hold `|`.
fn parse_passphrase(network: &str, entry: &str) -> Result<PendingPassphrase, StoreError> {
    let corrupt =
        || StoreError::Corrupt(format!("passphrase entry {entry:?} in network {network:?}"));
    let mut parts = entry.splitn(3, '|');
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
        sealed_key: SealedNodeKey(
            hex::decode(key).map_err(|_| StoreError::Corrupt(format!("{what}: key is not hex")))?,
        ),
        ip: field(&what, record, "ip")?.to_owned(),
        created_ms: int_field(&what, record, "created_ms")?,
        registered_ms: int_field(&what, record, "registered_ms")?,
        online_ms: int_field(&what, record, "online_ms")?,
    })
}

fn parse_device(id: DeviceId, record: &HashMap<String, String>) -> Result<Device, StoreError> {
    let what = format!("device {id}");
    let status = field(&what, record, "status")?;
    let key = field(&what, record, "public_key")?;
    Ok(Device {
        id,
        public_key: hex::decode(key)
            .map_err(|_| StoreError::Corrupt(format!("{what}: public_key is not hex")))?,
        status: DeviceStatus::parse(status)
            .ok_or_else(|| StoreError::Corrupt(format!("{what}: status {status:?}")))?,
        registered_ms: int_field(&what, record, "registered_ms")?,
        attested_ms: int_field(&what, record, "attested_ms")?,
        attestations: int_field(&what, record, "attestations")? as u64,
        revoked_ms: int_field(&what, record, "revoked_ms")?,
    })
}

/// `url` with the password replaced by `***`, both in the userinfo
/// (`redis://user:secret@host`) and in `pass=` / `password=` query parameters.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL the client will accept; show only that much.
        return "<unparsable redis url>".to_owned();
    };
    // The host part starts after the LAST '@': a password may itself hold '@' or '/'.
    let (userinfo, after) = match rest.rsplit_once('@') {
        Some((userinfo, after)) => (Some(userinfo), after),
        None => (None, rest),
    };
    let mut out = format!("{scheme}://");
    if let Some(userinfo) = userinfo {
        match userinfo.split_once(':') {
            Some((user, _password)) => out.push_str(&format!("{user}:***@")),
            None => out.push_str(&format!("{userinfo}@")),
        }
    }
    match after.split_once('?') {
        None => out.push_str(after),
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((k, _)) if k == "pass" || k == "password" => format!("{k}=***"),
                    _ => param.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redacts_passwords() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://:s3cret@host:6379", "redis://:***@host:6379"),
            ("rediss://user:s3cret@host/2", "rediss://user:***@host/2"),
            ("redis://user@host", "redis://user@host"),
            ("redis://:p@ss/w@rd@host/1", "redis://:***@host/1"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=s3cret",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            (
                "redis://host?password=s3cret&protocol=resp3",
                "redis://host?password=***&protocol=resp3",
            ),
            ("not a url", "<unparsable redis url>"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
