//! `[[clusters]]`, `[[views]]` and `[[zones]]`: what is answered, for whom.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::dns::Upstream;
use crate::names::{cluster_key, name_to_wire};

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

pub(super) fn default_cluster_ttl() -> u32 {
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

pub(crate) fn validate_clusters(at: &str, clusters: &[ClusterConfig]) -> Result<(), ConfigError> {
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

/// `[[views]]`: unique names, each selected by clients or by listeners of `dns.listen`.
pub(super) fn validate_views(views: &[ViewConfig], listen: &[SocketAddr]) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    for (i, v) in views.iter().enumerate() {
        let key = |k: &str| format!("views[{i}].{k}");
        if v.name.is_empty() || !names.insert(v.name.as_str()) {
            return Err(ConfigError::invalid(key("name"), "must be non-empty and unique"));
        }
        if v.clients.is_empty() && v.listeners.is_empty() {
            return Err(ConfigError::invalid(key("clients"), "a view needs clients or listeners to select it"));
        }
        for (j, l) in v.listeners.iter().enumerate() {
            if !listen.contains(l) {
                return Err(ConfigError::invalid(
                    key(&format!("listeners[{j}]")),
                    format!("{l} is not in dns.listen, dns.listen_dot or dns.listen_doh"),
                ));
            }
            let other = views[..i].iter().find(|o| o.listeners.contains(l));
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
    Ok(())
}

/// `[[zones]]`: an origin, when given, is a DNS name.
pub(super) fn validate_zones(zones: &[ZoneConfig]) -> Result<(), ConfigError> {
    for (i, z) in zones.iter().enumerate() {
        if let Some(o) = &z.origin {
            name_to_wire(o).ok_or_else(|| {
                ConfigError::invalid(format!("zones[{i}].origin"), format!("`{o}` is not a DNS name"))
            })?;
        }
    }
    Ok(())
}

/// The VPC endpoint addresses and subnet AZs a discovery source knows itself (a fleet snapshot
/// carries its publisher's), so that EC2 is not asked for them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointState {
    pub endpoints: BTreeMap<String, Vec<EndpointAddr>>,
    pub subnets: BTreeMap<String, Vec<String>>,
}

/// One private address of a VPC endpoint and the AZ of its network interface: what a
/// `vpc_endpoint` target stands for, as EC2 lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointAddr {
    pub ip: IpAddr,
    pub az: String,
    pub az_id: Option<String>,
}
