//! What mskdns answers itself: configured MSK clusters and static zone files, prepared at load
//! time so that answering is a hash lookup and a few byte copies.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use hickory_proto::rr::{Name, RData, Record};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder, NameEncoding};
use hickory_proto::serialize::txt::Parser;

use super::wire::{self, Query, Response, Section};
use crate::config::{ClusterConfig, Config, UnknownClusters, ZoneConfig};
use crate::names;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("zones[{index}] {path}: {message}")]
    Zone { index: usize, path: PathBuf, message: String },
}

/// One MSK cluster's answer material.
#[derive(Debug)]
pub struct Cluster {
    /// `<id>.c<N>.<region>`: the metric label and the name in logs.
    pub label: String,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
    pub ttl: u32,
    pub answers: metrics::Counter,
}

/// A record's type, class, TTL, RDLENGTH and RDATA: everything after its owner name.
type RecordTail = Vec<u8>;

/// A zone loaded from a master file, by lowercase wire name.
#[derive(Debug)]
struct Zone {
    origin: Vec<u8>,
    /// The SOA's type..rdata with its TTL set to the negative-caching TTL (RFC 2308 section 5).
    soa_tail: Option<Vec<u8>>,
    /// Names with their records as (type, type..rdata); empty non-terminals map to nothing.
    names: HashMap<Box<[u8]>, Vec<(u16, RecordTail)>>,
}

/// What the catalog did with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// Answered from a configured cluster.
    Cluster,
    /// Answered from a zone file.
    Zone,
    /// An MSK name of an unconfigured cluster answered NXDOMAIN (`dns.unknown_clusters`).
    UnknownCluster,
    /// Not ours: forward it.
    NotLocal,
}

#[derive(Debug)]
pub struct Catalog {
    clusters: HashMap<Box<[u8]>, Cluster>,
    zones: Vec<Zone>,
    unknown: UnknownClusters,
    serial: u32,
}

impl Catalog {
    pub fn from_config(config: &Config) -> Result<Self, CatalogError> {
        let clusters = config.clusters.iter().filter_map(cluster_entry).collect();
        let zones = config
            .zones
            .iter()
            .enumerate()
            .map(|(index, z)| {
                load_zone(z).map_err(|message| CatalogError::Zone { index, path: z.file.clone(), message })
            })
            .collect::<Result<_, _>>()?;
        let serial =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(1);
        Ok(Catalog { clusters, zones, unknown: config.dns.unknown_clusters, serial })
    }

    pub fn cluster_count(&self) -> usize {
        self.clusters.len()
    }

    /// Answers `q` (whose name, lowercased, is `lc`) when it is ours; writes the response to `out`.
    pub fn answer(&self, q: &Query<'_>, lc: &[u8], out: &mut Vec<u8>, limit: usize, max_payload: u16) -> Local {
        if let Some(m) = names::match_serverless(lc) {
            if let Some(cluster) = self.clusters.get(&lc[m.key]) {
                cluster.answers.increment(1);
                answer_cluster(cluster, m.apex, q, out, self.serial).finish(q, limit, max_payload);
                return Local::Cluster;
            }
            if self.unknown == UnknownClusters::Nxdomain {
                let mut r = Response::new(out, q, wire::RCODE_NXDOMAIN, true);
                r.soa_at_suffix(m.apex, 60, self.serial);
                r.finish(q, limit, max_payload);
                return Local::UnknownCluster;
            }
            return Local::NotLocal;
        }
        for zone in &self.zones {
            if let Some(apex) = suffix_offset(lc, &zone.origin) {
                zone.answer(q, lc, apex, out).finish(q, limit, max_payload);
                return Local::Zone;
            }
        }
        Local::NotLocal
    }
}

fn cluster_entry(c: &ClusterConfig) -> Option<(Box<[u8]>, Cluster)> {
    // validate() already proved the name parses.
    let wire = wire::name_to_wire(&c.bootstrap)?;
    let m = names::match_serverless(&wire)?;
    let key: Box<[u8]> = wire[m.key].into();
    let label = names::describe_serverless_key(&key);
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for ip in &c.addresses {
        match ip {
            IpAddr::V4(a) => v4.push(*a),
            IpAddr::V6(a) => v6.push(*a),
        }
    }
    let answers = metrics::counter!("mskdns_cluster_answers_total", "cluster" => label.clone());
    Some((key, Cluster { label, v4, v6, ttl: c.ttl, answers }))
}

