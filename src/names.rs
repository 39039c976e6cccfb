//! The grammar of Amazon MSK broker names and the cluster keys they carry.
//!
//! Serverless: `boot-<id>` or `b<digits>-<id>`, then `c<digits>`, then
//! `kafka-serverless.<region>.<partition>`. Provisioned:
//! `b-<n>[.<auth>].<name>.<id>.c<digits>.kafka.<region>.<partition>`. Partitions:
//! `amazonaws.com`, `amazonaws.com.cn`, `amazonaws.eu`.
//! The matchers read a lowercase wire-form name and return byte offsets into it, so the
//! per-query path neither allocates nor copies; config strings go through the same code.

use std::fmt;
use std::ops::Range;

/// The longest name in wire form (RFC 1035 2.3.4).
pub const MAX_NAME_LEN: usize = 255;

/// Converts a presentation-form name (`a.b.c` or `a.b.c.`) to lowercase wire form.
pub fn name_to_wire(name: &str) -> Option<Vec<u8>> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut out = Vec::with_capacity(name.len() + 2);
    if !name.is_empty() {
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    (out.len() <= MAX_NAME_LEN).then_some(out)
}

/// The cluster key a bootstrap name carries: `(key bytes, provisioned?)`, or why it has none.
pub fn cluster_key(bootstrap: &str) -> Result<(Vec<u8>, bool), String> {
    let wire = name_to_wire(bootstrap).ok_or_else(|| format!("`{bootstrap}` is not a DNS name"))?;
    if let Some(m) = match_serverless(&wire) {
        return Ok((wire[m.key].to_vec(), false));
    }
    if let Some(m) = match_provisioned(&wire) {
        return Ok((wire[m.key].to_vec(), true));
    }
    Err(format!(
        "`{bootstrap}` is neither an MSK Serverless name (boot-<id>.c<N>.kafka-serverless.<region>.amazonaws.com) \
         nor a provisioned broker name (b-<n>.<name>.<id>.c<N>.kafka.<region>.amazonaws.com)"
    ))
}

/// The first `host` of a bootstrap string (`host:port,host:port`, as GetBootstrapBrokers gives
/// them) that is an MSK name, lowercase and without a trailing dot.
pub fn first_msk_host(s: &str) -> Option<String> {
    s.split(',').map(|hp| hp.trim().rsplit_once(':').map_or(hp.trim(), |(h, _)| h)).find_map(|h| {
        let h = h.trim_end_matches('.').to_ascii_lowercase();
        cluster_key(&h).is_ok().then_some(h)
    })
}

/// Which broker of a cluster a name designates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Bootstrap,
    /// A broker number as written: `b0437` and `b437` are different names, so the digits are kept.
    Broker(BrokerNumber),
}

/// Broker digits as written (up to 19 of them, which no MSK name comes near).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BrokerNumber {
    pub value: u64,
    pub digits: u8,
}

impl fmt::Display for BrokerNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:0width$}", self.value, width = self.digits as usize)
    }
}

/// A serverless name matched in a lowercase wire-form name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerlessMatch {
    pub role: Role,
    /// The cluster key: the `<id>` bytes and the wire form of everything after the first label.
    /// Equal keys mean the same `(id, cN, region, partition)`.
    pub key: Range<usize>,
    /// Where `kafka-serverless.<region>.amazonaws.com` starts: the zone apex for SOA records.
    pub apex: usize,
}

/// A provisioned broker name matched in a lowercase wire-form name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionedMatch {
    pub broker: BrokerNumber,
    /// `<name>.<id>.c<N>.kafka.<region>.amazonaws.com[.cn]` in wire form.
    pub key: Range<usize>,
    /// Where `kafka.<region>.amazonaws.com` starts.
    pub apex: usize,
}

struct Labels<'a> {
    wire: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for Labels<'a> {
    /// (offset of the length byte, label bytes)
    type Item = (usize, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let len = *self.wire.get(self.pos)? as usize;
        if len == 0 || len > 63 {
            return None;
        }
        let at = self.pos;
        let label = self.wire.get(at + 1..at + 1 + len)?;
        self.pos = at + 1 + len;
        Some((at, label))
    }
}

fn labels(wire: &[u8]) -> Labels<'_> {
    Labels { wire, pos: 0 }
}

