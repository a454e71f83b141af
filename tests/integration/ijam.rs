//! The ijam flow end to end over real sockets, against the real `registrar` binary,
//! on both stores (`ijam_battery!`), plus the upstream capture checks.

use crate::support::envelope_client::Device;
use crate::support::ijam_client::*;
use crate::support::listener::{Backend, Key, Listener, vector};
use registrar::core::crypto::{self, RsaKey};
use registrar::core::random;
use registrar::flow::ijam::IjamError;
use registrar::wire::envelope::Status;
use registrar::wire::ijam::{self, NodeArch, NodeKey, NodeType, RegisterRequest, StateCode};
use uuid::Uuid;

const REPLY_400: &[u8] = b"\x90\x01request";
const REPLY_401: &[u8] = b"\x91\x01Invalid passphrase.";

// ---- the upstream capture, no listener --------------------------------------------

#[test]
fn captured_requests_decrypt_with_the_shipped_keys_to_the_recorded_fields() {
    for (bits, network, passphrase, node_type, arch) in [
        (4096, "testnet01", "alpha1", NodeType::Device, NodeArch::Wsl),
        (
            2048,
            "vecnet2048",
            "vecpass1",
            NodeType::Fog,
            NodeArch::RpiLinux,
        ),
    ] {
        let key = RsaKey::from_pkcs8_pem(
            std::str::from_utf8(&vector(&format!("rsa{bits}_private_key.pem"))).unwrap(),
        )
        .unwrap();
        assert_eq!(key.bits(), bits);
        let mut buf = [0u8; crypto::MAX_MODULUS_LEN];
        let plain = key
            .decrypt(&vector(&format!("reg{bits}_request_cipher.bin")), &mut buf)
            .unwrap();
        assert_eq!(plain, vector(&format!("reg{bits}_request_plain.bin")));
        let req = RegisterRequest::parse(plain).unwrap();
        assert_eq!(req.node_id, None);
        assert_eq!(req.network_id.as_str(), network);
        assert_eq!(req.passphrase.expose(), passphrase);
        assert_eq!(
            req.node_key.0.as_slice(),
            vector(&format!("reg{bits}_node_key.bin"))
        );
        assert_eq!((req.node_type, req.node_arch), (node_type, arch));
        // The served certificate is byte-identical to the original's PEM.
        assert_eq!(
            key.public_pem().as_bytes(),
            vector(&format!("cert_response_rsa{bits}.pem"))
        );
    }
}

#[test]
fn a_reply_built_by_registrar_equals_the_captured_reply_and_decodes_upstream_style() {
    for bits in [2048, 4096] {
        let captured = vector(&format!("reg{bits}_response.bin"));
        let node_id = Uuid::from_slice(&vector(&format!("reg{bits}_node_id.bin"))).unwrap();
        let key: [u8; 32] = vector(&format!("reg{bits}_node_key.bin"))
            .try_into()
            .unwrap();
        let iv: [u8; 16] = captured[2..18].try_into().unwrap();
        let mut body = ijam::register_reply_plaintext(node_id);
        assert_eq!(
            body.as_slice(),
            vector(&format!("reg{bits}_response_aes_plain.bin"))
        );
        crypto::aes_cbc_encrypt(&NodeKey(key), iv, &mut body);
        let reply = ijam::register_reply(iv, body);
        assert_eq!(reply.as_slice(), captured);
        assert_eq!(decode_reply_upstream(&reply, &key), node_id);
    }
}

#[test]
fn error_replies_registrar_builds_equal_the_captured_bytes() {
    // A plaintext the original refused (node type 1) fails to parse here too, and the
    // reply built for that failure is the original's 400, byte for byte.
    let refused = RegisterRequest::parse(&vector("err400_badtype_request_plain.bin")).unwrap_err();
    assert_eq!(
        IjamError::from(refused).register_reply(),
        vector("err400_request.bin")
    );
    assert_eq!(
        IjamError::Undecryptable.register_reply(),
        vector("err400_request.bin")
    );
    // A consumed passphrase: the original's 401.
    assert_eq!(
        IjamError::InvalidPassphrase.register_reply(),
        vector("err401_consumed_passphrase.bin")
    );
}

// ---- over the wire, on every store -------------------------------------------------

macro_rules! ijam_battery {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $test() { super::$test("sqlite") })*
        }
        mod redis {
            $(#[test] fn $test() { super::$test("redis") })*
        }
        /// The JAMScript-OTA portal's own layout (`ota+redis://`): the wire is the same.
        mod portal {
            $(#[test] fn $test() { super::$test("portal") })*
        }
    };
}

ijam_battery!(
    certificate_port,
    captured_2048_exchange_registers_and_replays,
    captured_4096_exchange_then_consumed_passphrase,
    registration_rules_tcp,
    registration_rules_udp,
    two_hundred_clients_race_for_twenty_passphrases,
    state_transitions_tcp,
    state_transitions_udp,
    bad_input_gets_its_reply_and_changes_nothing,
    several_requests_on_one_connection_and_split_writes,
    a_retry_after_the_replay_ttl_finds_the_passphrase_spent,
    what_the_original_accepted_registers_c_strings_and_arch_0_and_1,
    a_replayed_state_frame_rewrites_nothing_and_a_node_has_a_budget,
);

