//! The answer cache for forwarded names: upstream responses kept as wire bytes, served by
//! patching the id, the question's case and the TTLs (which count down), RFC 2308 negative
//! caching, TTL clamps, a bound on entries, and one upstream query per key in flight.

use std::mem::size_of;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;

use super::wire::{self, Query};
use crate::config::CacheConfig;

mod inflight;
pub use inflight::{Failure, Inflight, Join, Leader, Shared};

/// Cache key: the forwarder's id (every forwarder shares one cache), lowercase wire name, type,
/// class, and the DO and CD bits (they change the answer).
pub type Key = Box<[u8]>;

/// The longest key.
pub const KEY_MAX: usize = 4 + wire::MAX_NAME_LEN + 5;

/// Writes the key for a query into `buf` (no allocation) and returns it.
pub fn key_into<'b>(buf: &'b mut [u8; KEY_MAX], forwarder: u32, lc: &[u8], q: &Query<'_>) -> &'b [u8] {
    let n = lc.len() + 4;
    buf[..4].copy_from_slice(&forwarder.to_be_bytes());
    buf[4..n].copy_from_slice(lc);
    buf[n..n + 2].copy_from_slice(&q.qtype.to_be_bytes());
    buf[n + 2..n + 4].copy_from_slice(&q.qclass.to_be_bytes());
    buf[n + 4] = q.dnssec_ok() as u8 | (q.checking_disabled() as u8) << 1;
    &buf[..n + 5]
}

/// A forwarded answer ready to be served many times.
#[derive(Debug)]
pub struct Answer {
    /// Header, question and records as upstream sent them, minus its OPT record.
    bytes: Box<[u8]>,
    /// Where each record's TTL sits, with the TTL stored there after clamping.
    ttls: Box<[(u16, u32)]>,
    /// How long the whole answer may be served.
    pub ttl: u32,
    stored: Instant,
    pub rcode: u8,
    /// Set once a refresh of this answer has been started (prefetch).
    prefetching: std::sync::atomic::AtomicBool,
    /// The upstream that gave it, and how long it took: for observers (a query log).
    origin: Option<Origin>,
    /// Set once an observer was told of the exchange that gave it.
    told: std::sync::atomic::AtomicBool,
    /// Upstream answered over TCP (after a truncated answer over UDP).
    over_tcp: bool,
}

/// The upstream exchange an answer came from (told to observers, such as a query log).
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    pub upstream: std::net::SocketAddr,
    /// When the answer arrived, and how long after the query left.
    pub received: std::time::SystemTime,
    pub rtt: std::time::Duration,
    /// Over TCP (upstream's UDP answer was truncated).
    pub tcp: bool,
}

/// Why an upstream response cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    #[error("malformed")]
    Malformed,
    #[error("does not answer our question")]
    Mismatch,
    #[error("extended rcode")]
    ExtendedRcode,
}

impl BadResponse {
    pub fn kind(self) -> &'static str {
        match self {
            BadResponse::Malformed => "malformed",
            BadResponse::Mismatch => "mismatch",
            BadResponse::ExtendedRcode => "extended_rcode",
        }
    }
}

