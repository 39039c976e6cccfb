//! Building a catalog from the configuration: the clusters of the file and of each view, the
//! forwarders and VPC endpoints they share (kept from the previous catalog while unchanged, so a
//! reload keeps their cached answers and addresses), and the zones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use ipnet::IpNet;

use std::sync::atomic::AtomicBool;

use super::zone::{Zone, load_zone};
use super::{Addrs, Catalog, CatalogError, Cluster, Endpoint, Target, View};
use crate::config::UpstreamKind;
use crate::config::{AzAffinity, ClusterConfig, Config};
use crate::dns::budget::{Budget, budget_for, is_vpc_resolver};
use crate::dns::cache::Cache;
use crate::dns::forward::{Forwarder, Settings};
use crate::names;

impl Catalog {
    /// Builds from `config`, keeping from `previous` what has not changed: the default
    /// forwarder (and so the cache) when its settings are equal, and VPC endpoints by id (with
    /// the addresses already read from EC2).
    pub fn rebuild(config: &Config, previous: Option<&Catalog>) -> Result<Self, CatalogError> {
        let timeout = Duration::from_millis(config.dns.upstream_timeout_ms);
        let addrs = config.effective_upstreams()?;
        let mut budgets = Budgets { config, upstreams: addrs.clone(), kept: HashMap::new(), previous };
        let settings =
            Settings { budgets: budgets.of(&addrs), addrs, attempt_timeout: timeout, cache: config.cache.clone() };
        // One cache for all forwarders, kept across reloads while its bounds stay the same.
        let cache = match previous {
            Some(p) if p.cache.bounds == Cache::bounds_of(&config.cache) => p.cache.clone(),
            _ => Cache::new(&config.cache),
        };
        let same_cache = |p: &Catalog| Arc::ptr_eq(&p.cache, &cache);
        let default_forwarder = match previous {
            Some(p) if p.default_forwarder.settings == settings && same_cache(p) => p.default_forwarder.clone(),
            _ => Arc::new(Forwarder::new(settings, cache.clone())),
        };
        // Cluster resolvers by their settings: kept (with their cached answers) when unchanged.
        let mut parts = Parts {
            config,
            timeout,
            cache: cache.clone(),
            // Cluster resolvers by their settings: kept (with their cached answers) when unchanged.
            pool: match previous {
                Some(p) if same_cache(p) => p.forwarders.clone(),
                _ => Vec::new(),
            },
            used: Vec::new(),
            // Only those still used are kept: see the retain below.
            endpoints: previous.map(|p| p.endpoints.clone()).unwrap_or_default(),
            budgets,
        };
        let top: HashMap<_, _> = config
            .clusters
            .iter()
            .enumerate()
            .filter_map(|(i, c)| parts.cluster(c, c.source.clone().unwrap_or_else(|| format!("clusters[{i}]"))))
            .collect();
        let (views, by_listener, by_client) = build_views(config, &mut parts, top);
        let mut endpoints = parts.endpoints;
        endpoints.retain(|id, _| endpoint_used(config, id));
        // Only those still used are kept for the next rebuild.
        let forwarders = parts.used;
        let budgets = parts.budgets.kept;
        let zones = load_zones(config)?;
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
            forwarders,
            cache,
            endpoints,
            budgets,
        })
    }
}

/// What a rebuild shares between its clusters: forwarders by their settings (the previous
/// catalog's reused while their settings stay), VPC endpoints by id.
struct Parts<'a> {
    config: &'a Config,
    timeout: Duration,
    cache: Arc<Cache>,
    pool: Vec<Arc<Forwarder>>,
    /// The forwarders this catalog uses.
    used: Vec<Arc<Forwarder>>,
    endpoints: HashMap<String, Arc<Endpoint>>,
    budgets: Budgets<'a>,
}

impl Parts<'_> {
    fn cluster(&mut self, c: &ClusterConfig, origin: String) -> Option<(Box<[u8]>, Arc<Cluster>)> {
        let (pool, used, cache, budgets) = (&mut self.pool, &mut self.used, &self.cache, &mut self.budgets);
        let mut forwarder = |mut settings: Settings| {
            settings.budgets = budgets.of(&settings.addrs);
            let f = match pool.iter().find(|f| f.settings == settings) {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(Forwarder::new(settings, cache.clone()));
                    pool.push(f.clone());
                    f
                }
            };
            if !used.iter().any(|u| Arc::ptr_eq(u, &f)) {
                used.push(f.clone());
            }
            f
        };
        cluster_entry(c, origin, &mut self.endpoints, &mut forwarder, self.timeout, self.config)
    }
}

/// The default view (the top-level clusters) and each `[[views]]` entry over it, with the views
/// each listener and client network selects.
fn build_views(
    config: &Config,
    parts: &mut Parts<'_>,
    top: HashMap<Box<[u8]>, Arc<Cluster>>,
) -> (Vec<View>, Vec<usize>, Vec<(IpNet, usize)>) {
    let mut views = vec![View {
        name: "default".into(),
        clusters: top.clone(),
        az: ArcSwapOption::empty(),
        subnet: None,
        affinity: AzAffinity::Off,
        selector: "no view selects this client or listener".into(),
    }];
    let listeners = config.dns.all_listeners();
    let mut by_listener = vec![0; listeners.len()];
    let mut by_client = Vec::new();
    for (vi, v) in config.views.iter().enumerate() {
        let mut clusters = top.clone();
        for (ci, c) in v.clusters.iter().enumerate() {
            if let Some((k, cl)) = parts.cluster(c, format!("views[{vi}].clusters[{ci}]")) {
                clusters.insert(k, cl);
            }
        }
        let index = views.len();
        for l in &v.listeners {
            for (li, addr) in listeners.iter().enumerate() {
                if addr == l {
                    by_listener[li] = index;
                }
            }
        }
        by_client.extend(v.clients.iter().map(|n| (*n, index)));
        views.push(View {
            name: v.name.clone(),
            clusters,
            az: ArcSwapOption::new(v.az.clone().map(|a| Arc::new(vec![a]))),
            subnet: v.subnet.clone(),
            affinity: v.az_affinity,
            selector: selector(v),
        });
    }
    (views, by_listener, by_client)
}

