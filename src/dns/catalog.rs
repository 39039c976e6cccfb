//! What mskdns answers itself: configured MSK clusters and static zone files, prepared at load
//! time so that answering is a hash lookup and a few byte copies.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use hickory_proto::rr::{Name, RData, Record};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder, NameEncoding};
use hickory_proto::serialize::txt::Parser;
use ipnet::IpNet;

use super::forward::{Forwarder, Settings};
use super::wire::{self, Query, Response, Section};
use crate::config::{AzAffinity, ClusterConfig, Config, UnknownClusters, ZoneConfig};
use crate::names;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("zones[{index}] {path}: {message}")]
    Zone { index: usize, path: PathBuf, message: String },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Fixed addresses, by family.
#[derive(Debug, Default)]
pub struct Addrs {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

impl Addrs {
    fn new(ips: &[IpAddr]) -> Self {
        let mut a = Addrs::default();
        for ip in ips {
            match ip {
                IpAddr::V4(v) => a.v4.push(*v),
                IpAddr::V6(v) => a.v6.push(*v),
            }
        }
        a
    }

    fn describe(&self) -> String {
        let all: Vec<String> =
            self.v4.iter().map(|a| a.to_string()).chain(self.v6.iter().map(|a| a.to_string())).collect();
        all.join(", ")
    }
}

/// One private address of a VPC endpoint and the AZ of its network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointAddr {
    pub ip: IpAddr,
    pub az: String,
    pub az_id: Option<String>,
}

/// A VPC endpoint's addresses as last read from EC2 (kept when a refresh fails).
#[derive(Debug)]
pub struct Endpoint {
    pub id: String,
    addrs: ArcSwap<Vec<EndpointAddr>>,
    loaded: AtomicBool,
}

impl Endpoint {
    pub fn set(&self, addrs: Vec<EndpointAddr>) {
        self.addrs.store(Arc::new(addrs));
        self.loaded.store(true, Ordering::Release);
    }

    pub fn get(&self) -> Option<Arc<Vec<EndpointAddr>>> {
        self.loaded.load(Ordering::Acquire).then(|| self.addrs.load_full())
    }
}

/// What a cluster's names resolve to.
pub enum Target {
    Addresses(Addrs),
    Proxy(Addrs),
    Endpoint(Arc<Endpoint>),
    Forward(Arc<Forwarder>),
}

/// One MSK cluster's answer material.
pub struct Cluster {
    /// `<id>.c<N>.<region>` (provisioned: `<name>.<id>.c<N>.<region>`): metric label, logs.
    pub label: String,
    /// Where it was configured, e.g. `clusters[0]` or `views[1].clusters[0]`.
    pub origin: String,
    pub target: Target,
    /// Provisioned clusters: per-broker addresses by broker number.
    pub brokers: HashMap<u64, Addrs>,
    pub ttl: u32,
    answers: metrics::Counter,
}

impl Cluster {
    pub fn count_answer(&self) {
        self.answers.increment(1);
    }
}

/// A cluster map and the client AZ it is answered for.
pub struct View {
    pub name: String,
    clusters: HashMap<Box<[u8]>, Arc<Cluster>>,
    /// The clients' AZ as names and/or ids (`us-east-1a`, `use1-az4`): configured, or read
    /// from EC2 for `subnet`. AZ names differ between accounts, ids do not; EC2 may give either.
    az: ArcSwapOption<Vec<String>>,
    pub subnet: Option<String>,
    affinity: AzAffinity,
    /// Why a client gets this view, for `explain`.
    selector: String,
}

impl View {
    pub fn set_az(&self, az: Vec<String>) {
        self.az.store((!az.is_empty()).then(|| Arc::new(az)));
    }
}

/// A zone loaded from a master file, by lowercase wire name.
#[derive(Debug)]
struct Zone {
    origin: Vec<u8>,
    /// The SOA's type..rdata with its TTL set to the negative-caching TTL (RFC 2308 section 5).
    soa_tail: Option<RecordTail>,
    /// Names with their records as (type, tail); empty non-terminals map to nothing.
    names: HashMap<Box<[u8]>, Vec<(u16, RecordTail)>>,
}

