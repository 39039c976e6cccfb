//! DNS wire format: zero-copy query parsing and in-place response writing.
//!
//! The per-query path reads only the header, the question and the OPT record, and writes answers
//! straight after the echoed question bytes, so a query costs no allocation beyond the reused
//! output buffer. hickory-proto does the rare, rich work (zone files, record encoding, tests).

pub const HEADER_LEN: usize = 12;
pub use crate::names::{MAX_NAME_LEN, name_to_wire};
/// The payload we advertise and send at most over UDP with EDNS (the DNS flag day 2020 value).
pub const DEFAULT_EDNS_PAYLOAD: u16 = crate::config::DEFAULT_UDP_PAYLOAD;
/// The limit for UDP answers to clients without EDNS (RFC 1035 4.2.1).
pub const CLASSIC_UDP_PAYLOAD: usize = 512;

pub const TYPE_A: u16 = 1;
pub const TYPE_NS: u16 = 2;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_TSIG: u16 = 250;
pub const TYPE_IXFR: u16 = 251;
pub const TYPE_AXFR: u16 = 252;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;
pub const CLASS_ANY: u16 = 255;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;
pub const RCODE_NOTAUTH: u8 = 9;
/// TSIG error BADKEY (RFC 8945 5.2): the key is not known here.
const TSIG_BADKEY: u16 = 17;
/// Extended RCODE 16 (RFC 6891): its upper 8 bits travel in the OPT record.
pub const RCODE_BADVERS: u16 = 16;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const FLAG_AD: u16 = 0x0020;
const FLAG_CD: u16 = 0x0010;
const EDNS_DO: u16 = 0x8000;

/// EDNS(0) parameters of a query's OPT record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    pub udp_payload: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

/// A parsed query borrowing the packet it came in.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub id: u16,
    flags: u16,
    /// The question exactly as received: name (wire form, original case), type, class.
    pub question: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
    /// A TSIG record (the last of the additional section), whole: we hold no keys.
    pub tsig: Option<&'a [u8]>,
    /// The data of the OPT record's COOKIE option (RFC 7873): client cookie, then server cookie.
    pub cookie: Option<&'a [u8]>,
}

/// Why a packet is not a query we answer normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Too short for a header, or a response: answering could start a loop, so say nothing.
    Drop,
    /// Malformed after a readable header: answer FORMERR with the header's id.
    FormErr { id: u16, flags: u16 },
    /// A valid header with an opcode we do not serve.
    NotImp { id: u16, flags: u16 },
}

impl Reject {
    pub fn kind(self) -> &'static str {
        match self {
            Reject::Drop => "dropped",
            Reject::FormErr { .. } => "formerr",
            Reject::NotImp { .. } => "notimp",
        }
    }
}

