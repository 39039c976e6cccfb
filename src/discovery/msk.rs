//! MSK cluster discovery: ListClustersV2 in each account and region, the tag that selects a
//! cluster and the tag (or rule) that gives its target, GetBootstrapBrokers for its names (and
//! so its cluster key). The result feeds the engine as extra `[[clusters]]` entries; explicit
//! ones win.
//!
//! What AWS said last is kept: a failed listing keeps every cluster of that account and region,
//! a cluster AWS stops listing is kept for `grace_secs`, and the last good result is written to a
//! snapshot file that the next start reads before AWS answers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_kafka::Client;
use aws_sdk_kafka::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kafka::types::{Cluster, ClusterState, ClusterType};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::config::{AwsDiscoveryConfig, ClusterConfig, cluster_key, parse_target};
use crate::dns::Engine;

const HEALTH_KEY: &str = "discovery.aws";
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

/// A failed AWS call, classified for the error metric.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ApiError {
    pub operation: &'static str,
    pub kind: &'static str,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed ({}): {}", self.operation, self.kind, self.message)
    }
}

fn api_error<E, R>(operation: &'static str, e: SdkError<E, R>) -> ApiError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let kind = match &e {
        SdkError::TimeoutError(_) => "timeout",
        SdkError::DispatchFailure(d) if d.is_timeout() => "timeout",
        SdkError::DispatchFailure(_) => "connect",
        SdkError::ResponseError(_) => "response",
        SdkError::ServiceError(s) => match s.err().code() {
            Some("ThrottlingException" | "TooManyRequestsException" | "Throttling" | "RequestLimitExceeded") => {
                "throttling"
            }
            Some("AccessDeniedException" | "ForbiddenException" | "UnauthorizedException" | "AccessDenied") => {
                "access_denied"
            }
            Some("NotFoundException") => "not_found",
            Some("BadRequestException") => "bad_request",
            _ => "service",
        },
        _ => "other",
    };
    // The error's own chain, not DisplayErrorContext: that ends with the Debug form of the
    // raw response, whole bodies included, which has no place in a log line or /readyz.
    let mut message = match &e {
        SdkError::ServiceError(s) => match (s.err().code(), s.err().message()) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.to_owned(),
            _ => String::new(),
        },
        _ => String::new(),
    };
    if message.is_empty() {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut parts: Vec<String> = Vec::new();
        while let Some(err) = source {
            let text = err.to_string();
            if !parts.iter().any(|p| p.contains(&text)) {
                parts.push(text);
            }
            source = err.source();
        }
        message = parts.join(": ");
    }
    ApiError { operation, kind, message }
}

/// How clusters are chosen and what they resolve to, for one account.
#[derive(Debug, Clone)]
pub struct Rules {
    pub tag: String,
    pub tag_value: Option<String>,
    pub target_tag: String,
    /// The default target and the key it was configured under.
    pub default_target: Option<(String, String)>,
    pub scope: String,
}

impl Rules {
    pub fn for_account(d: &AwsDiscoveryConfig, account: Option<usize>) -> Rules {
        let own = account.and_then(|i| {
            d.accounts[i].default_target.clone().map(|t| (t, format!("discovery.aws.accounts[{i}].default_target")))
        });
        Rules {
            tag: d.tag.clone(),
            tag_value: d.tag_value.clone(),
            target_tag: d.target_tag.clone(),
            default_target: own
                .or_else(|| d.default_target.clone().map(|t| (t, "discovery.aws.default_target".to_owned()))),
            scope: match account {
                Some(i) => format!("accounts[{i}]"),
                None => "default".into(),
            },
        }
    }

    /// Whether the tags select the cluster.
    fn selects(&self, tags: &HashMap<String, String>) -> bool {
        match (tags.get(&self.tag), &self.tag_value) {
            (None, _) => false,
            (Some(v), Some(want)) => v == want,
            (Some(_), None) => true,
        }
    }

    /// The target text and where it came from.
    fn target(&self, tags: &HashMap<String, String>) -> Result<(String, String), String> {
        if let Some(t) = tags.get(&self.target_tag) {
            parse_target(t).map_err(|m| format!("tag {}: {m}", self.target_tag))?;
            return Ok((t.trim().to_owned(), format!("tag {}", self.target_tag)));
        }
        self.default_target.clone().ok_or_else(|| format!("no tag {} and no default_target", self.target_tag))
    }
}

