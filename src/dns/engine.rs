//! One query's way through mskdns: parse, access check, our own answers (clusters, zones),
//! the cache, and on a miss the upstreams. Transport-agnostic: bytes in, bytes out.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::cache::{self, Answer, Failure};
use super::catalog::{Catalog, Local};
use super::cookie::{self, Cookies};
use super::query::Outcomes;
pub use super::query::{Exchange, Observed, Observer, ObserverSlot, Origin, Outcome, ServFail, Transport};
use super::ratelimit::{RateLimiter, Verdict};
use super::upstream::Question;
use super::wire::{self, Ede, Query, Reject, Response};
use crate::config::Config;

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

/// Everything a reload replaces, swapped as one.
pub struct Snapshot {
    pub catalog: Catalog,
    allow: Vec<IpNet>,
    max_payload: u16,
    rate_limit: Option<RateLimiter>,
    rate_limit_exempt: Vec<IpNet>,
    cookies: Cookies,
}

pub struct Engine {
    current: ArcSwap<Snapshot>,
    outcomes: Outcomes,
    panic_count: std::sync::atomic::AtomicU64,
    /// `dns.max_inflight`: misses and prefetches resolving at once, over every transport; each
    /// holds an upstream socket, so this is also what bounds the descriptors misses take.
    inflight: Arc<Semaphore>,
    inflight_limit: std::sync::atomic::AtomicUsize,
    over_inflight: metrics::Counter,
    /// Told of every query's outcome; empty (one atomic load per query) when nothing listens.
    observer: arc_swap::ArcSwapOption<ObserverSlot>,
    /// Misses and prefetches resolving off the receive paths; shutdown waits for them.
    tasks: tokio_util::task::TaskTracker,
}

/// Misses being resolved at once at most; past the limit a query gets SERVFAIL at once, not a
/// queue. Each holds a socket, so the limit also follows the open-file limit (see
/// `server::inflight_limit`).
pub const MAX_INFLIGHT_MISSES: usize = 16_384;

