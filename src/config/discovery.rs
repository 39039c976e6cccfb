//! `[aws]` and `[discovery]`: EC2 reads, and clusters found through the MSK API.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Config;
use super::ConfigError;
use super::clusters::{default_cluster_ttl, parse_target};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// How often VPC endpoint addresses and subnet AZs are read from EC2.
    pub refresh_secs: u64,
    /// Where the last addresses and AZs read from EC2 are kept (`ec2.json`) and read at start;
    /// default: `discovery.aws.state_dir`, else systemd's `$STATE_DIRECTORY`; none: not kept.
    pub state_dir: Option<PathBuf>,
    /// Path-style S3 requests (`http://host/bucket/key`): S3-compatible endpoints and emulators.
    pub s3_path_style: bool,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig { refresh_secs: 60, state_dir: None, s3_path_style: false }
    }
}

impl Config {
    /// The folder for the EC2 state file and the fleet snapshot's copy, if any.
    pub fn ec2_state_dir(&self) -> Option<PathBuf> {
        self.aws.state_dir.clone().or_else(|| match &self.discovery.aws {
            Some(d) => d.state_dir(),
            None => systemd_state_dir(),
        })
    }
}

/// systemd's `$STATE_DIRECTORY`: it may pass several, separated by colons; the first is ours.
fn systemd_state_dir() -> Option<PathBuf> {
    std::env::var_os("STATE_DIRECTORY").and_then(|d| std::env::split_paths(&d).next())
}

/// Clusters found through cloud APIs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// `[discovery.aws]`: MSK clusters found with ListClustersV2 and GetBootstrapBrokers.
    pub aws: Option<AwsDiscoveryConfig>,
    /// `[discovery.publish]`: write what `[discovery.aws]` found to S3 for a fleet of readers.
    pub publish: Option<PublishConfig>,
    /// `[discovery.snapshot]`: read the clusters from a document a publisher wrote to S3.
    pub snapshot: Option<SnapshotConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    /// `s3://bucket/key`.
    pub url: String,
    /// An unchanged document is written again this often, so that its pass time shows the
    /// publisher alive (readers' 304s become one 200 per interval).
    pub heartbeat_secs: u64,
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig { url: String::new(), heartbeat_secs: 3600 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// `s3://bucket/key`.
    pub url: String,
    /// Seconds between conditional GETs (If-None-Match), each spread by ±10%.
    pub poll_secs: u64,
    /// Past this long without S3 confirming the snapshot in force, /readyz is degraded.
    pub max_age_secs: u64,
    /// A larger document is rejected unread.
    pub max_bytes: u64,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig { url: String::new(), poll_secs: 30, max_age_secs: 900, max_bytes: 4 << 20 }
    }
}

/// `s3://bucket/key` as (bucket, key); the message says what is wrong.
pub fn parse_s3_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| format!("`{url}` is not an s3://bucket/key URL"))?;
    let (bucket, key) = rest.split_once('/').ok_or_else(|| format!("`{url}` names no object key after the bucket"))?;
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !bucket_ok {
        return Err(format!("`{bucket}` is not an S3 bucket name"));
    }
    if key.is_empty() || key.ends_with('/') || key.len() > 1024 {
        return Err(format!("`{key}` is not an S3 object key"));
    }
    Ok((bucket.to_owned(), key.to_owned()))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AwsDiscoveryConfig {
    /// Regions searched; empty: the SDK's region (AWS_REGION, the profile, IMDS).
    pub regions: Vec<String>,
    /// Accounts reached by assuming a role; empty: the default credentials' own account only.
    pub accounts: Vec<AwsAccountConfig>,
    /// Seconds between refreshes, each spread by ±`jitter` (a fraction) so fleets do not align.
    pub refresh_secs: u64,
    pub jitter: f64,
    /// After a failed refresh the next try comes sooner, doubling from 1 s up to this cap.
    pub max_backoff_secs: u64,
    /// A cluster that AWS no longer lists is still answered this long (a refresh that fails
    /// never removes anything).
    pub grace_secs: u64,
    /// Clusters carrying this tag key are served; with `tag_value`, only those with that value.
    pub tag: String,
    pub tag_value: Option<String>,
    /// The tag whose value is a cluster's target: `vpce-…`, `addresses=IP IP`,
    /// `forward=IP[:port] …` or `proxy=IP …` (AWS tag values allow no commas).
    pub target_tag: String,
    /// The target of a selected cluster without a target tag (accounts may set their own).
    pub default_target: Option<String>,
    /// TTL of the answers for discovered clusters.
    pub ttl: u32,
    /// Where the last known good result is kept (`discovery-aws.json`) and read at start;
    /// default: systemd's `$STATE_DIRECTORY`; none: no snapshot.
    pub state_dir: Option<PathBuf>,
}

