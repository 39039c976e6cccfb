//! The DNS listeners: binding UDP and TCP on each configured address, and the TCP service.
//! (The UDP service is the batched fast path in [`super::udp`].)

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::engine::{Engine, Origin, Transport};
use crate::limits::PerClient;

pub use super::engine::MAX_INFLIGHT_MISSES;
pub use super::stream::{TcpLimits, stream_connection};

/// File descriptors kept for everything but misses: listeners, the admin endpoint, logs, AWS calls.
const FD_RESERVE: u64 = 64;

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in force.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain system calls with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            } else {
                tracing::warn!(error = %io::Error::last_os_error(), soft = lim.rlim_cur, hard = lim.rlim_max, "cannot raise the open-file limit");
            }
        }
    }
    lim.rlim_cur
}

/// Misses in flight at once: `configured` (0: automatic), never more than half the file
/// descriptors left after [`FD_RESERVE`] (the other half is for TCP clients and proxies),
/// at most [`MAX_INFLIGHT_MISSES`], at least 1.
pub fn inflight_limit(configured: usize, nofile: u64) -> usize {
    let by_fds = (nofile.saturating_sub(FD_RESERVE) / 2).max(1) as usize;
    let wanted = if configured == 0 { MAX_INFLIGHT_MISSES } else { configured };
    wanted.min(by_fds).max(1)
}
const UDP_RECV_BUFFER: usize = 8 << 20;

/// A UDP socket (served by one or more threads) and a TCP listener on the same address and port.
pub struct Listener {
    pub udp: std::net::UdpSocket,
    pub tcp: TcpListener,
}

impl Listener {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// Binds UDP and TCP on `addr`. With port 0 the kernel picks the UDP port and TCP takes the
/// same one, retrying a few times should TCP find that port taken.
pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
    // Passed by the service manager (socket activation): used as they are, their buffers untouched.
    let (udp, tcp) = (crate::activation::take_udp(addr), crate::activation::take_tcp(addr));
    if udp.is_some() || tcp.is_some() {
        let udp = match udp {
            Some(u) => {
                u.set_nonblocking(false)?;
                u.set_read_timeout(Some(super::udp::POLL_INTERVAL))?;
                u
            }
            None => udp_socket(addr)?.into(),
        };
        let tcp = match tcp {
            Some(t) => {
                t.set_nonblocking(true)?;
                TcpListener::from_std(t)?
            }
            None => TcpListener::from_std(tcp_listener(addr)?.into())?,
        };
        return Ok(Listener { udp, tcp });
    }
    let mut last = None;
    for _ in 0..16 {
        let udp = udp_socket(addr)?;
        let bound = udp.local_addr()?.as_socket().expect("an inet socket");
        match tcp_listener(bound) {
            Ok(tcp) => return Ok(Listener { udp: udp.into(), tcp: TcpListener::from_std(tcp.into())? }),
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free port")))
}

fn udp_socket(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // Bursts from many clients queue here rather than drop; the kernel caps the size.
    let _ = s.set_recv_buffer_size(UDP_RECV_BUFFER);
    // Blocking, with a timeout so the receive thread notices shutdown.
    s.set_read_timeout(Some(super::udp::POLL_INTERVAL))?;
    s.bind(&addr.into())?;
    Ok(s)
}

fn tcp_listener(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s)
}

/// TLS on a stream listener, and what runs inside it.
#[derive(Clone)]
pub struct Secure {
    pub terminator: Arc<crate::tls::Terminator>,
    pub handshake_timeout: Duration,
    pub inside: Inside,
}

/// What a TLS listener serves once the handshake is done.
#[derive(Clone)]
pub enum Inside {
    /// DNS over TLS (RFC 7858): length-prefixed messages, as plain TCP.
    Dot,
    /// DNS over HTTPS (RFC 8484).
    Doh(Arc<super::doh::DohSettings>),
}

impl Secure {
    pub fn transport(&self) -> Transport {
        match self.inside {
            Inside::Dot => Transport::Dot,
            Inside::Doh(_) => Transport::Doh,
        }
    }
}

/// Binds a TCP listener for DoT or DoH (port 0: any free port).
pub fn bind_stream(addr: SocketAddr) -> io::Result<TcpListener> {
    crate::net::bind_tcp(addr, || tcp_listener(addr).map(Into::into))
}

/// The connection caps every DNS stream listener (TCP, DoT and DoH) shares: `max_tcp_connections`
/// and `max_tcp_connections_per_client` count per process, not per listener.
pub struct StreamGate {
    slots: Arc<Semaphore>,
    per_client: Arc<PerClient>,
    max_per_client: usize,
    /// `dns.tcp_per_client_exempt`: past the per-client cap (the process-wide one still counts).
    exempt: Vec<ipnet::IpNet>,
}

/// What the gate lets in: a slot in all, and one of the client's unless it is exempt.
pub struct Admitted {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _client: Option<crate::limits::ClientSlot>,
}

impl StreamGate {
    pub fn new(limits: &TcpLimits, exempt: Vec<ipnet::IpNet>) -> Arc<Self> {
        Arc::new(StreamGate {
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            per_client: Arc::default(),
            max_per_client: limits.max_per_client,
            exempt,
        })
    }

