//! Where a query came from ([`Origin`]: client, listener, [`Transport`]) and what became of it
//! ([`Outcome`]), counted in one place ([`Outcomes`]) and handed to an optional [`Observer`] (a
//! query log, per-client statistics).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    /// DNS over TLS (RFC 7858).
    Dot,
    /// DNS over HTTPS (RFC 8484).
    Doh,
}

impl Transport {
    pub const ALL: [Transport; 4] = [Transport::Udp, Transport::Tcp, Transport::Dot, Transport::Doh];

    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Dot => "dot",
            Transport::Doh => "doh",
        }
    }
}

/// Where a query came from: the client (address and port), and which `dns.listen` entry it
/// arrived on.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    pub client: IpAddr,
    pub port: u16,
    pub listener: usize,
    pub transport: Transport,
}

/// What became of a query: what answered it, or why nothing useful did. Every query gets one,
/// counted in one place ([`Outcomes::count`]) and handed to the [`Observer`] when one is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A configured (or discovered) cluster's own answer.
    Cluster,
    /// A name of a zone file.
    Zone,
    /// The name of a cluster not configured, answered NXDOMAIN (`unknown_clusters = "nxdomain"`).
    UnknownCluster,
    CacheHit,
    /// Answered by an upstream.
    Forwarded,
    /// The upstreams failed; an expired answer was served (RFC 8767).
    Stale,
    ServFail(ServFail),
    Refused,
    FormErr,
    NotImp,
    /// TSIG-signed: BADKEY (no keys are configured).
    NotAuth,
    BadVers,
    /// Nothing sent: unparsable, or from outside `allow` and not even a header.
    Dropped,
    /// Over the UDP rate limit: dropped, or sent truncated.
    RateLimited,
    /// ANY: one synthesized HINFO (RFC 8482).
    Any,
}

/// Why a query got SERVFAIL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServFail {
    /// No upstream gave a usable answer in time.
    Upstream,
    /// The cluster's target has no address yet (VPC endpoint addresses never read).
    Unavailable,
    /// `dns.max_inflight` misses were already in flight.
    Busy,
    /// Answering it panicked (caught, logged).
    Panic,
    /// The upstream packet budget (`dns.upstream_max_pps`) did not let it go, and no stale
    /// answer was held.
    Budget,
}

impl ServFail {
    /// The Extended DNS Error the SERVFAIL carries (RFC 8914), where one says more than the rcode.
    pub fn ede(self) -> Option<super::wire::Ede> {
        use super::wire::Ede;
        match self {
            ServFail::Upstream => Some(Ede::UPSTREAM),
            ServFail::Busy => Some(Ede::BUSY),
            ServFail::Budget => Some(Ede::BUDGET),
            ServFail::Unavailable | ServFail::Panic => None,
        }
    }
}

impl Outcome {
    const LABELS: [&'static str; 15] = [
        "cluster",
        "zone",
        "unknown_cluster",
        "cache_hit",
        "forwarded",
        "stale",
        "servfail",
        "refused",
        "formerr",
        "notimp",
        "notauth",
        "badvers",
        "dropped",
        "rate_limited",
        "any_rfc8482",
    ];

    /// The `outcome` label of `mskdns_responses_total`.
    pub fn label(self) -> &'static str {
        Self::LABELS[self.index()]
    }

    fn index(self) -> usize {
        match self {
            Outcome::Cluster => 0,
            Outcome::Zone => 1,
            Outcome::UnknownCluster => 2,
            Outcome::CacheHit => 3,
            Outcome::Forwarded => 4,
            Outcome::Stale => 5,
            Outcome::ServFail(_) => 6,
            Outcome::Refused => 7,
            Outcome::FormErr => 8,
            Outcome::NotImp => 9,
            Outcome::NotAuth => 10,
            Outcome::BadVers => 11,
            Outcome::Dropped => 12,
            Outcome::RateLimited => 13,
            Outcome::Any => 14,
        }
    }
}

/// A query as an [`Observer`] is told of it.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub from: Origin,
    pub query: &'a [u8],
    /// What was sent: empty when nothing was.
    pub response: &'a [u8],
    pub outcome: Outcome,
    /// From the query's arrival to its answer, for those answered after a wait (a miss); zero
    /// for those answered at once.
    pub latency: Duration,
    /// The upstream that answered a forwarded query.
    pub upstream: Option<SocketAddr>,
    /// The upstream exchange, told once however many clients shared it: to the first whose
    /// answer came from it.
    pub exchange: Option<Exchange<'a>>,
}

/// One exchange with an upstream that gave an answer.
#[derive(Debug, Clone, Copy)]
pub struct Exchange<'a> {
    pub upstream: SocketAddr,
    /// When the answer arrived, and how long after the query left.
    pub received: std::time::SystemTime,
    pub rtt: Duration,
    /// Over TCP (upstream's UDP answer was truncated).
    pub tcp: bool,
    /// The answer as cached: upstream's bytes without its OPT record.
    pub response: &'a [u8],
}

impl<'a> Observed<'a> {
    /// A query answered at once.
    pub fn at_once(from: Origin, query: &'a [u8], response: &'a [u8], outcome: Outcome) -> Self {
        Observed { from, query, response, outcome, latency: Duration::ZERO, upstream: None, exchange: None }
    }
}

/// Told of every query once its outcome is known (a query log, per-client statistics). Called on
/// the answering thread: it must not block.
pub trait Observer: Send + Sync {
    fn observe(&self, q: &Observed<'_>);
}

/// An [`Observer`] behind the engine's swappable slot.
pub struct ObserverSlot(pub Box<dyn Observer>);

/// Responses by outcome, registered once so the hot path only bumps an atomic.
pub(super) struct Outcomes {
    responses: [metrics::Counter; 15],
    pub(super) cache_hits: metrics::Counter,
    pub(super) cache_misses: metrics::Counter,
    pub(super) prefetches: metrics::Counter,
    /// Prefetches the upstream packet budget did not let go.
    pub(super) prefetches_skipped: metrics::Counter,
    pub(super) panics: metrics::Counter,
    /// Queries by transport, in the order of [`Transport::ALL`].
    pub(super) queries: [metrics::Counter; 4],
}

impl Outcomes {
    pub(super) fn new() -> Self {
        Outcomes {
            responses: Outcome::LABELS.map(|k| metrics::counter!("mskdns_responses_total", "outcome" => k)),
            cache_hits: metrics::counter!("mskdns_cache_hits_total"),
            cache_misses: metrics::counter!("mskdns_cache_misses_total"),
            prefetches: metrics::counter!("mskdns_cache_prefetches_total"),
            prefetches_skipped: metrics::counter!("mskdns_cache_prefetches_skipped_total", "reason" => "budget"),
            panics: metrics::counter!("mskdns_panics_total", "where" => "dns"),
            queries: Transport::ALL.map(|t| metrics::counter!("mskdns_queries_total", "transport" => t.label())),
        }
    }

    /// The one place a query's outcome is counted.
    pub(super) fn count(&self, outcome: Outcome) {
        self.responses[outcome.index()].increment(1);
        if outcome == Outcome::CacheHit {
            self.cache_hits.increment(1);
        }
    }
}
