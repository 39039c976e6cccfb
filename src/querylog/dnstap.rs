//! dnstap records: `Dnstap` (identity, version, one `Message`) of the official schema (dnstap.proto,
//! from dnstap.info), written with prost's encoding functions straight from a record's bytes. Field
//! numbers and enum values are the schema's; the tests declare the schema's messages with prost's
//! derive (no build step, no protoc) and decode what the encoder wrote with them.

use std::net::IpAddr;
use std::time::SystemTime;

use super::Record;
use crate::config::DnstapMessage;
use crate::dns::engine::Transport;

const DNSTAP_MESSAGE: i32 = 1;
const CLIENT_QUERY: i32 = 5;
const CLIENT_RESPONSE: i32 = 6;
const FORWARDER_QUERY: i32 = 7;
const FORWARDER_RESPONSE: i32 = 8;
const INET: i32 = 1;
const INET6: i32 = 2;
const UDP: i32 = 1;
const TCP: i32 = 2;
const DOT: i32 = 3;
const DOH: i32 = 4;

fn protocol(t: Transport) -> i32 {
    match t {
        Transport::Udp => UDP,
        Transport::Tcp => TCP,
        Transport::Dot => DOT,
        Transport::Doh => DOH,
    }
}

fn address(ip: IpAddr) -> (i32, AddrBytes) {
    match ip.to_canonical() {
        IpAddr::V4(a) => (INET, AddrBytes::V4(a.octets())),
        IpAddr::V6(a) => (INET6, AddrBytes::V6(a.octets())),
    }
}

/// An address's bytes, without allocating.
#[derive(Clone, Copy)]
enum AddrBytes {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl AsRef<[u8]> for AddrBytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            AddrBytes::V4(a) => a,
            AddrBytes::V6(a) => a,
        }
    }
}

fn time(t: SystemTime) -> (u64, u32) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

/// One message's fields, borrowed from its record.
#[derive(Clone, Copy)]
struct Fields<'a> {
    kind: i32,
    family: i32,
    protocol: i32,
    query_address: Option<AddrBytes>,
    query_port: Option<u16>,
    response_address: Option<AddrBytes>,
    response_port: Option<u16>,
    query_time: Option<(u64, u32)>,
    query_message: Option<&'a [u8]>,
    response_time: Option<(u64, u32)>,
    response_message: Option<&'a [u8]>,
}

/// Writes dnstap records as Frame Streams data frames with prost's encoding functions, straight
/// from a record's bytes: the derived structs above would copy every DNS message into a `Vec`
/// first (they are the decoder the tests check this encoder against).
pub struct Encoder {
    identity: Vec<u8>,
    version: Vec<u8>,
    message: Vec<u8>,
    tap: Vec<u8>,
}

impl Encoder {
    pub fn new(identity: Vec<u8>) -> Self {
        Encoder {
            identity,
            version: format!("mskdns {}", env!("CARGO_PKG_VERSION")).into_bytes(),
            message: Vec::with_capacity(1024),
            tap: Vec::with_capacity(1024),
        }
    }

    /// The dnstap messages of one record, appended to `out` as data frames: CLIENT_QUERY,
    /// FORWARDER_QUERY and FORWARDER_RESPONSE when an upstream exchange answered it, and
    /// CLIENT_RESPONSE when something was sent; those of `wanted`.
    pub fn frames(&mut self, r: &Record, wanted: &[DnstapMessage], out: &mut Vec<u8>) {
        let (family, client) = address(r.client.ip());
        let base = Fields {
            kind: CLIENT_QUERY,
            family,
            protocol: protocol(r.transport),
            query_address: Some(client),
            query_port: Some(r.client.port()),
            response_address: r.local.map(|l| address(l.ip()).1),
            response_port: r.local.map(|l| l.port()),
            query_time: Some(time(r.received)),
            query_message: None,
            response_time: None,
            response_message: None,
        };
        if wanted.contains(&DnstapMessage::ClientQuery) {
            self.frame(&Fields { query_message: Some(&r.query), ..base }, out);
        }
        if let Some(f) = &r.forwarded {
            let (family, upstream) = address(f.upstream.ip());
            // The exchange that gave the answer: over TCP when UDP's answer was truncated.
            let q = Fields {
                kind: FORWARDER_QUERY,
                family,
                protocol: if f.tcp { TCP } else { UDP },
                query_address: None,
                query_port: None,
                response_address: Some(upstream),
                response_port: Some(f.upstream.port()),
                query_time: Some(time(f.sent)),
                query_message: Some(&f.query),
                response_time: None,
                response_message: None,
            };
            if wanted.contains(&DnstapMessage::ForwarderQuery) {
                self.frame(&q, out);
            }
            if wanted.contains(&DnstapMessage::ForwarderResponse) {
                let a = Fields {
                    kind: FORWARDER_RESPONSE,
                    query_message: None,
                    response_time: Some(time(f.received)),
                    response_message: Some(&f.response),
                    ..q
                };
                self.frame(&a, out);
            }
        }
        if !r.response.is_empty() && wanted.contains(&DnstapMessage::ClientResponse) {
            let a = Fields {
                kind: CLIENT_RESPONSE,
                response_time: Some(time(r.answered)),
                response_message: Some(&r.response),
                ..base
            };
            self.frame(&a, out);
        }
    }

