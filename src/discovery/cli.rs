//! `mskdns discover`: what discovery would serve, from MSK and EC2 (`[discovery.aws]`) or from a
//! fleet snapshot (`[discovery.snapshot]`); and `--publish`, one pass written to S3 and done.

use std::collections::BTreeSet;

use super::fleet::publisher::{self, Memory, Outcome};
use super::fleet::s3::{self, Fetched, Location};
use super::fleet::{Document, Rejected};
use super::msk::{self, Pass, Report, SnapshotReport};
use crate::config::Config;
use crate::config::EndpointState;

/// The report of every source configured, and whether any could not be read (with why).
pub async fn report(config: &Config) -> Result<(Report, bool), String> {
    let mut report: Option<Report> = None;
    let mut failed = false;
    if let Some(d) = &config.discovery.aws {
        let pass = msk::pass(d, &mut msk::Clients::new(), &[], &mut Default::default()).await;
        failed |= !pass.errors.is_empty() || !pass.failed.is_empty();
        report = Some(msk::report(pass, &config.clusters));
    }
    if let Some(s) = &config.discovery.snapshot {
        let (doc, url) = read_snapshot(config, &s.url, s.max_bytes).await?;
        let mut r = msk::report(Pass { clusters: doc.found(), ..Pass::default() }, &config.clusters);
        r.snapshot = Some(SnapshotReport {
            url,
            pass_time: doc.pass_time.clone(),
            publisher: doc.publisher.clone(),
            endpoints: doc.endpoints.clone(),
            subnets: doc.subnets.clone(),
        });
        report = Some(match report {
            Some(mut first) => {
                first.clusters.extend(r.clusters);
                first.snapshot = r.snapshot;
                first
            }
            None => r,
        });
    }
    let report = report.ok_or("the configuration has no [discovery.aws] or [discovery.snapshot] section")?;
    Ok((report, failed))
}

/// Reads and validates the snapshot; the error says why it cannot be served.
async fn read_snapshot(config: &Config, url: &str, max: u64) -> Result<(Document, String), String> {
    let at = Location::parse(url)?;
    let client = s3::client(config.aws.s3_path_style).await;
    let bytes = match s3::get(&client, &at, None, max).await.map_err(|e| format!("{at}: {e}"))? {
        Fetched::Object { bytes, .. } => bytes,
        Fetched::Absent => return Err(format!("{at} does not exist")),
        Fetched::TooLarge { bytes, .. } => {
            return Err(format!("{at}: {bytes} bytes or more, past discovery.snapshot.max_bytes ({max})"));
        }
        Fetched::NotModified => return Err(format!("{at}: unexpected 304")),
    };
    let doc = Document::parse(&bytes).map_err(|r: Rejected| format!("{at}: rejected: {r}"))?;
    Ok((doc, at.to_string()))
}

/// One pass of `[discovery.aws]`, the EC2 reads of the endpoints its clusters name and of the
/// views' subnets, written to `url`. Nothing is written when any call failed: a partial pass
/// would take clusters away from every reader.
pub async fn publish_once(config: &Config, url: &str) -> Result<(Report, Outcome), String> {
    let at = Location::parse(url)?;
    let d = config.discovery.aws.as_ref().ok_or("publishing needs a [discovery.aws] section")?;
    let now = msk::unix_now();
    let pass = msk::pass(d, &mut msk::Clients::new(), &[], &mut Default::default()).await;
    if !pass.failed.is_empty() || !pass.errors.is_empty() {
        let why: Vec<String> = pass.errors.iter().map(ToString::to_string).chain(pass.failed.iter().cloned()).collect();
        return Err(format!("discovery failed, nothing published: {}", why.join("; ")));
    }
    let endpoints: BTreeSet<String> =
        pass.clusters.iter().filter_map(|f| f.cluster(d.ttl)).filter_map(|c| c.vpc_endpoint).collect();
    let subnets: BTreeSet<String> = config.views.iter().filter_map(|v| v.subnet.clone()).collect();
    let memory = Memory::new(endpoints.iter().cloned(), subnets.iter().cloned());
    if !endpoints.is_empty() || !subnets.is_empty() {
        let base = super::aws_config().await;
        let ec2 = aws_sdk_ec2::Client::new(&base);
        super::ec2::refresh(&ec2, &memory, endpoints.into_iter().collect(), &subnets.into_iter().collect::<Vec<_>>())
            .await
            .map_err(|(op, e)| format!("{op} failed, nothing published: {e}"))?;
    }
    let doc = Document::build(&pass.clusters, d.ttl, &EndpointState::of(&memory), now);
    let heartbeat = config.discovery.publish.as_ref().map_or(3600, |p| p.heartbeat_secs);
    let client = s3::client(config.aws.s3_path_style).await;
    let outcome = publisher::publish(&client, &at, &doc, None, heartbeat).await.map_err(|e| format!("{at}: {e}"))?;
    Ok((msk::report(pass, &config.clusters), outcome))
}
