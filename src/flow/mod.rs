//! One module per flow: validate → one atomic store call → reply. No sockets here.

pub mod core;
pub mod ijam;
pub mod pubkey;
