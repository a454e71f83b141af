//! The battery of [`IjamStore`]: networks, passphrases, registrations, transitions.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use registrar::store::StoreError;
use registrar::store::ijam::{
    IjamStore, Network, NewPassphrase, Node, NodeStatus, PassphraseHash, PendingPassphrase,
    RegisterOp, RegisterOutcome, ReplayKey, Reregistration, SealedNodeKey, StateFrameDigest,
    StoredNodeKey, StoredPassphrase, TransitionOutcome,
};
use uuid::Uuid;

crate::store::battery!(crate::store::ijam;
    by_ref:
        networks_create_get_list,
        delete_network_takes_its_nodes_and_passphrases,
        passphrases_add_and_list,
        passphrase_batch_is_all_or_nothing,
        passphrase_revoke,
        unknown_network_errors,
        register_creates_node,
        register_consumes_passphrase,
        register_unknown_network,
        register_expired_passphrase,
        register_requested_unknown_id,
        register_reregisters_same_owner,
        register_other_owner_gets_fresh_id,
        register_revoked_id_gets_fresh_id,
        register_keeps_the_key_sealed_for_the_id_it_picks,
        register_replay,
        replay_expires,
        transition_table,
        a_repeated_state_frame_changes_nothing,
        transition_unknown_node,
        revoke_node,
        nodes_sorted,
        import_node_writes_a_node_as_it_stands,
        legacy_sealed_keys_are_listed_and_replaced_only_while_unchanged,
        networks_keep_their_reregistration_rule,
        a_passphrase_is_minted_only_for_a_node_of_its_network,
        a_passphrase_minted_for_a_node_reregisters_that_node_only,
        the_minted_rule_refuses_a_plain_passphrase_on_an_existing_node;
    shared: concurrent_registrations,
);

const NOW: i64 = 1_700_000_000_000;
const TTL: i64 = 60_000;

/// 32 bytes derived from a label, distinct for distinct labels in practice.
fn bytes(label: &str) -> [u8; 32] {
    let l = label.as_bytes();
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = l[i % l.len()].wrapping_mul(31).wrapping_add(i as u8) ^ (l.len() as u8);
    }
    out[31] = l
        .iter()
        .fold(0u8, |a, b| a.wrapping_mul(131).wrapping_add(*b));
    out
}

pub(super) fn hash(label: &str) -> PassphraseHash {
    PassphraseHash(bytes(&format!("pp:{label}")))
}

fn replay(label: &str) -> ReplayKey {
    ReplayKey(bytes(&format!("replay:{label}")))
}

/// A sealed key as the flow makes them (a version byte and 60 bytes): the stores keep
/// it as it comes.
fn sealed(label: &str) -> StoredNodeKey {
    let mut value = vec![0x02];
    value.extend_from_slice(&bytes(&format!("key:{label}")).repeat(2)[..60]);
    StoredNodeKey::Sealed(SealedNodeKey(value))
}

/// The sealed key of registration `label` as the flow seals it for node `node`.
pub(super) fn sealed_for(label: &str, node: Uuid) -> StoredNodeKey {
    sealed(&format!("{label} for {node}"))
}

/// A sealed key in the first format, not bound to its node (60 bytes), as stores
/// made before the binding hold them.
fn legacy_sealed(label: &str) -> SealedNodeKey {
    let value = bytes(&format!("legacy:{label}")).repeat(2)[..60].to_vec();
    assert!(SealedNodeKey(value.clone()).is_legacy());
    SealedNodeKey(value)
}

fn stored(label: &str) -> StoredPassphrase {
    StoredPassphrase::Hash(hash(label))
}

/// A state frame's digest never used before (each transition sends a new frame).
fn fresh_frame() -> StateFrameDigest {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    StateFrameDigest(bytes(&format!("frame:{n}")))
}

pub(super) fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x1000_0000_0000_4000_8000_0000_0000_0000 + n)
}

pub(super) fn pp(label: &str, node_name: &str, expires_ms: Option<i64>) -> NewPassphrase {
    NewPassphrase {
        passphrase: stored(label),
        node_name: node_name.to_owned(),
        expires_ms,
        for_node: None,
    }
}

/// A registration with passphrase `label`, replay key `label`, fresh id `fresh`.
pub(super) fn op(network: &str, label: &str, fresh: Uuid) -> RegisterOp {
    RegisterOp {
        network: network.to_owned(),
        passphrase: stored(label),
        replay_key: replay(label),
        replay_ttl_ms: TTL,
        requested_id: None,
        fresh_id: fresh,
        fresh_node_key: sealed_for(label, fresh),
        requested_node_key: None,
        node_type: "device",
        arch: "esp32",
        now_ms: NOW,
    }
}

/// [`op`] naming node `requested`, its key sealed for that id as well.
pub(super) fn op_requesting(
    network: &str,
    label: &str,
    fresh: Uuid,
    requested: Uuid,
) -> RegisterOp {
    RegisterOp {
        requested_id: Some(requested),
        requested_node_key: Some(sealed_for(label, requested)),
        ..op(network, label, fresh)
    }
}

pub(super) async fn network_with<S: IjamStore>(
    s: &S,
    net: &str,
    owner: &str,
    pps: &[(&str, &str)],
) {
    s.create_network(
        net,
        owner,
        &format!("{net} name"),
        Reregistration::Owner,
        NOW - 1000,
    )
    .await
    .expect("create");
    let batch = pps
        .iter()
        .map(|(label, name)| pp(label, name, None))
        .collect();
    s.add_passphrases(net, batch, NOW - 500)
        .await
        .expect("add passphrases");
}

/// Registers a node through a fresh passphrase and returns its id.
pub(super) async fn new_node<S: IjamStore>(s: &S, net: &str, label: &str, fresh: Uuid) -> Uuid {
    s.add_passphrases(
        net,
        vec![pp(label, &format!("node-{label}"), None)],
        NOW - 100,
    )
    .await
    .expect("add passphrase");
    match s.register(op(net, label, fresh)).await.expect("register") {
        RegisterOutcome::Created { node_id } => node_id,
        other => panic!("expected Created, got {other:?}"),
    }
}

fn names(list: &[PendingPassphrase]) -> Vec<&str> {
    list.iter().map(|p| p.node_name.as_str()).collect()
}

/// Everything observable about one network, to assert that "nothing changed".
async fn snapshot<S: IjamStore>(
    s: &S,
    net: &str,
) -> (Option<Network>, Vec<PendingPassphrase>, Vec<Node>) {
    (
        s.network(net).await.unwrap(),
        s.passphrases(net).await.unwrap(),
        s.nodes(Some(net)).await.unwrap(),
    )
}

pub async fn networks_create_get_list<S: IjamStore>(s: &S) {
    assert_eq!(s.networks().await.unwrap(), vec![]);
    let b = s
        .create_network("beta", "bob", "Beta net", Reregistration::Owner, NOW)
        .await
        .unwrap();
    assert_eq!(b.id, "beta");
    assert_eq!(b.owner, "bob");
    assert_eq!(b.name, "Beta net");
    assert_eq!(b.created_ms, NOW);
    assert_eq!((b.pending_passphrases, b.nodes), (0, 0));
    let a = s
        .create_network(
            "alpha",
            "alice",
            "Alpha net",
            Reregistration::Owner,
            NOW + 1,
        )
        .await
        .unwrap();

    assert_eq!(s.network("beta").await.unwrap(), Some(b.clone()));
    assert_eq!(s.network("alpha").await.unwrap(), Some(a.clone()));
    assert_eq!(s.network("gamma").await.unwrap(), None);
    assert_eq!(
        s.networks().await.unwrap(),
        vec![a, b.clone()],
        "sorted by id"
    );

    match s
        .create_network("beta", "mallory", "Other", Reregistration::Owner, NOW + 2)
        .await
    {
        Err(StoreError::NetworkExists(net)) => assert_eq!(net, "beta"),
        other => panic!("expected NetworkExists, got {other:?}"),
    }
    assert_eq!(
        s.network("beta").await.unwrap(),
        Some(b),
        "the existing network is untouched"
    );
    assert_eq!(s.networks().await.unwrap().len(), 2);
}

