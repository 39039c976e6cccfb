//! SNI routing (`mode = "sni"`): TLS from clients is never terminated. The ClientHello's server
//! name must be an MSK name of a cluster served here; the connection is then spliced, bytes
//! untouched, to that broker through the cluster's top-level target, on the port it arrived on.
//! Certificates verify end to end and IAM signs the real host; an instance holds no state.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::rustls::server::Acceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::proxy_protocol::{self, HeaderError};
use super::splice::splice;
use super::{ProxyError, bind_listener};
use crate::config::SniConfig;
use crate::dns::catalog::{Route, Via};
use crate::dns::engine::Engine;
use crate::net::{Active, next_client};

/// A TLS alert record, fatal, `unrecognized_name` (RFC 6066 section 3).
const UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

struct Shared {
    cfg: SniConfig,
    label: String,
    engine: Arc<Engine>,
    connections: Arc<Semaphore>,
    per_client: Arc<crate::limits::PerClient>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    connect_latency: metrics::Histogram,
    /// The addresses this block listens on (a destination among them would loop).
    own: Vec<SocketAddr>,
    /// Clusters whose refused destination was logged already (logged once each).
    refused_logged: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Lines about refused connections: allowed clients could otherwise flood the log.
    log_budget: crate::limits::LogBudget,
}

/// A `mode = "sni"` block, bound.
pub struct SniProxy {
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
}

/// How a connection ended, as counted in `mskdns_proxy_sni_connections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Routed,
    UnknownName,
    NoSni,
    NotTls,
    NotAllowed,
    ConnectFailed,
    NoTarget,
    Timeout,
    TooLarge,
    Limit,
    /// The cluster's target is an address the proxy will not connect to (itself, loopback …).
    RefusedTarget,
}

impl Outcome {
    fn kind(self) -> &'static str {
        match self {
            Outcome::Routed => "routed",
            Outcome::UnknownName => "unknown_name",
            Outcome::NoSni => "no_sni",
            Outcome::NotTls => "not_tls",
            Outcome::NotAllowed => "not_allowed",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::NoTarget => "no_target",
            Outcome::Timeout => "timeout",
            Outcome::TooLarge => "too_large",
            Outcome::Limit => "limit",
            Outcome::RefusedTarget => "refused_target",
        }
    }
}

