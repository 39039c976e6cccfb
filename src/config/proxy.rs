//! `[[proxies]]`: the Kafka proxy's listeners, upstream, TLS and limits.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ConfigError;
use super::dns::default_allow;

/// A `[[proxies]]` block: `mode = "ports"` (the default) or `mode = "sni"`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // a handful per config, read at start
pub enum ProxyBlock {
    Ports(ProxyConfig),
    Sni(SniConfig),
}

impl ProxyBlock {
    pub fn ports(&self) -> Option<&ProxyConfig> {
        match self {
            ProxyBlock::Ports(p) => Some(p),
            ProxyBlock::Sni(_) => None,
        }
    }

    pub fn sni(&self) -> Option<&SniConfig> {
        match self {
            ProxyBlock::Sni(s) => Some(s),
            ProxyBlock::Ports(_) => None,
        }
    }
}

impl<'de> Deserialize<'de> for ProxyBlock {
    /// By `mode`, so that an error names the keys of the block's own mode.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = <figment::value::Value as Deserialize>::deserialize(d)?;
        // The block's own error names the key inside the block (`allow`, ...): keep it.
        let named = |e: figment::Error| match e.path.is_empty() {
            true => D::Error::custom(e.kind),
            false => D::Error::custom(format!("{}: {}", e.path.join("."), e.kind)),
        };
        let ports = || ProxyConfig::deserialize(&value).map(ProxyBlock::Ports).map_err(named);
        match value.find_ref("mode").map(|m| m.as_str()) {
            None | Some(Some("ports")) => ports(),
            Some(Some("sni")) => SniConfig::deserialize(&value).map(ProxyBlock::Sni).map_err(named),
            Some(_) => Err(D::Error::custom("mode: must be \"ports\" or \"sni\"")),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PortsMode {
    #[default]
    Ports,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SniMode {
    #[default]
    Sni,
}

/// How a broker's port is chosen in `mode = "ports"`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PortAssignment {
    /// The next free port as brokers appear, remembered in `state_file`: one instance.
    #[default]
    FirstCome,
    /// `broker_ports.first + node_id mod (size of broker_ports)`: the same on every instance,
    /// so several instances can stand behind one load balancer.
    NodeId,
}

/// One address or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Listen {
    One(SocketAddr),
    Many(Vec<SocketAddr>),
}

impl Listen {
    pub fn addrs(&self) -> &[SocketAddr] {
        match self {
            Listen::One(a) => std::slice::from_ref(a),
            Listen::Many(v) => v,
        }
    }
}

/// SNI routing: TLS from clients passes through untouched to the broker its ClientHello names
/// (an MSK name of a served cluster), through that cluster's top-level target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SniConfig {
    pub mode: SniMode,
    /// MSK's listener ports (9094, 9096, 9098, 14001+); a connection goes to the broker on the
    /// port it arrived on.
    pub listen: Listen,
    #[serde(default = "default_allow")]
    pub allow: Vec<IpNet>,
    #[serde(default = "default_proxy_connect")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_proxy_idle")]
    pub idle_timeout_secs: u64,
    #[serde(default = "default_proxy_connections")]
    pub max_connections: usize,
    #[serde(default = "default_proxy_per_client")]
    pub max_connections_per_client: usize,
    /// The PROXY header (when on) and the whole ClientHello must arrive within this.
    #[serde(default = "default_client_hello_timeout")]
    pub client_hello_timeout_ms: u64,
    /// The largest ClientHello read (and held) before a broker is chosen.
    #[serde(default = "default_client_hello_max")]
    pub client_hello_max_bytes: usize,
    /// A PROXY protocol v2 header comes first (an NLB or a PrivateLink endpoint service in
    /// front); `allow` then applies to the client address it carries. Connections without one
    /// are closed.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// With `proxy_protocol`: only these PrivateLink endpoint ids (the AWS TLV 0xEA, subtype
    /// 0x01); empty: any. When set, a connection that carries no endpoint id is closed.
    #[serde(default)]
    pub allow_endpoints: Vec<String>,
    /// With `proxy_protocol`: only peers in these networks (the load balancer's addresses) may
    /// send a header; others are closed at accept, before anything is read. Empty: any peer.
    #[serde(default)]
    pub proxy_protocol_from: Vec<IpNet>,
    /// On SIGTERM: no new connections; open ones are closed at the end of this.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
}