fn is_id(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn is_region(s: &[u8]) -> bool {
    !s.is_empty()
        && s[0].is_ascii_lowercase()
        && s.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

fn digits(s: &[u8]) -> Option<BrokerNumber> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = s.iter().fold(0u64, |v, d| v * 10 + (d - b'0') as u64);
    Some(BrokerNumber { value, digits: s.len() as u8 })
}

/// The partition's domain, then the root: the rest of the name after the region. `amazonaws.com`
/// (with GovCloud), `amazonaws.com.cn` (China), `amazonaws.eu` (European Sovereign Cloud).
fn is_aws_tail(wire: &[u8], pos: usize) -> bool {
    matches!(
        wire.get(pos..),
        Some(b"\x09amazonaws\x03com\x00") | Some(b"\x09amazonaws\x03com\x02cn\x00") | Some(b"\x09amazonaws\x02eu\x00")
    )
}

/// Matches `boot-<id>` / `b<digits>-<id>` `.c<N>.kafka-serverless.<region>.amazonaws.com[.cn]`.
pub fn match_serverless(wire: &[u8]) -> Option<ServerlessMatch> {
    let mut it = labels(wire);
    let (_, first) = it.next()?;
    let (role, prefix) = if let Some(id) = first.strip_prefix(b"boot-") {
        (Role::Bootstrap, first.len() - id.len())
    } else {
        let rest = first.strip_prefix(b"b")?;
        let dash = rest.iter().position(|&b| b == b'-')?;
        (Role::Broker(digits(&rest[..dash])?), 1 + dash + 1)
    };
    if !is_id(&first[prefix..]) {
        return None;
    }
    let (_, cell) = it.next()?;
    digits(cell.strip_prefix(b"c")?)?;
    let (apex, svc) = it.next()?;
    if svc != b"kafka-serverless" {
        return None;
    }
    let (_, region) = it.next()?;
    if !is_region(region) || !is_aws_tail(wire, it.pos) {
        return None;
    }
    Some(ServerlessMatch { role, key: 1 + prefix..wire.len(), apex })
}

/// Matches `b-<n>[.<auth>].<name>.<id>.c<N>.kafka.<region>.<partition>`, where `<auth>` (`iam`,
/// `scram` or `tls`) marks the multi-VPC private connectivity names (ports 14001+); they share the
/// cluster key of the cluster's other names. `b-<n>-public` (public access) and `z-<n>`
/// (ZooKeeper) do not match: public DNS answers them.
pub fn match_provisioned(wire: &[u8]) -> Option<ProvisionedMatch> {
    let mut it = labels(wire);
    let (_, first) = it.next()?;
    let broker = digits(first.strip_prefix(b"b-")?)?;
    let after_broker = it.pos;
    if let Some(m) = provisioned_rest(wire, after_broker, broker) {
        return Some(m);
    }
    let (_, auth) = labels(&wire[after_broker..]).next()?;
    if !matches!(auth, b"iam" | b"scram" | b"tls") {
        return None;
    }
    provisioned_rest(wire, after_broker + 1 + auth.len(), broker)
}

/// `<name>.<id>.c<N>.kafka.<region>.<partition>` from `pos` to the end of `wire`.
fn provisioned_rest(wire: &[u8], pos: usize, broker: BrokerNumber) -> Option<ProvisionedMatch> {
    let mut it = Labels { wire, pos };
    let (key_start, name) = it.next()?;
    if name.is_empty() || !name.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-') {
        return None;
    }
    let (_, id) = it.next()?;
    if !id.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-') || id.is_empty() {
        return None;
    }
    let (_, cell) = it.next()?;
    digits(cell.strip_prefix(b"c")?)?;
    let (apex, svc) = it.next()?;
    if svc != b"kafka" {
        return None;
    }
    let (_, region) = it.next()?;
    if !is_region(region) || !is_aws_tail(wire, it.pos) {
        return None;
    }
    Some(ProvisionedMatch { broker, key: key_start..wire.len(), apex })
}

/// A human form of a serverless cluster key, `<id>.c<N>.<region>`, for logs and metric labels.
pub fn describe_serverless_key(key: &[u8]) -> String {
    // key = id bytes, then wire labels: cN, kafka-serverless, region, amazonaws, com[, cn]
    let id_end = key.iter().position(|&b| b < b'0').unwrap_or(key.len());
    let id = String::from_utf8_lossy(&key[..id_end]);
    let rest: Vec<String> = labels(&key[id_end..]).map(|(_, l)| String::from_utf8_lossy(l).into_owned()).collect();
    match rest.as_slice() {
        [cell, _, region, ..] => format!("{id}.{cell}.{region}"),
        _ => id.into_owned(),
    }
}

