//! The JAMScript-OTA portal's Redis, served as it stands (`ota+redis://`). A private
//! Redis is seeded with plain commands exactly as the portal's web pages and servers
//! write it (no Registrar code in the seeding), Registrar answers nodes over real
//! sockets, and the keys are read back raw and compared with what the portal expects.
//! The wire behaviour on this layout is `ijam.rs`'s battery (its `portal` module).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use redis::Commands;
use registrar::store::Creation;
use registrar::store::ijam::{IjamStore, NodeStatus, StoredNodeKey};
use registrar::store::sqlite::SqliteStore;
use registrar::wire::ijam::{NodeArch, StateCode};
use uuid::Uuid;

use crate::support::ijam_client::*;
use crate::support::listener::{self, Backend, Key, Listener, vector};
use crate::support::redis_server::PrivateRedis;

const REPLY_200: [u8; 2] = 200u16.to_le_bytes();
const REPLY_401: &[u8] = b"\x91\x01Invalid passphrase.";
const DAY_MS: i64 = 24 * 60 * 60 * 1000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Plain commands on the portal's Redis, as the portal issues them.
struct Portal {
    conn: redis::Connection,
}

impl Portal {
    fn on(url: &str) -> Portal {
        let url = url.strip_prefix("ota+").unwrap_or(url);
        let conn = redis::Client::open(url)
            .and_then(|c| c.get_connection())
            .expect("connect to the private redis");
        Portal { conn }
    }

    /// What the portal's "new network" page writes.
    fn network(&mut self, id: &str, name: &str, username: &str, created_on: i64) {
        let _: () = self
            .conn
            .hset_multiple(
                format!("network:{id}"),
                &[
                    ("name", name.to_owned()),
                    ("createdOn", created_on.to_string()),
                    ("username", username.to_owned()),
                ],
            )
            .unwrap();
        let _: () = self
            .conn
            .sadd(format!("user:{username}:networks"), id)
            .unwrap();
    }

    /// What the portal's "add passphrase" page writes.
    fn passphrase(&mut self, network: &str, passphrase: &str, node_name: &str) {
        let _: () = self
            .conn
            .sadd(format!("network:{network}:passphrases"), passphrase)
            .unwrap();
        let _: () = self
            .conn
            .hset(
                format!("network:{network}:passphraseNames"),
                passphrase,
                node_name,
            )
            .unwrap();
    }

    /// A node as the portal's registration server writes it.
    fn node(&mut self, id: Uuid, node: &PortalNode) {
        let fields = node.fields();
        let _: () = self
            .conn
            .hset_multiple(format!("node:{id}"), &fields)
            .unwrap();
        let _: () = self
            .conn
            .sadd(format!("network:{}:nodes", node.network), id.to_string())
            .unwrap();
    }

    fn hash(&mut self, key: &str) -> BTreeMap<String, String> {
        self.conn.hgetall(key).unwrap()
    }

    fn set(&mut self, key: &str) -> BTreeSet<String> {
        self.conn.smembers(key).unwrap()
    }

    fn keys(&mut self, pattern: &str) -> BTreeSet<String> {
        self.conn.keys(pattern).unwrap()
    }

    /// Every key with its full value (replay records aside: Registrar's own), to show
    /// that something changed nothing.
    fn dump(&mut self) -> BTreeMap<String, String> {
        let mut all = BTreeMap::new();
        for key in self.keys("*") {
            if key.starts_with("registrar:") {
                continue;
            }
            let kind: String = redis::cmd("TYPE").arg(&key).query(&mut self.conn).unwrap();
            let value = match kind.as_str() {
                "hash" => format!("{:?}", self.hash(&key)),
                "set" => format!("{:?}", self.set(&key)),
                other => panic!("{key}: a {other} the portal never writes"),
            };
            all.insert(key, value);
        }
        all
    }
}

struct PortalNode {
    network: String,
    username: String,
    status: String,
    arch: String,
    key: [u8; 32],
    registered_on: i64,
}

impl PortalNode {
    fn new(network: &str, username: &str, status: &str, key: [u8; 32], registered_on: i64) -> Self {
        PortalNode {
            network: network.into(),
            username: username.into(),
            status: status.into(),
            arch: "esp_32".into(),
            key,
            registered_on,
        }
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("status", self.status.clone()),
            ("name", "sensor".into()),
            ("type", "device".into()),
            ("arch", self.arch.clone()),
            ("encKey", hex::encode(self.key)),
            ("ip", String::new()),
            ("createdOn", self.registered_on.to_string()),
            ("lastRegisteredOn", self.registered_on.to_string()),
            ("lastOnlineOn", "0".into()),
            ("networkId", self.network.clone()),
            ("username", self.username.clone()),
        ]
    }
}

