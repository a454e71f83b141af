//! A store made by release 0.1.0 (a data dir captured from it, in
//! `tests/fixtures/data-dir-0.1.0/`) opens in this release, is upgraded in place, and
//! serves its networks, passphrases, nodes and devices as before; its node key, sealed
//! in the first format (bound to no node), is sealed again for its node when the
//! listener starts, and that format is never opened to serve.

use std::path::Path;

use registrar::core::crypto::ecdsa::SigningKey;
use registrar::core::ids::DeviceId;
use registrar::store::Creation;
use registrar::store::ijam::{IjamStore, NodeStatus, Reregistration, StoredNodeKey};
use registrar::store::pubkey::{DeviceStatus, PubkeyStore};
use registrar::store::sqlite::SqliteStore;
use registrar::store::sqlite::migrations::{MIGRATIONS, version};
use registrar::wire::envelope::Status;
use registrar::wire::ijam::StateCode;
use uuid::Uuid;

use crate::support::envelope_client::Device;
use crate::support::ijam_client::*;
use crate::support::listener::{Backend, Listener};

fn fixture() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/data-dir-0.1.0"
    ))
}

/// A copy of the captured data dir, in a fresh temporary directory.
fn copy_of_release_data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture().join("registrar-data")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// The sealed key in node `id`'s row of `table`, as the SQLite file holds it.
fn raw_sealed_key(store: &Path, table: &str, id: Uuid) -> Vec<u8> {
    let conn = rusqlite::Connection::open(store).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    conn.query_row(
        &format!("SELECT sealed_key FROM {table} WHERE id = ?1"),
        [id.to_string()],
        |row| row.get(0),
    )
    .unwrap()
}

/// The node the release registered: its id and key, from `ijamreg`'s state file.
fn released_node() -> (Uuid, [u8; 32]) {
    let file = std::fs::read(fixture().join("node.bin")).unwrap();
    (
        Uuid::from_slice(&file[..16]).unwrap(),
        file[32..64].try_into().unwrap(),
    )
}

#[tokio::test]
async fn a_release_0_1_store_is_upgraded_in_place_and_keeps_everything() {
    let dir = copy_of_release_data_dir();
    let path = dir.path().join("registrar.sqlite");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        assert_eq!(
            version(&conn).unwrap(),
            1,
            "release 0.1.0 stores are version 1"
        );
    }
    let store = SqliteStore::open(&path, Creation::Never).unwrap();
    let lab = store.network("lab").await.unwrap().unwrap();
    assert_eq!(
        (lab.owner.as_str(), lab.pending_passphrases, lab.nodes),
        ("alice", 2, 1)
    );
    assert_eq!(store.network("empty").await.unwrap().unwrap().owner, "bob");
    // Its networks keep the original re-registration rule, its passphrases any use.
    assert_eq!(lab.reregistration, Reregistration::Owner);
    let pending: Vec<(String, Option<Uuid>)> = store
        .passphrases("lab")
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.node_name, p.for_node))
        .collect();
    assert_eq!(
        pending,
        [("pending-1".into(), None), ("pending-2".into(), None)]
    );
    let (id, _) = released_node();
    let node = store.node(id).await.unwrap().unwrap();
    assert_eq!(
        (node.name.as_str(), node.status),
        ("sensor-1", NodeStatus::Online)
    );
    let legacy = store.legacy_sealed_keys().await.unwrap();
    assert_eq!(
        legacy.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [id],
        "the release sealed its node's key in the first format"
    );
    assert_eq!(node.key, StoredNodeKey::Sealed(legacy[0].1.clone()));
    let devices = store.devices().await.unwrap();
    assert_eq!(
        devices.iter().map(|d| d.status).collect::<Vec<_>>(),
        [DeviceStatus::Active, DeviceStatus::Revoked]
    );
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(version(&conn).unwrap(), MIGRATIONS.len());
}

#[test]
fn a_listener_on_an_upgraded_release_store_serves_its_nodes_and_devices() {
    let dir = copy_of_release_data_dir();
    let (id, node_key) = released_node();
    let sqlite = dir.path().join("registrar.sqlite");
    let first_format = raw_sealed_key(&sqlite, "nodes", id);
    assert_eq!(first_format.len(), 60, "nonce ‖ ct ‖ tag, no version byte");
    let l = Listener::start_in(Backend::Sqlite, dir, &[]);
    // Before it served, the listener sealed the node's key again, bound to the node.
    l.wait_for_log_count("resealed=1 ", 1);
    let bound = raw_sealed_key(&sqlite, "ijam_nodes", id);
    assert_eq!((bound.len(), bound[0]), (61, 0x02));
    let pk = public_key(l.ports.cert);
    // A passphrase minted by the release registers a new node.
    let key = random_key();
    let ct = pk
        .encrypt(&request(None, "lab", "pending1abc", key).to_bytes())
        .unwrap();
    decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &ct), &key);
    // The node the release registered changes state with its key.
    assert_eq!(
        tcp_exchange(
            l.ports.state_tcp,
            &state_frame(id, &node_key, StateCode::Offline)
        ),
        200u16.to_le_bytes()
    );
    assert_eq!(l.node_json(id)["status"], "offline");
    // The device the release registered attests with its key.
    let device = Device {
        id: DeviceId::from_hex(&std::fs::read_to_string(fixture().join("device.id")).unwrap())
            .unwrap(),
        key: SigningKey::from_pkcs8_pem(
            &std::fs::read_to_string(fixture().join("device.pem")).unwrap(),
        )
        .unwrap(),
    };
    let nonce = device.nonce(Transport::Tcp, &l);
    assert_eq!(
        device.attest(Transport::Tcp, &l, nonce).status(),
        Status::OK
    );
    assert_eq!(l.nodes_json().len(), 2);

    // The first-format value put back (from a backup made before the upgrade, or
    // copied from another node's record of that time) opens for no node any more.
    let conn = rusqlite::Connection::open(&sqlite).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    conn.execute(
        "UPDATE ijam_nodes SET sealed_key = ?2 WHERE id = ?1",
        rusqlite::params![id.to_string(), first_format],
    )
    .unwrap();
    assert_eq!(
        tcp_exchange(
            l.ports.state_tcp,
            &state_frame(id, &node_key, StateCode::Online)
        ),
        400u16.to_le_bytes()
    );
    l.wait_for_log_count("stored_key_refused", 1);
    assert_eq!(l.node_json(id)["status"], "offline", "unchanged");
}
