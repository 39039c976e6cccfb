//! Keeps VPC endpoint targets current: DescribeVpcEndpoints gives each endpoint's network
//! interfaces, DescribeNetworkInterfaces their private addresses and AZs; DescribeSubnets gives
//! the AZ of views configured by subnet. Refreshed on an interval; when EC2 fails the last good
//! addresses stay in service and /readyz reports the service degraded, with the reason.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::DisplayErrorContext;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::config::{Config, EndpointAddr, EndpointState};

const HEALTH_KEY: &str = "ec2";
const STATE_FILE: &str = "ec2.json";

/// What EC2 refreshes read and write, and nothing more: the VPC endpoints and subnets the
/// configuration in force names, and the cells holding their addresses and AZs (set here, read
/// per query; setting one needs no rebuild). The control plane gives one over the DNS engine.
pub trait Endpoints: Send + Sync {
    /// Each VPC endpoint, with its addresses as last set (`None`: never read).
    fn endpoints(&self) -> Vec<(String, Option<Arc<Vec<EndpointAddr>>>)>;
    /// Each subnet a view is configured by, with its AZ as last set.
    fn subnets(&self) -> Vec<(String, Option<Arc<Vec<String>>>)>;
    fn set_addresses(&self, endpoint: &str, addrs: Vec<EndpointAddr>);
    fn set_az(&self, subnet: &str, az: Vec<String>);
}

impl EndpointState {
    /// What `cells` hold now (those never read left out).
    pub fn of(cells: &dyn Endpoints) -> Self {
        EndpointState {
            endpoints: cells.endpoints().into_iter().filter_map(|(id, a)| Some((id, a?.to_vec()))).collect(),
            subnets: cells.subnets().into_iter().filter_map(|(id, az)| Some((id, az?.to_vec()))).collect(),
        }
    }
}