impl<'a> Query<'a> {
    pub fn parse(pkt: &'a [u8]) -> Result<Self, Reject> {
        if pkt.len() < HEADER_LEN {
            return Err(Reject::Drop);
        }
        let id = be16(pkt, 0);
        let flags = be16(pkt, 2);
        if flags & FLAG_QR != 0 {
            return Err(Reject::Drop);
        }
        let formerr = Reject::FormErr { id, flags };
        let opcode = (flags >> 11) & 0xf;
        if opcode != 0 {
            return Err(Reject::NotImp { id, flags });
        }
        if be16(pkt, 4) != 1 {
            return Err(formerr);
        }
        let name_len = question_name_len(&pkt[HEADER_LEN..]).ok_or(formerr)?;
        let qend = HEADER_LEN + name_len + 4;
        if pkt.len() < qend {
            return Err(formerr);
        }
        let qtype = be16(pkt, qend - 4);
        let qclass = be16(pkt, qend - 2);
        let mut pos = qend;
        for _ in 0..(be16(pkt, 6) as usize + be16(pkt, 8) as usize) {
            let rr = skip_rr(pkt, pos).ok_or(formerr)?;
            // OPT and TSIG belong in the additional section only (RFC 6891 6.1.1, RFC 8945 5.1).
            if rr.rtype == TYPE_OPT || rr.rtype == TYPE_TSIG {
                return Err(formerr);
            }
            pos = rr.end;
        }
        let mut edns = None;
        let mut tsig = None;
        let mut cookie = None;
        let arcount = be16(pkt, 10);
        for i in 0..arcount {
            let rr = skip_rr(pkt, pos).ok_or(formerr)?;
            if rr.rtype == TYPE_TSIG {
                if i + 1 != arcount {
                    return Err(formerr);
                }
                tsig = Some(&pkt[pos..rr.end]);
            } else if rr.rtype == TYPE_OPT {
                // One OPT, owned by the root (RFC 6891 6.1.1).
                if edns.is_some() || rr.name_end != pos + 1 || pkt[pos] != 0 {
                    return Err(formerr);
                }
                let ttl = rr.ttl;
                edns = Some(Edns {
                    udp_payload: rr.class,
                    version: (ttl >> 16) as u8,
                    dnssec_ok: ttl as u16 & EDNS_DO != 0,
                });
                // Options: code, length, data. A COOKIE option is a client cookie (8 bytes),
                // maybe with a server cookie (8 to 32 bytes): any other length is FORMERR
                // (RFC 7873 5.2.2), as is an option running past the record.
                let mut at = rr.rdata;
                while at < rr.end {
                    if at + 4 > rr.end {
                        return Err(formerr);
                    }
                    let (code, len) = (be16(pkt, at), be16(pkt, at + 2) as usize);
                    let data = pkt.get(at + 4..at + 4 + len).filter(|_| at + 4 + len <= rr.end).ok_or(formerr)?;
                    if code == super::cookie::OPTION_CODE && cookie.is_none() {
                        if len != 8 && !(16..=40).contains(&len) {
                            return Err(formerr);
                        }
                        cookie = Some(data);
                    }
                    at += 4 + len;
                }
            }
            pos = rr.end;
        }
        Ok(Query { id, flags, question: &pkt[HEADER_LEN..qend], qtype, qclass, edns, tsig, cookie })
    }

    /// The question name in wire form, in the case the client sent it.
    pub fn name(&self) -> &'a [u8] {
        &self.question[..self.question.len() - 4]
    }

    pub fn flags(&self) -> u16 {
        self.flags
    }

    pub fn recursion_desired(&self) -> bool {
        self.flags & FLAG_RD != 0
    }

    pub fn checking_disabled(&self) -> bool {
        self.flags & FLAG_CD != 0
    }

    /// Whether the client may be told AD (RFC 6840 5.7: only if it asked with AD or DO).
    pub fn wants_ad(&self) -> bool {
        self.flags & FLAG_AD != 0 || self.edns.is_some_and(|e| e.dnssec_ok)
    }

    pub fn dnssec_ok(&self) -> bool {
        self.edns.is_some_and(|e| e.dnssec_ok)
    }

    /// The largest response this client takes over UDP.
    pub fn udp_limit(&self, max_payload: u16) -> usize {
        match self.edns {
            Some(e) => e.udp_payload.clamp(512, max_payload.max(512)) as usize,
            None => CLASSIC_UDP_PAYLOAD,
        }
    }
}

/// Length of the uncompressed name at the start of `buf`, root label included.
/// Question names must not use compression (there is nothing before them to point at).
fn question_name_len(buf: &[u8]) -> Option<usize> {
    let mut pos = 0;
    loop {
        let len = *buf.get(pos)? as usize;
        if len == 0 {
            return Some(pos + 1);
        }
        if len > 63 {
            return None;
        }
        pos += 1 + len;
        if pos + 1 > MAX_NAME_LEN {
            return None;
        }
    }
}

/// Copies an uncompressed wire name, ASCII-lowercased, into `out`; returns its length.
pub fn lowercase_name(name: &[u8], out: &mut [u8; MAX_NAME_LEN]) -> usize {
    let n = name.len().min(MAX_NAME_LEN);
    for (o, b) in out[..n].iter_mut().zip(name) {
        *o = b.to_ascii_lowercase();
    }
    n
}

