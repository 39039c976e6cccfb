//! MSK cluster discovery: ListClustersV2 in each account and region, the tag that selects a
//! cluster and the tag (or rule) that gives its target, GetBootstrapBrokers for its names (and
//! so its cluster key). The result goes to the control plane as extra `[[clusters]]` entries; explicit
//! ones win.
//!
//! What AWS said last is kept: a failed listing keeps every cluster of that account and region,
//! a cluster AWS stops listing is kept for `grace_secs`, and the last good result is written to a
//! snapshot file that the next start reads before AWS answers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kafka::Client;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::driver::{ApiError, Round, Schedule, Source};
use crate::config::{AwsDiscoveryConfig, ClusterConfig, Config, parse_target};
use crate::names::cluster_key;

mod aws;
mod state;

pub use aws::*;
pub use state::*;

const SNAPSHOT_FILE: &str = "discovery-aws.json";
const SNAPSHOT_VERSION: u32 = 1;

/// A cluster found in AWS and selected by its tag.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Found {
    pub arn: String,
    pub name: String,
    pub account: String,
    pub region: String,
    /// `serverless` or `provisioned`.
    pub kind: String,
    /// The name clients bootstrap from (its first label carries the cluster id).
    pub bootstrap: String,
    /// The target as written, and where it was written.
    pub target: String,
    pub target_from: String,
    /// Which `discovery.aws.accounts` entry found it (`default`: the default credentials).
    pub scope: String,
    /// Unix seconds of the last listing that showed it.
    pub last_seen: u64,
}

impl Found {
    /// The `[[clusters]]` entry this cluster becomes.
    pub fn cluster(&self, ttl: u32) -> Option<ClusterConfig> {
        let mut c = parse_target(&self.target).ok()?;
        c.bootstrap = self.bootstrap.clone();
        c.ttl = ttl;
        c.source = Some(format!("discovered {}", self.arn));
        cluster_key(&c.bootstrap).ok()?;
        Some(c)
    }
}

/// A pass of `[discovery.aws]` that completed: what is published.
#[derive(Debug, Clone, PartialEq)]
pub struct Passed {
    /// Unix seconds.
    pub at: u64,
    pub found: Vec<Found>,
    pub ttl: u32,
}

/// A cluster listed but not served, and why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Skipped {
    pub arn: String,
    pub name: String,
    pub reason: String,
    /// Its tags no longer select it (or give no usable target): it leaves at once.
    #[serde(skip)]
    pub deselected: bool,
}

/// One full pass over every account and region.
#[derive(Debug, Default, Serialize)]
pub struct Pass {
    pub clusters: Vec<Found>,
    pub skipped: Vec<Skipped>,
    pub errors: Vec<ApiError>,
    /// Scopes whose listing failed (their clusters were kept as they were).
    pub failed: Vec<String>,
}

/// Lists every scope and merges the result into `known`.
pub async fn pass(
    d: &AwsDiscoveryConfig,
    clients: &mut Clients,
    known: &[Found],
    bootstraps: &mut HashMap<String, String>,
) -> Pass {
    let scopes = clients.scopes(d).await;
    pass_over(&scopes, d.grace_secs, known, bootstraps, unix_now()).await
}

/// [`pass`] over scopes already built (the tests build them on mocked clients).
pub async fn pass_over(
    scopes: &[(Rules, String, Client)],
    grace_secs: u64,
    known: &[Found],
    bootstraps: &mut HashMap<String, String>,
    now: u64,
) -> Pass {
    let mut result = Pass { clusters: known.to_vec(), ..Pass::default() };
    if scopes.is_empty() {
        result.failed.push("no region: set discovery.aws.regions or AWS_REGION".into());
        result.errors.push(ApiError {
            operation: "ListClustersV2",
            kind: "config",
            message: "no region to search".into(),
        });
        return result;
    }
    // Clusters of an account or region no longer configured leave.
    result.clusters.retain(|f| scopes.iter().any(|(r, region, _)| r.scope == f.scope && *region == f.region));
    for (rules, region, client) in scopes {
        match list(client, region, rules, bootstraps, now).await {
            Ok(l) => {
                result.clusters = merge(&result.clusters, &rules.scope, region, l.found, now, grace_secs);
                result.clusters = drop_deselected(std::mem::take(&mut result.clusters), &l.skipped);
                result.skipped.extend(l.skipped);
                result.errors.extend(l.errors);
            }
            Err(e) => {
                result.failed.push(format!("{} {region}: {e}", rules.scope));
                result.errors.push(e);
            }
        }
    }
    result
}