fn listener(backend: &str, key: Key) -> Option<Listener> {
    Backend::named(backend).map(|b| Listener::start(b, key, &[]))
}

fn certificate_port(backend: &str) {
    let Some(l) = listener(backend, Key::Vector2048) else {
        return;
    };
    let reply = fetch_certificate(l.ports.cert);
    let pem = vector("cert_response_rsa2048.pem");
    assert_eq!(
        reply.len(),
        800,
        "NUL-padded to the 800 bytes the C client reads"
    );
    assert_eq!(&reply[..pem.len()], pem.as_slice());
    assert!(reply[pem.len()..].iter().all(|&b| b == 0));

    // The connection stays open for another request, as the original's did.
    let mut stream = connect(l.ports.cert);
    let mut two = Vec::new();
    use std::io::{Read, Write};
    stream
        .write_all(&[ijam::CERT_REQUEST, ijam::CERT_REQUEST].concat())
        .unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    stream.read_to_end(&mut two).unwrap();
    assert_eq!(two, [reply.clone(), reply].concat());

    // Anything else: closed without a reply.
    assert_eq!(tcp_exchange(l.ports.cert, b"GET / HTTP/1.0\r\n\r\n"), b"");
}

fn captured_2048_exchange_registers_and_replays(backend: &str) {
    let Some(l) = listener(backend, Key::Vector2048) else {
        return;
    };
    l.create_network("vecnet2048", "alice");
    l.admin_ok(&[
        "passphrase",
        "add",
        "vecnet2048",
        "--node-name",
        "fog-1",
        "--passphrase",
        "vecpass1",
    ]);
    let key: [u8; 32] = vector("reg2048_node_key.bin").try_into().unwrap();

    // A malformed plaintext (nodeType 1) gets the upstream bytes and consumes nothing.
    let cipher = vector("err400_badtype_request_cipher_rsa2048.bin");
    assert_eq!(tcp_exchange(l.ports.reg_tcp, &cipher), REPLY_400);

    let cipher = vector("reg2048_request_cipher.bin");
    let reply = tcp_exchange(l.ports.reg_tcp, &cipher);
    let id = decode_reply_upstream(&reply, &key);
    assert_eq!(id.get_version_num(), 4, "server-made ids are UUIDv4");
    let node = l.node_json(id);
    assert_eq!(node["name"], "fog-1");
    assert_eq!(node["owner"], "alice");
    assert_eq!(node["node_type"], "fog");
    assert_eq!(node["arch"], "rpi_linux");
    assert_eq!(node["status"], "offline");

    // The client's reply was lost: the byte-identical retry gets the same id, over UDP too.
    assert_eq!(
        decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &cipher), &key),
        id
    );
    assert_eq!(
        decode_reply_upstream(&udp_exchange(l.ports.reg_udp, &cipher), &key),
        id
    );
    assert_eq!(l.nodes_json().len(), 1);
}

fn captured_4096_exchange_then_consumed_passphrase(backend: &str) {
    let Some(l) = listener(backend, Key::Vector4096) else {
        return;
    };
    l.create_network("testnet01", "admin");
    l.admin_ok(&[
        "passphrase",
        "add",
        "testnet01",
        "--node-name",
        "node-alpha1",
        "--passphrase",
        "alpha1",
        "--allow-short",
    ]);
    let key: [u8; 32] = vector("reg4096_node_key.bin").try_into().unwrap();
    let reply = tcp_exchange(l.ports.reg_tcp, &vector("reg4096_request_cipher.bin"));
    let id = decode_reply_upstream(&reply, &key);
    assert_eq!(l.node_json(id)["arch"], "wsl");
    // The C client's second run: same passphrase, new key → the upstream 401 bytes.
    assert_eq!(
        tcp_exchange(l.ports.reg_tcp, &vector("err401_request_cipher.bin")),
        REPLY_401
    );
    assert_eq!(l.nodes_json().len(), 1);
}