    fn frame(&mut self, m: &Fields<'_>, out: &mut Vec<u8>) {
        use prost::encoding::{WireType, encode_key, encode_varint};
        let msg = &mut self.message;
        msg.clear();
        varint(1, m.kind as u64, msg);
        varint(2, m.family as u64, msg);
        varint(3, m.protocol as u64, msg);
        if let Some(a) = &m.query_address {
            bytes(4, a.as_ref(), msg);
        }
        if let Some(a) = &m.response_address {
            bytes(5, a.as_ref(), msg);
        }
        if let Some(p) = m.query_port {
            varint(6, p as u64, msg);
        }
        if let Some(p) = m.response_port {
            varint(7, p as u64, msg);
        }
        if let Some((sec, nsec)) = m.query_time {
            varint(8, sec, msg);
            fixed32(9, nsec, msg);
        }
        if let Some(q) = m.query_message {
            bytes(10, q, msg);
        }
        if let Some((sec, nsec)) = m.response_time {
            varint(12, sec, msg);
            fixed32(13, nsec, msg);
        }
        if let Some(a) = m.response_message {
            bytes(14, a, msg);
        }
        let tap = &mut self.tap;
        tap.clear();
        bytes(1, &self.identity, tap);
        bytes(2, &self.version, tap);
        encode_key(14, WireType::LengthDelimited, tap);
        encode_varint(msg.len() as u64, tap);
        tap.extend_from_slice(msg);
        varint(15, DNSTAP_MESSAGE as u64, tap);
        super::fstrm::data(out, tap);
    }
}

fn varint(tag: u32, v: u64, buf: &mut Vec<u8>) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::Varint, buf);
    prost::encoding::encode_varint(v, buf);
}