fn read_state(dir: &Path) -> std::io::Result<Option<EndpointState>> {
    match std::fs::read(dir.join(STATE_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_state(dir: &Path, known: &EndpointState) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(known).map_err(std::io::Error::other)?;
    super::write_atomic(dir, STATE_FILE, &text)
}

/// Serves the addresses and AZs of the state file until EC2 answers: called before the first
/// query. Endpoints and subnets the configuration no longer names are ignored.
pub fn restore(cells: &dyn Endpoints, health: &Health, dir: Option<PathBuf>) {
    let Some(dir) = dir else { return };
    let known = match read_state(&dir) {
        Ok(Some(k)) => k,
        Ok(None) => return,
        Err(e) => {
            metrics::counter!("mskdns_ec2_state_errors_total").increment(1);
            tracing::error!(error = %e, file = %dir.join(STATE_FILE).display(), "EC2 state file unreadable: ignored");
            health.set_degraded("ec2.state", Some(format!("state file unreadable, ignored: {e}")));
            return;
        }
    };
    let mut restored = 0;
    for (id, _) in cells.endpoints() {
        if let Some(addrs) = known.endpoints.get(&id) {
            cells.set_addresses(&id, addrs.clone());
            restored += 1;
        }
    }
    for (subnet, _) in cells.subnets() {
        if let Some(az) = known.subnets.get(&subnet) {
            cells.set_az(&subnet, az.clone());
        }
    }
    if restored > 0 {
        tracing::info!(endpoints = restored, file = %dir.join(STATE_FILE).display(), "VPC endpoint addresses restored from the state file");
        health.set_degraded(HEALTH_KEY, Some("serving addresses from the state file until EC2 answers".into()));
    }
}

/// Reports every VPC endpoint whose addresses were never read as a readiness problem.
pub fn mark_unread(cells: &dyn Endpoints, health: &Health) {
    for (id, _) in cells.endpoints().into_iter().filter(|e| e.1.is_none()) {
        health.set_problem(&format!("vpc_endpoint {id}"), Some("addresses not read from EC2 yet".into()));
    }
}

/// Refreshes until `shutdown`, following the configuration in force (a reload may add or drop
/// endpoints). EC2 is not called, and no AWS client is built, while nothing needs it.
pub async fn run(
    cells: Arc<dyn Endpoints>,
    config: watch::Receiver<Arc<Config>>,
    health: Arc<Health>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let duration = metrics::histogram!("mskdns_ec2_refresh_duration_seconds");
    let mut client = None;
    let mut reported: Vec<String> = Vec::new();
    let mut written: Option<EndpointState> = None;
    loop {
        let subnets: Vec<String> = cells.subnets().into_iter().map(|s| s.0).collect();
        let ids: Vec<String> = cells.endpoints().into_iter().map(|e| e.0).collect();
        for gone in reported.iter().filter(|id| !ids.contains(id)) {
            health.set_problem(&format!("vpc_endpoint {gone}"), None);
        }
        reported = ids.clone();
        mark_unread(cells.as_ref(), &health);
        if reported.is_empty() && subnets.is_empty() {
            health.set_degraded(HEALTH_KEY, None);
            tokio::select! {
                _ = tokio::time::sleep(every) => continue,
                _ = shutdown.cancelled() => return,
            }
        }
        let client = match &client {
            Some(c) => c,
            None => {
                let conf = super::aws_config().await;
                client.insert(Client::new(&conf))
            }
        };
        let started = Instant::now();
        // A call that stalls holds the refresh up to its timeouts, never the shutdown.
        let result = tokio::select! {
            r = refresh(client, cells.as_ref(), ids, &subnets) => r,
            _ = shutdown.cancelled() => return,
        };
        match result {
            Ok(()) => {
                health.set_degraded(HEALTH_KEY, None);
                let known = EndpointState::of(cells.as_ref());
                let dir = config.borrow().ec2_state_dir();
                if let Some(dir) = dir
                    && written.as_ref() != Some(&known)
                {
                    match write_state(&dir, &known) {
                        Ok(()) => written = Some(known),
                        Err(e) => {
                            metrics::counter!("mskdns_ec2_state_errors_total").increment(1);
                            tracing::warn!(error = %e, dir = %dir.display(), "cannot write the EC2 state file");
                        }
                    }
                }
            }
            Err((operation, message)) => {
                metrics::counter!("mskdns_ec2_errors_total", "operation" => operation).increment(1);
                tracing::warn!(operation, error = %message, "EC2 refresh failed; keeping the last known addresses");
                health.set_degraded(
                    HEALTH_KEY,
                    Some(format!("{operation} failed, serving last known addresses: {message}")),
                );
            }
        }
        duration.record(started.elapsed().as_secs_f64());
        for (id, addrs) in cells.endpoints() {
            let problem = match addrs {
                None => Some("addresses not read from EC2 yet".into()),
                Some(a) if a.is_empty() => Some("EC2 lists no addresses for it".into()),
                Some(_) => None,
            };
            health.set_problem(&format!("vpc_endpoint {id}"), problem);
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

type Failure = (&'static str, String);

pub(crate) async fn refresh(
    client: &Client,
    cells: &dyn Endpoints,
    ids: Vec<String>,
    subnets: &[String],
) -> Result<(), Failure> {
    if !ids.is_empty() {
        let fail = |e| ("DescribeVpcEndpoints", format!("{}", DisplayErrorContext(e)));
        let mut enis_of: HashMap<String, Vec<String>> = HashMap::new();
        let mut pages = client.describe_vpc_endpoints().set_vpc_endpoint_ids(Some(ids)).into_paginator().send();
        while let Some(page) = pages.next().await {
            for ep in page.map_err(fail)?.vpc_endpoints() {
                let id = ep.vpc_endpoint_id().unwrap_or_default().to_owned();
                enis_of.insert(id, ep.network_interface_ids().to_vec());
            }
        }
        let all: Vec<String> = enis_of.values().flatten().cloned().collect();
        let mut addrs_of: HashMap<String, Vec<EndpointAddr>> = HashMap::new();
        if !all.is_empty() {
            let fail = |e| ("DescribeNetworkInterfaces", format!("{}", DisplayErrorContext(e)));
            let mut pages =
                client.describe_network_interfaces().set_network_interface_ids(Some(all)).into_paginator().send();
            while let Some(page) = pages.next().await {
                for ni in page.map_err(fail)?.network_interfaces() {
                    let az = ni.availability_zone().unwrap_or_default().to_owned();
                    let az_id = ni.availability_zone_id().map(str::to_owned);
                    let v4 = ni.private_ip_addresses().iter().filter_map(|p| p.private_ip_address());
                    let v6 = ni.ipv6_addresses().iter().filter_map(|p| p.ipv6_address());
                    let ips = v4.chain(v6).filter_map(|a| a.parse::<IpAddr>().ok());
                    let list = addrs_of.entry(ni.network_interface_id().unwrap_or_default().to_owned()).or_default();
                    list.extend(ips.map(|ip| EndpointAddr { ip, az: az.clone(), az_id: az_id.clone() }));
                }
            }
        }
        for (id, now) in cells.endpoints() {
            let Some(enis) = enis_of.get(&id) else { continue };
            let mut addrs: Vec<EndpointAddr> = enis.iter().filter_map(|n| addrs_of.get(n)).flatten().cloned().collect();
            addrs.sort_by(|a, b| (&a.az, a.ip).cmp(&(&b.az, b.ip)));
            metrics::gauge!("mskdns_vpc_endpoint_addresses", "endpoint" => id.clone()).set(addrs.len() as f64);
            if now.as_deref() != Some(&addrs) {
                tracing::info!(endpoint = %id, addresses = ?addrs.iter().map(|a| a.ip).collect::<Vec<_>>(), "VPC endpoint addresses");
            }
            cells.set_addresses(&id, addrs);
        }
    }
    if !subnets.is_empty() {
        let fail = |e| ("DescribeSubnets", format!("{}", DisplayErrorContext(e)));
        let out = client.describe_subnets().set_subnet_ids(Some(subnets.to_vec())).send().await.map_err(fail)?;
        for s in out.subnets() {
            let az: Vec<String> =
                [s.availability_zone(), s.availability_zone_id()].into_iter().flatten().map(str::to_owned).collect();
            if let Some(id) = s.subnet_id() {
                cells.set_az(id, az);
            }
        }
    }
    Ok(())
}
