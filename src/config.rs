//! Configuration: serde structs with their defaults, figment layering (built-in defaults →
//! TOML file → `MSKDNS_` environment) and `validate()`, whose errors name the offending key.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::dns::wire::name_to_wire;
use crate::names;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}{error}")]
    Parse { origin: String, error: Box<figment::Error> },
    #[error("{origin}`{key}`: {message}")]
    Invalid { origin: String, key: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl fmt::Display) -> Self {
        ConfigError::Invalid { origin: String::new(), key: key.into(), message: message.to_string() }
    }

    fn in_file(self, path: &Path) -> Self {
        let origin = format!("{}: ", path.display());
        match self {
            ConfigError::Parse { error, .. } => ConfigError::Parse { origin, error },
            ConfigError::Invalid { key, message, .. } => ConfigError::Invalid { origin, key, message },
            other => other,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub dns: DnsConfig,
    pub cache: CacheConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub clusters: Vec<ClusterConfig>,
    pub zones: Vec<ZoneConfig>,
    pub views: Vec<ViewConfig>,
    pub aws: AwsConfig,
    pub discovery: DiscoveryConfig,
    pub proxies: Vec<ProxyConfig>,
    pub reload: ReloadConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// How often the config file and zone files are checked for changes; 0: on SIGHUP only.
    pub poll_secs: u64,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig { poll_secs: 2 }
    }
}

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
    /// What a name of an MSK cluster that is not configured gets: forwarded, or NXDOMAIN.
    pub unknown_clusters: UnknownClusters,
    /// Largest UDP response we send to an EDNS client.
    pub max_udp_payload: u16,
    pub max_tcp_connections: usize,
    pub tcp_idle_timeout_ms: u64,
    /// UDP responses per second per client prefix; 0: no limit. Over it, responses are dropped
    /// but every `rate_limit_slip`-th, which is sent truncated (the client retries over TCP).
    pub rate_limit: u32,
    pub rate_limit_slip: u32,
    /// Prefix lengths that group clients for the rate limit.
    pub rate_limit_ipv4_prefix: u8,
    pub rate_limit_ipv6_prefix: u8,
    /// UDP receive threads per listen address; 0: one per CPU we may run on. All but the first
    /// run at idle priority (they use spare CPU only).
    pub udp_threads: usize,
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
            unknown_clusters: UnknownClusters::Forward,
            max_udp_payload: crate::dns::wire::DEFAULT_EDNS_PAYLOAD,
            max_tcp_connections: 1024,
            tcp_idle_timeout_ms: 10_000,
            udp_threads: 0,
            rate_limit: 0,
            rate_limit_slip: 2,
            rate_limit_ipv4_prefix: 24,
            rate_limit_ipv6_prefix: 56,
        }
    }
}

/// Loopback, the RFC 1918 ranges, CGNAT space (RFC 6598) and IPv6 ULA and link-local.
fn default_allow() -> Vec<IpNet> {
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

/// An upstream resolver: `ip` or `ip:port` (`[v6]:port`), port 53 by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream(pub SocketAddr);

impl FromStr for Upstream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Upstream(sa));
        }
        s.parse::<IpAddr>()
            .map(|ip| Upstream(SocketAddr::new(ip, 53)))
            .map_err(|_| format!("`{s}` is neither an IP address nor ip:port"))
    }
}

