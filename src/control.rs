//! The control plane: what the daemon serves is built from two sources, the configuration file
//! and the clusters discovery found. This module holds both, merges them (the file wins by
//! cluster key), is the only writer of the DNS engine's snapshots, and publishes the merged
//! configuration in force on a `watch` channel for everything else that follows it (discovery
//! reads its settings there, the proxy will read the served clusters). Discovery sources
//! publish what they found on a channel ([`Control::discovery_channel`]) and never see the
//! engine.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::{ClusterConfig, Config, EndpointAddr, EndpointState};
use crate::dns::Engine;
use crate::dns::engine::EngineError;

/// `config` with the discovered clusters added after its own, skipping any whose cluster key
/// the file (or an earlier discovered entry) already has.
pub fn merge_discovered(config: &Config, discovered: &[ClusterConfig]) -> Config {
    if discovered.is_empty() {
        return config.clone();
    }
    let key = |c: &ClusterConfig| crate::names::cluster_key(&c.bootstrap).ok().map(|k| k.0);
    let mut seen: HashSet<Vec<u8>> = config.clusters.iter().filter_map(key).collect();
    let mut merged = config.clone();
    merged.clusters.extend(discovered.iter().filter(|c| key(c).is_some_and(|k| seen.insert(k))).cloned());
    merged
}

/// The discovery sources, in the order their clusters are merged after the file's: for one
/// cluster key the file wins, then the earlier source here. MSK's own API answers before a
/// snapshot another instance published.
pub const SOURCES: [&str; 2] = ["msk", "snapshot"];

/// What EC2 is not asked for: the endpoints sources provide (with their addresses, once the
/// source has them), and subnet AZs. The file's own endpoints are always read from EC2.
#[derive(Debug, Default)]
pub struct Provided {
    endpoints: BTreeMap<String, Option<Vec<EndpointAddr>>>,
    subnets: BTreeMap<String, Vec<String>>,
}

struct Sources {
    file: Config,
    /// Each source's clusters, by its index in [`SOURCES`]: one source never replaces another's.
    discovered: [Arc<Vec<ClusterConfig>>; SOURCES.len()],
    /// Each source's own endpoint addresses and subnet AZs, if it has any.
    cells: [Option<EndpointState>; SOURCES.len()],
}

impl Sources {
    /// Every source's clusters, in [`SOURCES`] order.
    fn all(&self) -> Vec<ClusterConfig> {
        self.discovered.iter().flat_map(|d| d.iter().cloned()).collect()
    }

    /// The endpoints of the clusters of sources with cells, less those the file or a source
    /// without cells names (those are read from EC2), and the subnets sources know.
    fn provided(&self) -> Provided {
        let endpoint = |c: &ClusterConfig| c.vpc_endpoint.clone();
        let file = self.file.clusters.iter().chain(self.file.views.iter().flat_map(|v| v.clusters.iter()));
        let mut own: HashSet<String> = file.filter_map(endpoint).collect();
        for (d, cells) in self.discovered.iter().zip(&self.cells) {
            if cells.is_none() {
                own.extend(d.iter().filter_map(endpoint));
            }
        }
        let mut p = Provided::default();
        for (d, cells) in self.discovered.iter().zip(&self.cells) {
            let Some(cells) = cells else { continue };
            for id in d.iter().filter_map(endpoint).filter(|id| !own.contains(id)) {
                p.endpoints.entry(id.clone()).or_insert_with(|| cells.endpoints.get(&id).cloned());
            }
            for (subnet, az) in &cells.subnets {
                p.subnets.entry(subnet.clone()).or_insert_with(|| az.clone());
            }
        }
        p
    }
}

/// The index of a source's name in [`SOURCES`].
fn source_index(source: &str) -> usize {
    SOURCES.iter().position(|s| *s == source).unwrap_or_else(|| panic!("unknown discovery source {source}"))
}

pub struct Control {
    engine: Arc<Engine>,
    sources: Mutex<Sources>,
    published: watch::Sender<Arc<Config>>,
    provided: Arc<ArcSwap<Provided>>,
}

impl Control {
    /// Takes over `engine`, built from `file`.
    pub fn new(engine: Arc<Engine>, file: Config) -> Arc<Control> {
        let (published, _) = watch::channel(Arc::new(file.clone()));
        let sources = Sources { file, discovered: Default::default(), cells: Default::default() };
        Arc::new(Control { engine, sources: Mutex::new(sources), published, provided: Arc::default() })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The configuration in force, and its changes: the file's, with the discovered clusters.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.published.subscribe()
    }