fn default_shutdown_grace() -> u64 {
    30
}

fn default_client_hello_timeout() -> u64 {
    5_000
}
fn default_client_hello_max() -> usize {
    16 * 1024
}

/// A Kafka-aware proxy: clients bootstrap from `listen`; every upstream broker gets its own port
/// from `broker_ports` on `advertise_host`, and responses are rewritten to name those.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default)]
    pub mode: PortsMode,
    /// The bootstrap listener (port 0 allowed: the bound port is printed).
    pub listen: SocketAddr,
    /// The cluster's bootstrap `host:port`.
    pub upstream: String,
    /// The host clients are told to connect to for every broker.
    pub advertise_host: String,
    /// `first-last`: one port per upstream broker, allocated as brokers appear.
    pub broker_ports: PortRange,
    #[serde(default)]
    pub port_assignment: PortAssignment,
    /// Where the broker listeners bind; default: `listen`'s address.
    #[serde(default)]
    pub broker_bind: Option<IpAddr>,
    /// The node id → port map (`first_come`) and the topic ids clients were shown, kept across
    /// restarts so clients' cached metadata stays valid.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// A broker absent from metadata this long gives its port back.
    #[serde(default = "default_broker_grace")]
    pub broker_grace_secs: u64,
    /// Largest frame accepted either way (Kafka's socket.request.max.bytes default: 100 MiB).
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: u32,
    /// A connection with no traffic either way this long is closed (Kafka's default: 10 min).
    #[serde(default = "default_proxy_idle")]
    pub idle_timeout_secs: u64,
    #[serde(default = "default_proxy_connect")]
    pub connect_timeout_ms: u64,
    /// Client connections at most, over all of this proxy's listeners.
    #[serde(default = "default_proxy_connections")]
    pub max_connections: usize,
    /// TLS towards clients: the certificate chain (PEM) every listener presents. With `tls_key`;
    /// without both, the listeners are plaintext. Re-read when the files change.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, SEC1 or PKCS#1) of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// TLS towards the brokers (MSK's 9094, 9096 and 9098 listeners): SNI is each broker's own
    /// name and its certificate is verified. `false` only for a plaintext listener (9092).
    #[serde(default = "default_true")]
    pub upstream_tls: bool,
    /// CA certificates (PEM) the brokers' certificates must chain to; default: the system's.
    #[serde(default)]
    pub upstream_ca_file: Option<PathBuf>,
    /// The certificate chain (PEM) presented to brokers that ask for one (MSK's mutual-TLS
    /// authentication); every client of this proxy then reaches the brokers as this identity.
    #[serde(default)]
    pub upstream_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `upstream_tls_cert`.
    #[serde(default)]
    pub upstream_tls_key: Option<PathBuf>,
    /// A TLS handshake on either side must finish within this.
    #[serde(default = "default_proxy_handshake")]
    pub handshake_timeout_ms: u64,
    /// Client networks served; others are closed at accept (default: loopback and private ranges).
    #[serde(default = "default_allow")]
    pub allow: Vec<IpNet>,
    /// Client connections one address may hold at once.
    #[serde(default = "default_proxy_per_client")]
    pub max_connections_per_client: usize,
    /// A client must send its first request (after its TLS handshake) within this; no broker
    /// connection is opened before.
    #[serde(default = "default_first_request")]
    pub first_request_timeout_ms: u64,
    /// As for `mode = "sni"`.
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub allow_endpoints: Vec<String>,
    #[serde(default)]
    pub proxy_protocol_from: Vec<IpNet>,
    /// On SIGTERM: no new connections; an open one closes at its first request boundary with no
    /// response pending (no Kafka request is lost half-way), at the latest at the end of this.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
    /// A reload that changes `upstream` (or its TLS keys) switches clients to the new cluster:
    /// new connections go there at once; open ones close at a request boundary within this.
    #[serde(default = "default_shutdown_grace")]
    pub switch_drain_secs: u64,
}