/// A record's type, class, TTL, RDLENGTH and RDATA: everything after its owner name.
type RecordTail = Vec<u8>;

/// What the catalog did with a query.
pub enum Local<'c> {
    /// Answered from a configured cluster.
    Cluster,
    /// Answered from a zone file.
    Zone,
    /// An MSK name of an unconfigured cluster answered NXDOMAIN (`dns.unknown_clusters`).
    UnknownCluster,
    /// A cluster whose VPC endpoint addresses are not known yet: SERVFAIL was written.
    Unavailable,
    /// To be forwarded: the default upstreams, or a cluster's own resolvers (that cluster given).
    Forward(&'c Forwarder, Option<&'c Cluster>),
}

pub struct Catalog {
    /// `views[0]` is the default view: the top-level clusters.
    views: Vec<View>,
    /// View index per `dns.listen` entry (0: none chosen by listener).
    by_listener: Vec<usize>,
    by_client: Vec<(IpNet, usize)>,
    zones: Vec<Zone>,
    unknown: UnknownClusters,
    serial: u32,
    default_forwarder: Arc<Forwarder>,
    endpoints: HashMap<String, Arc<Endpoint>>,
}

impl Catalog {
    pub fn from_config(config: &Config) -> Result<Self, CatalogError> {
        Self::rebuild(config, None)
    }

