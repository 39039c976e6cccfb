//! The DNS service: wire format, what we answer ourselves, the cache, the upstreams, the listeners.

pub mod cache;
pub mod catalog;
pub mod engine;
pub mod server;
pub mod upstream;
pub mod wire;

pub use engine::{Engine, Handled, Transport};
