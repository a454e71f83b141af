//! What an operator meets first: `init`, where the admin commands look for the store,
//! and the errors of a port in use, a permission problem or a bad log setting.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use crate::support::listener::{BIN, Backend, Key, Listener, admin};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_makes_a_private_data_dir_and_a_second_init_keeps_it() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a/registrar-data");
    let out = admin(&dir, "sqlite", &["init"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        printed.contains("first start: made RSA-2048 key"),
        "{printed}"
    );
    assert_eq!(mode(&dir), 0o700, "the data dir");
    for file in [
        "rsa_private_key.pem",
        "storage.key",
        "signing_key.pem",
        "registrar.sqlite",
    ] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
    // A write leaves SQLite's -wal (and -shm) beside the store: private too.
    let out = admin(
        &dir,
        "sqlite",
        &["network", "create", "lab", "--owner", "alice"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    let key = std::fs::read(dir.join("rsa_private_key.pem")).unwrap();
    let out = admin(&dir, "sqlite", &["init"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("nothing made"),
        "a second init makes nothing"
    );
    assert_eq!(std::fs::read(dir.join("rsa_private_key.pem")).unwrap(), key);
    let out = admin(&dir, "sqlite", &["--json", "network", "list"]);
    assert!(String::from_utf8(out.stdout).unwrap().contains("\"lab\""));
}

#[test]
fn admin_commands_never_make_a_data_dir_or_a_store() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("registrar-data");
    for args in [
        &["network", "list"][..],
        &["passphrase", "add", "lab", "--node-name", "n1"],
        &["node", "list"],
        &["device", "list"],
        &["key", "show"],
    ] {
        let out = admin(&dir, "sqlite", args);
        assert!(!out.status.success(), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("no data dir at {}", dir.display())),
            "{args:?}: {err}"
        );
        assert!(err.contains("registrar init"), "{args:?}: {err}");
        assert!(!dir.exists(), "{args:?} made the data dir");
    }
    // A data dir without its store (keys copied, the store not made yet).
    std::fs::create_dir(&dir).unwrap();
    let out = admin(&dir, "sqlite", &["network", "list"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    let store = dir.join("registrar.sqlite");
    assert!(
        err.contains(&format!("no store at sqlite://{}", store.display())),
        "{err}"
    );
    assert!(!store.exists(), "an admin command made a store");
}

#[test]
fn a_port_in_use_is_named_and_no_file_is_made() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("registrar-data");
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(&dir)
        .args(["serve", "--bind", "127.0.0.1", "--cert-port", "0"])
        .args([
            "--reg-port",
            &port,
            "--state-port",
            "0",
            "--envelope-port",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "cannot listen on 127.0.0.1:{port} (registration port, --reg-port)"
        )),
        "{err}"
    );
    assert!(err.contains("choose another port with --reg-port"), "{err}");
    assert!(!dir.exists(), "a refused start made the data dir");
}

#[test]
fn a_permission_error_names_the_path_once_and_what_to_do() {
    let root = tempfile::tempdir().unwrap();
    // Traversable by anyone, writable by no one.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let locked = root.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    let dir = locked.join("registrar-data");
    // root ignores modes: run the command as nobody.
    let is_root = rustix_uid() == 0;
    let mut cmd = if is_root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            BIN,
        ]);
        c
    } else {
        Command::new(BIN)
    };
    let out = cmd
        .arg("--data-dir")
        .arg(&dir)
        .arg("init")
        .output()
        .expect("run registrar (as nobody, through setpriv, when root)");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("permission denied"), "{err}");
    assert_eq!(
        err.matches(&dir.display().to_string()).count(),
        1,
        "the path once: {err}"
    );
    assert!(err.contains("--data-dir"), "says what to do: {err}");
}

/// The effective uid, from /proc (no libc in the test crate).
fn rustix_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
        .expect("Uid line in /proc/self/status")
}

#[test]
fn an_invalid_registrar_log_is_an_error_and_the_help_names_the_variable() {
    let root = tempfile::tempdir().unwrap();
    for bad in ["verbose", "info,loud", "registrar=shouty"] {
        let out = Command::new(BIN)
            .arg("--data-dir")
            .arg(root.path())
            .args(["network", "list"])
            .env("REGISTRAR_LOG", bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = stderr(&out);
        assert!(err.contains("REGISTRAR_LOG"), "{bad}: {err}");
        assert!(err.contains("debug"), "{bad}: the levels are listed: {err}");
    }
    for good in ["debug", "WARN", "registrar=debug,redis=warn"] {
        let out = Command::new(BIN)
            .args(["--help"])
            .env("REGISTRAR_LOG", good)
            .output()
            .unwrap();
        assert!(out.status.success(), "{good}: {}", stderr(&out));
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(help.contains("REGISTRAR_LOG"), "{help}");
    }
}

#[test]
fn the_first_start_guide_repeats_the_store_option() {
    let Some(backend) = Backend::named("redis") else {
        return;
    };
    let l = Listener::start(backend, Key::Generate, &[]);
    let printed = l.wait_for_stdout("add a passphrase:");
    let expected = format!(
        "registrar --data-dir {} --store {} passphrase add",
        l.data_dir.path().display(),
        l.store_url()
    );
    assert!(printed.contains(&expected), "{printed}");
    // Pasted as printed, the hint reaches the listener's store.
    let create = format!(
        "registrar --data-dir {} --store {} network create",
        l.data_dir.path().display(),
        l.store_url()
    );
    assert!(printed.contains(&create), "{printed}");
    l.create_network("lab", "alice");
    assert!(!l.data_dir.path().join("registrar.sqlite").exists());
}

#[test]
fn passphrase_list_sorts_names_as_people_count() {
    let root = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| admin(root.path(), "sqlite", args);
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
        "cam",
        "--count",
        "12",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for args in [
        &["passphrase", "list", "lab"][..],
        &["--json", "passphrase", "list", "lab"],
    ] {
        let listing = String::from_utf8(run(args).stdout).unwrap();
        let order: Vec<usize> = (1..=12)
            .map(|i| {
                let name = format!("cam-{i}\"");
                let name = if args[0] == "--json" {
                    name
                } else {
                    format!("cam-{i} ")
                };
                listing
                    .find(&name)
                    .unwrap_or_else(|| panic!("{name} in {listing}"))
            })
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{args:?}: {listing}");
    }
}