pub async fn passphrases_add_and_list<S: IjamStore>(s: &S) {
    s.create_network("net", "alice", "Net", Reregistration::Owner, NOW)
        .await
        .unwrap();
    assert_eq!(s.passphrases("net").await.unwrap(), vec![]);
    s.add_passphrases(
        "net",
        vec![pp("one", "zeta", Some(NOW + 5000)), pp("two", "eta", None)],
        NOW + 10,
    )
    .await
    .unwrap();
    // Later, with a name that sorts first: order is (created_ms, node_name).
    s.add_passphrases(
        "net",
        vec![pp("three", "alpha|pipe", Some(NOW - 1))],
        NOW + 20,
    )
    .await
    .unwrap();
    s.add_passphrases("net", vec![], NOW + 30)
        .await
        .expect("an empty batch is fine");
    assert_eq!(
        s.passphrases("net").await.unwrap(),
        vec![
            PendingPassphrase {
                node_name: "eta".into(),
                created_ms: NOW + 10,
                expires_ms: None,
                for_node: None,
            },
            PendingPassphrase {
                node_name: "zeta".into(),
                created_ms: NOW + 10,
                expires_ms: Some(NOW + 5000),
                for_node: None,
            },
            PendingPassphrase {
                node_name: "alpha|pipe".into(),
                created_ms: NOW + 20,
                expires_ms: Some(NOW - 1),
                for_node: None,
            },
        ]
    );
    let net = s.network("net").await.unwrap().unwrap();
    assert_eq!(net.pending_passphrases, 3, "expired ones count too");
    assert_eq!(net.nodes, 0);
}

pub async fn passphrase_batch_is_all_or_nothing<S: IjamStore>(s: &S) {
    match s
        .add_passphrases("nowhere", vec![pp("a", "a", None)], NOW)
        .await
    {
        Err(StoreError::UnknownNetwork(net)) => assert_eq!(net, "nowhere"),
        other => panic!("expected UnknownNetwork, got {other:?}"),
    }
    assert_eq!(s.network("nowhere").await.unwrap(), None);

    s.create_network("net", "alice", "Net", Reregistration::Owner, NOW)
        .await
        .unwrap();
    s.add_passphrases("net", vec![pp("taken", "node-1", None)], NOW)
        .await
        .unwrap();
    let before = s.passphrases("net").await.unwrap();

    // A node name already pending.
    match s
        .add_passphrases(
            "net",
            vec![pp("b", "node-2", None), pp("c", "node-1", None)],
            NOW,
        )
        .await
    {
        Err(StoreError::PassphraseNameTaken { network, node_name }) => {
            assert_eq!((network.as_str(), node_name.as_str()), ("net", "node-1"));
        }
        other => panic!("expected PassphraseNameTaken, got {other:?}"),
    }
    assert_eq!(s.passphrases("net").await.unwrap(), before);

    // A secret already pending.
    match s
        .add_passphrases(
            "net",
            vec![pp("d", "node-3", None), pp("taken", "node-4", None)],
            NOW,
        )
        .await
    {
        Err(StoreError::PassphraseTaken(network)) => assert_eq!(network, "net"),
        other => panic!("expected PassphraseTaken, got {other:?}"),
    }
    assert_eq!(s.passphrases("net").await.unwrap(), before);

    // Duplicates inside one batch.
    match s
        .add_passphrases(
            "net",
            vec![pp("e", "twin", None), pp("f", "twin", None)],
            NOW,
        )
        .await
    {
        Err(StoreError::PassphraseNameTaken { node_name, .. }) => assert_eq!(node_name, "twin"),
        other => panic!("expected PassphraseNameTaken, got {other:?}"),
    }
    match s
        .add_passphrases(
            "net",
            vec![pp("g", "node-5", None), pp("g", "node-6", None)],
            NOW,
        )
        .await
    {
        Err(StoreError::PassphraseTaken(network)) => assert_eq!(network, "net"),
        other => panic!("expected PassphraseTaken, got {other:?}"),
    }
    assert_eq!(s.passphrases("net").await.unwrap(), before);
    assert_eq!(
        s.network("net").await.unwrap().unwrap().pending_passphrases,
        1
    );

    // The refused names and secrets are still free.
    s.add_passphrases(
        "net",
        vec![pp("b", "node-2", None), pp("g", "twin", None)],
        NOW,
    )
    .await
    .unwrap();
    assert_eq!(
        names(&s.passphrases("net").await.unwrap()),
        ["node-1", "node-2", "twin"]
    );
}

pub async fn passphrase_revoke<S: IjamStore>(s: &S) {
    network_with(s, "net", "alice", &[("a", "node-a"), ("b", "node-b")]).await;
    s.revoke_passphrase("net", "node-a").await.unwrap();
    assert_eq!(names(&s.passphrases("net").await.unwrap()), ["node-b"]);
    assert_eq!(
        s.register(op("net", "a", id(1))).await.unwrap(),
        RegisterOutcome::InvalidPassphrase
    );
    assert_eq!(s.nodes(Some("net")).await.unwrap(), vec![]);

    for name in ["node-a", "nobody"] {
        match s.revoke_passphrase("net", name).await {
            Err(StoreError::UnknownPassphraseName { network, node_name }) => {
                assert_eq!((network.as_str(), node_name.as_str()), ("net", name));
            }
            other => panic!("expected UnknownPassphraseName, got {other:?}"),
        }
    }
    // The name is free again, and the other passphrase still works.
    s.add_passphrases("net", vec![pp("a2", "node-a", None)], NOW)
        .await
        .unwrap();
    assert_eq!(
        names(&s.passphrases("net").await.unwrap()),
        ["node-b", "node-a"]
    );
    assert!(matches!(
        s.register(op("net", "b", id(2))).await.unwrap(),
        RegisterOutcome::Created { .. }
    ));
}

/// Reads and the per-network admin operations on a network that does not exist.
pub async fn unknown_network_errors<S: IjamStore>(s: &S) {
    assert!(
        matches!(s.passphrases("nowhere").await, Err(StoreError::UnknownNetwork(n)) if n == "nowhere")
    );
    assert!(
        matches!(s.nodes(Some("nowhere")).await, Err(StoreError::UnknownNetwork(n)) if n == "nowhere")
    );
    assert!(matches!(
        s.revoke_passphrase("nowhere", "x").await,
        Err(StoreError::UnknownNetwork(n)) if n == "nowhere"
    ));
    assert_eq!(s.nodes(None).await.unwrap(), vec![]);
}

