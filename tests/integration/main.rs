//! One integration binary (as hickory and rustls): every suite is a module.

mod admin;
mod ijam;
mod schemas;
mod store;
mod support;