fn registration_rules(backend: &str, transport: Transport) {
    let Some(l) = listener(backend, Key::Vector2048) else {
        return;
    };
    let pk = public_key(l.ports.cert);
    let send = |req: &RegisterRequest| {
        let ct = pk.encrypt(&req.to_bytes()).unwrap();
        (
            ct.clone(),
            exchange(transport, l.ports.reg_tcp, l.ports.reg_udp, &ct),
        )
    };
    l.create_network("net-a", "alice");
    l.create_network("net-b", "bob");
    l.create_network("net-a2", "alice");

    // New node.
    let p1 = l.add_passphrase("net-a", "n1");
    let k1 = random_key();
    let (ct1, reply) = send(&request(None, "net-a", &p1, k1));
    let id1 = decode_reply_upstream(&reply, &k1);
    assert_eq!(id1.get_version_num(), 4);

    // Byte-identical retry: same id, nothing new.
    let retry = exchange(transport, l.ports.reg_tcp, l.ports.reg_udp, &ct1);
    assert_eq!(decode_reply_upstream(&retry, &k1), id1);

    // Same passphrase again (a new key, so not a retry) → 401; unknown network → same bytes.
    let (_, reply) = send(&request(None, "net-a", &p1, random_key()));
    assert_eq!(reply, REPLY_401);
    let (_, reply) = send(&request(None, "no-such-net", &p1, random_key()));
    assert_eq!(reply, REPLY_401);
    // A generated passphrase with one character mistyped: the same 401.
    let mut wrong = p1.clone().into_bytes();
    wrong[14] = if wrong[14] == b'0' { b'1' } else { b'0' };
    let (_, reply) = send(&request(
        None,
        "net-a",
        std::str::from_utf8(&wrong).unwrap(),
        random_key(),
    ));
    assert_eq!(reply, REPLY_401);

    // Put the node online, then re-register it (same owner, another network of
    // alice's): same id, status offline, and only the new key works from now on.
    let reply = exchange(
        transport,
        l.ports.state_tcp,
        l.ports.state_udp,
        &state_frame(id1, &k1, StateCode::Online),
    );
    assert_eq!(reply, [0xc8, 0x00]);
    assert_eq!(l.node_json(id1)["status"], "online");
    let p2 = l.add_passphrase("net-a2", "n1-again");
    let k2 = random_key();
    let (_, reply) = send(&request(Some(id1), "net-a2", &p2, k2));
    assert_eq!(decode_reply_upstream(&reply, &k2), id1);
    let node = l.node_json(id1);
    assert_eq!(node["status"], "offline");
    assert_eq!(node["network"], "net-a2");
    assert_eq!(node["name"], "n1-again");
    let old_key = exchange(
        transport,
        l.ports.state_tcp,
        l.ports.state_udp,
        &state_frame(id1, &k1, StateCode::Online),
    );
    assert_eq!(old_key, [0x90, 0x01], "the old key no longer decrypts: 400");
    let new_key = exchange(
        transport,
        l.ports.state_tcp,
        l.ports.state_udp,
        &state_frame(id1, &k2, StateCode::Online),
    );
    assert_eq!(new_key, [0xc8, 0x00]);

    // Bob names alice's node id: he gets a fresh id and alice's node is untouched.
    let p3 = l.add_passphrase("net-b", "b1");
    let k3 = random_key();
    let (_, reply) = send(&request(Some(id1), "net-b", &p3, k3));
    let id3 = decode_reply_upstream(&reply, &k3);
    assert_ne!(id3, id1);
    assert_eq!(l.node_json(id1)["owner"], "alice");
    assert_eq!(l.node_json(id3)["owner"], "bob");

    // A non-zero id the store does not know is kept as sent.
    let p4 = l.add_passphrase("net-b", "b2");
    let chosen = Uuid::from_bytes([0x42; 16]);
    let k4 = random_key();
    let (_, reply) = send(&request(Some(chosen), "net-b", &p4, k4));
    assert_eq!(decode_reply_upstream(&reply, &k4), chosen);

    assert_eq!(l.nodes_json().len(), 3);
}

fn registration_rules_tcp(backend: &str) {
    registration_rules(backend, Transport::Tcp)
}

fn registration_rules_udp(backend: &str) {
    registration_rules(backend, Transport::Udp)
}