impl ProxyConfig {
    /// The block with what a reload switches live (`upstream`, its TLS keys, `switch_drain_secs`)
    /// set aside: two blocks equal here differ only by a switch.
    pub fn without_upstream(&self) -> ProxyConfig {
        ProxyConfig {
            upstream: String::new(),
            upstream_tls: true,
            upstream_ca_file: None,
            upstream_tls_cert: None,
            upstream_tls_key: None,
            switch_drain_secs: 0,
            ..self.clone()
        }
    }

    /// Whether `new` is this block switched to another cluster (or the same with other TLS keys).
    pub fn switches_to(&self, new: &ProxyConfig) -> bool {
        self.without_upstream() == new.without_upstream()
            && (self.upstream != new.upstream
                || self.upstream_tls != new.upstream_tls
                || self.upstream_ca_file != new.upstream_ca_file
                || self.upstream_tls_cert != new.upstream_tls_cert
                || self.upstream_tls_key != new.upstream_tls_key)
    }
}

fn default_proxy_per_client() -> usize {
    256
}
fn default_first_request() -> u64 {
    5_000
}

fn default_true() -> bool {
    true
}
fn default_proxy_handshake() -> u64 {
    10_000
}

fn default_broker_grace() -> u64 {
    3600
}
fn default_max_frame() -> u32 {
    100 * 1024 * 1024
}
fn default_proxy_idle() -> u64 {
    600
}
fn default_proxy_connect() -> u64 {
    10_000
}
fn default_proxy_connections() -> usize {
    10_000
}

/// `first-last`, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, p: u16) -> bool {
        (self.first..=self.last).contains(&p)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a port range (first-last, e.g. 9100-9199)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (first, last): (u16, u16) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if first == 0 || last < first {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}-{}", self.first, self.last))
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

fn validate_proxy_protocol(
    key: &dyn Fn(&str) -> String,
    on: bool,
    endpoints: &[String],
    from: &[IpNet],
) -> Result<(), ConfigError> {
    if !endpoints.is_empty() && !on {
        return Err(ConfigError::invalid(
            key("allow_endpoints"),
            "needs proxy_protocol = true (the id comes in its header)",
        ));
    }
    if !from.is_empty() && !on {
        return Err(ConfigError::invalid(
            key("proxy_protocol_from"),
            "needs proxy_protocol = true (without it the peer is the client: use allow)",
        ));
    }
    if let Some(bad) = endpoints.iter().find(|e| !e.starts_with("vpce-") || e.len() <= 5) {
        return Err(ConfigError::invalid(key("allow_endpoints"), format!("`{bad}` is not a VPC endpoint id (vpce-…)")));
    }
    Ok(())
}

fn validate_sni(i: usize, p: &SniConfig) -> Result<(), ConfigError> {
    let key = |k: &str| format!("proxies[{i}].{k}");
    if p.listen.addrs().is_empty() {
        return Err(ConfigError::invalid(key("listen"), "needs at least one address"));
    }
    for (k, v) in [
        ("connect_timeout_ms", p.connect_timeout_ms),
        ("idle_timeout_secs", p.idle_timeout_secs),
        ("client_hello_timeout_ms", p.client_hello_timeout_ms),
        ("max_connections", p.max_connections as u64),
        ("max_connections_per_client", p.max_connections_per_client as u64),
    ] {
        if v == 0 {
            return Err(ConfigError::invalid(key(k), "must be at least 1"));
        }
    }
    if !(512..=1 << 20).contains(&p.client_hello_max_bytes) {
        return Err(ConfigError::invalid(key("client_hello_max_bytes"), "must be between 512 and 1048576"));
    }
    validate_proxy_protocol(&key, p.proxy_protocol, &p.allow_endpoints, &p.proxy_protocol_from)
}

