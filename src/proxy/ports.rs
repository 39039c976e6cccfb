//! Ports mode (`mode = "ports"`): per `[[proxies]]` block, a bootstrap listener that relays to
//! the cluster's bootstrap address, and one listener per upstream broker, on ports from
//! `broker_ports` allocated as brokers appear in responses ([`registry`]). Requests are forwarded
//! as they come (only their header is read); a FIFO per connection pairs each response with its
//! request, and only responses that carry broker addresses are decoded and rewritten (see
//! [`rewrite`], and [`hints`] for large ones).

mod error;
pub mod hints;
mod registry;
mod relay;
pub mod rewrite;
mod switch;
pub mod topic_ids;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kafka_protocol::protocol::StrBytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::frame;
use super::{ProxyError, bind_listener, proxy_protocol, stranger_at_accept};
use crate::config::ProxyConfig;
use crate::limits::ClientSlot;
use crate::net::{Active, next_client};
use crate::tls;
use error::ConnError;
use registry::{NodeEntry, keep_topic_ids, load_state, sweep};
use relay::relay;
use switch::Upstream;

/// The configuration in force, as the control plane publishes it.
pub type Following = tokio::sync::watch::Receiver<Arc<crate::config::Config>>;

/// A connection on either side: plaintext, or TLS over TCP.
type Stream = Either<TcpStream, tokio_rustls::TlsStream<TcpStream>>;

struct Shared {
    cfg: ProxyConfig,
    label: String,
    advertise: StrBytes,
    bind_ip: IpAddr,
    nodes: Mutex<BTreeMap<i32, NodeEntry>>,
    /// What `nodes` maps to which port, as responses are rewritten over it (registry.rs).
    port_map: arc_swap::ArcSwap<std::collections::HashMap<i32, u16>>,
    /// Held while ports are given out (on the blocking pool), one response's new nodes at a time.
    allocating: Mutex<()>,
    /// Held while the state file is written.
    saving: Mutex<()>,
    connections: Arc<Semaphore>,
    per_client: Arc<crate::limits::PerClient>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// TLS towards clients (`tls_cert`/`tls_key`).
    terminator: Option<tls::Terminator>,
    /// The cluster new connections go to (a reload may switch it: switch.rs).
    current: arc_swap::ArcSwap<Upstream>,
    /// When the brokers were last asked for by the proxy itself (`port_assignment = "node_id"`):
    /// one Metadata request at a time, at most one a second.
    learned: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// The topic id clients were shown last for each name, whichever cluster it came from.
    shown: Arc<topic_ids::Shown>,
    /// Lines about refused connections: clients inside `allow` could otherwise flood the log.
    log_budget: crate::limits::LogBudget,
}

/// What a listener leads to.
#[derive(Clone, Copy)]
enum Listener {
    Bootstrap,
    /// A port allocated to this node.
    Node(i32),
    /// A port of `broker_ports` bound ahead (`port_assignment = "node_id"`): its node is looked
    /// up per connection, and learned from the cluster when not yet known.
    Port(u16),
}

/// A `[[proxies]]` block, bound.
pub struct Proxy {
    shared: Arc<Shared>,
    bootstrap: TcpListener,
    /// Its block's index in `[[proxies]]`.
    index: usize,
}

