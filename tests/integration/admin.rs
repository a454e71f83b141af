//! The administration commands and the data dir, through the real binary.

use std::os::unix::fs::PermissionsExt;

use crate::support::ijam_client::*;
use crate::support::listener::{Backend, Key, Listener, admin};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn first_start_generates_the_keys_and_later_starts_reuse_them() {
    let l = Listener::start(Backend::Sqlite, Key::Generate, &[]);
    let dir = l.data_dir.path().to_path_buf();
    for file in ["rsa_private_key.pem", "storage.key"] {
        let mode = std::fs::metadata(dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let cert = fetch_certificate(l.ports.cert);
    assert_eq!(cert.len(), 800);
    l.create_network("net", "alice");
    let p = l.add_passphrase("net", "n1");
    let key = random_key();
    let pk = public_key(l.ports.cert);
    let ct = pk
        .encrypt(&request(None, "net", &p, key).to_bytes())
        .unwrap();
    let id = decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &ct), &key);

    let (data_dir, backend) = l.stop();
    let mut again = Listener::start_in(backend, data_dir, &["--rsa-bits", "4096"]);
    assert!(again.is_running());
    assert_eq!(
        fetch_certificate(again.ports.cert),
        cert,
        "same key, --rsa-bits ignored"
    );
    assert_eq!(
        again.node_json(id)["name"],
        "n1",
        "the embedded store kept the node"
    );
    // The replay cache survives the restart too: a retry of the lost reply still works.
    assert_eq!(
        decode_reply_upstream(&tcp_exchange(again.ports.reg_tcp, &ct), &key),
        id
    );
}