    /// The configuration file's contents in force (without the discovered clusters).
    pub fn file_config(&self) -> Config {
        self.lock().file.clone()
    }

    /// The discovered clusters in force, every source's, in [`SOURCES`] order.
    pub fn discovered(&self) -> Vec<ClusterConfig> {
        self.lock().all()
    }

    /// A new file configuration; on error (the engine cannot be built from it) nothing changes.
    pub fn reload(&self, file: Config) -> Result<(), EngineError> {
        let mut s = self.lock();
        self.apply(&file, &s.all())?;
        s.file = file;
        self.provide(&s);
        Ok(())
    }

    /// Replaces the clusters `source` (one of [`SOURCES`]) discovered; other sources' stay.
    /// Clusters in the file (by cluster key) win over them, then earlier sources; a view's own
    /// entries win as they do over the file's top-level clusters.
    pub fn set_discovered(&self, source: &str, clusters: Vec<ClusterConfig>) -> Result<(), EngineError> {
        self.set_found(source, clusters, None)
    }

    /// [`Control::set_discovered`], with the endpoint addresses and subnet AZs the source
    /// knows itself (`None`: EC2 reads those of its clusters).
    pub fn set_found(
        &self,
        source: &str,
        clusters: Vec<ClusterConfig>,
        cells: Option<EndpointState>,
    ) -> Result<(), EngineError> {
        let i = source_index(source);
        let mut s = self.lock();
        if *s.discovered[i] != clusters {
            let previous = std::mem::replace(&mut s.discovered[i], Arc::new(clusters));
            if let Err(e) = self.apply(&s.file, &s.all()) {
                s.discovered[i] = previous;
                return Err(e);
            }
        }
        s.cells[i] = cells;
        self.provide(&s);
        Ok(())
    }

    /// Works out what sources provide and sets it in the engine's cells (a rebuild carries
    /// cells over by endpoint and view, but new ones start unread).
    fn provide(&self, s: &Sources) {
        let p = s.provided();
        let snap = self.engine.snapshot();
        for e in snap.catalog.endpoints() {
            if let Some(Some(addrs)) = p.endpoints.get(&e.id)
                && e.get().as_deref() != Some(addrs)
            {
                e.set(addrs.clone());
            }
        }
        for v in snap.catalog.views() {
            if let Some(az) = v.subnet.as_ref().and_then(|s| p.subnets.get(s))
                && v.az().as_deref() != Some(az)
            {
                v.set_az(az.clone());
            }
        }
        self.provided.store(Arc::new(p));
    }

