//! Identifiers and keys that several layers hold: the wire parses them, flows and
//! stores keep them. Defined here, below all of them.

use std::fmt;

/// Why a string or bytes are no id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("an all-zero id is not an id")]
    Zero,
    #[error("expected {expected} hex digits, got {got} characters")]
    Hex { expected: usize, got: usize },
}

/// A pubkey device id: 16 bytes, not all zero. Shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub [u8; DeviceId::LEN]);

impl DeviceId {
    pub const LEN: usize = 16;

    pub fn new(bytes: [u8; Self::LEN]) -> Result<DeviceId, IdError> {
        if bytes == [0; Self::LEN] {
            return Err(IdError::Zero);
        }
        Ok(DeviceId(bytes))
    }

    /// Parses 32 hex digits (either case).
    pub fn from_hex(s: &str) -> Result<DeviceId, IdError> {
        let s = s.trim();
        let mut bytes = [0u8; Self::LEN];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| IdError::Hex {
            expected: 2 * Self::LEN,
            got: s.len(),
        })?;
        DeviceId::new(bytes)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.to_hex())
    }
}

impl std::str::FromStr for DeviceId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        DeviceId::from_hex(s)
    }
}

/// An ijam node's AES-256 key, chosen by the node. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeKey(pub [u8; 32]);

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_16_bytes_not_all_zero_in_hex() {
        assert_eq!(
            DeviceId::from_hex("00000000000000000000000000000000"),
            Err(IdError::Zero)
        );
        let id = DeviceId::from_hex("11111111111111111111111111111111").unwrap();
        assert_eq!(id, DeviceId([0x11; 16]));
        assert_eq!(id.to_string(), "11111111111111111111111111111111");
        assert_eq!(
            DeviceId::from_hex("1111"),
            Err(IdError::Hex {
                expected: 32,
                got: 4
            })
        );
        assert_eq!(format!("{:?}", NodeKey([7; 32])), "NodeKey(..)");
    }
}
