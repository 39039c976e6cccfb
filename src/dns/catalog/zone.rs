//! Zone files: loaded with hickory's master-file parser into wire-form records, answered
//! authoritatively (NXDOMAIN and NODATA with the SOA, RFC 2308).

use std::collections::HashMap;

use hickory_proto::rr::{Name, RData, Record};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder, NameEncoding};
use hickory_proto::serialize::txt::Parser;

use super::super::wire::{self, Query, Response, Section};
use crate::config::ZoneConfig;

/// A zone loaded from a master file, by lowercase wire name.
#[derive(Debug)]
pub(super) struct Zone {
    pub(super) origin: Vec<u8>,
    /// The SOA's type..rdata with its TTL set to the negative-caching TTL (RFC 2308 section 5).
    soa_tail: Option<RecordTail>,
    /// Names with their records as (type, tail); empty non-terminals map to nothing.
    names: HashMap<Box<[u8]>, Vec<(u16, RecordTail)>>,
}

/// A record's type, class, TTL, RDLENGTH and RDATA: everything after its owner name.
type RecordTail = Vec<u8>;

/// Offset in `lc` where `origin` starts on a label boundary, if `lc` is at or below it.
pub(super) fn suffix_offset(lc: &[u8], origin: &[u8]) -> Option<usize> {
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
    pub(super) fn answer<'b>(&self, q: &Query<'_>, lc: &[u8], apex: usize, out: &'b mut Vec<u8>) -> Response<'b> {
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

    pub(super) fn soa(&self, r: &mut Response<'_>, apex: usize) {
        if let Some(tail) = &self.soa_tail {
            r.record_at_suffix(Section::Authority, apex, tail);
        }
    }
}

pub(super) fn load_zone(z: &ZoneConfig) -> Result<Zone, String> {
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
