//! `[dns]` and `[cache]`: listeners, upstreams, limits and the answer cache.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ConfigError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// UDP and TCP are served on each address; port 0 picks a free port (printed at start).
    pub listen: Vec<SocketAddr>,
    /// Empty means the nameservers of /etc/resolv.conf.
    pub upstreams: Vec<Upstream>,
    /// Client networks served; everyone else gets REFUSED.
    pub allow: Vec<IpNet>,
    /// How long one upstream attempt may take before the next upstream is tried.
    pub upstream_timeout_ms: u64,
    /// Packets per sliding second to each of `upstreams` (retransmits, failover, prefetches and
    /// probes included); 0: no limit. Unset: 900 for the VPC resolver's addresses, none for others.
    pub upstream_max_pps: Option<u32>,
    /// What a name of an MSK cluster that is not configured gets: forwarded, or NXDOMAIN.
    pub unknown_clusters: UnknownClusters,
    /// Largest UDP response we send to an EDNS client.
    pub max_udp_payload: u16,
    pub max_tcp_connections: usize,
    /// TCP, DoT and DoH connections one client address may hold at once (all listeners together).
    pub max_tcp_connections_per_client: usize,
    /// Client networks past `max_tcp_connections_per_client` (a resolver or load balancer in
    /// front of mskdns, one address carrying many users); `max_tcp_connections` still counts them.
    pub tcp_per_client_exempt: Vec<IpNet>,
    pub tcp_idle_timeout_ms: u64,
    /// How long writing one answer to a TCP client may take before the connection is closed.
    pub tcp_write_timeout_ms: u64,
    /// TCP_NODELAY on TCP and DoT connections (answers leave at once). Off, Nagle's algorithm
    /// holds an answer while the one before it is unacknowledged: less CPU per query, more
    /// latency. DoH connections always have it.
    pub tcp_nodelay: bool,
    /// Misses resolving at once (each holds a socket); 0: from the open-file limit, at most 16384.
    pub max_inflight: usize,
    /// UDP responses per second per client prefix; 0: no limit. Over it, responses are dropped
    /// but every `rate_limit_slip`-th, which is sent truncated (the client retries over TCP).
    pub rate_limit: u32,
    pub rate_limit_slip: u32,
    /// Prefix lengths that group clients for the rate limit.
    pub rate_limit_ipv4_prefix: u8,
    pub rate_limit_ipv6_prefix: u8,
    /// Clients never rate-limited: loopback by default (its source cannot be spoofed from the
    /// network); add a Route 53 outbound endpoint's addresses here.
    pub rate_limit_exempt: Vec<IpNet>,
    /// The DNS cookie secret (32 hex digits, RFC 9018): give instances behind one address the
    /// same one. Unset: random per process.
    pub cookie_secret: Option<CookieSecret>,
    /// UDP receive threads per listen address; 0: one per CPU we may run on. All but the first
    /// run at idle priority (they use spare CPU only).
    pub udp_threads: usize,
    /// DNS over TLS (RFC 7858) on each address (853 is its port); needs `tls_cert` and `tls_key`.
    pub listen_dot: Vec<SocketAddr>,
    /// DNS over HTTPS (RFC 8484; HTTP/2 and HTTP/1.1 by ALPN) on each address; needs the pair too.
    pub listen_doh: Vec<SocketAddr>,
    /// The certificate chain and key (PEM) of the DoT and DoH listeners; re-read when they change.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The DoH path (RFC 8484's example, the one clients assume).
    pub doh_path: String,
    /// A DoT or DoH client must finish its TLS handshake this soon.
    pub tls_handshake_timeout_ms: u64,
    /// HTTP/2 streams one DoH connection may have open at once.
    pub doh_max_streams: u32,
}

impl DnsConfig {
    /// Every listener a query can arrive on, in the order of their indices: `listen`, then
    /// `listen_dot`, then `listen_doh` (views name any of them in `listeners`).
    pub fn all_listeners(&self) -> Vec<SocketAddr> {
        self.listen.iter().chain(&self.listen_dot).chain(&self.listen_doh).copied().collect()
    }
}

