//! The upstream packet budget (`dns.upstream_max_pps`): at most N packets to one upstream in any
//! sliding second, with priorities, so that one mskdns forwarding a whole VPC's misses stays inside
//! the VPC resolver's limit (1,024 packets per second per network interface, past which AWS drops
//! silently) and degrades by answering stale or SERVFAIL at once instead of timing out.
//!
//! The window is exact: the send times of the last N packets are kept (8 bytes each; 900 → 7 KiB),
//! and a packet may go when fewer than its class's share of N were sent in the window. The window
//! is 1 s plus [`MARGIN`]: the time between taking a slot and the datagram leaving (scheduling on a
//! busy host) must not let two packets a second apart here arrive less than a second apart there.
//! Written by hand: the rate-limiting crates (governor and the like) are GCRA token buckets, which
//! bound a burst and a mean rate but not the count in every sliding second, and know no priorities.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// What `upstream_max_pps` means when unset, for the VPC resolver's addresses.
pub const VPC_RESOLVER_DEFAULT_PPS: u32 = 900;
/// The VPC resolver's link-local addresses, the same on every VPC.
pub const VPC_RESOLVER_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 253);
pub const VPC_RESOLVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x253);
/// Added to the one-second window: see the module documentation.
pub const MARGIN: Duration = Duration::from_millis(50);
/// The packets one TCP exchange with an upstream is counted as: SYN, the ACK that completes the
/// handshake, the query, the ACK of the answer, FIN and the ACK of the upstream's FIN.
pub const TCP_PACKETS: u32 = 6;
/// A budget binding this recently reports the upstream degraded on /readyz.
const BINDING_FOR: Duration = Duration::from_secs(2);
/// At most one log line per budget this often while it binds.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Whether `ip` is one of the VPC resolver's fixed addresses.
pub fn is_vpc_resolver(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == VPC_RESOLVER_V4,
        IpAddr::V6(v6) => v6 == VPC_RESOLVER_V6 || v6.to_ipv4_mapped() == Some(VPC_RESOLVER_V4),
    }
}

/// Who gets the budget first when it is short: a client's miss may use all of it, a retransmit or
/// the next upstream after a failure 90%, a probe of a down upstream 80%, a prefetch (whose client
/// has its answer already) half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Miss,
    Failover,
    Probe,
    Prefetch,
}

impl Class {
    fn share(self, limit: u32) -> usize {
        let l = limit as usize;
        match self {
            Class::Miss => l,
            Class::Failover => l * 9 / 10,
            Class::Probe => l * 8 / 10,
            Class::Prefetch => l / 2,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Class::Miss => "miss",
            Class::Failover => "failover",
            Class::Probe => "probe",
            Class::Prefetch => "prefetch",
        }
    }
}

/// The budget of one upstream, or of the addresses of one VPC resolver together.
pub struct Budget {
    /// What it covers, for the log, metrics and /readyz: an address, or the VPC resolver's.
    pub label: String,
    pub limit: u32,
    window: Duration,
    sent: Mutex<VecDeque<Instant>>,
    /// When a packet was last refused, and when the last log line was written.
    state: Mutex<Binding>,
    refused: [metrics::Counter; 4],
    refused_total: AtomicU64,
}

#[derive(Default)]
struct Binding {
    last_refused: Option<Instant>,
    logged: Option<Instant>,
    refused_since_log: u64,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Budget({} at {}/s)", self.label, self.limit)
    }
}

/// Budgets are equal when they cover the same upstreams at the same rate (a reload that keeps
/// both keeps the forwarders, and their budget with its window).
impl PartialEq for Budget {
    fn eq(&self, other: &Self) -> bool {
        self.label == other.label && self.limit == other.limit
    }
}

impl Budget {
    pub fn new(label: String, limit: u32) -> Self {
        let refused = [Class::Miss, Class::Failover, Class::Probe, Class::Prefetch].map(|c| {
            metrics::counter!("mskdns_upstream_budget_refused_total", "budget" => label.clone(), "class" => c.label())
        });
        Budget {
            label,
            limit: limit.max(1),
            window: Duration::from_secs(1) + MARGIN,
            sent: Mutex::new(VecDeque::with_capacity(limit.min(1 << 16) as usize)),
            state: Mutex::default(),
            refused,
            refused_total: AtomicU64::new(0),
        }
    }

    /// Takes `packets` slots for a packet of `class` now; false (counted, and logged at most once
    /// a minute) when its share of the window is used.
    pub fn take(&self, class: Class, packets: u32) -> bool {
        let now = Instant::now();
        {
            let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
            while sent.front().is_some_and(|t| now.saturating_duration_since(*t) > self.window) {
                sent.pop_front();
            }
            if sent.len() + packets as usize <= class.share(self.limit) {
                sent.extend(std::iter::repeat_n(now, packets as usize));
                return true;
            }
        }
        self.refused(class, now);
        false
    }

    fn refused(&self, class: Class, now: Instant) {
        let i = [Class::Miss, Class::Failover, Class::Probe, Class::Prefetch].iter().position(|c| *c == class);
        self.refused[i.unwrap_or(0)].increment(1);
        self.refused_total.fetch_add(1, Ordering::Relaxed);
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        b.last_refused = Some(now);
        b.refused_since_log += 1;
        if b.logged.is_none_or(|t| now.saturating_duration_since(t) >= LOG_EVERY) {
            tracing::warn!(
                upstream = %self.label, max_pps = self.limit, refused = b.refused_since_log,
                "upstream packet budget reached (dns.upstream_max_pps): misses past it are answered stale or SERVFAIL at once, prefetches skipped"
            );
            b.logged = Some(now);
            b.refused_since_log = 0;
        }
    }