/// A listener on a private Redis in the portal's layout, and a connection to seed it.
fn portal_listener(key: Key) -> Option<(Listener, Portal)> {
    let redis = PrivateRedis::start()?;
    let l = Listener::start(Backend::Portal(redis), key, &[]);
    let portal = Portal::on(l.store_url());
    Some((l, portal))
}

fn register(
    l: &Listener,
    node_id: Option<Uuid>,
    network: &str,
    passphrase: &str,
) -> (Vec<u8>, [u8; 32]) {
    let pk = public_key(l.ports.cert);
    let key = random_key();
    let ct = pk
        .encrypt(&request(node_id, network, passphrase, key).to_bytes())
        .unwrap();
    (tcp_exchange(l.ports.reg_tcp, &ct), key)
}

fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_captured_exchange_writes_what_the_portal_writes() {
    let Some((l, mut portal)) = portal_listener(Key::Vector4096) else {
        return;
    };
    portal.network("testnet01", "Test network", "admin", 1_700_000_000_000);
    portal.passphrase("testnet01", "alpha1", "node-alpha1");
    portal.passphrase("testnet01", "other2", "node-other2");
    let key: [u8; 32] = vector("reg4096_node_key.bin").try_into().unwrap();

    let before = now_ms();
    let reply = tcp_exchange(l.ports.reg_tcp, &vector("reg4096_request_cipher.bin"));
    let id = decode_reply_upstream(&reply, &key);
    let after = now_ms();

    // The passphrase is consumed as the portal consumes it, the other one stays.
    assert_eq!(
        portal.set("network:testnet01:passphrases"),
        BTreeSet::from(["other2".to_owned()])
    );
    assert_eq!(
        portal.hash("network:testnet01:passphraseNames"),
        fields(&[("other2", "node-other2")])
    );
    assert_eq!(
        portal.set("network:testnet01:nodes"),
        BTreeSet::from([id.to_string()])
    );
    // The node hash, whole: the eleven fields the portal writes, no other.
    let node = portal.hash(&format!("node:{id}"));
    let created: i64 = node["createdOn"].parse().unwrap();
    assert!((before..=after).contains(&created), "{node:?}");
    let created = created.to_string();
    assert_eq!(
        node,
        fields(&[
            ("status", "offline"),
            ("name", "node-alpha1"),
            ("type", "device"),
            ("arch", "wsl"),
            ("encKey", &hex::encode(key)),
            ("ip", ""),
            ("createdOn", &created),
            ("lastRegisteredOn", &created),
            ("lastOnlineOn", "0"),
            ("networkId", "testnet01"),
            ("username", "admin"),
        ])
    );
    // The network's own hash and the owner's set are as they were.
    assert_eq!(
        portal.hash("network:testnet01"),
        fields(&[
            ("name", "Test network"),
            ("createdOn", "1700000000000"),
            ("username", "admin")
        ])
    );
    assert_eq!(
        portal.set("user:admin:networks"),
        BTreeSet::from(["testnet01".to_owned()])
    );

    // The C client's second run (same passphrase, new key): the original's 401, and
    // nothing changes.
    let snapshot = portal.dump();
    assert_eq!(
        tcp_exchange(l.ports.reg_tcp, &vector("err401_request_cipher.bin")),
        REPLY_401
    );
    assert_eq!(portal.dump(), snapshot);
    // Registrar's one addition: the answer for a byte-identical retry, with a TTL.
    assert_eq!(portal.keys("registrar:replay:testnet01:*").len(), 1);
}

#[test]
fn an_esp32_is_stored_as_the_portal_spells_it_and_read_back_as_registrar_does() {
    let Some((l, mut portal)) = portal_listener(Key::Vector2048) else {
        return;
    };
    portal.network("lab", "Lab", "alice", now_ms());
    portal.passphrase("lab", "esp32pass", "board");
    let pk = public_key(l.ports.cert);
    let key = random_key();
    let mut req = request(None, "lab", "esp32pass", key);
    req.node_arch = NodeArch::Esp32;
    let reply = tcp_exchange(l.ports.reg_tcp, &pk.encrypt(&req.to_bytes()).unwrap());
    let id = decode_reply_upstream(&reply, &key);
    assert_eq!(portal.hash(&format!("node:{id}"))["arch"], "esp_32");
    assert_eq!(l.node_json(id)["arch"], "esp32");
}