pub async fn delete_network_takes_its_nodes_and_passphrases<S: IjamStore>(s: &S) {
    network_with(s, "gone", "alice", &[("a", "n1"), ("b", "n2"), ("c", "n3")]).await;
    network_with(s, "kept", "alice", &[("d", "k1")]).await;
    for (label, n) in [("a", 1), ("b", 2)] {
        s.register(op("gone", label, id(n))).await.unwrap();
    }
    s.register(op("kept", "d", id(3))).await.unwrap();
    assert_eq!(s.delete_network("gone").await.unwrap(), 2);
    assert_eq!(s.network("gone").await.unwrap(), None);
    assert_eq!(
        (s.node(id(1)).await.unwrap(), s.node(id(2)).await.unwrap()),
        (None, None)
    );
    assert!(matches!(
        s.passphrases("gone").await,
        Err(StoreError::UnknownNetwork(_))
    ));
    // A retry of a registration in the deleted network finds no network, and its
    // passphrase does not come back with a new network of the same name.
    assert_eq!(
        s.register(op("gone", "a", id(4))).await.unwrap(),
        RegisterOutcome::InvalidPassphrase
    );
    s.create_network("gone", "bob", "again", Reregistration::Owner, NOW)
        .await
        .unwrap();
    for label in ["a", "c"] {
        assert_eq!(
            s.register(op("gone", label, id(5))).await.unwrap(),
            RegisterOutcome::InvalidPassphrase,
            "{label}: no replay, no passphrase of the old network"
        );
    }
    // The other network is untouched.
    assert!(s.node(id(3)).await.unwrap().is_some());
    assert_eq!(s.networks().await.unwrap().len(), 2);
    assert!(matches!(
        s.delete_network("never").await,
        Err(StoreError::UnknownNetwork(_))
    ));
}

pub async fn register_creates_node<S: IjamStore>(s: &S) {
    network_with(s, "net", "alice", &[("a", "sensor-1"), ("b", "sensor-2")]).await;
    let outcome = s.register(op("net", "a", id(1))).await.unwrap();
    assert_eq!(outcome, RegisterOutcome::Created { node_id: id(1) });

    let expected = Node {
        id: id(1),
        network: "net".into(),
        owner: "alice".into(),
        name: "sensor-1".into(),
        node_type: "device".into(),
        arch: "esp32".into(),
        status: NodeStatus::Offline,
        key: sealed_for("a", id(1)),
        ip: String::new(),
        created_ms: NOW,
        registered_ms: NOW,
        online_ms: 0,
    };
    assert_eq!(s.node(id(1)).await.unwrap(), Some(expected.clone()));
    assert_eq!(s.node(id(99)).await.unwrap(), None);
    assert_eq!(names(&s.passphrases("net").await.unwrap()), ["sensor-2"]);
    assert_eq!(s.nodes(Some("net")).await.unwrap(), vec![expected.clone()]);
    assert_eq!(s.nodes(None).await.unwrap(), vec![expected]);
    let net = s.network("net").await.unwrap().unwrap();
    assert_eq!((net.pending_passphrases, net.nodes), (1, 1));
    // The consumed passphrase's node name is free for a new passphrase.
    s.add_passphrases("net", vec![pp("a2", "sensor-1", None)], NOW + 1)
        .await
        .unwrap();
    assert_eq!(
        names(&s.passphrases("net").await.unwrap()),
        ["sensor-2", "sensor-1"]
    );
}

pub async fn register_consumes_passphrase<S: IjamStore>(s: &S) {
    network_with(s, "net", "alice", &[("a", "node-a")]).await;
    assert!(matches!(
        s.register(op("net", "a", id(1))).await.unwrap(),
        RegisterOutcome::Created { .. }
    ));
    let before = snapshot(s, "net").await;
    let mut again = op("net", "a", id(2));
    again.replay_key = replay("another request");
    assert_eq!(
        s.register(again).await.unwrap(),
        RegisterOutcome::InvalidPassphrase
    );
    assert_eq!(snapshot(s, "net").await, before);
    assert_eq!(s.node(id(2)).await.unwrap(), None);
}

pub async fn register_unknown_network<S: IjamStore>(s: &S) {
    network_with(s, "net", "alice", &[("a", "node-a")]).await;
    let before = snapshot(s, "net").await;
    // The right passphrase hash, the wrong network.
    assert_eq!(
        s.register(op("other", "a", id(1))).await.unwrap(),
        RegisterOutcome::InvalidPassphrase
    );
    assert_eq!(snapshot(s, "net").await, before);
    assert_eq!(s.node(id(1)).await.unwrap(), None);
    assert_eq!(s.network("other").await.unwrap(), None);
}

pub async fn register_expired_passphrase<S: IjamStore>(s: &S) {
    s.create_network("net", "alice", "Net", Reregistration::Owner, NOW - 1000)
        .await
        .unwrap();
    s.add_passphrases(
        "net",
        vec![
            pp("past", "old", Some(NOW - 1)),
            pp("edge", "edge", Some(NOW)),
            pp("next", "next", Some(NOW + 1)),
        ],
        NOW - 500,
    )
    .await
    .unwrap();
    let before = snapshot(s, "net").await;
    for label in ["past", "edge"] {
        assert_eq!(
            s.register(op("net", label, id(1))).await.unwrap(),
            RegisterOutcome::InvalidPassphrase,
            "expires_ms <= now_ms: {label}"
        );
    }
    assert_eq!(
        snapshot(s, "net").await,
        before,
        "an expired passphrase stays listed"
    );
    assert_eq!(
        s.register(op("net", "next", id(2))).await.unwrap(),
        RegisterOutcome::Created { node_id: id(2) }
    );
}

pub async fn register_requested_unknown_id<S: IjamStore>(s: &S) {
    network_with(s, "net", "alice", &[("a", "node-a")]).await;
    let request = op_requesting("net", "a", id(1), id(50));
    assert_eq!(
        s.register(request).await.unwrap(),
        RegisterOutcome::Created { node_id: id(50) }
    );
    assert_eq!(s.node(id(1)).await.unwrap(), None);
    let node = s
        .node(id(50))
        .await
        .unwrap()
        .expect("created under the requested id");
    assert_eq!(
        (node.owner.as_str(), node.name.as_str()),
        ("alice", "node-a")
    );
    assert_eq!(s.nodes(Some("net")).await.unwrap(), vec![node]);
}

pub async fn register_reregisters_same_owner<S: IjamStore>(s: &S) {
    network_with(s, "one", "alice", &[("a", "first"), ("b", "second")]).await;
    network_with(s, "two", "alice", &[("c", "third")]).await;
    let node_id = new_node(s, "one", "n", id(1)).await;
    assert_eq!(
        s.transition(
            node_id,
            NodeStatus::Online,
            "192.0.2.7",
            NOW + 10,
            fresh_frame()
        )
        .await
        .unwrap(),
        TransitionOutcome::Changed {
            from: NodeStatus::Offline
        }
    );
    let original = s.node(node_id).await.unwrap().unwrap();

    // Same network.
    let mut request = op_requesting("one", "a", id(2), node_id);
    request.now_ms = NOW + 100;
    request.node_type = "fog";
    request.arch = "rpi_linux";
    assert_eq!(
        s.register(request).await.unwrap(),
        RegisterOutcome::Reregistered { node_id }
    );
    let expected = Node {
        name: "first".into(),
        node_type: "fog".into(),
        arch: "rpi_linux".into(),
        status: NodeStatus::Offline,
        key: sealed_for("a", node_id),
        registered_ms: NOW + 100,
        ..original.clone()
    };
    assert_eq!(expected.ip, "192.0.2.7");
    assert_eq!(expected.online_ms, NOW + 10);
    assert_eq!(expected.created_ms, NOW);
    assert_eq!(s.node(node_id).await.unwrap(), Some(expected));
    assert_eq!(s.node(id(2)).await.unwrap(), None);
    assert_eq!(s.network("one").await.unwrap().unwrap().nodes, 1);

    // Another network of the same owner: the node moves.
    let mut request = op_requesting("two", "c", id(3), node_id);
    request.now_ms = NOW + 200;
    assert_eq!(
        s.register(request).await.unwrap(),
        RegisterOutcome::Reregistered { node_id }
    );
    let moved = s.node(node_id).await.unwrap().unwrap();
    assert_eq!(
        moved,
        Node {
            network: "two".into(),
            name: "third".into(),
            status: NodeStatus::Offline,
            key: sealed_for("c", node_id),
            registered_ms: NOW + 200,
            ..original
        }
    );
    assert_eq!(s.nodes(Some("one")).await.unwrap(), vec![]);
    assert_eq!(s.nodes(Some("two")).await.unwrap(), vec![moved.clone()]);
    assert_eq!(s.nodes(None).await.unwrap(), vec![moved]);
    assert_eq!(s.network("one").await.unwrap().unwrap().nodes, 0);
    assert_eq!(s.network("two").await.unwrap().unwrap().nodes, 1);
    assert_eq!(names(&s.passphrases("one").await.unwrap()), ["second"]);
    assert_eq!(s.passphrases("two").await.unwrap(), vec![]);
}