/// A slot of `dns.max_inflight`, held for as long as one miss is resolved or waited for.
pub type MissPermit = OwnedSemaphorePermit;

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
            panic_count: Default::default(),
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT_MISSES)),
            inflight_limit: MAX_INFLIGHT_MISSES.into(),
            over_inflight: metrics::counter!("mskdns_inflight_rejected_total"),
            observer: Default::default(),
            tasks: Default::default(),
        }))
    }

    /// Where the listeners spawn misses and prefetches, so that shutdown can wait for them.
    pub fn tasks(&self) -> &tokio_util::task::TaskTracker {
        &self.tasks
    }

    /// Sets (or, with `None`, removes) the observer told of every query's outcome.
    pub fn set_observer(&self, observer: Option<Box<dyn Observer>>) {
        self.observer.store(observer.map(|o| Arc::new(ObserverSlot(o))));
    }

    /// Counts a query's final outcome and tells the observer.
    fn done(&self, q: Observed<'_>) {
        self.outcomes.count(q.outcome);
        if let Some(o) = &*self.observer.load() {
            o.0.observe(&q);
        }
    }

    /// Whether an observer is set (what it needs is gathered only then).
    fn observed(&self) -> bool {
        self.observer.load().is_some()
    }

    /// Sets the in-flight limit shared by every transport (at most [`MAX_INFLIGHT_MISSES`]);
    /// called once, at the start, before any query.
    pub fn limit_inflight(&self, limit: usize) {
        let limit = limit.clamp(1, MAX_INFLIGHT_MISSES);
        let was = self.inflight_limit.swap(limit, std::sync::atomic::Ordering::Relaxed);
        if limit < was {
            self.inflight.forget_permits(was - limit);
        } else {
            self.inflight.add_permits(limit - was);
        }
    }

    /// A slot for one more miss, or `None` when `dns.max_inflight` are being resolved (the
    /// caller answers SERVFAIL at once; counted in `mskdns_inflight_rejected_total`).
    pub fn miss_permit(&self) -> Option<MissPermit> {
        match self.inflight.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                self.over_inflight.increment(1);
                None
            }
        }
    }

    /// Misses being resolved or waited for now, over every transport.
    pub fn inflight(&self) -> usize {
        self.inflight_limit.load(std::sync::atomic::Ordering::Relaxed) - self.inflight.available_permits()
    }

    /// Builds a snapshot of `config` (reusing what the running one can give: cluster resolvers
    /// and their cache) and swaps it in between two queries; on error the running one stays.
    /// The control plane (crate::control) is the only caller: it merges the sources first.
    pub fn apply(&self, config: &Config) -> Result<(), EngineError> {
        let next = Snapshot::new(config, Some(&self.current.load().catalog))?;
        self.current.store(Arc::new(next));
        Ok(())
    }

    /// The configuration in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn upstream_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.current.load().catalog.default_forwarder().addrs()
    }

    /// Entries and bytes of the answer cache (all forwarders together), and the bytes reserved
    /// for its front table.
    pub fn cache_usage(&self) -> (u64, u64, u64) {
        let snap = self.current.load();
        let c = snap.catalog.cache();
        c.settle();
        (c.entry_count(), c.weighted_bytes(), c.front_reserved_bytes())
    }

    /// The name of the view each listener (`dns.listen`, then DoT, then DoH) selects.
    pub fn views_by_listener(&self) -> Vec<String> {
        self.current.load().catalog.listener_views()
    }

    /// Whether `client` is in `dns.allow` (checked before any work is done for it).
    pub fn allows(&self, client: IpAddr) -> bool {
        self.current.load().allowed(client.to_canonical())
    }

    /// The longest a miss can take to resolve or fail.
    pub fn resolve_deadline(&self) -> Duration {
        self.current.load().catalog.default_forwarder().deadline()
    }

    /// Answers what can be answered without waiting on the network. A panic on the way is
    /// answered SERVFAIL, counted and logged: it never takes the listener down.
    pub fn handle(&self, pkt: &[u8], from: Origin, out: &mut Vec<u8>) -> Handled {
        self.outcomes.queries[from.transport as usize].increment(1);
        match crate::panic::catch(|| self.answer_now(pkt, from, out)) {
            Ok((Handled::Miss, _)) => Handled::Miss,
            Ok((h, outcome)) => {
                self.done(Observed::at_once(from, pkt, if h == Handled::Drop { &[] } else { out }, outcome));
                h
            }
            Err(e) => self.panicked(pkt, from, out, &e),
        }
    }

    /// Panics caught while answering since the start.
    pub fn panics(&self) -> u64 {
        self.panic_count.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn panicked(&self, pkt: &[u8], from: Origin, out: &mut Vec<u8>, e: &crate::panic::Caught) -> Handled {
        self.outcomes.panics.increment(1);
        self.panic_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = crate::panic::catch(|| Query::parse(pkt).ok().map(|q| wire::wire_to_string(q.name())))
            .ok()
            .flatten()
            .unwrap_or_else(|| "(unparsed)".into());
        tracing::error!(query = %name, client = %from.client, panic = %e, "panic while answering a query: SERVFAIL sent, the listener goes on");
        crate::panic::catch(|| self.servfail(pkt, from, out, ServFail::Panic)).unwrap_or(Handled::Drop)
    }

    fn answer_now(&self, pkt: &[u8], from: Origin, out: &mut Vec<u8>) -> (Handled, Outcome) {
        let snap = self.current.load();
        let client = from.client.to_canonical();
        let q = match Query::parse(pkt) {
            Ok(q) => q,
            Err(reject) => return self.reject(&snap, reject, client, out),
        };
        let allowed = snap.allowed(client);
        let (h, outcome) = self.answer_query(&snap, &q, allowed, client, from, out);
        if allowed && matches!(h, Handled::Reply | Handled::ReplyAndPrefetch) {
            snap.add_options(&q, client, out, None, 0);
        }
        (h, outcome)
    }

    fn answer_query(
        &self,
        snap: &Snapshot,
        q: &Query<'_>,
        allowed: bool,
        client: IpAddr,
        from: Origin,
        out: &mut Vec<u8>,
    ) -> (Handled, Outcome) {
        let q = *q;
        let limit = snap.limit(&q, from.transport);
        // Every UDP answer counts, REFUSED too, unless the client proved its address with a
        // valid server cookie or is exempt (loopback cannot be spoofed from the network).
        if from.transport == Transport::Udp
            && let Some(rl) = &snap.rate_limit
            && !snap.rate_limit_exempt.iter().any(|n| n.contains(&client))
            && !(allowed && q.cookie.is_some_and(|c| snap.cookies.valid(c, client, cookie::now())))
        {
            match rl.check(client) {
                Verdict::Send => {}
                Verdict::Drop => return (Handled::Drop, Outcome::RateLimited),
                Verdict::Truncate => {
                    Response::new(out, &q, wire::RCODE_NOERROR, false).finish(&q, 0, snap.max_payload);
                    return (Handled::Reply, Outcome::RateLimited);
                }
            }
        }
        if !allowed {
            Response::new(out, &q, wire::RCODE_REFUSED, false).finish(&q, limit, snap.max_payload);
            return (Handled::Reply, Outcome::Refused);
        }
        if q.tsig.is_some() {
            // No keys are configured here, so no signature can be checked (RFC 8945 5.2).
            if wire::tsig_badkey(out, &q, snap.max_payload) {
                return (Handled::Reply, Outcome::NotAuth);
            }
            wire::header_only(out, q.id, q.flags(), wire::RCODE_FORMERR);
            return (Handled::Reply, Outcome::FormErr);
        }
        if q.edns.is_some_and(|e| e.version > 0) {
            wire::badvers(out, &q, snap.max_payload);
            return (Handled::Reply, Outcome::BadVers);
        }
        if matches!(q.qtype, wire::TYPE_AXFR | wire::TYPE_IXFR | wire::TYPE_OPT) {
            Response::new(out, &q, wire::RCODE_REFUSED, false).finish(&q, limit, snap.max_payload);
            return (Handled::Reply, Outcome::Refused);
        }
        let mut lc_buf = [0u8; wire::MAX_NAME_LEN];
        let lc_len = wire::lowercase_name(q.name(), &mut lc_buf);
        let lc = &lc_buf[..lc_len];
        let forwarder = match snap.catalog.answer(&q, lc, from.listener, client, out, limit, snap.max_payload) {
            Local::Forward(f, _) => f,
            local => return (Handled::Reply, local_outcome(&local)),
        };
        if q.qtype == wire::TYPE_ANY {
            // RFC 8482: no upstream ANY (an amplification vector); one synthesized HINFO instead.
            let mut r = Response::new(out, &q, wire::RCODE_NOERROR, false);
            r.record_at_qname(wire::Section::Answer, &wire::RFC8482_HINFO);
            r.finish(&q, limit, snap.max_payload);
            return (Handled::Reply, Outcome::Any);
        }
        let mut kb = [0u8; cache::KEY_MAX];
        let now = Instant::now();
        if let Some(answer) = forwarder.cached(cache::key_into(&mut kb, forwarder.id(), lc, &q), now) {
            answer.serve(&q, out, now, limit, snap.max_payload);
            let h = if answer.take_prefetch(now) { Handled::ReplyAndPrefetch } else { Handled::Reply };
            return (h, Outcome::CacheHit);
        }
        (Handled::Miss, Outcome::Forwarded)
    }

    fn reject(&self, snap: &Snapshot, reject: Reject, client: IpAddr, out: &mut Vec<u8>) -> (Handled, Outcome) {
        // Say nothing to strangers, not even FORMERR.
        if !snap.allowed(client) {
            return (Handled::Drop, Outcome::Dropped);
        }
        match reject {
            Reject::Drop => (Handled::Drop, Outcome::Dropped),
            Reject::FormErr { id, flags } => {
                wire::header_only(out, id, flags, wire::RCODE_FORMERR);
                (Handled::Reply, Outcome::FormErr)
            }
            Reject::NotImp { id, flags } => {
                wire::header_only(out, id, flags, wire::RCODE_NOTIMP);
                (Handled::Reply, Outcome::NotImp)
            }
        }
    }

    /// [`Engine::prefetch`] in a task of the engine's, when an in-flight slot is free (from a
    /// tokio thread; the UDP threads spawn on the runtime's handle themselves).
    pub fn spawn_prefetch(self: &Arc<Self>, pkt: &[u8], from: Origin) {
        if let Some(permit) = self.miss_permit() {
            let (engine, pkt) = (self.clone(), pkt.to_vec());
            self.tasks.spawn(async move { engine.prefetch(&pkt, from, permit).await });
        }
    }

    /// Refreshes the cached answer for a packet that [`Engine::handle`] answered from the cache
    /// near its expiry; the client already has its answer, so nothing is sent.
    pub async fn prefetch(&self, pkt: &[u8], from: Origin, permit: MissPermit) {
        let mut out = Vec::new();
        if let Err(e) = crate::panic::guarded(self.lookup(pkt, from, &mut out, true, permit)).await {
            // The client has its answer already: nothing is sent, only the panic is counted.
            self.panicked(pkt, from, &mut out, &e);
        }
    }

    /// Resolves a packet that [`Engine::handle`] called a miss: one upstream query per key
    /// however many clients ask at once; SERVFAIL if the upstreams fail.
    pub async fn resolve(&self, pkt: &[u8], from: Origin, out: &mut Vec<u8>, permit: MissPermit) -> Handled {
        let started = Instant::now();
        match crate::panic::guarded(self.lookup(pkt, from, out, false, permit)).await {
            Ok((h, Some(outcome), answer)) => {
                let response = if h == Handled::Drop { &[][..] } else { &out[..] };
                let mut q = Observed { latency: started.elapsed(), ..Observed::at_once(from, pkt, response, outcome) };
                let exchange = match &answer {
                    Some(a) if self.observed() => {
                        q.upstream = a.upstream();
                        a.exchange_once()
                    }
                    _ => None,
                };
                q.exchange = exchange.map(|e| Exchange {
                    upstream: e.upstream,
                    received: e.received,
                    rtt: e.rtt,
                    tcp: e.tcp,
                    response: answer.as_ref().map_or(&[][..], |a| a.bytes()),
                });
                self.done(q);
                h
            }
            Ok((h, None, _)) => h,
            Err(e) => self.panicked(pkt, from, out, &e),
        }
    }

    /// [`Engine::resolve`] with a slot of its own, or SERVFAIL at once when none is free.
    pub async fn resolve_or_servfail(&self, pkt: &[u8], from: Origin, out: &mut Vec<u8>) -> Handled {
        match self.miss_permit() {
            Some(permit) => self.resolve(pkt, from, out, permit).await,
            None => self.servfail(pkt, from, out, ServFail::Busy),
        }
    }

    async fn lookup(
        &self,
        pkt: &[u8],
        from: Origin,
        out: &mut Vec<u8>,
        refresh: bool,
        permit: MissPermit,
    ) -> (Handled, Option<Outcome>, Option<Arc<Answer>>) {
        let Ok(q) = Query::parse(pkt) else { return (Handled::Drop, (!refresh).then_some(Outcome::Dropped), None) };
        let snap = self.current.load_full();
        let client = from.client.to_canonical();
        let limit = snap.limit(&q, from.transport);
        let mut lc_buf = [0u8; wire::MAX_NAME_LEN];
        let lc_len = wire::lowercase_name(q.name(), &mut lc_buf);
        let lc = &lc_buf[..lc_len];
        let (forwarder, cluster) =
            match snap.catalog.answer(&q, lc, from.listener, client, out, limit, snap.max_payload) {
                Local::Forward(f, c) => (f, c),
                // The configuration changed since `handle`: answered here after all.
                local => return (Handled::Reply, (!refresh).then(|| local_outcome(&local)), None),
            };
        let mut kb = [0u8; cache::KEY_MAX];
        let key: cache::Key = cache::key_into(&mut kb, forwarder.id(), lc, &q).into();
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
        let result = forwarder.resolve(key.clone(), question, refresh, Some(permit)).await;
        if refresh {
            if matches!(result, Err(Failure::Budget)) {
                self.outcomes.prefetches_skipped.increment(1);
            }
            return (Handled::Drop, None, None);
        }
        let outcome;
        let mut ede = None;
        let mut answered = None;
        match result {
            Ok(answer) => {
                outcome = Outcome::Forwarded;
                if let Some(c) = cluster {
                    c.count_answer();
                }
                answer.serve(&q, out, Instant::now(), limit, snap.max_payload);
                answered = Some(answer);
            }
            Err(e) => {
                tracing::debug!(error = %e, name = %wire::wire_to_string(lc), "resolution failed");
                if let Some(stale) = forwarder.stale(&key, Instant::now()) {
                    outcome = Outcome::Stale;
                    ede = Some(Ede::STALE);
                    stale.serve_stale(&q, out, limit, snap.max_payload);
                } else {
                    let why = if matches!(e, Failure::Budget) { ServFail::Budget } else { ServFail::Upstream };
                    outcome = Outcome::ServFail(why);
                    ede = why.ede();
                    Response::new(out, &q, wire::RCODE_SERVFAIL, false).finish(&q, limit, snap.max_payload);
                }
            }
        }
        snap.add_options(&q, client, out, ede, limit);
        (Handled::Reply, Some(outcome), answered)
    }

    /// SERVFAIL for `pkt` (nothing for what does not parse), counted with `why` and observed.
    pub fn servfail(&self, pkt: &[u8], from: Origin, out: &mut Vec<u8>, why: ServFail) -> Handled {
        let Ok(q) = Query::parse(pkt) else { return Handled::Drop };
        let snap = self.current.load();
        let limit = snap.limit(&q, from.transport);
        Response::new(out, &q, wire::RCODE_SERVFAIL, false).finish(&q, limit, snap.max_payload);
        snap.add_options(&q, from.client.to_canonical(), out, why.ede(), limit);
        self.done(Observed::at_once(from, pkt, out, Outcome::ServFail(why)));
        Handled::Reply
    }
}

