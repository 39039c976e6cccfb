//! The Kafka-aware proxy: per `[[proxies]]` block, a bootstrap listener that relays to the
//! cluster's bootstrap address, and one listener per upstream broker, on ports from
//! `broker_ports` allocated as brokers appear in responses. Requests are forwarded as they come
//! (only their header is read); a FIFO per connection pairs each response with its request, and
//! only responses that carry broker addresses are decoded and rewritten (see [`rewrite`]).

pub mod frame;
pub mod rewrite;
pub mod tls;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::protocol::StrBytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ProxyConfig;
use frame::{FrameError, RequestHeader};

/// Requests in flight per connection before the proxy stops reading from the client.
const MAX_INFLIGHT: usize = 1024;
/// Read-ahead and write buffer per direction of a connection.
const BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxies[{index}].listen {addr}: {source}")]
    Bind { index: usize, addr: SocketAddr, source: std::io::Error },
    #[error("proxies[{index}].{source}")]
    Tls { index: usize, source: tls::TlsError },
}

/// A connection on either side: plaintext, or TLS over TCP.
type Stream = Either<TcpStream, tokio_rustls::TlsStream<TcpStream>>;

/// One node's port and where it leads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct NodeEntry {
    port: u16,
    upstream: String,
    #[serde(skip, default = "Instant::now")]
    seen: Instant,
    #[serde(skip)]
    stop: Option<CancellationToken>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    nodes: BTreeMap<i32, NodeEntry>,
}

struct Shared {
    cfg: ProxyConfig,
    label: String,
    advertise: StrBytes,
    bind_ip: IpAddr,
    nodes: Mutex<BTreeMap<i32, NodeEntry>>,
    connections: Arc<Semaphore>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// TLS towards clients (`tls_cert`/`tls_key`).
    terminator: Option<tls::Terminator>,
    /// TLS towards brokers (`upstream_tls`).
    connector: Option<TlsConnector>,
}

/// A `[[proxies]]` block, bound.
pub struct Proxy {
    shared: Arc<Shared>,
    bootstrap: TcpListener,
}

