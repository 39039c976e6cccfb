//! A forwarding target: a set of upstream resolvers with its own answer cache and one
//! resolution in flight per key. The default upstreams are one; each cluster with a `forward`
//! target (a resolver in the cluster's own VPC) is another.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

use super::budget::{Budget, Class};
use super::cache::{self, Answer, Cache, Failure, Inflight, Join, Shared};
use super::upstream::UpstreamError;
use super::upstream::{Question, Upstreams};
use crate::config::CacheConfig;

pub struct Forwarder {
    cache: Arc<Cache>,
    /// This forwarder's key prefix in the shared cache.
    id: u32,
    inflight: Arc<Inflight>,
    upstreams: Arc<Upstreams>,
    /// What it was built from: a reload with the same settings keeps this forwarder and its cache.
    pub settings: Settings,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub addrs: Vec<std::net::SocketAddr>,
    pub attempt_timeout: Duration,
    pub cache: CacheConfig,
    /// The packet budget of each of `addrs` (`dns.upstream_max_pps`), shared with every
    /// forwarder that sends to the same upstream.
    pub budgets: Vec<Option<Arc<Budget>>>,
}

impl Forwarder {
    /// A forwarder whose answers go into the shared `cache`.
    pub fn new(settings: Settings, cache: Arc<Cache>) -> Self {
        Forwarder {
            id: cache.forwarder_id(),
            cache,
            inflight: Arc::default(),
            upstreams: Arc::new(Upstreams::new(
                &settings.addrs,
                &settings.budgets,
                settings.attempt_timeout,
                settings.cache.clone(),
            )),
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
    ///
    /// The upstream exchange runs in a task of its own that holds `permit` (a slot of
    /// `dns.max_inflight`, so its socket is counted); cancelling this future (a client that went
    /// away) only stops this asker's wait, never the lookup other askers share. A waiter keeps its
    /// permit while it waits, so askers are bounded too.
    pub async fn resolve(
        &self,
        key: cache::Key,
        question: Question<'_>,
        refresh: bool,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Shared {
        let rx = match self.inflight.join(&key) {
            Join::Wait(rx) => {
                let r = rx.await;
                drop(permit);
                return r.unwrap_or_else(|_| Err(ended()));
            }
            Join::Lead(leader, rx) => {
                let (cache, upstreams) = (self.cache.clone(), self.upstreams.clone());
                let (lc, qtype, qclass) = (question.lc_name.to_vec(), question.qtype, question.qclass);
                let (dnssec_ok, checking_disabled) = (question.dnssec_ok, question.checking_disabled);
                tokio::spawn(async move {
                    let _permit = permit;
                    // Another client's resolution may have finished between the lookup and now.
                    let cached = cache.get(&key).filter(|a| !refresh && a.remaining(Instant::now()) > 0);
                    let result = match cached {
                        Some(a) => Ok(a),
                        None => {
                            let q = Question { lc_name: &lc, qtype, qclass, dnssec_ok, checking_disabled };
                            let class = if refresh { Class::Prefetch } else { Class::Miss };
                            upstreams.resolve(q, class).await.map(Arc::new).map_err(|e| match e {
                                UpstreamError::Budget { .. } => Failure::Budget,
                                e => Failure::Upstream(e.to_string().into()),
                            })
                        }
                    };
                    if let Ok(a) = &result
                        && a.ttl > 0
                    {
                        cache.insert(key, a.clone());
                    }
                    leader.finish(&result);
                });
                rx
            }
        };
        rx.await.unwrap_or_else(|_| Err(ended()))
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
                None => self.resolve(key.into(), question, false, None).await.map_err(|e| e.to_string())?,
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

fn ended() -> Failure {
    Failure::Upstream("the shared resolution ended without an answer".into())
}
