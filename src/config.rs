//! Configuration: serde structs with their defaults, figment layering (built-in defaults →
//! TOML file → `MSKDNS_` environment) and `validate()`, whose errors name the offending key.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

mod clusters;
mod discovery;
mod dns;
mod proxy;
mod querylog;

pub use clusters::*;
pub use discovery::*;
pub use dns::*;
pub use proxy::*;
pub use querylog::*;

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
    pub proxies: Vec<ProxyBlock>,
    pub reload: ReloadConfig,
    /// Absent: no query log.
    pub query_log: Option<QueryLogConfig>,
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
        let config = Self::parse_toml(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses without [`Config::validate`]: for the fuzz targets, whose build has no AWS
    /// support but whose engine answers VPC endpoint targets all the same.
    #[doc(hidden)]
    pub fn parse_toml(text: &str) -> Result<Config, ConfigError> {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|error| ConfigError::Parse { origin: String::new(), error: Box::new(error) })
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
        dns::validate(&self.dns, &self.cache)?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::invalid("log.level", format!("`{}` is not a log filter", self.log.level)));
        }
        clusters::validate_clusters("clusters", &self.clusters)?;
        clusters::validate_views(&self.views, &self.dns.all_listeners())?;
        if self.aws.refresh_secs == 0 {
            return Err(ConfigError::invalid("aws.refresh_secs", "must be at least 1"));
        }
        if let Some(d) = &self.discovery.aws {
            discovery::validate_discovery(d)?;
        }
        discovery::validate_fleet(&self.discovery)?;
        proxy::validate_proxies(&self.proxies)?;
        if let Some(q) = &self.query_log {
            querylog::validate_query_log(q)?;
        }
        clusters::validate_zones(&self.zones)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

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
    fn fleet_settings_name_the_bad_key() {
        let err = |text: &str| match Config::from_toml(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        let ok = Config::from_toml("[discovery.snapshot]\nurl = \"s3://acme-mskdns/a/b.json\"\n").unwrap();
        let s = ok.discovery.snapshot.unwrap();
        assert_eq!((s.poll_secs, s.max_age_secs, s.max_bytes), (30, 900, 4 << 20));
        assert_eq!(err("[discovery.snapshot]\nurl = \"https://x/y\"\n"), "discovery.snapshot.url");
        assert_eq!(err("[discovery.snapshot]\nurl = \"s3://Bad_Bucket/k\"\n"), "discovery.snapshot.url");
        assert_eq!(err("[discovery.snapshot]\nurl = \"s3://bucket\"\n"), "discovery.snapshot.url");
        assert_eq!(
            err("[discovery.snapshot]\nurl = \"s3://bucket/k\"\npoll_secs = 0\n"),
            "discovery.snapshot.poll_secs"
        );
        assert_eq!(
            err("[discovery.snapshot]\nurl = \"s3://bucket/k\"\nmax_age_secs = 5\n"),
            "discovery.snapshot.max_age_secs"
        );
        // Publishing needs something to publish.
        assert_eq!(err("[discovery.publish]\nurl = \"s3://bucket/k\"\n"), "discovery.publish");
        let both = "[discovery.aws]\n[discovery.publish]\nurl = \"s3://bucket/k\"\n[discovery.snapshot]\nurl = \"s3://bucket/k\"\n";
        assert_eq!(err(both), "discovery.snapshot.url");
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
        assert_eq!(c.dns.upstreams[1].1, crate::config::UpstreamKind::Plain);
        assert_eq!(c.clusters[0].addresses.len(), 2);
        let v =
            load_str("[dns]\nupstreams = [\"vpc:10.0.0.2\", \"vpc:[fd00::2]:53\"]\nupstream_max_pps = 500").unwrap();
        assert_eq!(v.dns.upstreams[0].0, "10.0.0.2:53".parse().unwrap());
        assert_eq!(v.dns.upstreams[0].1, crate::config::UpstreamKind::VpcResolver);
        assert_eq!(v.dns.upstreams[1].1, crate::config::UpstreamKind::VpcResolver);
        assert_eq!(v.dns.upstream_max_pps, Some(500));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[dns]\nlisten = [\"nonsense\"]", "dns.listen"),
            ("[dns]\nupstreams = [\"x.y\"]", "dns.upstreams"),
            ("[dns]\nupstreams = [\"vpc:x.y\"]", "dns.upstreams"),
            ("[dns]\nupstream_max_pps = -1", "dns.upstream_max_pps"),
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
            ("[dns]\ncookie_secret = \"e5e973e5a6b2a43f48e7dc849e37bfc\"", "dns.cookie_secret"),
            ("[dns]\ncookie_secret = \"e5e973e5a6b2a43f48e7dc849e37bfcg\"", "dns.cookie_secret"),
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
    fn the_cookie_secret_is_read_and_never_shown() {
        let c = load_str("[dns]\ncookie_secret = \"E5E973E5a6b2a43f48e7dc849e37bfcf\"\n").unwrap();
        let secret = c.dns.cookie_secret.unwrap();
        assert_eq!(secret.0[..3], [0xe5, 0xe9, 0x73]);
        let shown = format!("{c:?}");
        assert!(!shown.to_ascii_lowercase().contains("e5e973") && shown.contains("CookieSecret(<hidden>)"), "{shown}");
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
        assert!(c.proxies[0].ports().unwrap().upstream_tls, "TLS towards brokers is the default");
    }

    #[test]
    fn proxy_modes() {
        let sni = "[[proxies]]\nmode = \"sni\"\nlisten = [\"127.0.0.1:9098\", \"127.0.0.1:9094\"]\n";
        let c = load_str(sni).unwrap();
        let s = c.proxies[0].sni().unwrap();
        assert_eq!(s.listen.addrs().len(), 2);
        assert_eq!(s.client_hello_max_bytes, 16384);
        let one = load_str("[[proxies]]\nmode = \"sni\"\nlisten = \"127.0.0.1:9098\"\n").unwrap();
        assert_eq!(one.proxies[0].sni().unwrap().listen.addrs().len(), 1);
        let ports = "[[proxies]]\nlisten = \"127.0.0.1:9098\"\nupstream = \"b:9098\"\nadvertise_host = \"p\"\nbroker_ports = \"9100-9109\"\n";
        let p = load_str(&format!("{ports}mode = \"ports\"\nport_assignment = \"node_id\"\n")).unwrap();
        assert_eq!(p.proxies[0].ports().unwrap().port_assignment, PortAssignment::NodeId);
        let cases = [
            (format!("{sni}upstream = \"b:9098\"\n"), "upstream"),
            ("[[proxies]]\nmode = \"tunnel\"\nlisten = \"127.0.0.1:1\"\n".to_string(), "mode"),
            (format!("{sni}allow_endpoints = [\"vpce-0abc\"]\n"), "proxies[0].allow_endpoints"),
            (format!("{sni}proxy_protocol = true\nallow_endpoints = [\"eni-0abc\"]\n"), "proxies[0].allow_endpoints"),
            (format!("{sni}client_hello_max_bytes = 10\n"), "proxies[0].client_hello_max_bytes"),
            (format!("{sni}connect_timeout_ms = 0\n"), "proxies[0].connect_timeout_ms"),
            ("[[proxies]]\nmode = \"sni\"\nlisten = []\n".to_string(), "proxies[0].listen"),
            (format!("{ports}advertise_host = \"p\"\n"), "advertise_host"),
            (format!("{ports}allow_endpoints = [\"vpce-1\"]\n"), "proxies[0].allow_endpoints"),
            (format!("{sni}proxy_protocol_from = [\"10.0.0.0/16\"]\n"), "proxies[0].proxy_protocol_from"),
            (format!("{ports}proxy_protocol_from = [\"10.0.0.0/16\"]\n"), "proxies[0].proxy_protocol_from"),
            (format!("{sni}proxy_protocol = true\nproxy_protocol_from = [\"10.0.0\"]\n"), "proxy_protocol_from"),
            (format!("{ports}client_hello_max_bytes = 1000\n"), "client_hello_max_bytes"),
        ];
        for (text, key) in cases {
            let err = load_str(&text).unwrap_err().to_string();
            assert!(err.contains(key), "`{text}` gave `{err}`, which does not name {key}");
        }
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
