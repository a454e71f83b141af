//! Generated network passphrases: 15 alphanumeric characters — as many as the C client
//! `ijamreg` reads (`fgets` into 16 bytes) — the last two a check value over the first
//! thirteen (`schemas/ijam.md`, "Passphrases").
//!
//! The check value catches any single mistyped character: a typo never turns one
//! generated passphrase into another, and `registrar-node` says so before it sends one.
//! The listener cannot use it to refuse early: passphrases typed into the portal or
//! `passphrase add --passphrase` (8–16 letters and digits) carry none, and a typed one
//! may have the generated length.

use crate::core::random::{self, RandomError};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const BODY_LEN: usize = 13;
/// Generated passphrases are this long: the body and two check characters.
pub const GENERATED_LEN: usize = BODY_LEN + 2;

fn symbol_value(c: u8) -> u32 {
    ALPHABET
        .iter()
        .position(|&a| a == c)
        .map_or(u32::MAX, |v| v as u32)
}

/// Two base62 digits: Σ v and Σ (2i+1)·v, both mod 62. Every weight is odd and not 31,
/// so invertible mod 62: any single substituted character changes both digits, and
/// the distinct weights of the second catch most transpositions.
fn check_value(body: &[u8]) -> [u8; 2] {
    let (plain, weighted) = body
        .iter()
        .enumerate()
        .fold((0u32, 0u32), |(p, w), (i, &c)| {
            let v = symbol_value(c) % 62;
            ((p + v) % 62, (w + (2 * i as u32 + 1) * v) % 62)
        });
    [ALPHABET[plain as usize], ALPHABET[weighted as usize]]
}

/// Whether `passphrase` has the generated form: its length, and a check value that
/// matches. False for a generated passphrase with any one character mistyped.
pub fn looks_generated(passphrase: &str) -> bool {
    let bytes = passphrase.as_bytes();
    bytes.len() == GENERATED_LEN
        && bytes.iter().all(u8::is_ascii_alphanumeric)
        && check_value(&bytes[..BODY_LEN]) == bytes[BODY_LEN..]
}

/// 13 uniformly random base62 characters (rejection sampling over CSPRNG bytes,
/// ~77 bits) and their check value.
pub fn generate() -> Result<String, RandomError> {
    let mut body = Vec::with_capacity(GENERATED_LEN);
    while body.len() < BODY_LEN {
        for b in random::bytes::<32>()? {
            // 248 = 4 × 62: accepting only bytes below it keeps every symbol equally likely.
            if b < 248 && body.len() < BODY_LEN {
                body.push(ALPHABET[(b % 62) as usize]);
            }
        }
    }
    let check = check_value(&body);
    body.extend_from_slice(&check);
    Ok(String::from_utf8(body).expect("base62 is ASCII"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passphrases_are_fifteen_alphanumerics_that_pass_their_check() {
        for _ in 0..200 {
            let p = generate().unwrap();
            assert_eq!(p.len(), 15, "what ijamreg can read");
            assert!(p.bytes().all(|b| b.is_ascii_alphanumeric()));
            assert!(looks_generated(&p));
        }
    }

    #[test]
    fn every_single_character_substitution_of_a_generated_passphrase_fails_the_check() {
        let body = b"Registrar0flt";
        let good = [&body[..], &check_value(body)].concat();
        assert!(looks_generated(std::str::from_utf8(&good).unwrap()));
        for pos in 0..GENERATED_LEN {
            for &c in ALPHABET.iter().filter(|&&c| c != good[pos]) {
                let mut bad = good.clone();
                bad[pos] = c;
                assert!(
                    !looks_generated(std::str::from_utf8(&bad).unwrap()),
                    "{pos} {c}"
                );
            }
        }
    }

    #[test]
    fn other_lengths_do_not_look_generated() {
        assert!(!looks_generated("alpha1"));
        assert!(!looks_generated(&generate().unwrap()[..14]));
    }
}