impl Answer {
    /// Checks that `resp` answers `query` (same id and question) and prepares it for caching.
    pub fn from_upstream(resp: &[u8], query: &[u8], limits: &CacheConfig, now: Instant) -> Result<Self, BadResponse> {
        use BadResponse::*;
        if resp.len() < wire::HEADER_LEN || !wire::is_response(wire::be16(resp, 2)) {
            return Err(Malformed);
        }
        if !answers(resp, query) {
            return Err(Mismatch);
        }
        let qlen = query_question_len(query);
        let rcode = resp[3] & 0xf;
        let counts = [wire::be16(resp, 6), wire::be16(resp, 8), wire::be16(resp, 10)];
        let mut pos = wire::HEADER_LEN + qlen;
        let mut ttls = Vec::new();
        let mut opt_at = None;
        let mut min_ttl = u32::MAX;
        let mut soa_neg = None;
        let negative = rcode == wire::RCODE_NXDOMAIN || counts[0] == 0;
        for (section, &count) in counts.iter().enumerate() {
            for _ in 0..count {
                let rr = wire::skip_rr(resp, pos).ok_or(Malformed)?;
                if rr.rtype == wire::TYPE_OPT {
                    if opt_at.is_some() || section != 2 {
                        return Err(Malformed);
                    }
                    if rr.ttl >> 24 != 0 {
                        return Err(ExtendedRcode);
                    }
                    opt_at = Some((pos, rr.end));
                } else {
                    let ttl = rr.ttl.clamp(limits.min_ttl, limits.max_ttl);
                    if section == 1 && rr.rtype == wire::TYPE_SOA && negative && rr.end >= rr.rdata + 4 {
                        let minimum = wire::be32(resp, rr.end - 4);
                        soa_neg = Some((ttls.len(), rr.ttl.min(minimum).min(limits.max_negative_ttl)));
                    }
                    min_ttl = min_ttl.min(ttl);
                    ttls.push(((rr.name_end + 4) as u16, ttl));
                }
                pos = rr.end;
            }
        }
        let mut bytes = resp[..pos].to_vec();
        // The OPT record is hop-by-hop: drop it and write our own per client. Records after it
        // could point into it, so only a trailing OPT is accepted (every resolver puts it last).
        if let Some((start, end)) = opt_at {
            if end != pos {
                return Err(Malformed);
            }
            bytes.truncate(start);
            wire::put16(&mut bytes, 10, counts[2] - 1);
        }
        bytes[0] = 0;
        bytes[1] = 0;
        let ttl = if negative {
            // RFC 2308 section 5: no SOA, no negative caching.
            match soa_neg {
                Some((i, neg)) => {
                    let neg = neg.max(limits.min_ttl.min(limits.max_negative_ttl));
                    ttls[i].1 = neg;
                    ttls.iter_mut().for_each(|t| t.1 = t.1.min(neg));
                    neg
                }
                None => 0,
            }
        } else if rcode == wire::RCODE_NOERROR {
            min_ttl
        } else {
            0
        };
        for &(at, ttl) in &ttls {
            wire::put32(&mut bytes, at as usize, ttl);
        }
        Ok(Answer::stored(bytes, ttls, ttl, now, rcode))
    }

    fn stored(bytes: Vec<u8>, ttls: Vec<(u16, u32)>, ttl: u32, now: Instant, rcode: u8) -> Self {
        Answer {
            bytes: bytes.into(),
            ttls: ttls.into(),
            ttl,
            stored: now,
            rcode,
            prefetching: Default::default(),
            origin: None,
            told: Default::default(),
            over_tcp: false,
        }
    }

    /// Records the exchange that gave this answer: `upstream`, `rtt` after the query left.
    pub fn set_origin(&mut self, upstream: std::net::SocketAddr, rtt: std::time::Duration) {
        self.origin = Some(Origin { upstream, received: std::time::SystemTime::now(), rtt, tcp: self.over_tcp });
    }

    /// The upstream that gave this answer.
    pub fn upstream(&self) -> Option<std::net::SocketAddr> {
        self.origin.map(|o| o.upstream)
    }

    /// Marks an answer upstream gave over TCP.
    pub fn came_over_tcp(&mut self) {
        self.over_tcp = true;
    }

    /// The exchange that gave this answer, the first time it is asked for only.
    pub fn exchange_once(&self) -> Option<Origin> {
        let o = self.origin?;
        (!self.told.swap(true, std::sync::atomic::Ordering::Relaxed)).then_some(o)
    }

    /// The answer's bytes as stored: upstream's, without its OPT record.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// True once per answer, when it is in the last tenth of a TTL of 10 s or more: time to
    /// refresh it in the background so that popular names do not expire into a miss.
    pub fn take_prefetch(&self, now: Instant) -> bool {
        self.ttl >= 10
            && self.remaining(now) * 10 <= self.ttl
            && !self.prefetching.swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    /// Seconds since it was stored.
    pub fn age(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.stored).as_secs()
    }

    /// Seconds left before this answer expires.
    pub fn remaining(&self, now: Instant) -> u32 {
        self.ttl.saturating_sub(now.saturating_duration_since(self.stored).as_secs() as u32)
    }

    /// Writes this answer for `q` into `out`: its id, its question case, TTLs counted down, an
    /// OPT if it used EDNS, and TC with the records dropped if it exceeds `limit`.
    pub fn serve(&self, q: &Query<'_>, out: &mut Vec<u8>, now: Instant, limit: usize, max_payload: u16) {
        self.write(q, out, limit, max_payload, |ttl| {
            let elapsed = now.saturating_duration_since(self.stored).as_secs() as u32;
            ttl.saturating_sub(elapsed)
        });
    }

    /// Writes this answer past its TTL, every record with the stale TTL of RFC 8767 section 4.
    pub fn serve_stale(&self, q: &Query<'_>, out: &mut Vec<u8>, limit: usize, max_payload: u16) {
        self.write(q, out, limit, max_payload, |_| STALE_TTL);
    }

