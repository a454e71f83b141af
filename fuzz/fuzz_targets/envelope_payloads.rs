//! Every envelope payload decoder (core Hello reply, pubkey requests and replies),
//! selected by the first byte. Never panics; whatever parses re-encodes to the same
//! bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registrar::wire::core::HelloReply;
use registrar::wire::envelope::Kind;
use registrar::wire::pubkey::{self, Request};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else { return };
    match selector % 4 {
        0 => {
            if let Ok(request) = Request::parse(Kind(selector / 4 % 4), payload) {
                let bytes = match &request {
                    Request::Register(r) => r.to_bytes(),
                    Request::Challenge(r) => r.to_bytes().to_vec(),
                    Request::Attest(r) => r.to_bytes(),
                };
                assert_eq!(bytes, payload);
            }
        }
        1 => {
            if let Ok(hello) = HelloReply::parse(payload) {
                assert_eq!(hello.to_bytes(), payload);
            }
        }
        2 => {
            let _ = pubkey::parse_challenge_reply(payload);
        }
        _ => {
            if let Ok(ms) = pubkey::parse_attest_reply(payload) {
                assert_eq!(pubkey::attest_reply(ms).as_slice(), payload);
            }
        }
    }
});