pub async fn register_other_owner_gets_fresh_id<S: IjamStore>(s: &S) {
    network_with(s, "alices", "alice", &[]).await;
    network_with(s, "bobs", "bob", &[("b", "bob-node")]).await;
    let alices_node = new_node(s, "alices", "n", id(1)).await;
    let before = s.node(alices_node).await.unwrap().unwrap();

    let mut request = op_requesting("bobs", "b", id(2), alices_node);
    request.now_ms = NOW + 100;
    assert_eq!(
        s.register(request).await.unwrap(),
        RegisterOutcome::Created { node_id: id(2) }
    );
    assert_eq!(s.node(alices_node).await.unwrap(), Some(before.clone()));
    let bobs = s.node(id(2)).await.unwrap().unwrap();
    assert_eq!(
        (bobs.owner.as_str(), bobs.network.as_str()),
        ("bob", "bobs")
    );
    assert_eq!(s.nodes(Some("alices")).await.unwrap(), vec![before]);
    assert_eq!(s.nodes(Some("bobs")).await.unwrap(), vec![bobs]);
}

pub async fn register_revoked_id_gets_fresh_id<S: IjamStore>(s: &S) {
    network_with(s, "net", "alice", &[("a", "again")]).await;
    let old = new_node(s, "net", "n", id(1)).await;
    s.revoke_node(old).await.unwrap();
    let revoked = s.node(old).await.unwrap().unwrap();

    let mut request = op_requesting("net", "a", id(2), old);
    request.now_ms = NOW + 100;
    assert_eq!(
        s.register(request).await.unwrap(),
        RegisterOutcome::Created { node_id: id(2) }
    );
    assert_eq!(s.node(old).await.unwrap(), Some(revoked));
    assert_eq!(
        s.node(id(2)).await.unwrap().unwrap().status,
        NodeStatus::Offline
    );
    assert_eq!(s.network("net").await.unwrap().unwrap().nodes, 2);
}

async fn key_of<S: IjamStore>(s: &S, node: Uuid) -> StoredNodeKey {
    s.node(node).await.unwrap().expect("the node exists").key
}

/// A sealed key is bound to its node's id, and the store picks the id inside its atomic
/// call: the flow seals the key for each id the registration may get, and the store
/// keeps the one sealed for the id it picked, whichever outcome that is.
pub async fn register_keeps_the_key_sealed_for_the_id_it_picks<S: IjamStore>(s: &S) {
    let pps = [("a", "a"), ("b", "b"), ("c", "c"), ("d", "d"), ("e", "e")];
    network_with(s, "net", "alice", &pps).await;
    network_with(s, "bobs", "bob", &[]).await;
    let bobs_node = new_node(s, "bobs", "bob-node", id(90)).await;

    // No id requested: the fresh one.
    assert_eq!(
        s.register(op("net", "a", id(1))).await.unwrap(),
        RegisterOutcome::Created { node_id: id(1) }
    );
    assert_eq!(key_of(s, id(1)).await, sealed_for("a", id(1)));
    // An id no node has: that id.
    assert_eq!(
        s.register(op_requesting("net", "b", id(2), id(20)))
            .await
            .unwrap(),
        RegisterOutcome::Created { node_id: id(20) }
    );
    assert_eq!(key_of(s, id(20)).await, sealed_for("b", id(20)));
    // The owner's own node again: its id.
    assert_eq!(
        s.register(op_requesting("net", "c", id(3), id(1)))
            .await
            .unwrap(),
        RegisterOutcome::Reregistered { node_id: id(1) }
    );
    assert_eq!(key_of(s, id(1)).await, sealed_for("c", id(1)));
    // Another owner's node: the fresh id, and that node keeps its key.
    assert_eq!(
        s.register(op_requesting("net", "d", id(4), bobs_node))
            .await
            .unwrap(),
        RegisterOutcome::Created { node_id: id(4) }
    );
    assert_eq!(key_of(s, id(4)).await, sealed_for("d", id(4)));
    assert_eq!(
        key_of(s, bobs_node).await,
        sealed_for("bob-node", bobs_node)
    );
    // A revoked node: the fresh id, and the revoked key stays erased.
    s.revoke_node(id(20)).await.unwrap();
    assert_eq!(
        s.register(op_requesting("net", "e", id(5), id(20)))
            .await
            .unwrap(),
        RegisterOutcome::Created { node_id: id(5) }
    );
    assert_eq!(key_of(s, id(5)).await, sealed_for("e", id(5)));
    assert_eq!(key_of(s, id(20)).await, StoredNodeKey::None);
}

pub async fn register_replay<S: IjamStore>(s: &S) {
    network_with(s, "net", "alice", &[("a", "node-a"), ("b", "node-b")]).await;
    let first = op("net", "a", id(1));
    assert_eq!(
        s.register(first.clone()).await.unwrap(),
        RegisterOutcome::Created { node_id: id(1) }
    );
    let before = snapshot(s, "net").await;

    // The byte-identical retry, a little later.
    let mut retry = first.clone();
    retry.now_ms = NOW + 10;
    assert_eq!(
        s.register(retry.clone()).await.unwrap(),
        RegisterOutcome::Replayed { node_id: id(1) }
    );
    // Whatever else the op says, the replay key decides, and nothing changes.
    retry.fresh_id = id(2);
    retry.fresh_node_key = sealed("other");
    retry.passphrase = stored("b");
    assert_eq!(
        s.register(retry).await.unwrap(),
        RegisterOutcome::Replayed { node_id: id(1) }
    );
    assert_eq!(snapshot(s, "net").await, before);
    assert_eq!(s.node(id(2)).await.unwrap(), None);
}