/// One account and region's listing.
#[derive(Debug, Default)]
pub struct Listing {
    pub found: Vec<Found>,
    pub skipped: Vec<Skipped>,
    /// Calls that failed for single clusters (the listing itself succeeded).
    pub errors: Vec<ApiError>,
}

/// Lists one account and region. `bootstraps` remembers each ARN's bootstrap name: it never
/// changes for a cluster, so GetBootstrapBrokers is called once per cluster, not per refresh.
pub async fn list(
    client: &Client,
    region: &str,
    rules: &Rules,
    bootstraps: &mut HashMap<String, String>,
    now: u64,
) -> Result<Listing, ApiError> {
    let mut listing = Listing::default();
    let mut pages = client.list_clusters_v2().into_paginator().send();
    let mut clusters: Vec<Cluster> = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| api_error("ListClustersV2", e))?;
        clusters.extend(page.cluster_info_list().iter().cloned());
    }
    for mut c in clusters {
        let Some(arn) = c.cluster_arn().map(str::to_owned) else { continue };
        if c.tags().is_none() {
            // Some listings leave the tags out: ask for the cluster itself.
            match client.describe_cluster_v2().cluster_arn(&arn).send().await {
                Ok(out) => {
                    if let Some(info) = out.cluster_info {
                        c = info;
                    }
                }
                Err(e) => {
                    listing.errors.push(api_error("DescribeClusterV2", e));
                    continue;
                }
            }
        }
        let name = c.cluster_name().unwrap_or_default().to_owned();
        let skip = |reason: String| Skipped { arn: arn.clone(), name: name.clone(), reason, deselected: false };
        let deselect = |reason: String| Skipped { deselected: true, ..skip(reason) };
        let empty = HashMap::new();
        let tags = c.tags().unwrap_or(&empty);
        if !rules.selects(tags) {
            let want = match &rules.tag_value {
                Some(v) => format!("{}={v}", rules.tag),
                None => rules.tag.clone(),
            };
            listing.skipped.push(deselect(format!("not tagged {want}")));
            continue;
        }
        let state = c.state().cloned();
        if matches!(state, Some(ClusterState::Deleting | ClusterState::Failed)) {
            listing.skipped.push(skip(format!("state {}", state.as_ref().map(|s| s.as_str()).unwrap_or("?"))));
            continue;
        }
        let (target, target_from) = match rules.target(tags) {
            Ok(t) => t,
            Err(m) => {
                listing.skipped.push(deselect(m));
                continue;
            }
        };
        let bootstrap = match bootstraps.get(&arn) {
            Some(b) => b.clone(),
            None => match client.get_bootstrap_brokers().cluster_arn(&arn).send().await {
                Ok(out) => {
                    let strings = [
                        out.bootstrap_broker_string_sasl_iam(),
                        out.bootstrap_broker_string_tls(),
                        out.bootstrap_broker_string_sasl_scram(),
                        out.bootstrap_broker_string(),
                        out.bootstrap_broker_string_vpc_connectivity_sasl_iam(),
                        out.bootstrap_broker_string_vpc_connectivity_tls(),
                        out.bootstrap_broker_string_vpc_connectivity_sasl_scram(),
                    ];
                    match strings.into_iter().flatten().find_map(first_host) {
                        Some(b) => {
                            bootstraps.insert(arn.clone(), b.clone());
                            b
                        }
                        None => {
                            listing.skipped.push(skip("GetBootstrapBrokers returned no MSK broker name".into()));
                            continue;
                        }
                    }
                }
                Err(e) => {
                    let e = api_error("GetBootstrapBrokers", e);
                    listing.skipped.push(skip(e.to_string()));
                    // A cluster still being created has no brokers yet: not a failure of ours.
                    if state != Some(ClusterState::Creating) {
                        listing.errors.push(e);
                    }
                    continue;
                }
            },
        };
        let kind = match c.cluster_type() {
            Some(ClusterType::Serverless) => "serverless",
            Some(ClusterType::Provisioned) => "provisioned",
            _ if bootstrap.contains(".kafka-serverless.") => "serverless",
            _ => "provisioned",
        };
        listing.found.push(Found {
            account: arn.split(':').nth(4).unwrap_or_default().to_owned(),
            region: region.to_owned(),
            kind: kind.into(),
            name,
            bootstrap,
            target,
            target_from,
            scope: rules.scope.clone(),
            last_seen: now,
            arn,
        });
    }
    Ok(listing)
}