impl Proxy {
    /// Binds the bootstrap listener, and the broker listeners the state file remembers (with
    /// `port_assignment = "node_id"`: every port of `broker_ports`).
    pub fn bind(
        index: usize,
        cfg: &ProxyConfig,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Proxy, ProxyError> {
        let (terminator, connector) = tls_sides(cfg).map_err(|source| ProxyError::Tls { index, source })?;
        let bootstrap =
            bind_listener(cfg.listen).map_err(|source| ProxyError::Bind { index, addr: cfg.listen, source })?;
        let state = cfg.state_file.as_ref().map(load_state).unwrap_or_default();
        let label = format!("proxies[{index}]");
        let shown = Arc::new(topic_ids::Shown::restored(state.topic_ids));
        // Under node_id every port of broker_ports is bound below: the file keeps topic ids only.
        let nodes = match cfg.port_assignment {
            crate::config::PortAssignment::FirstCome => state.nodes,
            crate::config::PortAssignment::NodeId => BTreeMap::new(),
        };
        let current = Upstream::new(&label, cfg.upstream.clone(), connector, &shutdown, shown.clone());
        let shared = Arc::new(Shared {
            label,
            advertise: StrBytes::from_string(cfg.advertise_host.clone()),
            bind_ip: cfg.broker_bind.unwrap_or(cfg.listen.ip()),
            cfg: cfg.clone(),
            nodes: Mutex::new(BTreeMap::new()),
            port_map: Default::default(),
            allocating: Mutex::new(()),
            saving: Mutex::new(()),
            connections: Arc::new(Semaphore::new(cfg.max_connections)),
            per_client: Arc::default(),
            tasks,
            shutdown,
            terminator,
            current: arc_swap::ArcSwap::from_pointee(current),
            learned: tokio::sync::Mutex::new(None),
            shown,
            log_budget: Default::default(),
        });
        if cfg.port_assignment == crate::config::PortAssignment::NodeId {
            for port in cfg.broker_ports.first..=cfg.broker_ports.last {
                let addr = SocketAddr::new(shared.bind_ip, port);
                let l = bind_listener(addr).map_err(|source| ProxyError::Bind { index, addr, source })?;
                shared.tasks.spawn(accept_loop(shared.clone(), l, Listener::Port(port), CancellationToken::new()));
            }
        }
        for (node, e) in nodes {
            if !shared.cfg.broker_ports.contains(e.port) {
                tracing::warn!(proxy = %shared.label, node, port = e.port, "state file port outside broker_ports: dropped");
                continue;
            }
            match shared.start_broker_listener(node, e.port, e.upstream.clone()) {
                Ok(()) => {
                    tracing::info!(proxy = %shared.label, node, port = e.port, upstream = %e.upstream, "broker port restored")
                }
                Err(err) => {
                    tracing::error!(proxy = %shared.label, node, port = e.port, error = %err, "cannot restore broker port")
                }
            }
        }
        Ok(Proxy { shared, bootstrap, index })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.bootstrap.local_addr().ok()
    }

    pub fn clients(&self) -> (String, Arc<crate::limits::PerClient>) {
        (self.shared.label.clone(), self.shared.per_client.clone())
    }

    /// Serves until shutdown, following its block in the configuration in force (`config`) for
    /// a cluster switch.
    pub async fn run(self, config: Following, health: Arc<crate::admin::Health>) {
        let shared = self.shared.clone();
        shared.tasks.spawn(sweep(shared.clone()));
        shared.tasks.spawn(switch::follow(shared.clone(), self.index, config, health));
        if shared.terminator.is_some() {
            shared.tasks.spawn(watch_certificate(shared.clone()));
        }
        if shared.cfg.state_file.is_some() {
            shared.tasks.spawn(keep_topic_ids(shared.clone()));
            if shared.shown.kept() {
                // Ids kept from before a restart: translated before clients ask.
                let s = shared.clone();
                shared.tasks.spawn(async move { s.learn_topic_ids().await });
            }
        }
        if shared.cfg.port_assignment == crate::config::PortAssignment::NodeId {
            // Every broker known before the first client asks, whichever instance it reached.
            let s = shared.clone();
            shared.tasks.spawn(async move { s.learn_brokers().await });
        }
        accept_loop(shared, self.bootstrap, Listener::Bootstrap, CancellationToken::new()).await;
    }
}

/// Picks up a renewed `tls_cert`/`tls_key` pair; one that does not load keeps the previous.
async fn watch_certificate(shared: Arc<Shared>) {
    let Some(t) = &shared.terminator else { return };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tls::WATCH_EVERY) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        match t.refresh() {
            Ok(false) => {}
            Ok(true) => tracing::info!(proxy = %shared.label, "TLS certificate reloaded"),
            Err(e) => {
                metrics::counter!("mskdns_proxy_tls_reload_errors_total", "proxy" => shared.label.clone()).increment(1);
                tracing::error!(proxy = %shared.label, "{}.{e}; the previous certificate stays in use", shared.label);
            }
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, which: Listener, stop: CancellationToken) {
    let kind = if matches!(which, Listener::Bootstrap) { "bootstrap" } else { "broker" };
    loop {
        let (sock, peer) = tokio::select! {
            c = next_client(&listener, "proxy") => c,
            _ = stop.cancelled() => return,
            _ = shared.shutdown.cancelled() => return,
        };
        let Some((slot, permit)) = admit(&shared, peer) else { continue };
        let upstream = match which {
            Listener::Node(n) => match shared.upstream_of(n) {
                Some(u) => Some(u),
                None => continue,
            },
            Listener::Port(_) => None,
            Listener::Bootstrap => Some(shared.current.load().bootstrap.clone()),
        };
        // One span per connection: every event of it carries these fields.
        let span = tracing::info_span!("connection", proxy = %shared.label, %peer, upstream = tracing::field::Empty, listener = kind);
        if let Some(u) = &upstream {
            span.record("upstream", tracing::field::display(u));
        }
        let task = serve_client(shared.clone(), sock, peer, which, upstream, (slot, permit));
        shared.tasks.spawn(tracing::Instrument::instrument(task, span));
    }
}

/// Whether a connection from `peer` is served: strangers are closed before anything is read from
/// them or any broker is asked; then the client's slot (behind a PROXY protocol sender, taken once
/// the header is read) and one of `max_connections`.
fn admit(shared: &Shared, peer: SocketAddr) -> Option<(Option<ClientSlot>, OwnedSemaphorePermit)> {
    let client = peer.ip().to_canonical();
    let rejected = |reason: &'static str| {
        metrics::counter!("mskdns_proxy_connections_rejected_total", "proxy" => shared.label.clone(), "reason" => reason)
            .increment(1)
    };
    let cfg = &shared.cfg;
    if stranger_at_accept(cfg.proxy_protocol, &cfg.allow, &cfg.proxy_protocol_from, client) {
        rejected("not_allowed");
        tracing::debug!(proxy = %shared.label, %peer, "client outside allow (or proxy_protocol_from): connection closed");
        return None;
    }
    let slot = match cfg.proxy_protocol {
        true => None,
        false => match shared.per_client.take(client, cfg.max_connections_per_client) {
            Some(s) => Some(s),
            None => {
                rejected("per_client");
                if let Some(skipped) = shared.log_budget.take() {
                    tracing::warn!(proxy = %shared.label, %peer, skipped, "max_connections_per_client reached: connection closed");
                }
                return None;
            }
        },
    };
    let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
        rejected("limit");
        if let Some(skipped) = shared.log_budget.take() {
            tracing::warn!(proxy = %shared.label, %peer, skipped, "max_connections reached: connection closed");
        }
        return None;
    };
    Some((slot, permit))
}