/// After the replay TTL the retry is an ordinary request: its passphrase is used.
/// SQLite reads the TTL against `now_ms`; Redis holds it as a real key TTL, so the
/// TTL is short and the test polls (bounded) until the entry is gone.
pub async fn replay_expires<S: IjamStore>(s: &S) {
    network_with(s, "net", "alice", &[("a", "node-a")]).await;
    let mut first = op("net", "a", id(1));
    first.replay_ttl_ms = 50;
    assert_eq!(
        s.register(first.clone()).await.unwrap(),
        RegisterOutcome::Created { node_id: id(1) }
    );
    let before = snapshot(s, "net").await;

    let mut later = first;
    later.now_ms = NOW + 1000;
    let deadline = Instant::now() + Duration::from_secs(5);
    let outcome = loop {
        match s.register(later.clone()).await.unwrap() {
            RegisterOutcome::Replayed { node_id } if Instant::now() < deadline => {
                assert_eq!(node_id, id(1));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            outcome => break outcome,
        }
    };
    assert_eq!(
        outcome,
        RegisterOutcome::InvalidPassphrase,
        "the replay entry never expired"
    );
    assert_eq!(snapshot(s, "net").await, before);
}

/// The frame that last changed a node, sent again (a replay from elsewhere, or a
/// retry), is answered as repeated and changes nothing, not even the address; any
/// other frame is judged as usual, an older one included.
pub async fn a_repeated_state_frame_changes_nothing<S: IjamStore>(s: &S) {
    network_with(s, "net", "alice", &[]).await;
    let node_id = new_node(s, "net", "n1", id(1)).await;
    let (online, offline) = (fresh_frame(), fresh_frame());
    assert_eq!(
        s.transition(node_id, NodeStatus::Online, "192.0.2.1", NOW + 1, online)
            .await
            .unwrap(),
        TransitionOutcome::Changed {
            from: NodeStatus::Offline
        }
    );
    let before = s.node(node_id).await.unwrap();
    assert_eq!(
        s.transition(node_id, NodeStatus::Online, "203.0.113.66", NOW + 2, online)
            .await
            .unwrap(),
        TransitionOutcome::Repeated {
            status: NodeStatus::Online
        }
    );
    assert_eq!(s.node(node_id).await.unwrap(), before, "nothing changed");
    // A frame that is not the last one is judged as any other.
    assert_eq!(
        s.transition(node_id, NodeStatus::Offline, "", NOW + 3, offline)
            .await
            .unwrap(),
        TransitionOutcome::Changed {
            from: NodeStatus::Online
        }
    );
    assert_eq!(
        s.transition(node_id, NodeStatus::Online, "203.0.113.66", NOW + 4, online)
            .await
            .unwrap(),
        TransitionOutcome::Changed {
            from: NodeStatus::Offline
        }
    );
    // A refused frame is not remembered.
    let loading = fresh_frame();
    s.transition(node_id, NodeStatus::Offline, "", NOW + 5, fresh_frame())
        .await
        .unwrap();
    assert_eq!(
        s.transition(node_id, NodeStatus::Loading, "", NOW + 6, loading)
            .await
            .unwrap(),
        TransitionOutcome::NotAllowed {
            from: NodeStatus::Offline
        }
    );
    assert_eq!(
        s.transition(node_id, NodeStatus::Loading, "", NOW + 7, loading)
            .await
            .unwrap(),
        TransitionOutcome::NotAllowed {
            from: NodeStatus::Offline
        }
    );
}

pub async fn transition_table<S: IjamStore>(s: &S) {
    use NodeStatus::{Created, Expired, Loading, Offline, Online, Revoked};
    let all = [Offline, Online, Loading, Revoked];
    // DESIGN.md, state request: online from offline/online/loading; loading from
    // online; offline from offline/online/loading; revoked never by a transition.
    let allowed = |from: NodeStatus, to: NodeStatus| match to {
        Online | Offline => matches!(from, Offline | Online | Loading),
        Loading => from == Online,
        _ => false,
    };
    network_with(s, "net", "alice", &[]).await;
    let mut n = 0;
    for from in all {
        for to in all {
            assert_eq!(
                to.allowed_origins().contains(&from),
                allowed(from, to),
                "{from:?} -> {to:?}"
            );
            n += 1;
            let node_id = new_node(s, "net", &format!("n{n}"), id(n)).await;
            match from {
                Offline => {}
                Online => {
                    s.transition(node_id, Online, "198.51.100.1", NOW + 1, fresh_frame())
                        .await
                        .unwrap();
                }
                Loading => {
                    s.transition(node_id, Online, "198.51.100.1", NOW + 1, fresh_frame())
                        .await
                        .unwrap();
                    s.transition(node_id, Loading, "", NOW + 2, fresh_frame())
                        .await
                        .unwrap();
                }
                Revoked => s.revoke_node(node_id).await.unwrap(),
                Expired | Created => unreachable!("not in the table"),
            }
            let before = s.node(node_id).await.unwrap().unwrap();
            assert_eq!(before.status, from);

            let outcome = s
                .transition(node_id, to, "203.0.113.9", NOW + 50, fresh_frame())
                .await
                .unwrap();
            let after = s.node(node_id).await.unwrap().unwrap();
            if allowed(from, to) {
                assert_eq!(
                    outcome,
                    TransitionOutcome::Changed { from },
                    "{from:?} -> {to:?}"
                );
                let expected = if to == Online {
                    Node {
                        status: to,
                        ip: "203.0.113.9".into(),
                        online_ms: NOW + 50,
                        ..before
                    }
                } else {
                    Node {
                        status: to,
                        ..before
                    }
                };
                assert_eq!(after, expected, "{from:?} -> {to:?}");
            } else {
                assert_eq!(
                    outcome,
                    TransitionOutcome::NotAllowed { from },
                    "{from:?} -> {to:?}"
                );
                assert_eq!(after, before, "{from:?} -> {to:?}");
            }
        }
    }
}

pub async fn transition_unknown_node<S: IjamStore>(s: &S) {
    for target in [
        NodeStatus::Online,
        NodeStatus::Offline,
        NodeStatus::Loading,
        NodeStatus::Revoked,
    ] {
        assert_eq!(
            s.transition(id(404), target, "203.0.113.9", NOW, fresh_frame())
                .await
                .unwrap(),
            TransitionOutcome::UnknownNode
        );
    }
    assert_eq!(
        s.node(id(404)).await.unwrap(),
        None,
        "a transition creates nothing"
    );
}

pub async fn revoke_node<S: IjamStore>(s: &S) {
    network_with(s, "net", "alice", &[]).await;
    let node_id = new_node(s, "net", "n", id(1)).await;
    s.transition(
        node_id,
        NodeStatus::Online,
        "192.0.2.1",
        NOW + 1,
        fresh_frame(),
    )
    .await
    .unwrap();
    let before = s.node(node_id).await.unwrap().unwrap();
    assert!(matches!(&before.key, StoredNodeKey::Sealed(k) if !k.0.is_empty()));

    s.revoke_node(node_id).await.unwrap();
    let after = s.node(node_id).await.unwrap().unwrap();
    assert_eq!(
        after,
        Node {
            status: NodeStatus::Revoked,
            key: StoredNodeKey::None,
            ..before
        }
    );
    assert_eq!(
        s.transition(
            node_id,
            NodeStatus::Online,
            "192.0.2.2",
            NOW + 2,
            fresh_frame()
        )
        .await
        .unwrap(),
        TransitionOutcome::NotAllowed {
            from: NodeStatus::Revoked
        }
    );
    s.revoke_node(node_id)
        .await
        .expect("revoking twice is fine");
    assert_eq!(s.node(node_id).await.unwrap(), Some(after));

    match s.revoke_node(id(404)).await {
        Err(StoreError::UnknownNode(missing)) => assert_eq!(missing, id(404)),
        other => panic!("expected UnknownNode, got {other:?}"),
    }
    assert_eq!(s.node(id(404)).await.unwrap(), None);
}

pub async fn nodes_sorted<S: IjamStore>(s: &S) {
    network_with(s, "b-net", "bob", &[]).await;
    network_with(s, "a-net", "alice", &[]).await;
    // (network, label, id, now_ms): created_ms first, then id.
    let plan = [
        ("b-net", "p1", id(9), NOW + 30),
        ("a-net", "p2", id(5), NOW + 10),
        ("a-net", "p3", id(7), NOW + 20),
        ("b-net", "p4", id(3), NOW + 20),
        ("a-net", "p5", id(1), NOW + 40),
    ];
    for (net, label, node_id, now) in plan {
        s.add_passphrases(net, vec![pp(label, label, None)], NOW)
            .await
            .unwrap();
        let mut request = op(net, label, node_id);
        request.now_ms = now;
        assert_eq!(
            s.register(request).await.unwrap(),
            RegisterOutcome::Created { node_id }
        );
    }
    let ids = |nodes: Vec<Node>| nodes.into_iter().map(|n| n.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.nodes(None).await.unwrap()),
        [id(5), id(3), id(7), id(9), id(1)]
    );
    assert_eq!(
        ids(s.nodes(Some("a-net")).await.unwrap()),
        [id(5), id(7), id(1)]
    );
    assert_eq!(ids(s.nodes(Some("b-net")).await.unwrap()), [id(3), id(9)]);
}

