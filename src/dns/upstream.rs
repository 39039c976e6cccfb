//! Forwarding to the upstream resolvers: UDP from a fresh random port with a random id, TCP
//! when the answer is truncated, a timeout per attempt, failover in the configured order, and
//! one overall deadline so that a client always gets an answer (SERVFAIL at worst) in time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::budget::{Budget, Class, TCP_PACKETS};
use super::cache::{Answer, BadResponse, answers};
use super::wire;
use crate::config::CacheConfig;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {upstream}: timed out")]
    Timeout { upstream: SocketAddr },
    #[error("upstream {upstream}: {source}")]
    Io { upstream: SocketAddr, source: std::io::Error },
    /// Out of file descriptors or buffers here: says nothing about the upstream.
    #[error("upstream {upstream}: local resources exhausted: {source}")]
    Local { upstream: SocketAddr, source: std::io::Error },
    #[error("upstream {upstream}: response {source}")]
    Bad { upstream: SocketAddr, source: BadResponse },
    #[error("upstream {upstream}: answered rcode {rcode}")]
    Failed { upstream: SocketAddr, rcode: u8 },
    #[error("no upstream answered in time")]
    Exhausted,
    /// Not sent: the upstream's packet budget (`dns.upstream_max_pps`) was spent.
    #[error("upstream {upstream}: packet budget spent")]
    Budget { upstream: SocketAddr },
}

impl UpstreamError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Io { .. } => "io",
            UpstreamError::Local { .. } => "local",
            UpstreamError::Bad { source, .. } => source.kind(),
            UpstreamError::Failed { .. } => "rcode",
            UpstreamError::Exhausted => "exhausted",
            UpstreamError::Budget { .. } => "budget",
        }
    }
}

struct Server {
    addr: SocketAddr,
    /// Smoothed round-trip time in microseconds (RFC 6298 style, gain 1/8); 0 until measured.
    srtt_us: AtomicU32,
    /// Down: its last attempt timed out or failed on the socket. Tried last, and probed.
    down: AtomicBool,
    probing: AtomicBool,
    latency: metrics::Histogram,
    errors: [metrics::Counter; 9],
    /// Datagrams on an attempt's socket that were not its answer (wrong id or question, a query,
    /// too short): ignored.
    ignored: metrics::Counter,
    up: metrics::Gauge,
    srtt: metrics::Gauge,
    /// Its packet budget (shared with the other addresses of a VPC resolver), if it has one.
    budget: Option<Arc<Budget>>,
    /// Packets sent to it: queries, retransmits, probes, and a TCP exchange as [`TCP_PACKETS`].
    packets: metrics::Counter,
}

/// How often a down upstream is asked whether it is back.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Retransmission timer bounds: a lost datagram (an upstream's rate limiting drops some) costs
/// a few round trips, not the whole attempt timeout.
const MIN_RTO: Duration = Duration::from_millis(20);
const INITIAL_RTO: Duration = Duration::from_millis(200);

impl Server {
    fn rto(&self) -> Duration {
        match self.srtt_us.load(Ordering::Relaxed) {
            0 => INITIAL_RTO,
            us => (Duration::from_micros(us as u64) * 3).max(MIN_RTO),
        }
    }

    fn observe_rtt(&self, rtt: Duration) {
        let sample = rtt.as_micros().min(u32::MAX as u128) as u32;
        let old = self.srtt_us.load(Ordering::Relaxed);
        let new = if old == 0 { sample } else { old - old / 8 + sample / 8 };
        self.srtt_us.store(new.max(1), Ordering::Relaxed);
        self.srtt.set(new as f64 / 1e6);
    }

    fn succeeded(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            self.up.set(1.0);
            tracing::info!(upstream = %self.addr, "upstream is back");
        }
    }

    /// A timeout or a socket error (not an error rcode for one name, which says nothing about
    /// the server) marks it down; returns true when this failure did.
    fn failed(&self, e: &UpstreamError) -> bool {
        if !matches!(e, UpstreamError::Timeout { .. } | UpstreamError::Io { .. }) {
            return false;
        }
        if self.down.swap(true, Ordering::Relaxed) {
            return false;
        }
        self.up.set(0.0);
        tracing::warn!(upstream = %self.addr, error = %e, "upstream is down; trying the others first");
        true
    }

    /// Takes `packets` from its budget (always granted without one), and counts them as sent.
    fn send_ok(&self, class: Class, packets: u32) -> bool {
        let ok = self.budget.as_ref().is_none_or(|b| b.take(class, packets));
        if ok {
            self.packets.increment(packets as u64);
        }
        ok
    }

    /// Sort key: up before down, then the fastest; unmeasured ones after measured ones.
    fn rank(&self) -> (bool, u32) {
        let srtt = match self.srtt_us.load(Ordering::Relaxed) {
            0 => u32::MAX,
            us => us,
        };
        (self.down.load(Ordering::Relaxed), srtt)
    }
}

