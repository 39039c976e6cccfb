//! One discovery for a fleet: a publisher writes what `[discovery.aws]` found (clusters, targets,
//! VPC endpoint addresses with their AZs, subnet AZs, the time of the pass) to S3 as one JSON
//! document; readers poll it (`[discovery.snapshot]`) instead of calling MSK and EC2.
//!
//! The document is versioned by its top-level integer `version`; fields may be added without a
//! new version (readers ignore fields they do not know), anything else gets a new one. A reader
//! takes a document whole or not at all: every cluster goes through the file's own validation.

pub mod publisher;
pub mod reader;
pub mod s3;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::msk::Found;
use crate::config::{ClusterConfig, ConfigError, EndpointAddr, EndpointState, parse_target, validate_clusters};

/// The schema's version this build writes and reads.
pub const VERSION: u32 = 1;

/// The published state of one discovery.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Document {
    pub version: u32,
    /// When the discovery pass that produced it ran (RFC 3339, UTC).
    pub pass_time: String,
    /// Who wrote it (host name and process id), for the operator.
    #[serde(default)]
    pub publisher: String,
    pub clusters: Vec<Cluster>,
    /// Each VPC endpoint the clusters' targets name, with its addresses and their AZs as EC2
    /// listed them; an endpoint the publisher has not read yet is absent.
    #[serde(default)]
    pub endpoints: BTreeMap<String, Vec<EndpointAddr>>,
    /// Subnet AZs the publisher read (subnet id → AZ name and AZ id).
    #[serde(default)]
    pub subnets: BTreeMap<String, Vec<String>>,
}

/// One cluster: its names, target and TTL, and where it came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cluster {
    /// The name clients bootstrap from (a broker's name for a provisioned cluster).
    pub bootstrap: String,
    /// The target as a tag writes it: `vpce-…`, `addresses=IP …`, `forward=IP[:port] …`, `proxy=IP …`.
    pub target: String,
    pub ttl: u32,
    #[serde(default)]
    pub arn: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub account: String,
    #[serde(default)]
    pub region: String,
    /// `serverless` or `provisioned`.
    #[serde(default)]
    pub kind: String,
}

/// Why a document was not taken: the reason for the log line, and a short kind for the metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub kind: &'static str,
    pub reason: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

fn rejected(kind: &'static str, reason: impl Into<String>) -> Rejected {
    Rejected { kind, reason: reason.into() }
}

impl Document {
    /// The document for what a discovery pass found at `pass_unix`, with the endpoint addresses
    /// and subnet AZs known (only the endpoints its clusters name are kept).
    pub fn build(found: &[Found], ttl: u32, cells: &EndpointState, pass_unix: u64) -> Document {
        let clusters: Vec<Cluster> = found
            .iter()
            .filter(|f| f.cluster(ttl).is_some())
            .map(|f| Cluster {
                bootstrap: f.bootstrap.clone(),
                target: f.target.clone(),
                ttl,
                arn: f.arn.clone(),
                name: f.name.clone(),
                account: f.account.clone(),
                region: f.region.clone(),
                kind: f.kind.clone(),
            })
            .collect();
        let named: Vec<String> = clusters.iter().filter_map(|c| endpoint_of(&c.target)).collect();
        let endpoints =
            cells.endpoints.iter().filter(|(id, _)| named.contains(id)).map(|(k, v)| (k.clone(), v.clone()));
        Document {
            version: VERSION,
            pass_time: rfc3339(pass_unix),
            publisher: publisher_id(),
            clusters,
            endpoints: endpoints.collect(),
            subnets: cells.subnets.clone(),
        }
    }

