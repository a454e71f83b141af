//! Sans-I/O wire formats: zerocopy views and checked messages. No sockets, no store,
//! no clock; every decoder takes a byte slice and returns a typed error.

pub mod core;
pub mod envelope;
pub mod ijam;
#[cfg(test)]
mod properties;
pub mod pubkey;

/// Why bytes failed to decode. Small, `Copy`, never allocates, carries the offending value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("expected {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
    #[error("{field}: {value} is not one of the one-hot codes")]
    NotOneHot { field: &'static str, value: u32 },
    #[error("{field}: byte {offset} is not allowed")]
    BadByte { field: &'static str, offset: usize },
    #[error("{field}: empty")]
    Empty { field: &'static str },
    #[error("padding byte {0} is not a valid CBC padding length")]
    Padding(u8),
    #[error("checksum {got:#04x} does not match {expected:#04x}")]
    Checksum { expected: u8, got: u8 },
    #[error("magic {got:02x?} is not \"RG\"")]
    Magic { got: [u8; 2] },
    #[error("version {got} is not supported")]
    Version { got: u8 },
    #[error("declared payload length {len} exceeds the maximum {max}")]
    TooLong { len: u32, max: u32 },
    #[error("CRC-32C {got:#010x} does not match {expected:#010x}")]
    Crc { expected: u32, got: u32 },
    #[error("{field}: invalid")]
    Invalid { field: &'static str },
    #[error("{field}: {value} is not known")]
    Unknown { field: &'static str, value: u32 },
}