/// One admitted connection: its PROXY header (when expected), the broker it leads to (on a port
/// of no known broker, once the client has sent something), then the relay.
async fn serve_client(
    shared: Arc<Shared>,
    mut sock: TcpStream,
    peer: SocketAddr,
    which: Listener,
    upstream: Option<String>,
    (slot, permit): (Option<ClientSlot>, OwnedSemaphorePermit),
) {
    let kind = if matches!(which, Listener::Bootstrap) { "bootstrap" } else { "broker" };
    let slot = match slot {
        Some(s) => s,
        None => match behind_proxy_protocol(&shared, &mut sock, peer).await {
            Some(s) => s,
            None => return,
        },
    };
    let _held = (permit, slot);
    let upstream = match (upstream, which) {
        (Some(u), _) => u,
        (None, Listener::Port(p)) => match first_bytes_then(&shared, &sock, shared.upstream_at(p)).await {
            Some(u) => {
                tracing::Span::current().record("upstream", tracing::field::display(&u));
                u
            }
            None => {
                metrics::counter!("mskdns_proxy_connections_rejected_total", "proxy" => shared.label.clone(), "reason" => "unknown_broker")
                    .increment(1);
                if let Some(skipped) = shared.log_budget.take() {
                    tracing::warn!(
                        port = p,
                        skipped,
                        "no broker of the cluster has this port (node id modulo broker_ports): connection closed"
                    );
                }
                return;
            }
        },
        (None, _) => return,
    };
    metrics::counter!("mskdns_proxy_connections_total", "proxy" => shared.label.clone(), "listener" => kind)
        .increment(1);
    // Decremented however the connection ends (a panic included).
    let _active = Active::new(metrics::gauge!("mskdns_proxy_connections_active", "proxy" => shared.label.clone()));
    match connection(&shared, sock, which, upstream).await {
        Ok(()) => tracing::debug!("connection closed"),
        Err(e) => e.log(&shared.label),
    }
}

/// Runs `then` (which may ask the cluster for its brokers) once the client has sent its first
/// bytes, within `first_request_timeout_ms`: a silent client costs the cluster nothing.
async fn first_bytes_then<T>(
    shared: &Shared,
    sock: &tokio::net::TcpStream,
    then: impl std::future::Future<Output = Option<T>>,
) -> Option<T> {
    let wait = Duration::from_millis(shared.cfg.first_request_timeout_ms);
    match tokio::time::timeout(wait, sock.peek(&mut [0u8; 1])).await {
        Ok(Ok(n)) if n > 0 => then.await,
        _ => {
            tracing::debug!("nothing sent on a port of no known broker: closed");
            None
        }
    }
}

