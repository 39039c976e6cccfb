//! Forwarding to the upstream resolvers: UDP from a fresh random port with a random id, TCP
//! when the answer is truncated, a timeout per attempt, failover in the configured order, and
//! one overall deadline so that a client always gets an answer (SERVFAIL at worst) in time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::cache::{Answer, BadResponse};
use super::wire;
use crate::config::CacheConfig;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {upstream}: timed out")]
    Timeout { upstream: SocketAddr },
    #[error("upstream {upstream}: {source}")]
    Io { upstream: SocketAddr, source: std::io::Error },
    #[error("upstream {upstream}: response {source}")]
    Bad { upstream: SocketAddr, source: BadResponse },
    #[error("upstream {upstream}: answered rcode {rcode}")]
    Failed { upstream: SocketAddr, rcode: u8 },
    #[error("no upstream answered in time")]
    Exhausted,
}

impl UpstreamError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Io { .. } => "io",
            UpstreamError::Bad { source, .. } => source.kind(),
            UpstreamError::Failed { .. } => "rcode",
            UpstreamError::Exhausted => "exhausted",
        }
    }
}

struct Server {
    addr: SocketAddr,
    /// Smoothed round-trip time in microseconds (RFC 6298 style, gain 1/8); 0 until measured.
    srtt_us: AtomicU32,
    latency: metrics::Histogram,
    errors: [metrics::Counter; 7],
}

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
    }
}

const ERROR_KINDS: [&str; 7] = ["timeout", "io", "malformed", "mismatch", "extended_rcode", "rcode", "exhausted"];

pub struct Upstreams {
    servers: Vec<Server>,
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
    pub fn new(addrs: &[SocketAddr], attempt_timeout: Duration, limits: CacheConfig) -> Self {
        let servers = addrs
            .iter()
            .map(|&addr| {
                let label = addr.to_string();
                Server {
                    addr,
                    srtt_us: AtomicU32::new(0),
                    latency: metrics::histogram!("mskdns_upstream_duration_seconds", "upstream" => label.clone()),
                    errors: ERROR_KINDS.map(
                        |k| metrics::counter!("mskdns_upstream_errors_total", "upstream" => label.clone(), "kind" => k),
                    ),
                }
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

    /// Asks the upstreams in order until one gives a usable answer.
    pub async fn resolve(&self, q: Question<'_>) -> Result<Answer, UpstreamError> {
        let deadline = Instant::now() + self.deadline();
        let mut last = UpstreamError::Exhausted;
        let mut query = Vec::with_capacity(q.lc_name.len() + 32);
        for server in &self.servers {
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
            let started = Instant::now();
            let budget = left.min(self.attempt_timeout);
            let result = match tokio::time::timeout(budget, self.ask(server, &query)).await {
                Ok(r) => r,
                Err(_) => Err(UpstreamError::Timeout { upstream: server.addr }),
            };
            match result {
                Ok(answer) => {
                    server.latency.record(started.elapsed().as_secs_f64());
                    server.observe_rtt(started.elapsed());
                    return Ok(answer);
                }
                Err(e) => {
                    let i = ERROR_KINDS.iter().position(|k| *k == e.kind()).unwrap_or(0);
                    server.errors[i].increment(1);
                    tracing::debug!(error = %e, name = %wire::wire_to_string(q.lc_name), "upstream attempt failed");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// One attempt at one upstream (the caller bounds its time): the query is sent again on
    /// the same socket each time the retransmission timer fires, the timer doubling each time.
    async fn ask(&self, server: &Server, query: &[u8]) -> Result<Answer, UpstreamError> {
        let upstream = server.addr;
        let io = |source| UpstreamError::Io { upstream, source };
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
                    sock.send(query).await.map_err(io)?;
                    rto *= 2;
                    resend_at = tokio::time::Instant::now() + rto;
                    continue;
                }
            };
            let resp = &buf[..n];
            if n >= wire::HEADER_LEN && wire::is_truncated(wire::be16(resp, 2)) && resp[..2] == query[..2] {
                return self.ask_tcp(upstream, query).await;
            }
            match Answer::from_upstream(resp, query, &self.limits, Instant::now()) {
                // A stray or spoofed datagram: keep waiting for the real answer.
                Err(BadResponse::Mismatch) => continue,
                Err(source) => return Err(UpstreamError::Bad { upstream, source }),
                Ok(a) => return usable(upstream, a),
            }
        }
    }

    async fn ask_tcp(&self, upstream: SocketAddr, query: &[u8]) -> Result<Answer, UpstreamError> {
        let io = |source| UpstreamError::Io { upstream, source };
        let mut s = TcpStream::connect(upstream).await.map_err(io)?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
        framed.extend_from_slice(query);
        s.write_all(&framed).await.map_err(io)?;
        let len = s.read_u16().await.map_err(io)? as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await.map_err(io)?;
        let a = Answer::from_upstream(&buf, query, &self.limits, Instant::now())
            .map_err(|source| UpstreamError::Bad { upstream, source })?;
        usable(upstream, a)
    }
}

/// SERVFAIL, REFUSED and the like say "ask someone else"; NOERROR and NXDOMAIN are answers.
fn usable(upstream: SocketAddr, a: Answer) -> Result<Answer, UpstreamError> {
    match a.rcode {
        wire::RCODE_NOERROR | wire::RCODE_NXDOMAIN => Ok(a),
        rcode => Err(UpstreamError::Failed { upstream, rcode }),
    }
}
