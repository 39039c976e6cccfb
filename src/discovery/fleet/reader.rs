//! The reader: a discovery source that polls the published document with `If-None-Match` (a
//! 304 costs nothing), takes a valid one whole, and keeps the last good one (in memory, and in
//! the state directory across restarts) through any error: S3 down, access denied, a document
//! rejected. It makes no MSK calls; EC2 is asked only for endpoints this instance's own file
//! names.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::s3::{self, Fetched, Location};
use super::{Document, Rejected};
use crate::config::EndpointState;
use crate::config::{ClusterConfig, Config, SnapshotConfig};
use crate::discovery::driver::{Round, Schedule, Source};
use crate::discovery::msk::unix_now;

const COPY_FILE: &str = "discovery-snapshot.json";
/// The copy is rewritten for a new document, and otherwise this often (to keep the time S3
/// last confirmed it, which a restart reports as the snapshot's age).
const COPY_REFRESH_SECS: u64 = 300;

/// `[discovery.snapshot]` with what it needs from the rest of the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub snapshot: SnapshotConfig,
    pub path_style: bool,
    pub state_dir: Option<PathBuf>,
}

/// The document in force and where it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Held {
    url: String,
    etag: Option<String>,
    /// Unix seconds when S3 last confirmed it (a 200 or a 304).
    heard_unix: u64,
    document: Document,
}

/// What the state directory keeps.
#[derive(Serialize, Deserialize)]
struct Copy {
    version: u32,
    #[serde(flatten)]
    held: Held,
}

#[derive(Default)]
pub struct Snapshot {
    client: Option<(bool, aws_sdk_s3::Client)>,
    held: Option<Held>,
    /// When S3 last confirmed the document in force, in this process (`None` after a restart,
    /// until it does).
    heard: Option<Instant>,
    /// The ETag of the object in S3 when it was rejected: asked with `If-None-Match` so it is
    /// not read (and logged) again, and why.
    rejected: Option<(Option<String>, Rejected)>,
    last_error: Option<String>,
    /// `heard_unix` of the copy last written (0: none), and whether the document changed since.
    copied: AtomicU64,
    dirty: AtomicBool,
}

impl Snapshot {
    pub fn new() -> Self {
        Snapshot::default()
    }

    async fn client(&mut self, path_style: bool) -> aws_sdk_s3::Client {
        match &self.client {
            Some((p, c)) if *p == path_style => c.clone(),
            _ => {
                let c = s3::client(path_style).await;
                self.client = Some((path_style, c.clone()));
                c
            }
        }
    }

    fn held_for(&self, s: &Settings) -> Option<&Held> {
        self.held.as_ref().filter(|h| h.url == s.snapshot.url)
    }

    fn take(&mut self, url: &str, etag: Option<String>, bytes: &[u8]) -> Round {
        let document = match Document::parse(bytes) {
            Ok(d) => d,
            Err(r) => return self.reject(etag, r),
        };
        let changed = self.held.as_ref().is_none_or(|h| h.url != url || !h.document.same_state(&document));
        if changed {
            tracing::info!(
                url,
                clusters = document.clusters.len(),
                pass_time = %document.pass_time,
                publisher = %document.publisher,
                "discovery snapshot taken"
            );
        }
        if let Ok(t) = document.pass_unix() {
            metrics::gauge!("mskdns_discovery_snapshot_pass_timestamp_seconds").set(t as f64);
        }
        self.held = Some(Held { url: url.to_owned(), etag, heard_unix: unix_now(), document });
        self.dirty.store(true, Ordering::Relaxed);
        self.heard = Some(Instant::now());
        self.rejected = None;
        Round { changed, ..Round::default() }
    }

    fn reject(&mut self, etag: Option<String>, r: Rejected) -> Round {
        metrics::counter!("mskdns_discovery_snapshot_rejected_total", "reason" => r.kind).increment(1);
        tracing::error!(reason = %r, "discovery snapshot rejected; the last good one stays in force");
        self.rejected = Some((etag, r));
        Round { failed: self.rejection().into_iter().collect(), ..Round::default() }
    }

    /// Why the object in S3 is not the one in force, if it was rejected.
    fn rejection(&self) -> Option<String> {
        self.rejected.as_ref().map(|(_, r)| format!("the object in S3 was rejected: {r}"))
    }

    fn heard(&mut self) {
        if let Some(h) = &mut self.held {
            h.heard_unix = unix_now();
        }
        self.heard = Some(Instant::now());
    }
}

fn fetch_result(result: &'static str) {
    metrics::counter!("mskdns_discovery_snapshot_fetches_total", "result" => result).increment(1);
}

impl Source for Snapshot {
    const NAME: &'static str = "snapshot";
    const HEALTH_KEY: &'static str = "discovery.snapshot";
    type Settings = Settings;

    fn settings(config: &Config) -> Option<Settings> {
        let snapshot = config.discovery.snapshot.clone()?;
        Some(Settings { snapshot, path_style: config.aws.s3_path_style, state_dir: config.ec2_state_dir() })
    }

    fn schedule(s: &Settings) -> Schedule {
        let every = Duration::from_secs(s.snapshot.poll_secs);
        Schedule { every, jitter: 0.1, max_backoff: every }
    }

    fn snapshot_dir(s: &Settings) -> Option<PathBuf> {
        s.state_dir.clone()
    }