pub(super) fn validate_proxies(blocks: &[ProxyBlock]) -> Result<(), ConfigError> {
    let mut proxies: Vec<(usize, &ProxyConfig)> = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        match b {
            ProxyBlock::Sni(s) => validate_sni(i, s)?,
            ProxyBlock::Ports(p) => proxies.push((i, p)),
        }
    }
    for (n, &(i, p)) in proxies.iter().enumerate() {
        let key = |k: &str| format!("proxies[{i}].{k}");
        validate_proxy_protocol(&key, p.proxy_protocol, &p.allow_endpoints, &p.proxy_protocol_from)?;
        match p.upstream.rsplit_once(':') {
            Some((h, port)) if !h.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => return Err(ConfigError::invalid(key("upstream"), format!("`{}` is not host:port", p.upstream))),
        }
        if p.advertise_host.is_empty() || p.advertise_host.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(key("advertise_host"), "must be a host name or address"));
        }
        if p.max_frame_bytes < 1024 {
            return Err(ConfigError::invalid(key("max_frame_bytes"), "must be at least 1024"));
        }
        if p.max_connections == 0 {
            return Err(ConfigError::invalid(key("max_connections"), "must be at least 1"));
        }
        if p.max_connections_per_client == 0 {
            return Err(ConfigError::invalid(key("max_connections_per_client"), "must be at least 1"));
        }
        if p.first_request_timeout_ms == 0 {
            return Err(ConfigError::invalid(key("first_request_timeout_ms"), "must be at least 1"));
        }
        match (&p.tls_cert, &p.tls_key) {
            (Some(_), None) => return Err(ConfigError::invalid(key("tls_key"), "is needed with tls_cert")),
            (None, Some(_)) => return Err(ConfigError::invalid(key("tls_cert"), "is needed with tls_key")),
            _ => {}
        }
        match (&p.upstream_tls_cert, &p.upstream_tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(key("upstream_tls_key"), "is needed with upstream_tls_cert"));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(key("upstream_tls_cert"), "is needed with upstream_tls_key"));
            }
            _ => {}
        }
        if !p.upstream_tls {
            let set = [
                ("upstream_ca_file", p.upstream_ca_file.is_some()),
                ("upstream_tls_cert", p.upstream_tls_cert.is_some()),
            ];
            if let Some((k, _)) = set.iter().find(|(_, on)| *on) {
                return Err(ConfigError::invalid(key(k), "is set but upstream_tls is false"));
            }
        }
        if p.handshake_timeout_ms == 0 || p.connect_timeout_ms == 0 {
            let k = if p.handshake_timeout_ms == 0 { "handshake_timeout_ms" } else { "connect_timeout_ms" };
            return Err(ConfigError::invalid(key(k), "must be at least 1"));
        }
        if p.broker_ports.contains(p.listen.port()) {
            return Err(ConfigError::invalid(key("broker_ports"), "includes the bootstrap listener's port"));
        }
        for &(j, q) in proxies.iter().take(n) {
            let overlap = p.broker_ports.first <= q.broker_ports.last && q.broker_ports.first <= p.broker_ports.last;
            if overlap {
                return Err(ConfigError::invalid(key("broker_ports"), format!("overlaps proxies[{j}].broker_ports")));
            }
            if p.state_file.is_some() && p.state_file == q.state_file {
                return Err(ConfigError::invalid(key("state_file"), format!("is proxies[{j}]'s too")));
            }
        }
    }
    Ok(())
}