/// Where a resource record sits in a packet.
#[derive(Debug, Clone, Copy)]
pub struct RrPos {
    pub name_end: usize,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    pub rdata: usize,
    pub end: usize,
}

/// Skips a possibly compressed name at `pos`; returns the offset after it.
pub fn skip_name(pkt: &[u8], mut pos: usize) -> Option<usize> {
    let mut labels = 0;
    loop {
        let len = *pkt.get(pos)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(pos + 1),
            0x00 => pos += 1 + len as usize,
            0xc0 => return (pos + 2 <= pkt.len()).then_some(pos + 2),
            _ => return None,
        }
        labels += 1;
        if labels > 127 {
            return None;
        }
    }
}

pub fn skip_rr(pkt: &[u8], pos: usize) -> Option<RrPos> {
    let name_end = skip_name(pkt, pos)?;
    let rdata = name_end + 10;
    if pkt.len() < rdata {
        return None;
    }
    let end = rdata + be16(pkt, name_end + 8) as usize;
    if pkt.len() < end {
        return None;
    }
    Some(RrPos {
        name_end,
        rtype: be16(pkt, name_end),
        class: be16(pkt, name_end + 2),
        ttl: be32(pkt, name_end + 4),
        rdata,
        end,
    })
}

/// The smallest TTL of the answer and authority records of a response (the OPT record, in the
/// additional section, is not looked at); `None` when there are none or the message is short.
/// DoH's `Cache-Control: max-age` (RFC 8484 section 5.1).
pub fn min_ttl(msg: &[u8]) -> Option<u32> {
    if msg.len() < 12 {
        return None;
    }
    let mut pos = 12;
    for _ in 0..be16(msg, 4) {
        pos = skip_name(msg, pos)? + 4;
    }
    let records = be16(msg, 6) as usize + be16(msg, 8) as usize;
    let mut min: Option<u32> = None;
    for _ in 0..records {
        let rr = skip_rr(msg, pos)?;
        min = Some(min.map_or(rr.ttl, |m| m.min(rr.ttl)));
        pos = rr.end;
    }
    min
}

#[inline]
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// The HINFO record of RFC 8482 section 4.2 (type, class, TTL 3600, CPU "RFC8482", OS "").
pub const RFC8482_HINFO: [u8; 19] =
    [0, 13, 0, 1, 0, 0, 0x0e, 0x10, 0, 9, 7, b'R', b'F', b'C', b'8', b'4', b'8', b'2', 0];

/// Writes one response into a reused buffer: header, the echoed question, then records.
pub struct Response<'b> {
    buf: &'b mut Vec<u8>,
    question_end: usize,
    counts: [u16; 3],
    section: usize,
}

/// Which section records are being added to; sections only move forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    Answer = 0,
    Authority = 1,
    Additional = 2,
}

impl<'b> Response<'b> {
    /// Starts a response to `q`: flags copied as RFC 1035 and 6840 say, question echoed as sent.
    pub fn new(buf: &'b mut Vec<u8>, q: &Query<'_>, rcode: u8, authoritative: bool) -> Self {
        buf.clear();
        let mut flags = FLAG_QR | FLAG_RA | (q.flags & (FLAG_RD | FLAG_CD)) | (rcode as u16 & 0xf);
        if authoritative {
            flags |= FLAG_AA;
        }
        buf.extend_from_slice(&q.id.to_be_bytes());
        buf.extend_from_slice(&flags.to_be_bytes());
        buf.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        buf.extend_from_slice(q.question);
        let question_end = buf.len();
        Response { buf, question_end, counts: [0; 3], section: 0 }
    }

    /// Appends a record whose owner is the question name (a pointer to offset 12).
    /// `tail` is type, class, TTL, RDLENGTH and RDATA.
    pub fn record_at_qname(&mut self, section: Section, tail: &[u8]) {
        self.enter(section);
        self.buf.extend_from_slice(&[0xc0, 0x0c]);
        self.buf.extend_from_slice(tail);
        self.counts[section as usize] += 1;
    }