/// The outcome of a query the catalog answered itself.
fn local_outcome(local: &Local<'_>) -> Outcome {
    match local {
        Local::Cluster => Outcome::Cluster,
        Local::Zone => Outcome::Zone,
        Local::UnknownCluster => Outcome::UnknownCluster,
        Local::Unavailable => Outcome::ServFail(ServFail::Unavailable),
        Local::Refused => Outcome::Refused,
        Local::Forward(..) => Outcome::Forwarded,
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
            rate_limit_exempt: config.dns.rate_limit_exempt.clone(),
            cookies: Cookies::new(config.dns.cookie_secret.map(|s| s.0)),
        })
    }

    /// Adds our server cookie to a response whose query carried a client cookie (RFC 7873 5.2).
    /// The options of the response's OPT record (when the query had EDNS): our COOKIE when the
    /// client sent one, and `ede` when it fits within `limit`.
    fn add_options(&self, q: &Query<'_>, client: IpAddr, out: &mut Vec<u8>, ede: Option<Ede>, limit: usize) {
        // Most answers have nothing to add: no look at the OPT record for them.
        if q.cookie.is_none() && ede.is_none() {
            return;
        }
        let Some(opt) = wire::bare_opt(out) else { return };
        if let Some(c) = q.cookie {
            let server = self.cookies.server_cookie(&c[..8], client, cookie::now());
            wire::append_option(out, opt, cookie::OPTION_CODE, &[&c[..8], &server]);
        }
        // The limit kept room for the cookie (UDP): the EDE must fit in what is left.
        let room = limit + if q.cookie.is_some() { cookie::OPTION_LEN } else { 0 };
        if let Some(e) = ede.filter(|e| out.len() + e.wire_len() <= room) {
            e.append(out, opt);
        }
    }

    fn limit(&self, q: &Query<'_>, transport: Transport) -> usize {
        match transport {
            // Room for the COOKIE option added at the end.
            Transport::Udp if q.cookie.is_some() => q.udp_limit(self.max_payload) - cookie::OPTION_LEN,
            Transport::Udp => q.udp_limit(self.max_payload),
            Transport::Tcp | Transport::Dot | Transport::Doh => u16::MAX as usize,
        }
    }

    fn allowed(&self, client: IpAddr) -> bool {
        self.allow.iter().any(|n| n.contains(&client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, Query as HQuery, ResponseCode};
    use hickory_proto::rr::{Name, RData, Record, RecordType, rdata::A};

    const BOOT: &str = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com.";

    fn config(upstream: &str) -> Config {
        Config::parse_toml(&format!(
            r#"
            [dns]
            listen = ["127.0.0.1:0"]
            upstreams = ["{upstream}"]
            allow = ["127.0.0.0/8"]
            rate_limit = 0
            [[clusters]]
            bootstrap = "{}"
            addresses = ["10.1.0.10", "10.1.1.10"]
            "#,
            BOOT.trim_end_matches('.')
        ))
        .unwrap()
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(4242, MessageType::Query, hickory_proto::op::OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(HQuery::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn from(client: &str) -> Origin {
        Origin { client: client.parse().unwrap(), port: 5300, listener: 0, transport: Transport::Udp }
    }

    fn a_records(out: &[u8]) -> (ResponseCode, Vec<String>) {
        let m = Message::from_vec(out).unwrap();
        assert_eq!(m.metadata.id, 4242);
        let ips = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.to_string()),
                _ => None,
            })
            .collect();
        (m.metadata.response_code, ips)
    }

    #[test]
    fn a_cluster_name_is_answered_from_the_snapshot_and_an_applied_one_replaces_it() {
        let c = config("127.0.0.1:9");
        let engine = Engine::from_config(&c).unwrap();
        let mut out = Vec::new();
        assert_eq!(engine.handle(&query(BOOT, RecordType::A), from("127.0.0.1"), &mut out), Handled::Reply);
        assert_eq!(a_records(&out), (ResponseCode::NoError, vec!["10.1.0.10".into(), "10.1.1.10".into()]));

        let mut next = c.clone();
        next.clusters[0].addresses = vec!["10.2.0.1".parse().unwrap()];
        engine.apply(&next).unwrap();
        out.clear();
        engine.handle(&query(BOOT, RecordType::A), from("127.0.0.1"), &mut out);
        assert_eq!(a_records(&out).1, ["10.2.0.1"]);
    }

    #[test]
    fn strangers_are_refused_and_garbage_gets_formerr_or_nothing() {
        let engine = Engine::from_config(&config("127.0.0.1:9")).unwrap();
        let mut out = Vec::new();
        let h = engine.handle(&query(BOOT, RecordType::A), from("192.0.2.1"), &mut out);
        assert!(!engine.allows("192.0.2.1".parse().unwrap()));
        assert_eq!(h, Handled::Reply);
        assert_eq!(a_records(&out), (ResponseCode::Refused, vec![]), "refused, no addresses");
        // A stranger's garbage gets nothing at all, not even FORMERR.
        out.clear();
        assert_eq!(engine.handle(&[0xff; 12], from("192.0.2.1"), &mut out), Handled::Drop);
        for garbage in [&b""[..], &[0u8; 5], &[0xff; 12], &query(BOOT, RecordType::A)[..20]] {
            out.clear();
            match engine.handle(garbage, from("127.0.0.1"), &mut out) {
                Handled::Drop => {}
                Handled::Reply => {
                    assert_eq!(Message::from_vec(&out).unwrap().metadata.response_code, ResponseCode::FormErr)
                }
                h => panic!("{garbage:?}: {h:?}"),
            }
        }
        assert_eq!(engine.panics(), 0);
    }

    /// An upstream on loopback answering every A query with 192.0.2.7 after `delay`; its
    /// address and the count of queries it was asked.
    async fn slow_upstream(delay: Duration) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let upstream = sock.local_addr().unwrap();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = asked.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut r = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
                r.metadata.recursion_available = true;
                r.add_queries(q.queries.clone());
                let name = q.queries[0].name().clone();
                r.add_answer(Record::from_rdata(name, 300, RData::A(A::new(192, 0, 2, 7))));
                let sock = sock.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = sock.send_to(&r.to_vec().unwrap(), peer).await;
                });
            }
        });
        (upstream, asked)
    }

    #[tokio::test]
    async fn an_asker_that_goes_away_does_not_fail_the_others_waiting_on_its_lookup() {
        // Under the first retransmission timer (200 ms): one datagram per lookup.
        let (upstream, asked) = slow_upstream(Duration::from_millis(150)).await;
        let engine = Engine::from_config(&config(&upstream.to_string())).unwrap();
        let pkt = query("shared.example.org.", RecordType::A);
        // The first asker leads the lookup, then goes away (a DoH stream reset drops its future).
        let first = {
            let (engine, pkt) = (engine.clone(), pkt.clone());
            tokio::spawn(async move { engine.resolve_or_servfail(&pkt, from("127.0.0.1"), &mut Vec::new()).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        let second = {
            let (engine, pkt) = (engine.clone(), pkt.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                engine.resolve_or_servfail(&pkt, from("127.0.0.2"), &mut out).await;
                out
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        first.abort();
        let out = second.await.unwrap();
        assert_eq!(a_records(&out), (ResponseCode::NoError, vec!["192.0.2.7".into()]));
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1, "one lookup, shared");
        // The lookup's slot is given back once it is done.
        assert_eq!(engine.inflight(), 0);
    }

    #[tokio::test]
    async fn past_the_inflight_limit_a_miss_gets_servfail_at_once_on_any_transport() {
        let (upstream, _) = slow_upstream(Duration::from_millis(500)).await;
        let engine = Engine::from_config(&config(&upstream.to_string())).unwrap();
        engine.limit_inflight(2);
        let held = [engine.miss_permit().unwrap(), engine.miss_permit().unwrap()];
        assert!(engine.miss_permit().is_none());
        for transport in Transport::ALL {
            let pkt = query("busy.example.org.", RecordType::A);
            let mut out = Vec::new();
            let at = Origin { client: "127.0.0.1".parse().unwrap(), port: 5300, listener: 0, transport };
            let started = std::time::Instant::now();
            assert_eq!(engine.resolve_or_servfail(&pkt, at, &mut out).await, Handled::Reply);
            assert!(started.elapsed() < Duration::from_millis(100), "at once");
            assert_eq!(a_records(&out).0, ResponseCode::ServFail, "{transport:?}");
        }
        drop(held);
        assert_eq!(engine.inflight(), 0);
        engine.limit_inflight(5);
        let five: Vec<_> = (0..5).map_while(|_| engine.miss_permit()).collect();
        assert_eq!(five.len(), 5);
    }

    /// Remembers what it is told: the client, the outcome and the response's size.
    #[derive(Clone, Default)]
    struct Seen(Arc<std::sync::Mutex<Vec<(String, Outcome, usize)>>>);

    impl Observer for Seen {
        fn observe(&self, q: &Observed<'_>) {
            self.0.lock().unwrap().push((q.from.client.to_string(), q.outcome, q.response.len()));
        }
    }

    #[tokio::test]
    async fn every_query_has_one_outcome_told_to_the_observer() {
        let (upstream, _) = slow_upstream(Duration::ZERO).await;
        let engine = Engine::from_config(&config(&upstream.to_string())).unwrap();
        let seen = Seen::default();
        engine.set_observer(Some(Box::new(seen.clone())));
        let mut out = Vec::new();
        assert_eq!(engine.handle(&query(BOOT, RecordType::A), from("127.0.0.1"), &mut out), Handled::Reply);
        out.clear();
        assert_eq!(engine.handle(&query(BOOT, RecordType::A), from("192.0.2.1"), &mut out), Handled::Reply);
        out.clear();
        assert_eq!(engine.handle(&[0xff; 5], from("192.0.2.1"), &mut out), Handled::Drop);
        let pkt = query("www.example.org.", RecordType::A);
        out.clear();
        assert_eq!(engine.handle(&pkt, from("127.0.0.2"), &mut out), Handled::Miss);
        assert_eq!(seen.0.lock().unwrap().len(), 3, "a miss is not final: nothing told yet");
        out.clear();
        assert_eq!(engine.resolve_or_servfail(&pkt, from("127.0.0.2"), &mut out).await, Handled::Reply);
        let answered = out.len();
        out.clear();
        assert_eq!(engine.handle(&pkt, from("127.0.0.3"), &mut out), Handled::Reply);
        engine.limit_inflight(1);
        let _held = engine.miss_permit().unwrap();
        out.clear();
        let other = query("busy.example.org.", RecordType::A);
        assert_eq!(engine.resolve_or_servfail(&other, from("127.0.0.4"), &mut out).await, Handled::Reply);
        let got = seen.0.lock().unwrap().clone();
        let outcomes: Vec<(&str, Outcome)> = got.iter().map(|(c, o, _)| (c.as_str(), *o)).collect();
        assert_eq!(
            outcomes,
            [
                ("127.0.0.1", Outcome::Cluster),
                ("192.0.2.1", Outcome::Refused),
                ("192.0.2.1", Outcome::Dropped),
                ("127.0.0.2", Outcome::Forwarded),
                ("127.0.0.3", Outcome::CacheHit),
                ("127.0.0.4", Outcome::ServFail(ServFail::Busy)),
            ]
        );
        assert_eq!(got[2].2, 0, "nothing was sent to the stranger");
        assert_eq!(got[3].2, answered, "the response as sent");
        engine.set_observer(None);
        out.clear();
        engine.handle(&query(BOOT, RecordType::A), from("127.0.0.1"), &mut out);
        assert_eq!(seen.0.lock().unwrap().len(), 6, "no observer, nothing told");
    }

    #[tokio::test]
    async fn a_miss_is_resolved_upstream_once_then_served_from_the_cache() {
        let (upstream, asked) = slow_upstream(Duration::ZERO).await;
        let engine = Engine::from_config(&config(&upstream.to_string())).unwrap();
        let pkt = query("www.example.org.", RecordType::A);
        let mut out = Vec::new();
        assert_eq!(engine.handle(&pkt, from("127.0.0.1"), &mut out), Handled::Miss);
        assert_eq!(engine.resolve_or_servfail(&pkt, from("127.0.0.1"), &mut out).await, Handled::Reply);
        assert_eq!(a_records(&out), (ResponseCode::NoError, vec!["192.0.2.7".into()]));
        out.clear();
        assert_eq!(engine.handle(&pkt, from("127.0.0.1"), &mut out), Handled::Reply, "cached");
        assert_eq!(a_records(&out).1, ["192.0.2.7"]);
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
