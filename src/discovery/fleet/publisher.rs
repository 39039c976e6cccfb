//! The publisher: writes what `[discovery.aws]` found, with the endpoint addresses and subnet
//! AZs EC2 gave, as one document: only when it changed (or, unchanged, once per heartbeat so
//! its pass time shows the publisher alive), and on condition (`If-Match` the ETag it read or
//! wrote, `If-None-Match: *` for a new object) so two publishers never overwrite what the other
//! wrote unread. A failed condition is read again and retried once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Document;
use super::s3::{self, Expect, Fetched, Location, PutFailed};
use crate::admin::Health;
use crate::config::EndpointState;
use crate::config::{Config, EndpointAddr};
use crate::discovery::driver::ApiError;
use crate::discovery::ec2::Endpoints;
use crate::discovery::msk::Passed;

const HEALTH_KEY: &str = "discovery.publish";
/// The object as read before a write is never larger than this (a document is kilobytes).
const READ_CAP: u64 = 64 << 20;

/// What a publish did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Written {
        etag: String,
    },
    /// The object already holds this state (written by this or another publisher) recently enough.
    Unchanged {
        etag: String,
    },
}

/// Whether an unchanged document from pass `then` is written again for a pass at `now`.
fn heartbeat_due(then: u64, now: u64, heartbeat_secs: u64) -> bool {
    now >= then.saturating_add(heartbeat_secs)
}

/// The object now: its ETag and document (`None`: unreadable, so overwritten), or absent.
async fn current(client: &Client, at: &Location) -> Result<Option<(String, Option<Document>)>, ApiError> {
    Ok(match s3::get(client, at, None, READ_CAP).await? {
        Fetched::Object { etag, bytes } => Some((etag.unwrap_or_default(), Document::parse(&bytes).ok())),
        Fetched::TooLarge { etag, .. } => Some((etag.unwrap_or_default(), None)),
        Fetched::Absent | Fetched::NotModified => None,
    })
}

/// What to write on: `Err` when the object already holds this state and its pass is recent.
fn expect_for(found: Option<(String, Option<Document>)>, doc: &Document, heartbeat: u64) -> Result<Expect, Outcome> {
    let Some((etag, held)) = found else { return Ok(Expect::Absent) };
    if let Some(held) = held
        && held.same_state(doc)
        && !heartbeat_due(held.pass_unix().unwrap_or(0), doc.pass_unix().unwrap_or(0), heartbeat)
    {
        return Err(Outcome::Unchanged { etag });
    }
    Ok(Expect::Is(etag))
}

/// Writes `doc` to `at`. With `etag` (what this publisher wrote last) the write is on that
/// condition; without, the object is read first, and left alone if it holds this state.
pub async fn publish(
    client: &Client,
    at: &Location,
    doc: &Document,
    etag: Option<String>,
    heartbeat_secs: u64,
) -> Result<Outcome, ApiError> {
    let body = serde_json::to_vec_pretty(doc).map_err(|e| ApiError {
        operation: "PutObject",
        kind: "other",
        message: e.to_string(),
    })?;
    let mut expect = match etag {
        Some(e) => Expect::Is(e),
        None => match expect_for(current(client, at).await?, doc, heartbeat_secs) {
            Ok(e) => e,
            Err(done) => return Ok(done),
        },
    };
    for attempt in 0..2 {
        match s3::put(client, at, body.clone(), &expect).await {
            Ok(etag) => return Ok(Outcome::Written { etag }),
            Err(PutFailed::Conflict) if attempt == 0 => {
                tracing::info!(url = %at, "another publisher wrote the discovery snapshot first: reading it again");
                expect = match expect_for(current(client, at).await?, doc, heartbeat_secs) {
                    Ok(e) => e,
                    Err(done) => return Ok(done),
                };
            }
            Err(PutFailed::Conflict) => break,
            Err(PutFailed::Api(e)) => return Err(e),
        }
    }
    Err(ApiError {
        operation: "PutObject",
        kind: "conflict",
        message: "another publisher wrote the object again while this one retried".into(),
    })
}