    fn write(&self, q: &Query<'_>, out: &mut Vec<u8>, limit: usize, max_payload: u16, ttl_of: impl Fn(u32) -> u32) {
        out.clear();
        out.extend_from_slice(&self.bytes);
        out[..2].copy_from_slice(&q.id.to_be_bytes());
        let flags = wire::response_flags(q, wire::be16(&self.bytes, 2));
        wire::put16(out, 2, flags);
        let name = q.name();
        out[wire::HEADER_LEN..wire::HEADER_LEN + name.len()].copy_from_slice(name);
        for &(at, ttl) in self.ttls.iter() {
            wire::put32(out, at as usize, ttl_of(ttl));
        }
        let opt_len = if q.edns.is_some() { 11 } else { 0 };
        if out.len() + opt_len > limit {
            out.truncate(wire::HEADER_LEN + q.question.len());
            wire::set_truncated(out);
            out[6..12].fill(0);
        }
        if let Some(e) = q.edns {
            wire::push_opt(out, max_payload, e.dnssec_ok, 0);
        }
    }
}

/// Whether `resp` is a response to `query`: the same id and the same question, the name
/// compared without regard to case (upstreams may echo 0x20 mixed case), type and class exactly.
pub fn answers(resp: &[u8], query: &[u8]) -> bool {
    let qlen = query_question_len(query);
    let (q, r) = (wire::HEADER_LEN..wire::HEADER_LEN + qlen, wire::HEADER_LEN..wire::HEADER_LEN + qlen);
    let name = qlen - 4;
    resp.len() >= r.end
        && query.len() >= q.end
        && wire::is_response(wire::be16(resp, 2))
        && resp[..2] == query[..2]
        && wire::be16(resp, 4) == 1
        && resp[r.start..r.start + name].eq_ignore_ascii_case(&query[q.start..q.start + name])
        && resp[r.end - 4..r.end] == query[q.end - 4..q.end]
}

fn query_question_len(query: &[u8]) -> usize {
    let name_end = wire::skip_name(query, wire::HEADER_LEN).unwrap_or(wire::HEADER_LEN);
    name_end - wire::HEADER_LEN + 4
}

/// The TTL of an answer served past its expiry (RFC 8767 section 4 recommends 30 s).
pub const STALE_TTL: u32 = 30;

/// Entries live for their TTL plus the serve-stale window.
struct TtlExpiry {
    stale: u64,
}

impl Expiry<Key, Arc<Answer>> for TtlExpiry {
    fn expire_after_create(&self, _key: &Key, value: &Arc<Answer>, _now: Instant) -> Option<Duration> {
        Some(Duration::from_secs(value.ttl as u64 + self.stale))
    }
}

/// Bytes an entry costs beyond its key and answer bytes: the `Answer` and its boxes, the
/// `Arc`, and moka's own bookkeeping (hash table slot, access and write order nodes, timer).
/// Measured: 100k small answers took about 0.8 KiB each of RSS in all.
pub const ENTRY_OVERHEAD: usize = 640;

/// What an entry weighs against `cache.max_bytes`: at least `max_bytes / max_entries`, so that
/// the byte bound also keeps the entry bound.
fn weight(key: &Key, answer: &Answer, floor: u64) -> u32 {
    let bytes = key.len() + answer.bytes.len() + answer.ttls.len() * size_of::<(u16, u32)>() + ENTRY_OVERHEAD;
    (bytes as u64).max(floor).min(u32::MAX as u64) as u32
}

/// One cache for every forwarder (the default upstreams and each cluster's own resolvers), so
/// that `cache.max_bytes` bounds them all together. Synchronous so that the UDP receive threads
/// can look answers up without a runtime; the resolution of misses is async and coalesced by
/// [`Inflight`].
///
/// In front of moka sits [`Front`], a small table of the answers served last: a hit there costs
/// one bucket's lock and a key comparison, not moka's lookup and its access bookkeeping.
pub struct Cache {
    entries: moka::sync::Cache<Key, Arc<Answer>>,
    front: Front,
    /// What it was built from: a reload with the same bounds keeps it.
    pub bounds: (u64, u64, u32),
    next_forwarder: std::sync::atomic::AtomicU32,
}