    /// Appends a record owned by the question name's suffix starting at byte `at` of the name.
    pub fn record_at_suffix(&mut self, section: Section, at: usize, tail: &[u8]) {
        self.enter(section);
        self.buf.extend_from_slice(&(0xc000 | (HEADER_LEN + at) as u16).to_be_bytes());
        self.buf.extend_from_slice(tail);
        self.counts[section as usize] += 1;
    }

    /// An A or AAAA record for the question name.
    pub fn address(&mut self, ip: std::net::IpAddr, ttl: u32) {
        self.enter(Section::Answer);
        self.buf.extend_from_slice(&[0xc0, 0x0c]);
        match ip {
            std::net::IpAddr::V4(v4) => {
                self.buf.extend_from_slice(&TYPE_A.to_be_bytes());
                self.buf.extend_from_slice(&CLASS_IN.to_be_bytes());
                self.buf.extend_from_slice(&ttl.to_be_bytes());
                self.buf.extend_from_slice(&4u16.to_be_bytes());
                self.buf.extend_from_slice(&v4.octets());
            }
            std::net::IpAddr::V6(v6) => {
                self.buf.extend_from_slice(&TYPE_AAAA.to_be_bytes());
                self.buf.extend_from_slice(&CLASS_IN.to_be_bytes());
                self.buf.extend_from_slice(&ttl.to_be_bytes());
                self.buf.extend_from_slice(&16u16.to_be_bytes());
                self.buf.extend_from_slice(&v6.octets());
            }
        }
        self.counts[0] += 1;
    }

    /// A synthesized SOA in the authority section, owned by the question name's suffix that
    /// starts at byte `apex` of the name: the owner and MNAME are pointers, RNAME is
    /// `hostmaster.<apex>`; `ttl` is both the record TTL and MINIMUM (RFC 2308 section 3).
    pub fn soa_at_suffix(&mut self, apex: usize, ttl: u32, serial: u32) {
        self.enter(Section::Authority);
        let ptr = (0xc000 | (HEADER_LEN + apex) as u16).to_be_bytes();
        self.buf.extend_from_slice(&ptr);
        self.buf.extend_from_slice(&TYPE_SOA.to_be_bytes());
        self.buf.extend_from_slice(&CLASS_IN.to_be_bytes());
        self.buf.extend_from_slice(&ttl.to_be_bytes());
        let rdlen_at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&ptr);
        self.buf.push(10);
        self.buf.extend_from_slice(b"hostmaster");
        self.buf.extend_from_slice(&ptr);
        for v in [serial, 3600, 600, 86400, ttl] {
            self.buf.extend_from_slice(&v.to_be_bytes());
        }
        let rdlen = (self.buf.len() - rdlen_at - 2) as u16;
        put16(self.buf, rdlen_at, rdlen);
        self.counts[1] += 1;
    }

    fn enter(&mut self, section: Section) {
        debug_assert!(section as usize >= self.section, "sections are written in order");
        self.section = section as usize;
    }

    /// Closes the response: counts, the OPT record when the query had EDNS, and TC with the
    /// record sections dropped when the result exceeds `limit` (RFC 2181 9: no partial RRsets).
    pub fn finish(self, q: &Query<'_>, limit: usize, max_payload: u16) {
        let Response { buf, question_end, counts, .. } = self;
        let opt_len = if q.edns.is_some() { 11 } else { 0 };
        if buf.len() + opt_len > limit {
            buf.truncate(question_end);
            buf[2] |= (FLAG_TC >> 8) as u8;
            put16(buf, 6, 0);
            put16(buf, 8, 0);
        } else {
            put16(buf, 6, counts[0]);
            put16(buf, 8, counts[1]);
        }
        put16(buf, 10, counts[2]);
        if let Some(e) = q.edns {
            push_opt(buf, max_payload, e.dnssec_ok, 0);
        }
    }
}

