//! One loop for every discovery source: it follows the source's settings in the configuration in
//! force (a reload applies on the next pass; settings removed drop the source's clusters), restores
//! the source's snapshot before the first pass, runs passes with jittered backoff after failures,
//! keeps the source's /readyz flag, counts its passes and errors, and writes its snapshot after a
//! pass that changed what it knows. A source only lists: see [`Source`].
//!
//! A new source is a type implementing [`Source`], a name in `control::SOURCES` (its place in the
//! merge order), and a `driver::run` spawned in `lib.rs`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kafka::error::{ProvideErrorMetadata, SdkError};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{Discovered, Findings};
use crate::admin::Health;
use crate::config::EndpointState;
use crate::config::{ClusterConfig, Config};

/// A failed API call, classified for the error metric.
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

/// An AWS SDK error as the log and metrics say it: its kind (throttling, access denied, …) and a
/// message without the raw response.
pub fn api_error<E, R>(operation: &'static str, e: SdkError<E, R>) -> ApiError
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
            Some(
                "ThrottlingException" | "TooManyRequestsException" | "Throttling" | "RequestLimitExceeded" | "SlowDown",
            ) => "throttling",
            Some(
                "AccessDeniedException"
                | "ForbiddenException"
                | "UnauthorizedException"
                | "AccessDenied"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch",
            ) => "access_denied",
            Some("NotFoundException" | "NoSuchKey" | "NoSuchBucket") => "not_found",
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

/// When a source runs: every `every` (spread by ±`jitter`, a fraction); after failures, 1 s
/// doubling up to `max_backoff` (with full jitter), never more than `every`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub every: Duration,
    pub jitter: f64,
    pub max_backoff: Duration,
}

impl Schedule {
    /// The delay before the next pass after `failures` failed ones in a row; `unit` in [0, 1).
    pub fn next_delay(&self, failures: u32, unit: f64) -> Duration {
        let every = self.every.as_secs_f64();
        let secs = if failures == 0 {
            every * (1.0 + self.jitter * (2.0 * unit - 1.0))
        } else {
            let cap = self.max_backoff.as_secs_f64().min(every);
            let exp = 2f64.powi(failures.min(30) as i32 - 1).min(cap);
            exp * (0.5 + 0.5 * unit)
        };
        Duration::from_secs_f64(secs.max(0.1))
    }
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct Round {
    /// What the source knows changed (published, and its snapshot written).
    pub changed: bool,
    /// Parts that could not be read, their clusters kept as they were: the pass counts as failed
    /// (backoff, /readyz degraded).
    pub failed: Vec<String>,
    /// Single calls that failed: counted, logged and shown on /readyz.
    pub errors: Vec<ApiError>,
}

impl Round {
    pub fn reason(&self) -> Option<String> {
        match (self.failed.is_empty(), self.errors.is_empty()) {
            (true, true) => None,
            (false, _) => Some(format!("serving the last known clusters; {}", self.failed.join("; "))),
            (true, false) => Some(format!(
                "some clusters could not be read: {}",
                self.errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
            )),
        }
    }
}

/// A discovery source as the driver sees it.
pub trait Source: Send + 'static {
    /// Its name in `control::SOURCES` and in the metrics' `source` label.
    const NAME: &'static str;
    /// Its /readyz key (`<key>.snapshot` for its snapshot's problems).
    const HEALTH_KEY: &'static str;
    type Settings: Send + Sync + 'static;

    /// Its settings in the configuration in force; `None`: not configured.
    fn settings(config: &Config) -> Option<Self::Settings>;
    fn schedule(s: &Self::Settings) -> Schedule;
    /// Where its snapshot is kept, if anywhere.
    fn snapshot_dir(s: &Self::Settings) -> Option<PathBuf>;
    /// Takes what the snapshot in `dir` holds as what it knows; `Ok(false)`: there is none yet.
    fn restore(&mut self, dir: &Path) -> Result<bool, String>;
    fn persist(&self, dir: &Path) -> std::io::Result<()>;
    /// Forgets everything (its settings were removed).
    fn clear(&mut self);
    /// How many clusters it knows.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `[[clusters]]` entries it serves now.
    fn clusters(&self, s: &Self::Settings) -> Vec<ClusterConfig>;
    /// The VPC endpoint addresses and subnet AZs it knows itself; `None` (the default): EC2
    /// reads those its clusters name.
    fn cells(&self, _s: &Self::Settings) -> Option<EndpointState> {
        None
    }
    /// What /readyz says of it after a pass; by default, the pass's failures.
    fn degraded(&self, _s: &Self::Settings, round: &Round) -> Option<String> {
        round.reason()
    }
    /// One pass: list, and merge what was listed into what it knows.
    fn pass(&mut self, s: &Self::Settings) -> impl Future<Output = Round> + Send;
}

/// Reads the source's snapshot, if its settings name one (before serving, and when the snapshot's
/// place changes on reload). An unreadable one is logged, counted and shown on /readyz, and the
/// source starts from nothing.
pub fn restore<S: Source>(source: &mut S, s: &S::Settings, health: &Health) {
    let Some(dir) = S::snapshot_dir(s) else { return };
    let key = format!("{}.snapshot", S::HEALTH_KEY);
    match source.restore(&dir) {
        Ok(true) => {
            tracing::info!(source = S::NAME, clusters = source.len(), dir = %dir.display(), "discovered clusters restored from the snapshot");
            clusters_gauge::<S>(source.len());
            health.set_degraded(S::HEALTH_KEY, source.degraded(s, &Round::default()));
        }
        Ok(false) => {}
        Err(e) => {
            source.clear();
            metrics::counter!("mskdns_discovery_snapshot_errors_total", "source" => S::NAME).increment(1);
            tracing::error!(source = S::NAME, error = %e, "discovery snapshot unreadable: ignored, discovering afresh");
            health.set_degraded(&key, Some(format!("snapshot unreadable, ignored: {e}")));
        }
    }
}