impl Proxy {
    /// Binds the bootstrap listener, and the broker listeners the state file remembers.
    pub fn bind(
        index: usize,
        cfg: &ProxyConfig,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Proxy, ProxyError> {
        let (terminator, connector) = tls_sides(cfg).map_err(|source| ProxyError::Tls { index, source })?;
        let bootstrap =
            bind_listener(cfg.listen).map_err(|source| ProxyError::Bind { index, addr: cfg.listen, source })?;
        let nodes = cfg.state_file.as_ref().map(load_state).unwrap_or_default();
        let shared = Arc::new(Shared {
            label: format!("proxies[{index}]"),
            advertise: StrBytes::from_string(cfg.advertise_host.clone()),
            bind_ip: cfg.broker_bind.unwrap_or(cfg.listen.ip()),
            cfg: cfg.clone(),
            nodes: Mutex::new(BTreeMap::new()),
            connections: Arc::new(Semaphore::new(cfg.max_connections)),
            tasks,
            shutdown,
            terminator,
            connector,
        });
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
        Ok(Proxy { shared, bootstrap })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.bootstrap.local_addr().ok()
    }

    /// Serves until shutdown.
    pub async fn run(self) {
        let shared = self.shared.clone();
        shared.tasks.spawn(sweep(shared.clone()));
        if shared.terminator.is_some() {
            shared.tasks.spawn(watch_certificate(shared.clone()));
        }
        let upstream = shared.cfg.upstream.clone();
        accept_loop(shared, self.bootstrap, None, upstream, CancellationToken::new()).await;
    }
}

fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

fn load_state(path: &PathBuf) -> BTreeMap<i32, NodeEntry> {
    match std::fs::read(path) {
        Ok(text) => match serde_json::from_slice::<StateFile>(&text) {
            Ok(s) if s.version == 1 => s.nodes,
            Ok(s) => {
                tracing::error!(file = %path.display(), version = s.version, "proxy state file of another version: ignored");
                BTreeMap::new()
            }
            Err(e) => {
                metrics::counter!("mskdns_proxy_state_errors_total").increment(1);
                tracing::error!(file = %path.display(), error = %e, "proxy state file unreadable: ignored");
                BTreeMap::new()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            metrics::counter!("mskdns_proxy_state_errors_total").increment(1);
            tracing::error!(file = %path.display(), error = %e, "proxy state file unreadable: ignored");
            BTreeMap::new()
        }
    }
}

impl Shared {
    /// Binds `port` for `node` and records it. Must not be called with `nodes` locked.
    fn start_broker_listener(self: &Arc<Self>, node: i32, port: u16, upstream: String) -> std::io::Result<()> {
        let listener = bind_listener(SocketAddr::new(self.bind_ip, port))?;
        let stop = CancellationToken::new();
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).insert(
            node,
            NodeEntry { port, upstream: upstream.clone(), seen: Instant::now(), stop: Some(stop.clone()) },
        );
        self.tasks.spawn(accept_loop(self.clone(), listener, Some(node), upstream, stop));
        self.ports_gauge();
        Ok(())
    }

    fn ports_gauge(&self) {
        let n = self.nodes.lock().unwrap_or_else(|e| e.into_inner()).len();
        metrics::gauge!("mskdns_proxy_broker_ports", "proxy" => self.label.clone()).set(n as f64);
    }

    fn save_state(&self) {
        let Some(path) = &self.cfg.state_file else { return };
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let text = match serde_json::to_vec_pretty(&StateFile { version: 1, nodes }) {
            Ok(t) => t,
            Err(e) => return tracing::error!(error = %e, "cannot encode the proxy state"),
        };
        let tmp = path.with_extension("tmp");
        let result = std::fs::write(&tmp, text)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            metrics::counter!("mskdns_proxy_state_errors_total").increment(1);
            tracing::error!(file = %path.display(), error = %e, "cannot write the proxy state file");
        }
    }

    /// The upstream address of `node` now (it may have moved since the listener was bound).
    fn upstream_of(&self, node: i32) -> Option<String> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).get(&node).map(|e| e.upstream.clone())
    }
}

