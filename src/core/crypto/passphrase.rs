//! Generated network passphrases: 16 alphanumeric characters, the last two a check
//! value over the first fourteen (`schemas/ijam.md`, "Passphrases").
//!
//! The listener verifies the check value of every 16-character passphrase before
//! any store lookup, so a mistyped or guessed full-length passphrase costs no store
//! round trip. Typed passphrases of 1–15 characters (as the upstream portal allowed)
//! carry no check value; a typed 16-character one must pass the check, which
//! `passphrase add` enforces.

use crate::core::random::{self, RandomError};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const BODY_LEN: usize = 14;
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

/// False only for a 16-character passphrase whose check value is wrong.
pub fn check_value_ok(passphrase: &str) -> bool {
    let bytes = passphrase.as_bytes();
    bytes.len() != GENERATED_LEN || check_value(&bytes[..BODY_LEN]) == bytes[BODY_LEN..]
}

/// 14 uniformly random base62 characters (rejection sampling over CSPRNG bytes,
/// ~83 bits) and their check value.
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
    fn generated_passphrases_are_sixteen_alphanumerics_that_pass_their_check() {
        for _ in 0..200 {
            let p = generate().unwrap();
            let s = p.as_str();
            assert_eq!(s.len(), 16);
            assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()));
            assert!(check_value_ok(s));
        }
    }

    #[test]
    fn every_single_character_substitution_of_a_fixed_passphrase_fails_the_check() {
        let body = b"Registrar0fleet";
        let good = [&body[..14], &check_value(&body[..14])].concat();
        assert!(check_value_ok(std::str::from_utf8(&good).unwrap()));
        for pos in 0..16 {
            for &c in ALPHABET.iter().filter(|&&c| c != good[pos]) {
                let mut bad = good.clone();
                bad[pos] = c;
                assert!(
                    !check_value_ok(std::str::from_utf8(&bad).unwrap()),
                    "{pos} {c}"
                );
            }
        }
    }

    #[test]
    fn short_typed_passphrases_carry_no_check() {
        assert!(check_value_ok("alpha1"));
        assert!(check_value_ok("abcdefghijklmno"));
    }
}
