//! What mskdns answers itself: configured MSK clusters and static zone files, prepared at load
//! time so that answering is a hash lookup and a few byte copies.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};
use ipnet::IpNet;

use super::cache::Cache;
use super::forward::Forwarder;
use super::wire::{self, Query, Response};
use crate::config::{AzAffinity, Config, UnknownClusters};
use crate::names;
use zone::{Zone, suffix_offset};

mod build;
mod explain;
mod zone;

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

pub use crate::config::EndpointAddr;

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
    /// Found by discovery (its target written by the cluster's own account), not in the file.
    pub discovered: bool,
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

    /// The clients' AZ (names and/or ids), once known.
    pub fn az(&self) -> Option<Arc<Vec<String>>> {
        self.az.load_full()
    }
}

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
    /// A class other than IN for one of our names: REFUSED was written.
    Refused,
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
    /// The clusters' own resolvers, one forwarder per distinct setting.
    forwarders: Vec<Arc<Forwarder>>,
    /// Every forwarder's answers, bounded together.
    cache: Arc<Cache>,
    endpoints: HashMap<String, Arc<Endpoint>>,
    /// The upstream packet budgets, by what they cover (see `build.rs`).
    budgets: HashMap<String, Arc<crate::dns::budget::Budget>>,
}

impl Catalog {
    pub fn from_config(config: &Config) -> Result<Self, CatalogError> {
        Self::rebuild(config, None)
    }

    pub fn cluster_count(&self) -> usize {
        self.views.iter().map(|v| v.clusters.len()).max().unwrap_or(0)
    }

    pub fn default_forwarder(&self) -> &Forwarder {
        &self.default_forwarder
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Every VPC endpoint any cluster targets, once each.
    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.endpoints.values()
    }

    /// The name of the view each listener selects (by index, as `by_listener`).
    pub fn listener_views(&self) -> Vec<String> {
        self.by_listener.iter().map(|&v| self.views[v].name.clone()).collect()
    }

    /// The upstream packet budgets in force.
    pub fn budgets(&self) -> impl Iterator<Item = &Arc<crate::dns::budget::Budget>> {
        self.budgets.values()
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
            return self.answer_zone(q, lc, out, limit, max_payload);
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
        // Only class IN exists for these names: another class is not ours to answer (as nsd and
        // unbound answer a class they hold no zone for).
        if !is_in_class(q) {
            Response::new(out, q, wire::RCODE_REFUSED, false).finish(q, limit, max_payload);
            return Local::Refused;
        }
        // A broker with its own addresses, else the cluster's target (a provisioned broker of a
        // cluster with a `forward` target is forwarded like every other name of that cluster).
        let source = match (broker.and_then(|b| cluster.brokers.get(&b)), &cluster.target) {
            (Some(addrs), _) | (None, Target::Addresses(addrs) | Target::Proxy(addrs)) => Source::Fixed(addrs),
            (None, Target::Endpoint(e)) => Source::Endpoint(e),
            (None, Target::Forward(f)) => return Local::Forward(f, Some(cluster)),
        };
        let any = match source {
            Source::Fixed(addrs) => {
                cluster.count_answer();
                let mut r = Response::new(out, q, wire::RCODE_NOERROR, true);
                let any = write_addrs(
                    &mut r,
                    q,
                    addrs.v4.iter().map(|a| IpAddr::V4(*a)).chain(addrs.v6.iter().map(|a| IpAddr::V6(*a))),
                    cluster.ttl,
                );
                (r, any)
            }
            Source::Endpoint(e) => match e.get() {
                Some(addrs) => {
                    cluster.count_answer();
                    let mut r = Response::new(out, q, wire::RCODE_NOERROR, true);
                    let any = write_endpoint(&mut r, q, &addrs, cluster.ttl, view);
                    (r, any)
                }
                None => {
                    Response::new(out, q, wire::RCODE_SERVFAIL, false).finish(q, limit, max_payload);
                    return Local::Unavailable;
                }
            },
        };
        let (mut r, any) = any;
        if !any {
            r.soa_at_suffix(apex, cluster.ttl, self.serial);
        }
        r.finish(q, limit, max_payload);
        Local::Cluster
    }