#[test]
fn state_changes_write_status_ip_and_last_online_as_the_portal_does() {
    let Some((l, mut portal)) = portal_listener(Key::Vector2048) else {
        return;
    };
    let id = Uuid::new_v4();
    let key = random_key();
    portal.network("lab", "Lab", "alice", now_ms() - DAY_MS);
    portal.node(
        id,
        &PortalNode::new("lab", "alice", "offline", key, now_ms() - DAY_MS),
    );
    let node_key = format!("node:{id}");
    let send = |code| tcp_exchange(l.ports.state_tcp, &state_frame(id, &key, code));

    // online: status, ip and lastOnlineOn.
    let before = now_ms();
    assert_eq!(send(StateCode::Online), REPLY_200);
    let node = portal.hash(&node_key);
    assert_eq!(
        (node["status"].as_str(), node["ip"].as_str()),
        ("online", "127.0.0.1")
    );
    let online: i64 = node["lastOnlineOn"].parse().unwrap();
    assert!(online >= before, "{node:?}");

    // loading: status and lastOnlineOn; the ip stays.
    let _: () = portal.conn.hset(&node_key, "lastOnlineOn", "1").unwrap();
    assert_eq!(send(StateCode::Loading), REPLY_200);
    let node = portal.hash(&node_key);
    assert_eq!(
        (node["status"].as_str(), node["ip"].as_str()),
        ("loading", "127.0.0.1")
    );
    assert!(node["lastOnlineOn"].parse::<i64>().unwrap() >= before);

    // A refused change names both statuses, as the original does, and writes nothing.
    let snapshot = portal.dump();
    assert_eq!(
        send(StateCode::Loading),
        b"\x93\x01Cannot transition node from loading to loading."
    );
    assert_eq!(portal.dump(), snapshot);

    // offline: status, ip cleared, lastOnlineOn.
    let _: () = portal.conn.hset(&node_key, "lastOnlineOn", "1").unwrap();
    assert_eq!(send(StateCode::Offline), REPLY_200);
    let node = portal.hash(&node_key);
    assert_eq!(
        (node["status"].as_str(), node["ip"].as_str()),
        ("offline", "")
    );
    assert!(node["lastOnlineOn"].parse::<i64>().unwrap() >= before);
    // Every other field is the portal's, untouched.
    let seeded = PortalNode::new("lab", "alice", "offline", key, 0).fields();
    for (field, value) in seeded {
        if ![
            "status",
            "ip",
            "lastOnlineOn",
            "createdOn",
            "lastRegisteredOn",
        ]
        .contains(&field)
        {
            assert_eq!(node[field], value, "{field}");
        }
    }

    // A node the portal never wrote: the original's 404.
    let unknown = tcp_exchange(
        l.ports.state_tcp,
        &state_frame(Uuid::new_v4(), &key, StateCode::Online),
    );
    assert_eq!(unknown, b"\x94\x01Node not found.");
}

#[test]
fn a_node_expires_ninety_days_after_its_last_registration_and_registers_again() {
    let Some((l, mut portal)) = portal_listener(Key::Vector2048) else {
        return;
    };
    let now = now_ms();
    portal.network("lab", "Lab", "alice", now - 200 * DAY_MS);
    let (fresh, stale) = (Uuid::new_v4(), Uuid::new_v4());
    let (fresh_key, stale_key) = (random_key(), random_key());
    portal.node(
        fresh,
        &PortalNode::new("lab", "alice", "offline", fresh_key, now - 89 * DAY_MS),
    );
    portal.node(
        stale,
        &PortalNode::new("lab", "alice", "online", stale_key, now - 91 * DAY_MS),
    );

    let state = |id, key: &[u8; 32]| {
        tcp_exchange(l.ports.state_tcp, &state_frame(id, key, StateCode::Online))
    };
    assert_eq!(state(fresh, &fresh_key), REPLY_200);
    assert_eq!(
        state(stale, &stale_key),
        b"\x93\x01Cannot transition node from expired to online."
    );
    // Marked as the portal's expiry marks it: status expired, key erased.
    let node = portal.hash(&format!("node:{stale}"));
    assert_eq!(
        (node["status"].as_str(), node["encKey"].as_str()),
        ("expired", "")
    );
    // From then on the key is gone: a bare 403.
    assert_eq!(state(stale, &stale_key), 403u16.to_le_bytes());

    // A fresh passphrase brings it back under its own id.
    portal.passphrase("lab", "comeback1", "sensor");
    let (reply, key) = register(&l, Some(stale), "lab", "comeback1");
    assert_eq!(decode_reply_upstream(&reply, &key), stale);
    let node = portal.hash(&format!("node:{stale}"));
    assert_eq!(node["status"], "offline");
    assert_eq!(node["encKey"], hex::encode(key));
    assert!(node["lastRegisteredOn"].parse::<i64>().unwrap() >= now);
    assert_eq!(state(stale, &key), REPLY_200);
}

