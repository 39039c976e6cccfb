//! What mskdns learns from AWS at run time: MSK clusters (ListClustersV2, GetBootstrapBrokers)
//! and VPC endpoint addresses and subnet AZs (EC2). Every cluster source runs under one driver
//! ([`driver`]); EC2 refreshes write through control's narrow [`ec2::Endpoints`] handle.

pub mod driver;
pub mod ec2;
pub mod msk;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config::{ClusterConfig, Config};

/// What a discovery source holds: the configuration in force (its own settings are read there
/// on every pass, so a reload applies), and the channel its findings go to.
#[derive(Clone)]
pub struct Discovered {
    pub config: watch::Receiver<Arc<Config>>,
    pub found: mpsc::Sender<Vec<ClusterConfig>>,
}