/// The MSK source: what AWS listed last, kept between passes (and in its snapshot).
pub struct Msk {
    clients: Clients,
    /// Each cluster ARN's bootstrap name, read once (GetBootstrapBrokers).
    bootstraps: HashMap<String, String>,
    known: Vec<Found>,
    /// Each completed pass, for the fleet publisher.
    passes: watch::Sender<Option<Arc<Passed>>>,
}

impl Default for Msk {
    fn default() -> Self {
        Self::new()
    }
}

impl Msk {
    pub fn new() -> Self {
        Msk { clients: Clients::new(), bootstraps: HashMap::new(), known: Vec::new(), passes: watch::channel(None).0 }
    }

    /// Every pass that listed every scope (what a publisher writes).
    pub fn passes(&self) -> watch::Receiver<Option<Arc<Passed>>> {
        self.passes.subscribe()
    }
}

impl Source for Msk {
    const NAME: &'static str = "msk";
    const HEALTH_KEY: &'static str = "discovery.aws";
    type Settings = AwsDiscoveryConfig;

    fn settings(config: &Config) -> Option<AwsDiscoveryConfig> {
        config.discovery.aws.clone()
    }

    fn schedule(d: &AwsDiscoveryConfig) -> Schedule {
        Schedule {
            every: Duration::from_secs(d.refresh_secs),
            jitter: d.jitter,
            max_backoff: Duration::from_secs(d.max_backoff_secs),
        }
    }

    fn snapshot_dir(d: &AwsDiscoveryConfig) -> Option<PathBuf> {
        d.state_dir()
    }

    fn restore(&mut self, dir: &Path) -> Result<bool, String> {
        let found = load_snapshot(dir)?;
        let any = found.is_some();
        self.known = found.unwrap_or_default();
        Ok(any)
    }

    fn persist(&self, dir: &Path) -> std::io::Result<()> {
        write_snapshot(dir, &self.known)
    }

    fn clear(&mut self) {
        self.known.clear();
    }

    fn len(&self) -> usize {
        self.known.len()
    }

    fn clusters(&self, d: &AwsDiscoveryConfig) -> Vec<ClusterConfig> {
        clusters_of(&self.known, d.ttl)
    }

    async fn pass(&mut self, d: &AwsDiscoveryConfig) -> Round {
        for f in &self.known {
            self.bootstraps.entry(f.arn.clone()).or_insert_with(|| f.bootstrap.clone());
        }
        let p = pass(d, &mut self.clients, &self.known, &mut self.bootstraps).await;
        let changed = p.clusters != self.known;
        for f in p.clusters.iter().filter(|f| !self.known.iter().any(|k| k.arn == f.arn)) {
            tracing::info!(arn = %f.arn, bootstrap = %f.bootstrap, target = %f.target, "cluster discovered");
        }
        if changed || p.failed.is_empty() {
            self.known = p.clusters;
        }
        if p.failed.is_empty() {
            let passed = Passed { at: unix_now(), found: self.known.clone(), ttl: d.ttl };
            self.passes.send_replace(Some(Arc::new(passed)));
        }
        Round { changed, failed: p.failed, errors: p.errors }
    }
}

/// What `mskdns discover` prints: each cluster with whether the file overrides it.
#[derive(Debug, Serialize)]
pub struct Report {
    pub clusters: Vec<ReportRow>,
    pub skipped: Vec<Skipped>,
    pub errors: Vec<ApiError>,
    /// VPC endpoint addresses and subnet AZs a fleet snapshot carries (read from EC2 otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotReport>,
}

#[derive(Debug, Serialize)]
pub struct SnapshotReport {
    pub url: String,
    pub pass_time: String,
    pub publisher: String,
    pub endpoints: BTreeMap<String, Vec<crate::config::EndpointAddr>>,
    pub subnets: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Serialize)]
pub struct ReportRow {
    #[serde(flatten)]
    pub found: Found,
    /// `served`, or `overridden by clusters[i]` when the file names the same cluster.
    pub status: String,
}

