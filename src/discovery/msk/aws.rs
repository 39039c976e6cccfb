//! The MSK and STS calls of discovery: listing clusters with their tags, their bootstrap names,
//! one client per account and region, and AWS errors mapped to what the log and metrics say.

use std::collections::HashMap;

use aws_sdk_kafka::Client;
use aws_sdk_kafka::types::{Cluster, ClusterState, ClusterType};

use super::{Found, Skipped};
use crate::config::{AwsDiscoveryConfig, parse_target};
use crate::discovery::driver::{ApiError, api_error};
use crate::names::first_msk_host;

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
    for c in clusters {
        let Some(arn) = c.cluster_arn().map(str::to_owned) else { continue };
        match examine(client, c, &arn, rules, bootstraps).await {
            Examined::Served { name, kind, bootstrap, target, target_from } => listing.found.push(Found {
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
            }),
            Examined::Skipped { name, reason, deselected, error } => {
                listing.skipped.push(Skipped { arn, name, reason, deselected });
                listing.errors.extend(error);
            }
            Examined::Unread(e) => listing.errors.push(e),
        }
    }
    Ok(listing)
}

/// What became of one listed cluster.
enum Examined {
    Served {
        name: String,
        kind: &'static str,
        bootstrap: String,
        target: String,
        target_from: String,
    },
    /// Not served: `deselected` when its tags no longer select it, `error` when a call failed.
    Skipped {
        name: String,
        reason: String,
        deselected: bool,
        error: Option<ApiError>,
    },
    /// Its tags could not be read.
    Unread(ApiError),
}

async fn examine(
    client: &Client,
    mut c: Cluster,
    arn: &str,
    rules: &Rules,
    bootstraps: &mut HashMap<String, String>,
) -> Examined {
    if c.tags().is_none() {
        // Some listings leave the tags out: ask for the cluster itself.
        match client.describe_cluster_v2().cluster_arn(arn).send().await {
            Ok(out) => c = out.cluster_info.unwrap_or(c),
            Err(e) => return Examined::Unread(api_error("DescribeClusterV2", e)),
        }
    }
    let name = c.cluster_name().unwrap_or_default().to_owned();
    let skip = |reason: String, deselected: bool, error: Option<ApiError>| Examined::Skipped {
        name: name.clone(),
        reason,
        deselected,
        error,
    };
    let empty = HashMap::new();
    let tags = c.tags().unwrap_or(&empty);
    if !rules.selects(tags) {
        let want = match &rules.tag_value {
            Some(v) => format!("{}={v}", rules.tag),
            None => rules.tag.clone(),
        };
        return skip(format!("not tagged {want}"), true, None);
    }
    let state = c.state().cloned();
    if matches!(state, Some(ClusterState::Deleting | ClusterState::Failed)) {
        return skip(format!("state {}", state.as_ref().map(|s| s.as_str()).unwrap_or("?")), false, None);
    }
    let (target, target_from) = match rules.target(tags) {
        Ok(t) => t,
        Err(m) => return skip(m, true, None),
    };
    let bootstrap = match bootstraps.get(arn) {
        Some(b) => b.clone(),
        None => match bootstrap_of(client, arn).await {
            Ok(Some(b)) => bootstraps.entry(arn.to_owned()).or_insert(b).clone(),
            Ok(None) => return skip("GetBootstrapBrokers returned no MSK broker name".into(), false, None),
            Err(e) => {
                // A cluster still being created has no brokers yet: not a failure of ours.
                let counted = (state != Some(ClusterState::Creating)).then(|| e.clone());
                return skip(e.to_string(), false, counted);
            }
        },
    };
    let kind = match c.cluster_type() {
        Some(ClusterType::Serverless) => "serverless",
        Some(ClusterType::Provisioned) => "provisioned",
        _ if bootstrap.contains(".kafka-serverless.") => "serverless",
        _ => "provisioned",
    };
    Examined::Served { name, kind, bootstrap, target, target_from }
}

/// The first MSK broker name GetBootstrapBrokers gives for `arn`, from any of its strings.
async fn bootstrap_of(client: &Client, arn: &str) -> Result<Option<String>, ApiError> {
    let out = client.get_bootstrap_brokers().cluster_arn(arn).send().await;
    let out = out.map_err(|e| api_error("GetBootstrapBrokers", e))?;
    let strings = [
        out.bootstrap_broker_string_sasl_iam(),
        out.bootstrap_broker_string_tls(),
        out.bootstrap_broker_string_sasl_scram(),
        out.bootstrap_broker_string(),
        out.bootstrap_broker_string_vpc_connectivity_sasl_iam(),
        out.bootstrap_broker_string_vpc_connectivity_tls(),
        out.bootstrap_broker_string_vpc_connectivity_sasl_scram(),
        // Dual-stack clusters: the same names, for clients connecting over IPv6; a cluster
        // whose names are only here is found all the same.
        out.bootstrap_broker_string_sasl_iam_ipv6(),
        out.bootstrap_broker_string_tls_ipv6(),
        out.bootstrap_broker_string_sasl_scram_ipv6(),
        out.bootstrap_broker_string_ipv6(),
    ];
    Ok(strings.into_iter().flatten().find_map(first_msk_host))
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
            self.base = Some(crate::discovery::aws_config().await);
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