impl SniProxy {
    pub fn bind(
        index: usize,
        cfg: &SniConfig,
        engine: Arc<Engine>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<SniProxy, ProxyError> {
        let listeners = cfg
            .listen
            .addrs()
            .iter()
            .map(|&addr| bind_listener(addr).map_err(|source| ProxyError::Bind { index, addr, source }))
            .collect::<Result<Vec<_>, _>>()?;
        let label = format!("proxies[{index}]");
        let own = own_addresses(&listeners);
        let shared = Arc::new(Shared {
            own,
            refused_logged: Default::default(),
            log_budget: Default::default(),
            connect_latency: metrics::histogram!("mskdns_proxy_sni_connect_seconds", "proxy" => label.clone()),
            label,
            cfg: cfg.clone(),
            engine,
            connections: Arc::new(Semaphore::new(cfg.max_connections)),
            per_client: Arc::default(),
            tasks,
            shutdown,
        });
        Ok(SniProxy { shared, listeners })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    pub fn clients(&self) -> (String, Arc<crate::limits::PerClient>) {
        (self.shared.label.clone(), self.shared.per_client.clone())
    }

    /// Serves until shutdown.
    pub async fn run(self) {
        for l in self.listeners {
            self.shared.tasks.spawn(accept_loop(self.shared.clone(), l));
        }
    }
}

fn count(shared: &Shared, cluster: &str, outcome: Outcome) {
    metrics::counter!("mskdns_proxy_sni_connections_total", "proxy" => shared.label.clone(),
        "cluster" => cluster.to_owned(), "outcome" => outcome.kind())
    .increment(1);
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    loop {
        let (sock, peer) = tokio::select! {
            c = next_client(&listener, "sni proxy") => c,
            _ = shared.shutdown.cancelled() => return,
        };
        // Strangers are closed before anything is read from them.
        let (cfg, client) = (&shared.cfg, peer.ip().to_canonical());
        if super::stranger_at_accept(cfg.proxy_protocol, &cfg.allow, &cfg.proxy_protocol_from, client) {
            count(&shared, "-", Outcome::NotAllowed);
            tracing::debug!(proxy = %shared.label, %peer, "client outside allow (or proxy_protocol_from): connection closed");
            continue;
        }
        // The client's slot is taken now, before anything is read; behind a PROXY header, once
        // the header names the client.
        let slot = match cfg.proxy_protocol {
            true => None,
            false => match shared.per_client.take(client, cfg.max_connections_per_client) {
                Some(slot) => Some(slot),
                None => {
                    count(&shared, "-", Outcome::Limit);
                    if let Some(skipped) = shared.log_budget.take() {
                        tracing::warn!(proxy = %shared.label, %peer, skipped, "max_connections_per_client reached: closed");
                    }
                    continue;
                }
            },
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            count(&shared, "-", Outcome::Limit);
            if let Some(skipped) = shared.log_budget.take() {
                tracing::warn!(proxy = %shared.label, %peer, skipped, "max_connections reached: connection closed");
            }
            continue;
        };
        let shared2 = shared.clone();
        let span = tracing::info_span!("sni", proxy = %shared.label, %peer, port);
        let task = async move {
            let _permit = permit;
            let _active =
                Active::new(metrics::gauge!("mskdns_proxy_connections_active", "proxy" => shared2.label.clone()));
            connection(&shared2, sock, peer, port, slot).await;
        };
        shared.tasks.spawn(tracing::Instrument::instrument(task, span));
    }
}

#[derive(Debug, thiserror::Error)]
enum HelloError {
    #[error("not TLS")]
    NotTls,
    #[error("ClientHello: {0}")]
    Invalid(String),
    #[error("ClientHello larger than client_hello_max_bytes")]
    TooLarge,
    #[error("closed before the ClientHello was complete")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads until `buf` holds a whole ClientHello (records and handshake fragments joined by
/// rustls) and returns its server name; `buf` keeps every byte read, to be sent on as it came.
async fn read_client_hello<S: AsyncRead + Unpin>(
    sock: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Option<String>, HelloError> {
    let mut acceptor = Acceptor::default();
    let mut fed = 0;
    loop {
        if buf.first().is_some_and(|&b| b != 0x16) {
            return Err(HelloError::NotTls);
        }
        while fed < buf.len() {
            match acceptor.read_tls(&mut &buf[fed..]) {
                Ok(0) => break,
                Ok(n) => fed += n,
                Err(e) => return Err(HelloError::Invalid(e.to_string())),
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok(accepted.client_hello().server_name().map(str::to_owned)),
            Ok(None) => {}
            Err((e, _)) => return Err(HelloError::Invalid(e.to_string())),
        }
        if buf.len() >= max {
            return Err(HelloError::TooLarge);
        }
        buf.reserve((max - buf.len()).min(4096));
        let room = (max - buf.len()).min(buf.capacity() - buf.len());
        let mut limited = (&mut *sock).take(room as u64);
        if limited.read_buf(buf).await? == 0 {
            return Err(HelloError::Closed);
        }
    }
}

/// The front of a connection as the proxy reads it, from any byte stream, without the `allow`
/// checks: the PROXY header when `proxy_protocol`, then the ClientHello's server name, and the
/// bytes to be sent on (the fuzz target's entry; `Err` is the reason the connection would close).
pub async fn parse_front<S: AsyncRead + Unpin>(
    sock: &mut S,
    proxy_protocol: bool,
    max: usize,
) -> Result<(Option<proxy_protocol::Origin>, Option<String>, Vec<u8>), String> {
    let origin = match proxy_protocol {
        true => Some(proxy_protocol::read(sock).await.map_err(|e| e.to_string())?),
        false => None,
    };
    let mut buf = Vec::with_capacity(2048);
    let name = read_client_hello(sock, &mut buf, max).await.map_err(|e| e.to_string())?;
    Ok((origin, name, buf))
}

/// What the front of the connection said: who the client is and which name it wants.
struct Front {
    client: SocketAddr,
    endpoint: Option<String>,
    name: Option<String>,
    /// The ClientHello as it came, to be sent on.
    buf: Vec<u8>,
}

enum FrontError {
    Header(HeaderError),
    Hello(HelloError),
    NotAllowed(SocketAddr, Option<String>),
    Limit(SocketAddr),
}

/// Reads the PROXY header (when `proxy_protocol`) and the ClientHello. Behind a PROXY header
/// the client's slot is taken into `slot` as soon as the header names the client.
async fn read_front(
    shared: &Shared,
    sock: &mut TcpStream,
    peer: SocketAddr,
    slot: &mut Option<crate::limits::ClientSlot>,
) -> Result<Front, FrontError> {
    let mut buf = Vec::with_capacity(2048);
    let (mut client, mut endpoint) = (peer, None);
    if shared.cfg.proxy_protocol {
        let origin = proxy_protocol::read(sock).await.map_err(FrontError::Header)?;
        if !origin.allowed(peer, &shared.cfg.allow, &shared.cfg.allow_endpoints) {
            return Err(FrontError::NotAllowed(origin.client.unwrap_or(peer), origin.endpoint));
        }
        client = origin.client.unwrap_or(peer);
        endpoint = origin.endpoint;
        let max = shared.cfg.max_connections_per_client;
        *slot = Some(shared.per_client.take(client.ip().to_canonical(), max).ok_or(FrontError::Limit(client))?);
    }
    let name = read_client_hello(sock, &mut buf, shared.cfg.client_hello_max_bytes).await.map_err(FrontError::Hello)?;
    Ok(Front { client, endpoint, name, buf })
}

/// Counts a connection closed for what its front said (or left unsaid), and logs it within the
/// block's log budget.
fn refused_front(shared: &Shared, e: FrontError) {
    let budget = &shared.log_budget;
    match e {
        FrontError::NotAllowed(client, endpoint) => {
            count(shared, "-", Outcome::NotAllowed);
            if let Some(skipped) = budget.take() {
                tracing::info!(%client, endpoint = endpoint.as_deref().unwrap_or("-"), skipped, "client or endpoint not allowed: closed");
            }
        }
        FrontError::Limit(client) => {
            count(shared, "-", Outcome::Limit);
            if let Some(skipped) = budget.take() {
                tracing::warn!(%client, skipped, "max_connections_per_client reached: closed");
            }
        }
        FrontError::Header(e) => {
            count(shared, "-", Outcome::NotTls);
            if let Some(skipped) = budget.take() {
                tracing::info!(skipped, "{e}: closed");
            }
        }
        FrontError::Hello(e) => {
            let outcome = if matches!(e, HelloError::TooLarge) { Outcome::TooLarge } else { Outcome::NotTls };
            count(shared, "-", outcome);
            if let Some(skipped) = budget.take() {
                tracing::info!(skipped, "{e}: closed");
            }
        }
    }
}

async fn connection(
    shared: &Shared,
    mut sock: TcpStream,
    peer: SocketAddr,
    port: u16,
    mut slot: Option<crate::limits::ClientSlot>,
) {
    let timeout = Duration::from_millis(shared.cfg.client_hello_timeout_ms);
    let budget = &shared.log_budget;
    let front = match tokio::time::timeout(timeout, read_front(shared, &mut sock, peer, &mut slot)).await {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return refused_front(shared, e),
        Err(_) => {
            count(shared, "-", Outcome::Timeout);
            tracing::debug!(?timeout, "no ClientHello within client_hello_timeout_ms: closed");
            return;
        }
    };
    let Some(name) = front.name.as_deref() else {
        count(shared, "-", Outcome::NoSni);
        if let Some(skipped) = budget.take() {
            tracing::info!(client = %front.client, skipped, "ClientHello without a server name: closed");
        }
        return;
    };
    let route =
        crate::names::name_to_wire(name).and_then(|lc| Some((shared.engine.snapshot().catalog.route(&lc)?, lc)));
    let Some((route, lc)) = route else {
        // Never connected anywhere: not an open relay.
        count(shared, "-", Outcome::UnknownName);
        if let Some(skipped) = budget.take() {
            tracing::info!(client = %front.client, server_name = %name, skipped, "not a broker of a cluster served here: unrecognized_name");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), sock.write_all(&UNRECOGNIZED_NAME)).await;
        return;
    };
    let Some(addrs) = destinations(shared, &route, &lc, name, port).await else { return };
    let started = Instant::now();
    let Some(mut upstream) = connect_any(shared, &addrs, port, name).await else {
        count(shared, &route.cluster, Outcome::ConnectFailed);
        return;
    };
    shared.connect_latency.record(started.elapsed().as_secs_f64());
    count(shared, &route.cluster, Outcome::Routed);
    tracing::debug!(client = %front.client, endpoint = front.endpoint.as_deref().unwrap_or("-"), cluster = %route.cluster,
        server_name = %name, "routed");
    let _ = sock.set_nodelay(true);
    if let Err(e) = upstream.write_all(&front.buf).await {
        tracing::debug!(error = %e, "broker closed before the ClientHello was sent on");
        return;
    }
    drop(front);
    let idle = Duration::from_secs(shared.cfg.idle_timeout_secs);
    let grace = Duration::from_secs(shared.cfg.shutdown_grace_secs);
    let (up, down) = splice(sock, upstream, idle, &shared.shutdown, grace).await;
    metrics::counter!("mskdns_proxy_sni_bytes_total", "proxy" => shared.label.clone(), "direction" => "to_broker")
        .increment(up);
    metrics::counter!("mskdns_proxy_sni_bytes_total", "proxy" => shared.label.clone(), "direction" => "to_client")
        .increment(down);
}

/// The addresses the proxy may connect to for a routed name: the cluster's own, or its resolver's
/// answer, less those it must not reach (see [`destination_allowed`]). `None` (counted and
/// logged) when none is left.
async fn destinations(shared: &Shared, route: &Route, lc: &[u8], name: &str, port: u16) -> Option<Vec<IpAddr>> {
    let addrs = match &route.via {
        Via::Addrs(a) => a.clone(),
        Via::Forward(f) => match f.lookup(lc).await {
            Ok(a) => a,
            Err(e) => {
                count(shared, &route.cluster, Outcome::ConnectFailed);
                tracing::warn!(cluster = %route.cluster, server_name = %name, error = %e, "the cluster's resolver gave no address");
                return None;
            }
        },
        Via::Unavailable | Via::Proxy => {
            count(shared, &route.cluster, Outcome::NoTarget);
            tracing::warn!(cluster = %route.cluster, server_name = %name,
                "the cluster's top-level target has no address to connect to (a proxy target, or VPC endpoint addresses not read yet)");
            return None;
        }
    };
    let (addrs, refused): (Vec<IpAddr>, Vec<IpAddr>) =
        addrs.into_iter().partition(|&ip| destination_allowed(ip, port, route.discovered, &shared.own));
    if addrs.is_empty() {
        count(shared, &route.cluster, Outcome::RefusedTarget);
        let first = shared.refused_logged.lock().unwrap_or_else(|e| e.into_inner()).insert(route.cluster.clone());
        if first {
            tracing::warn!(cluster = %route.cluster, server_name = %name, ?refused, discovered = route.discovered,
                "the cluster's target is the proxy itself, an unspecified address, or (discovered) loopback or link-local: not connected (logged once per cluster)");
        }
        return None;
    }
    Some(addrs)
}

/// Whether the SNI proxy may connect to `ip`:`port`. Never to an unspecified, multicast or
/// broadcast address, nor to one of its own listeners (a loop); for a discovered cluster, whose
/// target is written by that cluster's own account, not to loopback or link-local either (the
/// proxy's host and the instance metadata service). A cluster in the file may name loopback:
/// its operator runs the proxy.
fn destination_allowed(ip: IpAddr, port: u16, discovered: bool, own: &[SocketAddr]) -> bool {
    let ip = ip.to_canonical();
    let special = match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
    };
    let local = match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local(),
    };
    let ours = own.iter().any(|l| l.port() == port && l.ip().to_canonical() == ip);
    !(special || ours || (discovered && local))
}

/// Every address a connection to the listeners arrives at: a listener on an unspecified address
/// is reached at each of the host's interface addresses (read once, at bind).
fn own_addresses(listeners: &[TcpListener]) -> Vec<SocketAddr> {
    let bound: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let host = if bound.iter().any(|a| a.ip().is_unspecified()) { interface_addresses() } else { Vec::new() };
    let mut own = Vec::new();
    for a in bound {
        if a.ip().is_unspecified() {
            let same_family = host.iter().filter(|ip| ip.is_ipv4() == a.is_ipv4() || a.is_ipv6());
            own.extend(same_family.map(|&ip| SocketAddr::new(ip, a.port())));
        }
        own.push(a);
    }
    own
}

/// The host's interface addresses (getifaddrs(3)); empty if they cannot be read.
fn interface_addresses() -> Vec<IpAddr> {
    let mut found = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we only read and then free once.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return found;
        }
        let mut cur = head;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        found.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        found.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    found
}

/// The first of `addrs` that accepts on `port`, each within `connect_timeout_ms`.
async fn connect_any(shared: &Shared, addrs: &[IpAddr], port: u16, name: &str) -> Option<TcpStream> {
    let timeout = Duration::from_millis(shared.cfg.connect_timeout_ms);
    for &ip in addrs {
        let addr = SocketAddr::new(ip, port);
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Some(s);
            }
            Ok(Err(e)) => tracing::warn!(%addr, server_name = %name, error = %e, "connecting to the broker"),
            Err(_) => tracing::warn!(%addr, server_name = %name, ?timeout, "connecting to the broker timed out"),
        }
    }
    if addrs.is_empty() {
        tracing::warn!(server_name = %name, "no address for the broker");
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{destination_allowed, interface_addresses};
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn splice_moves_every_byte_both_ways_and_passes_half_closes_on() {
        let (mut client, client_side) = pair().await;
        let (broker_side, mut broker) = pair().await;
        let shutdown = CancellationToken::new();
        let relay = tokio::spawn(async move {
            super::splice(client_side, broker_side, Duration::from_secs(10), &shutdown, Duration::ZERO).await
        });
        // 3 MiB up with a pattern, half-closed; the broker answers 1 MiB after reading it all.
        let up: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        let sent = up.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        broker.read_to_end(&mut got).await.unwrap();
        assert!(got == up, "the broker got {} bytes, not the {} sent", got.len(), up.len());
        let down: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 241) as u8).collect();
        broker.write_all(&down).await.unwrap();
        broker.shutdown().await.unwrap();
        let back = writer.await.unwrap();
        assert!(back == down, "the client got {} bytes back", back.len());
        assert_eq!(relay.await.unwrap(), (up.len() as u64, down.len() as u64));
    }

    #[test]
    fn destinations_that_loop_or_reach_the_host_are_refused() {
        let own: Vec<SocketAddr> = vec!["10.0.0.5:9098".parse().unwrap(), "127.0.0.1:9098".parse().unwrap()];
        let ok = |ip: &str, port, discovered| destination_allowed(ip.parse().unwrap(), port, discovered, &own);
        // A broker elsewhere, on the same port as the listeners.
        assert!(ok("10.0.0.6", 9098, true));
        // The proxy's own listening addresses, for any cluster.
        assert!(!ok("10.0.0.5", 9098, false));
        assert!(!ok("127.0.0.1", 9098, false));
        assert!(ok("10.0.0.5", 9099, false), "another port of the same host is not a listener");
        // Unspecified, multicast and broadcast, for any cluster.
        for ip in ["0.0.0.0", "::", "224.0.0.1", "255.255.255.255", "ff02::1"] {
            assert!(!ok(ip, 9094, false), "{ip}");
        }
        // Loopback and link-local: refused for a discovered cluster, allowed from the file.
        for ip in ["127.0.0.10", "169.254.169.254", "::1", "fe80::1", "::ffff:127.0.0.10"] {
            assert!(!ok(ip, 9094, true), "{ip}");
            assert!(ok(ip, 9094, false), "{ip}");
        }
    }

    #[test]
    fn interface_addresses_include_loopback() {
        assert!(interface_addresses().iter().any(|ip| ip.is_loopback()));
    }

    #[tokio::test]
    async fn splice_ends_when_a_side_resets() {
        let (client, client_side) = pair().await;
        let (broker_side, broker) = pair().await;
        let shutdown = CancellationToken::new();
        let relay = tokio::spawn(async move {
            super::splice(client_side, broker_side, Duration::from_secs(10), &shutdown, Duration::ZERO).await
        });
        // A reset from the broker (linger 0): the relay ends, and the client sees the end.
        socket2::SockRef::from(&broker).set_linger(Some(Duration::ZERO)).unwrap();
        drop(broker);
        let mut client = client;
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await.expect("the relay ended");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        tokio::time::timeout(Duration::from_secs(5), relay).await.expect("the relay ended").unwrap();
    }
}
