pub mod envelope_client;
pub mod ijam_client;
pub mod listener;
pub mod redis_server;