const ERROR_KINDS: [&str; 9] =
    ["timeout", "io", "local", "malformed", "mismatch", "extended_rcode", "rcode", "exhausted", "budget"];

impl UpstreamError {
    /// An I/O error of an attempt: EMFILE, ENFILE, ENOBUFS and ENOMEM are this host's limits, not
    /// the upstream's failure, and never mark it down.
    fn io(upstream: SocketAddr, source: std::io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                UpstreamError::Local { upstream, source }
            }
            _ => UpstreamError::Io { upstream, source },
        }
    }
}

pub struct Upstreams {
    servers: Vec<Arc<Server>>,
    attempt_timeout: Duration,
    limits: CacheConfig,
}

/// The question an upstream is asked: lowercase name, type, class and the client's DO/CD bits.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    pub lc_name: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    pub dnssec_ok: bool,
    pub checking_disabled: bool,
}

impl Upstreams {
    pub fn new(
        addrs: &[SocketAddr],
        budgets: &[Option<Arc<Budget>>],
        attempt_timeout: Duration,
        limits: CacheConfig,
    ) -> Self {
        let servers = addrs
            .iter()
            .enumerate()
            .map(|(i, &addr)| {
                let label = addr.to_string();
                let up = metrics::gauge!("mskdns_upstream_up", "upstream" => label.clone());
                up.set(1.0);
                Arc::new(Server {
                    addr,
                    srtt_us: AtomicU32::new(0),
                    down: AtomicBool::new(false),
                    probing: AtomicBool::new(false),
                    up,
                    srtt: metrics::gauge!("mskdns_upstream_srtt_seconds", "upstream" => label.clone()),
                    latency: metrics::histogram!("mskdns_upstream_duration_seconds", "upstream" => label.clone()),
                    ignored: metrics::counter!("mskdns_upstream_ignored_datagrams_total", "upstream" => label.clone()),
                    errors: ERROR_KINDS.map(
                        |k| metrics::counter!("mskdns_upstream_errors_total", "upstream" => label.clone(), "kind" => k),
                    ),
                    budget: budgets.get(i).cloned().flatten(),
                    packets: metrics::counter!("mskdns_upstream_packets_total", "upstream" => label.clone()),
                })
            })
            .collect();
        Upstreams { servers, attempt_timeout, limits }
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.addr).collect()
    }

    /// The longest a resolution may take: one attempt per upstream, at most two attempts' worth,
    /// so a dead upstream list costs a client no more than twice the attempt timeout.
    pub fn deadline(&self) -> Duration {
        self.attempt_timeout * 2
    }

    /// The budgets of its upstreams.
    pub fn budgets(&self) -> impl Iterator<Item = &Arc<Budget>> {
        self.servers.iter().filter_map(|s| s.budget.as_ref())
    }

    /// Asks the upstreams in order until one gives a usable answer. Each packet is taken from
    /// the upstream's budget first, with `class` for the first attempt (a client's miss, or a
    /// prefetch) and failover's share for the next; an upstream whose budget refuses is skipped.
    /// `Err(Budget)`: nothing was sent at all.
    pub async fn resolve(&self, q: Question<'_>, class: Class) -> Result<Answer, UpstreamError> {
        let deadline = Instant::now() + self.deadline();
        let mut last = UpstreamError::Exhausted;
        let mut sent = false;
        let mut query = Vec::with_capacity(q.lc_name.len() + 32);
        // Healthy and fast first; config order breaks ties.
        let mut order: Vec<&Arc<Server>> = self.servers.iter().collect();
        order.sort_by_key(|s| s.rank());
        for server in order {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            wire::build_upstream_query(
                &mut query,
                rand::random(),
                q.lc_name,
                q.qtype,
                q.qclass,
                q.dnssec_ok,
                q.checking_disabled,
            );
            let class = if sent && class == Class::Miss { Class::Failover } else { class };
            if !server.send_ok(class, 1) {
                if !sent {
                    last = UpstreamError::Budget { upstream: server.addr };
                }
                continue;
            }
            sent = true;
            let started = Instant::now();
            let time = left.min(self.attempt_timeout);
            let result = match tokio::time::timeout(time, ask(server, &query, &self.limits)).await {
                Ok(r) => r,
                Err(_) => Err(UpstreamError::Timeout { upstream: server.addr }),
            };
            match result {
                Ok(mut answer) => {
                    answer.set_origin(server.addr, started.elapsed());
                    server.latency.record(started.elapsed().as_secs_f64());
                    server.observe_rtt(started.elapsed());
                    server.succeeded();
                    return Ok(answer);
                }
                Err(e) => {
                    let i = ERROR_KINDS.iter().position(|k| *k == e.kind()).unwrap_or(0);
                    server.errors[i].increment(1);
                    if server.failed(&e) {
                        self.probe(server);
                    }
                    tracing::debug!(error = %e, name = %wire::wire_to_string(q.lc_name), "upstream attempt failed");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Asks a down server for the root's NS records every PROBE_INTERVAL until it answers
    /// anything at all (an error rcode too: it is alive); ends with the server (a reload drops it) or when it is back.
    fn probe(&self, server: &Arc<Server>) {
        if server.probing.swap(true, Ordering::Relaxed) {
            return;
        }
        let (weak, limits, timeout) = (Arc::downgrade(server), self.limits.clone(), self.attempt_timeout);
        tokio::spawn(async move {
            let mut query = Vec::with_capacity(32);
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                let Some(server) = Weak::upgrade(&weak) else { return };
                if !server.down.load(Ordering::Relaxed) {
                    server.probing.store(false, Ordering::Relaxed);
                    return;
                }
                if !server.send_ok(Class::Probe, 1) {
                    continue; // the budget is short: probed next time
                }
                wire::build_upstream_query(
                    &mut query,
                    rand::random(),
                    b"\0",
                    wire::TYPE_NS,
                    wire::CLASS_IN,
                    false,
                    false,
                );
                let started = Instant::now();
                let reply = tokio::time::timeout(timeout, ask(&server, &query, &limits)).await;
                let answered = matches!(reply, Ok(Ok(_)) | Ok(Err(UpstreamError::Failed { .. })));
                if answered {
                    server.observe_rtt(started.elapsed());
                    server.succeeded();
                    server.probing.store(false, Ordering::Relaxed);
                    return;
                }
            }
        });
    }
}

/// One attempt at one upstream (the caller bounds its time; the first packet was taken from its
/// budget): the query is sent again on the same socket each time the retransmission timer fires,
/// the timer doubling each time, when the budget lets it (failover's share).
async fn ask(server: &Server, query: &[u8], limits: &CacheConfig) -> Result<Answer, UpstreamError> {
    let upstream = server.addr;
    let io = |source| UpstreamError::io(upstream, source);
    let bind: SocketAddr = if upstream.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let sock = UdpSocket::bind(bind).await.map_err(io)?;
    sock.connect(upstream).await.map_err(io)?;
    sock.send(query).await.map_err(io)?;
    let mut rto = server.rto();
    let mut resend_at = tokio::time::Instant::now() + rto;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::select! {
            r = sock.recv(&mut buf) => r.map_err(io)?,
            _ = tokio::time::sleep_until(resend_at) => {
                if server.send_ok(Class::Failover, 1) {
                    sock.send(query).await.map_err(io)?;
                }
                rto *= 2;
                resend_at = tokio::time::Instant::now() + rto;
                continue;
            }
        };
        let resp = &buf[..n];
        // Only our answer (id and question) may end the attempt: a stray or spoofed datagram,
        // however malformed, is ignored and the real answer still awaited.
        if !answers(resp, query) {
            server.ignored.increment(1);
            continue;
        }
        if wire::is_truncated(wire::be16(resp, 2)) {
            if !server.send_ok(Class::Miss, TCP_PACKETS) {
                return Err(UpstreamError::Budget { upstream });
            }
            return ask_tcp(upstream, query, limits).await;
        }
        match Answer::from_upstream(resp, query, limits, Instant::now()) {
            Err(source) => return Err(UpstreamError::Bad { upstream, source }),
            Ok(a) => return usable(upstream, a),
        }
    }
}

async fn ask_tcp(upstream: SocketAddr, query: &[u8], limits: &CacheConfig) -> Result<Answer, UpstreamError> {
    let io = |source| UpstreamError::io(upstream, source);
    let mut s = TcpStream::connect(upstream).await.map_err(io)?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
    framed.extend_from_slice(query);
    s.write_all(&framed).await.map_err(io)?;
    let len = s.read_u16().await.map_err(io)? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.map_err(io)?;
    let mut a = Answer::from_upstream(&buf, query, limits, Instant::now())
        .map_err(|source| UpstreamError::Bad { upstream, source })?;
    a.came_over_tcp();
    usable(upstream, a)
}

/// SERVFAIL, REFUSED and the like say "ask someone else"; NOERROR and NXDOMAIN are answers.
fn usable(upstream: SocketAddr, a: Answer) -> Result<Answer, UpstreamError> {
    match a.rcode {
        wire::RCODE_NOERROR | wire::RCODE_NXDOMAIN => Ok(a),
        rcode => Err(UpstreamError::Failed { upstream, rcode }),
    }
}