/// The re-registration rules need a native store: the portal's layout keeps neither a
/// network's rule nor the node a passphrase is minted for (`portal.rs` shows both
/// refused).
macro_rules! native_battery {
    ($($test:ident),* $(,)?) => {
        mod native_sqlite {
            $(#[test] fn $test() { super::$test("sqlite") })*
        }
        mod native_redis {
            $(#[test] fn $test() { super::$test("redis") })*
        }
    };
}

native_battery!(reregistration_rules_tcp, reregistration_rules_udp);

/// Node ids travel in clear in every state frame. In an `owner` network anyone holding
/// an unused passphrase of the owner takes over any of the owner's nodes by naming its
/// id (the original rule); in a `minted` network only a passphrase minted for the node
/// re-registers it, and every other attempt gets the one 401 and spends nothing.
fn reregistration_rules(backend: &str, transport: Transport) {
    let Some(l) = listener(backend, Key::Vector2048) else {
        return;
    };
    let pk = public_key(l.ports.cert);
    let send = |req: &RegisterRequest| {
        let ct = pk.encrypt(&req.to_bytes()).unwrap();
        exchange(transport, l.ports.reg_tcp, l.ports.reg_udp, &ct)
    };
    let state = |id: Uuid, key: &[u8; 32]| {
        exchange(
            transport,
            l.ports.state_tcp,
            l.ports.state_udp,
            &state_frame(id, key, StateCode::Online),
        )
    };
    let register = |network: &str, passphrase: &str, id: Option<Uuid>| {
        let key = random_key();
        let reply = send(&request(id, network, passphrase, key));
        (decode_reply_upstream(&reply, &key), key)
    };
    const OK: [u8; 2] = [0xc8, 0x00];
    const WRONG_KEY: [u8; 2] = [0x90, 0x01];

    // `owner` (the default): a spare passphrase of alice's takes her node over.
    l.create_network("open", "alice");
    let (victim, victim_key) = register("open", &l.add_passphrase("open", "victim"), None);
    assert_eq!(state(victim, &victim_key), OK);
    let spare = l.add_passphrase("open", "spare");
    let (taken, thief_key) = register("open", &spare, Some(victim));
    assert_eq!(taken, victim, "the original rule: re-registered");
    assert_eq!(
        state(victim, &victim_key),
        WRONG_KEY,
        "its owner is locked out"
    );
    assert_eq!(state(victim, &thief_key), OK);

    // `minted`: the same attempt gets the 401, and the node keeps its key.
    l.admin_ok(&[
        "network",
        "create",
        "strict",
        "--owner",
        "bob",
        "--reregistration",
        "minted",
    ]);
    let (a, a_key) = register("strict", &l.add_passphrase("strict", "a"), None);
    let (b, b_key) = register("strict", &l.add_passphrase("strict", "b"), None);
    let spare = l.add_passphrase("strict", "spare");
    assert_eq!(
        send(&request(Some(a), "strict", &spare, random_key())),
        REPLY_401
    );
    assert_eq!(state(a, &a_key), OK, "a keeps working with its own key");
    assert_eq!(l.node_json(a)["name"], "a");

    // A passphrase minted for a, naming b: the 401, and b keeps its key.
    let for_a = l
        .admin_ok(&[
            "passphrase",
            "add",
            "strict",
            "--node-name",
            "a-again",
            "--for-node",
            &a.to_string(),
        ])
        .trim()
        .to_owned();
    assert_eq!(
        send(&request(Some(b), "strict", &for_a, random_key())),
        REPLY_401
    );
    assert_eq!(state(b, &b_key), OK);

    // Naming a, it re-registers a: same id, status offline, only the new key works.
    let (again, new_key) = register("strict", &for_a, Some(a));
    assert_eq!(again, a);
    let node = l.node_json(a);
    assert_eq!(
        (node["status"].as_str(), node["name"].as_str()),
        (Some("offline"), Some("a-again"))
    );
    assert_eq!(state(a, &a_key), WRONG_KEY);
    assert_eq!(state(a, &new_key), OK);

    // The refused spare was not spent: it still registers a new node.
    let (fresh, _) = register("strict", &spare, None);
    assert!(![victim, a, b].contains(&fresh));
    assert_eq!(l.nodes_json().len(), 4);
}

fn reregistration_rules_tcp(backend: &str) {
    reregistration_rules(backend, Transport::Tcp)
}

fn reregistration_rules_udp(backend: &str) {
    reregistration_rules(backend, Transport::Udp)
}

fn two_hundred_clients_race_for_twenty_passphrases(backend: &str) {
    let Some(l) = listener(backend, Key::Vector2048) else {
        return;
    };
    l.create_network("race", "alice");
    let out = l.admin_ok(&[
        "passphrase",
        "add",
        "race",
        "--node-name",
        "racer",
        "--count",
        "20",
    ]);
    let passphrases: Vec<String> = out.lines().map(str::to_owned).collect();
    assert_eq!(passphrases.len(), 20);
    let pk = public_key(l.ports.cert);
    let (requests, keys): (Vec<Vec<u8>>, Vec<[u8; 32]>) = (0..200)
        .map(|i| {
            let key = random_key();
            let req = request(None, "race", &passphrases[i % 20], key);
            (pk.encrypt(&req.to_bytes()).unwrap(), key)
        })
        .unzip();
    let replies = tcp_exchange_all_at_once(l.ports.reg_tcp, requests);
    let mut ids = Vec::new();
    let mut refused = 0;
    for (reply, key) in replies.into_iter().zip(keys) {
        if reply == REPLY_401 {
            refused += 1;
        } else {
            ids.push(decode_reply_upstream(&reply, &key));
        }
    }
    ids.sort();
    ids.dedup();
    assert_eq!((ids.len(), refused), (20, 180));
    let out = l.admin_ok(&["--json", "node", "list", "--network", "race"]);
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes.len(), 20);
    let listed = l.admin_ok(&["--json", "passphrase", "list", "race"]);
    assert_eq!(listed.trim(), "[]");
}

/// Registers one node over TCP and returns its id and key.
fn register_one(l: &Listener, network: &str, name: &str) -> (Uuid, [u8; 32]) {
    let pk = public_key(l.ports.cert);
    let p = l.add_passphrase(network, name);
    let key = random_key();
    let ct = pk
        .encrypt(&request(None, network, &p, key).to_bytes())
        .unwrap();
    (
        decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &ct), &key),
        key,
    )
}