/// A cluster's short label for metrics and logs, from its key: serverless `<id>.c<N>.<region>`,
/// provisioned `<name>.<id>.c<N>.<region>`.
pub fn cluster_label(key: &[u8], provisioned: bool) -> String {
    if !provisioned {
        return describe_serverless_key(key);
    }
    // key = wire labels: name, id, cN, kafka, region, amazonaws, com[, cn]
    let l: Vec<String> = labels(key).map(|(_, l)| String::from_utf8_lossy(l).into_owned()).collect();
    l.iter().take(3).chain(l.iter().skip(4).take(1)).cloned().collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cluster_labels() {
        let (key, provisioned) = cluster_key("b-1.orders.ab12cd.c3.kafka.eu-west-1.amazonaws.com").unwrap();
        assert_eq!(cluster_label(&key, provisioned), "orders.ab12cd.c3.eu-west-1");
        let (key, provisioned) = cluster_key("boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com").unwrap();
        assert_eq!(cluster_label(&key, provisioned), "abcd1234.c2.us-east-1");
        assert_eq!(
            first_msk_host("10.0.0.1:9098, B-2.orders.ab12cd.c3.kafka.eu-west-1.amazonaws.com.:9098").as_deref(),
            Some("b-2.orders.ab12cd.c3.kafka.eu-west-1.amazonaws.com")
        );
    }

    fn serverless(name: &str) -> Option<(Role, Vec<u8>)> {
        let w = name_to_wire(name)?;
        match_serverless(&w).map(|m| (m.role, w[m.key].to_vec()))
    }

    #[test]
    fn bootstrap_and_brokers_share_a_key() {
        let (r, k) = serverless("boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com").unwrap();
        assert_eq!(r, Role::Bootstrap);
        for b in ["b1", "b97", "b0437", "b0001"] {
            let name = format!("{b}-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com.");
            let (role, key) = serverless(&name).unwrap();
            assert!(matches!(role, Role::Broker(_)));
            assert_eq!(key, k, "{name}");
        }
        assert_eq!(describe_serverless_key(&k), "abcd1234.c2.us-east-1");
    }

    #[test]
    fn keys_separate_clusters() {
        let a = serverless("boot-aaaa.c2.kafka-serverless.us-east-1.amazonaws.com").unwrap().1;
        let b = serverless("boot-bbbb.c2.kafka-serverless.us-east-1.amazonaws.com").unwrap().1;
        let c = serverless("boot-aaaa.c3.kafka-serverless.us-east-1.amazonaws.com").unwrap().1;
        let d = serverless("boot-aaaa.c2.kafka-serverless.eu-west-1.amazonaws.com").unwrap().1;
        let e = serverless("boot-aaaa.c2.kafka-serverless.cn-north-1.amazonaws.com.cn").unwrap().1;
        let keys = [a, b, c, d, e];
        for i in 0..keys.len() {
            for j in i + 1..keys.len() {
                assert_ne!(keys[i], keys[j]);
            }
        }
    }

    #[test]
    fn case_is_folded_by_the_caller() {
        assert!(serverless("BOOT-ABCD.C2.KAFKA-SERVERLESS.US-EAST-1.AMAZONAWS.COM").is_some());
    }

    #[test]
    fn rejects_near_misses() {
        for n in [
            "boot-.c2.kafka-serverless.us-east-1.amazonaws.com",
            "bx-abcd.c2.kafka-serverless.us-east-1.amazonaws.com",
            "b-abcd.c2.kafka-serverless.us-east-1.amazonaws.com",
            "boot-ab_cd.c2.kafka-serverless.us-east-1.amazonaws.com",
            "boot-abcd.cx.kafka-serverless.us-east-1.amazonaws.com",
            "boot-abcd.c2.kafka.us-east-1.amazonaws.com",
            "boot-abcd.c2.kafka-serverless.us-east-1.amazonaws.org",
            "boot-abcd.c2.kafka-serverless.us-east-1.amazonaws.com.evil.example",
            "x.boot-abcd.c2.kafka-serverless.us-east-1.amazonaws.com",
            "kafka-serverless.us-east-1.amazonaws.com",
        ] {
            assert!(serverless(n).is_none(), "{n}");
        }
    }

    #[test]
    fn provisioned_names() {
        let w = name_to_wire("b-3.prod-orders.ab12cd.c4.kafka.eu-central-1.amazonaws.com").unwrap();
        let m = match_provisioned(&w).unwrap();
        assert_eq!(m.broker.value, 3);
        assert_eq!(
            &w[m.key.clone()],
            &name_to_wire("prod-orders.ab12cd.c4.kafka.eu-central-1.amazonaws.com").unwrap()[..]
        );
        assert!(match_serverless(&w).is_none());
        let w2 = name_to_wire("b-1.prod-orders.ab12cd.c4.kafka.eu-central-1.amazonaws.com").unwrap();
        assert_eq!(w[m.key], w2[match_provisioned(&w2).unwrap().key]);
        assert!(
            match_provisioned(&name_to_wire("b-1.x.y.c1.kafka-serverless.us-east-1.amazonaws.com").unwrap()).is_none()
        );
    }

    fn provisioned_key(name: &str) -> Option<Vec<u8>> {
        let w = name_to_wire(name)?;
        match_provisioned(&w).map(|m| w[m.key].to_vec())
    }

    #[test]
    fn multi_vpc_names_share_the_cluster_key() {
        // As GetBootstrapBrokers gives them for multi-VPC private connectivity (ports 14001+).
        let key = provisioned_key("b-1.demo-cluster-1.xuy0sb.c5.kafka.us-east-1.amazonaws.com").unwrap();
        for auth in ["iam", "scram", "tls"] {
            let name = format!("b-2.{auth}.demo-cluster-1.xuy0sb.c5.kafka.us-east-1.amazonaws.com");
            let w = name_to_wire(&name).unwrap();
            let m = match_provisioned(&w).unwrap();
            assert_eq!(m.broker.value, 2, "{name}");
            assert_eq!(w[m.key.clone()], key[..], "{name}");
            assert_eq!(&w[m.apex..], &name_to_wire("kafka.us-east-1.amazonaws.com").unwrap()[..]);
        }
        // A cluster called `iam` keeps its own names.
        let own = provisioned_key("b-1.iam.xuy0sb.c5.kafka.us-east-1.amazonaws.com").unwrap();
        assert_eq!(own, name_to_wire("iam.xuy0sb.c5.kafka.us-east-1.amazonaws.com").unwrap());
        assert_eq!(provisioned_key("b-1.iam.iam.xuy0sb.c5.kafka.us-east-1.amazonaws.com").unwrap(), own);
        assert!(provisioned_key("b-1.sasl.demo.xuy0sb.c5.kafka.us-east-1.amazonaws.com").is_none());
    }

    #[test]
    fn partitions() {
        for tail in ["amazonaws.com", "amazonaws.com.cn", "amazonaws.eu"] {
            let p = format!("b-1.orders.ab12cd.c2.kafka.eusc-de-east-1.{tail}");
            assert!(provisioned_key(&p).is_some(), "{p}");
            let s = format!("boot-abcd.c1.kafka-serverless.eusc-de-east-1.{tail}");
            assert!(serverless(&s).is_some(), "{s}");
        }
        let eu = serverless("boot-abcd.c1.kafka-serverless.eusc-de-east-1.amazonaws.eu").unwrap().1;
        let com = serverless("boot-abcd.c1.kafka-serverless.eusc-de-east-1.amazonaws.com").unwrap().1;
        assert_ne!(eu, com);
        for n in ["boot-abcd.c1.kafka-serverless.eu-west-1.amazonaws.de", "b-1.o.ab.c2.kafka.eu-west-1.amazonaws.eu.cn"]
        {
            assert!(serverless(n).is_none() && provisioned_key(n).is_none(), "{n}");
        }
    }

    #[test]
    fn public_access_and_zookeeper_names_are_not_ours() {
        for n in [
            "b-1-public.orders.ab12cd.c2.kafka.us-east-1.amazonaws.com",
            "b-2-public.tls.orders.ab12cd.c2.kafka.us-east-1.amazonaws.com",
            "z-1.orders.ab12cd.c2.kafka.us-east-1.amazonaws.com",
            "z-3.orders.ab12cd.c2.kafka.eu-west-1.amazonaws.com.cn",
        ] {
            assert!(provisioned_key(n).is_none(), "{n}");
            assert!(serverless(n).is_none(), "{n}");
        }
    }

    proptest! {
        #[test]
        fn any_broker_number_matches_its_cluster(
            id in "[a-z0-9]{1,30}", cell in 1u32..99, n in 0u64..10_000_000, pad in 0usize..6,
            region in "[a-z]{2}-[a-z]{4,9}-[1-9]", cn in any::<bool>(),
        ) {
            let tail = format!("c{cell}.kafka-serverless.{region}.amazonaws.com{}", if cn { ".cn" } else { "" });
            let boot = serverless(&format!("boot-{id}.{tail}")).unwrap();
            let name = format!("b{n:0pad$}-{id}.{tail}");
            let (role, key) = serverless(&name).unwrap();
            prop_assert_eq!(key, boot.1);
            match role {
                Role::Broker(b) => prop_assert_eq!(format!("b{b}-{id}.{tail}"), name),
                Role::Bootstrap => prop_assert!(false),
            }
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = match_serverless(&bytes);
            let _ = match_provisioned(&bytes);
        }
    }
}