/// The first `host` of `host:port,host:port` that is an MSK name.
fn first_host(s: &str) -> Option<String> {
    s.split(',').map(|hp| hp.trim().rsplit_once(':').map_or(hp.trim(), |(h, _)| h)).find_map(|h| {
        let h = h.trim_end_matches('.').to_ascii_lowercase();
        cluster_key(&h).is_ok().then_some(h)
    })
}

/// Merges one scope's (account, region) fresh listing into what was known: the listed clusters
/// replace that scope's old entries; one no longer listed stays until `grace` has passed since
/// it was last seen.
pub fn merge(known: &[Found], scope: &str, region: &str, fresh: Vec<Found>, now: u64, grace: u64) -> Vec<Found> {
    let mut out: Vec<Found> = known.iter().filter(|f| f.scope != scope || f.region != region).cloned().collect();
    for old in known.iter().filter(|f| f.scope == scope && f.region == region) {
        if fresh.iter().any(|f| f.arn == old.arn) {
            continue;
        }
        if now.saturating_sub(old.last_seen) < grace {
            out.push(old.clone());
        } else {
            tracing::info!(arn = %old.arn, bootstrap = %old.bootstrap, "cluster gone from AWS past the grace period: no longer served");
        }
    }
    out.extend(fresh);
    out.sort_by(|a, b| a.arn.cmp(&b.arn));
    out
}

/// Removes the clusters AWS still lists but no longer selects (untagged, or state DELETING):
/// the operator's decision, applied at once.
pub fn drop_deselected(known: Vec<Found>, skipped: &[Skipped]) -> Vec<Found> {
    known
        .into_iter()
        .filter(|f| {
            let deselected = skipped.iter().any(|s| s.deselected && s.arn == f.arn);
            if deselected {
                tracing::info!(arn = %f.arn, "cluster no longer selected by its tags: no longer served");
            }
            !deselected
        })
        .collect()
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    version: u32,
    written: u64,
    clusters: Vec<Found>,
}