impl Default for AwsDiscoveryConfig {
    fn default() -> Self {
        AwsDiscoveryConfig {
            regions: Vec::new(),
            accounts: Vec::new(),
            refresh_secs: 300,
            jitter: 0.1,
            max_backoff_secs: 300,
            grace_secs: 3600,
            tag: "mskdns".into(),
            tag_value: None,
            target_tag: "mskdns:target".into(),
            default_target: None,
            ttl: default_cluster_ttl(),
            state_dir: None,
        }
    }
}

impl AwsDiscoveryConfig {
    pub fn state_dir(&self) -> Option<PathBuf> {
        self.state_dir.clone().or_else(systemd_state_dir)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AwsAccountConfig {
    /// The role assumed (STS AssumeRole) with the default credentials; none: those credentials.
    pub role_arn: Option<String>,
    pub external_id: Option<String>,
    /// Overrides `discovery.aws.regions` for this account.
    pub regions: Vec<String>,
    /// Overrides `discovery.aws.default_target` for this account's clusters.
    pub default_target: Option<String>,
}

pub(super) fn validate_fleet(d: &DiscoveryConfig) -> Result<(), ConfigError> {
    let no_aws = || ConfigError::invalid("discovery", "this build has no AWS support (feature `aws`)");
    if let Some(p) = &d.publish {
        if !cfg!(feature = "aws") {
            return Err(no_aws());
        }
        parse_s3_url(&p.url).map_err(|m| ConfigError::invalid("discovery.publish.url", m))?;
        if d.aws.is_none() {
            return Err(ConfigError::invalid("discovery.publish", "publishes what [discovery.aws] finds: add it"));
        }
        if p.heartbeat_secs < 60 {
            return Err(ConfigError::invalid("discovery.publish.heartbeat_secs", "must be at least 60"));
        }
    }
    if let Some(s) = &d.snapshot {
        if !cfg!(feature = "aws") {
            return Err(no_aws());
        }
        parse_s3_url(&s.url).map_err(|m| ConfigError::invalid("discovery.snapshot.url", m))?;
        if s.poll_secs == 0 {
            return Err(ConfigError::invalid("discovery.snapshot.poll_secs", "must be at least 1"));
        }
        if s.max_age_secs < s.poll_secs {
            return Err(ConfigError::invalid("discovery.snapshot.max_age_secs", "must be at least poll_secs"));
        }
        if !(1024..=(256 << 20)).contains(&s.max_bytes) {
            return Err(ConfigError::invalid("discovery.snapshot.max_bytes", "must be between 1024 and 268435456"));
        }
        if let Some(p) = &d.publish
            && p.url == s.url
        {
            return Err(ConfigError::invalid("discovery.snapshot.url", "is the URL this instance publishes to"));
        }
    }
    Ok(())
}

pub(super) fn validate_discovery(d: &AwsDiscoveryConfig) -> Result<(), ConfigError> {
    let key = |k: &str| format!("discovery.aws.{k}");
    if !cfg!(feature = "aws") {
        return Err(ConfigError::invalid("discovery.aws", "this build has no AWS support (feature `aws`)"));
    }
    if d.refresh_secs == 0 {
        return Err(ConfigError::invalid(key("refresh_secs"), "must be at least 1"));
    }
    if !(0.0..=0.5).contains(&d.jitter) {
        return Err(ConfigError::invalid(key("jitter"), "must be a fraction between 0 and 0.5"));
    }
    if d.max_backoff_secs == 0 {
        return Err(ConfigError::invalid(key("max_backoff_secs"), "must be at least 1"));
    }
    if d.tag.is_empty() {
        return Err(ConfigError::invalid(key("tag"), "must name a tag key"));
    }
    if d.target_tag.is_empty() {
        return Err(ConfigError::invalid(key("target_tag"), "must name a tag key"));
    }
    let check_target = |at: String, t: &Option<String>| match t {
        Some(t) => parse_target(t).map(drop).map_err(|m| ConfigError::invalid(at, m)),
        None => Ok(()),
    };
    check_target(key("default_target"), &d.default_target)?;
    for r in &d.regions {
        if r.is_empty() || !r.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            return Err(ConfigError::invalid(key("regions"), format!("`{r}` is not a region name")));
        }
    }
    for (i, a) in d.accounts.iter().enumerate() {
        let at = |k: &str| format!("discovery.aws.accounts[{i}].{k}");
        check_target(at("default_target"), &a.default_target)?;
        if let Some(r) = &a.role_arn
            && !(r.starts_with("arn:") && r.contains(":role/"))
        {
            return Err(ConfigError::invalid(at("role_arn"), format!("`{r}` is not an IAM role ARN")));
        }
        if a.external_id.is_some() && a.role_arn.is_none() {
            return Err(ConfigError::invalid(at("external_id"), "needs role_arn"));
        }
    }
    Ok(())
}