pub fn report(p: Pass, file: &[ClusterConfig]) -> Report {
    let keys: BTreeMap<Vec<u8>, usize> =
        file.iter().enumerate().filter_map(|(i, c)| cluster_key(&c.bootstrap).ok().map(|k| (k.0, i))).collect();
    let clusters = p
        .clusters
        .into_iter()
        .map(|found| {
            let status = match cluster_key(&found.bootstrap).ok().and_then(|k| keys.get(&k.0)) {
                Some(i) => format!("overridden by clusters[{i}]"),
                None => "served".into(),
            };
            ReportRow { found, status }
        })
        .collect();
    Report { clusters, skipped: p.skipped, errors: p.errors, snapshot: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_kafka::Client;
    use aws_sdk_kafka::operation::describe_cluster_v2::DescribeClusterV2Output;
    use aws_sdk_kafka::operation::get_bootstrap_brokers::{GetBootstrapBrokersError, GetBootstrapBrokersOutput};
    use aws_sdk_kafka::operation::list_clusters_v2::ListClustersV2Output;
    use aws_sdk_kafka::types::{Cluster, ClusterState, ClusterType};
    use aws_smithy_mocks::{RuleMode, mock, mock_client};

    /// What the MSK API answers when throttling (restJson1: the error type in the body).
    const THROTTLED: &str = r#"{"__type":"TooManyRequestsException","message":"Too Many Requests"}"#;
    const ARN_A: &str = "arn:aws:kafka:us-east-1:111122223333:cluster/orders/1a2b3c4d-aaaa-bbbb-cccc-000000000001-s2";
    const ARN_B: &str = "arn:aws:kafka:us-east-1:111122223333:cluster/audit/1a2b3c4d-aaaa-bbbb-cccc-000000000002-s1";
    const ARN_C: &str = "arn:aws:kafka:us-east-1:111122223333:cluster/payments/1a2b3c4d-aaaa-bbbb-cccc-000000000003-2";

    fn cluster(arn: &str, name: &str, kind: ClusterType, tags: &[(&str, &str)]) -> Cluster {
        let mut b =
            Cluster::builder().cluster_arn(arn).cluster_name(name).cluster_type(kind).state(ClusterState::Active);
        for (k, v) in tags {
            b = b.tags(*k, *v);
        }
        b.build()
    }

    fn rules() -> Rules {
        let d = AwsDiscoveryConfig { default_target: Some("vpce-0123456789abcdef0".into()), ..Default::default() };
        Rules::for_account(&d, None)
    }

    #[tokio::test]
    async fn tagged_clusters_get_their_names_from_get_bootstrap_brokers() {
        let listing = mock!(Client::list_clusters_v2).then_output(|| {
            ListClustersV2Output::builder()
                .cluster_info_list(cluster(
                    ARN_A,
                    "orders",
                    ClusterType::Serverless,
                    &[("mskdns", "yes"), ("mskdns:target", "addresses=10.1.0.10 10.1.1.10")],
                ))
                .cluster_info_list(cluster(ARN_B, "audit", ClusterType::Serverless, &[("team", "audit")]))
                .cluster_info_list(cluster(ARN_C, "payments", ClusterType::Provisioned, &[("mskdns", "")]))
                .build()
        });
        let boot = mock!(Client::get_bootstrap_brokers).then_compute_output(|req| {
            let b = GetBootstrapBrokersOutput::builder();
            if req.cluster_arn() == Some(ARN_A) {
                b.bootstrap_broker_string_sasl_iam("boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com:9098")
                    .build()
            } else {
                b.bootstrap_broker_string_tls(
                    "b-2.payments.xyz789.c2.kafka.us-east-1.amazonaws.com:9094,b-1.payments.xyz789.c2.kafka.us-east-1.amazonaws.com:9094",
                )
                .build()
            }
        });
        let client = mock_client!(aws_sdk_kafka, RuleMode::MatchAny, [&listing, &boot]);
        let mut bootstraps = HashMap::new();
        let l = list(&client, "us-east-1", &rules(), &mut bootstraps, 100).await.unwrap();
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        let got: Vec<(&str, &str, &str, &str)> = l
            .found
            .iter()
            .map(|f| (f.name.as_str(), f.kind.as_str(), f.bootstrap.as_str(), f.target.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "orders",
                    "serverless",
                    "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com",
                    "addresses=10.1.0.10 10.1.1.10"
                ),
                (
                    "payments",
                    "provisioned",
                    "b-2.payments.xyz789.c2.kafka.us-east-1.amazonaws.com",
                    "vpce-0123456789abcdef0"
                ),
            ]
        );
        assert_eq!(l.found[0].account, "111122223333");
        assert_eq!(l.skipped.len(), 1);
        assert_eq!(l.skipped[0].name, "audit");
        assert_eq!(boot.num_calls(), 2);
        // The names are remembered: the next listing does not ask again.
        list(&client, "us-east-1", &rules(), &mut bootstraps, 200).await.unwrap();
        assert_eq!(boot.num_calls(), 2);
        let c = l.found[0].cluster(30).unwrap();
        assert_eq!(c.addresses, ["10.1.0.10".parse::<std::net::IpAddr>().unwrap(), "10.1.1.10".parse().unwrap()]);
        assert_eq!(c.ttl, 30);
        assert_eq!(l.found[1].cluster(60).unwrap().vpc_endpoint.as_deref(), Some("vpce-0123456789abcdef0"));
    }

    #[tokio::test]
    async fn a_listing_without_tags_is_completed_by_describe_cluster_v2() {
        let listing = mock!(Client::list_clusters_v2).then_output(|| {
            ListClustersV2Output::builder()
                .cluster_info_list(
                    Cluster::builder().cluster_arn(ARN_A).cluster_name("orders").state(ClusterState::Active).build(),
                )
                .build()
        });
        let describe =
            mock!(Client::describe_cluster_v2).match_requests(|r| r.cluster_arn() == Some(ARN_A)).then_output(|| {
                DescribeClusterV2Output::builder()
                    .cluster_info(cluster(ARN_A, "orders", ClusterType::Serverless, &[("mskdns", "1")]))
                    .build()
            });
        let boot = mock!(Client::get_bootstrap_brokers).then_output(|| {
            GetBootstrapBrokersOutput::builder()
                .bootstrap_broker_string_sasl_iam("boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com:9098")
                .build()
        });
        let client = mock_client!(aws_sdk_kafka, RuleMode::MatchAny, [&listing, &describe, &boot]);
        let l = list(&client, "us-east-1", &rules(), &mut HashMap::new(), 1).await.unwrap();
        assert_eq!(describe.num_calls(), 1);
        assert_eq!(l.found.len(), 1);
        assert_eq!(l.found[0].target_from, "discovery.aws.default_target");
    }

    #[tokio::test]
    async fn a_dual_stack_cluster_named_only_in_the_ipv6_strings_is_found() {
        let listing = mock!(Client::list_clusters_v2).then_output(|| {
            ListClustersV2Output::builder()
                .cluster_info_list(cluster(ARN_A, "orders", ClusterType::Serverless, &[("mskdns", "1")]))
                .build()
        });
        let boot = mock!(Client::get_bootstrap_brokers).then_output(|| {
            GetBootstrapBrokersOutput::builder()
                .bootstrap_broker_string_sasl_iam_ipv6("boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com:9098")
                .build()
        });
        let client = mock_client!(aws_sdk_kafka, RuleMode::MatchAny, [&listing, &boot]);
        let l = list(&client, "us-east-1", &rules(), &mut HashMap::new(), 1).await.unwrap();
        assert_eq!(
            l.found.iter().map(|f| f.bootstrap.as_str()).collect::<Vec<_>>(),
            ["boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"]
        );
    }

    #[tokio::test]
    async fn throttling_is_retried_by_the_sdk_then_succeeds() {
        let listing = mock!(Client::list_clusters_v2)
            .sequence()
            .http_status(429, Some(THROTTLED.into()))
            .times(2)
            .output(|| {
                ListClustersV2Output::builder()
                    .cluster_info_list(cluster(ARN_A, "orders", ClusterType::Serverless, &[("mskdns", "1")]))
                    .build()
            })
            .build();
        let boot = mock!(Client::get_bootstrap_brokers).then_output(|| {
            GetBootstrapBrokersOutput::builder()
                .bootstrap_broker_string_sasl_iam("boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com:9098")
                .build()
        });
        let client = mock_client!(aws_sdk_kafka, RuleMode::Sequential, [&listing, &boot], |c| c
            .retry_config(aws_sdk_kafka::config::retry::RetryConfig::standard().with_max_attempts(3)));
        let l = list(&client, "us-east-1", &rules(), &mut HashMap::new(), 1).await.unwrap();
        assert_eq!(listing.num_calls(), 3);
        assert_eq!(l.found.len(), 1);
    }

    #[tokio::test]
    async fn persistent_throttling_fails_the_listing_and_keeps_what_was_known() {
        let listing =
            mock!(Client::list_clusters_v2).sequence().http_status(429, Some(THROTTLED.into())).repeatedly().build();
        let client = mock_client!(aws_sdk_kafka, RuleMode::MatchAny, [&listing], |c| c
            .retry_config(aws_sdk_kafka::config::retry::RetryConfig::standard().with_max_attempts(2)));
        let err = list(&client, "us-east-1", &rules(), &mut HashMap::new(), 1).await.unwrap_err();
        assert_eq!((err.operation, err.kind), ("ListClustersV2", "throttling"));
        assert_eq!(listing.num_calls(), 2);
        // A whole pass long after the grace period: the known cluster stays, the failure is reported.
        let known = vec![found("a", "default", 1)];
        let scopes = vec![(rules(), "us-east-1".to_owned(), client)];
        let p = pass_over(&scopes, 60, &known, &mut HashMap::new(), 1_000_000).await;
        assert_eq!(p.clusters, known);
        assert_eq!(p.failed.len(), 1, "{:?}", p.failed);
        assert!(p.failed[0].contains("throttling"), "{:?}", p.failed);
        assert_eq!(p.errors.len(), 1);
    }

    #[tokio::test]
    async fn get_bootstrap_brokers_failing_skips_only_that_cluster_and_is_counted() {
        let listing = mock!(Client::list_clusters_v2).then_output(|| {
            ListClustersV2Output::builder()
                .cluster_info_list(cluster(ARN_A, "orders", ClusterType::Serverless, &[("mskdns", "1")]))
                .cluster_info_list(cluster(ARN_C, "payments", ClusterType::Provisioned, &[("mskdns", "1")]))
                .build()
        });
        let boot = mock!(Client::get_bootstrap_brokers).then_compute_response(|req| {
            if req.cluster_arn() == Some(ARN_A) {
                aws_smithy_mocks::MockResponse::Error(GetBootstrapBrokersError::unhandled("boom"))
            } else {
                aws_smithy_mocks::MockResponse::Output(
                    GetBootstrapBrokersOutput::builder()
                        .bootstrap_broker_string("b-1.payments.xyz789.c2.kafka.us-east-1.amazonaws.com:9092")
                        .build(),
                )
            }
        });
        let client = mock_client!(aws_sdk_kafka, RuleMode::MatchAny, [&listing, &boot]);
        let l = list(&client, "us-east-1", &rules(), &mut HashMap::new(), 1).await.unwrap();
        assert_eq!(l.found.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["payments"]);
        assert_eq!(l.errors.len(), 1);
        assert_eq!(l.errors[0].operation, "GetBootstrapBrokers");
    }

    fn found(arn: &str, scope: &str, seen: u64) -> Found {
        Found {
            arn: arn.into(),
            name: "n".into(),
            account: "1".into(),
            region: "us-east-1".into(),
            kind: "serverless".into(),
            bootstrap: "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com".into(),
            target: "addresses=10.0.0.1".into(),
            target_from: "tag".into(),
            scope: scope.into(),
            last_seen: seen,
        }
    }

    #[test]
    fn a_cluster_no_longer_listed_leaves_after_the_grace_period() {
        let known = vec![found("a", "default", 100), found("b", "default", 100), found("x", "accounts[1]", 1)];
        let fresh = vec![found("a", "default", 150)];
        let kept = merge(&known, "default", "us-east-1", fresh.clone(), 150, 60);
        assert_eq!(kept.iter().map(|f| f.arn.as_str()).collect::<Vec<_>>(), ["a", "b", "x"]);
        let kept = merge(&kept, "default", "us-east-1", fresh, 161, 60);
        assert_eq!(kept.iter().map(|f| f.arn.as_str()).collect::<Vec<_>>(), ["a", "x"]);
    }

    #[test]
    fn a_corrupt_snapshot_is_an_error_and_a_written_one_reads_back() {
        let dir = std::env::temp_dir().join(format!("mskdns-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(load_snapshot(&dir).unwrap(), None);
        let clusters = vec![found("a", "default", 5)];
        write_snapshot(&dir, &clusters).unwrap();
        assert_eq!(load_snapshot(&dir).unwrap(), Some(clusters));
        std::fs::write(dir.join(SNAPSHOT_FILE), b"{\"version\": 1, \"clus").unwrap();
        let e = load_snapshot(&dir).unwrap_err();
        assert!(e.contains(SNAPSHOT_FILE), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
