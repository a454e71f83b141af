//! `schemas/` is the contract independent clients are written from: check the Rust
//! layouts against it byte for byte.

use std::mem::{offset_of, size_of, size_of_val};

use registrar::wire::ijam::{
    self, NodeArch, NodeType, RawRegisterReply, RawRegisterRequest, RawStateRequest, StateCode,
};
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