impl Cache {
    pub fn new(config: &CacheConfig) -> Arc<Self> {
        let expiry = TtlExpiry { stale: config.serve_stale_secs as u64 };
        let floor = config.max_bytes / config.max_entries.max(1);
        let front = Front::new(config);
        let entries = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes - front.budget())
            .weigher(move |k: &Key, v: &Arc<Answer>| weight(k, v, floor))
            .expire_after(expiry)
            .build();
        Arc::new(Cache { entries, front, bounds: Self::bounds_of(config), next_forwarder: Default::default() })
    }

    pub fn bounds_of(config: &CacheConfig) -> (u64, u64, u32) {
        (config.max_bytes, config.max_entries, config.serve_stale_secs)
    }

    /// A key prefix of its own for a new forwarder.
    pub fn forwarder_id(&self) -> u32 {
        self.next_forwarder.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The answer stored for `key`, expired ones included (callers check the TTL).
    pub fn get(&self, key: &[u8]) -> Option<Arc<Answer>> {
        let bucket = self.front.bucket(key);
        if let Some(bucket) = &bucket
            && let Some(answer) = bucket.hit(key)
        {
            return Some(answer);
        }
        let found = self.entries.get(key);
        if let Some(bucket) = bucket {
            match &found {
                Some(answer) => bucket.put(key, answer),
                // moka has let it go (evicted or expired): so does the front.
                None => bucket.forget(key),
            }
        }
        found
    }

    pub fn insert(&self, key: Key, answer: Arc<Answer>) {
        if let Some(bucket) = self.front.bucket(&key) {
            bucket.put(&key, &answer);
        }
        self.entries.insert(key, answer);
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// The entries' weight in bytes, as counted against `cache.max_bytes`.
    pub fn weighted_bytes(&self) -> u64 {
        self.entries.weighted_size()
    }

    /// The part of `cache.max_bytes` set aside for the front table's worst case (moka has the rest).
    pub fn front_reserved_bytes(&self) -> u64 {
        self.front.budget()
    }

    /// Applies pending evictions (tests and the metrics gauge want settled figures).
    pub fn settle(&self) {
        self.entries.run_pending_tasks();
    }
}

/// The longest key the front table holds (inline, so a lookup reads no other memory); longer
/// names are looked up in moka only.
const FRONT_KEY_MAX: usize = 56;

/// Answers longer than this are looked up in moka only, which bounds what the front can keep
/// alive after moka has evicted it.
const FRONT_ANSWER_MAX: usize = 512;

/// The part of `cache.max_bytes` (and of `cache.max_entries`) the front table may take: 1/16th.
const FRONT_SHARE: u64 = 16;

/// The most answers the front table holds (under 3 MiB reserved with the default 64 MiB cache).
const FRONT_SLOTS_MAX: usize = 4096;

/// Every this many hits on a slot, the lookup goes to moka as well, so that its eviction policy
/// still sees which answers are in use (and a slot whose answer moka has dropped lets go of it).
const FRONT_TOUCH_EVERY: u32 = 32;

/// A table of recently served answers in front of moka: two-way buckets chosen by a seeded hash
/// of the key, one lock per bucket. A slot holds the key inline and an `Arc` of an answer that
/// moka (almost always) also holds; a new answer for the key replaces it at once
/// ([`Cache::insert`]). Its worst case, every slot holding an answer moka has evicted, is taken
/// out of moka's capacity ([`Front::budget`]).
struct Front {
    buckets: Box<[std::sync::Mutex<[Slot; 2]>]>,
    hasher: foldhash::fast::RandomState,
}

struct Slot {
    hash: u64,
    answer: Option<Arc<Answer>>,
    /// Hits since the slot took its key: the bucket's other slot is replaced first.
    hits: u32,
    len: u8,
    key: [u8; FRONT_KEY_MAX],
}

impl Default for Slot {
    fn default() -> Self {
        Slot { hash: 0, answer: None, hits: 0, len: 0, key: [0; FRONT_KEY_MAX] }
    }
}

impl Slot {
    fn holds(&self, hash: u64, key: &[u8]) -> bool {
        self.hash == hash && self.len as usize == key.len() && self.key[..key.len()] == *key
    }
}

/// The bucket chosen for one key.
struct BucketRef<'a> {
    bucket: &'a std::sync::Mutex<[Slot; 2]>,
    hash: u64,
}

impl Front {
    /// What one slot may cost: its share of a bucket and the largest answer it keeps alive.
    const SLOT_COST: u64 =
        (size_of::<std::sync::Mutex<[Slot; 2]>>() / 2 + size_of::<Answer>() + FRONT_ANSWER_MAX) as u64;

