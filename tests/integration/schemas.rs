//! `schemas/` is the contract independent clients are written from: check the Rust
//! layouts against it byte for byte.

use std::mem::{offset_of, size_of, size_of_val};

use registrar::client::pubkey::{self as pubkey_client, DeviceKey};
use registrar::flow::EnvelopeFlow;
use registrar::flow::pubkey::{Done, NONCE_VALIDITY_MS, PubkeyError, PubkeyFlow};
use registrar::store::sqlite::SqliteStore;
use registrar::wire::core::{HELLO, HelloReply};
use registrar::wire::envelope::{self, Flow, RawHeader, Status};
use registrar::wire::ijam::{
    self, NodeArch, NodeType, RawRegisterReply, RawRegisterRequest, RawStateRequest, StateCode,
};
use registrar::wire::pubkey::{self as pk, DeviceId, Nonce, RawNonce};

use serde_json::Value;
use uuid::Uuid;
use zerocopy::FromZeros;

fn schema(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// (field, offset, size) of a zerocopy struct, in declaration order.
macro_rules! layout {
    ($t:ty: $($f:ident),*) => {{
        let zero = <$t>::new_zeroed();
        (size_of::<$t>(), vec![$((stringify!($f), offset_of!($t, $f), size_of_val(&zero.$f))),*])
    }};
}

fn fields(frame: &Value) -> Vec<(String, usize, usize)> {
    frame["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_owned(),
                f["offset"].as_u64().unwrap() as usize,
                f["size"].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

#[test]
fn ijam_structs_match_the_schema() {
    let s = schema("ijam.json");
    let frames = &s["frames"];
    let structs = [
        (
            "register_plaintext",
            layout!(RawRegisterRequest: node_id, network_id, passphrase, node_key, node_type, node_arch),
        ),
        (
            "register_reply",
            layout!(RawRegisterReply: status, iv, body),
        ),
        ("state_request", layout!(RawStateRequest: node_id, iv, body)),
    ];
    for (frame, (size, rust)) in structs {
        let f = &frames[frame];
        assert_eq!(f["size"].as_u64().unwrap() as usize, size, "{frame} size");
        let schema_fields = fields(f);
        let rust_fields: Vec<(String, usize, usize)> = rust
            .into_iter()
            .map(|(n, o, s)| (n.to_owned(), o, s))
            .collect();
        assert_eq!(schema_fields, rust_fields, "{frame} fields");
        // Fields tile the frame with no gap.
        let end = schema_fields.last().map(|(_, o, s)| o + s).unwrap();
        assert_eq!(end, size, "{frame} is covered");
    }
}

#[test]
fn ijam_plaintext_layouts_and_codes_match_the_schema() {
    let s = schema("ijam.json");
    let frames = &s["frames"];
    assert_eq!(
        frames["cert_request"]["fields"][0]["value"],
        format!("{:#010x}", ijam::CERT_MAGIC)
    );
    assert_eq!(frames["state_reply"]["size"], ijam::STATE_REPLY_LEN);

    let reply = ijam::register_reply_plaintext(Uuid::from_bytes([0x11; 16]));
    let f = fields(&frames["register_reply_plaintext"]);
    assert_eq!(
        f,
        [
            ("node_id".into(), 0, 16),
            ("checksum".into(), 16, 1),
            ("padding".into(), 17, 15)
        ]
    );
    assert_eq!(reply[16], 0, "xor of sixteen equal bytes");
    assert!(reply[17..].iter().all(|&b| b == 0x0f));

    let f = fields(&frames["state_plaintext"]);
    assert_eq!(
        f,
        [
            ("status".into(), 0, 4),
            ("checksum".into(), 4, 1),
            ("padding".into(), 5, 11)
        ]
    );
    for code in StateCode::ALL {
        let name = &frames["state_plaintext"]["fields"][0]["values"][(code as u32).to_string()];
        assert_eq!(name, &format!("{code:?}").to_lowercase());
        let block = code.plaintext();
        assert_eq!(
            u32::from_le_bytes(block[..4].try_into().unwrap()),
            code as u32
        );
        assert!(block[5..].iter().all(|&b| b == 0x0b));
    }
    let plain = &frames["register_plaintext"]["fields"];
    for t in NodeType::ALL {
        assert_eq!(plain[4]["values"][(t as u32).to_string()], t.as_str());
    }
    assert_eq!(
        plain[4]["values"].as_object().unwrap().len(),
        NodeType::ALL.len()
    );
    for a in NodeArch::ALL {
        assert_eq!(plain[5]["values"][(a as u32).to_string()], a.as_str());
    }
    assert_eq!(
        plain[5]["values"].as_object().unwrap().len(),
        NodeArch::ALL.len()
    );
}

// ---- the envelope and the pubkey flow ---------------------------------------------------

fn hex_field(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

/// Reads a big-endian u16 at `offset`.
fn be16(bytes: &[u8], offset: usize) -> usize {
    u16::from_be_bytes([bytes[offset], bytes[offset + 1]]) as usize
}

#[test]
fn envelope_header_matches_the_schema() {
    let s = schema("envelope.json");
    let header = &s["frames"]["header"];
    let (size, rust) =
        layout!(RawHeader: magic, version, flow, kind, flags, status, request_id, length);
    assert_eq!(header["size"].as_u64().unwrap() as usize, size);
    let rust: Vec<(String, usize, usize)> = rust
        .into_iter()
        .map(|(n, o, s)| (n.to_owned(), o, s))
        .collect();
    assert_eq!(fields(header), rust);

    let c = &s["constants"];
    assert_eq!(c["magic"].as_str().unwrap().as_bytes(), envelope::MAGIC);
    assert_eq!(c["version"], envelope::VERSION);
    assert_eq!(c["header_len"], envelope::HEADER_LEN);
    assert_eq!(c["trailer_len"], envelope::TRAILER_LEN);
    assert_eq!(c["default_max_payload"], envelope::DEFAULT_MAX_PAYLOAD);
    assert_eq!(
        s["crc"]["check"],
        format!("{:#010x}", envelope::crc32c(b"123456789"))
    );

    // Flow names and status codes are the Rust constants.
    let flows = header["fields"][2]["values"].as_object().unwrap();
    for (code, name) in flows {
        assert_eq!(
            Flow(code.parse().unwrap()).name(),
            name.as_str(),
            "flow {code}"
        );
    }
    assert_eq!(Flow(5).name(), None);
    let statuses: Vec<u16> = header["fields"][5]["values"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.parse().unwrap())
        .collect();
    let mut rust_statuses = vec![
        Status::REQUEST,
        Status::OK,
        Status::CREATED,
        Status::BAD_REQUEST,
        Status::UNAUTHORIZED,
        Status::FORBIDDEN,
        Status::NOT_FOUND,
        Status::CONFLICT,
        Status::GONE,
        Status::PAYLOAD_TOO_LARGE,
        Status::TOO_MANY_REQUESTS,
        Status::SERVICE_UNAVAILABLE,
    ]
    .into_iter()
    .map(|s| s.0)
    .collect::<Vec<_>>();
    let mut statuses = statuses;
    statuses.sort();
    rust_statuses.sort();
    assert_eq!(statuses, rust_statuses);

    // The examples parse, and re-encode byte for byte.
    for example in s["examples"].as_array().unwrap() {
        let bytes = hex_field(&example["hex"]);
        let (h, payload) = envelope::parse_datagram(&bytes, envelope::DEFAULT_MAX_PAYLOAD)
            .unwrap_or_else(|e| panic!("{}: {e}", example["name"]));
        assert_eq!(envelope::to_vec(&h, payload), bytes);
    }
    assert_eq!(
        hex_field(&s["examples"][0]["hex"]),
        pubkey_client::hello_frame(1)
    );
}

#[test]
fn hello_reply_matches_the_schema() {
    let s = schema("envelope.json");
    let f = &s["frames"]["hello_reply"];
    assert_eq!(f["kind"], HELLO.reply().0);
    assert_eq!(s["frames"]["hello_request"]["kind"], HELLO.0);
    let names: Vec<&str> = f["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["server_version", "flows", "max_payload", "signing_key"]
    );
    let key = DeviceKey::generate().unwrap();
    let reply = HelloReply {
        server_version: "9.8.7".into(),
        flows: vec![Flow::CORE, Flow::PUBKEY],
        max_payload: 16384,
        signing_key: key.public_key_der().to_vec(),
    };
    let b = reply.to_bytes();
    // u16 len ‖ version ‖ u16 len ‖ flows ‖ u32 ‖ u16 len ‖ key, in that order.
    assert_eq!((be16(&b, 0), &b[2..7]), (5, &b"9.8.7"[..]));
    assert_eq!((be16(&b, 7), &b[9..11]), (2, &[0u8, 1][..]));
    assert_eq!(&b[11..15], &16384u32.to_be_bytes());
    assert_eq!((be16(&b, 15), &b[17..]), (91, key.public_key_der()));
}

#[test]
fn keys_reply_matches_the_schema() {
    let s = schema("envelope.json");
    let f = &s["frames"]["keys_reply"];
    assert_eq!(f["kind"], registrar::wire::core::KEYS.reply().0);
    assert_eq!(
        s["frames"]["keys_request"]["kind"],
        registrar::wire::core::KEYS.0
    );
    let names: Vec<&str> = f["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["signing_key", "kem_id", "hpke_public_key", "signature"]
    );
    assert_eq!(
        f["fields"][1]["value"],
        format!("{:#06x}", registrar::core::crypto::seal::KEM_ID)
    );
    let reply = registrar::wire::core::KeysReply {
        signing_key: vec![1; 91],
        kem_id: 0x0020,
        hpke_public_key: vec![2; 32],
        signature: vec![3; 71],
    };
    let b = reply.to_bytes();
    assert_eq!((be16(&b, 0), be16(&b, 93), be16(&b, 95)), (91, 0x0020, 32));
    assert_eq!(be16(&b, 129), 71);
    assert_eq!(b.len(), 131 + 71);
}

#[test]
fn pubkey_messages_match_the_schema() {
    let s = schema("pubkey.json");
    let m = &s["messages"];
    let c = &s["constants"];
    assert_eq!(s["flow"], Flow::PUBKEY.0);
    assert_eq!(
        c["register_domain"].as_str().unwrap().as_bytes(),
        pk::REGISTER_DOMAIN
    );
    assert_eq!(
        c["attest_domain"].as_str().unwrap().as_bytes(),
        pk::ATTEST_DOMAIN
    );
    assert_eq!(hex_field(&c["p256_spki_prefix"]), pk::P256_SPKI_PREFIX);
    assert_eq!(c["p256_spki_len"], pk::P256_SPKI_LEN);
    assert_eq!(c["max_signature_len"], pk::MAX_SIGNATURE_LEN);
    assert_eq!(c["nonce_validity_ms"], NONCE_VALIDITY_MS);
    for (name, kind) in [
        ("register_request", pk::REGISTER),
        ("challenge_request", pk::CHALLENGE),
        ("attest_request", pk::ATTEST),
        ("register_reply", pk::REGISTER.reply()),
        ("challenge_reply", pk::CHALLENGE.reply()),
        ("attest_reply", pk::ATTEST.reply()),
    ] {
        assert_eq!(m[name]["kind"], kind.0, "{name}");
    }

    // The nonce is a zerocopy struct: checked like the ijam structs.
    let (size, rust) = layout!(RawNonce: issued_ms, random, tag);
    let rust: Vec<(String, usize, usize)> = rust
        .into_iter()
        .map(|(n, o, s)| (n.to_owned(), o, s))
        .collect();
    assert_eq!(fields(&m["nonce"]), rust);
    assert_eq!(m["nonce"]["size"].as_u64().unwrap() as usize, size);
    let id = DeviceId::new([0x11; 16]).unwrap();
    let input = Nonce::mac_input(&id, 0x0102, &[9; 8]);
    assert_eq!(
        fields(&m["nonce_mac_input"])
            .iter()
            .map(|f| (f.1, f.2))
            .collect::<Vec<_>>(),
        [(0, 16), (16, 8), (24, 8)]
    );
    assert_eq!(
        (&input[..16], &input[16..24], &input[24..]),
        (&id.0[..], &0x0102u64.to_be_bytes()[..], &[9u8; 8][..])
    );

    // Variable-length messages: check the fixed offsets on real requests.
    let key = DeviceKey::generate().unwrap();
    let reg = pubkey_client::register_request(id, &key).unwrap();
    let bytes = reg.to_bytes();
    let offsets = |name: &str| -> Vec<(String, usize)> {
        m[name]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["name"].as_str().unwrap().to_owned(),
                    f["offset"].as_u64().unwrap() as usize,
                )
            })
            .collect()
    };
    let o = offsets("register_request");
    assert_eq!(&bytes[o[0].1..o[0].1 + 16], &id.0);
    assert_eq!(be16(&bytes, o[1].1), pk::P256_SPKI_LEN);
    assert_eq!(&bytes[o[2].1..o[2].1 + 91], key.public_key_der());
    let sig_len = be16(&bytes, o[3].1);
    assert_eq!(&bytes[o[4].1..], &reg.signature.0[..]);
    assert_eq!(bytes.len(), 111 + sig_len);

    let signed = pk::RegisterRequest::signed_message(&id, &reg.spki);
    let o = offsets("register_signed");
    assert_eq!(
        signed.len(),
        m["register_signed"]["size"].as_u64().unwrap() as usize
    );
    assert_eq!(&signed[o[1].1..o[1].1 + 16], &id.0);
    assert_eq!(&signed[o[2].1..], key.public_key_der());

    let nonce = Nonce([0x44; 32]);
    let frame = pubkey_client::attest_frame(1, id, nonce, &key).unwrap();
    let payload = &frame[envelope::HEADER_LEN..frame.len() - envelope::TRAILER_LEN];
    let o = offsets("attest_request");
    assert_eq!(&payload[o[0].1..o[0].1 + 16], &id.0);
    assert_eq!(&payload[o[1].1..o[1].1 + 32], &nonce.0);
    assert_eq!(payload.len(), 50 + be16(payload, o[2].1));
    let signed = pk::AttestRequest::signed_message(&id, &nonce);
    let o = offsets("attest_signed");
    assert_eq!(
        signed.len(),
        m["attest_signed"]["size"].as_u64().unwrap() as usize
    );
    assert_eq!(&signed[o[1].1..o[1].1 + 32], &nonce.0);
    assert_eq!(&signed[o[2].1..], &id.0);
    assert_eq!(m["attest_reply"]["size"], pk::ATTEST_REPLY_LEN);
    assert_eq!(m["challenge_reply"]["size"], pk::NONCE_LEN);
    assert_eq!(m["challenge_request"]["size"], pk::DEVICE_ID_LEN);

    // Every status the flow can answer is documented, and nothing else is.
    let mut documented: Vec<u16> = ["register_reply", "challenge_reply", "attest_reply"]
        .iter()
        .flat_map(|k| m[*k]["statuses"].as_object().unwrap().keys())
        .map(|k| k.parse().unwrap())
        .collect();
    documented.sort();
    documented.dedup();
    let errors = [
        PubkeyError::InvalidKey,
        PubkeyError::RegisterSignature,
        PubkeyError::BoundToAnotherKey,
        PubkeyError::Revoked,
        PubkeyError::UnknownDevice,
        PubkeyError::ForeignNonce,
        PubkeyError::NonceExpired,
        PubkeyError::NonceUsed,
        PubkeyError::AttestSignature,
        PubkeyError::Store(registrar::store::StoreError::Corrupt("x".into())),
    ];
    // What the server answers for every flow: a malformed payload, a source over its
    // budget, a full crypto queue.
    let server = [
        Status::BAD_REQUEST,
        Status::TOO_MANY_REQUESTS,
        Status::SERVICE_UNAVAILABLE,
    ];
    let mut produced: Vec<u16> = errors
        .iter()
        .map(|e| PubkeyFlow::<SqliteStore>::classify(e).status.0)
        .chain(server.iter().map(|s| s.0))
        .chain(
            [
                Done::Registered,
                Done::AlreadyRegistered,
                Done::Attested { at_ms: 0 },
            ]
            .iter()
            .map(|d| d.status().0),
        )
        .collect();
    produced.sort();
    produced.dedup();
    assert_eq!(documented, produced);
}
