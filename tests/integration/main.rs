//! One integration binary (as hickory and rustls): every suite is a module.

mod admin;
mod ijam;
mod store;
mod support;
