//! One query's way through mskdns: parse, access check, our own answers (clusters, zones),
//! the cache, and on a miss the upstreams. Transport-agnostic: bytes in, bytes out.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ipnet::IpNet;

use super::cache;
use super::catalog::{Catalog, Local};
use super::ratelimit::{RateLimiter, Verdict};
use super::upstream::Question;
use super::wire::{self, Query, Reject, Response};
use crate::config::{ClusterConfig, Config};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Where a query came from: the client, and which `dns.listen` entry it arrived on.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    pub client: IpAddr,
    pub listener: usize,
    pub transport: Transport,
}

/// What became of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// `out` holds the response.
    Reply,
    /// Send nothing.
    Drop,
    /// Not answerable locally: call [`Engine::resolve`] off the receive loop.
    Miss,
    /// `out` holds the response (a cached answer near its expiry): send it, and call
    /// [`Engine::prefetch`] off the receive loop to refresh the cache.
    ReplyAndPrefetch,
}

/// Responses by outcome, registered once so the hot path only bumps an atomic.
struct Outcomes {
    cluster: metrics::Counter,
    zone: metrics::Counter,
    unknown_cluster: metrics::Counter,
    cache_hit: metrics::Counter,
    forwarded: metrics::Counter,
    stale: metrics::Counter,
    servfail: metrics::Counter,
    refused: metrics::Counter,
    formerr: metrics::Counter,
    notimp: metrics::Counter,
    badvers: metrics::Counter,
    dropped: metrics::Counter,
    rate_limited: metrics::Counter,
    any: metrics::Counter,
    cache_hits: metrics::Counter,
    cache_misses: metrics::Counter,
    prefetches: metrics::Counter,
}

impl Outcomes {
    fn new() -> Self {
        let o = |k: &'static str| metrics::counter!("mskdns_responses_total", "outcome" => k);
        Outcomes {
            cluster: o("cluster"),
            zone: o("zone"),
            unknown_cluster: o("unknown_cluster"),
            cache_hit: o("cache_hit"),
            forwarded: o("forwarded"),
            stale: o("stale"),
            servfail: o("servfail"),
            refused: o("refused"),
            formerr: o("formerr"),
            notimp: o("notimp"),
            badvers: o("badvers"),
            dropped: o("dropped"),
            rate_limited: o("rate_limited"),
            any: o("any_rfc8482"),
            cache_hits: metrics::counter!("mskdns_cache_hits_total"),
            cache_misses: metrics::counter!("mskdns_cache_misses_total"),
            prefetches: metrics::counter!("mskdns_cache_prefetches_total"),
        }
    }
}

/// `config` with the discovered clusters added after its own, skipping any whose cluster key
/// the file (or an earlier discovered entry) already has.
pub fn merge_discovered(config: &Config, discovered: &[ClusterConfig]) -> Config {
    if discovered.is_empty() {
        return config.clone();
    }
    let mut seen: std::collections::HashSet<Vec<u8>> =
        config.clusters.iter().filter_map(|c| crate::config::cluster_key(&c.bootstrap).ok().map(|k| k.0)).collect();
    let mut merged = config.clone();
    for c in discovered {
        if let Ok((key, _)) = crate::config::cluster_key(&c.bootstrap)
            && seen.insert(key)
        {
            merged.clusters.push(c.clone());
        }
    }
    merged
}

/// Everything a reload replaces, swapped as one.
pub struct Snapshot {
    pub catalog: Catalog,
    allow: Vec<IpNet>,
    max_payload: u16,
    rate_limit: Option<RateLimiter>,
}