impl Serialize for Upstream {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
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
    /// Entries kept at most (least recently and frequently used go first).
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
            max_entries: 100_000,
            min_ttl: 0,
            max_ttl: 86_400,
            max_negative_ttl: 3_600,
            serve_stale_secs: 3_600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// HTTP: /metrics, /healthz, /readyz.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 9153) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `mskdns=debug`; RUST_LOG wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into() }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster's bootstrap name (serverless: its first label carries the cluster id), or for
    /// a provisioned cluster any of its broker names (`b-<n>.<name>.<id>.c<N>.kafka.<region>…`).
    pub bootstrap: String,
    /// Target: fixed addresses answered for the bootstrap name and every broker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    /// Target: a VPC endpoint whose network interfaces' private addresses are read from EC2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_endpoint: Option<String>,
    /// Target: resolvers in the cluster's own VPC, asked for this cluster's names only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward: Vec<Upstream>,
    /// Target: the Kafka proxy's addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy: Vec<IpAddr>,
    /// Provisioned clusters: addresses per broker number (`"1" = ["10.0.0.1"]`); brokers not
    /// listed get the cluster's target.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub brokers: std::collections::BTreeMap<String, Vec<IpAddr>>,
    #[serde(default = "default_cluster_ttl")]
    pub ttl: u32,
    /// Where the entry came from when it was not written in the file (discovery: the ARN).
    #[serde(skip)]
    pub source: Option<String>,
}

/// A view: the cluster map some clients see, chosen by the listener a query arrived on or by
/// the client's network. It inherits the top-level clusters; its own entries override by cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    pub name: String,
    /// Client networks that get this view.
    #[serde(default)]
    pub clients: Vec<IpNet>,
    /// `dns.listen` entries (as written there) whose queries get this view, whoever sends them.
    #[serde(default)]
    pub listeners: Vec<SocketAddr>,
    /// The clients' availability zone (name like `us-east-1a` or id like `use1-az4`).
    #[serde(default)]
    pub az: Option<String>,
    /// Or the clients' subnet, whose AZ is read from EC2.
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub az_affinity: AzAffinity,
    #[serde(default)]
    pub clusters: Vec<ClusterConfig>,
}

/// How VPC endpoint addresses are ordered for a client whose AZ is known.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AzAffinity {
    /// All addresses, in EC2's order.
    #[default]
    Off,
    /// The client's AZ first, then the others.
    Prefer,
    /// Only the client's AZ (all of them if the endpoint has none there).
    Only,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// How often VPC endpoint addresses and subnet AZs are read from EC2.
    pub refresh_secs: u64,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig { refresh_secs: 60 }
    }
}

/// A Kafka-aware proxy: clients bootstrap from `listen`; every upstream broker gets its own port
/// from `broker_ports` on `advertise_host`, and responses are rewritten to name those.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The bootstrap listener (port 0 allowed: the bound port is printed).
    pub listen: SocketAddr,
    /// The cluster's bootstrap `host:port`.
    pub upstream: String,
    /// The host clients are told to connect to for every broker.
    pub advertise_host: String,
    /// `first-last`: one port per upstream broker, allocated as brokers appear.
    pub broker_ports: PortRange,
    /// Where the broker listeners bind; default: `listen`'s address.
    #[serde(default)]
    pub broker_bind: Option<IpAddr>,
    /// The node id → port map, kept across restarts so clients' cached metadata stays valid.
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

/// Clusters found through cloud APIs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// `[discovery.aws]`: MSK clusters found with ListClustersV2 and GetBootstrapBrokers.
    pub aws: Option<AwsDiscoveryConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AwsDiscoveryConfig {
    /// Regions searched; empty: the SDK's region (AWS_REGION, the profile, IMDS).
    pub regions: Vec<String>,
    /// Accounts reached by assuming a role; empty: the default credentials' own account only.
    pub accounts: Vec<AwsAccountConfig>,
    /// Seconds between refreshes, each spread by ±`jitter` (a fraction) so fleets do not align.
    pub refresh_secs: u64,
    pub jitter: f64,
    /// After a failed refresh the next try comes sooner, doubling from 1 s up to this cap.
    pub max_backoff_secs: u64,
    /// A cluster that AWS no longer lists is still answered this long (a refresh that fails
    /// never removes anything).
    pub grace_secs: u64,
    /// Clusters carrying this tag key are served; with `tag_value`, only those with that value.
    pub tag: String,
    pub tag_value: Option<String>,
    /// The tag whose value is a cluster's target: `vpce-…`, `addresses=IP IP`,
    /// `forward=IP[:port] …` or `proxy=IP …` (AWS tag values allow no commas).
    pub target_tag: String,
    /// The target of a selected cluster without a target tag (accounts may set their own).
    pub default_target: Option<String>,
    /// TTL of the answers for discovered clusters.
    pub ttl: u32,
    /// Where the last known good result is kept (`discovery-aws.json`) and read at start;
    /// default: systemd's `$STATE_DIRECTORY`; none: no snapshot.
    pub state_dir: Option<PathBuf>,
}