    /// A connection from `client`, or the reason it is closed (`"per_client"` or `"limit"`).
    fn admit(&self, client: std::net::IpAddr) -> Result<Admitted, &'static str> {
        let own = match self.exempt.iter().any(|n| n.contains(&client)) {
            true => None,
            false => Some(self.per_client.take(client, self.max_per_client).ok_or("per_client")?),
        };
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| "limit")?;
        Ok(Admitted { _slot: slot, _client: own })
    }
}

/// Accepts connections until `shutdown`: plain TCP (`secure` unset), DoT or DoH; each serves
/// its queries as they come (answers out of order). Clients outside `dns.allow` are closed at
/// accept, before anything is read or any handshake is done. `gate` is shared by every stream
/// listener of the process.
#[allow(clippy::too_many_arguments)]
pub async fn serve_tcp(
    engine: Arc<Engine>,
    listener: TcpListener,
    index: usize,
    limits: TcpLimits,
    gate: Arc<StreamGate>,
    secure: Option<Secure>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let transport = secure.as_ref().map_or(Transport::Tcp, Secure::transport);
    let rejected = |reason: &'static str| metrics::counter!("mskdns_tcp_connections_rejected_total", "reason" => reason, "transport" => transport.label());
    let (over_limit, over_client, not_allowed) = (rejected("limit"), rejected("per_client"), rejected("not_allowed"));
    let active = metrics::gauge!("mskdns_tcp_connections_active", "transport" => transport.label());
    let handshake_errors = metrics::counter!("mskdns_tls_handshake_errors_total", "transport" => transport.label());
    loop {
        let (stream, peer) = tokio::select! {
            c = crate::net::next_client(&listener, transport.label()) => c,
            _ = shutdown.cancelled() => break,
        };
        let client = peer.ip().to_canonical();
        if !engine.allows(client) {
            not_allowed.increment(1);
            continue;
        }
        let admitted = match gate.admit(client) {
            Ok(a) => a,
            Err(reason) => {
                if reason == "per_client" { &over_client } else { &over_limit }.increment(1);
                continue;
            }
        };
        // A token of the connection's own: its task polls it on every wake-up, and polling the
        // listener's (shared by every connection) would take that one's lock each time.
        let (engine, shutdown, active, secure) =
            (engine.clone(), shutdown.child_token(), active.clone(), secure.clone());
        let handshake_errors = handshake_errors.clone();
        let span = tracing::debug_span!("dns_conn", %peer, transport = transport.label());
        let task = async move {
            let _held = (admitted, crate::net::Active::new(active));
            let _ = stream.set_nodelay(limits.nodelay || transport == Transport::Doh);
            let from = Origin { client: peer.ip(), port: peer.port(), listener: index, transport };
            // On shutdown a connection reads nothing more, answers what it read (its misses
            // included), then closes; past the grace it is dropped.
            let serve = serve_connection(&engine, stream, from, limits, secure, &handshake_errors, &shutdown);
            let grace = engine.resolve_deadline() + limits.write_timeout;
            tokio::select! {
                r = serve => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended");
                    }
                }
                _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {}
            }
        };
        tasks.spawn(tracing::Instrument::instrument(task, span));
    }
}

/// One accepted connection: plain TCP, or TLS first (bounded by the handshake timeout), then DoT
/// or DoH by the listener's kind.
async fn serve_connection(
    engine: &Arc<Engine>,
    stream: tokio::net::TcpStream,
    from: Origin,
    limits: TcpLimits,
    secure: Option<Secure>,
    handshake_errors: &metrics::Counter,
    stop: &CancellationToken,
) -> io::Result<()> {
    let Some(secure) = secure else {
        let (rd, wr) = stream.into_split();
        return stream_connection(engine, rd, wr, from, limits, stop).await;
    };
    match secure.inside.clone() {
        Inside::Doh(settings) => {
            // TLS records are gathered below TLS and leave in one write per flush
            // (see doh::FrameCut for why a record carries at most one response).
            let io = tokio::io::BufWriter::with_capacity(super::doh::WRITE_BUFFER, stream);
            let tls = handshake(&secure, io, handshake_errors).await?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let tls = super::doh::FrameCut::new(tls, h2);
            super::doh::connection(engine.clone(), tls, from, settings, limits, stop.clone()).await
        }
        Inside::Dot => {
            let tls = handshake(&secure, stream, handshake_errors).await?;
            let (rd, wr) = tokio::io::split(tls);
            stream_connection(engine, rd, wr, from, limits, stop).await
        }
    }
}

/// The server side of a TLS handshake, bounded by the listener's handshake timeout.
async fn handshake<IO>(
    secure: &Secure,
    io: IO,
    errors: &metrics::Counter,
) -> io::Result<tokio_rustls::server::TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(secure.handshake_timeout, secure.terminator.acceptor().accept(io)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => {
            errors.increment(1);
            Err(io::Error::new(e.kind(), format!("TLS handshake: {e}")))
        }
        Err(_) => {
            errors.increment(1);
            Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake not done in time"))
        }
    }
}