/// Reads the PROXY protocol header (within `first_request_timeout_ms`) and checks the client
/// it names against `allow`, `allow_endpoints` and `max_connections_per_client`.
async fn behind_proxy_protocol(
    shared: &Shared,
    sock: &mut TcpStream,
    peer: SocketAddr,
) -> Option<crate::limits::ClientSlot> {
    let rejected = |reason: &'static str| {
        metrics::counter!("mskdns_proxy_connections_rejected_total", "proxy" => shared.label.clone(), "reason" => reason)
            .increment(1)
    };
    let limit = Duration::from_millis(shared.cfg.first_request_timeout_ms);
    let origin = match tokio::time::timeout(limit, proxy_protocol::read(sock)).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            rejected("proxy_protocol");
            if let Some(skipped) = shared.log_budget.take() {
                tracing::info!(skipped, "{e}: connection closed");
            }
            return None;
        }
        Err(_) => {
            rejected("proxy_protocol");
            if let Some(skipped) = shared.log_budget.take() {
                tracing::info!(?limit, skipped, "no PROXY protocol header in time: connection closed");
            }
            return None;
        }
    };
    let client = origin.client.unwrap_or(peer);
    if !origin.allowed(peer, &shared.cfg.allow, &shared.cfg.allow_endpoints) {
        rejected("not_allowed");
        if let Some(skipped) = shared.log_budget.take() {
            tracing::info!(%client, endpoint = origin.endpoint.as_deref().unwrap_or("-"), skipped, "client or endpoint not allowed: connection closed");
        }
        return None;
    }
    let slot = shared.per_client.take(client.ip().to_canonical(), shared.cfg.max_connections_per_client);
    if slot.is_none() {
        rejected("per_client");
        if let Some(skipped) = shared.log_budget.take() {
            tracing::warn!(%client, skipped, "max_connections_per_client reached: connection closed");
        }
    }
    slot
}

/// Connects to `upstream`, a broker of cluster `to`, with TLS when its `upstream_tls` is set
/// (SNI: the host in `upstream`).
async fn connect(shared: &Shared, to: &Upstream, upstream: &str) -> Result<Stream, ConnError> {
    let tcp = connect_tcp(shared, upstream).await?;
    let _ = tcp.set_nodelay(true);
    let Some(connector) = &to.connector else { return Ok(Either::Left(tcp)) };
    let name = tls::server_name(upstream).map_err(|e| ConnError::UpstreamTls(upstream.to_owned(), e))?;
    let limit = Duration::from_millis(shared.cfg.handshake_timeout_ms);
    // A plaintext broker answers a ClientHello by closing (it reads a huge frame size), with
    // bytes that are not TLS, or not at all: say what that means.
    const NOT_TLS: &str = "the broker does not seem to speak TLS: upstream_tls = true (the default) is for TLS \
                           listeners (MSK 9094, 9096, 9098); set upstream_tls = false for a plaintext one (9092)";
    let handshake = connector.connect(name, tcp);
    tokio::pin!(handshake);
    // A TLS broker answers a ClientHello at once; a plaintext one reads it as the start of a
    // frame of some 370 MB and waits for the rest. Say so early, then wait out the timeout.
    let early = (limit / 3).min(Duration::from_secs(2));
    let done = tokio::select! {
        r = &mut handshake => Some(r),
        _ = tokio::time::sleep(early) => None,
    };
    let done = match done {
        Some(r) => Ok(r),
        None => {
            tracing::warn!("no TLS answer after {early:?}, still waiting: {NOT_TLS}");
            tokio::time::timeout(limit - early, handshake).await
        }
    };
    match done {
        Ok(Ok(s)) => Ok(Either::Right(s.into())),
        Ok(Err(e)) => {
            let plaintext = e.kind() == std::io::ErrorKind::UnexpectedEof
                || e.get_ref().and_then(|i| i.downcast_ref::<tokio_rustls::rustls::Error>()).is_some_and(|r| {
                    matches!(
                        r,
                        tokio_rustls::rustls::Error::InvalidMessage(_)
                            | tokio_rustls::rustls::Error::InappropriateMessage { .. }
                    )
                });
            let why = if plaintext { format!("{e}: {NOT_TLS}") } else { e.to_string() };
            Err(ConnError::UpstreamTls(upstream.to_owned(), why))
        }
        Err(_) => Err(ConnError::UpstreamTls(upstream.to_owned(), format!("no answer after {limit:?}: {NOT_TLS}"))),
    }
}