    /// Parses and validates a document as read from S3 (or from the copy a reader keeps): the
    /// version this build knows, a pass time, and every cluster as the file's `[[clusters]]`.
    pub fn parse(bytes: &[u8]) -> Result<Document, Rejected> {
        #[derive(Deserialize)]
        struct Head {
            version: Option<serde_json::Value>,
        }
        let head: Head =
            serde_json::from_slice(bytes).map_err(|e| rejected("json", format!("not a JSON object: {e}")))?;
        match head.version.as_ref().and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(VERSION) => {}
            Some(v) => return Err(rejected("version", format!("version {v}; this build reads version {VERSION}"))),
            None => return Err(rejected("version", "no integer `version` at the top level")),
        }
        let doc: Document = serde_json::from_slice(bytes)
            .map_err(|e| rejected("invalid", format!("not a version {VERSION} discovery document: {e}")))?;
        doc.validate()?;
        Ok(doc)
    }

    fn validate(&self) -> Result<(), Rejected> {
        self.pass_unix()?;
        self.cluster_configs()?;
        for id in self.endpoints.keys() {
            if !id.starts_with("vpce-") {
                return Err(rejected("invalid", format!("endpoints: `{id}` is not a VPC endpoint id")));
            }
        }
        for id in self.subnets.keys() {
            if !id.starts_with("subnet-") {
                return Err(rejected("invalid", format!("subnets: `{id}` is not a subnet id")));
            }
        }
        Ok(())
    }

    /// The pass time in Unix seconds.
    pub fn pass_unix(&self) -> Result<u64, Rejected> {
        chrono::DateTime::parse_from_rfc3339(&self.pass_time)
            .ok()
            .and_then(|t| u64::try_from(t.timestamp()).ok())
            .ok_or_else(|| rejected("invalid", format!("pass_time: `{}` is not an RFC 3339 time", self.pass_time)))
    }

    /// The `[[clusters]]` entries it stands for, validated as the file's are.
    pub fn cluster_configs(&self) -> Result<Vec<ClusterConfig>, Rejected> {
        let mut out = Vec::with_capacity(self.clusters.len());
        for (i, c) in self.clusters.iter().enumerate() {
            let mut cfg =
                parse_target(&c.target).map_err(|m| rejected("invalid", format!("clusters[{i}].target: {m}")))?;
            cfg.bootstrap = c.bootstrap.clone();
            cfg.ttl = c.ttl;
            cfg.source = Some(format!("snapshot {}", if c.arn.is_empty() { &c.bootstrap } else { &c.arn }));
            out.push(cfg);
        }
        validate_clusters("clusters", &out).map_err(|e| match e {
            ConfigError::Invalid { key, message, .. } => rejected("invalid", format!("{key}: {message}")),
            other => rejected("invalid", other.to_string()),
        })?;
        Ok(out)
    }

    /// The endpoint addresses and subnet AZs it carries.
    pub fn cells(&self) -> EndpointState {
        EndpointState { endpoints: self.endpoints.clone(), subnets: self.subnets.clone() }
    }

    /// The VPC endpoints its clusters lead to that it holds no addresses for (the publisher had
    /// not read them): those clusters answer SERVFAIL on readers until it does.
    pub fn unread_endpoints(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .clusters
            .iter()
            .filter_map(|c| endpoint_of(&c.target))
            .filter(|id| !self.endpoints.contains_key(id))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The same discovered state, whenever and by whomever it was written.
    pub fn same_state(&self, other: &Document) -> bool {
        (&self.clusters, &self.endpoints, &self.subnets) == (&other.clusters, &other.endpoints, &other.subnets)
    }

    /// Its clusters as `mskdns discover` lists them.
    pub fn found(&self) -> Vec<Found> {
        let seen = self.pass_unix().unwrap_or(0);
        let c = |c: &Cluster| Found {
            arn: c.arn.clone(),
            name: c.name.clone(),
            account: c.account.clone(),
            region: c.region.clone(),
            kind: c.kind.clone(),
            bootstrap: c.bootstrap.clone(),
            target: c.target.clone(),
            target_from: "discovery.snapshot".into(),
            scope: "snapshot".into(),
            last_seen: seen,
        };
        self.clusters.iter().map(c).collect()
    }
}

/// The VPC endpoint a target names, if it is one.
fn endpoint_of(target: &str) -> Option<String> {
    parse_target(target).ok()?.vpc_endpoint
}