    /// Builds from `config`, keeping from `previous` what has not changed: the default
    /// forwarder (and so the cache) when its settings are equal, and VPC endpoints by id (with
    /// the addresses already read from EC2).
    pub fn rebuild(config: &Config, previous: Option<&Catalog>) -> Result<Self, CatalogError> {
        let timeout = Duration::from_millis(config.dns.upstream_timeout_ms);
        let settings =
            Settings { addrs: config.effective_upstreams()?, attempt_timeout: timeout, cache: config.cache.clone() };
        let default_forwarder = match previous {
            Some(p) if p.default_forwarder.settings == settings => p.default_forwarder.clone(),
            _ => Arc::new(Forwarder::new(settings)),
        };
        let mut endpoints: HashMap<String, Arc<Endpoint>> = HashMap::new();
        if let Some(p) = previous {
            // Only those still used are kept: see the retain below.
            endpoints.extend(p.endpoints.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let mut build = |c: &ClusterConfig, origin: String| -> Option<(Box<[u8]>, Arc<Cluster>)> {
            cluster_entry(c, origin, &mut endpoints, timeout, config)
        };
        let top: HashMap<_, _> = config
            .clusters
            .iter()
            .enumerate()
            .filter_map(|(i, c)| build(c, c.source.clone().unwrap_or_else(|| format!("clusters[{i}]"))))
            .collect();
        let mut views = vec![View {
            name: "default".into(),
            clusters: top.clone(),
            az: ArcSwapOption::empty(),
            subnet: None,
            affinity: AzAffinity::Off,
            selector: "no view selects this client or listener".into(),
        }];
        let mut by_listener = vec![0; config.dns.listen.len()];
        let mut by_client = Vec::new();
        for (vi, v) in config.views.iter().enumerate() {
            let mut clusters = top.clone();
            for (ci, c) in v.clusters.iter().enumerate() {
                if let Some((k, cl)) = build(c, format!("views[{vi}].clusters[{ci}]")) {
                    clusters.insert(k, cl);
                }
            }
            let index = views.len();
            for l in &v.listeners {
                for (li, addr) in config.dns.listen.iter().enumerate() {
                    if addr == l {
                        by_listener[li] = index;
                    }
                }
            }
            by_client.extend(v.clients.iter().map(|n| (*n, index)));
            let mut why = Vec::new();
            if !v.listeners.is_empty() {
                why.push(format!("listeners {:?}", v.listeners));
            }
            if !v.clients.is_empty() {
                why.push(format!("clients in {:?}", v.clients.iter().map(|n| n.to_string()).collect::<Vec<_>>()));
            }
            views.push(View {
                name: v.name.clone(),
                clusters,
                az: ArcSwapOption::new(v.az.clone().map(|a| Arc::new(vec![a]))),
                subnet: v.subnet.clone(),
                affinity: v.az_affinity,
                selector: why.join(" or "),
            });
        }
        let used: std::collections::HashSet<&str> = config
            .clusters
            .iter()
            .chain(config.views.iter().flat_map(|v| &v.clusters))
            .filter_map(|c| c.vpc_endpoint.as_deref())
            .collect();
        endpoints.retain(|id, _| used.contains(id.as_str()));
        let zones = config
            .zones
            .iter()
            .enumerate()
            .map(|(index, z)| {
                load_zone(z).map_err(|message| CatalogError::Zone { index, path: z.file.clone(), message })
            })
            .collect::<Result<_, _>>()?;
        let serial =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(1);
        Ok(Catalog {
            views,
            by_listener,
            by_client,
            zones,
            unknown: config.dns.unknown_clusters,
            serial,
            default_forwarder,
            endpoints,
        })
    }

    pub fn cluster_count(&self) -> usize {
        self.views.iter().map(|v| v.clusters.len()).max().unwrap_or(0)
    }

    pub fn default_forwarder(&self) -> &Forwarder {
        &self.default_forwarder
    }

    /// Every VPC endpoint any cluster targets, once each.
    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.endpoints.values()
    }

    pub fn views(&self) -> &[View] {
        &self.views
    }

    fn view(&self, listener: usize, client: IpAddr) -> &View {
        match self.by_listener.get(listener) {
            Some(&v) if v != 0 => &self.views[v],
            _ => {
                let v = self.by_client.iter().find(|(n, _)| n.contains(&client)).map_or(0, |(_, v)| *v);
                &self.views[v]
            }
        }
    }

    /// Answers `q` (whose name, lowercased, is `lc`) when it is ours and writes the response to
    /// `out`; otherwise says which forwarder resolves it.
    #[allow(clippy::too_many_arguments)]
    pub fn answer(
        &self,
        q: &Query<'_>,
        lc: &[u8],
        listener: usize,
        client: IpAddr,
        out: &mut Vec<u8>,
        limit: usize,
        max_payload: u16,
    ) -> Local<'_> {
        let (key, apex, broker) = if let Some(m) = names::match_serverless(lc) {
            (m.key, m.apex, None)
        } else if let Some(m) = names::match_provisioned(lc) {
            (m.key, m.apex, Some(m.broker.value))
        } else {
            for zone in &self.zones {
                if let Some(apex) = suffix_offset(lc, &zone.origin) {
                    zone.answer(q, lc, apex, out).finish(q, limit, max_payload);
                    return Local::Zone;
                }
            }
            return Local::Forward(&self.default_forwarder, None);
        };
        let view = self.view(listener, client);
        let Some(cluster) = view.clusters.get(&lc[key]) else {
            if self.unknown == UnknownClusters::Nxdomain {
                let mut r = Response::new(out, q, wire::RCODE_NXDOMAIN, true);
                r.soa_at_suffix(apex, 60, self.serial);
                r.finish(q, limit, max_payload);
                return Local::UnknownCluster;
            }
            return Local::Forward(&self.default_forwarder, None);
        };
        if let (None, Target::Forward(f)) = (broker, &cluster.target) {
            return Local::Forward(f, Some(cluster));
        }
        cluster.count_answer();
        let mut r = Response::new(out, q, wire::RCODE_NOERROR, true);
        let any = match (broker.and_then(|b| cluster.brokers.get(&b)), &cluster.target) {
            (Some(addrs), _) | (None, Target::Addresses(addrs) | Target::Proxy(addrs)) => write_addrs(
                &mut r,
                q,
                addrs.v4.iter().map(|a| IpAddr::V4(*a)).chain(addrs.v6.iter().map(|a| IpAddr::V6(*a))),
                cluster.ttl,
            ),
            (None, Target::Endpoint(e)) => match e.get() {
                Some(addrs) => write_endpoint(&mut r, q, &addrs, cluster.ttl, view),
                None => {
                    Response::new(out, q, wire::RCODE_SERVFAIL, false).finish(q, limit, max_payload);
                    return Local::Unavailable;
                }
            },
            (None, Target::Forward(_)) => unreachable!("returned above"),
        };
        if !any {
            r.soa_at_suffix(apex, cluster.ttl, self.serial);
        }
        r.finish(q, limit, max_payload);
        Local::Cluster
    }