/// Completes the client's TLS handshake on a TLS listener.
async fn accept(shared: &Shared, sock: TcpStream) -> Result<Stream, ConnError> {
    let _ = sock.set_nodelay(true);
    let Some(t) = &shared.terminator else { return Ok(Either::Left(sock)) };
    let limit = Duration::from_millis(shared.cfg.handshake_timeout_ms);
    let handshake = async {
        // A TLS connection opens with a handshake record (0x16); a Kafka request with the high
        // byte of its size, which is 0 for any frame under 16 MiB.
        let mut first = [0u8; 1];
        if sock.peek(&mut first).await.map_err(|e| ConnError::ClientTls(e.to_string()))? == 0 {
            return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if first[0] != 0x16 {
            return Err(ConnError::PlaintextOnTls);
        }
        t.acceptor().accept(sock).await.map_err(|e| ConnError::ClientTls(e.to_string()))
    };
    match tokio::time::timeout(limit, handshake).await {
        Ok(Ok(s)) => Ok(Either::Right(s.into())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ConnError::ClientTls(format!("not done after {limit:?}"))),
    }
}

async fn connect_tcp(shared: &Shared, upstream: &str) -> Result<TcpStream, ConnError> {
    let limit = Duration::from_millis(shared.cfg.connect_timeout_ms);
    let attempt = async {
        let mut last = String::from("no address");
        for addr in tokio::net::lookup_host(upstream).await.map_err(|e| e.to_string())? {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(ConnError::Connect(upstream.to_owned(), e)),
        Err(_) => Err(ConnError::Connect(upstream.to_owned(), format!("timed out after {limit:?}"))),
    }
}

/// Reads the start of the client's first request (its whole frame, or the first
/// [`frame::REQUEST_PREFIX`] bytes of a larger one) within `first_request_timeout_ms`.
async fn first_request<R: AsyncRead + Unpin>(shared: &Shared, client: &mut R) -> Result<Vec<u8>, ConnError> {
    let limit = Duration::from_millis(shared.cfg.first_request_timeout_ms);
    let read = async {
        // Read as it arrives (not just the 4 size bytes) so that a refused frame leaves nothing
        // unread: the close is then a FIN, not a reset. What follows the first frame is kept.
        let mut buf = Vec::with_capacity(4096);
        loop {
            if buf.len() >= 4 {
                let size = [buf[0], buf[1], buf[2], buf[3]];
                let n = frame::frame_size(size, shared.cfg.max_frame_bytes).map_err(ConnError::ClientFrame)?;
                if buf.len() >= 4 + n.min(frame::REQUEST_PREFIX) {
                    return Ok(buf);
                }
            }
            buf.reserve(4096);
            if client.read_buf(&mut buf).await? == 0 {
                return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    };
    tokio::time::timeout(limit, read).await.unwrap_or(Err(ConnError::FirstRequest(limit)))
}

/// Relays one client connection to `upstream` until either side closes. The broker connection
/// is opened only once the client has completed its TLS handshake and sent its first request;
/// if the proxy switched clusters meanwhile, it goes where the listener now leads.
async fn connection(
    shared: &Arc<Shared>,
    client: TcpStream,
    which: Listener,
    upstream: String,
) -> Result<(), ConnError> {
    let accepted = shared.current.load_full();
    let mut client = accept(shared, client).await?;
    let first = std::io::Cursor::new(first_request(shared, &mut client).await?);
    let to = shared.current.load_full();
    let upstream = if Arc::ptr_eq(&accepted, &to) { upstream } else { shared.leads_to(which, &to) };
    let server = connect(shared, &to, &upstream).await?;
    let _counted = to.enter();
    match (client, server) {
        // Plaintext both ways: the halves of a TcpStream need no lock between them.
        (Either::Left(c), Either::Left(s)) => {
            let (cr, cw) = c.into_split();
            let (sr, sw) = s.into_split();
            relay(shared, &to, first.chain(cr), cw, sr, sw).await
        }
        (c, s) => {
            let (cr, cw) = tokio::io::split(c);
            let (sr, sw) = tokio::io::split(s);
            relay(shared, &to, first.chain(cr), cw, sr, sw).await
        }
    }
}

/// A block's TLS towards clients and towards brokers, from its files.
pub(super) fn tls_sides(cfg: &ProxyConfig) -> Result<(Option<tls::Terminator>, Option<TlsConnector>), tls::TlsError> {
    let terminator = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(tls::Terminator::load(cert, key)?),
        _ => None,
    };
    let client_cert = cfg.upstream_tls_cert.as_deref().zip(cfg.upstream_tls_key.as_deref());
    let connector =
        if cfg.upstream_tls { Some(tls::connector(cfg.upstream_ca_file.as_deref(), client_cert)?) } else { None };
    Ok((terminator, connector))
}