fn state_transitions(backend: &str, transport: Transport) {
    let Some(l) = listener(backend, Key::Vector2048) else {
        return;
    };
    l.create_network("net", "alice");
    let (id, key) = register_one(&l, "net", "n1");
    let send = |frame: Vec<u8>| exchange(transport, l.ports.state_tcp, l.ports.state_udp, &frame);
    let status = |l: &Listener| l.node_json(id)["status"].as_str().unwrap().to_owned();

    // From offline: loading is not allowed (403), online and offline are.
    assert_eq!(
        send(state_frame(id, &key, StateCode::Loading)),
        b"\x93\x01Cannot transition node from offline to loading."
    );
    assert_eq!(status(&l), "offline");
    assert_eq!(
        send(state_frame(id, &key, StateCode::Offline)),
        200u16.to_le_bytes()
    );
    assert_eq!(
        send(state_frame(id, &key, StateCode::Online)),
        200u16.to_le_bytes()
    );
    let node = l.node_json(id);
    assert_eq!(node["status"], "online");
    assert_eq!(node["ip"], "127.0.0.1");
    assert!(node["online_ms"].as_i64().unwrap() > 0);
    assert_eq!(
        send(state_frame(id, &key, StateCode::Online)),
        200u16.to_le_bytes()
    );
    assert_eq!(
        send(state_frame(id, &key, StateCode::Loading)),
        200u16.to_le_bytes()
    );
    assert_eq!(status(&l), "loading");
    // The original's reply, text and all (it tells the key's holder the status).
    assert_eq!(
        send(state_frame(id, &key, StateCode::Loading)),
        b"\x93\x01Cannot transition node from loading to loading."
    );
    assert_eq!(
        send(state_frame(id, &key, StateCode::Online)),
        200u16.to_le_bytes()
    );
    assert_eq!(
        send(state_frame(id, &key, StateCode::Offline)),
        200u16.to_le_bytes()
    );
    assert_eq!(status(&l), "offline");

    // Unknown node → 404; bad checksum, bad padding, bad code, wrong length → 400.
    let unknown = Uuid::from_bytes([9; 16]);
    assert_eq!(
        send(state_frame(unknown, &key, StateCode::Online)),
        b"\x94\x01Node not found."
    );
    let mut bad = StateCode::Online.plaintext();
    bad[4] ^= 0x55;
    assert_eq!(
        send(state_frame_from_block(id, &key, bad)),
        400u16.to_le_bytes()
    );
    let mut bad = StateCode::Online.plaintext();
    bad[15] = 0;
    assert_eq!(
        send(state_frame_from_block(id, &key, bad)),
        400u16.to_le_bytes()
    );
    let seven = ijam::checksummed_plaintext::<16>(&7u32.to_le_bytes());
    assert_eq!(
        send(state_frame_from_block(id, &key, seven)),
        400u16.to_le_bytes()
    );
    assert_eq!(
        send(state_frame(id, &random_key(), StateCode::Online)),
        400u16.to_le_bytes()
    );
    assert_eq!(status(&l), "offline", "no failed request changed the node");
    if transport == Transport::Udp {
        let short = &state_frame(id, &key, StateCode::Online)[..47];
        assert_eq!(send(short.to_vec()), 400u16.to_le_bytes());
    }

    // Revoked: every transition is refused (the status alone: the key is gone).
    l.admin_ok(&["node", "revoke", &id.to_string()]);
    assert_eq!(
        send(state_frame(id, &key, StateCode::Online)),
        403u16.to_le_bytes()
    );
    assert_eq!(status(&l), "revoked");
}

fn state_transitions_tcp(backend: &str) {
    state_transitions(backend, Transport::Tcp)
}

fn state_transitions_udp(backend: &str) {
    state_transitions(backend, Transport::Udp)
}