impl DnsConfig {
    pub fn udp_threads(&self) -> usize {
        match self.udp_threads {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 5353)],
            upstreams: Vec::new(),
            allow: default_allow(),
            upstream_timeout_ms: 1000,
            upstream_max_pps: None,
            unknown_clusters: UnknownClusters::Forward,
            max_udp_payload: DEFAULT_UDP_PAYLOAD,
            max_tcp_connections: 1024,
            max_tcp_connections_per_client: 64,
            tcp_per_client_exempt: Vec::new(),
            tcp_idle_timeout_ms: 10_000,
            tcp_write_timeout_ms: 5_000,
            tcp_nodelay: true,
            max_inflight: 0,
            udp_threads: 0,
            rate_limit: 2000,
            rate_limit_slip: 2,
            rate_limit_ipv4_prefix: 24,
            rate_limit_ipv6_prefix: 56,
            rate_limit_exempt: ["127.0.0.0/8", "::1/128"]
                .iter()
                .map(|n| n.parse().expect("built-in network"))
                .collect(),
            cookie_secret: None,
            listen_dot: Vec::new(),
            listen_doh: Vec::new(),
            tls_cert: None,
            tls_key: None,
            doh_path: "/dns-query".into(),
            tls_handshake_timeout_ms: 5_000,
            doh_max_streams: 100,
        }
    }
}

/// The EDNS payload size advertised and answered by default: 1232 bytes, the DNS Flag Day 2020
/// figure that avoids IP fragmentation on any path.
pub const DEFAULT_UDP_PAYLOAD: u16 = 1232;

/// `dns.cookie_secret`: 16 bytes written as 32 hex digits. Never shown in logs or `Debug`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CookieSecret(pub [u8; 16]);

impl fmt::Debug for CookieSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CookieSecret(<hidden>)")
    }
}

impl FromStr for CookieSecret {
    type Err = &'static str;
    fn from_str(hex: &str) -> Result<Self, Self::Err> {
        const WHAT: &str = "must be 32 hexadecimal digits (16 bytes)";
        if hex.len() != 32 || !hex.is_ascii() {
            return Err(WHAT);
        }
        let mut out = [0; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| WHAT)?;
        }
        Ok(CookieSecret(out))
    }
}

impl Serialize for CookieSecret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}", self.0.iter().map(|b| format!("{b:02x}")).collect::<String>()))
    }
}

impl<'de> Deserialize<'de> for CookieSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Loopback, the RFC 1918 ranges, CGNAT space (RFC 6598) and IPv6 ULA and link-local.
pub fn default_allow() -> Vec<IpNet> {
    [
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    ]
    .iter()
    .map(|n| n.parse().expect("built-in network"))
    .collect()
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnknownClusters {
    Forward,
    Nxdomain,
}

/// An upstream resolver: `ip` or `ip:port` (`[v6]:port`), port 53 by default; written
/// `vpc:ip[:port]`, it is the VPC resolver (the VPC CIDR's base + 2), which shares one packet
/// budget with `169.254.169.253` and `fd00:ec2::253` (`dns.upstream_max_pps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream(pub SocketAddr, pub UpstreamKind);

/// Whether an upstream was written `vpc:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamKind {
    #[default]
    Plain,
    VpcResolver,
}

impl FromStr for Upstream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, kind) = match s.strip_prefix("vpc:") {
            Some(rest) => (rest, UpstreamKind::VpcResolver),
            None => (s, UpstreamKind::Plain),
        };
        if let Ok(sa) = addr.parse::<SocketAddr>() {
            return Ok(Upstream(sa, kind));
        }
        addr.parse::<IpAddr>().map(|ip| Upstream(SocketAddr::new(ip, 53), kind)).map_err(|_| {
            format!("`{s}` is neither an IP address nor ip:port (`vpc:` before it marks the VPC resolver)")
        })
    }
}

impl Serialize for Upstream {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.1 {
            UpstreamKind::Plain => s.collect_str(&self.0),
            UpstreamKind::VpcResolver => s.collect_str(&format_args!("vpc:{}", self.0)),
        }
    }
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Bytes all forwarded-answer caches together may hold (each entry counted with its
    /// bookkeeping); past it the least recently and frequently used go first.
    pub max_bytes: u64,
    /// Entries kept at most, in all caches together.
    pub max_entries: u64,
    /// TTL clamps applied to forwarded answers, in seconds.
    pub min_ttl: u32,
    pub max_ttl: u32,
    /// Cap on how long NXDOMAIN/NODATA is cached (RFC 2308 takes the SOA's minimum, then this).
    pub max_negative_ttl: u32,
    /// How long past its TTL an answer may still be served when every upstream fails
    /// (RFC 8767, with a TTL of 30 s); 0 turns serving stale answers off.
    pub serve_stale_secs: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 64 << 20,
            max_entries: 100_000,
            min_ttl: 0,
            max_ttl: 86_400,
            max_negative_ttl: 3_600,
            serve_stale_secs: 3_600,
        }
    }
}

