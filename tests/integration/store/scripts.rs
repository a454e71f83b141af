//! Every Redis script is cluster-safe: it declares every key it touches in KEYS, and
//! its keys share one slot. The first is checked here on the sources; the second by the
//! batteries, which run every script on a node in cluster mode, where Redis refuses a
//! `#!lua` script that strays across slots (shown below to be so). The portal's
//! scripts (`portal/`) keep its layout, which has no hash tags and lives on one Redis
//! (a cluster is refused at connect, `portal.rs`); they declare their keys all the same.

use std::path::Path;

use registrar::store::redis::SCRIPTS;

use crate::support::redis_server::{PrivateRedis, command};

#[test]
fn every_script_begins_with_the_shebang_and_never_names_or_builds_a_key() {
    for (path, source) in SCRIPTS {
        assert!(
            source.starts_with("#!lua\n"),
            "{path}: without the #!lua line Redis lets a script touch any slot"
        );
        for (n, line) in source.lines().enumerate() {
            let code = line.split("--").next().unwrap_or_default();
            let named = ["rg:", "network:", "node:", "user:", "registrar:"]
                .iter()
                .any(|prefix| {
                    code.contains(&format!("'{prefix}")) || code.contains(&format!("\"{prefix}"))
                });
            assert!(
                !named,
                "{path}:{}: a key named or built inside the script, not declared in KEYS: {line}",
                n + 1
            );
            assert!(
                !code.contains("redis.call('KEYS'") && !code.contains("'SCAN'"),
                "{path}:{}: keys found inside the script: {line}",
                n + 1
            );
        }
    }
}

#[test]
fn every_script_file_is_loaded_by_the_store() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/redis/scripts");
    let mut on_disk = Vec::new();
    for flow in std::fs::read_dir(&root).unwrap() {
        let flow = flow.unwrap().path();
        for file in std::fs::read_dir(&flow).unwrap() {
            let file = file.unwrap().path();
            on_disk.push(
                file.strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    on_disk.sort();
    let mut loaded: Vec<String> = SCRIPTS.iter().map(|(p, _)| p.to_string()).collect();
    loaded.sort();
    assert_eq!(on_disk, loaded);
}

#[test]
fn a_cluster_node_refuses_a_script_across_two_slots() {
    let Some(server) = PrivateRedis::start_cluster_node() else {
        return;
    };
    let addr = server
        .url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let script = "#!lua\nredis.call('SET', KEYS[1], 1)\nredis.call('SET', KEYS[2], 1)\nreturn 1";
    let across = command(addr, &["EVAL", script, "2", "{a}x", "{b}y"]).unwrap();
    assert!(across.starts_with("-CROSSSLOT"), "{across}");
    let undeclared =
        "#!lua\nredis.call('SET', KEYS[1], 1)\nredis.call('SET', 'other', 1)\nreturn 1";
    let strayed = command(addr, &["EVAL", undeclared, "1", "{a}x"]).unwrap();
    assert!(
        strayed.contains("do not hash to the same slot"),
        "{strayed}"
    );
    let within = command(addr, &["EVAL", script, "2", "{a}x", "{a}y"]).unwrap();
    assert_eq!(within, ":1");
}