    /// Which view, cluster and target answer `name` for a client, and why.
    pub fn explain(&self, name: &str, client: IpAddr, listener: Option<usize>) -> String {
        let mut out = String::new();
        let Some(lc) = wire::name_to_wire(name) else { return format!("{name}: not a DNS name\n") };
        let fqdn = wire::wire_to_string(&lc);
        out += &format!("name:    {fqdn}\n");
        let (key, what) = if let Some(m) = names::match_serverless(&lc) {
            let role = match m.role {
                names::Role::Bootstrap => "bootstrap name".to_string(),
                names::Role::Broker(b) => format!("broker b{b}"),
            };
            (m.key.clone(), format!("MSK Serverless {role} of cluster {}", names::describe_serverless_key(&lc[m.key])))
        } else if let Some(m) = names::match_provisioned(&lc) {
            (
                m.key.clone(),
                format!("MSK provisioned broker b-{} of cluster {}", m.broker, wire::wire_to_string(&lc[m.key])),
            )
        } else {
            if let Some(z) = self.zones.iter().find(|z| suffix_offset(&lc, &z.origin).is_some()) {
                out += &format!("answer:  from the zone file for {}\n", wire::wire_to_string(&z.origin));
            } else {
                out +=
                    &format!("answer:  not an MSK name: forwarded to {:?} (cached)\n", self.default_forwarder.addrs());
            }
            return out;
        };
        out += &format!("matched: {what}\n");
        let listener_view = listener.and_then(|l| self.by_listener.get(l).copied()).filter(|v| *v != 0);
        let view = match listener_view {
            Some(v) => &self.views[v],
            None => self.view(usize::MAX, client),
        };
        let reason = if listener_view.is_some() { "chosen by the listener" } else { "chosen by the client address" };
        if view.name == "default" {
            out += &format!("view:    default ({})\n", view.selector);
        } else {
            out += &format!("view:    {} ({reason}; it is selected by {})\n", view.name, view.selector);
        }
        let Some(c) = view.clusters.get(&lc[key]) else {
            let fate = match self.unknown {
                UnknownClusters::Forward => format!("forwarded to {:?}", self.default_forwarder.addrs()),
                UnknownClusters::Nxdomain => "answered NXDOMAIN (dns.unknown_clusters = \"nxdomain\")".into(),
            };
            out += &format!("cluster: not configured in this view: {fate}\n");
            return out;
        };
        out += &format!("cluster: {} (configured at {}), ttl {}\n", c.label, c.origin, c.ttl);
        let broker = names::match_provisioned(&lc).and_then(|m| c.brokers.get(&m.broker.value));
        let target = match (broker, &c.target) {
            (Some(a), _) => format!("this broker's own addresses: {}", a.describe()),
            (None, Target::Addresses(a)) => format!("addresses {}", a.describe()),
            (None, Target::Proxy(a)) => format!("the Kafka proxy at {}", a.describe()),
            (None, Target::Forward(f)) => format!("forwarded to the cluster's own resolvers {:?} (cached)", f.addrs()),
            (None, Target::Endpoint(e)) => {
                let az = view.az.load_full().map(|a| a.join("/"));
                let now = match e.get() {
                    Some(a) => a.iter().map(|x| format!("{} ({})", x.ip, x.az)).collect::<Vec<_>>().join(", "),
                    None => "read from EC2 at run time".into(),
                };
                format!(
                    "VPC endpoint {}: {now}; AZ affinity {:?}{}",
                    e.id,
                    view.affinity,
                    az.map(|a| format!(" for clients in {a}")).unwrap_or_default()
                )
            }
        };
        out += &format!("target:  {target}\n");
        out
    }
}