    fn restore(&mut self, dir: &Path) -> Result<bool, String> {
        let path = dir.join(COPY_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let copy: Copy = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        // The document inside goes through the same checks as one read from S3.
        let text = serde_json::to_vec(&copy.held.document).map_err(|e| e.to_string())?;
        Document::parse(&text).map_err(|r| format!("{}: {r}", path.display()))?;
        self.copied.store(copy.held.heard_unix, Ordering::Relaxed);
        self.held = Some(copy.held);
        self.heard = None;
        Ok(true)
    }

    fn persist(&self, dir: &Path) -> std::io::Result<()> {
        let Some(held) = &self.held else { return Ok(()) };
        // Nothing new but the time S3 confirmed it, and the copy written not long ago: kept.
        let copied = self.copied.load(Ordering::Relaxed);
        if !self.dirty.load(Ordering::Relaxed) && held.heard_unix < copied + COPY_REFRESH_SECS {
            return Ok(());
        }
        let copy = Copy { version: 1, held: held.clone() };
        let text = serde_json::to_vec_pretty(&copy).map_err(std::io::Error::other)?;
        crate::discovery::write_atomic(dir, COPY_FILE, &text)?;
        self.copied.store(held.heard_unix, Ordering::Relaxed);
        self.dirty.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn clear(&mut self) {
        self.held = None;
        self.heard = None;
        self.rejected = None;
    }

    fn len(&self) -> usize {
        self.held.as_ref().map_or(0, |h| h.document.clusters.len())
    }

    fn clusters(&self, s: &Settings) -> Vec<ClusterConfig> {
        // Validated when taken: an error here cannot happen, and would serve nothing.
        self.held_for(s).and_then(|h| h.document.cluster_configs().ok()).unwrap_or_default()
    }

    fn cells(&self, s: &Settings) -> Option<EndpointState> {
        Some(self.held_for(s).map(|h| h.document.cells()).unwrap_or_default())
    }

    fn degraded(&self, s: &Settings, round: &Round) -> Option<String> {
        let max = s.snapshot.max_age_secs;
        let why = || self.rejection().or_else(|| self.last_error.clone()).or_else(|| round.reason());
        let Some(held) = self.held_for(s) else {
            return Some(format!("no discovery snapshot yet{}", why().map(|w| format!(": {w}")).unwrap_or_default()));
        };
        let age = unix_now().saturating_sub(held.heard_unix);
        metrics::gauge!("mskdns_discovery_snapshot_age_seconds").set(age as f64);
        if self.heard.is_none() {
            let w = why().map(|w| format!("; {w}")).unwrap_or_default();
            return Some(format!(
                "serving the saved snapshot (pass {}, confirmed {age} s ago) until S3 confirms it{w}",
                held.document.pass_time
            ));
        }
        if age > max {
            let w = why().map(|w| format!(": {w}")).unwrap_or_default();
            return Some(format!("snapshot {age} s old, past discovery.snapshot.max_age_secs ({max}){w}"));
        }
        // A document the publisher got wrong is news at once; S3 unreachable only past the age.
        if let Some(r) = self.rejection() {
            return Some(format!("{r}; serving the last good one (pass {})", held.document.pass_time));
        }
        let unread = held.document.unread_endpoints();
        (!unread.is_empty()).then(|| {
            format!(
                "the snapshot holds no addresses for {} (the publisher has not read them): its clusters there answer SERVFAIL",
                unread.join(", ")
            )
        })
    }

    async fn pass(&mut self, s: &Settings) -> Round {
        let at = match Location::parse(&s.snapshot.url) {
            Ok(l) => l,
            Err(e) => return Round { failed: vec![e], ..Round::default() },
        };
        if self.held.as_ref().is_some_and(|h| h.url != s.snapshot.url) {
            self.clear();
        }
        let client = self.client(s.path_style).await;
        let ask = match &self.rejected {
            Some((etag, _)) => etag.clone(),
            None => self.held.as_ref().and_then(|h| h.etag.clone()),
        };
        let fetched = s3::get(&client, &at, ask.as_deref(), s.snapshot.max_bytes).await;
        if fetched.is_ok() {
            self.last_error = None;
        }
        match fetched {
            Ok(Fetched::NotModified) if self.rejected.is_some() => {
                fetch_result("not_modified");
                Round { failed: self.rejection().into_iter().collect(), ..Round::default() }
            }
            Ok(Fetched::NotModified) => {
                fetch_result("not_modified");
                self.heard();
                Round::default()
            }
            Ok(Fetched::Object { etag, bytes }) => {
                let round = self.take(&s.snapshot.url, etag, &bytes);
                fetch_result(if round.failed.is_empty() { "ok" } else { "rejected" });
                round
            }
            Ok(Fetched::TooLarge { bytes, etag }) => {
                fetch_result("rejected");
                let max = s.snapshot.max_bytes;
                let reason = format!("{bytes} bytes or more, past discovery.snapshot.max_bytes ({max})");
                self.reject(etag, Rejected { kind: "size", reason })
            }
            Ok(Fetched::Absent) => {
                fetch_result("error");
                let message = format!("{at} does not exist (no publisher has written it yet?)");
                self.last_error = Some(message.clone());
                Round { failed: vec![message], ..Round::default() }
            }
            Err(e) => {
                fetch_result("error");
                self.last_error = Some(e.to_string());
                Round { failed: vec![format!("{at}: {e}")], errors: vec![e], ..Round::default() }
            }
        }
    }
}