fn cluster_entry(
    c: &ClusterConfig,
    origin: String,
    endpoints: &mut HashMap<String, Arc<Endpoint>>,
    forwarder: &mut dyn FnMut(Settings) -> Arc<Forwarder>,
    timeout: Duration,
    config: &Config,
) -> Option<(Box<[u8]>, Arc<Cluster>)> {
    // validate() already proved the name parses.
    let (key, provisioned) = crate::names::cluster_key(&c.bootstrap).ok()?;
    let label = names::cluster_label(&key, provisioned);
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
        // Its budgets are set by Parts::cluster.
        Target::Forward(forwarder(Settings {
            addrs,
            attempt_timeout: timeout,
            cache: config.cache.clone(),
            budgets: Vec::new(),
        }))
    } else if !c.proxy.is_empty() {
        Target::Proxy(Addrs::new(&c.proxy))
    } else {
        Target::Addresses(Addrs::new(&c.addresses))
    };
    let brokers = c.brokers.iter().filter_map(|(b, a)| Some((b.parse().ok()?, Addrs::new(a)))).collect();
    let answers = metrics::counter!("mskdns_cluster_answers_total", "cluster" => label.clone());
    Some((
        key.into(),
        Arc::new(Cluster { label, origin, target, brokers, ttl: c.ttl, discovered: c.source.is_some(), answers }),
    ))
}

/// How a view is chosen, for `mskdns explain`.
fn selector(v: &crate::config::ViewConfig) -> String {
    let mut why = Vec::new();
    if !v.listeners.is_empty() {
        why.push(format!("listeners {:?}", v.listeners));
    }
    if !v.clients.is_empty() {
        why.push(format!("clients in {:?}", v.clients.iter().map(|n| n.to_string()).collect::<Vec<_>>()));
    }
    why.join(" or ")
}

/// Whether any cluster entry (top level or a view's) still names the VPC endpoint `id`.
fn endpoint_used(config: &Config, id: &str) -> bool {
    config
        .clusters
        .iter()
        .chain(config.views.iter().flat_map(|v| &v.clusters))
        .any(|c| c.vpc_endpoint.as_deref() == Some(id))
}

fn load_zones(config: &Config) -> Result<Vec<Zone>, CatalogError> {
    config
        .zones
        .iter()
        .enumerate()
        .map(|(index, z)| load_zone(z).map_err(|message| CatalogError::Zone { index, path: z.file.clone(), message }))
        .collect()
}

/// The upstream packet budgets a rebuild hands out (`dns.upstream_max_pps`): one per upstream
/// address, the VPC resolver's addresses sharing one; each kept from the previous catalog while
/// it covers the same and its rate stays, so a reload does not forget what was sent.
struct Budgets<'a> {
    config: &'a Config,
    /// `dns.upstreams` in force (or /etc/resolv.conf's).
    upstreams: Vec<SocketAddr>,
    kept: HashMap<String, Arc<Budget>>,
    previous: Option<&'a Catalog>,
}

impl Budgets<'_> {
    /// The budget of each of `addrs`.
    fn of(&mut self, addrs: &[SocketAddr]) -> Vec<Option<Arc<Budget>>> {
        addrs.iter().map(|a| self.one(*a)).collect()
    }

    fn one(&mut self, addr: SocketAddr) -> Option<Arc<Budget>> {
        let d = &self.config.dns;
        let marked = d.upstreams.iter().any(|u| u.0 == addr && u.1 == UpstreamKind::VpcResolver);
        let (vpc, limit) = budget_for(d.upstream_max_pps, addr, self.upstreams.contains(&addr), marked)?;
        let label = if vpc { self.vpc_label() } else { addr.to_string() };
        if let Some(b) = self.kept.get(&label).filter(|b| b.limit == limit) {
            return Some(b.clone());
        }
        let previous = self.previous.and_then(|p| p.budgets.get(&label)).filter(|b| b.limit == limit);
        let b = previous.cloned().unwrap_or_else(|| Arc::new(Budget::new(label.clone(), limit)));
        self.kept.insert(label, b.clone());
        Some(b)
    }

    /// What the VPC resolver's budget is called: the addresses of it among the upstreams.
    fn vpc_label(&self) -> String {
        let d = &self.config.dns;
        let vpc: Vec<String> = self
            .upstreams
            .iter()
            .filter(|a| {
                is_vpc_resolver(a.ip()) || d.upstreams.iter().any(|u| u.0 == **a && u.1 == UpstreamKind::VpcResolver)
            })
            .map(ToString::to_string)
            .collect();
        match vpc.is_empty() {
            true => "VPC resolver".into(),
            false => format!("VPC resolver {}", vpc.join(" ")),
        }
    }
}