    /// A name outside the MSK grammar: from a zone the catalog holds, else forwarded.
    fn answer_zone(&self, q: &Query<'_>, lc: &[u8], out: &mut Vec<u8>, limit: usize, max_payload: u16) -> Local<'_> {
        for zone in &self.zones {
            if let Some(apex) = suffix_offset(lc, &zone.origin) {
                if !is_in_class(q) {
                    Response::new(out, q, wire::RCODE_REFUSED, false).finish(q, limit, max_payload);
                    return Local::Refused;
                }
                zone.answer(q, lc, apex, out).finish(q, limit, max_payload);
                return Local::Zone;
            }
        }
        Local::Forward(&self.default_forwarder, None)
    }
}

/// Where the SNI proxy sends a connection for a server name (see [`Catalog::route`]).
pub enum Via {
    /// Connect to these, in this order.
    Addrs(Vec<IpAddr>),
    /// Ask the cluster's own resolver for the name.
    Forward(Arc<Forwarder>),
    /// A VPC endpoint whose addresses are not known yet.
    Unavailable,
    /// The cluster's top-level target is the proxy itself: routing would loop.
    Proxy,
}

pub struct Route {
    /// The cluster's label (`Cluster::label`), for metrics and logs.
    pub cluster: String,
    pub via: Via,
    /// The cluster was discovered, not configured in the file.
    pub discovered: bool,
}

impl Catalog {
    /// Where a TLS connection whose server name is `lc` (lowercase wire form) goes: the
    /// cluster's top-level target, never a view's (a view's `proxy` target would loop back).
    /// `None`: not an MSK name of a cluster served here.
    pub fn route(&self, lc: &[u8]) -> Option<Route> {
        let (key, broker) = if let Some(m) = names::match_serverless(lc) {
            (m.key, None)
        } else {
            let m = names::match_provisioned(lc)?;
            (m.key, Some(m.broker.value))
        };
        let top = &self.views[0];
        let cluster = top.clusters.get(&lc[key])?;
        let fixed =
            |a: &Addrs| a.v4.iter().map(|v| IpAddr::V4(*v)).chain(a.v6.iter().map(|v| IpAddr::V6(*v))).collect();
        let via = match (broker.and_then(|b| cluster.brokers.get(&b)), &cluster.target) {
            (Some(addrs), _) | (None, Target::Addresses(addrs)) => Via::Addrs(fixed(addrs)),
            (None, Target::Proxy(_)) => Via::Proxy,
            (None, Target::Forward(f)) => Via::Forward(f.clone()),
            (None, Target::Endpoint(e)) => match e.get() {
                Some(addrs) => Via::Addrs(endpoint_order(&addrs, top)),
                None => Via::Unavailable,
            },
        };
        Some(Route { cluster: cluster.label.clone(), via, discovered: cluster.discovered })
    }
}

/// A VPC endpoint's addresses in the order DNS answers give them to `view`'s clients: the
/// clients' AZ first (`az_affinity = prefer`), or only it when it has any (`only`).
fn endpoint_order(addrs: &[EndpointAddr], view: &View) -> Vec<IpAddr> {
    let az = view.az.load();
    let same = |a: &EndpointAddr| {
        az.as_deref().is_some_and(|z| z.iter().any(|z| *z == a.az || a.az_id.as_deref() == Some(z.as_str())))
    };
    let local: Vec<IpAddr> = addrs.iter().filter(|a| same(a)).map(|a| a.ip).collect();
    let other = addrs.iter().filter(|a| !same(a)).map(|a| a.ip);
    match view.affinity {
        AzAffinity::Off => addrs.iter().map(|a| a.ip).collect(),
        AzAffinity::Only if !local.is_empty() => local,
        _ => local.into_iter().chain(other).collect(),
    }
}

/// Where a cluster name's addresses come from.
enum Source<'a> {
    Fixed(&'a Addrs),
    Endpoint(&'a Endpoint),
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

/// IN, or ANY (which our IN records answer).
fn is_in_class(q: &Query<'_>) -> bool {
    q.qclass == wire::CLASS_IN || q.qclass == wire::CLASS_ANY
}

fn wanted(q: &Query<'_>, ip: &IpAddr) -> bool {
    is_in_class(q)
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

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};

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
        // Multi-VPC connectivity names are the same brokers.
        let m = |n: u32, auth: &str| format!("b-{n}.{auth}.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com.");
        assert_eq!(ips(&ask(&c, &m(2, "iam"), RecordType::A).unwrap()), ["10.5.0.2"]);
        assert_eq!(ips(&ask(&c, &m(3, "scram"), RecordType::A).unwrap()), ["10.5.0.100"]);
        // Public access and ZooKeeper names are forwarded.
        assert!(ask(&c, "b-1-public.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com.", RecordType::A).is_none());
        assert!(ask(&c, "z-1.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com.", RecordType::A).is_none());
    }

    #[test]
    fn sni_routes_go_to_the_top_level_target_only() {
        let c = catalog(
            "[[views]]\nname = \"remote\"\nclients = [\"10.9.0.0/16\"]\n[[views.clusters]]\nbootstrap = \"boot-aaaa.c2.kafka-serverless.us-east-1.amazonaws.com\"\nproxy = [\"10.9.0.5\"]\n\
             [[clusters]]\nbootstrap = \"b-1.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com\"\naddresses = [\"10.5.0.100\"]\n\
             brokers = { \"2\" = [\"10.5.0.2\"] }\n",
        );
        let route = |n: &str| c.route(&names::name_to_wire(n).unwrap());
        let addrs = |n: &str| match route(n).map(|r| r.via) {
            Some(Via::Addrs(a)) => a.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            _ => panic!("{n}: no addresses"),
        };
        // The view's proxy target is never the destination: the top-level addresses are.
        assert_eq!(addrs("b0037-aaaa.c2.kafka-serverless.us-east-1.amazonaws.com"), ["10.1.0.1", "10.1.0.2"]);
        assert_eq!(addrs("b-2.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com"), ["10.5.0.2"]);
        assert_eq!(addrs("b-2.iam.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com"), ["10.5.0.2"]);
        assert_eq!(addrs("b-3.tls.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com"), ["10.5.0.100"]);
        assert_eq!(
            route("b-1.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com").unwrap().cluster,
            "orders.ab12cd.c3.us-east-1"
        );
        for n in [
            "boot-bbbb.c2.kafka-serverless.us-east-1.amazonaws.com",
            "b-1-public.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com",
            "example.com",
        ] {
            assert!(route(n).is_none(), "{n}");
        }
    }

    #[test]
    fn every_target_kind_answers_serverless_and_provisioned_names() {
        let p = "b-1.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com";
        for target in [
            "addresses = [\"10.5.0.1\"]",
            "proxy = [\"10.5.0.2\"]",
            "vpc_endpoint = \"vpce-9\"",
            "forward = [\"127.0.0.1:9\"]",
        ] {
            let c = catalog(&format!(
                "[[clusters]]\nbootstrap = \"{p}\"\n{target}\n[[clusters]]\nbootstrap = \"boot-cccc.c1.kafka-serverless.us-east-1.amazonaws.com\"\n{target}\n\
                 [[clusters]]\nbootstrap = \"b-1.withbrokers.ab12cd.c3.kafka.us-east-1.amazonaws.com\"\n{target}\nbrokers = {{ \"2\" = [\"10.6.0.2\"] }}\n"
            ));
            for name in [
                p.to_string(),
                "b-7.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com".into(),
                "b0001-cccc.c1.kafka-serverless.us-east-1.amazonaws.com".into(),
                "b-1.withbrokers.ab12cd.c3.kafka.us-east-1.amazonaws.com".into(),
            ] {
                for t in [RecordType::A, RecordType::AAAA, RecordType::TXT] {
                    let m = ask(&c, &name, t);
                    if target.starts_with("forward") {
                        assert!(m.is_none(), "{target} {name}: forwarded to the cluster's resolver");
                    } else {
                        assert!(m.is_some(), "{target} {name}");
                    }
                }
            }
            // A broker with its own addresses is answered from them whatever the target.
            let m = ask(&c, "b-2.withbrokers.ab12cd.c3.kafka.us-east-1.amazonaws.com", RecordType::A).unwrap();
            assert_eq!(ips(&m), ["10.6.0.2"], "{target}");
        }
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
