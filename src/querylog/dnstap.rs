//! dnstap records: the messages of the official schema (dnstap.proto, from dnstap.info) that mskdns
//! writes, declared with prost's derive (no build step, no protoc): `Dnstap` with its identity,
//! version and one `Message`. Field numbers and enum values are the schema's.

use std::net::IpAddr;
use std::time::SystemTime;

use prost::Message as _;

use super::Record;
use crate::config::DnstapMessage;
use crate::dns::engine::Transport;

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

fn address(ip: IpAddr) -> (i32, Vec<u8>) {
    match ip.to_canonical() {
        IpAddr::V4(a) => (INET, a.octets().to_vec()),
        IpAddr::V6(a) => (INET6, a.octets().to_vec()),
    }
}

fn time(t: SystemTime) -> (u64, u32) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

/// The dnstap messages of one record: CLIENT_QUERY and CLIENT_RESPONSE (the latter when something
/// was sent), and FORWARDER_QUERY and FORWARDER_RESPONSE when an upstream exchange answered it.
/// Each is appended to `out` as a Frame Streams data frame.
pub fn frames(r: &Record, identity: &[u8], wanted: &[DnstapMessage], out: &mut Vec<u8>) {
    let (family, client) = address(r.client.ip());
    let (qsec, qnsec) = time(r.received);
    let (rsec, rnsec) = time(r.answered);
    let base = Message {
        r#type: CLIENT_QUERY,
        socket_family: Some(family),
        socket_protocol: Some(protocol(r.transport)),
        query_address: Some(client),
        query_port: Some(r.client.port() as u32),
        response_address: r.local.map(|l| address(l.ip()).1),
        response_port: r.local.map(|l| l.port() as u32),
        query_time_sec: Some(qsec),
        query_time_nsec: Some(qnsec),
        ..Message::default()
    };
    let mut messages = Vec::with_capacity(4);
    if wanted.contains(&DnstapMessage::ClientQuery) {
        messages.push(Message { query_message: Some(r.query.to_vec()), ..base.clone() });
    }
    if let Some(f) = &r.forwarded {
        let [q, a] = forwarder(f);
        if wanted.contains(&DnstapMessage::ForwarderQuery) {
            messages.push(q);
        }
        if wanted.contains(&DnstapMessage::ForwarderResponse) {
            messages.push(a);
        }
    }
    if !r.response.is_empty() && wanted.contains(&DnstapMessage::ClientResponse) {
        messages.push(Message {
            r#type: CLIENT_RESPONSE,
            response_time_sec: Some(rsec),
            response_time_nsec: Some(rnsec),
            response_message: Some(r.response.to_vec()),
            ..base
        });
    }
    let mut buf = Vec::with_capacity(256);
    for m in messages {
        let tap = Dnstap {
            identity: Some(identity.to_vec()),
            version: Some(format!("mskdns {}", env!("CARGO_PKG_VERSION")).into_bytes()),
            extra: None,
            r#type: DNSTAP_MESSAGE,
            message: Some(m),
        };
        buf.clear();
        if tap.encode(&mut buf).is_ok() {
            super::fstrm::data(out, &buf);
        }
    }
}

/// FORWARDER_QUERY and FORWARDER_RESPONSE of the exchange with `f.upstream`, written as UDP (an
/// exchange that went on over TCP after a truncated answer is written so too).
fn forwarder(f: &super::Forwarded) -> [Message; 2] {
    let (family, upstream) = address(f.upstream.ip());
    let (qsec, qnsec) = time(f.sent);
    let (rsec, rnsec) = time(f.received);
    let q = Message {
        r#type: FORWARDER_QUERY,
        socket_family: Some(family),
        socket_protocol: Some(UDP),
        response_address: Some(upstream),
        response_port: Some(f.upstream.port() as u32),
        query_time_sec: Some(qsec),
        query_time_nsec: Some(qnsec),
        query_message: Some(f.query.clone()),
        ..Message::default()
    };
    let r = Message {
        r#type: FORWARDER_RESPONSE,
        response_time_sec: Some(rsec),
        response_time_nsec: Some(rnsec),
        response_message: Some(f.response.to_vec()),
        query_message: None,
        ..q.clone()
    };
    [q, r]
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
