//! The bottom layer, which every other one may use and which uses none of them: ids,
//! the clock and randomness (passed into flows and stores as arguments, so they run
//! on a fixed clock under test), the cryptography and the data directory.

pub mod clock;
pub mod crypto;
pub mod datadir;
pub mod ids;
pub mod random;