fn fixed32(tag: u32, v: u32, buf: &mut Vec<u8>) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::ThirtyTwoBit, buf);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn bytes(tag: u32, v: &[u8], buf: &mut Vec<u8>) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(v.len() as u64, buf);
    buf.extend_from_slice(v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dnstap {
        #[prost(bytes = "vec", optional, tag = "1")]
        pub identity: Option<Vec<u8>>,
        #[prost(bytes = "vec", optional, tag = "2")]
        pub version: Option<Vec<u8>>,
        #[prost(bytes = "vec", optional, tag = "3")]
        pub extra: Option<Vec<u8>>,
        /// Always MESSAGE (1).
        #[prost(int32, required, tag = "15")]
        pub r#type: i32,
        #[prost(message, optional, tag = "14")]
        pub message: Option<Message>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Message {
        #[prost(int32, required, tag = "1")]
        pub r#type: i32,
        #[prost(int32, optional, tag = "2")]
        pub socket_family: Option<i32>,
        #[prost(int32, optional, tag = "3")]
        pub socket_protocol: Option<i32>,
        #[prost(bytes = "vec", optional, tag = "4")]
        pub query_address: Option<Vec<u8>>,
        #[prost(bytes = "vec", optional, tag = "5")]
        pub response_address: Option<Vec<u8>>,
        #[prost(uint32, optional, tag = "6")]
        pub query_port: Option<u32>,
        #[prost(uint32, optional, tag = "7")]
        pub response_port: Option<u32>,
        #[prost(uint64, optional, tag = "8")]
        pub query_time_sec: Option<u64>,
        #[prost(fixed32, optional, tag = "9")]
        pub query_time_nsec: Option<u32>,
        #[prost(bytes = "vec", optional, tag = "10")]
        pub query_message: Option<Vec<u8>>,
        #[prost(uint64, optional, tag = "12")]
        pub response_time_sec: Option<u64>,
        #[prost(fixed32, optional, tag = "13")]
        pub response_time_nsec: Option<u32>,
        #[prost(bytes = "vec", optional, tag = "14")]
        pub response_message: Option<Vec<u8>>,
    }

    #[test]
    fn a_message_encodes_as_the_schema_says() {
        // The bytes of a CLIENT_QUERY over UDP from 10.0.0.210:55142, as the Go reference
        // library's documentation shows them (type 5, family 1, protocol 1, address, port).
        let m = Message {
            r#type: CLIENT_QUERY,
            socket_family: Some(INET),
            socket_protocol: Some(UDP),
            query_address: Some(vec![10, 0, 0, 210]),
            query_port: Some(55142),
            ..Message::default()
        };
        let bytes = m.encode_to_vec();
        assert_eq!(&bytes[..12], &[8, 5, 16, 1, 24, 1, 34, 4, 10, 0, 0, 210]);
        assert_eq!(&bytes[12..], &[48, 230, 174, 3]);
        let tap = Dnstap { r#type: DNSTAP_MESSAGE, message: Some(m), ..Dnstap::default() };
        let bytes = tap.encode_to_vec();
        assert_eq!(bytes[0], 114, "field 14, length-delimited");
        assert_eq!(&bytes[bytes.len() - 2..], &[120, 1], "field 15 (type) = MESSAGE");
        assert_eq!(Dnstap::decode(&bytes[..]).unwrap(), tap);
    }

    fn record(forwarded: bool) -> Record {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(1_700_000_000_123_456_789);
        Record {
            received: t,
            answered: t + std::time::Duration::from_micros(250),
            latency: std::time::Duration::from_micros(250),
            client: "[2001:db8::7]:40000".parse().unwrap(),
            local: Some("[2001:db8::53]:53".parse().unwrap()),
            listener: 0,
            transport: Transport::Doh,
            query: vec![1, 2, 3].into(),
            response: vec![4, 5, 6, 7].into(),
            outcome: crate::dns::engine::Outcome::Forwarded,
            upstream: None,
            forwarded: forwarded.then(|| super::super::Forwarded {
                upstream: "10.0.0.2:53".parse().unwrap(),
                tcp: false,
                sent: t,
                received: t + std::time::Duration::from_micros(200),
                query: vec![8, 9],
                response: vec![10, 11, 12].into(),
            }),
        }
    }

    /// Splits Frame Streams data frames and decodes each with the derived schema.
    fn decoded(frames: &[u8]) -> Vec<Dnstap> {
        let mut out = Vec::new();
        let mut rest = frames;
        while rest.len() >= 4 {
            let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            out.push(Dnstap::decode(&rest[4..4 + n]).unwrap());
            rest = &rest[4 + n..];
        }
        assert!(rest.is_empty());
        out
    }

    #[test]
    fn the_encoder_writes_what_the_schema_decodes() {
        use crate::config::DnstapMessage::*;
        let all = [ClientQuery, ClientResponse, ForwarderQuery, ForwarderResponse];
        let mut enc = Encoder::new(b"resolver-a".to_vec());
        let mut out = Vec::new();
        enc.frames(&record(true), &all, &mut out);
        let taps = decoded(&out);
        let kinds: Vec<i32> = taps.iter().map(|t| t.message.as_ref().unwrap().r#type).collect();
        assert_eq!(kinds, [CLIENT_QUERY, FORWARDER_QUERY, FORWARDER_RESPONSE, CLIENT_RESPONSE]);
        let version = format!("mskdns {}", env!("CARGO_PKG_VERSION")).into_bytes();
        assert!(taps.iter().all(|t| t.identity.as_deref() == Some(&b"resolver-a"[..])
            && t.version.as_deref() == Some(&version[..])
            && t.r#type == DNSTAP_MESSAGE));
        let client = Message {
            r#type: CLIENT_QUERY,
            socket_family: Some(INET6),
            socket_protocol: Some(DOH),
            query_address: Some("2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec()),
            response_address: Some("2001:db8::53".parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec()),
            query_port: Some(40000),
            response_port: Some(53),
            query_time_sec: Some(1_700_000_000),
            query_time_nsec: Some(123_456_789),
            query_message: Some(vec![1, 2, 3]),
            ..Message::default()
        };
        assert_eq!(taps[0].message.as_ref().unwrap(), &client);
        let response = Message {
            r#type: CLIENT_RESPONSE,
            query_message: None,
            response_time_sec: Some(1_700_000_000),
            response_time_nsec: Some(123_706_789),
            response_message: Some(vec![4, 5, 6, 7]),
            ..client
        };
        assert_eq!(taps[3].message.as_ref().unwrap(), &response);
        let fq = taps[1].message.as_ref().unwrap();
        assert_eq!((fq.socket_family, fq.socket_protocol, fq.response_port), (Some(INET), Some(UDP), Some(53)));
        assert_eq!(
            (fq.response_address.as_deref(), fq.query_message.as_deref()),
            (Some(&[10, 0, 0, 2][..]), Some(&[8, 9][..]))
        );
        assert_eq!(taps[2].message.as_ref().unwrap().response_message.as_deref(), Some(&[10, 11, 12][..]));
        // An answer upstream gave over TCP (its UDP answer was truncated): both forwarder messages say TCP.
        let mut r = record(true);
        r.forwarded.as_mut().unwrap().tcp = true;
        let mut out = Vec::new();
        enc.frames(&r, &[ForwarderQuery, ForwarderResponse], &mut out);
        let protocols: Vec<_> = decoded(&out).iter().map(|t| t.message.as_ref().unwrap().socket_protocol).collect();
        assert_eq!(protocols, [Some(TCP), Some(TCP)]);
        // Only the messages asked for; no response when nothing was sent.
        let mut out = Vec::new();
        let mut r = record(true);
        r.response = Box::default();
        enc.frames(&r, &[ClientQuery, ClientResponse], &mut out);
        assert_eq!(decoded(&out).len(), 1);
    }
}