impl rewrite::Ports for Arc<Shared> {
    fn port_for(&self, node: i32, host: &str, port: i32) -> Option<u16> {
        let upstream = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let used: Vec<u16> = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = nodes.get_mut(&node) {
                e.seen = Instant::now();
                let port = e.port;
                if e.upstream != upstream {
                    tracing::info!(proxy = %self.label, node, from = %e.upstream, to = %upstream, "broker moved");
                    e.upstream = upstream;
                    drop(nodes);
                    self.save_state();
                }
                return Some(port);
            }
            nodes.values().map(|e| e.port).collect()
        };
        let range = self.cfg.broker_ports;
        for p in range.first..=range.last {
            if used.contains(&p) {
                continue;
            }
            match self.start_broker_listener(node, p, upstream.clone()) {
                Ok(()) => {
                    metrics::counter!("mskdns_proxy_port_allocations_total", "proxy" => self.label.clone())
                        .increment(1);
                    tracing::info!(proxy = %self.label, node, port = p, upstream = %upstream, "broker port allocated");
                    self.save_state();
                    return Some(p);
                }
                // Taken by another process: try the next one.
                Err(e) => tracing::debug!(port = p, error = %e, "broker port not bindable"),
            }
        }
        metrics::counter!("mskdns_proxy_port_exhausted_total", "proxy" => self.label.clone()).increment(1);
        tracing::error!(
            proxy = %self.label, node, upstream = %upstream, broker_ports = ?range,
            "no free port in broker_ports for a new broker: it is left out of responses (widen broker_ports)"
        );
        None
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

/// Frees the ports of brokers not seen in any response for `broker_grace_secs`.
async fn sweep(shared: Arc<Shared>) {
    let grace = Duration::from_secs(shared.cfg.broker_grace_secs);
    let every = (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let gone: Vec<(i32, NodeEntry)> = {
            let mut nodes = shared.nodes.lock().unwrap_or_else(|e| e.into_inner());
            let old: Vec<i32> = nodes.iter().filter(|(_, e)| e.seen.elapsed() >= grace).map(|(n, _)| *n).collect();
            old.into_iter().filter_map(|n| nodes.remove(&n).map(|e| (n, e))).collect()
        };
        for (node, e) in &gone {
            if let Some(stop) = &e.stop {
                stop.cancel();
            }
            tracing::info!(proxy = %shared.label, node, port = e.port, "broker gone past the grace period: port freed");
        }
        if !gone.is_empty() {
            shared.ports_gauge();
            shared.save_state();
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    node: Option<i32>,
    bootstrap: String,
    stop: CancellationToken,
) {
    let kind = if node.is_some() { "broker" } else { "bootstrap" };
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
            _ = shared.shutdown.cancelled() => return,
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            metrics::counter!("mskdns_proxy_connections_rejected_total", "proxy" => shared.label.clone()).increment(1);
            tracing::warn!(proxy = %shared.label, %peer, "max_connections reached: connection closed");
            continue;
        };
        let upstream = match node {
            Some(n) => match shared.upstream_of(n) {
                Some(u) => u,
                None => continue,
            },
            None => bootstrap.clone(),
        };
        let shared2 = shared.clone();
        shared.tasks.spawn(async move {
            let _permit = permit;
            metrics::counter!("mskdns_proxy_connections_total", "proxy" => shared2.label.clone(), "listener" => kind)
                .increment(1);
            let active = metrics::gauge!("mskdns_proxy_connections_active", "proxy" => shared2.label.clone());
            active.increment(1.0);
            match connection(&shared2, sock, &upstream).await {
                Ok(()) => tracing::debug!(proxy = %shared2.label, %peer, %upstream, "connection closed"),
                Err(e) => e.log(&shared2.label, peer, &upstream),
            }
            active.decrement(1.0);
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("client: {0}")]
    ClientFrame(FrameError),
    #[error("upstream: {0}")]
    UpstreamFrame(FrameError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("response with correlation id {got} where {want} was expected")]
    Correlation { got: i32, want: i32 },
    #[error("a response arrived with no request waiting for it")]
    Unexpected,
    #[error("{0}")]
    Rewrite(#[from] rewrite::RewriteError),
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("TLS handshake with the client: {0}")]
    ClientTls(String),
    #[error("a plaintext Kafka request on a TLS listener: the client needs security.protocol SSL or SASL_SSL")]
    PlaintextOnTls,
    #[error("TLS handshake with {0}: {1}")]
    UpstreamTls(String, String),
}

impl ConnError {
    fn log(&self, proxy: &str, peer: SocketAddr, upstream: &str) {
        match self {
            ConnError::ClientFrame(FrameError::TlsOnPlaintext) => {
                metrics::counter!("mskdns_proxy_tls_on_plaintext_total", "proxy" => proxy.to_owned()).increment(1);
                tracing::warn!(proxy, %peer, "{self}");
            }
            ConnError::Io(e)
                if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) =>
            {
                tracing::debug!(proxy, %peer, upstream, "connection closed: {e}")
            }
            ConnError::Idle(_) => tracing::debug!(proxy, %peer, upstream, "{self}"),
            // A TLS error after the handshake: in TLS 1.3 a server that wants a client
            // certificate says so only then (an alert: CertificateRequired).
            ConnError::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>()) => {
                metrics::counter!("mskdns_proxy_tls_errors_total", "proxy" => proxy.to_owned(), "side" => "either", "kind" => "session")
                    .increment(1);
                tracing::warn!(proxy, %peer, upstream, "connection closed: TLS: {e}");
            }
            ConnError::ClientTls(_) | ConnError::PlaintextOnTls => {
                let kind = if matches!(self, ConnError::PlaintextOnTls) { "plaintext" } else { "handshake" };
                metrics::counter!("mskdns_proxy_tls_errors_total", "proxy" => proxy.to_owned(), "side" => "client", "kind" => kind)
                    .increment(1);
                tracing::warn!(proxy, %peer, "{self}");
            }
            ConnError::UpstreamTls(..) => {
                metrics::counter!("mskdns_proxy_tls_errors_total", "proxy" => proxy.to_owned(), "side" => "upstream", "kind" => "handshake")
                    .increment(1);
                tracing::warn!(proxy, %peer, "connection closed: {self}");
            }
            _ => tracing::warn!(proxy, %peer, upstream, "connection closed: {self}"),
        }
    }
}

/// Connects to `upstream`, with TLS when `upstream_tls` is set (SNI: the host in `upstream`).
async fn connect(shared: &Shared, upstream: &str) -> Result<Stream, ConnError> {
    let tcp = connect_tcp(shared, upstream).await?;
    let _ = tcp.set_nodelay(true);
    let Some(connector) = &shared.connector else { return Ok(Either::Left(tcp)) };
    let name = tls::server_name(upstream).map_err(|e| ConnError::UpstreamTls(upstream.to_owned(), e))?;
    let limit = Duration::from_millis(shared.cfg.handshake_timeout_ms);
    match tokio::time::timeout(limit, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(Either::Right(s.into())),
        Ok(Err(e)) => Err(ConnError::UpstreamTls(upstream.to_owned(), e.to_string())),
        Err(_) => Err(ConnError::UpstreamTls(upstream.to_owned(), format!("timed out after {limit:?}"))),
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

/// Relays one client connection to `upstream` until either side closes.
async fn connection(shared: &Arc<Shared>, client: TcpStream, upstream: &str) -> Result<(), ConnError> {
    let client = accept(shared, client).await?;
    let server = connect(shared, upstream).await?;
    match (client, server) {
        // Plaintext both ways: the halves of a TcpStream need no lock between them.
        (Either::Left(c), Either::Left(s)) => {
            let (cr, cw) = c.into_split();
            let (sr, sw) = s.into_split();
            relay(shared, cr, cw, sr, sw).await
        }
        (c, s) => {
            let (cr, cw) = tokio::io::split(c);
            let (sr, sw) = tokio::io::split(s);
            relay(shared, cr, cw, sr, sw).await
        }
    }
}

async fn relay<CR, CW, SR, SW>(shared: &Arc<Shared>, cr: CR, cw: CW, sr: SR, sw: SW) -> Result<(), ConnError>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let (tx, rx) = mpsc::channel::<RequestHeader>(MAX_INFLIGHT);
    let idle = Duration::from_secs(shared.cfg.idle_timeout_secs);
    let activity = Arc::new(Mutex::new(Instant::now()));
    // Bounded both ways: BUFFER bytes read ahead and BUFFER bytes waiting to be written per
    // direction; a slow reader on one side stops the proxy reading from the other.
    let requests = requests(
        shared,
        BufReader::with_capacity(BUFFER, cr),
        BufWriter::with_capacity(BUFFER, sw),
        tx,
        activity.clone(),
    );
    let responses = responses(
        shared,
        BufReader::with_capacity(BUFFER, sr),
        BufWriter::with_capacity(BUFFER, cw),
        rx,
        activity.clone(),
    );
    let watchdog = async {
        loop {
            let last = *activity.lock().unwrap_or_else(|e| e.into_inner());
            let left = idle.saturating_sub(last.elapsed());
            if left.is_zero() {
                return Err::<(), _>(ConnError::Idle(idle));
            }
            tokio::time::sleep(left).await;
        }
    };
    tokio::select! {
        r = requests => r,
        r = responses => r,
        r = watchdog => r,
        _ = shared.shutdown.cancelled() => Ok(()),
    }
}

fn touch(activity: &Mutex<Instant>) {
    *activity.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
}

/// Reads a size prefix; `Ok(None)` at a clean end of stream.
async fn read_size<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<[u8; 4]>> {
    let mut size = [0u8; 4];
    match r.read_exact(&mut size[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut size[1..]).await?;
    Ok(Some(size))
}

/// Streams exactly `n` bytes from `r` to `w` (straight from `r`'s buffer); the peer closing
/// before that is an error.
async fn copy_exact<R, W>(r: &mut BufReader<R>, w: &mut W, n: u64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if n > 0 && tokio::io::copy_buf(&mut r.take(n), w).await? < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Writes out what `w` holds unless the next frame is already complete in `r`'s buffer: then it
/// is forwarded first and both leave in one write. Flushing whenever the next frame is not all
/// there means the proxy never waits to read while holding bytes the peer is waiting for.
async fn flush_unless_more<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &BufReader<R>,
    w: &mut W,
) -> std::io::Result<()> {
    let buf = r.buffer();
    let ready = buf.len() >= 4 && {
        let size = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        size >= 0 && buf.len() - 4 >= size as usize
    };
    if ready { Ok(()) } else { w.flush().await }
}

/// Client → upstream: each request's header is read, noted in the FIFO, and the request is
/// forwarded; bodies past the first [`frame::REQUEST_PREFIX`] bytes are streamed, not held.
async fn requests<R, W>(
    shared: &Shared,
    mut client: BufReader<R>,
    mut server: W,
    fifo: mpsc::Sender<RequestHeader>,
    activity: Arc<Mutex<Instant>>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max = shared.cfg.max_frame_bytes;
    let bytes =
        metrics::counter!("mskdns_proxy_bytes_total", "proxy" => shared.label.clone(), "direction" => "to_upstream");
    let mut prefix = vec![0u8; frame::REQUEST_PREFIX];
    let mut by_api: BTreeMap<i16, metrics::Counter> = BTreeMap::new();
    loop {
        let Some(size) = read_size(&mut client).await? else { return Ok(()) };
        let n = frame::frame_size(size, max).map_err(ConnError::ClientFrame)?;
        let head = n.min(frame::REQUEST_PREFIX);
        client.read_exact(&mut prefix[..head]).await?;
        touch(&activity);
        let h = frame::parse_request(&prefix[..head]).map_err(ConnError::ClientFrame)?;
        // The registry is asked once per connection and api key, not once per request.
        by_api
            .entry(h.api_key)
            .or_insert_with(|| {
                metrics::counter!("mskdns_proxy_requests_total", "proxy" => shared.label.clone(), "api_key" => api_name(h.api_key))
            })
            .increment(1);
        if h.expects_response {
            // Bounded: with MAX_INFLIGHT unanswered requests, stop reading from the client,
            // after sending on what is held (the answers that free the FIFO need it).
            let closed = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
            match fifo.try_send(h) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(h)) => {
                    server.flush().await?;
                    fifo.send(h).await.map_err(|_| closed())?;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(closed().into()),
            }
        }
        server.write_all(&size).await?;
        server.write_all(&prefix[..head]).await?;
        copy_exact(&mut client, &mut server, (n - head) as u64).await?;
        flush_unless_more(&client, &mut server).await?;
        bytes.increment(4 + n as u64);
    }
}

/// Upstream → client: each response is matched with the oldest request waiting; those that
/// carry broker addresses are rewritten, the rest streamed through unchanged.
async fn responses<R, W>(
    shared: &Arc<Shared>,
    mut server: BufReader<R>,
    mut client: W,
    mut fifo: mpsc::Receiver<RequestHeader>,
    activity: Arc<Mutex<Instant>>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max = shared.cfg.max_frame_bytes;
    let bytes =
        metrics::counter!("mskdns_proxy_bytes_total", "proxy" => shared.label.clone(), "direction" => "to_client");
    loop {
        let Some(size) = read_size(&mut server).await? else { return Ok(()) };
        let n = frame::frame_size(size, max).map_err(ConnError::UpstreamFrame)?;
        let mut corr = [0u8; 4];
        if n < 4 {
            return Err(ConnError::UpstreamFrame(FrameError::Truncated));
        }
        server.read_exact(&mut corr).await?;
        touch(&activity);
        let got = i32::from_be_bytes(corr);
        let want = fifo.try_recv().map_err(|_| ConnError::Unexpected)?;
        if got != want.correlation_id {
            return Err(ConnError::Correlation { got, want: want.correlation_id });
        }
        if rewrite::needs_rewrite(want.api_key, want.api_version) {
            let mut message = BytesMut::with_capacity(n);
            message.extend_from_slice(&corr);
            message.resize(n, 0);
            server.read_exact(&mut message[4..]).await?;
            let message: Bytes = message.freeze();
            let (out, done) =
                rewrite::rewrite(want.api_key, want.api_version, message.clone(), &shared.advertise, shared)?;
            if done.addresses > 0 || done.dropped > 0 {
                metrics::counter!("mskdns_proxy_rewrites_total", "proxy" => shared.label.clone(), "api_key" => api_name(want.api_key))
                    .increment(1);
            }
            match out {
                Some(out) => client.write_all(&out).await?,
                None => {
                    client.write_all(&size).await?;
                    client.write_all(&message).await?;
                }
            }
        } else {
            client.write_all(&size).await?;
            client.write_all(&corr).await?;
            copy_exact(&mut server, &mut client, (n - 4) as u64).await?;
        }
        flush_unless_more(&server, &mut client).await?;
        bytes.increment(4 + n as u64);
    }
}

fn api_name(key: i16) -> &'static str {
    use kafka_protocol::messages::ApiKey;
    match ApiKey::try_from(key) {
        Ok(ApiKey::Produce) => "Produce",
        Ok(ApiKey::Fetch) => "Fetch",
        Ok(ApiKey::ListOffsets) => "ListOffsets",
        Ok(ApiKey::Metadata) => "Metadata",
        Ok(ApiKey::OffsetCommit) => "OffsetCommit",
        Ok(ApiKey::OffsetFetch) => "OffsetFetch",
        Ok(ApiKey::FindCoordinator) => "FindCoordinator",
        Ok(ApiKey::JoinGroup) => "JoinGroup",
        Ok(ApiKey::Heartbeat) => "Heartbeat",
        Ok(ApiKey::LeaveGroup) => "LeaveGroup",
        Ok(ApiKey::SyncGroup) => "SyncGroup",
        Ok(ApiKey::SaslHandshake) => "SaslHandshake",
        Ok(ApiKey::ApiVersions) => "ApiVersions",
        Ok(ApiKey::CreateTopics) => "CreateTopics",
        Ok(ApiKey::InitProducerId) => "InitProducerId",
        Ok(ApiKey::SaslAuthenticate) => "SaslAuthenticate",
        Ok(ApiKey::DescribeCluster) => "DescribeCluster",
        Ok(_) => "other",
        Err(_) => "unknown",
    }
}

/// A block's TLS towards clients and towards brokers, from its files.
fn tls_sides(cfg: &ProxyConfig) -> Result<(Option<tls::Terminator>, Option<TlsConnector>), tls::TlsError> {
    let terminator = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(tls::Terminator::load(cert, key)?),
        _ => None,
    };
    let client_cert = cfg.upstream_tls_cert.as_deref().zip(cfg.upstream_tls_key.as_deref());
    let connector =
        if cfg.upstream_tls { Some(tls::connector(cfg.upstream_ca_file.as_deref(), client_cert)?) } else { None };
    Ok((terminator, connector))
}

/// Loads every block's TLS files as binding would (for `mskdns check`).
pub fn check_tls(configs: &[ProxyConfig]) -> Result<(), ProxyError> {
    for (index, cfg) in configs.iter().enumerate() {
        tls_sides(cfg).map_err(|source| ProxyError::Tls { index, source })?;
    }
    Ok(())
}

/// Binds every `[[proxies]]` block.
pub fn bind_all(
    configs: &[ProxyConfig],
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Vec<Proxy>, ProxyError> {
    configs.iter().enumerate().map(|(i, c)| Proxy::bind(i, c, tasks.clone(), shutdown.clone())).collect()
}