/// Appends an OPT record and counts it in ARCOUNT.
pub fn push_opt(buf: &mut Vec<u8>, payload: u16, dnssec_ok: bool, ext_rcode: u8) {
    buf.push(0);
    buf.extend_from_slice(&TYPE_OPT.to_be_bytes());
    buf.extend_from_slice(&payload.to_be_bytes());
    buf.push(ext_rcode);
    buf.push(0);
    buf.extend_from_slice(&(if dnssec_ok { EDNS_DO } else { 0 }).to_be_bytes());
    buf.extend_from_slice(&[0, 0]);
    let ar = be16(buf, 10) + 1;
    put16(buf, 10, ar);
}

/// Where the OPT record that ends `buf` starts, when it ends with one as [`push_opt`] wrote it
/// (no options yet): options are then added with [`append_option`].
pub fn bare_opt(buf: &[u8]) -> Option<usize> {
    let n = buf.len();
    let at = n.checked_sub(11).filter(|&at| at >= HEADER_LEN)?;
    (buf[at] == 0 && be16(buf, at + 1) == TYPE_OPT && be16(buf, at + 9) == 0).then_some(at)
}

/// Adds option `code` with data `parts` (concatenated) to the OPT record at `opt` (from
/// [`bare_opt`]), which ends `buf`.
pub fn append_option(buf: &mut Vec<u8>, opt: usize, code: u16, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let rdlen = be16(buf, opt + 9) as usize + 4 + len;
    put16(buf, opt + 9, rdlen.min(u16::MAX as usize) as u16);
    buf.extend_from_slice(&code.to_be_bytes());
    buf.extend_from_slice(&(len as u16).to_be_bytes());
    for p in parts {
        buf.extend_from_slice(p);
    }
}

/// The EDNS option code of an Extended DNS Error (RFC 8914).
pub const EDE_OPTION: u16 = 15;

/// An Extended DNS Error (RFC 8914): why an answer is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ede {
    pub code: u16,
    pub text: &'static str,
}

impl Ede {
    /// 3, Stale Answer (RFC 8767).
    pub const STALE: Ede = Ede { code: 3, text: "" };
    /// 22, No Reachable Authority: the upstreams did not answer.
    pub const UPSTREAM: Ede = Ede { code: 22, text: "no upstream resolver answered" };
    /// 0, Other: the upstream packet budget refused the query (no code fits better).
    pub const BUDGET: Ede = Ede { code: 0, text: "upstream packet budget reached (dns.upstream_max_pps)" };
    /// 0, Other: every in-flight slot was taken.
    pub const BUSY: Ede = Ede { code: 0, text: "too many queries resolving (dns.max_inflight)" };

    /// The bytes it adds to an OPT record.
    pub fn wire_len(&self) -> usize {
        6 + self.text.len()
    }

    pub fn append(&self, buf: &mut Vec<u8>, opt: usize) {
        append_option(buf, opt, EDE_OPTION, &[&self.code.to_be_bytes(), self.text.as_bytes()]);
    }
}

/// A header-only answer (FORMERR, NOTIMP) for a packet whose question we could not read.
pub fn header_only(buf: &mut Vec<u8>, id: u16, query_flags: u16, rcode: u8) {
    buf.clear();
    let flags = FLAG_QR | FLAG_RA | (query_flags & (FLAG_RD | FLAG_CD | 0x7800)) | rcode as u16;
    buf.extend_from_slice(&id.to_be_bytes());
    buf.extend_from_slice(&flags.to_be_bytes());
    buf.extend_from_slice(&[0; 8]);
}

/// BADVERS (RFC 6891 6.1.3) for an EDNS version we do not speak.
pub fn badvers(buf: &mut Vec<u8>, q: &Query<'_>, max_payload: u16) {
    Response::new(buf, q, (RCODE_BADVERS & 0xf) as u8, false);
    put16(buf, 6, 0);
    push_opt(buf, max_payload, q.dnssec_ok(), (RCODE_BADVERS >> 4) as u8);
}

