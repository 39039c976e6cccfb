//! The Kafka-aware proxy, one file per mode: `ports` (a bootstrap listener and one listener per
//! broker, metadata rewritten so that every broker a client sees is a port of ours) and `sni`
//! (TLS routed by the ClientHello's server name, not terminated). What both modes share is here:
//! binding, the check at accept, and the list of bound blocks. A new mode is a file beside them
//! and a variant of [`Bound`].

pub mod frame;
pub mod ports;
pub mod proxy_protocol;
pub mod sni;
mod splice;

pub use ports::{Proxy, hints, rewrite, topic_ids};

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ProxyBlock;
use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxies[{index}].listen {addr}: {source}")]
    Bind { index: usize, addr: SocketAddr, source: std::io::Error },
    #[error("proxies[{index}].{source}")]
    Tls { index: usize, source: tls::TlsError },
}

pub(crate) fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    crate::net::bind_tcp(addr, || std::net::TcpListener::bind(addr))
}

/// The end of a proxy's shutdown grace: `grace` after `shutdown`. Open connections last until
/// then at most.
pub(crate) async fn end_of_grace(shutdown: &CancellationToken, grace: std::time::Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(grace).await;
}

impl crate::config::ProxyBlock {
    /// How long open connections may last after SIGTERM.
    pub fn shutdown_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(match self {
            crate::config::ProxyBlock::Ports(p) => p.shutdown_grace_secs,
            crate::config::ProxyBlock::Sni(s) => s.shutdown_grace_secs,
        })
    }
}

/// Whether a connection from `peer` is closed at accept, before anything is read from it (both
/// modes). Without a PROXY protocol header the peer is the client and must be in `allow`. Behind
/// one the peer is the load balancer and must be one that may send a header: in
/// `proxy_protocol_from`, or that list is empty (the listener is then reachable from the load
/// balancer only, by its network). The client it names is checked once the header is read.
pub(crate) fn stranger_at_accept(
    proxy_protocol: bool,
    allow: &[ipnet::IpNet],
    from: &[ipnet::IpNet],
    peer: std::net::IpAddr,
) -> bool {
    match proxy_protocol {
        false => !allow.iter().any(|n| n.contains(&peer)),
        true => !(from.is_empty() || from.iter().any(|n| n.contains(&peer))),
    }
}

/// Loads every block's TLS files as binding would (for `mskdns check`).
pub fn check_tls(blocks: &[ProxyBlock]) -> Result<(), ProxyError> {
    for (index, cfg) in blocks.iter().enumerate() {
        if let Some(cfg) = cfg.ports() {
            ports::tls_sides(cfg).map_err(|source| ProxyError::Tls { index, source })?;
        }
    }
    Ok(())
}

/// A bound `[[proxies]]` block of either mode.
pub enum Bound {
    Ports(Proxy),
    Sni(sni::SniProxy),
}

impl Bound {
    /// The addresses clients connect to: the bootstrap listener, or every SNI listener.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        match self {
            Bound::Ports(p) => p.local_addr().into_iter().collect(),
            Bound::Sni(s) => s.local_addrs(),
        }
    }

    /// Its label and the connections each client holds now.
    pub fn clients(&self) -> (String, Arc<crate::limits::PerClient>) {
        match self {
            Bound::Ports(p) => p.clients(),
            Bound::Sni(s) => s.clients(),
        }
    }

    /// Serves until shutdown; a ports-mode block follows `config` for a cluster switch.
    pub async fn run(self, config: ports::Following, health: Arc<crate::admin::Health>) {
        match self {
            Bound::Ports(p) => p.run(config, health).await,
            Bound::Sni(s) => s.run().await,
        }
    }
}

/// The metrics with `mskdns_proxy_client_connections{proxy, client}` appended: each client
/// holding proxy connections now, rendered at scrape time from the per-client tables, so a client
/// gone leaves no series behind (at most `max_connections` series per block).
pub fn with_client_connections(render: crate::admin::Render, proxies: &[Bound]) -> crate::admin::Render {
    if proxies.is_empty() {
        return render;
    }
    let tables: Vec<_> = proxies.iter().map(Bound::clients).collect();
    Arc::new(move || {
        let mut text = render();
        render_clients(&mut text, &tables);
        text
    })
}

fn render_clients(text: &mut String, tables: &[(String, Arc<crate::limits::PerClient>)]) {
    use std::fmt::Write;
    let mut header = false;
    for (label, table) in tables {
        for (ip, n) in table.counts() {
            if !header {
                text.push_str("# TYPE mskdns_proxy_client_connections gauge\n");
                header = true;
            }
            let _ = writeln!(text, "mskdns_proxy_client_connections{{proxy=\"{label}\",client=\"{ip}\"}} {n}");
        }
    }
}

/// Binds every `[[proxies]]` block; SNI routing reads the served clusters from `engine`.
pub fn bind_all(
    blocks: &[ProxyBlock],
    engine: &Arc<crate::dns::engine::Engine>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Vec<Bound>, ProxyError> {
    blocks
        .iter()
        .enumerate()
        .map(|(i, b)| match b {
            ProxyBlock::Ports(c) => Proxy::bind(i, c, tasks.clone(), shutdown.clone()).map(Bound::Ports),
            ProxyBlock::Sni(c) => {
                sni::SniProxy::bind(i, c, engine.clone(), tasks.clone(), shutdown.clone()).map(Bound::Sni)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::stranger_at_accept;

    #[test]
    fn strangers_at_accept_are_clients_outside_allow_or_balancers_outside_proxy_protocol_from() {
        let allow = ["10.0.0.0/8".parse().unwrap()];
        let balancers = ["192.168.0.0/16".parse().unwrap()];
        let (client, balancer) = ("10.1.2.3".parse().unwrap(), "192.168.1.1".parse().unwrap());
        // No PROXY header: the peer is the client, checked against `allow`.
        assert!(!stranger_at_accept(false, &allow, &balancers, client));
        assert!(stranger_at_accept(false, &allow, &balancers, balancer));
        // Behind one: the peer is the balancer, checked against `proxy_protocol_from`.
        assert!(!stranger_at_accept(true, &allow, &balancers, balancer));
        assert!(stranger_at_accept(true, &allow, &balancers, client));
        // An empty `proxy_protocol_from` lets any peer send a header (its client is checked then).
        assert!(!stranger_at_accept(true, &allow, &[], client));
        assert!(!stranger_at_accept(true, &[], &[], balancer));
    }
}
