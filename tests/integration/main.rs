//! One integration binary (as hickory and rustls): every suite is a module.

mod admin;
mod admission;
mod ijam;
mod schemas;
mod store;
mod support;
