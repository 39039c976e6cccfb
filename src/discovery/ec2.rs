//! Keeps VPC endpoint targets current: DescribeVpcEndpoints gives each endpoint's network
//! interfaces, DescribeNetworkInterfaces their private addresses and AZs; DescribeSubnets gives
//! the AZ of views configured by subnet. Refreshed on an interval; when EC2 fails the last good
//! addresses stay in service and /readyz reports the service degraded, with the reason.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::DisplayErrorContext;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::dns::Engine;
use crate::dns::catalog::{Catalog, EndpointAddr};

const HEALTH_KEY: &str = "ec2";

/// Reports every VPC endpoint whose addresses were never read as a readiness problem.
pub fn mark_unread(catalog: &Catalog, health: &Health) {
    for e in catalog.endpoints().filter(|e| e.get().is_none()) {
        health.set_problem(&format!("vpc_endpoint {}", e.id), Some("addresses not read from EC2 yet".into()));
    }
}

/// Refreshes until `shutdown`, following the configuration in force (a reload may add or drop
/// endpoints). EC2 is not called, and no AWS client is built, while nothing needs it.
pub async fn run(engine: Arc<Engine>, health: Arc<Health>, every: Duration, shutdown: CancellationToken) {
    let duration = metrics::histogram!("mskdns_ec2_refresh_duration_seconds");
    let mut client = None;
    let mut reported: Vec<String> = Vec::new();
    loop {
        let snapshot = engine.snapshot();
        let catalog = &snapshot.catalog;
        let subnets: Vec<String> = catalog.views().iter().filter_map(|v| v.subnet.clone()).collect();
        for gone in reported.iter().filter(|id| !catalog.endpoints().any(|e| &&e.id == id)) {
            health.set_problem(&format!("vpc_endpoint {gone}"), None);
        }
        reported = catalog.endpoints().map(|e| e.id.clone()).collect();
        mark_unread(catalog, &health);
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
                let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
                client.insert(Client::new(&conf))
            }
        };
        let started = Instant::now();
        match refresh(client, catalog, &subnets).await {
            Ok(()) => health.set_degraded(HEALTH_KEY, None),
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
        for e in catalog.endpoints() {
            let problem = match e.get() {
                None => Some("addresses not read from EC2 yet".into()),
                Some(a) if a.is_empty() => Some("EC2 lists no addresses for it".into()),
                Some(_) => None,
            };
            health.set_problem(&format!("vpc_endpoint {}", e.id), problem);
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

type Failure = (&'static str, String);

async fn refresh(client: &Client, catalog: &Catalog, subnets: &[String]) -> Result<(), Failure> {
    let ids: Vec<String> = catalog.endpoints().map(|e| e.id.clone()).collect();
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
        for e in catalog.endpoints() {
            let Some(enis) = enis_of.get(&e.id) else { continue };
            let mut addrs: Vec<EndpointAddr> = enis.iter().filter_map(|n| addrs_of.get(n)).flatten().cloned().collect();
            addrs.sort_by(|a, b| (&a.az, a.ip).cmp(&(&b.az, b.ip)));
            metrics::gauge!("mskdns_vpc_endpoint_addresses", "endpoint" => e.id.clone()).set(addrs.len() as f64);
            if e.get().as_deref() != Some(&addrs) {
                tracing::info!(endpoint = %e.id, addresses = ?addrs.iter().map(|a| a.ip).collect::<Vec<_>>(), "VPC endpoint addresses");
            }
            e.set(addrs);
        }
    }
    if !subnets.is_empty() {
        let fail = |e| ("DescribeSubnets", format!("{}", DisplayErrorContext(e)));
        let out = client.describe_subnets().set_subnet_ids(Some(subnets.to_vec())).send().await.map_err(fail)?;
        for s in out.subnets() {
            let az: Vec<String> =
                [s.availability_zone(), s.availability_zone_id()].into_iter().flatten().map(str::to_owned).collect();
            for v in catalog.views().iter().filter(|v| v.subnet.as_deref() == s.subnet_id()) {
                v.set_az(az.clone());
            }
        }
    }
    Ok(())
}