fn cluster_entry(
    c: &ClusterConfig,
    origin: String,
    endpoints: &mut HashMap<String, Arc<Endpoint>>,
    timeout: Duration,
    config: &Config,
) -> Option<(Box<[u8]>, Arc<Cluster>)> {
    // validate() already proved the name parses.
    let (key, provisioned) = crate::config::cluster_key(&c.bootstrap).ok()?;
    let label = if provisioned {
        let w = wire::wire_to_string(&key);
        w.split('.').take(3).chain(w.split('.').skip(4).take(1)).collect::<Vec<_>>().join(".")
    } else {
        names::describe_serverless_key(&key)
    };
    let target = if let Some(id) = &c.vpc_endpoint {
        let e = endpoints.entry(id.clone()).or_insert_with(|| {
            Arc::new(Endpoint {
                id: id.clone(),
                addrs: ArcSwap::from_pointee(Vec::new()),
                loaded: AtomicBool::new(false),
            })
        });
        Target::Endpoint(e.clone())
    } else if !c.forward.is_empty() {
        let addrs = c.forward.iter().map(|u| u.0).collect();
        Target::Forward(Arc::new(Forwarder::new(Settings {
            addrs,
            attempt_timeout: timeout,
            cache: config.cache.clone(),
        })))
    } else if !c.proxy.is_empty() {
        Target::Proxy(Addrs::new(&c.proxy))
    } else {
        Target::Addresses(Addrs::new(&c.addresses))
    };
    let brokers = c.brokers.iter().filter_map(|(b, a)| Some((b.parse().ok()?, Addrs::new(a)))).collect();
    let answers = metrics::counter!("mskdns_cluster_answers_total", "cluster" => label.clone());
    Some((key.into(), Arc::new(Cluster { label, origin, target, brokers, ttl: c.ttl, answers })))
}

/// A/AAAA (and ANY) for the question's family; returns whether any record was written.
fn write_addrs(r: &mut Response<'_>, q: &Query<'_>, ips: impl Iterator<Item = IpAddr>, ttl: u32) -> bool {
    let mut any = false;
    for ip in ips.filter(|ip| wanted(q, ip)) {
        r.address(ip, ttl);
        any = true;
    }
    any
}

fn wanted(q: &Query<'_>, ip: &IpAddr) -> bool {
    q.qclass == wire::CLASS_IN
        && match ip {
            IpAddr::V4(_) => matches!(q.qtype, wire::TYPE_A | wire::TYPE_ANY),
            IpAddr::V6(_) => matches!(q.qtype, wire::TYPE_AAAA | wire::TYPE_ANY),
        }
}

/// A VPC endpoint's addresses, ordered or filtered by the view's AZ affinity.
fn write_endpoint(r: &mut Response<'_>, q: &Query<'_>, addrs: &[EndpointAddr], ttl: u32, view: &View) -> bool {
    let az = view.az.load();
    let same = |a: &EndpointAddr| {
        az.as_deref().is_some_and(|z| z.iter().any(|z| *z == a.az || a.az_id.as_deref() == Some(z.as_str())))
    };
    let all = || addrs.iter().map(|a| a.ip);
    match (view.affinity, az.is_some()) {
        (AzAffinity::Off, _) | (_, false) => write_addrs(r, q, all(), ttl),
        (AzAffinity::Prefer, true) => {
            let local = write_addrs(r, q, addrs.iter().filter(|a| same(a)).map(|a| a.ip), ttl);
            write_addrs(r, q, addrs.iter().filter(|a| !same(a)).map(|a| a.ip), ttl) || local
        }
        (AzAffinity::Only, true) => {
            write_addrs(r, q, addrs.iter().filter(|a| same(a)).map(|a| a.ip), ttl) || write_addrs(r, q, all(), ttl)
        }
    }
}