fn rfc3339(unix: u64) -> String {
    chrono::DateTime::from_timestamp(unix as i64, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn publisher_id() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let host = if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown".into()
    };
    format!("{host} pid {}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: &str = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com";

    fn found(bootstrap: &str, target: &str) -> Found {
        Found {
            arn: format!("arn:aws:kafka:us-east-1:111122223333:cluster/x/{bootstrap}"),
            name: "orders".into(),
            account: "111122223333".into(),
            region: "us-east-1".into(),
            kind: "serverless".into(),
            bootstrap: bootstrap.into(),
            target: target.into(),
            target_from: "tag".into(),
            scope: "default".into(),
            last_seen: 1,
        }
    }

    fn cells() -> EndpointState {
        let addr = |ip: &str, az: &str| EndpointAddr { ip: ip.parse().unwrap(), az: az.into(), az_id: None };
        EndpointState {
            endpoints: [
                ("vpce-0aaa".to_owned(), vec![addr("10.1.0.5", "us-east-1a"), addr("2600:1f18::5", "us-east-1a")]),
                ("vpce-0unrelated".to_owned(), vec![addr("10.9.0.5", "us-east-1b")]),
            ]
            .into(),
            subnets: [("subnet-01".to_owned(), vec!["us-east-1a".to_owned(), "use1-az1".to_owned()])].into(),
        }
    }

    #[test]
    fn a_built_document_reads_back_with_its_endpoints_and_pass_time() {
        let other = "b-1.ledger.xyz789.c2.kafka.us-east-1.amazonaws.com";
        let doc = Document::build(
            &[found(BOOT, "vpce-0aaa"), found(other, "addresses=10.4.4.4")],
            30,
            &cells(),
            1_800_000_000,
        );
        assert_eq!(doc.pass_time, "2027-01-15T08:00:00Z");
        assert_eq!(doc.endpoints.keys().collect::<Vec<_>>(), ["vpce-0aaa"]);
        assert!(doc.unread_endpoints().is_empty());
        let unread = Document::build(&[found(BOOT, "vpce-0bbb"), found(other, "vpce-0bbb")], 30, &cells(), 1);
        assert_eq!(unread.unread_endpoints(), ["vpce-0bbb"]);
        let text = serde_json::to_vec(&doc).unwrap();
        let back = Document::parse(&text).unwrap();
        assert_eq!(back, doc);
        assert_eq!(back.pass_unix().unwrap(), 1_800_000_000);
        let configs = back.cluster_configs().unwrap();
        assert_eq!(configs[0].vpc_endpoint.as_deref(), Some("vpce-0aaa"));
        assert_eq!(configs[1].addresses, ["10.4.4.4".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(configs[1].ttl, 30);
        // Written again later by another publisher: the same state.
        let later = Document { pass_time: rfc3339(1_800_000_600), publisher: "other".into(), ..doc.clone() };
        assert!(later.same_state(&doc));
        assert!(!Document { clusters: Vec::new(), ..doc }.same_state(&later));
    }

    #[test]
    fn a_bad_document_is_rejected_whole_with_the_reason() {
        let good =
            serde_json::to_value(Document::build(&[found(BOOT, "addresses=10.0.0.1")], 60, &cells(), 1)).unwrap();
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            f(&mut v);
            Document::parse(&serde_json::to_vec(&v).unwrap())
        };
        assert!(with(&|_| {}).is_ok());
        let e = Document::parse(b"{\"version\": 1, \"clus").unwrap_err();
        assert_eq!(e.kind, "json");
        let e = with(&|v| v["version"] = 2.into()).unwrap_err();
        assert_eq!((e.kind, e.reason.as_str()), ("version", "version 2; this build reads version 1"));
        let e = with(&|v| v["version"] = "1".into()).unwrap_err();
        assert_eq!(e.kind, "version");
        let e = with(&|v| v["clusters"][0]["bootstrap"] = "boot-x.example.com".into()).unwrap_err();
        assert!(e.reason.starts_with("clusters[0].bootstrap"), "{e}");
        let e = with(&|v| v["clusters"][0]["target"] = "addresses=10.0.0.999".into()).unwrap_err();
        assert!(e.reason.starts_with("clusters[0].target"), "{e}");
        let e = with(&|v| v["clusters"][0]["ttl"] = 10_000_000.into()).unwrap_err();
        assert!(e.reason.contains("clusters[0].ttl"), "{e}");
        let e = with(&|v| v["pass_time"] = "yesterday".into()).unwrap_err();
        assert!(e.reason.starts_with("pass_time"), "{e}");
        let e = with(&|v| v["subnets"]["vpce-1"] = serde_json::json!(["us-east-1a"])).unwrap_err();
        assert!(e.reason.starts_with("subnets"), "{e}");
        // Two entries for one cluster (the same cluster key in another case).
        let e = with(&|v| {
            let twin = v["clusters"][0].clone();
            v["clusters"].as_array_mut().unwrap().push(twin);
        })
        .unwrap_err();
        assert!(e.reason.contains("names the same cluster"), "{e}");
        // A field this build does not know is not a reason: later versions may add some.
        assert!(with(&|v| v["owner"] = "platform".into()).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_or_a_damaged_document_are_taken_or_rejected_never_a_panic(
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            at in 0usize..4096,
            byte in proptest::prelude::any::<u8>(),
        ) {
            let _ = Document::parse(&noise);
            let doc = Document::build(&[found(BOOT, "vpce-0aaa")], 30, &cells(), 1_800_000_000);
            let mut text = serde_json::to_vec(&doc).unwrap();
            let i = at % text.len();
            text[i] = byte;
            if let Ok(d) = Document::parse(&text) {
                // Whatever was taken is servable as the file's clusters are.
                proptest::prop_assert!(d.cluster_configs().is_ok());
            }
        }
    }
}