    /// Whether it refused a packet in the last two seconds.
    pub fn binding(&self) -> bool {
        let b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        b.last_refused.is_some_and(|t| t.elapsed() < BINDING_FOR)
    }

    /// Packets refused since start.
    pub fn refused_total(&self) -> u64 {
        self.refused_total.load(Ordering::Relaxed)
    }
}

/// What decides an upstream's budget: the configured rate (`None`: unset), whether the address
/// is one of `dns.upstreams` and whether it was written `vpc:` there.
pub fn budget_for(
    configured: Option<u32>,
    addr: SocketAddr,
    in_upstreams: bool,
    marked_vpc: bool,
) -> Option<(bool, u32)> {
    let vpc = marked_vpc || is_vpc_resolver(addr.ip());
    match configured {
        Some(0) => None,
        Some(n) if in_upstreams || vpc => Some((vpc, n)),
        Some(_) => None,
        None if vpc => Some((true, VPC_RESOLVER_DEFAULT_PPS)),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advance(ms: u64) -> impl std::future::Future<Output = ()> {
        tokio::time::advance(Duration::from_millis(ms))
    }

    #[tokio::test(start_paused = true)]
    async fn no_sliding_window_holds_more_than_the_limit() {
        let b = Budget::new("test".into(), 10);
        for _ in 0..10 {
            assert!(b.take(Class::Miss, 1));
        }
        assert!(!b.take(Class::Miss, 1), "the eleventh in the same instant");
        // Just inside the window (1 s + margin): still full.
        advance(1050).await;
        assert!(!b.take(Class::Miss, 1));
        // Past it: the first ten have left the window.
        advance(1).await;
        assert!(b.take(Class::Miss, 1));
        assert!(b.binding());
    }

    #[tokio::test(start_paused = true)]
    async fn a_spread_load_slides_packet_by_packet() {
        let b = Budget::new("test".into(), 4);
        // One every 250 ms: the fifth would make five within 1 s + margin; the sixth finds the
        // first gone from the window.
        let start = Instant::now();
        let (mut taken, mut at) = (Vec::new(), Vec::new());
        for _ in 0..12 {
            let ok = b.take(Class::Miss, 1);
            taken.push(ok);
            if ok {
                at.push(start.elapsed());
            }
            advance(250).await;
        }
        let t = true;
        assert_eq!(taken, [t, t, t, t, false, t, t, t, t, false, t, t]);
        // And the property itself, counted independently: no closed 1 s window holds five.
        for (i, first) in at.iter().enumerate() {
            let within = at[i..].iter().filter(|x| **x - *first <= Duration::from_secs(1)).count();
            assert!(within <= 4, "{within} packets within a second of {first:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn misses_come_first_then_failover_then_probes_and_prefetches_are_skipped() {
        let b = Budget::new("test".into(), 10);
        for _ in 0..5 {
            assert!(b.take(Class::Miss, 1));
        }
        assert!(!b.take(Class::Prefetch, 1), "half used: no prefetch");
        for _ in 0..3 {
            assert!(b.take(Class::Miss, 1));
        }
        assert!(!b.take(Class::Probe, 1), "80% used: no probe");
        assert!(b.take(Class::Failover, 1), "90% not reached: failover goes");
        assert!(!b.take(Class::Failover, 1), "90% used: no failover");
        assert!(b.take(Class::Miss, 1), "a miss may use the last slot");
        assert!(!b.take(Class::Miss, 1));
        assert_eq!(b.refused_total(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tcp_exchange_takes_its_packets_at_once_or_not_at_all() {
        let b = Budget::new("test".into(), 10);
        assert!(b.take(Class::Miss, 5));
        assert!(!b.take(Class::Miss, TCP_PACKETS), "6 more would pass 10");
        assert!(b.take(Class::Miss, 5));
        assert!(!b.binding() || b.refused_total() == 1);
        advance(2100).await;
        assert!(b.take(Class::Miss, 10));
    }

    #[tokio::test(start_paused = true)]
    async fn binding_ends_two_seconds_after_the_last_refusal() {
        let b = Budget::new("test".into(), 1);
        assert!(b.take(Class::Miss, 1));
        assert!(!b.binding());
        assert!(!b.take(Class::Miss, 1));
        assert!(b.binding());
        advance(1900).await;
        assert!(b.binding());
        advance(200).await;
        assert!(!b.binding());
    }

    #[test]
    fn the_default_limits_the_vpc_resolver_only_and_zero_turns_it_off() {
        let vpc: SocketAddr = "169.254.169.253:53".parse().unwrap();
        let vpc6: SocketAddr = "[fd00:ec2::253]:53".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let dot2: SocketAddr = "10.0.0.2:53".parse().unwrap();
        assert_eq!(budget_for(None, vpc, true, false), Some((true, 900)));
        assert_eq!(budget_for(None, vpc6, true, false), Some((true, 900)));
        assert_eq!(budget_for(None, other, true, false), None);
        assert_eq!(budget_for(None, dot2, true, false), None, "a .2 not marked vpc: is not known to be it");
        assert_eq!(budget_for(None, dot2, true, true), Some((true, 900)));
        assert_eq!(budget_for(Some(50), other, true, false), Some((false, 50)));
        assert_eq!(budget_for(Some(50), other, false, false), None, "a cluster's own resolver");
        assert_eq!(budget_for(Some(50), vpc, false, false), Some((true, 50)));
        assert_eq!(budget_for(Some(0), vpc, true, false), None);
    }
}