/// Reads the snapshot; `Ok(None)` when there is none yet.
pub fn load_snapshot(dir: &Path) -> Result<Option<Vec<Found>>, String> {
    let path = dir.join(SNAPSHOT_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let file: SnapshotFile = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if file.version != SNAPSHOT_VERSION {
        return Err(format!("{}: version {} (this build reads {SNAPSHOT_VERSION})", path.display(), file.version));
    }
    Ok(Some(file.clusters))
}

/// Writes the snapshot atomically: a temporary file, fsync, rename, fsync of the folder.
pub fn write_snapshot(dir: &Path, clusters: &[Found]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let file = SnapshotFile { version: SNAPSHOT_VERSION, written: unix_now(), clusters: clusters.to_vec() };
    let text = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!(".{SNAPSHOT_FILE}.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Builds the MSK clients: one per account and region, with the account's role assumed.
pub struct Clients {
    base: Option<aws_config::SdkConfig>,
    built: HashMap<(Option<String>, Option<String>, String), Client>,
}

impl Default for Clients {
    fn default() -> Self {
        Self::new()
    }
}

impl Clients {
    pub fn new() -> Self {
        Clients { base: None, built: HashMap::new() }
    }

    async fn base(&mut self) -> &aws_config::SdkConfig {
        if self.base.is_none() {
            self.base = Some(aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await);
        }
        self.base.as_ref().expect("just set")
    }

    /// The (scope, region, rules) to list, each with its client.
    pub async fn scopes(&mut self, d: &AwsDiscoveryConfig) -> Vec<(Rules, String, Client)> {
        let base = self.base().await.clone();
        let default_region = base.region().map(|r| r.to_string());
        let accounts: Vec<Option<usize>> =
            if d.accounts.is_empty() { vec![None] } else { (0..d.accounts.len()).map(Some).collect() };
        let mut out = Vec::new();
        for account in accounts {
            let a = account.map(|i| &d.accounts[i]);
            let mut regions = a.map(|a| a.regions.clone()).unwrap_or_default();
            if regions.is_empty() {
                regions = d.regions.clone();
            }
            if regions.is_empty() {
                regions.extend(default_region.clone());
            }
            let role = a.and_then(|a| a.role_arn.clone());
            let external = a.and_then(|a| a.external_id.clone());
            for region in regions {
                let key = (role.clone(), external.clone(), region.clone());
                let client = match self.built.get(&key) {
                    Some(c) => c.clone(),
                    None => {
                        let mut conf = aws_sdk_kafka::config::Builder::from(&base)
                            .region(aws_sdk_kafka::config::Region::new(region.clone()));
                        if let Some(role) = &role {
                            let mut b = aws_config::sts::AssumeRoleProvider::builder(role.clone())
                                .session_name("mskdns-discovery")
                                .configure(&base);
                            if let Some(x) = &external {
                                b = b.external_id(x.clone());
                            }
                            conf = conf.credentials_provider(b.build().await);
                        }
                        let client = Client::from_conf(conf.build());
                        self.built.insert(key, client.clone());
                        client
                    }
                };
                out.push((Rules::for_account(d, account), region, client));
            }
        }
        out
    }
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

/// The clusters to hand the engine.
pub fn clusters_of(found: &[Found], ttl: u32) -> Vec<ClusterConfig> {
    found.iter().filter_map(|f| f.cluster(ttl)).collect()
}

/// Delay before the next pass: the interval spread by ±jitter after a success; after
/// `failures` failures in a row, 1 s doubling up to the cap (with full jitter), never more than
/// the interval.
pub fn next_delay(d: &AwsDiscoveryConfig, failures: u32, unit: f64) -> Duration {
    let every = d.refresh_secs as f64;
    let secs = if failures == 0 {
        every * (1.0 + d.jitter * (2.0 * unit - 1.0))
    } else {
        let cap = (d.max_backoff_secs as f64).min(every);
        let exp = 2f64.powi(failures.min(30) as i32 - 1).min(cap);
        exp * (0.5 + 0.5 * unit)
    };
    Duration::from_secs_f64(secs.max(0.1))
}

/// Reads the snapshot of `d.state_dir()` into the engine and returns it; an unreadable one is
/// logged, counted and shown on /readyz, and discovery starts from nothing.
pub fn restore(engine: &Engine, health: &Health, d: &AwsDiscoveryConfig) -> Vec<Found> {
    let Some(dir) = d.state_dir() else { return Vec::new() };
    match load_snapshot(&dir) {
        Ok(Some(found)) => {
            tracing::info!(clusters = found.len(), dir = %dir.display(), "discovered clusters restored from the snapshot");
            apply(engine, &found, d.ttl);
            metrics::gauge!("mskdns_clusters", "source" => "discovery").set(found.len() as f64);
            found
        }
        Ok(None) => Vec::new(),
        Err(e) => {
            metrics::counter!("mskdns_discovery_snapshot_errors_total").increment(1);
            tracing::error!(error = %e, "discovery snapshot unreadable: ignored, discovering afresh");
            health.set_degraded("discovery.aws.snapshot", Some(format!("snapshot unreadable, ignored: {e}")));
            Vec::new()
        }
    }
}

/// Runs until `shutdown`, following reloads of `[discovery.aws]`. `restored`: what [`restore`]
/// read at start.
pub async fn run(engine: Arc<Engine>, health: Arc<Health>, restored: Vec<Found>, shutdown: CancellationToken) {
    let mut clients = Clients::new();
    let mut bootstraps: HashMap<String, String> = HashMap::new();
    let mut loaded_from: Option<PathBuf> = engine.file_config().discovery.aws.and_then(|d| d.state_dir());
    let mut known: Vec<Found> = restored;
    let mut failures = 0u32;
    let duration = metrics::histogram!("mskdns_discovery_refresh_duration_seconds");
    loop {
        let Some(d) = engine.file_config().discovery.aws.clone() else {
            if !engine.discovered().is_empty() {
                tracing::info!("discovery.aws removed from the configuration: discovered clusters dropped");
                if let Err(e) = engine.set_discovered(Vec::new()) {
                    tracing::error!(error = %e, "cannot apply the cluster map");
                }
            }
            known.clear();
            health.set_degraded(HEALTH_KEY, None);
            metrics::gauge!("mskdns_clusters", "source" => "discovery").set(0.0);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                _ = shutdown.cancelled() => return,
            }
        };
        let state_dir = d.state_dir();
        if loaded_from != state_dir {
            loaded_from = state_dir.clone();
            if known.is_empty() {
                known = restore(&engine, &health, &d);
            }
        }
        for f in &known {
            bootstraps.entry(f.arn.clone()).or_insert_with(|| f.bootstrap.clone());
        }
        let started = Instant::now();
        let p = pass(&d, &mut clients, &known, &mut bootstraps).await;
        duration.record(started.elapsed().as_secs_f64());
        for e in &p.errors {
            metrics::counter!("mskdns_discovery_api_errors_total", "operation" => e.operation, "kind" => e.kind)
                .increment(1);
            tracing::warn!(operation = e.operation, kind = e.kind, error = %e.message, "AWS discovery call failed");
        }
        if p.failed.is_empty() {
            failures = 0;
            metrics::counter!("mskdns_discovery_refreshes_total", "result" => "ok").increment(1);
        } else {
            failures += 1;
            metrics::counter!("mskdns_discovery_refreshes_total", "result" => "error").increment(1);
        }
        let reason = match (p.failed.is_empty(), p.errors.is_empty()) {
            (true, true) => None,
            (false, _) => Some(format!("serving the last known clusters; {}", p.failed.join("; "))),
            (true, false) => Some(format!(
                "some clusters could not be read: {}",
                p.errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
            )),
        };
        health.set_degraded(HEALTH_KEY, reason);
        if p.clusters != known || p.failed.is_empty() {
            if p.clusters != known {
                for f in p.clusters.iter().filter(|f| !known.iter().any(|k| k.arn == f.arn)) {
                    tracing::info!(arn = %f.arn, bootstrap = %f.bootstrap, target = %f.target, "cluster discovered");
                }
            }
            known = p.clusters;
            apply(&engine, &known, d.ttl);
            if let Some(dir) = &state_dir {
                match write_snapshot(dir, &known) {
                    Ok(()) => health.set_degraded("discovery.aws.snapshot", None),
                    Err(e) => {
                        metrics::counter!("mskdns_discovery_snapshot_errors_total").increment(1);
                        tracing::error!(error = %e, dir = %dir.display(), "cannot write the discovery snapshot");
                        health.set_degraded(
                            "discovery.aws.snapshot",
                            Some(format!("cannot write {}: {e}", dir.display())),
                        );
                    }
                }
            }
        }
        metrics::gauge!("mskdns_clusters", "source" => "discovery").set(known.len() as f64);
        let delay = next_delay(&d, failures, rand::random::<f64>());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Hands the clusters to the engine, unless they are what it has.
fn apply(engine: &Engine, found: &[Found], ttl: u32) {
    let clusters = clusters_of(found, ttl);
    if *engine.discovered() == clusters {
        return;
    }
    if let Err(e) = engine.set_discovered(clusters) {
        tracing::error!(error = %e, "cannot apply the discovered clusters; the previous map stays");
    }
}

/// What `mskdns discover` prints: each cluster with whether the file overrides it.
#[derive(Debug, Serialize)]
pub struct Report {
    pub clusters: Vec<ReportRow>,
    pub skipped: Vec<Skipped>,
    pub errors: Vec<ApiError>,
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
    Report { clusters, skipped: p.skipped, errors: p.errors }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_kafka::operation::describe_cluster_v2::DescribeClusterV2Output;
    use aws_sdk_kafka::operation::get_bootstrap_brokers::{GetBootstrapBrokersError, GetBootstrapBrokersOutput};
    use aws_sdk_kafka::operation::list_clusters_v2::ListClustersV2Output;
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
    fn backoff_doubles_to_the_cap_and_success_waits_the_jittered_interval() {
        let d = AwsDiscoveryConfig { refresh_secs: 60, jitter: 0.1, max_backoff_secs: 30, ..Default::default() };
        assert_eq!(next_delay(&d, 0, 0.0), Duration::from_secs(54));
        assert_eq!(next_delay(&d, 0, 1.0), Duration::from_secs(66));
        let top: Vec<u64> = (1..=7).map(|n| next_delay(&d, n, 1.0).as_secs()).collect();
        assert_eq!(top, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(next_delay(&d, 3, 0.0), Duration::from_secs(2));
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