/// Offset in `lc` where `origin` starts on a label boundary, if `lc` is at or below it.
fn suffix_offset(lc: &[u8], origin: &[u8]) -> Option<usize> {
    if lc.len() < origin.len() || !lc.ends_with(origin) {
        return None;
    }
    let want = lc.len() - origin.len();
    let mut pos = 0;
    while pos < want {
        pos += 1 + lc[pos] as usize;
    }
    (pos == want).then_some(pos)
}

impl Zone {
    fn answer<'b>(&self, q: &Query<'_>, lc: &[u8], apex: usize, out: &'b mut Vec<u8>) -> Response<'b> {
        let Some(rrs) = self.names.get(lc) else {
            let mut r = Response::new(out, q, wire::RCODE_NXDOMAIN, true);
            self.soa(&mut r, apex);
            return r;
        };
        let mut r = Response::new(out, q, wire::RCODE_NOERROR, true);
        let cname = rrs.iter().find(|(t, _)| *t == wire::TYPE_CNAME);
        let mut any = false;
        match cname {
            Some((_, tail)) if q.qtype != wire::TYPE_CNAME => {
                r.record_at_qname(Section::Answer, tail);
                any = true;
            }
            _ => {
                for (t, tail) in rrs {
                    if *t == q.qtype || (q.qtype == wire::TYPE_ANY && *t != wire::TYPE_SOA) {
                        r.record_at_qname(Section::Answer, tail);
                        any = true;
                    }
                }
            }
        }
        if !any {
            self.soa(&mut r, apex);
        }
        r
    }

    fn soa(&self, r: &mut Response<'_>, apex: usize) {
        if let Some(tail) = &self.soa_tail {
            r.record_at_suffix(Section::Authority, apex, tail);
        }
    }
}

fn load_zone(z: &ZoneConfig) -> Result<Zone, String> {
    let text = std::fs::read_to_string(&z.file).map_err(|e| e.to_string())?;
    let origin = match &z.origin {
        Some(o) => Some(Name::from_ascii(o).map_err(|e| format!("origin: {e}"))?),
        None => None,
    };
    let (origin, sets) = Parser::new(text, Some(z.file.clone()), origin).parse().map_err(|e| e.to_string())?;
    let origin_wire = wire::name_to_wire(&origin.to_ascii()).ok_or("origin is not a DNS name")?;
    let mut zone = Zone { origin: origin_wire, soa_tail: None, names: HashMap::new() };
    for set in sets.values() {
        for rec in set.records_without_rrsigs() {
            let name = wire::name_to_wire(&rec.name.to_ascii()).ok_or("record name too long")?;
            if suffix_offset(&name, &zone.origin).is_none() {
                return Err(format!("{} is outside the zone {}", rec.name, origin));
            }
            let mut tail = encode_tail(rec)?;
            if let RData::SOA(soa) = &rec.data
                && name == zone.origin
            {
                let neg = rec.ttl.min(soa.minimum);
                wire::put32(&mut tail, 4, neg);
                zone.soa_tail = Some(tail.clone());
            }
            zone.names.entry(name.clone().into()).or_default().push((u16::from(rec.record_type()), tail));
            // Every name between a record and the origin exists (empty non-terminals: NODATA).
            let mut pos = 0;
            while pos < name.len() - zone.origin.len() {
                pos += 1 + name[pos] as usize;
                zone.names.entry(name[pos..].into()).or_default();
            }
        }
    }
    Ok(zone)
}

