//! What every DNS stream transport (TCP, DoT, DoH) is bounded by: the limits a connection is
//! served with. The listeners themselves are in [`super::server`] and [`super::doh`].

use std::time::Duration;

/// TCP limits: connections at once (in all and per client address), how long a connection may
/// go without completing a query, and how long writing one answer may take.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    pub max_connections: usize,
    pub max_per_client: usize,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    /// TCP_NODELAY on TCP and DoT connections (DoH always has it).
    pub nodelay: bool,
}
