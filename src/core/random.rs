//! Randomness from the system CSPRNG (aws-lc-rs). Drawn at the edges and handed to
//! flows and stores, which never draw their own.

use aws_lc_rs::rand;
use uuid::Uuid;

/// The system random generator failed (a broken kernel, not a peer's doing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the system random generator failed")]
pub struct RandomError;

/// N bytes from the system CSPRNG.
pub fn bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut out = [0u8; N];
    rand::fill(&mut out).map_err(|_| RandomError)?;
    Ok(out)
}

/// A UUIDv4 from the system CSPRNG.
pub fn uuid() -> Result<Uuid, RandomError> {
    Ok(uuid::Builder::from_random_bytes(bytes()?).into_uuid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_version_4_and_fresh() {
        let id = uuid().unwrap();
        assert_eq!(id.get_version_num(), 4);
        assert_ne!(id, uuid().unwrap());
        assert_ne!(bytes::<16>().unwrap(), bytes::<16>().unwrap());
    }
}