/// 200 racers, 20 passphrases, 10 racers each: exactly one winner per passphrase.
pub async fn concurrent_registrations<S: IjamStore>(s: &Arc<S>) {
    const PASSPHRASES: usize = 20;
    const RACERS: usize = 200;
    let pps: Vec<(String, String)> = (0..PASSPHRASES)
        .map(|i| (format!("pp{i}"), format!("node-{i:02}")))
        .collect();
    let refs: Vec<(&str, &str)> = pps.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    network_with(&**s, "net", "alice", &refs).await;

    let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
    let mut tasks = tokio::task::JoinSet::new();
    for racer in 0..RACERS {
        let store = Arc::clone(s);
        let barrier = Arc::clone(&barrier);
        let mut request = op(
            "net",
            &format!("pp{}", racer % PASSPHRASES),
            id(1000 + racer as u128),
        );
        request.replay_key = replay(&format!("racer {racer}"));
        tasks.spawn(async move {
            barrier.wait().await;
            store.register(request).await
        });
    }
    let mut created = HashSet::new();
    let mut invalid = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("racer panicked").expect("register") {
            RegisterOutcome::Created { node_id } => assert!(created.insert(node_id)),
            RegisterOutcome::InvalidPassphrase => invalid += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        (created.len(), invalid),
        (PASSPHRASES, RACERS - PASSPHRASES)
    );
    let nodes = s.nodes(Some("net")).await.unwrap();
    assert_eq!(nodes.len(), PASSPHRASES);
    assert_eq!(nodes.iter().map(|n| n.id).collect::<HashSet<_>>(), created);
    let mut node_names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    node_names.sort();
    assert_eq!(
        node_names,
        refs.iter().map(|(_, name)| *name).collect::<Vec<_>>()
    );
    assert_eq!(s.passphrases("net").await.unwrap(), vec![]);
    let net = s.network("net").await.unwrap().unwrap();
    assert_eq!(
        (net.pending_passphrases, net.nodes),
        (0, PASSPHRASES as u64)
    );
}

/// `registrar migrate` writes nodes as they stand; an id already taken is left alone.
pub async fn import_node_writes_a_node_as_it_stands<S: IjamStore>(s: &S) {
    network_with(s, "net", "alice", &[]).await;
    let node = Node {
        id: id(7),
        network: "net".into(),
        owner: "alice".into(),
        name: "migrated".into(),
        node_type: "fog".into(),
        arch: "none".into(),
        status: NodeStatus::Online,
        key: sealed("m"),
        ip: "192.0.2.7".into(),
        created_ms: NOW - 10,
        registered_ms: NOW - 5,
        online_ms: NOW - 1,
    };
    assert!(s.import_node(node.clone()).await.unwrap());
    assert_eq!(s.node(id(7)).await.unwrap(), Some(node.clone()));
    assert_eq!(s.nodes(Some("net")).await.unwrap(), vec![node.clone()]);
    let other = Node {
        name: "again".into(),
        ..node.clone()
    };
    assert!(!s.import_node(other).await.unwrap(), "the id is taken");
    assert_eq!(s.node(id(7)).await.unwrap(), Some(node.clone()));
    assert!(matches!(
        s.import_node(Node {
            id: id(8),
            network: "nowhere".into(),
            ..node
        })
        .await,
        Err(StoreError::UnknownNetwork(_))
    ));
    // It changes state like any other node.
    assert!(matches!(
        s.transition(id(7), NodeStatus::Offline, "", NOW, fresh_frame())
            .await
            .unwrap(),
        TransitionOutcome::Changed { .. }
    ));
}

/// `registrar serve` re-seals keys of the first format at start: the store lists them
/// with their node, and replaces one only while it still holds the value listed.
pub async fn legacy_sealed_keys_are_listed_and_replaced_only_while_unchanged<S: IjamStore>(s: &S) {
    network_with(s, "net", "alice", &[]).await;
    assert_eq!(s.legacy_sealed_keys().await.unwrap(), vec![]);
    let bound = new_node(s, "net", "bound", id(1)).await;
    let imported = |n: u128, status: NodeStatus, key: StoredNodeKey| Node {
        id: id(n),
        network: "net".into(),
        owner: "alice".into(),
        name: format!("old-{n}"),
        node_type: "device".into(),
        arch: "x86_ubuntu".into(),
        status,
        key,
        ip: String::new(),
        created_ms: NOW - 10,
        registered_ms: NOW - 10,
        online_ms: 0,
    };
    for n in [3, 2] {
        let key = StoredNodeKey::Sealed(legacy_sealed(&n.to_string()));
        assert!(
            s.import_node(imported(n, NodeStatus::Online, key))
                .await
                .unwrap()
        );
    }
    assert!(
        s.import_node(imported(4, NodeStatus::Revoked, StoredNodeKey::None))
            .await
            .unwrap()
    );
    assert_eq!(
        s.legacy_sealed_keys().await.unwrap(),
        vec![(id(2), legacy_sealed("2")), (id(3), legacy_sealed("3"))],
        "the first format only, by node id; neither the bound key nor an erased one"
    );

    let StoredNodeKey::Sealed(resealed) = sealed("resealed") else {
        unreachable!()
    };
    let before = s.node(id(2)).await.unwrap().unwrap();
    assert!(
        !s.replace_sealed_key(id(2), &legacy_sealed("3"), &resealed)
            .await
            .unwrap(),
        "not the value the node holds"
    );
    assert_eq!(s.node(id(2)).await.unwrap(), Some(before.clone()));
    assert!(
        s.replace_sealed_key(id(2), &legacy_sealed("2"), &resealed)
            .await
            .unwrap()
    );
    assert_eq!(
        s.node(id(2)).await.unwrap(),
        Some(Node {
            key: StoredNodeKey::Sealed(resealed.clone()),
            ..before
        }),
        "the key and nothing else"
    );
    assert!(
        !s.replace_sealed_key(id(2), &legacy_sealed("2"), &legacy_sealed("2"))
            .await
            .unwrap(),
        "replaced already: a second listener starting at once leaves it"
    );
    assert_eq!(
        s.legacy_sealed_keys().await.unwrap(),
        vec![(id(3), legacy_sealed("3"))]
    );

    // Nothing is made or revived: an unknown node, an erased key, a bound key.
    assert!(
        !s.replace_sealed_key(id(404), &legacy_sealed("2"), &resealed)
            .await
            .unwrap()
    );
    assert_eq!(s.node(id(404)).await.unwrap(), None);
    let revoked = s.node(id(4)).await.unwrap();
    assert!(
        !s.replace_sealed_key(id(4), &SealedNodeKey(Vec::new()), &resealed)
            .await
            .unwrap()
    );
    assert_eq!(s.node(id(4)).await.unwrap(), revoked);
    let StoredNodeKey::Sealed(bound_key) = s.node(bound).await.unwrap().unwrap().key else {
        panic!("registered with a sealed key")
    };
    assert!(!bound_key.is_legacy());
}