#[test]
fn fifty_racers_for_one_passphrase_give_one_node() {
    let Some((l, mut portal)) = portal_listener(Key::Vector2048) else {
        return;
    };
    portal.network("race", "Race", "alice", now_ms());
    portal.passphrase("race", "onlyone1", "winner");
    let pk = public_key(l.ports.cert);
    let (requests, keys): (Vec<Vec<u8>>, Vec<[u8; 32]>) = (0..50)
        .map(|_| {
            let key = random_key();
            let req = request(None, "race", "onlyone1", key);
            (pk.encrypt(&req.to_bytes()).unwrap(), key)
        })
        .unzip();
    let replies = tcp_exchange_all_at_once(l.ports.reg_tcp, requests);
    let mut winners = Vec::new();
    for (reply, key) in replies.into_iter().zip(keys) {
        if reply != REPLY_401 {
            winners.push(decode_reply_upstream(&reply, &key));
        }
    }
    assert_eq!(winners.len(), 1, "the portal's own server answered several");
    assert_eq!(
        portal.keys("node:*"),
        BTreeSet::from([format!("node:{}", winners[0])])
    );
    assert_eq!(
        portal.set("network:race:nodes"),
        BTreeSet::from([winners[0].to_string()])
    );
    assert!(portal.set("network:race:passphrases").is_empty());
}

#[test]
fn a_node_moving_to_another_network_of_its_owner_leaves_the_old_set() {
    let Some((l, mut portal)) = portal_listener(Key::Vector2048) else {
        return;
    };
    portal.network("east", "East", "alice", now_ms());
    portal.network("west", "West", "alice", now_ms());
    let id = Uuid::new_v4();
    portal.node(
        id,
        &PortalNode::new("east", "alice", "online", random_key(), now_ms()),
    );
    portal.passphrase("west", "moveover1", "mover");
    let (reply, key) = register(&l, Some(id), "west", "moveover1");
    assert_eq!(decode_reply_upstream(&reply, &key), id);
    assert!(portal.set("network:east:nodes").is_empty());
    assert_eq!(
        portal.set("network:west:nodes"),
        BTreeSet::from([id.to_string()])
    );
    let node = portal.hash(&format!("node:{id}"));
    assert_eq!(
        (node["networkId"].as_str(), node["name"].as_str()),
        ("west", "mover")
    );
}