impl Default for AwsDiscoveryConfig {
    fn default() -> Self {
        AwsDiscoveryConfig {
            regions: Vec::new(),
            accounts: Vec::new(),
            refresh_secs: 300,
            jitter: 0.1,
            max_backoff_secs: 300,
            grace_secs: 3600,
            tag: "mskdns".into(),
            tag_value: None,
            target_tag: "mskdns:target".into(),
            default_target: None,
            ttl: default_cluster_ttl(),
            state_dir: None,
        }
    }
}

impl AwsDiscoveryConfig {
    pub fn state_dir(&self) -> Option<PathBuf> {
        self.state_dir.clone().or_else(|| {
            let dirs = std::env::var_os("STATE_DIRECTORY")?;
            // systemd may pass several, separated by colons: the first is ours.
            std::env::split_paths(&dirs).next()
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AwsAccountConfig {
    /// The role assumed (STS AssumeRole) with the default credentials; none: those credentials.
    pub role_arn: Option<String>,
    pub external_id: Option<String>,
    /// Overrides `discovery.aws.regions` for this account.
    pub regions: Vec<String>,
    /// Overrides `discovery.aws.default_target` for this account's clusters.
    pub default_target: Option<String>,
}

/// A cluster's target as written in a tag or `default_target`.
pub fn parse_target(text: &str) -> Result<ClusterConfig, String> {
    let text = text.trim();
    let mut c = ClusterConfig {
        bootstrap: String::new(),
        addresses: Vec::new(),
        vpc_endpoint: None,
        forward: Vec::new(),
        proxy: Vec::new(),
        brokers: Default::default(),
        ttl: default_cluster_ttl(),
        source: None,
    };
    if text.starts_with("vpce-") && !text.contains(char::is_whitespace) {
        c.vpc_endpoint = Some(text.to_owned());
        return Ok(c);
    }
    let (kind, rest) = text.split_once('=').ok_or_else(|| {
        format!("`{text}` is not a target: vpce-…, addresses=IP …, forward=IP[:port] … or proxy=IP …")
    })?;
    let items: Vec<&str> = rest.split_whitespace().collect();
    if items.is_empty() {
        return Err(format!("`{text}`: no address after `{kind}=`"));
    }
    let ips = || -> Result<Vec<IpAddr>, String> {
        items.iter().map(|i| i.parse().map_err(|_| format!("`{i}` is not an IP address"))).collect()
    };
    match kind.trim() {
        "addresses" => c.addresses = ips()?,
        "proxy" => c.proxy = ips()?,
        "forward" => c.forward = items.iter().map(|i| i.parse()).collect::<Result<_, _>>()?,
        other => return Err(format!("`{other}` is not a target kind (addresses, forward, proxy, or a vpce-… id)")),
    }
    Ok(c)
}

fn default_cluster_ttl() -> u32 {
    60
}

/// A zone file whose records are answered authoritatively.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// RFC 1035 master file; relative paths are taken from the config file's folder.
    pub file: PathBuf,
    /// The origin when the file has no `$ORIGIN`.
    #[serde(default)]
    pub origin: Option<String>,
}

impl Config {
    /// Built-in defaults, then the TOML file (if any), then `MSKDNS_` variables
    /// (`MSKDNS_DNS__LISTEN='["127.0.0.1:0"]'`: `__` separates nesting).
    /// Variables that name no section (`MSKDNS_BIN` of the bench harness, say) are not config.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        const SECTIONS: [&str; 11] =
            ["dns", "cache", "admin", "log", "clusters", "zones", "views", "aws", "discovery", "proxies", "reload"];
        let env = Env::prefixed("MSKDNS_")
            .filter(|k| {
                SECTIONS
                    .iter()
                    .any(|s| k.as_str().split("__").next().is_some_and(|first| first.eq_ignore_ascii_case(s)))
            })
            .split("__");
        Self::load_with_env(path, env)
    }

    /// Built-in defaults and a TOML text, validated; no file, no environment.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|error| ConfigError::Parse { origin: String::new(), error: Box::new(error) })?;
        config.validate()?;
        Ok(config)
    }

    fn load_with_env(path: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
            fig = fig.merge(Toml::string(&text));
        }
        let origin = path.map(|p| format!("{}: ", p.display())).unwrap_or_default();
        let mut config: Config =
            fig.merge(env).extract().map_err(|error| ConfigError::Parse { origin, error: Box::new(error) })?;
        if let Some(dir) = path.and_then(Path::parent) {
            for zone in &mut config.zones {
                if zone.file.is_relative() {
                    zone.file = dir.join(&zone.file);
                }
            }
        }
        config.validate().map_err(|e| match path {
            Some(p) => e.in_file(p),
            None => e,
        })?;
        Ok(config)
    }

    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.dns;
        if d.listen.is_empty() {
            return Err(ConfigError::invalid("dns.listen", "at least one address is needed"));
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
        for (i, u) in d.upstreams.iter().enumerate() {
            if d.listen.contains(&u.0) {
                return Err(ConfigError::invalid(
                    format!("dns.upstreams[{i}]"),
                    "is one of dns.listen: that would loop",
                ));
            }
        }
        let c = &self.cache;
        if c.max_entries == 0 {
            return Err(ConfigError::invalid("cache.max_entries", "must be at least 1"));
        }
        if c.min_ttl > c.max_ttl {
            return Err(ConfigError::invalid("cache.min_ttl", "is larger than cache.max_ttl"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::invalid("log.level", format!("`{}` is not a log filter", self.log.level)));
        }
        validate_clusters("clusters", &self.clusters)?;
        let mut names = std::collections::HashSet::new();
        for (i, v) in self.views.iter().enumerate() {
            let key = |k: &str| format!("views[{i}].{k}");
            if v.name.is_empty() || !names.insert(v.name.as_str()) {
                return Err(ConfigError::invalid(key("name"), "must be non-empty and unique"));
            }
            if v.clients.is_empty() && v.listeners.is_empty() {
                return Err(ConfigError::invalid(key("clients"), "a view needs clients or listeners to select it"));
            }
            for (j, l) in v.listeners.iter().enumerate() {
                if !d.listen.contains(l) {
                    return Err(ConfigError::invalid(
                        key(&format!("listeners[{j}]")),
                        format!("{l} is not in dns.listen"),
                    ));
                }
                let other = self.views[..i].iter().find(|o| o.listeners.contains(l));
                if let Some(o) = other {
                    return Err(ConfigError::invalid(
                        key(&format!("listeners[{j}]")),
                        format!("{l} already selects view {}", o.name),
                    ));
                }
            }
            if v.az_affinity != AzAffinity::Off && v.az.is_none() && v.subnet.is_none() {
                return Err(ConfigError::invalid(key("az_affinity"), "needs the view's az or subnet"));
            }
            if v.subnet.is_some() && !cfg!(feature = "aws") {
                return Err(ConfigError::invalid(key("subnet"), "this build has no AWS support (feature `aws`)"));
            }
            if v.subnet.as_deref().is_some_and(|s| !s.starts_with("subnet-")) {
                return Err(ConfigError::invalid(key("subnet"), "must be a subnet id (subnet-…)"));
            }
            validate_clusters(&key("clusters"), &v.clusters)?;
        }
        if self.aws.refresh_secs == 0 {
            return Err(ConfigError::invalid("aws.refresh_secs", "must be at least 1"));
        }
        if let Some(d) = &self.discovery.aws {
            validate_discovery(d)?;
        }
        validate_proxies(&self.proxies)?;
        for (i, z) in self.zones.iter().enumerate() {
            if let Some(o) = &z.origin {
                name_to_wire(o).ok_or_else(|| {
                    ConfigError::invalid(format!("zones[{i}].origin"), format!("`{o}` is not a DNS name"))
                })?;
            }
        }
        Ok(())
    }

    /// The upstreams to use: the configured ones, else /etc/resolv.conf's, minus our own listeners.
    pub fn effective_upstreams(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        if !self.dns.upstreams.is_empty() {
            return Ok(self.dns.upstreams.iter().map(|u| u.0).collect());
        }
        let path = Path::new("/etc/resolv.conf");
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let found: Vec<_> =
            resolv_conf_nameservers(&text).into_iter().filter(|a| !self.dns.listen.contains(a)).collect();
        if found.is_empty() {
            return Err(ConfigError::invalid(
                "dns.upstreams",
                "is empty and /etc/resolv.conf names no usable nameserver",
            ));
        }
        Ok(found)
    }
}

/// The cluster key a bootstrap name carries: `(key bytes, provisioned?)`, or why it has none.
pub fn cluster_key(bootstrap: &str) -> Result<(Vec<u8>, bool), String> {
    let wire = name_to_wire(bootstrap).ok_or_else(|| format!("`{bootstrap}` is not a DNS name"))?;
    if let Some(m) = names::match_serverless(&wire) {
        return Ok((wire[m.key].to_vec(), false));
    }
    if let Some(m) = names::match_provisioned(&wire) {
        return Ok((wire[m.key].to_vec(), true));
    }
    Err(format!(
        "`{bootstrap}` is neither an MSK Serverless name (boot-<id>.c<N>.kafka-serverless.<region>.amazonaws.com) \
         nor a provisioned broker name (b-<n>.<name>.<id>.c<N>.kafka.<region>.amazonaws.com)"
    ))
}

fn validate_proxies(proxies: &[ProxyConfig]) -> Result<(), ConfigError> {
    for (i, p) in proxies.iter().enumerate() {
        let key = |k: &str| format!("proxies[{i}].{k}");
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
        for (j, q) in proxies.iter().enumerate().take(i) {
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

fn validate_discovery(d: &AwsDiscoveryConfig) -> Result<(), ConfigError> {
    let key = |k: &str| format!("discovery.aws.{k}");
    if !cfg!(feature = "aws") {
        return Err(ConfigError::invalid("discovery.aws", "this build has no AWS support (feature `aws`)"));
    }
    if d.refresh_secs == 0 {
        return Err(ConfigError::invalid(key("refresh_secs"), "must be at least 1"));
    }
    if !(0.0..=0.5).contains(&d.jitter) {
        return Err(ConfigError::invalid(key("jitter"), "must be a fraction between 0 and 0.5"));
    }
    if d.max_backoff_secs == 0 {
        return Err(ConfigError::invalid(key("max_backoff_secs"), "must be at least 1"));
    }
    if d.tag.is_empty() {
        return Err(ConfigError::invalid(key("tag"), "must name a tag key"));
    }
    if d.target_tag.is_empty() {
        return Err(ConfigError::invalid(key("target_tag"), "must name a tag key"));
    }
    let check_target = |at: String, t: &Option<String>| match t {
        Some(t) => parse_target(t).map(drop).map_err(|m| ConfigError::invalid(at, m)),
        None => Ok(()),
    };
    check_target(key("default_target"), &d.default_target)?;
    for r in &d.regions {
        if r.is_empty() || !r.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            return Err(ConfigError::invalid(key("regions"), format!("`{r}` is not a region name")));
        }
    }
    for (i, a) in d.accounts.iter().enumerate() {
        let at = |k: &str| format!("discovery.aws.accounts[{i}].{k}");
        check_target(at("default_target"), &a.default_target)?;
        if let Some(r) = &a.role_arn
            && !(r.starts_with("arn:") && r.contains(":role/"))
        {
            return Err(ConfigError::invalid(at("role_arn"), format!("`{r}` is not an IAM role ARN")));
        }
        if a.external_id.is_some() && a.role_arn.is_none() {
            return Err(ConfigError::invalid(at("external_id"), "needs role_arn"));
        }
    }
    Ok(())
}

fn validate_clusters(at: &str, clusters: &[ClusterConfig]) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashMap::new();
    for (i, cl) in clusters.iter().enumerate() {
        let key = |k: &str| format!("{at}[{i}].{k}");
        let (ck, provisioned) = cluster_key(&cl.bootstrap).map_err(|m| ConfigError::invalid(key("bootstrap"), m))?;
        if let Some(j) = seen.insert(ck, i) {
            return Err(ConfigError::invalid(key("bootstrap"), format!("names the same cluster as {at}[{j}]")));
        }
        let targets =
            [!cl.addresses.is_empty(), cl.vpc_endpoint.is_some(), !cl.forward.is_empty(), !cl.proxy.is_empty()];
        match targets.iter().filter(|t| **t).count() {
            0 if provisioned && !cl.brokers.is_empty() => {}
            0 => {
                return Err(ConfigError::invalid(
                    key("addresses"),
                    "a cluster needs one target: addresses, vpc_endpoint, forward or proxy",
                ));
            }
            1 => {}
            _ => {
                return Err(ConfigError::invalid(
                    key("addresses"),
                    "give only one of addresses, vpc_endpoint, forward, proxy",
                ));
            }
        }
        if cl.vpc_endpoint.is_some() && !cfg!(feature = "aws") {
            return Err(ConfigError::invalid(key("vpc_endpoint"), "this build has no AWS support (feature `aws`)"));
        }
        if let Some(e) = &cl.vpc_endpoint
            && !e.starts_with("vpce-")
        {
            return Err(ConfigError::invalid(key("vpc_endpoint"), format!("`{e}` is not a VPC endpoint id (vpce-…)")));
        }
        if !cl.brokers.is_empty() && !provisioned {
            return Err(ConfigError::invalid(key("brokers"), "per-broker addresses are for provisioned clusters"));
        }
        for (b, addrs) in &cl.brokers {
            if b.parse::<u64>().is_err() || addrs.is_empty() {
                return Err(ConfigError::invalid(
                    key(&format!("brokers.{b}")),
                    "keys are broker numbers, values non-empty address lists",
                ));
            }
        }
        if cl.ttl > 604_800 {
            return Err(ConfigError::invalid(key("ttl"), "must be at most 604800 (one week)"));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("mskdns-cfg-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let r = Config::load_with_env(Some(&path), Env::prefixed("MSKDNS_TEST_NEVER_SET_"));
        std::fs::remove_dir_all(&dir).ok();
        r
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.dns.listen, vec!["127.0.0.1:5353".parse().unwrap()]);
        assert!(c.dns.allow.iter().any(|n| n.contains(&"10.1.2.3".parse::<IpAddr>().unwrap())));
        assert!(!c.dns.allow.iter().any(|n| n.contains(&"8.8.8.8".parse::<IpAddr>().unwrap())));
    }

    #[test]
    fn the_design_example_parses() {
        let c = load_str(
            r#"
            [dns]
            listen = ["127.0.0.1:5353"]
            upstreams = ["10.0.0.2:53", "10.0.0.3"]
            allow = ["10.0.0.0/8"]
            [admin]
            listen = "127.0.0.1:9153"
            [[clusters]]
            bootstrap = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
            addresses = ["10.1.0.10", "10.1.1.10"]
            ttl = 60
            "#,
        )
        .unwrap();
        assert_eq!(c.dns.upstreams[1].0, "10.0.0.3:53".parse().unwrap());
        assert_eq!(c.clusters[0].addresses.len(), 2);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[dns]\nlisten = [\"nonsense\"]", "dns.listen"),
            ("[dns]\nupstreams = [\"x.y\"]", "dns.upstreams"),
            ("[dns]\nallow = [\"10.0.0.0/99\"]", "dns.allow"),
            ("[dns]\nbogus = 1", "bogus"),
            ("[[clusters]]\nbootstrap = \"example.com\"\naddresses = [\"10.0.0.1\"]", "clusters[0].bootstrap"),
            (
                "[[clusters]]\nbootstrap = \"boot-a.c1.kafka-serverless.us-east-1.amazonaws.com\"\naddresses = []",
                "clusters[0].addresses",
            ),
            (
                "[[clusters]]\nbootstrap = \"boot-a.c1.kafka-serverless.us-east-1.amazonaws.com\"\naddresses = [\"10.0.0.300\"]",
                "clusters",
            ),
            ("[cache]\nmin_ttl = 10\nmax_ttl = 5", "cache.min_ttl"),
            (
                "[[clusters]]\nbootstrap = \"boot-a.c1.kafka-serverless.us-east-1.amazonaws.com\"\naddresses = [\"10.0.0.1\"]\n[[clusters]]\nbootstrap = \"B7-A.c1.kafka-serverless.us-east-1.amazonaws.com\"\naddresses = [\"10.0.0.2\"]",
                "clusters[1].bootstrap",
            ),
        ];
        for (toml, key) in cases {
            let err = load_str(toml).unwrap_err().to_string();
            assert!(err.contains(key), "`{toml}` gave `{err}`, which does not name {key}");
            assert!(err.contains("c.toml"), "{err} does not name the file");
        }
    }

    #[test]
    fn proxy_tls_keys_come_in_pairs_and_need_upstream_tls() {
        let base = "[[proxies]]\nlisten = \"127.0.0.1:9098\"\nupstream = \"b:9098\"\nadvertise_host = \"p\"\nbroker_ports = \"9100-9109\"\n";
        let cases = [
            ("tls_cert = \"c.pem\"", "proxies[0].tls_key"),
            ("tls_key = \"k.pem\"", "proxies[0].tls_cert"),
            ("upstream_tls_cert = \"c.pem\"", "proxies[0].upstream_tls_key"),
            ("upstream_tls_key = \"k.pem\"", "proxies[0].upstream_tls_cert"),
            ("upstream_tls = false\nupstream_ca_file = \"ca.pem\"", "proxies[0].upstream_ca_file"),
            (
                "upstream_tls = false\nupstream_tls_cert = \"c.pem\"\nupstream_tls_key = \"k.pem\"",
                "proxies[0].upstream_tls_cert",
            ),
            ("handshake_timeout_ms = 0", "proxies[0].handshake_timeout_ms"),
        ];
        for (extra, key) in cases {
            let err = load_str(&format!("{base}{extra}\n")).unwrap_err().to_string();
            assert!(err.contains(key), "`{extra}` gave `{err}`, which does not name {key}");
        }
        let c = load_str(base).unwrap();
        assert!(c.proxies[0].upstream_tls, "TLS towards brokers is the default");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own error type
    fn environment_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[dns]\nlisten = [\"127.0.0.1:1\"]\n")?;
            jail.set_env("MSKDNS_DNS__LISTEN", "[\"127.0.0.1:2\"]");
            jail.set_env("MSKDNS_CACHE__MAX_ENTRIES", "7");
            jail.set_env("MSKDNS_BIN", "/not/config");
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.dns.listen, vec!["127.0.0.1:2".parse().unwrap()]);
            assert_eq!(c.cache.max_entries, 7);
            Ok(())
        });
    }

    #[test]
    fn resolv_conf() {
        let t = "# c\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nsearch x\nnameserver bogus\n";
        assert_eq!(resolv_conf_nameservers(t), vec!["10.0.0.2:53".parse().unwrap(), "[fe80::1]:53".parse().unwrap()]);
    }
}