    /// Where discovery source `source` publishes: each message replaces that source's clusters.
    /// Applied here, in one place: a map the engine cannot take is logged and counted, and the
    /// previous one stays.
    #[cfg(feature = "aws")]
    pub fn discovery_channel(
        self: &Arc<Self>,
        source: &'static str,
        tasks: &tokio_util::task::TaskTracker,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> crate::discovery::Discovered {
        source_index(source);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::discovery::Findings>(4);
        let control = self.clone();
        tasks.spawn(async move {
            loop {
                let found = tokio::select! {
                    c = rx.recv() => match c { Some(c) => c, None => return },
                    _ = shutdown.cancelled() => return,
                };
                if let Err(e) = control.set_found(source, found.clusters, found.cells) {
                    metrics::counter!("mskdns_discovery_apply_errors_total").increment(1);
                    tracing::error!(source, error = %e, "cannot apply the discovered clusters; the previous map stays");
                }
            }
        });
        crate::discovery::Discovered { config: self.subscribe(), found: tx }
    }

    fn apply(&self, file: &Config, discovered: &[ClusterConfig]) -> Result<(), EngineError> {
        let merged = merge_discovered(file, discovered);
        self.engine.apply(&merged)?;
        self.published.send_replace(Arc::new(merged));
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The EC2 cells of the engine's snapshot in force (its VPC endpoints' addresses, its views'
/// AZs), for the EC2 refresh: control's narrow handle, from [`Control::endpoints`]. A rebuild
/// carries the cells over, so setting one never rebuilds. Endpoints and subnets a discovery
/// source provides are not listed.
#[cfg(feature = "aws")]
pub struct EngineEndpoints(Arc<Engine>, Arc<ArcSwap<Provided>>);

#[cfg(feature = "aws")]
impl Control {
    /// The handle through which EC2 refreshes set endpoint addresses and subnet AZs.
    pub fn endpoints(&self) -> EngineEndpoints {
        EngineEndpoints(self.engine.clone(), self.provided.clone())
    }
}

#[cfg(feature = "aws")]
impl crate::discovery::ec2::Endpoints for EngineEndpoints {
    fn endpoints(&self) -> Vec<(String, Option<Arc<Vec<crate::config::EndpointAddr>>>)> {
        let provided = self.1.load();
        let snap = self.0.snapshot();
        let read = snap.catalog.endpoints().filter(|e| !provided.endpoints.contains_key(&e.id));
        read.map(|e| (e.id.clone(), e.get())).collect()
    }

    fn subnets(&self) -> Vec<(String, Option<Arc<Vec<String>>>)> {
        let snap = self.0.snapshot();
        let provided = self.1.load();
        let mut out: Vec<(String, Option<Arc<Vec<String>>>)> = Vec::new();
        for v in snap.catalog.views() {
            if let Some(s) = &v.subnet
                && !out.iter().any(|o| &o.0 == s)
                && !provided.subnets.contains_key(s)
            {
                out.push((s.clone(), v.az()));
            }
        }
        out
    }

    fn set_addresses(&self, endpoint: &str, addrs: Vec<crate::config::EndpointAddr>) {
        if let Some(e) = self.0.snapshot().catalog.endpoints().find(|e| e.id == endpoint) {
            e.set(addrs);
        }
    }

    fn set_az(&self, subnet: &str, az: Vec<String>) {
        for v in self.0.snapshot().catalog.views().iter().filter(|v| v.subnet.as_deref() == Some(subnet)) {
            v.set_az(az.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(bootstrap: &str, ip: &str) -> ClusterConfig {
        crate::config::parse_target(&format!("addresses={ip}"))
            .map(|c| ClusterConfig { bootstrap: bootstrap.into(), ..c })
            .unwrap()
    }

    const A: &str = "boot-aaaa1111.c1.kafka-serverless.us-east-1.amazonaws.com";
    const B: &str = "boot-bbbb2222.c1.kafka-serverless.us-east-1.amazonaws.com";

    fn control() -> Arc<Control> {
        let mut file = Config::default();
        file.dns.listen = vec!["127.0.0.1:0".parse().unwrap()];
        file.dns.upstreams = vec!["127.0.0.1:9".parse().unwrap()];
        file.clusters = vec![cluster(A, "10.0.0.1")];
        Control::new(Engine::from_config(&file).unwrap(), file)
    }

    #[test]
    fn the_file_wins_by_cluster_key_and_every_change_is_published() {
        let c = control();
        let mut rx = c.subscribe();
        c.set_discovered("msk", vec![cluster(A, "10.9.9.9"), cluster(B, "10.0.0.2")]).unwrap();
        assert!(rx.has_changed().unwrap());
        let now = rx.borrow_and_update().clone();
        let seen: Vec<_> = now.clusters.iter().map(|c| (c.bootstrap.as_str(), c.addresses[0].to_string())).collect();
        assert_eq!(seen, [(A, "10.0.0.1".to_string()), (B, "10.0.0.2".to_string())]);
        assert_eq!(c.engine().snapshot().catalog.cluster_count(), 2);

        // A reload keeps the discovered clusters; the file's own stay the file's.
        let mut file = c.file_config();
        file.clusters.clear();
        c.reload(file).unwrap();
        let now = rx.borrow_and_update().clone();
        assert_eq!(now.clusters.iter().map(|c| c.bootstrap.as_str()).collect::<Vec<_>>(), [A, B]);
        assert_eq!(now.clusters[0].addresses[0].to_string(), "10.9.9.9");
        assert!(c.file_config().clusters.is_empty());
        assert_eq!(c.discovered().len(), 2);
    }

    #[test]
    fn each_source_keeps_its_own_clusters_and_the_earlier_source_wins() {
        const C: &str = "boot-cccc3333.c1.kafka-serverless.us-east-1.amazonaws.com";
        let c = control();
        c.set_discovered("snapshot", vec![cluster(B, "10.0.8.2"), cluster(C, "10.0.8.3")]).unwrap();
        c.set_discovered("msk", vec![cluster(B, "10.0.0.2")]).unwrap();
        let addr = |name: &str| {
            let now = c.subscribe().borrow().clone();
            now.clusters.iter().find(|x| x.bootstrap == name).map(|x| x.addresses[0].to_string())
        };
        // MSK's answer for B wins over the snapshot's; the snapshot's C is not overwritten.
        assert_eq!(addr(B).as_deref(), Some("10.0.0.2"));
        assert_eq!(addr(C).as_deref(), Some("10.0.8.3"));
        assert_eq!(c.engine().snapshot().catalog.cluster_count(), 3);
        // MSK finding nothing leaves the snapshot's clusters in force.
        c.set_discovered("msk", Vec::new()).unwrap();
        assert_eq!(addr(B).as_deref(), Some("10.0.8.2"));
        assert_eq!(c.discovered().len(), 2);
    }

    #[cfg(feature = "aws")]
    #[test]
    fn endpoints_a_snapshot_provides_are_set_from_it_and_not_read_from_ec2() {
        use crate::discovery::ec2::Endpoints;
        const C: &str = "boot-cccc3333.c1.kafka-serverless.us-east-1.amazonaws.com";
        let vpce =
            |b: &str, id: &str| ClusterConfig { bootstrap: b.into(), ..crate::config::parse_target(id).unwrap() };
        let c = control();
        let addr = EndpointAddr { ip: "10.3.0.7".parse().unwrap(), az: "us-east-1a".into(), az_id: None };
        let cells = EndpointState {
            endpoints: [("vpce-0snap".to_owned(), vec![addr.clone()])].into(),
            ..EndpointState::default()
        };
        // The snapshot names two endpoints; it has the addresses of one (the publisher has not
        // read the other yet). MSK's own cluster names a third.
        let snapshot = vec![vpce(B, "vpce-0snap"), vpce(C, "vpce-0later")];
        c.set_found("snapshot", snapshot.clone(), Some(cells.clone())).unwrap();
        c.set_discovered("msk", vec![vpce("boot-dddd4444.c1.kafka-serverless.us-east-1.amazonaws.com", "vpce-0mine")])
            .unwrap();
        let handle = c.endpoints();
        let ec2_reads: Vec<String> = handle.endpoints().into_iter().map(|e| e.0).collect();
        assert_eq!(ec2_reads, ["vpce-0mine"]);
        let snap = c.engine().snapshot();
        let cell = |id: &str| snap.catalog.endpoints().find(|e| e.id == id).unwrap().get();
        assert_eq!(cell("vpce-0snap").as_deref(), Some(&vec![addr.clone()]));
        assert_eq!(cell("vpce-0later"), None);

        // The file naming the snapshot's endpoint itself: EC2 reads it.
        let mut file = c.file_config();
        file.clusters.push(vpce("boot-eeee5555.c1.kafka-serverless.us-east-1.amazonaws.com", "vpce-0snap"));
        c.reload(file).unwrap();
        let mut ec2_reads: Vec<String> = handle.endpoints().into_iter().map(|e| e.0).collect();
        ec2_reads.sort();
        assert_eq!(ec2_reads, ["vpce-0mine", "vpce-0snap"]);
    }

    #[test]
    fn the_same_discovered_map_twice_rebuilds_nothing() {
        let c = control();
        let mut rx = c.subscribe();
        c.set_discovered("msk", vec![cluster(B, "10.0.0.2")]).unwrap();
        rx.borrow_and_update();
        c.set_discovered("msk", vec![cluster(B, "10.0.0.2")]).unwrap();
        assert!(!rx.has_changed().unwrap());
    }

    #[cfg(feature = "aws")]
    #[tokio::test]
    async fn discovery_publishes_on_its_channel() {
        let c = control();
        let (tasks, shutdown) = (tokio_util::task::TaskTracker::new(), tokio_util::sync::CancellationToken::new());
        let d = c.discovery_channel("msk", &tasks, shutdown.clone());
        let mut rx = d.config.clone();
        let found = crate::discovery::Findings { clusters: vec![cluster(B, "10.0.0.2")], cells: None };
        d.found.send(found).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed()).await.unwrap().unwrap();
        assert_eq!(rx.borrow().clusters.len(), 2);
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
    }
}