/// `nameserver` lines of a resolv.conf, as port-53 socket addresses.
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip = words.next()?;
            ip.split('%').next()?.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// `[dns]` and `[cache]` on their own.
pub(super) fn validate(d: &DnsConfig, c: &CacheConfig) -> Result<(), ConfigError> {
    if d.listen.is_empty() {
        return Err(ConfigError::invalid("dns.listen", "at least one address is needed"));
    }
    if !(d.listen_dot.is_empty() && d.listen_doh.is_empty()) && (d.tls_cert.is_none() || d.tls_key.is_none()) {
        let key = if d.tls_cert.is_none() { "dns.tls_cert" } else { "dns.tls_key" };
        return Err(ConfigError::invalid(key, "dns.listen_dot and dns.listen_doh need dns.tls_cert and dns.tls_key"));
    }
    if !d.doh_path.starts_with('/') || d.doh_path.contains(['?', '#']) {
        return Err(ConfigError::invalid("dns.doh_path", "must be an absolute path without query or fragment"));
    }
    if d.tls_handshake_timeout_ms == 0 {
        return Err(ConfigError::invalid("dns.tls_handshake_timeout_ms", "must be at least 1"));
    }
    if !(1..=10_000).contains(&d.doh_max_streams) {
        return Err(ConfigError::invalid("dns.doh_max_streams", "must be between 1 and 10000"));
    }
    if !(512..=4096).contains(&d.max_udp_payload) {
        return Err(ConfigError::invalid("dns.max_udp_payload", "must be between 512 and 4096"));
    }
    if d.upstream_timeout_ms == 0 || d.upstream_timeout_ms > 30_000 {
        return Err(ConfigError::invalid("dns.upstream_timeout_ms", "must be between 1 and 30000"));
    }
    if d.rate_limit_ipv4_prefix > 32 || d.rate_limit_ipv6_prefix > 128 {
        return Err(ConfigError::invalid(
            "dns.rate_limit_ipv4_prefix",
            "prefix lengths are at most 32 (IPv4) and 128 (IPv6)",
        ));
    }
    if d.rate_limit > 1_000_000 {
        return Err(ConfigError::invalid("dns.rate_limit", "must be at most 1000000 per second"));
    }
    if d.udp_threads > 256 {
        return Err(ConfigError::invalid("dns.udp_threads", "must be at most 256 (0: one per CPU)"));
    }
    if d.max_tcp_connections == 0 {
        return Err(ConfigError::invalid("dns.max_tcp_connections", "must be at least 1"));
    }
    if d.max_tcp_connections_per_client == 0 {
        return Err(ConfigError::invalid("dns.max_tcp_connections_per_client", "must be at least 1"));
    }
    if d.tcp_idle_timeout_ms == 0 {
        return Err(ConfigError::invalid("dns.tcp_idle_timeout_ms", "must be at least 1"));
    }
    if d.tcp_write_timeout_ms == 0 {
        return Err(ConfigError::invalid("dns.tcp_write_timeout_ms", "must be at least 1"));
    }
    for (i, u) in d.upstreams.iter().enumerate() {
        if d.listen.contains(&u.0) {
            return Err(ConfigError::invalid(format!("dns.upstreams[{i}]"), "is one of dns.listen: that would loop"));
        }
    }
    if c.max_entries == 0 {
        return Err(ConfigError::invalid("cache.max_entries", "must be at least 1"));
    }
    if c.max_bytes < 1 << 20 {
        return Err(ConfigError::invalid("cache.max_bytes", "must be at least 1048576 (1 MiB)"));
    }
    if c.min_ttl > c.max_ttl {
        return Err(ConfigError::invalid("cache.min_ttl", "is larger than cache.max_ttl"));
    }
    Ok(())
}