fn bad_input_gets_its_reply_and_changes_nothing(backend: &str) {
    let Some(l) = Backend::named(backend)
        .map(|b| Listener::start(b, Key::Vector2048, &["--idle-timeout", "1s"]))
    else {
        return;
    };
    l.create_network("net", "alice");
    let p = l.add_passphrase("net", "n1");
    let pk = public_key(l.ports.cert);
    let before_pending = l.admin_ok(&["--json", "passphrase", "list", "net"]);

    // Wrong ciphertext length over UDP (no framing to hide behind): 400 (to 3 bytes
    // or more: the 9-byte reply may be 3x the datagram, no more).
    for len in [3, 255, 257, 512, 1400] {
        assert_eq!(
            udp_exchange(l.ports.reg_udp, &vec![0x5a; len]),
            REPLY_400,
            "{len}"
        );
    }
    // Random bytes of the right length, all-zero and all-ones blocks: 400, TCP and UDP.
    for block in [random::bytes::<256>().unwrap(), [0; 256], [0xff; 256]] {
        assert_eq!(tcp_exchange(l.ports.reg_tcp, &block), REPLY_400);
        assert_eq!(udp_exchange(l.ports.reg_udp, &block), REPLY_400);
    }
    // Valid OAEP blocks around bad plaintexts: bad one-hot type/arch, bad passphrase
    // characters, a short plaintext.
    let good = request(None, "net", &p, random_key()).to_bytes();
    let mut bad_type = good;
    bad_type[80..84].copy_from_slice(&3u32.to_le_bytes());
    let mut bad_arch = good;
    bad_arch[84..88].copy_from_slice(&3u32.to_le_bytes());
    let mut bad_pass = good;
    bad_pass[33] = b'!';
    for plain in [&bad_type[..], &bad_arch, &bad_pass, &good[..87]] {
        let ct = pk.encrypt(plain).unwrap();
        assert_eq!(tcp_exchange(l.ports.reg_tcp, &ct), REPLY_400);
        assert_eq!(udp_exchange(l.ports.reg_udp, &ct), REPLY_400);
    }
    use std::io::{Read, Write};
    // Four undecryptable frames in a row, the write side left open: four 400s, then the
    // listener closes the connection itself (too many bad frames), long before the
    // idle timeout would.
    let mut stream = connect(l.ports.reg_tcp);
    stream.write_all(&[0xa5u8; 4 * 256]).unwrap();
    let mut replies = Vec::new();
    stream
        .read_to_end(&mut replies)
        .expect("a clean close after the fourth reply");
    assert_eq!(replies, REPLY_400.repeat(4));
    l.wait_for_log_count("too many bad frames in a row; closing", 1);
    assert!(
        !l.log().contains("idle or partial frame; closing"),
        "closed for its bad frames, not by the idle timeout"
    );

    // A 1-byte write then silence: closed by the idle timeout, no reply.
    let mut stream = connect(l.ports.reg_tcp);
    stream.write_all(&[0x42]).unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        stream.read_to_end(&mut rest).unwrap(),
        0,
        "closed without a reply"
    );

    // Nothing changed, and the listener still serves: the passphrase still works.
    assert_eq!(
        l.admin_ok(&["--json", "passphrase", "list", "net"]),
        before_pending
    );
    assert!(l.nodes_json().is_empty());
    let (_, _) = {
        let key = random_key();
        let ct = pk.encrypt(&good_with_key(&good, key)).unwrap();
        (
            decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &ct), &key),
            key,
        )
    };
    assert_eq!(l.nodes_json().len(), 1);
}

fn good_with_key(plain: &[u8; 88], key: [u8; 32]) -> [u8; 88] {
    let mut p = *plain;
    p[48..80].copy_from_slice(&key);
    p
}

fn several_requests_on_one_connection_and_split_writes(backend: &str) {
    let Some(l) = listener(backend, Key::Vector2048) else {
        return;
    };
    l.create_network("net", "alice");
    let pk = public_key(l.ports.cert);
    let mut stream = connect(l.ports.reg_tcp);
    use std::io::{Read, Write};
    let mut secrets = Vec::new();
    for i in 0..3 {
        let p = l.add_passphrase("net", &format!("n{i}"));
        let key = random_key();
        secrets.push(p.clone());
        secrets.push(hex::encode(key));
        let ct = pk
            .encrypt(&request(None, "net", &p, key).to_bytes())
            .unwrap();
        // Split the ciphertext across writes (the original failed on this).
        stream.write_all(&ct[..100]).unwrap();
        stream.flush().unwrap();
        stream.write_all(&ct[100..]).unwrap();
        let mut reply = [0u8; 50];
        stream.read_exact(&mut reply).unwrap();
        decode_reply_upstream(&reply, &key);
    }
    assert_eq!(l.nodes_json().len(), 3);
    // The listener logged one line per request, and never a secret.
    let log = l.log();
    assert_eq!(log.matches("outcome=\"created\"").count(), 3, "{log}");
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "a secret reached the log");
    }
}

/// The vectors `cstring_crlf_*` (fields as `ijamreg` sends them from a console with
/// CRLF line ends: text, NUL, line end, stale bytes) and `arch0_*`, `arch1_*` (the
/// architecture codes the original stored as `none`) register, as they did upstream.
fn what_the_original_accepted_registers_c_strings_and_arch_0_and_1(backend: &str) {
    let Some(l) = listener(backend, Key::Vector2048) else {
        return;
    };
    l.create_network("vecnet2048", "alice");
    for (name, passphrase) in [
        ("crlf", "vecpass2"),
        ("arch0", "vecpass3"),
        ("arch1", "vecpass4"),
    ] {
        l.admin_ok(&[
            "passphrase",
            "add",
            "vecnet2048",
            "--node-name",
            name,
            "--passphrase",
            passphrase,
        ]);
    }
    for (vector, name, node_type, arch) in [
        ("cstring_crlf", "crlf", "device", "x86_ubuntu"),
        ("arch0", "arch0", "fog", "none"),
        ("arch1", "arch1", "cloud", "none"),
    ] {
        let plain = crate::support::listener::vector(&format!("{vector}_request_plain.bin"));
        let key: [u8; 32] = plain[48..80].try_into().unwrap();
        let cipher =
            crate::support::listener::vector(&format!("{vector}_request_cipher_rsa2048.bin"));
        let id = decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &cipher), &key);
        let node = l.node_json(id);
        assert_eq!(
            (
                &node["name"],
                &node["network"],
                &node["node_type"],
                &node["arch"]
            ),
            (
                &serde_json::json!(name),
                &serde_json::json!("vecnet2048"),
                &serde_json::json!(node_type),
                &serde_json::json!(arch)
            ),
            "{vector}"
        );
    }
}