pub struct Engine {
    current: ArcSwap<Snapshot>,
    outcomes: Outcomes,
    /// What the snapshot is built from: the file's configuration and the discovered clusters.
    sources: std::sync::Mutex<(Config, Arc<Vec<ClusterConfig>>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Catalog(#[from] super::catalog::CatalogError),
}

impl Engine {
    pub fn from_config(config: &Config) -> Result<Arc<Self>, EngineError> {
        let snapshot = Snapshot::new(config, None)?;
        Ok(Arc::new(Engine {
            current: ArcSwap::from_pointee(snapshot),
            outcomes: Outcomes::new(),
            sources: std::sync::Mutex::new((config.clone(), Arc::default())),
        }))
    }

    /// Applies a new configuration (with the discovered clusters in force); on error the
    /// running one stays untouched.
    pub fn reload(&self, config: &Config) -> Result<(), EngineError> {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let merged = merge_discovered(config, &sources.1);
        let next = Snapshot::new(&merged, Some(&self.current.load().catalog))?;
        self.current.store(Arc::new(next));
        sources.0 = config.clone();
        Ok(())
    }

    /// Replaces the discovered clusters. Clusters in the file (by cluster key) win over them;
    /// a view's own entries win as they do over the file's top-level clusters.
    pub fn set_discovered(&self, clusters: Vec<ClusterConfig>) -> Result<(), EngineError> {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let clusters = Arc::new(clusters);
        let merged = merge_discovered(&sources.0, &clusters);
        let next = Snapshot::new(&merged, Some(&self.current.load().catalog))?;
        self.current.store(Arc::new(next));
        sources.1 = clusters;
        Ok(())
    }

    /// The configuration file's contents in force (without the discovered clusters).
    pub fn file_config(&self) -> Config {
        self.sources.lock().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// The discovered clusters in force.
    pub fn discovered(&self) -> Arc<Vec<ClusterConfig>> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// The configuration in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn upstream_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.current.load().catalog.default_forwarder().addrs()
    }

    pub fn cache_entries(&self) -> u64 {
        self.current.load().catalog.default_forwarder().entries()
    }

    /// The longest a miss can take to resolve or fail.
    pub fn resolve_deadline(&self) -> Duration {
        self.current.load().catalog.default_forwarder().deadline()
    }

    /// Answers what can be answered without waiting on the network.
    pub fn handle(&self, pkt: &[u8], from: Origin, out: &mut Vec<u8>) -> Handled {
        let snap = self.current.load();
        let client = from.client.to_canonical();
        let q = match Query::parse(pkt) {
            Ok(q) => q,
            Err(reject) => return self.reject(&snap, reject, client, out),
        };
        let limit = snap.limit(&q, from.transport);
        if !snap.allowed(client) {
            self.outcomes.refused.increment(1);
            Response::new(out, &q, wire::RCODE_REFUSED, false).finish(&q, limit, snap.max_payload);
            return Handled::Reply;
        }
        if from.transport == Transport::Udp
            && let Some(rl) = &snap.rate_limit
        {
            match rl.check(client) {
                Verdict::Send => {}
                Verdict::Drop => {
                    self.outcomes.rate_limited.increment(1);
                    return Handled::Drop;
                }
                Verdict::Truncate => {
                    self.outcomes.rate_limited.increment(1);
                    Response::new(out, &q, wire::RCODE_NOERROR, false).finish(&q, 0, snap.max_payload);
                    return Handled::Reply;
                }
            }
        }
        if q.edns.is_some_and(|e| e.version > 0) {
            self.outcomes.badvers.increment(1);
            wire::badvers(out, &q, snap.max_payload);
            return Handled::Reply;
        }
        if matches!(q.qtype, wire::TYPE_AXFR | wire::TYPE_IXFR | wire::TYPE_OPT) {
            self.outcomes.refused.increment(1);
            Response::new(out, &q, wire::RCODE_REFUSED, false).finish(&q, limit, snap.max_payload);
            return Handled::Reply;
        }
        let mut lc_buf = [0u8; wire::MAX_NAME_LEN];
        let lc_len = wire::lowercase_name(q.name(), &mut lc_buf);
        let lc = &lc_buf[..lc_len];
        let forwarder = match snap.catalog.answer(&q, lc, from.listener, client, out, limit, snap.max_payload) {
            Local::Cluster => {
                self.outcomes.cluster.increment(1);
                return Handled::Reply;
            }
            Local::Zone => {
                self.outcomes.zone.increment(1);
                return Handled::Reply;
            }
            Local::UnknownCluster => {
                self.outcomes.unknown_cluster.increment(1);
                return Handled::Reply;
            }
            Local::Unavailable => {
                self.outcomes.servfail.increment(1);
                return Handled::Reply;
            }
            Local::Forward(f, _) => f,
        };
        if q.qtype == wire::TYPE_ANY {
            // RFC 8482: no upstream ANY (an amplification vector); one synthesized HINFO instead.
            self.outcomes.any.increment(1);
            let mut r = Response::new(out, &q, wire::RCODE_NOERROR, false);
            r.record_at_qname(wire::Section::Answer, &wire::RFC8482_HINFO);
            r.finish(&q, limit, snap.max_payload);
            return Handled::Reply;
        }
        let mut kb = [0u8; wire::MAX_NAME_LEN + 5];
        let now = Instant::now();
        if let Some(answer) = forwarder.cached(cache::key_into(&mut kb, lc, &q), now) {
            self.outcomes.cache_hits.increment(1);
            self.outcomes.cache_hit.increment(1);
            answer.serve(&q, out, now, limit, snap.max_payload);
            return if answer.take_prefetch(now) { Handled::ReplyAndPrefetch } else { Handled::Reply };
        }
        Handled::Miss
    }

    fn reject(&self, snap: &Snapshot, reject: Reject, client: IpAddr, out: &mut Vec<u8>) -> Handled {
        // Say nothing to strangers, not even FORMERR.
        if !snap.allowed(client) {
            self.outcomes.dropped.increment(1);
            return Handled::Drop;
        }
        match reject {
            Reject::Drop => {
                self.outcomes.dropped.increment(1);
                Handled::Drop
            }
            Reject::FormErr { id, flags } => {
                self.outcomes.formerr.increment(1);
                wire::header_only(out, id, flags, wire::RCODE_FORMERR);
                Handled::Reply
            }
            Reject::NotImp { id, flags } => {
                self.outcomes.notimp.increment(1);
                wire::header_only(out, id, flags, wire::RCODE_NOTIMP);
                Handled::Reply
            }
        }
    }

    /// Refreshes the cached answer for a packet that [`Engine::handle`] answered from the cache
    /// near its expiry; the client already has its answer, so nothing is sent.
    pub async fn prefetch(&self, pkt: &[u8], from: Origin) {
        let mut out = Vec::new();
        self.lookup(pkt, from, &mut out, true).await;
    }

    /// Resolves a packet that [`Engine::handle`] called a miss: one upstream query per key
    /// however many clients ask at once; SERVFAIL if the upstreams fail.
    pub async fn resolve(&self, pkt: &[u8], from: Origin, out: &mut Vec<u8>) -> Handled {
        self.lookup(pkt, from, out, false).await
    }

    async fn lookup(&self, pkt: &[u8], from: Origin, out: &mut Vec<u8>, refresh: bool) -> Handled {
        let Ok(q) = Query::parse(pkt) else { return Handled::Drop };
        let snap = self.current.load_full();
        let client = from.client.to_canonical();
        let limit = snap.limit(&q, from.transport);
        let mut lc_buf = [0u8; wire::MAX_NAME_LEN];
        let lc_len = wire::lowercase_name(q.name(), &mut lc_buf);
        let lc = &lc_buf[..lc_len];
        let (forwarder, cluster) =
            match snap.catalog.answer(&q, lc, from.listener, client, out, limit, snap.max_payload) {
                Local::Forward(f, c) => (f, c),
                _ => return Handled::Reply,
            };
        let mut kb = [0u8; wire::MAX_NAME_LEN + 5];
        let key: cache::Key = cache::key_into(&mut kb, lc, &q).into();
        let question = Question {
            lc_name: lc,
            qtype: q.qtype,
            qclass: q.qclass,
            dnssec_ok: q.dnssec_ok(),
            checking_disabled: q.checking_disabled(),
        };
        if refresh {
            self.outcomes.prefetches.increment(1);
        } else {
            self.outcomes.cache_misses.increment(1);
        }
        let result = forwarder.resolve(key.clone(), question, refresh).await;
        if refresh {
            return Handled::Drop;
        }
        match result {
            Ok(answer) => {
                self.outcomes.forwarded.increment(1);
                if let Some(c) = cluster {
                    c.count_answer();
                }
                answer.serve(&q, out, Instant::now(), limit, snap.max_payload);
            }
            Err(e) => {
                tracing::debug!(error = %e, name = %wire::wire_to_string(lc), "resolution failed");
                if let Some(stale) = forwarder.stale(&key, Instant::now()) {
                    self.outcomes.stale.increment(1);
                    stale.serve_stale(&q, out, limit, snap.max_payload);
                    return Handled::Reply;
                }
                self.outcomes.servfail.increment(1);
                Response::new(out, &q, wire::RCODE_SERVFAIL, false).finish(&q, limit, snap.max_payload);
            }
        }
        Handled::Reply
    }

    /// SERVFAIL for a query we cannot resolve now (too many in flight).
    pub fn servfail_packet(&self, pkt: &[u8], transport: Transport, out: &mut Vec<u8>) -> Handled {
        let Ok(q) = Query::parse(pkt) else { return Handled::Drop };
        let snap = self.current.load();
        self.outcomes.servfail.increment(1);
        Response::new(out, &q, wire::RCODE_SERVFAIL, false).finish(&q, snap.limit(&q, transport), snap.max_payload);
        Handled::Reply
    }
}

impl Snapshot {
    fn new(config: &Config, previous: Option<&Catalog>) -> Result<Self, EngineError> {
        Ok(Snapshot {
            catalog: Catalog::rebuild(config, previous)?,
            allow: config.dns.allow.clone(),
            max_payload: config.dns.max_udp_payload,
            rate_limit: (config.dns.rate_limit > 0).then(|| {
                let d = &config.dns;
                RateLimiter::new(d.rate_limit, d.rate_limit_slip, d.rate_limit_ipv4_prefix, d.rate_limit_ipv6_prefix)
            }),
        })
    }

    fn limit(&self, q: &Query<'_>, transport: Transport) -> usize {
        match transport {
            Transport::Udp => q.udp_limit(self.max_payload),
            Transport::Tcp => u16::MAX as usize,
        }
    }

    fn allowed(&self, client: IpAddr) -> bool {
        self.allow.iter().any(|n| n.contains(&client))
    }
}