/// A record's bytes after its owner name, with no name compression inside RDATA.
fn encode_tail(rec: &Record) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let mut enc = BinEncoder::new(&mut buf);
    enc.set_name_encoding(NameEncoding::Uncompressed);
    rec.emit(&mut enc).map_err(|e| e.to_string())?;
    let owner_end = wire::skip_name(&buf, 0).ok_or("record did not encode")?;
    Ok(buf.split_off(owner_end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::RecordType;

    const A: &str = "boot-aaaa.c2.kafka-serverless.us-east-1.amazonaws.com";

    fn catalog(extra: &str) -> Catalog {
        let toml = format!(
            "[dns]\nupstreams = [\"127.0.0.1:1\"]\nlisten = [\"127.0.0.1:0\", \"127.0.0.2:0\"]\n{extra}\n[[clusters]]\nbootstrap = \"{A}\"\naddresses = [\"10.1.0.1\", \"10.1.0.2\"]\nttl = 30\n"
        );
        Catalog::from_config(&Config::from_toml(&toml).unwrap()).unwrap()
    }

    /// What a query gets: `None` when it is to be forwarded.
    fn ask_from(c: &Catalog, name: &str, t: RecordType, listener: usize, client: &str) -> Option<Message> {
        let mut m = Message::query();
        m.add_query(hickory_proto::op::Query::query(Name::from_ascii(name).unwrap(), t));
        let pkt = m.to_vec().unwrap();
        let q = Query::parse(&pkt).unwrap();
        let mut lc = [0; wire::MAX_NAME_LEN];
        let n = wire::lowercase_name(q.name(), &mut lc);
        let mut out = Vec::new();
        match c.answer(&q, &lc[..n], listener, client.parse().unwrap(), &mut out, 1232, 1232) {
            Local::Forward(..) => None,
            _ => Some(Message::from_vec(&out).unwrap()),
        }
    }

    fn ask(c: &Catalog, name: &str, t: RecordType) -> Option<Message> {
        ask_from(c, name, t, 0, "127.0.0.1")
    }

    fn ips(m: &Message) -> Vec<String> {
        m.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn cluster_answers_by_family() {
        let c = catalog("");
        let m = ask(&c, "B0437-AAAA.c2.kafka-serverless.us-east-1.amazonaws.com.", RecordType::A).unwrap();
        assert_eq!(ips(&m), ["10.1.0.1", "10.1.0.2"]);
        assert_eq!(m.answers[0].ttl, 30);
        let m = ask(&c, A, RecordType::AAAA).unwrap();
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        assert!(ask(&c, "boot-bbbb.c2.kafka-serverless.us-east-1.amazonaws.com.", RecordType::A).is_none());
    }

    #[test]
    fn unknown_clusters_can_be_nxdomain() {
        let c = catalog("unknown_clusters = \"nxdomain\"");
        let m = ask(&c, "boot-bbbb.c2.kafka-serverless.us-east-1.amazonaws.com.", RecordType::A).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn views_override_by_client_and_listener() {
        let c = catalog(&format!(
            "[[views]]\nname = \"vpc-b\"\nclients = [\"10.2.0.0/16\"]\n[[views.clusters]]\nbootstrap = \"{A}\"\naddresses = [\"10.2.0.9\"]\n\
             [[views]]\nname = \"port-c\"\nlisteners = [\"127.0.0.2:0\"]\n[[views.clusters]]\nbootstrap = \"{A}\"\nproxy = [\"10.3.0.9\"]\n"
        ));
        assert_eq!(ips(&ask_from(&c, A, RecordType::A, 0, "10.9.9.9").unwrap()), ["10.1.0.1", "10.1.0.2"]);
        assert_eq!(ips(&ask_from(&c, A, RecordType::A, 0, "10.2.3.4").unwrap()), ["10.2.0.9"]);
        // The listener wins over the client's network.
        assert_eq!(ips(&ask_from(&c, A, RecordType::A, 1, "10.2.3.4").unwrap()), ["10.3.0.9"]);
        let why = c.explain(A, "10.2.3.4".parse().unwrap(), None);
        assert!(why.contains("view:    vpc-b") && why.contains("views[0].clusters[0]"), "{why}");
    }

    #[test]
    fn provisioned_brokers_get_their_own_addresses() {
        let c = catalog(
            "[[clusters]]\nbootstrap = \"b-1.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com\"\naddresses = [\"10.5.0.100\"]\n\
             brokers = { \"1\" = [\"10.5.0.1\"], \"2\" = [\"10.5.0.2\"] }\n",
        );
        let p = |n: u32| format!("b-{n}.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com.");
        assert_eq!(ips(&ask(&c, &p(1), RecordType::A).unwrap()), ["10.5.0.1"]);
        assert_eq!(ips(&ask(&c, &p(2), RecordType::A).unwrap()), ["10.5.0.2"]);
        assert_eq!(ips(&ask(&c, &p(3), RecordType::A).unwrap()), ["10.5.0.100"]);
        assert!(ask(&c, "b-1.orders.ffff.c3.kafka.us-east-1.amazonaws.com.", RecordType::A).is_none());
    }

    #[test]
    fn endpoint_addresses_follow_az_affinity() {
        let toml = |affinity: &str| {
            format!(
                "[[views]]\nname = \"a\"\nclients = [\"10.0.0.0/8\"]\naz = \"use1-az2\"\naz_affinity = \"{affinity}\"\n\
                 [[views.clusters]]\nbootstrap = \"{A}\"\nvpc_endpoint = \"vpce-1\"\n"
            )
        };
        let addr = |ip: &str, az: &str, id: &str| EndpointAddr {
            ip: ip.parse().unwrap(),
            az: az.into(),
            az_id: Some(id.into()),
        };
        for (affinity, want) in [
            ("off", vec!["10.0.1.1", "10.0.2.1", "10.0.3.1"]),
            ("prefer", vec!["10.0.2.1", "10.0.1.1", "10.0.3.1"]),
            ("only", vec!["10.0.2.1"]),
        ] {
            let c = catalog(&toml(affinity));
            let servfail = ask_from(&c, A, RecordType::A, 0, "10.1.1.1").unwrap();
            assert_eq!(servfail.metadata.response_code, ResponseCode::ServFail, "no addresses read yet");
            c.endpoints().next().unwrap().set(vec![
                addr("10.0.1.1", "us-east-1a", "use1-az1"),
                addr("10.0.2.1", "us-east-1b", "use1-az2"),
                addr("10.0.3.1", "us-east-1c", "use1-az3"),
            ]);
            assert_eq!(ips(&ask_from(&c, A, RecordType::A, 0, "10.1.1.1").unwrap()), want, "{affinity}");
        }
    }

    #[test]
    fn zone_files_answer() {
        let dir = std::env::temp_dir().join(format!("mskdns-zone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("z.zone");
        std::fs::write(
            &file,
            "$ORIGIN kafka.internal.\n$TTL 300\n@ IN SOA ns hostmaster 1 3600 600 86400 120\n@ IN NS ns\nns IN A 10.9.0.1\nproxy.a IN A 10.9.0.2\nalias IN CNAME ns\n",
        )
        .unwrap();
        let c = catalog(&format!("[[zones]]\nfile = \"{}\"\n", file.display()));
        let m = ask(&c, "Proxy.A.kafka.internal.", RecordType::A).unwrap();
        assert_eq!(m.answers[0].data, RData::A("10.9.0.2".parse().unwrap()));
        let m = ask(&c, "a.kafka.internal.", RecordType::A).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.authorities[0].ttl, 120);
        let m = ask(&c, "nope.kafka.internal.", RecordType::A).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = ask(&c, "alias.kafka.internal.", RecordType::A).unwrap();
        assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
        assert!(ask(&c, "kafka.example.", RecordType::A).is_none());
        std::fs::remove_dir_all(&dir).ok();
    }
}