/// `--replay-ttl` reaches the store: a byte-identical retry within it gets the same
/// node id, and once it has passed the retry is a second use of a spent passphrase.
fn a_retry_after_the_replay_ttl_finds_the_passphrase_spent(backend: &str) {
    let Some(l) = Backend::named(backend).map(|b| {
        Listener::start(
            b,
            Key::Vector2048,
            &["--replay-ttl", "500ms", "--rate-per-source", "0"],
        )
    }) else {
        return;
    };
    l.create_network("net", "alice");
    let p = l.add_passphrase("net", "n1");
    let key = random_key();
    let ct = public_key(l.ports.cert)
        .encrypt(&request(None, "net", &p, key).to_bytes())
        .unwrap();
    let id = decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &ct), &key);
    assert_eq!(
        decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &ct), &key),
        id,
        "within the TTL"
    );
    // Retry until the record is gone (the default TTL, 10 minutes, would keep it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let reply = tcp_exchange(l.ports.reg_tcp, &ct);
        if reply == REPLY_401 {
            break;
        }
        assert_eq!(decode_reply_upstream(&reply, &key), id);
        assert!(
            std::time::Instant::now() < deadline,
            "still replayed after 30 s"
        );
    }
    assert_eq!(l.nodes_json().len(), 1);
}

#[test]
fn a_redis_outage_gets_503_changes_nothing_and_the_listener_recovers() {
    let Some(mut l) = listener("redis", Key::Vector2048) else {
        return;
    };
    l.create_network("net", "alice");
    let p = l.add_passphrase("net", "n1");
    let pk = public_key(l.ports.cert);
    let key = random_key();
    let ct = pk
        .encrypt(&request(None, "net", &p, key).to_bytes())
        .unwrap();

    l.redis().unwrap().kill();
    let unavailable = b"\xf7\x01Service unavailable.";
    assert_eq!(tcp_exchange(l.ports.reg_tcp, &ct), unavailable);
    assert_eq!(udp_exchange(l.ports.reg_udp, &ct), unavailable);
    let state = state_frame(Uuid::from_bytes([3; 16]), &key, StateCode::Online);
    assert_eq!(
        tcp_exchange(l.ports.state_tcp, &state),
        503u16.to_le_bytes()
    );
    assert_eq!(
        udp_exchange(l.ports.state_udp, &state),
        503u16.to_le_bytes()
    );
    let device = Device::new(7);
    for transport in [Transport::Tcp, Transport::Udp] {
        assert_eq!(
            device.register(transport, &l).status(),
            Status::SERVICE_UNAVAILABLE,
            "pubkey register over {transport:?}"
        );
        assert_eq!(
            device.challenge(transport, &l).status(),
            Status::SERVICE_UNAVAILABLE,
            "pubkey challenge over {transport:?}"
        );
    }
    assert!(l.is_running());

    // Redis is back (empty: it persists nothing in tests): the listener reconnects by
    // itself (and says so once), then serves again.
    l.redis().unwrap().resume();
    l.wait_for_log_count("store reachable again", 1);
    l.create_network("net", "alice");
    let p = l.add_passphrase("net", "n1");
    let ct = pk
        .encrypt(&request(None, "net", &p, key).to_bytes())
        .unwrap();
    decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &ct), &key);
    assert!(l.log().contains("store_unavailable"));
}

// ---- sealed node keys are bound to their node, on the native stores ---------------

/// The raw sealed key in node `id`'s record, as the store holds it.
fn raw_sealed_key(l: &Listener, backend: &str, owner: &str, id: Uuid) -> Vec<u8> {
    match backend {
        "sqlite" => {
            let conn = sqlite_beside(l);
            conn.query_row(
                "SELECT sealed_key FROM ijam_nodes WHERE id = ?1",
                [id.to_string()],
                |row| row.get(0),
            )
            .unwrap()
        }
        "redis" => {
            use ::redis::Commands;
            let mut conn = redis_beside(l);
            let value: String = conn
                .hget(format!("rg:{{own:{owner}}}:node:{id}"), "key")
                .unwrap();
            hex::decode(value).unwrap()
        }
        other => panic!("no raw access to {other}"),
    }
}

/// Writes `value` as node `id`'s sealed key, straight into the store.
fn write_raw_sealed_key(l: &Listener, backend: &str, owner: &str, id: Uuid, value: &[u8]) {
    match backend {
        "sqlite" => {
            let conn = sqlite_beside(l);
            let changed = conn
                .execute(
                    "UPDATE ijam_nodes SET sealed_key = ?2 WHERE id = ?1",
                    rusqlite::params![id.to_string(), value],
                )
                .unwrap();
            assert_eq!(changed, 1);
        }
        "redis" => {
            use ::redis::Commands;
            let mut conn = redis_beside(l);
            let _: () = conn
                .hset(
                    format!("rg:{{own:{owner}}}:node:{id}"),
                    "key",
                    hex::encode(value),
                )
                .unwrap();
        }
        other => panic!("no raw access to {other}"),
    }
}