fn clusters_gauge<S: Source>(n: usize) {
    metrics::gauge!("mskdns_clusters", "source" => "discovery", "discovery" => S::NAME).set(n as f64);
}

/// Runs `source` until `shutdown`, publishing what it serves on `to`. `source` holds what
/// [`restore`] read at start, already in force.
pub async fn run<S: Source>(mut source: S, to: Discovered, health: Arc<Health>, shutdown: CancellationToken) {
    let settings = || S::settings(&to.config.borrow());
    let mut loaded_from: Option<PathBuf> = settings().and_then(|s| S::snapshot_dir(&s));
    let mut published = settings().map(|s| findings(&source, &s)).unwrap_or_default();
    let mut failures = 0u32;
    loop {
        let Some(s) = settings() else {
            if published != Findings::default() {
                tracing::info!(source = S::NAME, "discovery removed from the configuration: its clusters dropped");
                publish(&to, &mut published, Findings::default()).await;
            }
            source.clear();
            health.set_degraded(S::HEALTH_KEY, None);
            clusters_gauge::<S>(0);
            if sleep(Duration::from_secs(5), &shutdown).await {
                return;
            }
            continue;
        };
        let dir = S::snapshot_dir(&s);
        if loaded_from != dir {
            loaded_from = dir.clone();
            if source.is_empty() {
                restore(&mut source, &s, &health);
                publish(&to, &mut published, findings(&source, &s)).await;
            }
        }
        // An AWS call that stalls holds the pass up to its timeouts, never the shutdown.
        let round = tokio::select! {
            r = timed_pass::<S>(&mut source, &s) => r,
            _ = shutdown.cancelled() => return,
        };
        failures = if round.failed.is_empty() { 0 } else { failures + 1 };
        health.set_degraded(S::HEALTH_KEY, source.degraded(&s, &round));
        if round.changed || round.failed.is_empty() {
            publish(&to, &mut published, findings(&source, &s)).await;
            if let Some(dir) = &dir {
                persist(&source, dir, &health);
            }
        }
        clusters_gauge::<S>(source.len());
        if sleep(S::schedule(&s).next_delay(failures, rand::random::<f64>()), &shutdown).await {
            return;
        }
    }
}

/// One pass, timed, counted and its errors logged.
async fn timed_pass<S: Source>(source: &mut S, s: &S::Settings) -> Round {
    let started = Instant::now();
    let round = source.pass(s).await;
    metrics::histogram!("mskdns_discovery_refresh_duration_seconds", "source" => S::NAME)
        .record(started.elapsed().as_secs_f64());
    for e in &round.errors {
        metrics::counter!("mskdns_discovery_api_errors_total", "source" => S::NAME, "operation" => e.operation, "kind" => e.kind)
            .increment(1);
        tracing::warn!(source = S::NAME, operation = e.operation, kind = e.kind, error = %e.message, "discovery call failed");
    }
    let result = if round.failed.is_empty() { "ok" } else { "error" };
    metrics::counter!("mskdns_discovery_refreshes_total", "source" => S::NAME, "result" => result).increment(1);
    round
}

fn persist<S: Source>(source: &S, dir: &Path, health: &Health) {
    let key = format!("{}.snapshot", S::HEALTH_KEY);
    match source.persist(dir) {
        Ok(()) => health.set_degraded(&key, None),
        Err(e) => {
            metrics::counter!("mskdns_discovery_snapshot_errors_total", "source" => S::NAME).increment(1);
            tracing::error!(source = S::NAME, error = %e, dir = %dir.display(), "cannot write the discovery snapshot");
            health.set_degraded(&key, Some(format!("cannot write {}: {e}", dir.display())));
        }
    }
}

fn findings<S: Source>(source: &S, s: &S::Settings) -> Findings {
    Findings { clusters: source.clusters(s), cells: source.cells(s) }
}

/// Sends what the source serves to the control plane, unless it is what was sent last.
async fn publish(to: &Discovered, last: &mut Findings, now: Findings) {
    if *last != now && to.found.send(now.clone()).await.is_ok() {
        *last = now;
    }
}

/// Sleeps `d`; true when `shutdown` came first.
async fn sleep(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_success_waits_the_jittered_interval() {
        let s = Schedule { every: Duration::from_secs(60), jitter: 0.1, max_backoff: Duration::from_secs(30) };
        assert_eq!(s.next_delay(0, 0.0), Duration::from_secs(54));
        assert_eq!(s.next_delay(0, 1.0), Duration::from_secs(66));
        let top: Vec<u64> = (1..=7).map(|n| s.next_delay(n, 1.0).as_secs()).collect();
        assert_eq!(top, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(s.next_delay(3, 0.0), Duration::from_secs(2));
        let short = Schedule { every: Duration::from_secs(4), ..s };
        assert_eq!(short.next_delay(10, 1.0), Duration::from_secs(4));
    }

    #[test]
    fn a_round_says_why_it_is_degraded() {
        assert_eq!(Round::default().reason(), None);
        let e = ApiError { operation: "ListClustersV2", kind: "throttling", message: "slow down".into() };
        let partial = Round { errors: vec![e.clone()], ..Round::default() };
        assert_eq!(
            partial.reason().unwrap(),
            "some clusters could not be read: ListClustersV2 failed (throttling): slow down"
        );
        let failed = Round { failed: vec!["default us-east-1: down".into()], errors: vec![e], ..Round::default() };
        assert_eq!(failed.reason().unwrap(), "serving the last known clusters; default us-east-1: down");
    }
}
