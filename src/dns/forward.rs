//! A forwarding target: a set of upstream resolvers with its own answer cache and one
//! resolution in flight per key. The default upstreams are one; each cluster with a `forward`
//! target (a resolver in the cluster's own VPC) is another.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cache::{self, Answer, Cache, Inflight, Join, Shared};
use super::upstream::{Question, Upstreams};
use crate::config::CacheConfig;

pub struct Forwarder {
    cache: Arc<Cache>,
    /// This forwarder's key prefix in the shared cache.
    id: u32,
    inflight: Inflight,
    upstreams: Upstreams,
    /// What it was built from: a reload with the same settings keeps this forwarder and its cache.
    pub settings: Settings,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub addrs: Vec<std::net::SocketAddr>,
    pub attempt_timeout: Duration,
    pub cache: CacheConfig,
}

impl Forwarder {
    /// A forwarder whose answers go into the shared `cache`.
    pub fn new(settings: Settings, cache: Arc<Cache>) -> Self {
        Forwarder {
            id: cache.forwarder_id(),
            cache,
            inflight: Inflight::default(),
            upstreams: Upstreams::new(&settings.addrs, settings.attempt_timeout, settings.cache.clone()),
            settings,
        }
    }

    /// A cached answer still within its TTL.
    pub fn cached(&self, key: &[u8], now: Instant) -> Option<Arc<Answer>> {
        self.cache.get(key).filter(|a| a.remaining(now) > 0)
    }

    /// An expired answer still within the serve-stale window (RFC 8767).
    pub fn stale(&self, key: &[u8], now: Instant) -> Option<Arc<Answer>> {
        let window = self.settings.cache.serve_stale_secs as u64;
        self.cache.get(key).filter(|a| a.remaining(now) == 0 && a.age(now) <= a.ttl as u64 + window)
    }

    /// Resolves `key` upstream, once however many ask at the same time, and caches the answer.
    /// `refresh`: ask upstream even if a valid answer is cached (prefetch).
    pub async fn resolve(&self, key: cache::Key, question: Question<'_>, refresh: bool) -> Shared {
        match self.inflight.join(&key) {
            Join::Wait(rx) => rx.await.unwrap_or_else(|_| Err("the resolving client went away".into())),
            Join::Lead(leader) => {
                // Another client's resolution may have finished between the lookup and now.
                let result = match self.cached(&key, Instant::now()).filter(|_| !refresh) {
                    Some(a) => Ok(a),
                    None => self.upstreams.resolve(question).await.map(Arc::new).map_err(|e| e.to_string().into()),
                };
                if let Ok(a) = &result
                    && a.ttl > 0
                {
                    self.cache.insert(key, a.clone());
                }
                leader.finish(&result);
                result
            }
        }
    }

    /// The A and AAAA addresses of `lc` (a lowercase wire-form name), through this forwarder's
    /// cache: where the SNI proxy connects for a cluster with a `forward` target.
    pub async fn lookup(&self, lc: &[u8]) -> Result<Vec<std::net::IpAddr>, String> {
        use hickory_proto::rr::RData;
        let mut found = Vec::new();
        for qtype in [1u16, 28] {
            let mut pkt = vec![0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
            pkt.extend_from_slice(lc);
            pkt.extend_from_slice(&qtype.to_be_bytes());
            pkt.extend_from_slice(&1u16.to_be_bytes());
            let q = super::wire::Query::parse(&pkt).map_err(|e| format!("query for the server name: {}", e.kind()))?;
            let mut kb = [0; cache::KEY_MAX];
            let key = cache::key_into(&mut kb, self.id, lc, &q);
            let question = Question { lc_name: lc, qtype, qclass: 1, dnssec_ok: false, checking_disabled: false };
            let answer = match self.cached(key, Instant::now()) {
                Some(a) => a,
                None => self.resolve(key.into(), question, false).await.map_err(|e| e.to_string())?,
            };
            let mut resp = Vec::new();
            answer.serve(&q, &mut resp, Instant::now(), u16::MAX as usize, u16::MAX);
            let msg = hickory_proto::op::Message::from_vec(&resp).map_err(|e| e.to_string())?;
            found.extend(msg.answers.iter().filter_map(|r| match &r.data {
                RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(std::net::IpAddr::V6(a.0)),
                _ => None,
            }));
        }
        Ok(found)
    }

    /// This forwarder's prefix for [`cache::key_into`].
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn addrs(&self) -> Vec<std::net::SocketAddr> {
        self.upstreams.addrs()
    }

    pub fn deadline(&self) -> Duration {
        self.upstreams.deadline()
    }
}