/// The listener's SQLite file, opened beside it (as anyone who can write the file can).
fn sqlite_beside(l: &Listener) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(l.data_dir.path().join("registrar.sqlite")).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    conn
}

/// A connection of our own to the listener's Redis (`::redis`: this file has a
/// `redis` module of its own).
fn redis_beside(l: &Listener) -> ::redis::Connection {
    ::redis::Client::open(l.store_url())
        .and_then(|c| c.get_connection())
        .unwrap()
}

/// Whoever can write the store copies node A's sealed key into node B's record, then
/// sends B state frames under A's key (which A's owner knows): B's record now holds a
/// value sealed for A, which does not open for B, so B refuses them as it would a
/// wrong key (400) and nothing changes.
fn a_sealed_key_copied_into_another_nodes_record_is_refused_there(backend: &str) {
    let Some(l) = listener(backend, Key::Vector2048) else {
        return;
    };
    l.create_network("net", "alice");
    let (a, key_a) = register_one(&l, "net", "a");
    let (b, key_b) = register_one(&l, "net", "b");
    let state =
        |id, key: &[u8; 32], code| tcp_exchange(l.ports.state_tcp, &state_frame(id, key, code));
    assert_eq!(state(b, &key_b, StateCode::Online), [0xc8, 0x00]);

    let sealed_for_a = raw_sealed_key(&l, backend, "alice", a);
    assert_eq!(
        sealed_for_a.len(),
        61,
        "a version byte and nonce ‖ ct ‖ tag"
    );
    assert_eq!(sealed_for_a[0], 0x02);
    write_raw_sealed_key(&l, backend, "alice", b, &sealed_for_a);
    assert_eq!(raw_sealed_key(&l, backend, "alice", b), sealed_for_a);

    for code in [StateCode::Offline, StateCode::Loading, StateCode::Online] {
        assert_eq!(
            state(b, &key_a, code),
            400u16.to_le_bytes(),
            "A's frame to B, {code:?}"
        );
    }
    l.wait_for_log_count("stored_key_refused", 3);
    let node_b = l.node_json(b);
    assert_eq!(node_b["status"], "online", "B did not change");
    // A's own record still opens for A.
    assert_eq!(state(a, &key_a, StateCode::Online), [0xc8, 0x00]);
    assert_eq!(l.node_json(a)["status"], "online");
}

#[test]
fn a_sealed_key_copied_into_another_nodes_record_is_refused_there_sqlite() {
    a_sealed_key_copied_into_another_nodes_record_is_refused_there("sqlite")
}

#[test]
fn a_sealed_key_copied_into_another_nodes_record_is_refused_there_redis() {
    a_sealed_key_copied_into_another_nodes_record_is_refused_there("redis")
}

/// A state frame has no freshness: a captured one can be sent again from anywhere.
/// The frame that last changed a node, sent again, is answered 200 and changes
/// nothing (not the recorded address); and a node's frames have a budget of their own
/// (`--state-burst-per-node`), whatever their sources.
fn a_replayed_state_frame_rewrites_nothing_and_a_node_has_a_budget(backend: &str) {
    let Some(l) = Backend::named(backend).map(|b| {
        Listener::start(
            b,
            Key::Vector2048,
            &[
                "--state-burst-per-node",
                "4",
                "--state-rate-per-node",
                "0.001",
            ],
        )
    }) else {
        return;
    };
    l.create_network("net", "alice");
    let (id, key) = register_one(&l, "net", "n1");
    let online = state_frame(id, &key, StateCode::Online);
    assert_eq!(
        tcp_exchange(l.ports.state_tcp, &online),
        200u16.to_le_bytes()
    );
    assert_eq!(l.node_json(id)["ip"], "127.0.0.1");
    // The same bytes from another address, over UDP: 200, and the address stays.
    let elsewhere = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    elsewhere.set_read_timeout(Some(TIMEOUT)).unwrap();
    elsewhere.send_to(&online, l.ports.state_udp).unwrap();
    let mut reply = [0u8; 64];
    let (n, _) = elsewhere.recv_from(&mut reply).unwrap();
    assert_eq!(&reply[..n], 200u16.to_le_bytes());
    let node = l.node_json(id);
    assert_eq!(
        (node["ip"].as_str(), node["status"].as_str()),
        (Some("127.0.0.1"), Some("online"))
    );
    l.wait_for_log_count("outcome=\"repeated\"", 1);
    // Two more frames spend the node's burst of 4; the fifth is refused.
    for code in [StateCode::Offline, StateCode::Online] {
        let frame = state_frame(id, &key, code);
        assert_eq!(
            tcp_exchange(l.ports.state_tcp, &frame),
            200u16.to_le_bytes()
        );
    }
    let fifth = state_frame(id, &key, StateCode::Offline);
    assert_eq!(
        tcp_exchange(l.ports.state_tcp, &fifth),
        429u16.to_le_bytes()
    );
    assert_eq!(
        l.node_json(id)["status"],
        "online",
        "the refused frame changed nothing"
    );
}
