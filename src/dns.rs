//! The DNS service: wire format, what we answer ourselves, the cache, the upstreams, the listeners (a batched UDP fast path; TCP, DoT and DoH on tokio).

pub mod budget;
pub mod cache;
pub mod catalog;
pub mod cookie;
pub mod doh;
pub mod engine;
pub mod forward;
pub mod query;
pub mod ratelimit;
pub mod server;
pub mod stream;
pub mod udp;
pub mod upstream;
pub mod wire;

pub use engine::{Engine, Handled, Transport};
