//! Registrar: a device-registration listener.
//!
//! Layers, top to bottom (see `ARCHITECTURE.md` and `docs/design.md`):
//! `server` (tokio sockets, admission) → `codec` (tokio-util framing) → `wire`
//! (sans-I/O frames) → `flow` (business rules) → `crypto` and `store` (core).
//! Nothing calls upward.

pub mod client;
pub mod codec;
pub mod core;
pub mod flow;
pub mod server;
pub mod store;
pub mod wire;