    fn new(config: &CacheConfig) -> Self {
        let fit = (config.max_bytes / FRONT_SHARE / Self::SLOT_COST).min(config.max_entries / FRONT_SHARE);
        // A power of two of buckets, so that one is chosen with a mask; none for a tiny cache.
        let buckets = match usize::try_from(fit).unwrap_or(usize::MAX).min(FRONT_SLOTS_MAX) / 2 {
            n if n < 8 => 0,
            n => 1 << n.ilog2(),
        };
        Front { buckets: (0..buckets).map(|_| Default::default()).collect(), hasher: Default::default() }
    }

    /// Bytes of `cache.max_bytes` kept for the front (see [`Front::SLOT_COST`]).
    fn budget(&self) -> u64 {
        self.buckets.len() as u64 * 2 * Self::SLOT_COST
    }

    fn bucket(&self, key: &[u8]) -> Option<BucketRef<'_>> {
        if self.buckets.is_empty() || key.len() > FRONT_KEY_MAX {
            return None;
        }
        let hash = std::hash::BuildHasher::hash_one(&self.hasher, key);
        Some(BucketRef { bucket: &self.buckets[hash as usize & (self.buckets.len() - 1)], hash })
    }
}

impl BucketRef<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, [Slot; 2]> {
        // Nothing in a bucket's critical sections can panic; a poisoned lock holds whole slots.
        self.bucket.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `key`'s answer if the bucket holds it, except every [`FRONT_TOUCH_EVERY`]th hit.
    fn hit(&self, key: &[u8]) -> Option<Arc<Answer>> {
        let mut bucket = self.lock();
        let slot = bucket.iter_mut().find(|s| s.holds(self.hash, key))?;
        slot.hits = slot.hits.wrapping_add(1);
        if slot.hits.is_multiple_of(FRONT_TOUCH_EVERY) {
            return None;
        }
        slot.answer.clone()
    }

    /// Keeps `answer` for `key` (if it is short enough): in the slot that has the key, else an
    /// empty one, else the one with fewer hits. A newer answer the slot holds stays: a lookup
    /// that read `answer` from moka just before a refresh replaced it must not put it back.
    fn put(&self, key: &[u8], answer: &Arc<Answer>) {
        let mut bucket = self.lock();
        let held = bucket.iter().position(|s| s.holds(self.hash, key));
        if let Some(i) = held
            && bucket[i].answer.as_ref().is_some_and(|a| a.stored > answer.stored)
        {
            return;
        }
        if answer.bytes.len() > FRONT_ANSWER_MAX {
            if let Some(i) = held {
                bucket[i].answer = None;
            }
            return;
        }
        let i = held.unwrap_or_else(|| match &*bucket {
            [a, _] if a.answer.is_none() => 0,
            [_, b] if b.answer.is_none() => 1,
            [a, b] => usize::from(b.hits < a.hits),
        });
        let slot = &mut bucket[i];
        if held.is_none() {
            slot.hash = self.hash;
            slot.len = key.len() as u8;
            slot.key[..key.len()].copy_from_slice(key);
            slot.hits = 0;
        }
        slot.answer = Some(answer.clone());
    }