/// NOTAUTH with an unsigned TSIG record saying BADKEY (RFC 8945 5.2.1), for a signed query:
/// mskdns holds no keys. Returns false, writing nothing, when the TSIG record cannot be echoed
/// (a compressed key or algorithm name, or RDATA too short): answer FORMERR then.
pub fn tsig_badkey(buf: &mut Vec<u8>, q: &Query<'_>, max_payload: u16) -> bool {
    let Some(rr) = q.tsig else { return false };
    let Some(owner) = question_name_len(rr) else { return false };
    // Owner, type, class, TTL, RDLENGTH, then the algorithm name.
    let rdata = owner + 10;
    let Some(alg) = rr.get(rdata..).and_then(question_name_len) else { return false };
    // Time signed (6), fudge (2), MAC size (2), MAC, original id (2), error (2), other (2).
    let fixed = rdata + alg;
    let Some(mac_len) = rr.get(fixed + 8..fixed + 10).map(|b| be16(b, 0) as usize) else { return false };
    let orig_id_at = fixed + 10 + mac_len;
    if rr.len() < orig_id_at + 6 {
        return false;
    }
    let Response { buf, .. } = Response::new(buf, q, RCODE_NOTAUTH, false);
    if let Some(e) = q.edns {
        push_opt(buf, max_payload, e.dnssec_ok, 0);
    }
    buf.extend_from_slice(&rr[..owner]);
    buf.extend_from_slice(&TYPE_TSIG.to_be_bytes());
    buf.extend_from_slice(&CLASS_ANY.to_be_bytes());
    buf.extend_from_slice(&0u32.to_be_bytes());
    let rdlen_at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&rr[rdata..fixed + 8]);
    buf.extend_from_slice(&0u16.to_be_bytes());
    buf.extend_from_slice(&rr[orig_id_at..orig_id_at + 2]);
    buf.extend_from_slice(&TSIG_BADKEY.to_be_bytes());
    buf.extend_from_slice(&0u16.to_be_bytes());
    let rdlen = (buf.len() - rdlen_at - 2) as u16;
    put16(buf, rdlen_at, rdlen);
    let ar = be16(buf, 10) + 1;
    put16(buf, 10, ar);
    true
}

/// Header flags a forwarded answer keeps from upstream: the RCODE and, when allowed, AD.
pub fn response_flags(q: &Query<'_>, upstream_flags: u16) -> u16 {
    let mut flags = FLAG_QR | FLAG_RA | (q.flags & (FLAG_RD | FLAG_CD)) | (upstream_flags & 0xf);
    if q.wants_ad() {
        flags |= upstream_flags & FLAG_AD;
    }
    flags
}

pub fn set_truncated(buf: &mut [u8]) {
    buf[2] |= (FLAG_TC >> 8) as u8;
}

pub fn is_truncated(flags: u16) -> bool {
    flags & FLAG_TC != 0
}

pub fn is_response(flags: u16) -> bool {
    flags & FLAG_QR != 0
}

/// Builds a recursive query for an upstream: lowercased question, EDNS with our payload and
/// the client's DO bit, CD passed on.
pub fn build_upstream_query(
    buf: &mut Vec<u8>,
    id: u16,
    lc_name: &[u8],
    qtype: u16,
    qclass: u16,
    dnssec_ok: bool,
    checking_disabled: bool,
) {
    buf.clear();
    let flags = FLAG_RD | if checking_disabled { FLAG_CD } else { 0 };
    buf.extend_from_slice(&id.to_be_bytes());
    buf.extend_from_slice(&flags.to_be_bytes());
    buf.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    buf.extend_from_slice(lc_name);
    buf.extend_from_slice(&qtype.to_be_bytes());
    buf.extend_from_slice(&qclass.to_be_bytes());
    push_opt(buf, DEFAULT_EDNS_PAYLOAD, dnssec_ok, 0);
}