// ---- re-registration: passphrases minted for a node, the network's rule ------------

pub(super) fn pp_for(label: &str, node_name: &str, node: Uuid) -> NewPassphrase {
    NewPassphrase {
        for_node: Some(node),
        ..pp(label, node_name, None)
    }
}

/// Everything observable in the store, network by network.
async fn everything<S: IjamStore>(
    s: &S,
) -> Vec<(Option<Network>, Vec<PendingPassphrase>, Vec<Node>)> {
    let mut all = Vec::new();
    for net in s.networks().await.unwrap() {
        all.push(snapshot(s, &net.id).await);
    }
    all
}

pub async fn networks_keep_their_reregistration_rule<S: IjamStore>(s: &S) {
    let plain = s
        .create_network("plain", "alice", "Plain", Reregistration::Owner, NOW)
        .await
        .unwrap();
    assert_eq!(plain.reregistration, Reregistration::Owner);
    let strict = s
        .create_network("strict", "alice", "Strict", Reregistration::Minted, NOW)
        .await
        .unwrap();
    assert_eq!(strict.reregistration, Reregistration::Minted);
    assert_eq!(s.network("strict").await.unwrap(), Some(strict.clone()));
    assert_eq!(
        s.networks().await.unwrap(),
        vec![plain.clone(), strict.clone()]
    );

    let relaxed = s
        .set_reregistration("strict", Reregistration::Owner)
        .await
        .unwrap();
    assert_eq!(
        relaxed,
        Network {
            reregistration: Reregistration::Owner,
            ..strict
        }
    );
    assert_eq!(s.network("strict").await.unwrap(), Some(relaxed));
    let tightened = s
        .set_reregistration("plain", Reregistration::Minted)
        .await
        .unwrap();
    assert_eq!(
        tightened,
        Network {
            reregistration: Reregistration::Minted,
            ..plain
        }
    );
    assert_eq!(
        s.set_reregistration("plain", Reregistration::Minted)
            .await
            .unwrap(),
        tightened,
        "setting the rule it has changes nothing"
    );
    assert_eq!(s.network("plain").await.unwrap(), Some(tightened));

    match s
        .set_reregistration("nowhere", Reregistration::Minted)
        .await
    {
        Err(StoreError::UnknownNetwork(net)) => assert_eq!(net, "nowhere"),
        other => panic!("expected UnknownNetwork, got {other:?}"),
    }
    assert_eq!(s.network("nowhere").await.unwrap(), None, "nothing made");
    assert_eq!(s.networks().await.unwrap().len(), 2);
}

pub async fn a_passphrase_is_minted_only_for_a_node_of_its_network<S: IjamStore>(s: &S) {
    network_with(s, "net", "alice", &[]).await;
    network_with(s, "other", "alice", &[]).await;
    network_with(s, "bobs", "bob", &[]).await;
    let node = new_node(s, "net", "n", id(1)).await;
    let elsewhere = new_node(s, "other", "o", id(2)).await;
    let bobs = new_node(s, "bobs", "b", id(3)).await;

    s.add_passphrases("net", vec![pp_for("for-1", "again-1", node)], NOW)
        .await
        .unwrap();
    assert_eq!(
        s.passphrases("net").await.unwrap(),
        vec![PendingPassphrase {
            node_name: "again-1".into(),
            created_ms: NOW,
            expires_ms: None,
            for_node: Some(node),
        }]
    );

    // Another network's node (of the same owner or not), or no node: the whole batch
    // is refused.
    let before = everything(s).await;
    for stranger in [elsewhere, bobs, id(404)] {
        match s
            .add_passphrases(
                "net",
                vec![
                    pp("plain", "plain-1", None),
                    pp_for("for-x", "again-x", stranger),
                ],
                NOW,
            )
            .await
        {
            Err(StoreError::NodeNotInNetwork { network, node }) => {
                assert_eq!((network.as_str(), node), ("net", stranger));
            }
            other => panic!("expected NodeNotInNetwork, got {other:?}"),
        }
        assert_eq!(everything(s).await, before, "{stranger}: all or none");
    }
    assert_eq!(s.node(id(404)).await.unwrap(), None);

    // The refused secrets and names are free; a passphrase for any use is for no node.
    s.add_passphrases(
        "net",
        vec![
            pp("plain", "plain-1", None),
            pp_for("for-x", "again-x", node),
        ],
        NOW + 1,
    )
    .await
    .unwrap();
    let listed: Vec<(String, Option<Uuid>)> = s
        .passphrases("net")
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.node_name, p.for_node))
        .collect();
    assert_eq!(
        listed,
        [
            ("again-1".to_owned(), Some(node)),
            ("again-x".to_owned(), Some(node)),
            ("plain-1".to_owned(), None)
        ]
    );
}