#[test]
fn admin_commands_read_and_write_the_portal_layout() {
    let Some((l, mut portal)) = portal_listener(Key::Vector2048) else {
        return;
    };
    portal.network("lab", "Lab bench", "alice", 1_700_000_000_000);
    portal.passphrase("lab", "typedbyhand1", "bench-1");
    let id = Uuid::new_v4();
    portal.node(
        id,
        &PortalNode::new("lab", "alice", "offline", random_key(), now_ms()),
    );

    let networks: serde_json::Value =
        serde_json::from_str(&l.admin_ok(&["--json", "network", "list"])).unwrap();
    assert_eq!(
        networks,
        serde_json::json!([{"id": "lab", "owner": "alice", "name": "Lab bench",
            "created_ms": 1_700_000_000_000i64, "reregistration": "owner",
            "pending_passphrases": 1, "nodes": 1}])
    );
    let shown = l.admin_ok(&["network", "show", "lab"]);
    assert!(shown.contains("re-registration:     owner"), "{shown}");
    let pending = l.admin_ok(&["passphrase", "list", "lab"]);
    assert!(pending.contains("bench-1"), "{pending}");
    assert!(
        !pending.contains("typedbyhand1"),
        "a secret shown: {pending}"
    );

    // Added passphrases land as the portal's pages add them: as typed, with a name.
    let generated = l.add_passphrase("lab", "bench-2");
    assert_eq!(generated.len(), 15);
    l.admin_ok(&[
        "passphrase",
        "add",
        "lab",
        "--node-name",
        "bench-3",
        "--passphrase",
        "Typed2Pass",
    ]);
    assert_eq!(
        portal.set("network:lab:passphrases"),
        BTreeSet::from([
            "typedbyhand1".to_owned(),
            generated.clone(),
            "Typed2Pass".to_owned()
        ])
    );
    assert_eq!(
        portal.hash("network:lab:passphraseNames"),
        fields(&[
            ("typedbyhand1", "bench-1"),
            (&generated, "bench-2"),
            ("Typed2Pass", "bench-3")
        ])
    );
    // What the layout cannot keep is refused, naming why, and nothing is written.
    let snapshot = portal.dump();
    let out = l.admin(&[
        "passphrase",
        "add",
        "lab",
        "--node-name",
        "later",
        "--expires-in",
        "7d",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no passphrase expiry"), "{err}");
    assert_eq!(portal.dump(), snapshot);
    // Nor a passphrase minted for a node, nor the `minted` rule: the portal's networks
    // follow the original's.
    for (args, says) in [
        (
            &[
                "passphrase",
                "add",
                "lab",
                "--node-name",
                "later",
                "--for-node",
                &id.to_string(),
            ][..],
            "no node a passphrase is minted for",
        ),
        (
            &[
                "network",
                "create",
                "strict",
                "--owner",
                "alice",
                "--reregistration",
                "minted",
            ],
            "keeps no re-registration rule",
        ),
        (
            &["network", "set", "lab", "--reregistration", "minted"],
            "keeps no re-registration rule",
        ),
    ] {
        let out = l.admin(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(portal.dump(), snapshot, "{args:?}");
    }
    let set = l.admin_ok(&["network", "set", "lab", "--reregistration", "owner"]);
    assert!(set.contains("re-registration owner"), "{set}");
    assert_eq!(portal.dump(), snapshot, "the rule it keeps already");

    l.admin_ok(&["passphrase", "revoke", "lab", "--node-name", "bench-1"]);
    assert!(
        !portal
            .set("network:lab:passphrases")
            .contains("typedbyhand1")
    );
    assert!(
        !portal
            .hash("network:lab:passphraseNames")
            .contains_key("typedbyhand1")
    );

    // Nodes: the portal's, listed; a revoke as the portal revokes.
    let nodes = l.nodes_json();
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        (nodes[0]["id"].as_str(), nodes[0]["arch"].as_str()),
        (Some(id.to_string().as_str()), Some("esp32"))
    );
    l.admin_ok(&["node", "revoke", &id.to_string()]);
    let node = portal.hash(&format!("node:{id}"));
    assert_eq!(
        (node["status"].as_str(), node["encKey"].as_str()),
        ("revoked", "")
    );

    // A network made here is one the portal's pages list.
    l.admin_ok(&[
        "network", "create", "field", "--owner", "bob", "--name", "Field",
    ]);
    let made = portal.hash("network:field");
    assert_eq!(
        (made["name"].as_str(), made["username"].as_str()),
        ("Field", "bob")
    );
    assert!(made["createdOn"].parse::<i64>().unwrap() > 0);
    assert_eq!(
        portal.set("user:bob:networks"),
        BTreeSet::from(["field".to_owned()])
    );

    // Deleting a network takes its keys and its nodes, and the owner's set entry.
    let deleted = l.admin_ok(&["network", "delete", "lab", "--yes"]);
    assert!(deleted.contains("its 1 nodes"), "{deleted}");
    assert_eq!(
        portal
            .keys("*")
            .into_iter()
            .filter(|k| !k.starts_with("registrar:"))
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["network:field".to_owned(), "user:bob:networks".to_owned()])
    );
}

#[test]
fn a_redis_in_cluster_mode_is_refused_for_the_portal_layout() {
    let Some(server) = PrivateRedis::start_cluster_node() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = format!("ota+{}", server.url());
    let init = listener::admin(dir.path(), "sqlite", &["init"]);
    assert!(init.status.success());
    let out = listener::admin(dir.path(), &store, &["network", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster mode"), "{err}");
}

#[test]
fn migrate_copies_the_portal_into_a_native_store_that_serves_its_nodes() {
    let Some(redis) = PrivateRedis::start() else {
        return;
    };
    let from = format!("ota+{}", redis.url());
    let mut portal = Portal::on(&from);
    let now = now_ms();
    portal.network("lab", "Lab", "alice", now - 10 * DAY_MS);
    portal.passphrase("lab", "pending1", "later-1");
    portal.passphrase("lab", "pending2", "later-2");
    let (live, revoked, old) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let live_key = random_key();
    portal.node(
        live,
        &PortalNode::new("lab", "alice", "online", live_key, now - DAY_MS),
    );
    portal.node(
        revoked,
        &PortalNode::new("lab", "alice", "revoked", [0; 32], now - DAY_MS),
    );
    let _: () = portal
        .conn
        .hset(format!("node:{revoked}"), "encKey", "")
        .unwrap();
    let old_key = random_key();
    portal.node(
        old,
        &PortalNode::new("lab", "alice", "offline", old_key, now - 100 * DAY_MS),
    );
    let portal_before = portal.dump();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rsa_private_key.pem"),
        vector("rsa2048_private_key.pem"),
    )
    .unwrap();
    assert!(
        listener::admin(dir.path(), "sqlite", &["init"])
            .status
            .success()
    );
    // The portal is named with its scheme; the destination must be native.
    let wrong = listener::admin(dir.path(), "sqlite", &["migrate", "--from", &redis.url()]);
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("ota+redis://"));
    let wrong = listener::admin(dir.path(), &from, &["migrate", "--from", &from]);
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("native store"));

    let run = |args: &[&str]| {
        let out = listener::admin(dir.path(), "sqlite", args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let copied = run(&["--json", "migrate", "--from", &from]);
    assert_eq!(
        copied,
        serde_json::json!({"networks": 1, "networks_present": 0, "passphrases": 2,
            "passphrases_present": 0, "nodes": 3, "nodes_present": 0, "nodes_expired": 1})
    );
    // Again: everything is there already, nothing is copied twice.
    let again = run(&["--json", "migrate", "--from", &from]);
    assert_eq!(
        again,
        serde_json::json!({"networks": 0, "networks_present": 1, "passphrases": 0,
            "passphrases_present": 2, "nodes": 0, "nodes_present": 3, "nodes_expired": 0})
    );
    assert_eq!(
        portal.dump(),
        portal_before,
        "migrate only reads the portal"
    );

    // No secret of the portal's is anywhere in the data dir in clear; the key of the
    // node the portal would call expired is not kept at all.
    let mut scanned = 0;
    for file in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(file.unwrap().path()).unwrap();
        scanned += bytes.len();
        for secret in [
            &b"pending1"[..],
            hex::encode(live_key).as_bytes(),
            &live_key,
        ] {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret));
        }
    }
    assert!(scanned > 0);
    let store = SqliteStore::open(&dir.path().join("registrar.sqlite"), Creation::Never).unwrap();
    let stored = |id| {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(store.node(id))
            .unwrap()
            .expect("migrated")
    };
    assert_eq!(stored(old).status, NodeStatus::Expired);
    assert_eq!(stored(old).key, StoredNodeKey::None);
    assert!(matches!(stored(live).key, StoredNodeKey::Sealed(_)));
    drop(store);

    // The native listener serves them: the node's key works, the passphrases register,
    // the node the portal would call expired is refused.
    let dir_path = dir.path().to_owned();
    let l = Listener::start_in(Backend::Sqlite, dir, &[]);
    assert_eq!(l.data_dir.path(), dir_path);
    let state = |id, key: &[u8; 32]| {
        tcp_exchange(l.ports.state_tcp, &state_frame(id, key, StateCode::Offline))
    };
    assert_eq!(state(live, &live_key), REPLY_200);
    assert_eq!(state(old, &old_key), 403u16.to_le_bytes());
    assert_eq!(state(revoked, &live_key), 403u16.to_le_bytes());
    let (reply, key) = register(&l, None, "lab", "pending2");
    let id = decode_reply_upstream(&reply, &key);
    assert_eq!(l.node_json(id)["name"], "later-2");
    let moved = l.node_json(live);
    assert_eq!(
        (
            moved["status"].as_str(),
            moved["arch"].as_str(),
            moved["owner"].as_str()
        ),
        (Some("offline"), Some("esp32"), Some("alice"))
    );
}
