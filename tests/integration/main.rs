//! One integration binary (as hickory and rustls): every suite is a module.

mod admin;
mod admission;
mod envelope;
mod faults;
mod ijam;
mod operator;
mod portal;
mod repository;
mod schemas;
mod secrets;
mod soak;
mod store;
mod support;