/// A/AAAA from the cluster's addresses; the other family and other types get NODATA with an SOA.
fn answer_cluster<'b>(c: &Cluster, apex: usize, q: &Query<'_>, out: &'b mut Vec<u8>, serial: u32) -> Response<'b> {
    let mut r = Response::new(out, q, wire::RCODE_NOERROR, true);
    let mut any = false;
    if q.qclass == wire::CLASS_IN {
        if matches!(q.qtype, wire::TYPE_A | wire::TYPE_ANY) {
            for ip in &c.v4 {
                r.address((*ip).into(), c.ttl);
                any = true;
            }
        }
        if matches!(q.qtype, wire::TYPE_AAAA | wire::TYPE_ANY) {
            for ip in &c.v6 {
                r.address((*ip).into(), c.ttl);
                any = true;
            }
        }
    }
    if !any {
        r.soa_at_suffix(apex, c.ttl, serial);
    }
    r
}

/// Offset in `lc` where `origin` starts on a label boundary, if `lc` is at or below it.
fn suffix_offset(lc: &[u8], origin: &[u8]) -> Option<usize> {
    if lc.len() < origin.len() || !lc.ends_with(origin) {
        return None;
    }
    let want = lc.len() - origin.len();
    let mut pos = 0;
    while pos < want {
        pos += 1 + lc[pos] as usize;
    }
    (pos == want).then_some(pos)
}

impl Zone {
    fn answer<'b>(&self, q: &Query<'_>, lc: &[u8], apex: usize, out: &'b mut Vec<u8>) -> Response<'b> {
        let Some(rrs) = self.names.get(lc) else {
            let mut r = Response::new(out, q, wire::RCODE_NXDOMAIN, true);
            self.soa(&mut r, apex);
            return r;
        };
        let mut r = Response::new(out, q, wire::RCODE_NOERROR, true);
        let cname = rrs.iter().find(|(t, _)| *t == wire::TYPE_CNAME);
        let mut any = false;
        match cname {
            Some((_, tail)) if q.qtype != wire::TYPE_CNAME => {
                r.record_at_qname(Section::Answer, tail);
                any = true;
            }
            _ => {
                for (t, tail) in rrs {
                    if *t == q.qtype || (q.qtype == wire::TYPE_ANY && *t != wire::TYPE_SOA) {
                        r.record_at_qname(Section::Answer, tail);
                        any = true;
                    }
                }
            }
        }
        if !any {
            self.soa(&mut r, apex);
        }
        r
    }

    fn soa(&self, r: &mut Response<'_>, apex: usize) {
        if let Some(tail) = &self.soa_tail {
            r.record_at_suffix(Section::Authority, apex, tail);
        }
    }
}

fn load_zone(z: &ZoneConfig) -> Result<Zone, String> {
    let text = std::fs::read_to_string(&z.file).map_err(|e| e.to_string())?;
    let origin = match &z.origin {
        Some(o) => Some(Name::from_ascii(o).map_err(|e| format!("origin: {e}"))?),
        None => None,
    };
    let (origin, sets) = Parser::new(text, Some(z.file.clone()), origin).parse().map_err(|e| e.to_string())?;
    let origin_wire = wire::name_to_wire(&origin.to_ascii()).ok_or("origin is not a DNS name")?;
    let mut zone = Zone { origin: origin_wire, soa_tail: None, names: HashMap::new() };
    for set in sets.values() {
        for rec in set.records_without_rrsigs() {
            let name = wire::name_to_wire(&rec.name.to_ascii()).ok_or("record name too long")?;
            if suffix_offset(&name, &zone.origin).is_none() {
                return Err(format!("{} is outside the zone {}", rec.name, origin));
            }
            let mut tail = encode_tail(rec)?;
            if let RData::SOA(soa) = &rec.data
                && name == zone.origin
            {
                let neg = rec.ttl.min(soa.minimum);
                wire::put32(&mut tail, 4, neg);
                zone.soa_tail = Some(tail.clone());
            }
            zone.names.entry(name.clone().into()).or_default().push((u16::from(rec.record_type()), tail));
            // Every name between a record and the origin exists (empty non-terminals: NODATA).
            let mut pos = 0;
            while pos < name.len() - zone.origin.len() {
                pos += 1 + name[pos] as usize;
                zone.names.entry(name[pos..].into()).or_default();
            }
        }
    }
    Ok(zone)
}

