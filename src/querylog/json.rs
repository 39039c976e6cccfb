//! One JSON object per query with the field names and value forms of Route 53 Resolver query logs
//! (so what reads those, Athena tables and SIEM parsers, reads these), plus mskdns's own: `view`,
//! `cluster`, `outcome`, `upstream`, `latency_ms`. The messages are decoded here, in the writer,
//! with hickory-proto: never on the query path.

use std::time::SystemTime;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, RecordType};
use serde::Serialize;

use super::Record;
use crate::dns::engine::Transport;

/// What Route 53 calls the log format version.
const VERSION: &str = "1.100000";

/// The AWS fields of every line, from the instance metadata or the configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Aws {
    pub account_id: Option<String>,
    pub region: Option<String>,
    pub vpc_id: Option<String>,
    pub instance_id: Option<String>,
}

#[derive(Serialize)]
struct Line<'a> {
    version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vpc_id: Option<&'a str>,
    query_timestamp: String,
    query_name: String,
    query_type: String,
    query_class: String,
    rcode: String,
    answers: Vec<AnswerRr>,
    srcaddr: String,
    srcport: String,
    transport: &'static str,
    srcids: SrcIds<'a>,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    view: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
    latency_ms: f64,
}

#[derive(Serialize)]
struct SrcIds<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<&'a str>,
}

#[derive(Serialize)]
struct AnswerRr {
    #[serde(rename = "Rdata")]
    rdata: String,
    #[serde(rename = "Type")]
    rtype: String,
    #[serde(rename = "Class")]
    class: String,
}

/// Route 53's transport names.
fn transport(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "UDP",
        Transport::Tcp => "TCP",
        Transport::Dot => "DoT",
        Transport::Doh => "DoH",
    }
}

/// `NOERROR`, `NXDOMAIN`, … as Route 53 writes them.
fn rcode(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::NotAuth => "NOTAUTH".into(),
        ResponseCode::BADVERS => "BADVERS".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}

/// `2024-05-01T12:34:56Z`: seconds, UTC, as Route 53 writes `query_timestamp`.
fn timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    match chrono::DateTime::from_timestamp(secs, 0) {
        Some(d) => d.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => "1970-01-01T00:00:00Z".into(),
    }
}

/// Appends `r`'s line (and its newline) to `out`. `view`: the view that answered, if known.
pub fn line(r: &Record, aws: &Aws, view: Option<&str>, out: &mut Vec<u8>) {
    let query = Message::from_vec(&r.query).ok();
    let response = (!r.response.is_empty()).then(|| Message::from_vec(&r.response).ok()).flatten();
    let q = query.as_ref().and_then(|m| m.queries.first()).or(response.as_ref().and_then(|m| m.queries.first()));
    let (name, qtype, qclass) = match q {
        Some(q) => (q.name().to_string(), q.query_type(), q.query_class()),
        None => (String::new(), RecordType::Unknown(0), DNSClass::Unknown(0)),
    };
    let answers = response
        .as_ref()
        .map(|m| {
            m.answers
                .iter()
                .map(|rr| AnswerRr {
                    rdata: rr.data.to_string(),
                    rtype: rr.record_type().to_string(),
                    class: rr.dns_class.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    let code = match &response {
        Some(m) => rcode(m.metadata.response_code),
        None => "-".into(), // nothing was sent (dropped, rate limited)
    };
    let line = Line {
        version: VERSION,
        account_id: aws.account_id.as_deref(),
        region: aws.region.as_deref(),
        vpc_id: aws.vpc_id.as_deref(),
        query_timestamp: timestamp(r.received),
        query_name: if name.is_empty() { "-".into() } else { name.clone() },
        query_type: qtype.to_string(),
        query_class: qclass.to_string(),
        rcode: code,
        answers,
        srcaddr: r.client.ip().to_canonical().to_string(),
        srcport: r.client.port().to_string(),
        transport: transport(r.transport),
        srcids: SrcIds { instance: aws.instance_id.as_deref() },
        outcome: r.outcome.label(),
        view,
        cluster: crate::names::cluster_key(name.trim_end_matches('.'))
            .ok()
            .map(|(key, provisioned)| crate::names::cluster_label(&key, provisioned)),
        upstream: r.upstream.map(|u| u.to_string()),
        latency_ms: (r.latency.as_secs_f64() * 1e6).round() / 1e3,
    };
    if serde_json::to_writer(&mut *out, &line).is_ok() {
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_seconds() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_714_566_896);
        assert_eq!(timestamp(t), "2024-05-01T12:34:56Z");
    }
}