#[test]
fn network_commands() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| admin(dir.path(), "sqlite", args);
    assert!(run(&["init"]).status.success());
    let out = run(&[
        "network", "create", "lab", "--owner", "alice", "--name", "The lab",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["network", "create", "lab", "--owner", "bob"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let out = run(&["network", "create", "has space", "--owner", "bob"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid network id"),
        "{}",
        stderr(&out)
    );
    let out = run(&["network", "create", "seventeen-chars-x", "--owner", "bob"]);
    assert!(!out.status.success());

    let out = run(&["--json", "network", "show", "lab"]);
    let net: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(net["owner"], "alice");
    assert_eq!(net["name"], "The lab");
    let table = String::from_utf8(run(&["network", "list"]).stdout).unwrap();
    assert!(table.starts_with("NETWORK"), "{table}");
    assert!(table.contains("lab") && table.contains("alice"), "{table}");
    let out = run(&["network", "delete", "lab"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    let out = run(&["network", "create", "spare", "--owner", "alice"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["--json", "network", "delete", "spare", "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deleted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(deleted["nodes"], 0);
    assert!(!run(&["network", "show", "spare"]).status.success());
    let out = run(&["network", "show", "nope"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("\"nope\" does not exist"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn passphrase_commands() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| admin(dir.path(), "sqlite", args);
    assert!(run(&["init"]).status.success());
    assert!(
        run(&["network", "create", "lab", "--owner", "alice"])
            .status
            .success()
    );

    let out = run(&[
        "passphrase",
        "add",
        "lab",
        "--node-name",
        "sensor",
        "--count",
        "5",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let minted: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(minted.len(), 5);
    // 15 characters: as many as the C client ijamreg reads; each carries its check.
    assert!(minted.iter().all(|p| p.len() == 15
        && p.bytes().all(|b| b.is_ascii_alphanumeric())
        && registrar::core::crypto::passphrase::looks_generated(p)));
    let mut unique = minted.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5);

    let listing = String::from_utf8(run(&["passphrase", "list", "lab"]).stdout).unwrap();
    let json = String::from_utf8(run(&["--json", "passphrase", "list", "lab"]).stdout).unwrap();
    for i in 1..=5 {
        assert!(listing.contains(&format!("sensor-{i}")), "{listing}");
    }
    for p in &minted {
        assert!(
            !listing.contains(p.as_str()) && !json.contains(p.as_str()),
            "a secret was listed"
        );
    }

    // Same name again: refused, and nothing of the batch is added.
    let out = run(&[
        "passphrase",
        "add",
        "lab",
        "--node-name",
        "sensor",
        "--count",
        "6",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already pending"), "{}", stderr(&out));
    let pending: Vec<serde_json::Value> =
        serde_json::from_slice(&run(&["--json", "passphrase", "list", "lab"]).stdout).unwrap();
    assert_eq!(pending.len(), 5);

    let out = run(&["passphrase", "revoke", "lab", "--node-name", "sensor-3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pending: Vec<serde_json::Value> =
        serde_json::from_slice(&run(&["--json", "passphrase", "list", "lab"]).stdout).unwrap();
    assert_eq!(pending.len(), 4);
    assert!(pending.iter().all(|p| p["node_name"] != "sensor-3"));
    let out = run(&["passphrase", "revoke", "lab", "--node-name", "sensor-3"]);
    assert!(!out.status.success());

    // Typed passphrases: 8–16 alphanumerics, as the portal allowed them but never
    // shorter than 8 (unless asked for, for a node that already has one).
    let typed = |name: &str, passphrase: &str, extra: &[&str]| {
        run(&[
            &[
                "passphrase",
                "add",
                "lab",
                "--node-name",
                name,
                "--passphrase",
                passphrase,
            ][..],
            extra,
        ]
        .concat())
    };
    let out = typed("t0", "a", &[]);
    assert!(!out.status.success(), "a one-character passphrase");
    assert!(
        stderr(&out).contains("at least 8 characters"),
        "{}",
        stderr(&out)
    );
    let out = typed("t1", "alpha12", &[]);
    assert!(!out.status.success(), "seven characters");
    assert!(typed("t1", "alpha12", &["--allow-short"]).status.success());
    assert!(typed("t2", "alpha123", &[]).status.success(), "eight");
    let out = typed("t3", "not-alnum", &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid passphrase"),
        "{}",
        stderr(&out)
    );
    // Sixteen: what the portal allowed; ijamreg cannot type it, which the command says.
    let out = typed("t4", "abcdefghijklmnop", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("at most 15 characters"),
        "{}",
        stderr(&out)
    );
    assert!(
        !typed("t5", "abcdefghijklmnopq", &[]).status.success(),
        "seventeen"
    );
    // The same secret twice in one network is refused.
    assert!(!typed("t6", "alpha123", &[]).status.success());

    let out = run(&["passphrase", "add", "nope", "--node-name", "x"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("\"nope\" does not exist"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn network_reregistration_rule_commands() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| admin(dir.path(), "sqlite", args);
    let json = |args: &[&str]| -> serde_json::Value {
        let out = run(&[&["--json"], args].concat());
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert!(run(&["init"]).status.success());

    // `owner` unless told otherwise: the original rule.
    let out = run(&["network", "create", "lab", "--owner", "alice"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(said.contains("re-registration owner"), "{said}");
    assert_eq!(json(&["network", "show", "lab"])["reregistration"], "owner");
    let created = json(&[
        "network",
        "create",
        "strict",
        "--owner",
        "alice",
        "--reregistration",
        "minted",
    ]);
    assert_eq!(created["reregistration"], "minted");
    let shown = String::from_utf8(run(&["network", "show", "strict"]).stdout).unwrap();
    assert!(shown.contains("re-registration:     minted"), "{shown}");

    let table = String::from_utf8(run(&["network", "list"]).stdout).unwrap();
    let rule_of = |table: &str, network: &str| -> String {
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        let column = header
            .iter()
            .position(|h| *h == "REREGISTRATION")
            .unwrap_or_else(|| panic!("no REREGISTRATION column: {table}"));
        let row = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(network))
            .unwrap_or_else(|| panic!("no row for {network}: {table}"));
        row.split_whitespace().nth(column).unwrap().to_owned()
    };
    assert_eq!(
        (rule_of(&table, "lab"), rule_of(&table, "strict")),
        ("owner".into(), "minted".into()),
        "{table}"
    );
    let listed = json(&["network", "list"]);
    assert_eq!(listed[0]["reregistration"], "owner", "{listed}");
    assert_eq!(listed[1]["reregistration"], "minted", "{listed}");

    // `network set` changes it both ways.
    let out = run(&["network", "set", "lab", "--reregistration", "minted"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(said.contains("lab: re-registration minted"), "{said}");
    assert_eq!(
        json(&["network", "show", "lab"])["reregistration"],
        "minted"
    );
    let relaxed = json(&["network", "set", "strict", "--reregistration", "owner"]);
    assert_eq!(
        (relaxed["id"].as_str(), relaxed["reregistration"].as_str()),
        (Some("strict"), Some("owner"))
    );
    let table = String::from_utf8(run(&["network", "list"]).stdout).unwrap();
    assert_eq!(
        (rule_of(&table, "lab"), rule_of(&table, "strict")),
        ("minted".into(), "owner".into()),
        "{table}"
    );

    // Refused, naming why, and nothing changes.
    let before = json(&["network", "list"]);
    for (args, says) in [
        (
            &["network", "set", "lab", "--reregistration", "anyone"][..],
            "possible values: owner, minted",
        ),
        (&["network", "set", "lab"], "--reregistration"),
        (
            &["network", "set", "nope", "--reregistration", "owner"],
            "\"nope\" does not exist",
        ),
        (
            &[
                "network",
                "create",
                "other",
                "--owner",
                "bob",
                "--reregistration",
                "strict",
            ],
            "possible values: owner, minted",
        ),
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(json(&["network", "list"]), before);
}

#[test]
fn passphrases_minted_for_a_node_are_checked_and_listed() {
    let l = Listener::start(Backend::Sqlite, Key::Vector2048, &[]);
    l.create_network("net", "alice");
    l.create_network("other", "alice");
    let pk = public_key(l.ports.cert);
    let register = |network: &str, name: &str| {
        let p = l.add_passphrase(network, name);
        let key = random_key();
        let ct = pk
            .encrypt(&request(None, network, &p, key).to_bytes())
            .unwrap();
        decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &ct), &key)
    };
    let node = register("net", "n1").to_string();
    let elsewhere = register("other", "o1").to_string();
    l.add_passphrase("net", "plain");

    let minted = l.admin_ok(&[
        "passphrase",
        "add",
        "net",
        "--node-name",
        "n1-again",
        "--for-node",
        &node,
    ]);
    assert!(
        registrar::core::crypto::passphrase::looks_generated(minted.trim()),
        "{minted}"
    );
    let typed: serde_json::Value = serde_json::from_str(&l.admin_ok(&[
        "--json",
        "passphrase",
        "add",
        "net",
        "--node-name",
        "n1-typed",
        "--for-node",
        &node,
        "--passphrase",
        "typedFor1node",
    ]))
    .unwrap();
    assert_eq!(typed[0]["for_node"], node.as_str());

    let pending: Vec<serde_json::Value> =
        serde_json::from_str(&l.admin_ok(&["--json", "passphrase", "list", "net"])).unwrap();
    let for_node = |name: &str| {
        pending
            .iter()
            .find(|p| p["node_name"] == name)
            .unwrap_or_else(|| panic!("{name}: {pending:?}"))["for_node"]
            .clone()
    };
    assert_eq!(for_node("plain"), serde_json::Value::Null);
    assert_eq!(for_node("n1-again"), node.as_str());
    assert_eq!(for_node("n1-typed"), node.as_str());
    let table = l.admin_ok(&["passphrase", "list", "net"]);
    let header: Vec<&str> = table.lines().next().unwrap().split("  ").collect();
    assert_eq!(
        header
            .iter()
            .filter(|h| !h.is_empty())
            .map(|h| h.trim())
            .collect::<Vec<_>>(),
        ["NODE NAME", "FOR NODE", "CREATED", "EXPIRES"],
        "{table}"
    );
    let row = |name: &str| -> Vec<String> {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name}: {table}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(row("plain")[1], "-", "{table}");
    assert_eq!(row("n1-again")[1], node, "{table}");

    // Not a node of the network: refused, naming it, and nothing is written.
    let missing = uuid::Uuid::from_bytes([7; 16]).to_string();
    for stranger in [&missing, &elsewhere] {
        let out = l.admin(&[
            "passphrase",
            "add",
            "net",
            "--node-name",
            "x",
            "--for-node",
            stranger,
        ]);
        assert!(!out.status.success(), "{stranger}");
        assert!(
            stderr(&out).contains(&format!("node {stranger} is not a node of network \"net\"")),
            "{}",
            stderr(&out)
        );
    }
    for (args, says) in [
        (
            &[
                "passphrase",
                "add",
                "net",
                "--node-name",
                "x",
                "--for-node",
                &node,
                "--count",
                "2",
            ][..],
            "cannot be used with",
        ),
        (
            &[
                "passphrase",
                "add",
                "net",
                "--node-name",
                "x",
                "--for-node",
                "not-a-uuid",
            ],
            "invalid value",
        ),
    ] {
        let out = l.admin(args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    let after: Vec<serde_json::Value> =
        serde_json::from_str(&l.admin_ok(&["--json", "passphrase", "list", "net"])).unwrap();
    assert_eq!(after, pending, "nothing written");
}

#[test]
fn expired_and_revoked_passphrases_get_the_one_401_reply() {
    let l = Listener::start(Backend::Sqlite, Key::Vector2048, &[]);
    l.create_network("net", "alice");
    let pk = public_key(l.ports.cert);
    let expired = l
        .admin_ok(&[
            "passphrase",
            "add",
            "net",
            "--node-name",
            "late",
            "--expires-in",
            "1ms",
        ])
        .trim()
        .to_owned();
    let listing = l.admin_ok(&["passphrase", "list", "net"]);
    assert!(listing.contains("(expired)"), "{listing}");
    let revoked = l.add_passphrase("net", "gone");
    l.admin_ok(&["passphrase", "revoke", "net", "--node-name", "gone"]);
    for p in [expired, revoked] {
        let ct = pk
            .encrypt(&request(None, "net", &p, random_key()).to_bytes())
            .unwrap();
        assert_eq!(
            tcp_exchange(l.ports.reg_tcp, &ct),
            b"\x91\x01Invalid passphrase."
        );
    }
    assert!(l.nodes_json().is_empty());
}

#[test]
fn node_commands() {
    let l = Listener::start(Backend::Sqlite, Key::Vector2048, &[]);
    l.create_network("net", "alice");
    let pk = public_key(l.ports.cert);
    let p = l.add_passphrase("net", "n1");
    let key = random_key();
    let ct = pk
        .encrypt(&request(None, "net", &p, key).to_bytes())
        .unwrap();
    let id = decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &ct), &key);

    let table = l.admin_ok(&["node", "list", "--network", "net"]);
    assert!(
        table.starts_with("NODE") && table.contains(&id.to_string()),
        "{table}"
    );
    let shown = l.admin_ok(&["node", "show", &id.to_string()]);
    assert!(shown.contains("status:      offline"), "{shown}");
    assert!(
        !shown.contains(&hex::encode(key)),
        "the node key is never shown"
    );
    let json = l.admin_ok(&["--json", "node", "show", &id.to_string()]);
    assert!(
        !json.contains("sealed") && !json.contains(&hex::encode(key)),
        "{json}"
    );

    let out = l.admin(&["node", "list", "--network", "nope"]);
    assert!(!out.status.success());
    let missing = uuid::Uuid::from_bytes([1; 16]).to_string();
    let out = l.admin(&["node", "show", &missing]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    let out = l.admin(&["node", "revoke", &missing]);
    assert!(!out.status.success());

    l.admin_ok(&["node", "revoke", &id.to_string()]);
    assert_eq!(l.node_json(id)["status"], "revoked");
}

#[test]
fn an_unreachable_store_is_a_clear_error_naming_the_url() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["network", "list"][..],
        &["passphrase", "add", "net", "--node-name", "x"],
    ] {
        let out = admin(dir.path(), "redis://127.0.0.1:1/", args);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains("redis://127.0.0.1:1"), "{err}");
        assert!(err.contains("unavailable"), "{err}");
    }
    let out = admin(dir.path(), "postgres://x", &["network", "list"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown store \"postgres\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn help_answers_the_questions_an_operator_has() {
    let out = admin(std::path::Path::new("."), "sqlite", &["serve", "--help"]);
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--reg-port",
        "REGISTRAR_REG_PORT",
        "--rsa-bits",
        "--store",
        "--data-dir",
        "--idle-timeout",
    ] {
        assert!(help.contains(needle), "{needle} missing from serve --help");
    }
    for (command, needles) in [
        (
            &["network", "create", "--help"][..],
            &["--reregistration", "take over", "--for-node"][..],
        ),
        (
            &["network", "set", "--help"],
            &["--reregistration", "minted"],
        ),
        (&["passphrase", "add", "--help"], &["--for-node", "revoked"]),
    ] {
        let out = admin(std::path::Path::new("."), "sqlite", command);
        let help = String::from_utf8(out.stdout).unwrap();
        for needle in needles {
            assert!(help.contains(needle), "{needle} missing from {command:?}");
        }
    }
}

#[test]
fn sigterm_answers_every_request_already_read_and_exits_0() {
    // RSA-4096 on one crypto thread: 24 requests queue up for tens of milliseconds.
    let mut l = Listener::start(Backend::Sqlite, Key::Vector4096, &["--crypto-threads", "1"]);
    let pk = public_key(l.ports.cert);
    let ct = pk
        .encrypt(&request(None, "net", "nosuchpass", random_key()).to_bytes())
        .unwrap();
    let clients: Vec<_> = (0..24)
        .map(|_| {
            let (ct, addr) = (ct.clone(), l.ports.reg_tcp);
            let mut stream = connect(addr);
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                stream.write_all(&ct).unwrap();
                let mut reply = Vec::new();
                let _ = stream.read_to_end(&mut reply);
                reply
            })
        })
        .collect();
    // Every request has been read (the listener says so) before the signal.
    l.wait_for_log_count("request received", 24);
    l.signal("TERM");
    let status = l.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", l.log());
    for c in clients {
        assert_eq!(
            c.join().unwrap(),
            b"\x91\x01Invalid passphrase.",
            "answered before exit"
        );
    }
}

#[test]
fn sigterm_stops_accepting_on_every_port_while_requests_are_in_flight() {
    let Some(backend) = Backend::named("redis") else {
        return;
    };
    let mut l = Listener::start(backend, Key::Vector2048, &[]);
    let pk = public_key(l.ports.cert);
    let ct = pk
        .encrypt(&request(None, "net", "nosuchpass", random_key()).to_bytes())
        .unwrap();
    // Redis stalls: the requests are read and decrypted, then wait on the store, so
    // the listener has work in flight for as long as the test needs.
    l.redis().unwrap().pause();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (ct, addr) = (ct.clone(), l.ports.reg_tcp);
            let mut stream = connect(addr);
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                stream.write_all(&ct).unwrap();
                let mut reply = Vec::new();
                let _ = stream.read_to_end(&mut reply);
                reply
            })
        })
        .collect();
    l.wait_for_log_count("request received", 4);
    l.signal("TERM");
    l.wait_for_log_count("shutting down: no new connections", 1);
    let ports = l.ports;
    for addr in [
        ports.cert,
        ports.reg_tcp,
        ports.state_tcp,
        ports.envelope_tcp,
    ] {
        // A connect that races the listener's close lands in the old backlog and is
        // reset; once the socket is closed, connects are refused.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match std::net::TcpStream::connect(addr) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                // The socket closed during this handshake: try again.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("{addr}: {e}"),
                Ok(_) => {}
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{addr} still accepts after SIGTERM"
            );
        }
    }
    assert!(
        l.is_running(),
        "the requests in flight are still being answered"
    );
    l.redis().unwrap().unpause();
    let status = l.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", l.log());
    for c in clients {
        assert_eq!(c.join().unwrap(), b"\x91\x01Invalid passphrase.");
    }
}

#[test]
fn a_rotation_grace_ends_while_the_listener_runs() {
    let l = Listener::start(Backend::Sqlite, Key::Vector2048, &[]);
    l.create_network("net", "alice");
    let old_pk = public_key(l.ports.cert);
    l.admin_ok(&["key", "rotate", "--grace", "2s"]);
    l.wait_for_log_count("RSA key rotated", 1);
    // The listener drops the previous key by itself when its grace ends: no file
    // changed, no command ran.
    l.wait_for_log_count("RSA keys reloaded: only the current key decrypts", 1);
    let p = l.add_passphrase("net", "late");
    let key = random_key();
    let late = old_pk
        .encrypt(&request(None, "net", &p, key).to_bytes())
        .unwrap();
    assert_eq!(tcp_exchange(l.ports.reg_tcp, &late), b"\x90\x01request");
    let current = public_key(l.ports.cert)
        .encrypt(&request(None, "net", &p, key).to_bytes())
        .unwrap();
    decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &current), &key);
}

#[test]
fn key_rotation_serves_the_new_key_while_the_old_one_still_decrypts_for_its_grace() {
    let l = Listener::start(Backend::Sqlite, Key::Vector2048, &[]);
    l.create_network("net", "alice");
    let old_cert = fetch_certificate(l.ports.cert);
    let old_pk = public_key(l.ports.cert);
    let register = |pk: &registrar::core::crypto::RsaPublicKey, name: &str| {
        let p = l.add_passphrase("net", name);
        let key = random_key();
        let ct = pk
            .encrypt(&request(None, "net", &p, key).to_bytes())
            .unwrap();
        (tcp_exchange(l.ports.reg_tcp, &ct), key)
    };

    let out = l.admin_ok(&["--json", "key", "rotate", "--grace", "1h"]);
    let rotation: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rotation["bits"], 2048);
    l.wait_for_log_count("RSA key rotated", 1);
    let new_cert = fetch_certificate(l.ports.cert);
    assert_ne!(
        new_cert, old_cert,
        "the certificate port serves the new key"
    );
    assert_eq!(new_cert.len(), 800);
    let new_pk = public_key(l.ports.cert);
    // A node that fetched the old key just before the rotation still registers.
    let (reply, key) = register(&old_pk, "before");
    decode_reply_upstream(&reply, &key);
    let (reply, key) = register(&new_pk, "after");
    decode_reply_upstream(&reply, &key);
    let shown = l.admin_ok(&["key", "show"]);
    assert!(shown.contains("previous: decrypts until"), "{shown}");

    // Rotating again with no grace: the key of two rotations ago is gone for good,
    // and the key just replaced stops decrypting at once.
    l.admin_ok(&["key", "rotate", "--grace", "0s"]);
    l.wait_for_log_count("RSA keys reloaded: only the current key decrypts", 1);
    let (reply, _) = register(&old_pk, "too-late-1");
    assert_eq!(reply, b"\x90\x01request");
    let (reply, _) = register(&new_pk, "too-late-2");
    assert_eq!(reply, b"\x90\x01request");
    let (reply, key) = register(&public_key(l.ports.cert), "current");
    decode_reply_upstream(&reply, &key);

    // The size stays: a different size could not share the TCP port's framing.
    let dir = l.data_dir.path().to_str().unwrap().to_owned();
    let out = admin(std::path::Path::new(&dir), "sqlite", &["key", "rotate"]);
    assert!(out.status.success());
    let fresh = tempfile::tempdir().unwrap();
    let out = admin(fresh.path(), "sqlite", &["key", "rotate"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("start `registrar serve` once first"),
        "{}",
        stderr(&out)
    );
}