/// The daemon's publisher: after each completed pass of `[discovery.aws]` (from `passes`) and
/// when EC2 changed an address (checked every few seconds), while `[discovery.publish]` is set.
pub async fn run(
    mut passes: watch::Receiver<Option<Arc<Passed>>>,
    config: watch::Receiver<Arc<Config>>,
    cells: Arc<dyn Endpoints>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let mut client: Option<(bool, Client)> = None;
    // The URL written last, its ETag and what it holds.
    let mut last: Option<(String, String, Document)> = None;
    let mut wait = Duration::from_secs(5);
    loop {
        tokio::select! {
            r = passes.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        wait = Duration::from_secs(5);
        let (publish_to, path_style) = {
            let c = config.borrow();
            (c.discovery.publish.clone(), c.aws.s3_path_style)
        };
        let Some(p) = publish_to else {
            health.set_degraded(HEALTH_KEY, None);
            continue;
        };
        let Some(pass) = passes.borrow().clone() else { continue };
        let doc = Document::build(&pass.found, pass.ttl, &EndpointState::of(cells.as_ref()), pass.at);
        let etag = match &last {
            Some((url, etag, held)) if *url == p.url => {
                let due = heartbeat_due(held.pass_unix().unwrap_or(0), pass.at, p.heartbeat_secs);
                if held.same_state(&doc) && !due {
                    continue;
                }
                Some(etag.clone())
            }
            _ => None,
        };
        let Ok(at) = Location::parse(&p.url) else { continue };
        let s3 = match &client {
            Some((ps, c)) if *ps == path_style => c.clone(),
            _ => client.insert((path_style, s3::client(path_style).await)).1.clone(),
        };
        // A store that stalls holds the call up to its timeouts, never the shutdown.
        let result = tokio::select! {
            r = publish(&s3, &at, &doc, etag, p.heartbeat_secs) => r,
            _ = shutdown.cancelled() => return,
        };
        match result {
            Ok(outcome) => {
                let (result, etag) = match outcome {
                    Outcome::Written { etag } => ("written", etag),
                    Outcome::Unchanged { etag } => ("unchanged", etag),
                };
                metrics::counter!("mskdns_discovery_publish_total", "result" => result).increment(1);
                if result == "written" {
                    tracing::info!(url = %at, clusters = doc.clusters.len(), pass_time = %doc.pass_time, "discovery snapshot published");
                }
                health.set_degraded(HEALTH_KEY, None);
                last = Some((p.url.clone(), etag, doc));
            }
            Err(e) => {
                metrics::counter!("mskdns_discovery_publish_total", "result" => "error").increment(1);
                tracing::warn!(url = %at, error = %e, "cannot publish the discovery snapshot; trying again after the next pass");
                health.set_degraded(HEALTH_KEY, Some(format!("cannot publish to {at}: {e}")));
                // Asked again without a condition: the object is read first.
                last = None;
                wait = Duration::from_secs(60);
            }
        }
    }
}

/// Endpoint addresses and subnet AZs held in memory, for a one-shot publish.
#[derive(Default)]
pub struct Memory {
    endpoints: Mutex<BTreeMap<String, Option<Arc<Vec<EndpointAddr>>>>>,
    subnets: Mutex<BTreeMap<String, Option<Arc<Vec<String>>>>>,
}

impl Memory {
    pub fn new(endpoints: impl IntoIterator<Item = String>, subnets: impl IntoIterator<Item = String>) -> Self {
        let m = Memory::default();
        m.endpoints.lock().unwrap().extend(endpoints.into_iter().map(|e| (e, None)));
        m.subnets.lock().unwrap().extend(subnets.into_iter().map(|s| (s, None)));
        m
    }
}

impl Endpoints for Memory {
    fn endpoints(&self) -> Vec<(String, Option<Arc<Vec<EndpointAddr>>>)> {
        self.endpoints.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn subnets(&self) -> Vec<(String, Option<Arc<Vec<String>>>)> {
        self.subnets.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn set_addresses(&self, endpoint: &str, addrs: Vec<EndpointAddr>) {
        self.endpoints.lock().unwrap().insert(endpoint.to_owned(), Some(Arc::new(addrs)));
    }

    fn set_az(&self, subnet: &str, az: Vec<String>) {
        self.subnets.lock().unwrap().insert(subnet.to_owned(), Some(Arc::new(az)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::msk::Found;

    fn doc(target: &str, pass: u64) -> Document {
        let f = Found {
            arn: "arn:aws:kafka:us-east-1:1:cluster/a/b".into(),
            name: "a".into(),
            account: "1".into(),
            region: "us-east-1".into(),
            kind: "serverless".into(),
            bootstrap: "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com".into(),
            target: target.into(),
            target_from: "tag".into(),
            scope: "default".into(),
            last_seen: pass,
        };
        Document::build(&[f], 60, &EndpointState::default(), pass)
    }

    #[test]
    fn the_same_state_is_not_written_again_until_the_heartbeat() {
        let held = doc("addresses=10.0.0.1", 1_000);
        let found = |d: &Document| Some(("\"e1\"".to_owned(), Some(d.clone())));
        let same_later = doc("addresses=10.0.0.1", 1_000 + 300);
        assert_eq!(expect_for(found(&held), &same_later, 3600), Err(Outcome::Unchanged { etag: "\"e1\"".into() }));
        let same_much_later = doc("addresses=10.0.0.1", 1_000 + 3600);
        assert_eq!(expect_for(found(&held), &same_much_later, 3600), Ok(Expect::Is("\"e1\"".into())));
        let changed = doc("addresses=10.0.0.2", 1_000 + 1);
        assert_eq!(expect_for(found(&held), &changed, 3600), Ok(Expect::Is("\"e1\"".into())));
        // Unreadable or absent: overwritten on its ETag, or created.
        assert_eq!(expect_for(Some(("\"e2\"".into(), None)), &changed, 3600), Ok(Expect::Is("\"e2\"".into())));
        assert_eq!(expect_for(None, &changed, 3600), Ok(Expect::Absent));
    }
}
