//! What mskdns learns from AWS at run time: MSK clusters (ListClustersV2, GetBootstrapBrokers)
//! and VPC endpoint addresses and subnet AZs (EC2). Every cluster source runs under one driver
//! ([`driver`]); EC2 refreshes write through control's narrow [`ec2::Endpoints`] handle.

pub mod cli;
pub mod driver;
pub mod ec2;
pub mod fleet;
pub mod msk;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config::{ClusterConfig, Config};

/// What a discovery source holds: the configuration in force (its own settings are read there
/// on every pass, so a reload applies), and the channel its findings go to.
#[derive(Clone)]
pub struct Discovered {
    pub config: watch::Receiver<Arc<Config>>,
    pub found: mpsc::Sender<Findings>,
}

/// What a source hands the control plane: its clusters, and the VPC endpoint addresses and
/// subnet AZs it knows itself (a fleet snapshot's; `None`: EC2 reads those its clusters name).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Findings {
    pub clusters: Vec<ClusterConfig>,
    pub cells: Option<crate::config::EndpointState>,
}

/// A connection that sends nothing for this long fails (and is retried by the SDK)...
pub(crate) const AWS_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// ...and no call, its retries included, takes longer than this: an AWS endpoint (or a proxy on
/// the way) that accepts and never answers holds a discovery pass only this long.
pub(crate) const AWS_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The SDK's default chain (`AWS_ENDPOINT_URL…`, `AWS_REGION`, credentials) with every call
/// bounded in time (the SDK sets no read or call timeout of its own).
pub(crate) async fn aws_config() -> aws_config::SdkConfig {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .read_timeout(AWS_READ_TIMEOUT)
        .operation_timeout(AWS_CALL_TIMEOUT)
        .build();
    aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(timeouts).load().await
}

/// Writes `bytes` to `dir/name` atomically: a temporary file, fsync, rename, fsync of the folder.
pub(crate) fn write_atomic(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}