/// Presentation form of a wire name, for logs and `explain`.
pub fn wire_to_string(wire: &[u8]) -> String {
    let mut s = String::with_capacity(wire.len());
    let mut pos = 0;
    while let Some(&len) = wire.get(pos) {
        if len == 0 || len & 0xc0 != 0 {
            break;
        }
        let label = wire.get(pos + 1..pos + 1 + len as usize).unwrap_or_default();
        for &b in label {
            if b.is_ascii_graphic() && b != b'.' && b != b'\\' {
                s.push(b as char);
            } else {
                s.push_str(&format!("\\{b:03}"));
            }
        }
        s.push('.');
        pos += 1 + len as usize;
    }
    if s.is_empty() {
        s.push('.');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns as HEdns, Message, MessageType, Query as HQuery};
    use hickory_proto::rr::{Name, RecordType};

    fn query_bytes(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(HQuery::query(Name::from_ascii(name).unwrap(), rtype));
        if let Some(size) = edns {
            let mut e = HEdns::new();
            e.set_max_payload(size);
            e.set_dnssec_ok(true);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn parses_a_plain_query() {
        let pkt = query_bytes("Boot-ABC.c2.example.", RecordType::A, None);
        let q = Query::parse(&pkt).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.qtype, TYPE_A);
        assert_eq!(q.name(), b"\x08Boot-ABC\x02c2\x07example\x00");
        assert!(q.edns.is_none());
        assert_eq!(q.udp_limit(1232), 512);
    }

    #[test]
    fn parses_edns() {
        let pkt = query_bytes("a.example.", RecordType::AAAA, Some(4096));
        let q = Query::parse(&pkt).unwrap();
        assert_eq!(q.edns, Some(Edns { udp_payload: 4096, version: 0, dnssec_ok: true }));
        assert_eq!(q.udp_limit(1232), 1232);
    }

    #[test]
    fn rejects_what_it_must() {
        assert_eq!(Query::parse(&[0; 11]).unwrap_err(), Reject::Drop);
        let mut resp = query_bytes("a.example.", RecordType::A, None);
        resp[2] |= 0x80;
        assert_eq!(Query::parse(&resp).unwrap_err(), Reject::Drop);
        let mut two = query_bytes("a.example.", RecordType::A, None);
        two[5] = 2;
        assert!(matches!(Query::parse(&two), Err(Reject::FormErr { .. })));
        let pkt = query_bytes("a.example.", RecordType::A, None);
        assert!(matches!(Query::parse(&pkt[..pkt.len() - 1]), Err(Reject::FormErr { .. })));
        let mut notify = query_bytes("a.example.", RecordType::A, None);
        notify[2] |= 4 << 3;
        assert!(matches!(Query::parse(&notify), Err(Reject::NotImp { .. })));
    }

    #[test]
    fn options_added_to_the_opt_record_decode_in_hickory() {
        use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
        let pkt = query_bytes("a.example.", RecordType::A, Some(1232));
        let q = Query::parse(&pkt).unwrap();
        let mut buf = Vec::new();
        Response::new(&mut buf, &q, RCODE_SERVFAIL, false).finish(&q, 1232, 1232);
        let opt = bare_opt(&buf).expect("the response ends with a bare OPT");
        append_option(&mut buf, opt, 10, &[&[1; 8], &[2; 16]]);
        Ede::BUDGET.append(&mut buf, opt);
        assert_eq!(bare_opt(&buf), None, "options were added");
        let m = Message::from_vec(&buf).unwrap();
        let edns = m.edns.expect("an OPT record");
        let ede = edns.option(EdnsCode::Unknown(EDE_OPTION)).or_else(|| edns.option(EdnsCode::from(EDE_OPTION)));
        let Some(EdnsOption::Unknown(_, data)) = ede else { panic!("no EDE in {edns:?}") };
        assert_eq!(&data[..2], &[0, 0]);
        assert_eq!(&data[2..], Ede::BUDGET.text.as_bytes());
        assert!(edns.option(EdnsCode::Cookie).is_some());
        // Without EDNS there is no OPT to add to.
        let plain = query_bytes("a.example.", RecordType::A, None);
        let q = Query::parse(&plain).unwrap();
        let mut buf = Vec::new();
        Response::new(&mut buf, &q, RCODE_SERVFAIL, false).finish(&q, 512, 1232);
        assert_eq!(bare_opt(&buf), None);
    }

    #[test]
    fn response_round_trips_through_hickory() {
        let pkt = query_bytes("Boot-X.c1.kafka-serverless.us-east-1.amazonaws.com.", RecordType::A, Some(1232));
        let q = Query::parse(&pkt).unwrap();
        let mut buf = Vec::new();
        let mut r = Response::new(&mut buf, &q, RCODE_NOERROR, true);
        r.address("10.0.0.1".parse().unwrap(), 60);
        r.address("10.0.0.2".parse().unwrap(), 60);
        r.finish(&q, q.udp_limit(1232), 1232);
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert!(m.metadata.authoritative);
        assert_eq!(m.answers.len(), 2);
        assert_eq!(m.queries[0].name().to_string(), "Boot-X.c1.kafka-serverless.us-east-1.amazonaws.com.");
        assert!(m.edns.is_some());
    }

    #[test]
    fn soa_at_suffix_is_well_formed() {
        let pkt = query_bytes("b1-x.c1.kafka-serverless.us-east-1.amazonaws.com.", RecordType::AAAA, None);
        let q = Query::parse(&pkt).unwrap();
        let mut buf = Vec::new();
        let mut r = Response::new(&mut buf, &q, RCODE_NOERROR, true);
        r.soa_at_suffix(5 + 3, 30, 1);
        r.finish(&q, 512, 1232);
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(m.authorities.len(), 1);
        let soa = &m.authorities[0];
        assert_eq!(soa.name.to_string(), "kafka-serverless.us-east-1.amazonaws.com.");
        assert_eq!(soa.ttl, 30);
    }

    #[test]
    fn oversized_answers_truncate() {
        let pkt = query_bytes("a.example.", RecordType::A, None);
        let q = Query::parse(&pkt).unwrap();
        let mut buf = Vec::new();
        let mut r = Response::new(&mut buf, &q, RCODE_NOERROR, true);
        for i in 0..40u8 {
            r.address(std::net::Ipv4Addr::new(10, 0, 0, i).into(), 60);
        }
        r.finish(&q, 512, 1232);
        let m = Message::from_vec(&buf).unwrap();
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
        assert_eq!(m.queries.len(), 1);
    }

    #[test]
    fn names_convert() {
        assert_eq!(name_to_wire("A.b.").unwrap(), b"\x01a\x01b\x00");
        assert_eq!(name_to_wire(".").unwrap(), b"\x00");
        assert!(name_to_wire("a..b").is_none());
        assert_eq!(wire_to_string(b"\x01a\x01b\x00"), "a.b.");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = Query::parse(&bytes);
        }

        #[test]
        fn agrees_with_hickory_on_valid_queries(
            labels in proptest::collection::vec("[a-zA-Z0-9][a-zA-Z0-9-]{0,19}", 1..6),
            rtype in 1u16..300,
            edns in proptest::option::of(512u16..4096),
        ) {
            let name = format!("{}.", labels.join("."));
            let pkt = query_bytes(&name, RecordType::from(rtype), edns);
            let q = Query::parse(&pkt).unwrap();
            let m = Message::from_vec(&pkt).unwrap();
            proptest::prop_assert_eq!(q.qtype, u16::from(m.queries[0].query_type()));
            // to_ascii: to_string would show an `xn--` label decoded (IDNA), the wire keeps it.
            proptest::prop_assert_eq!(wire_to_string(q.name()), m.queries[0].name().to_ascii());
            proptest::prop_assert_eq!(q.edns.map(|e| e.udp_payload), m.edns.as_ref().map(|e| e.max_payload()));
        }
    }
}