/// A passphrase minted for node X re-registers X only: the registration names X, and
/// X is in the passphrase's network and not revoked. Whatever else it is offered for
/// gets `InvalidPassphrase`, and it stays pending. The same under either rule.
pub async fn a_passphrase_minted_for_a_node_reregisters_that_node_only<S: IjamStore>(s: &S) {
    for (rule, base) in [(Reregistration::Owner, 0), (Reregistration::Minted, 100)] {
        let net = rule.as_str();
        let other = format!("{net}-2");
        s.create_network(net, "alice", net, rule, NOW - 1000)
            .await
            .unwrap();
        network_with(s, &other, "alice", &[("move", "moved")]).await;
        let x = new_node(s, net, &format!("x{base}"), id(base + 1)).await;
        let y = new_node(s, net, &format!("y{base}"), id(base + 2)).await;
        let moved = new_node(s, net, &format!("m{base}"), id(base + 3)).await;
        let revoked = new_node(s, net, &format!("r{base}"), id(base + 4)).await;
        s.revoke_node(revoked).await.unwrap();
        s.add_passphrases(
            net,
            vec![
                pp_for("for-x", "x-again", x),
                pp_for("for-moved", "moved-again", moved),
                pp_for("for-revoked", "revoked-again", revoked),
            ],
            NOW - 100,
        )
        .await
        .unwrap();
        // `moved` leaves for another network of alice's (its rule is `owner`); out of a
        // `minted` network only while the operator lifts the rule.
        s.set_reregistration(net, Reregistration::Owner)
            .await
            .unwrap();
        assert_eq!(
            s.register(op_requesting(&other, "move", id(base + 5), moved))
                .await
                .unwrap(),
            RegisterOutcome::Reregistered { node_id: moved }
        );
        s.set_reregistration(net, rule).await.unwrap();
        s.transition(x, NodeStatus::Online, "192.0.2.1", NOW - 50, fresh_frame())
            .await
            .unwrap();

        let before = everything(s).await;
        for (what, request) in [
            ("no id", op(net, "for-x", id(base + 10))),
            (
                "another node",
                op_requesting(net, "for-x", id(base + 11), y),
            ),
            (
                "an unknown id",
                op_requesting(net, "for-x", id(base + 12), id(base + 99)),
            ),
            (
                "its node, moved to another network",
                op_requesting(net, "for-moved", id(base + 13), moved),
            ),
            (
                "its node, revoked",
                op_requesting(net, "for-revoked", id(base + 14), revoked),
            ),
        ] {
            assert_eq!(
                s.register(request).await.unwrap(),
                RegisterOutcome::InvalidPassphrase,
                "{net}: {what}"
            );
            assert_eq!(
                everything(s).await,
                before,
                "{net}: {what}: nothing changes, nothing is consumed"
            );
        }
        for n in [10, 11, 12, 13, 14, 99] {
            assert_eq!(s.node(id(base + n)).await.unwrap(), None, "{net}: {n}");
        }

        let original = s.node(x).await.unwrap().unwrap();
        let mut request = op_requesting(net, "for-x", id(base + 20), x);
        request.now_ms = NOW + 100;
        assert_eq!(
            s.register(request.clone()).await.unwrap(),
            RegisterOutcome::Reregistered { node_id: x },
            "{net}"
        );
        assert_eq!(
            s.node(x).await.unwrap(),
            Some(Node {
                name: "x-again".into(),
                status: NodeStatus::Offline,
                key: sealed_for("for-x", x),
                registered_ms: NOW + 100,
                ..original
            }),
            "{net}"
        );
        assert_eq!(s.node(id(base + 20)).await.unwrap(), None);
        assert_eq!(
            names(&s.passphrases(net).await.unwrap()),
            ["moved-again", "revoked-again"],
            "{net}: used"
        );
        // Its byte-identical retry gets the same answer; another request, the 401.
        request.now_ms = NOW + 110;
        let after = everything(s).await;
        assert_eq!(
            s.register(request.clone()).await.unwrap(),
            RegisterOutcome::Replayed { node_id: x },
            "{net}"
        );
        request.replay_key = replay("another request");
        assert_eq!(
            s.register(request).await.unwrap(),
            RegisterOutcome::InvalidPassphrase,
            "{net}"
        );
        assert_eq!(everything(s).await, after, "{net}");
    }
}

/// In a network whose rule is `minted`, re-registering an existing node of the owner
/// takes a passphrase minted for it; any other passphrase gets `InvalidPassphrase` and
/// stays pending. What is not a re-registration goes as under `owner`.
pub async fn the_minted_rule_refuses_a_plain_passphrase_on_an_existing_node<S: IjamStore>(s: &S) {
    s.create_network(
        "strict",
        "alice",
        "Strict",
        Reregistration::Minted,
        NOW - 1000,
    )
    .await
    .unwrap();
    network_with(s, "loose", "alice", &[("q", "q"), ("q0", "q0")]).await;
    network_with(s, "bobs", "bob", &[]).await;
    let mine = new_node(s, "strict", "mine", id(1)).await;
    // The rule of the network a node is in holds from its creation: a spare passphrase
    // of alice's `owner` network does not take the node over.
    assert_eq!(
        s.register(op_requesting("loose", "q0", id(9), mine))
            .await
            .unwrap(),
        RegisterOutcome::InvalidPassphrase
    );
    let in_loose = new_node(s, "loose", "l", id(2)).await;
    let bobs = new_node(s, "bobs", "b", id(3)).await;
    let revoked = new_node(s, "strict", "r", id(4)).await;
    s.revoke_node(revoked).await.unwrap();
    let pps = [("p1", "p1"), ("p2", "p2"), ("p3", "p3"), ("p4", "p4")];
    s.add_passphrases(
        "strict",
        pps.iter()
            .map(|(label, name)| pp(label, name, None))
            .collect(),
        NOW - 100,
    )
    .await
    .unwrap();

    // An existing node of alice's, in this network or another: refused.
    let before = everything(s).await;
    for node in [mine, in_loose] {
        assert_eq!(
            s.register(op_requesting("strict", "p1", id(10), node))
                .await
                .unwrap(),
            RegisterOutcome::InvalidPassphrase,
            "{node}"
        );
        assert_eq!(everything(s).await, before, "{node}: nothing changes");
    }
    assert_eq!(s.node(id(10)).await.unwrap(), None);

    // No id, an unknown id, bob's node, a revoked node: as under `owner`.
    assert_eq!(
        s.register(op("strict", "p1", id(11))).await.unwrap(),
        RegisterOutcome::Created { node_id: id(11) },
        "the refused passphrase was not consumed"
    );
    assert_eq!(
        s.register(op_requesting("strict", "p2", id(12), id(50)))
            .await
            .unwrap(),
        RegisterOutcome::Created { node_id: id(50) }
    );
    let bobs_before = s.node(bobs).await.unwrap();
    assert_eq!(
        s.register(op_requesting("strict", "p3", id(13), bobs))
            .await
            .unwrap(),
        RegisterOutcome::Created { node_id: id(13) }
    );
    assert_eq!(s.node(bobs).await.unwrap(), bobs_before);
    let revoked_before = s.node(revoked).await.unwrap();
    assert_eq!(
        s.register(op_requesting("strict", "p4", id(14), revoked))
            .await
            .unwrap(),
        RegisterOutcome::Created { node_id: id(14) }
    );
    assert_eq!(s.node(revoked).await.unwrap(), revoked_before);

    // A passphrase minted for the node re-registers it.
    s.add_passphrases("strict", vec![pp_for("m", "mine-again", mine)], NOW)
        .await
        .unwrap();
    assert_eq!(
        s.register(op_requesting("strict", "m", id(15), mine))
            .await
            .unwrap(),
        RegisterOutcome::Reregistered { node_id: mine }
    );
    assert_eq!(key_of(s, mine).await, sealed_for("m", mine));

    // The rule is read at each registration: back to `owner`, the refused passphrase
    // re-registers; its retry is answered from the replay record under either rule.
    s.add_passphrases("strict", vec![pp("p5", "p5", None)], NOW)
        .await
        .unwrap();
    let plain = op_requesting("strict", "p5", id(16), mine);
    assert_eq!(
        s.register(plain.clone()).await.unwrap(),
        RegisterOutcome::InvalidPassphrase
    );
    s.set_reregistration("strict", Reregistration::Owner)
        .await
        .unwrap();
    assert_eq!(
        s.register(plain.clone()).await.unwrap(),
        RegisterOutcome::Reregistered { node_id: mine }
    );
    s.set_reregistration("strict", Reregistration::Minted)
        .await
        .unwrap();
    assert_eq!(
        s.register(plain).await.unwrap(),
        RegisterOutcome::Replayed { node_id: mine }
    );
    assert_eq!(key_of(s, mine).await, sealed_for("p5", mine));

    // The node's own network's rule holds too: a passphrase of alice's `owner` network
    // does not take over (and move out) a node of her `minted` one, and stays unused.
    let before = everything(s).await;
    assert_eq!(
        s.register(op_requesting("loose", "q", id(17), mine))
            .await
            .unwrap(),
        RegisterOutcome::InvalidPassphrase
    );
    assert_eq!(everything(s).await, before);
    assert_eq!(s.node(mine).await.unwrap().unwrap().network, "strict");
    // A node of the `owner` network still takes it (the original rule).
    assert_eq!(
        s.register(op_requesting("loose", "q", id(18), in_loose))
            .await
            .unwrap(),
        RegisterOutcome::Reregistered { node_id: in_loose }
    );
}