/// A record's bytes after its owner name, with no name compression inside RDATA.
fn encode_tail(rec: &Record) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let mut enc = BinEncoder::new(&mut buf);
    enc.set_name_encoding(NameEncoding::Uncompressed);
    rec.emit(&mut enc).map_err(|e| e.to_string())?;
    let owner_end = wire::skip_name(&buf, 0).ok_or("record did not encode")?;
    Ok(buf.split_off(owner_end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Message;
    use hickory_proto::rr::RecordType;

    fn catalog(extra: &str) -> Catalog {
        let toml = format!(
            "[[clusters]]\nbootstrap = \"boot-aaaa.c2.kafka-serverless.us-east-1.amazonaws.com\"\naddresses = [\"10.1.0.1\", \"10.1.0.2\"]\nttl = 30\n{extra}"
        );
        let config: Config = figment::Figment::from(figment::providers::Serialized::defaults(Config::default()))
            .merge(<figment::providers::Toml as figment::providers::Format>::string(&toml))
            .extract()
            .unwrap();
        Catalog::from_config(&config).unwrap()
    }

    fn ask(c: &Catalog, name: &str, t: RecordType) -> (Local, Option<Message>) {
        let mut m = Message::query();
        m.add_query(hickory_proto::op::Query::query(Name::from_ascii(name).unwrap(), t));
        let pkt = m.to_vec().unwrap();
        let q = Query::parse(&pkt).unwrap();
        let mut lc = [0; wire::MAX_NAME_LEN];
        let n = wire::lowercase_name(q.name(), &mut lc);
        let mut out = Vec::new();
        let local = c.answer(&q, &lc[..n], &mut out, 512, 1232);
        (local, (local != Local::NotLocal).then(|| Message::from_vec(&out).unwrap()))
    }

    #[test]
    fn cluster_answers_by_family() {
        let c = catalog("");
        let (l, m) = ask(&c, "B0437-AAAA.c2.kafka-serverless.us-east-1.amazonaws.com.", RecordType::A);
        assert_eq!(l, Local::Cluster);
        let m = m.unwrap();
        assert_eq!(m.answers.len(), 2);
        assert_eq!(m.answers[0].ttl, 30);
        let (_, m) = ask(&c, "boot-aaaa.c2.kafka-serverless.us-east-1.amazonaws.com.", RecordType::AAAA);
        let m = m.unwrap();
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        assert_eq!(ask(&c, "boot-bbbb.c2.kafka-serverless.us-east-1.amazonaws.com.", RecordType::A).0, Local::NotLocal);
    }

    #[test]
    fn unknown_clusters_can_be_nxdomain() {
        let c = catalog("[dns]\nunknown_clusters = \"nxdomain\"\n");
        let (l, m) = ask(&c, "boot-bbbb.c2.kafka-serverless.us-east-1.amazonaws.com.", RecordType::A);
        assert_eq!(l, Local::UnknownCluster);
        assert_eq!(m.unwrap().metadata.response_code, hickory_proto::op::ResponseCode::NXDomain);
    }

    #[test]
    fn zone_files_answer() {
        let dir = std::env::temp_dir().join(format!("mskdns-zone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("z.zone");
        std::fs::write(
            &file,
            "$ORIGIN kafka.internal.\n$TTL 300\n@ IN SOA ns hostmaster 1 3600 600 86400 120\n@ IN NS ns\nns IN A 10.9.0.1\nproxy.a IN A 10.9.0.2\nalias IN CNAME ns\n",
        )
        .unwrap();
        let c = catalog(&format!("[[zones]]\nfile = \"{}\"\n", file.display()));
        let (l, m) = ask(&c, "Proxy.A.kafka.internal.", RecordType::A);
        assert_eq!(l, Local::Zone);
        assert_eq!(m.unwrap().answers[0].data, RData::A("10.9.0.2".parse().unwrap()));
        let m = ask(&c, "a.kafka.internal.", RecordType::A).1.unwrap();
        assert_eq!(m.metadata.response_code, hickory_proto::op::ResponseCode::NoError);
        assert_eq!(m.authorities[0].ttl, 120);
        let m = ask(&c, "nope.kafka.internal.", RecordType::A).1.unwrap();
        assert_eq!(m.metadata.response_code, hickory_proto::op::ResponseCode::NXDomain);
        let m = ask(&c, "alias.kafka.internal.", RecordType::A).1.unwrap();
        assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(ask(&c, "kafka.example.", RecordType::A).0, Local::NotLocal);
        std::fs::remove_dir_all(&dir).ok();
    }
}
