//! Response rate limiting for UDP, per client prefix: a token bucket per prefix in a fixed
//! table indexed by a hash of the prefix, updated with one atomic compare-and-swap, so the
//! per-query cost is constant and nothing is allocated. Two prefixes that hash alike share a
//! bucket (the table is large enough that this is rare). Over the limit, every `slip`-th
//! response is a truncated one (a real client retries over TCP, which cannot be spoofed) and
//! the others are dropped: no amplification for a spoofed source.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

const BUCKETS: usize = 1 << 16;

/// What to do with one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Send,
    Truncate,
    Drop,
}

pub struct RateLimiter {
    per_second: u32,
    burst: u32,
    slip: u32,
    v4_prefix: u8,
    v6_prefix: u8,
    epoch: Instant,
    /// Per bucket: milliseconds since `epoch` (high 40 bits) and tokens in thousandths (low 24 bits).
    buckets: Box<[AtomicU64]>,
    limited: AtomicU64,
}

impl RateLimiter {
    pub fn new(per_second: u32, slip: u32, v4_prefix: u8, v6_prefix: u8) -> Self {
        RateLimiter {
            per_second,
            burst: per_second.max(1),
            slip,
            v4_prefix,
            v6_prefix,
            epoch: Instant::now(),
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            limited: AtomicU64::new(0),
        }
    }

    pub fn check(&self, client: IpAddr) -> Verdict {
        let bucket = &self.buckets[self.index(client)];
        // From 1, so that a used bucket never packs to 0, the mark of one never used (an empty
        // bucket within the first millisecond was refilled as new).
        let now_ms = self.epoch.elapsed().as_millis() as u64 + 1;
        let full = (self.burst as u64 * 1000).min((1 << 24) - 1);
        let mut current = bucket.load(Ordering::Relaxed);
        loop {
            let (last, tokens) = (current >> 24, current & ((1 << 24) - 1));
            let tokens = if current == 0 {
                full
            } else {
                (tokens + (now_ms - last.min(now_ms)) * self.per_second as u64).min(full)
            };
            let (tokens, verdict) =
                if tokens >= 1000 { (tokens - 1000, Verdict::Send) } else { (tokens, Verdict::Drop) };
            let next = (now_ms << 24) | tokens;
            match bucket.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) if verdict == Verdict::Send => return Verdict::Send,
                Ok(_) => {
                    let n = self.limited.fetch_add(1, Ordering::Relaxed) + 1;
                    return if self.slip > 0 && n.is_multiple_of(self.slip as u64) {
                        Verdict::Truncate
                    } else {
                        Verdict::Drop
                    };
                }
                Err(seen) => current = seen,
            }
        }
    }

    fn index(&self, client: IpAddr) -> usize {
        let (bits, prefix): (u128, u8) = match client {
            IpAddr::V4(a) => (u32::from(a) as u128, self.v4_prefix.min(32)),
            IpAddr::V6(a) => (u128::from(a), self.v6_prefix.min(128)),
        };
        let width = if client.is_ipv4() { 32 } else { 128 };
        let masked = if prefix == 0 { 0 } else { bits >> (width - prefix as u32) };
        // A multiplicative hash folded to the table size; the family keeps v4 and v6 apart.
        let h = (masked as u64 ^ (masked >> 64) as u64 ^ client.is_ipv6() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> (64 - 16)) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_one_prefix_and_not_another() {
        let rl = RateLimiter::new(10, 2, 24, 56);
        let a: IpAddr = "10.0.1.7".parse().unwrap();
        let same_prefix: IpAddr = "10.0.1.200".parse().unwrap();
        let other: IpAddr = "10.0.2.7".parse().unwrap();
        let verdicts: Vec<_> = (0..30).map(|_| rl.check(a)).collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Send).count(), 10);
        assert!(verdicts.contains(&Verdict::Truncate) && verdicts.contains(&Verdict::Drop));
        assert_ne!(rl.check(same_prefix), Verdict::Send, "the whole /24 shares the budget");
        assert_eq!(rl.check(other), Verdict::Send);
    }
}