    /// Lets go of `key`'s answer if the bucket holds it.
    fn forget(&self, key: &[u8]) {
        if let Some(slot) = self.lock().iter_mut().find(|s| s.holds(self.hash, key)) {
            slot.answer = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, Query as HQuery, ResponseCode};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn query(name: &str, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 77;
        m.add_query(HQuery::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if edns {
            m.set_edns(Edns::new());
        }
        m.to_vec().unwrap()
    }

    fn upstream_answer(query: &[u8], rcode: ResponseCode, ttl: u32, soa_min: Option<u32>) -> Vec<u8> {
        let q = Message::from_vec(query).unwrap();
        let mut m = Message::response(q.metadata.id, q.metadata.op_code);
        m.metadata.response_code = rcode;
        m.add_query(q.queries[0].clone());
        let name = q.queries[0].name().clone();
        if rcode == ResponseCode::NoError && soa_min.is_none() {
            m.add_answer(Record::from_rdata(name.clone(), ttl, RData::A(A::new(192, 0, 2, 1))));
            m.add_answer(Record::from_rdata(name, ttl + 100, RData::A(A::new(192, 0, 2, 2))));
        }
        if let Some(min) = soa_min {
            let soa = SOA::new(
                Name::from_ascii("example.").unwrap(),
                Name::from_ascii("h.example.").unwrap(),
                1,
                2,
                3,
                4,
                min,
            );
            m.add_authority(Record::from_rdata(Name::from_ascii("example.").unwrap(), ttl, RData::SOA(soa)));
        }
        m.set_edns(Edns::new());
        m.to_vec().unwrap()
    }

    #[test]
    fn positive_answers_count_down_and_patch_case() {
        let up_q = query("www.example.", true);
        let resp = upstream_answer(&up_q, ResponseCode::NoError, 300, None);
        let t0 = Instant::now();
        let a = Answer::from_upstream(&resp, &up_q, &CacheConfig::default(), t0).unwrap();
        assert_eq!(a.ttl, 300);
        let client = query("WwW.Example.", false);
        let q = Query::parse(&client).unwrap();
        let mut out = Vec::new();
        a.serve(&q, &mut out, t0 + Duration::from_secs(7), 512, 1232);
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.id, 77);
        assert_eq!(m.queries[0].name().to_string(), "WwW.Example.");
        assert_eq!(m.answers[0].ttl, 293);
        assert_eq!(m.answers[1].ttl, 393);
        assert!(m.edns.is_none(), "no OPT for a client without EDNS");
        assert_eq!(a.remaining(t0 + Duration::from_secs(7)), 293);
    }

    #[test]
    fn stale_answers_carry_the_stale_ttl() {
        let up_q = query("www.example.", true);
        let resp = upstream_answer(&up_q, ResponseCode::NoError, 5, None);
        let t0 = Instant::now();
        let a = Answer::from_upstream(&resp, &up_q, &CacheConfig::default(), t0).unwrap();
        assert_eq!(a.remaining(t0 + Duration::from_secs(9)), 0);
        let q = Query::parse(&up_q).unwrap();
        let mut out = Vec::new();
        a.serve_stale(&q, &mut out, 1232, 1232);
        let m = Message::from_vec(&out).unwrap();
        assert!(m.answers.iter().all(|r| r.ttl == STALE_TTL));
    }

    #[test]
    fn prefetch_fires_once_in_the_last_tenth() {
        let up_q = query("www.example.", true);
        let resp = upstream_answer(&up_q, ResponseCode::NoError, 100, None);
        let t0 = Instant::now();
        let a = Answer::from_upstream(&resp, &up_q, &CacheConfig::default(), t0).unwrap();
        assert!(!a.take_prefetch(t0 + Duration::from_secs(89)));
        assert!(a.take_prefetch(t0 + Duration::from_secs(91)));
        assert!(!a.take_prefetch(t0 + Duration::from_secs(92)), "only once");
    }

    #[test]
    fn ttl_clamps_apply() {
        let up_q = query("www.example.", true);
        let resp = upstream_answer(&up_q, ResponseCode::NoError, 5, None);
        let limits = CacheConfig { min_ttl: 30, max_ttl: 100, ..CacheConfig::default() };
        let a = Answer::from_upstream(&resp, &up_q, &limits, Instant::now()).unwrap();
        assert_eq!(a.ttl, 30);
        let q = Query::parse(&up_q).unwrap();
        let mut out = Vec::new();
        a.serve(&q, &mut out, Instant::now(), 1232, 1232);
        let m = Message::from_vec(&out).unwrap();
        assert_eq!((m.answers[0].ttl, m.answers[1].ttl), (30, 100));
        assert!(m.edns.is_some());
    }

    #[test]
    fn negative_answers_use_the_soa_minimum() {
        let up_q = query("nope.example.", true);
        let resp = upstream_answer(&up_q, ResponseCode::NXDomain, 900, Some(60));
        let a = Answer::from_upstream(&resp, &up_q, &CacheConfig::default(), Instant::now()).unwrap();
        assert_eq!((a.ttl, a.rcode), (60, wire::RCODE_NXDOMAIN));
        let resp = upstream_answer(&up_q, ResponseCode::NXDomain, 900, None);
        let a = Answer::from_upstream(&resp, &up_q, &CacheConfig::default(), Instant::now()).unwrap();
        assert_eq!(a.ttl, 0, "without an SOA nothing is cached");
    }

    #[test]
    fn mismatched_responses_are_rejected() {
        let up_q = query("www.example.", true);
        let other = query("evil.example.", true);
        let resp = upstream_answer(&other, ResponseCode::NoError, 300, None);
        assert_eq!(
            Answer::from_upstream(&resp, &up_q, &CacheConfig::default(), Instant::now()).unwrap_err(),
            BadResponse::Mismatch
        );
        assert_eq!(
            Answer::from_upstream(&resp[..20], &up_q, &CacheConfig::default(), Instant::now()).unwrap_err(),
            BadResponse::Mismatch
        );
        let ok = upstream_answer(&up_q, ResponseCode::NoError, 300, None);
        assert_eq!(
            Answer::from_upstream(&ok[..ok.len() - 3], &up_q, &CacheConfig::default(), Instant::now()).unwrap_err(),
            BadResponse::Malformed
        );
    }

    #[test]
    fn question_type_and_class_compare_exactly_and_the_name_without_case() {
        let mut up_q = query("www.example.", true);
        let t = wire::HEADER_LEN + 13;
        // TYPE65 (0x0041) asked; TYPE97 (0x0061) differs from it only in ASCII case.
        wire::put16(&mut up_q, t, 65);
        let mut resp = upstream_answer(&query("www.example.", true), ResponseCode::NoError, 300, None);
        wire::put16(&mut resp, t, 97);
        assert!(!answers(&resp, &up_q));
        assert_eq!(
            Answer::from_upstream(&resp, &up_q, &CacheConfig::default(), Instant::now()).unwrap_err(),
            BadResponse::Mismatch
        );
        wire::put16(&mut resp, t, 65);
        assert!(answers(&resp, &up_q));
        // Class CH (3) against class IN.
        wire::put16(&mut resp, t + 2, 3);
        assert!(!answers(&resp, &up_q));
        wire::put16(&mut resp, t + 2, 1);
        // 0x20 mixed case from the upstream is still our question.
        resp[wire::HEADER_LEN + 1..wire::HEADER_LEN + 4].copy_from_slice(b"WwW");
        assert!(answers(&resp, &up_q));
        // A query (QR clear) or a short datagram with our id answers nothing.
        let mut q_back = resp.clone();
        q_back[2] &= 0x7f;
        assert!(!answers(&q_back, &up_q) && !answers(&resp[..5], &up_q));
    }

    #[test]
    fn keys_separate_do_and_type() {
        let a = query("x.example.", false);
        let b = query("x.example.", true);
        let (qa, qb) = (Query::parse(&a).unwrap(), Query::parse(&b).unwrap());
        let mut lc = [0; wire::MAX_NAME_LEN];
        let n = wire::lowercase_name(qa.name(), &mut lc);
        let (mut ka, mut kb) = ([0; KEY_MAX], [0; KEY_MAX]);
        assert_eq!(
            key_into(&mut ka, 1, &lc[..n], &qa),
            key_into(&mut kb, 1, &lc[..n], &qb),
            "Edns::new() has DO clear"
        );
        assert_ne!(key_into(&mut ka, 1, &lc[..n], &qa), key_into(&mut kb, 2, &lc[..n], &qb), "forwarders apart");
    }

    #[test]
    fn the_cache_is_bounded_in_bytes_and_in_entries() {
        // 8 MiB of ~40 KB answers: about 200 of them fit, not 1,000.
        let config = CacheConfig { max_bytes: 8 << 20, max_entries: 1_000_000, ..CacheConfig::default() };
        let cache = Cache::new(&config);
        let up_q = query("www.example.", true);
        let q = Message::from_vec(&up_q).unwrap();
        let mut m = Message::response(q.metadata.id, q.metadata.op_code);
        m.add_query(q.queries[0].clone());
        let txt = hickory_proto::rr::rdata::TXT::new(vec!["x".repeat(250); 160]);
        m.add_answer(Record::from_rdata(q.queries[0].name().clone(), 300, RData::TXT(txt)));
        let resp = m.to_vec().unwrap();
        assert!(resp.len() > 40_000);
        let a = Arc::new(Answer::from_upstream(&resp, &up_q, &config, Instant::now()).unwrap());
        for i in 0..1_000u32 {
            cache.insert(format!("key-{i}").into_bytes().into(), a.clone());
        }
        cache.settle();
        assert!(cache.weighted_bytes() <= 8 << 20, "{}", cache.weighted_bytes());
        assert!(cache.entry_count() < 220, "{}", cache.entry_count());
        // Small answers: the entry bound holds through the per-entry floor.
        let config = CacheConfig { max_bytes: 1 << 20, max_entries: 100, ..CacheConfig::default() };
        let cache = Cache::new(&config);
        let small = Arc::new(
            Answer::from_upstream(
                &upstream_answer(&up_q, ResponseCode::NoError, 300, None),
                &up_q,
                &config,
                Instant::now(),
            )
            .unwrap(),
        );
        for i in 0..1_000u32 {
            cache.insert(format!("key-{i}").into_bytes().into(), small.clone());
        }
        cache.settle();
        assert!(cache.entry_count() <= 100, "{}", cache.entry_count());
    }

    fn small_answer(config: &CacheConfig, ttl: u32) -> Arc<Answer> {
        small_answer_at(config, ttl, Instant::now())
    }

    fn small_answer_at(config: &CacheConfig, ttl: u32, stored: Instant) -> Arc<Answer> {
        let up_q = query("www.example.", true);
        let resp = upstream_answer(&up_q, ResponseCode::NoError, ttl, None);
        Arc::new(Answer::from_upstream(&resp, &up_q, config, stored).unwrap())
    }

    #[test]
    fn the_front_gives_each_key_its_own_answer() {
        let config = CacheConfig::default();
        let cache = Cache::new(&config);
        assert!(cache.front.buckets.len() >= 1024, "the default cache has a front table");
        // More keys than front slots, so buckets are shared and slots displaced.
        let keys: Vec<Key> = (0..20_000u32).map(|i| format!("key-{i}").into_bytes().into()).collect();
        let answers: Vec<_> = (0..keys.len()).map(|_| small_answer(&config, 300)).collect();
        for (k, a) in keys.iter().zip(&answers) {
            cache.insert(k.clone(), a.clone());
        }
        for _ in 0..3 {
            for (k, a) in keys.iter().zip(&answers) {
                let got = cache.get(k).expect("nothing evicted from a 64 MiB cache");
                assert!(Arc::ptr_eq(&got, a), "another key's answer for {k:?}");
            }
        }
        assert!(cache.get(b"key-none".as_slice()).is_none());
    }

    #[test]
    fn a_new_answer_replaces_the_one_in_front() {
        let config = CacheConfig::default();
        let cache = Cache::new(&config);
        let key: Key = b"www.example.".as_slice().into();
        let (old, new) = (small_answer(&config, 300), small_answer(&config, 300));
        cache.insert(key.clone(), old.clone());
        assert!(Arc::ptr_eq(&cache.get(&key).unwrap(), &old));
        assert!(Arc::ptr_eq(&cache.get(&key).unwrap(), &old));
        cache.insert(key.clone(), new.clone());
        // Past FRONT_TOUCH_EVERY lookups too: the front and moka agree.
        for _ in 0..100 {
            assert!(Arc::ptr_eq(&cache.get(&key).unwrap(), &new));
        }
    }

    #[test]
    fn a_lookup_racing_a_refresh_does_not_put_the_older_answer_in_front() {
        let config = CacheConfig::default();
        let cache = Cache::new(&config);
        let key: Key = b"www.example.".as_slice().into();
        let now = Instant::now();
        let (old, new) =
            (small_answer_at(&config, 300, now), small_answer_at(&config, 300, now + Duration::from_secs(1)));
        cache.insert(key.clone(), old.clone());
        // A lookup has read `old` from moka; the refresh stores `new`; then the lookup fills the
        // front with what it read.
        cache.insert(key.clone(), new.clone());
        cache.front.bucket(&key).unwrap().put(&key, &old);
        for _ in 0..100 {
            assert!(Arc::ptr_eq(&cache.get(&key).unwrap(), &new));
        }
    }

    #[test]
    fn the_front_keeps_its_worst_case_inside_max_bytes() {
        for (max_bytes, max_entries) in
            [(1u64 << 20, 100u64), (1 << 20, 100_000), (64 << 20, 100_000), (1 << 40, 1 << 30)]
        {
            let config = CacheConfig { max_bytes, max_entries, ..CacheConfig::default() };
            let front = Front::new(&config);
            assert!(front.budget() <= max_bytes / FRONT_SHARE, "{max_bytes}: {}", front.budget());
            assert!((front.buckets.len() * 2) as u64 <= max_entries / FRONT_SHARE, "{max_entries}");
            assert!(front.buckets.len() * 2 <= FRONT_SLOTS_MAX);
        }
        // Too small to share: no front at all, and the cache still works.
        let config = CacheConfig { max_bytes: 1 << 20, max_entries: 100, ..CacheConfig::default() };
        let cache = Cache::new(&config);
        assert!(cache.front.buckets.is_empty());
        let a = small_answer(&config, 300);
        cache.insert(b"k".as_slice().into(), a.clone());
        assert!(Arc::ptr_eq(&cache.get(b"k".as_slice()).unwrap(), &a));
    }

    proptest::proptest! {
        #[test]
        fn garbage_from_upstream_never_panics(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let up_q = query("www.example.", true);
            let mut resp = upstream_answer(&up_q, ResponseCode::NoError, 300, None);
            let keep = 12 + 17;
            resp.truncate(keep);
            resp.extend_from_slice(&tail);
            let _ = Answer::from_upstream(&resp, &up_q, &CacheConfig::default(), Instant::now());
        }
    }
}
