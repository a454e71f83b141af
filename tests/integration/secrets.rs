//! No secret reaches a log line: a full run of every flow at debug level, then a scan
//! of everything the listener wrote for each secret it handled, in every encoding a
//! careless log line might use.

use crate::support::envelope_client::Device;
use crate::support::ijam_client::*;
use crate::support::listener::{Backend, Key, Listener};
use registrar::wire::envelope::Status;
use registrar::wire::ijam::StateCode;

/// The encodings a secret could leak in: raw text, lowercase and uppercase hex, and
/// Rust's `{:?}` of a byte array.
fn encodings(secret: &[u8]) -> Vec<String> {
    let mut forms = vec![
        hex::encode(secret),
        hex::encode_upper(secret),
        format!("{secret:?}"),
    ];
    if let Ok(text) = std::str::from_utf8(secret) {
        forms.push(text.to_owned());
    }
    forms
}

fn every_flow_at_debug(backend: &str) {
    let Some(b) = Backend::named(backend) else {
        return;
    };
    let l = Listener::start(b, Key::Vector2048, &[]);
    let mut secrets: Vec<Vec<u8>> = Vec::new();

    // ijam: registration over TCP and UDP, a failed one, a retry, state changes.
    l.create_network("net", "alice");
    let pk = public_key(l.ports.cert);
    for transport in [Transport::Tcp, Transport::Udp] {
        let p = l.add_passphrase("net", &format!("n-{transport:?}"));
        let key = random_key();
        let ct = pk
            .encrypt(&request(None, "net", &p, key).to_bytes())
            .unwrap();
        let id = decode_reply_upstream(
            &exchange(transport, l.ports.reg_tcp, l.ports.reg_udp, &ct),
            &key,
        );
        let retried = decode_reply_upstream(
            &exchange(transport, l.ports.reg_tcp, l.ports.reg_udp, &ct),
            &key,
        );
        assert_eq!(retried, id, "the retry was replayed");
        let wrong = pk
            .encrypt(&request(None, "net", &p, random_key()).to_bytes())
            .unwrap();
        assert_eq!(
            exchange(transport, l.ports.reg_tcp, l.ports.reg_udp, &wrong),
            b"\x91\x01Invalid passphrase."
        );
        for code in [StateCode::Online, StateCode::Loading] {
            let reply = exchange(
                transport,
                l.ports.state_tcp,
                l.ports.state_udp,
                &state_frame(id, &key, code),
            );
            assert_eq!(reply, 200u16.to_le_bytes(), "{code:?}");
        }
        secrets.push(p.into_bytes());
        secrets.push(key.to_vec());
    }
    let typed = "typedsecret42";
    l.admin_ok(&[
        "passphrase",
        "add",
        "net",
        "--node-name",
        "typed",
        "--passphrase",
        typed,
    ]);
    let typed_key = random_key();
    let ct = pk
        .encrypt(&request(None, "net", typed, typed_key).to_bytes())
        .unwrap();
    decode_reply_upstream(&tcp_exchange(l.ports.reg_tcp, &ct), &typed_key);
    secrets.push(typed.as_bytes().to_vec());
    secrets.push(typed_key.to_vec());

    // pubkey: register, challenge, attest (and a replayed nonce), over TCP and UDP.
    for (n, transport) in [(1, Transport::Tcp), (2, Transport::Udp)] {
        let device = Device::new(n);
        assert_eq!(device.register(transport, &l).status(), Status::CREATED);
        let nonce = device.nonce(transport, &l);
        assert_eq!(device.attest(transport, &l, nonce).status(), Status::OK);
        assert_eq!(
            device.attest(transport, &l, nonce).status(),
            Status::CONFLICT,
            "a used nonce"
        );
        secrets.push(nonce.0.to_vec());
        let pem = device.key.to_pkcs8_pem().unwrap();
        secrets.extend(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .map(|l| l.as_bytes().to_vec()),
        );
    }

    // The listener's own keys.
    let dir = l.data_dir.path();
    let storage_hex = std::fs::read_to_string(dir.join("storage.key")).unwrap();
    secrets.push(hex::decode(storage_hex.trim()).unwrap());
    let log = l.log();
    for pem_file in ["rsa_private_key.pem", "signing_key.pem"] {
        let pem = std::fs::read_to_string(dir.join(pem_file)).unwrap();
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!log.contains(line), "a line of {pem_file} reached the log");
        }
    }

    for outcome in [
        "created",
        "replayed",
        "invalid_passphrase",
        "changed",
        "registered",
        "challenged",
        "attested",
        "nonce_used",
    ] {
        assert!(
            log.contains(&format!("outcome=\"{outcome}\"")),
            "the {outcome} request was logged:\n{log}"
        );
    }
    assert!(log.contains("DEBUG"), "debug level was on");
    for secret in &secrets {
        for form in encodings(secret) {
            assert!(!log.contains(&form), "a secret reached the log as {form:?}");
        }
    }
}

#[test]
fn no_secret_reaches_the_log_on_sqlite() {
    every_flow_at_debug("sqlite");
}

#[test]
fn no_secret_reaches_the_log_on_redis() {
    every_flow_at_debug("redis");
}
