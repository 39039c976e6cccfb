//! The node id → port registry of one proxy: a broker listener per node, from `broker_ports`
//! first come (kept in the state file across restarts) or by node id (the same on every
//! instance), freed after the grace period. The state file also keeps the topic ids clients were
//! shown (topic_ids.rs).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Shared, accept_loop, rewrite};
use crate::config::PortAssignment;
use crate::proxy::bind_listener;

/// One node's port and where it leads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct NodeEntry {
    pub(super) port: u16,
    pub(super) upstream: String,
    #[serde(skip, default = "Instant::now")]
    seen: Instant,
    #[serde(skip)]
    stop: Option<CancellationToken>,
}

#[derive(Serialize, Deserialize, Default)]
pub(super) struct StateFile {
    version: u32,
    pub(super) nodes: BTreeMap<i32, NodeEntry>,
    /// Topic name → the id clients were shown last, in hex with hyphens (absent in files of
    /// older versions; one that does not parse is left out).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) topic_ids: BTreeMap<String, String>,
}

pub(super) fn load_state(path: &PathBuf) -> StateFile {
    match std::fs::read(path) {
        Ok(text) => match serde_json::from_slice::<StateFile>(&text) {
            Ok(s) if s.version == 1 => s,
            Ok(s) => {
                tracing::error!(file = %path.display(), version = s.version, "proxy state file of another version: ignored");
                StateFile::default()
            }
            Err(e) => {
                metrics::counter!("mskdns_proxy_state_errors_total").increment(1);
                tracing::error!(file = %path.display(), error = %e, "proxy state file unreadable: ignored");
                StateFile::default()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
        Err(e) => {
            metrics::counter!("mskdns_proxy_state_errors_total").increment(1);
            tracing::error!(file = %path.display(), error = %e, "proxy state file unreadable: ignored");
            StateFile::default()
        }
    }
}

impl Shared {
    /// Binds `port` for `node` and records it. Must not be called with `nodes` locked.
    pub(super) fn start_broker_listener(
        self: &Arc<Self>,
        node: i32,
        port: u16,
        upstream: String,
    ) -> std::io::Result<()> {
        let listener = bind_listener(SocketAddr::new(self.bind_ip, port))?;
        let stop = CancellationToken::new();
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node, NodeEntry { port, upstream, seen: Instant::now(), stop: Some(stop.clone()) });
        self.tasks.spawn(accept_loop(self.clone(), listener, super::Listener::Node(node), stop));
        self.ports_changed();
        Ok(())
    }

    /// After `nodes` changed: the port map responses are rewritten over, and the gauge.
    fn ports_changed(&self) {
        let map: HashMap<i32, u16> =
            self.nodes.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(n, e)| (*n, e.port)).collect();
        let n = map.len();
        self.port_map.store(Arc::new(map));
        metrics::gauge!("mskdns_proxy_broker_ports", "proxy" => self.label.clone()).set(n as f64);
    }

    /// Writes the state file (one writer at a time: they share its temporary file).
    pub(super) fn save_state(&self) {
        let Some(path) = &self.cfg.state_file else { return };
        let _one = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let nodes = match self.cfg.port_assignment {
            PortAssignment::FirstCome => self.nodes.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            PortAssignment::NodeId => BTreeMap::new(),
        };
        let topic_ids = self.shown.snapshot().into_iter().map(|(name, id)| (name, id.to_string())).collect();
        let text = match serde_json::to_vec_pretty(&StateFile { version: 1, nodes, topic_ids }) {
            Ok(t) => t,
            Err(e) => return tracing::error!(error = %e, "cannot encode the proxy state"),
        };
        let tmp = path.with_extension("tmp");
        let result = std::fs::write(&tmp, text)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            metrics::counter!("mskdns_proxy_state_errors_total").increment(1);
            tracing::error!(file = %path.display(), error = %e, "cannot write the proxy state file");
        }
    }

    /// The upstream address of `node` now (it may have moved since the listener was bound).
    pub(super) fn upstream_of(&self, node: i32) -> Option<String> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).get(&node).map(|e| e.upstream.clone())
    }
}

impl Shared {
    /// The port map responses are rewritten over now.
    pub(super) fn port_map(&self) -> Arc<HashMap<i32, u16>> {
        self.port_map.load_full()
    }

    /// Learns from the brokers a response named (`rewrite::Rewritten::nodes`): each is marked
    /// seen, one that moved gets its new address, one without a port gets one (its listener
    /// bound). Binding and writing the state file run on the blocking pool, never on the async
    /// threads. True when a node got a port: the response is rewritten again before it leaves.
    pub(super) async fn learn(self: &Arc<Self>, nodes: &[(i32, String)]) -> bool {
        let (new, moved) = self.mark_seen(nodes);
        if new.is_empty() && !moved {
            return false;
        }
        let shared = self.clone();
        let work = tokio::task::spawn_blocking(move || {
            let _one = shared.allocating.lock().unwrap_or_else(|e| e.into_inner());
            let added = new.into_iter().filter(|(node, upstream)| shared.allocate(*node, upstream)).count();
            if added > 0 || moved {
                shared.save_state();
            }
            added > 0
        });
        work.await.unwrap_or(false)
    }

    /// Marks the known nodes seen and records moves; the nodes with no port yet, and whether any
    /// moved.
    fn mark_seen(&self, nodes: &[(i32, String)]) -> (Vec<(i32, String)>, bool) {
        let mut known = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let (mut new, mut moved) = (Vec::new(), false);
        let now = Instant::now();
        for (node, upstream) in nodes {
            match known.get_mut(node) {
                Some(e) => {
                    e.seen = now;
                    if e.upstream != *upstream {
                        tracing::info!(proxy = %self.label, node, from = %e.upstream, to = %upstream, "broker moved");
                        e.upstream.clone_from(upstream);
                        moved = true;
                    }
                }
                None if !new.iter().any(|(n, _)| n == node) => new.push((*node, upstream.clone())),
                None => {}
            }
        }
        (new, moved)
    }

    /// Gives `node` a port from `broker_ports` (binding its listener); blocking. False when none is
    /// left (the node is then left out of responses).
    fn allocate(self: &Arc<Self>, node: i32, upstream: &str) -> bool {
        let used: Vec<u16> = {
            let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
            if nodes.contains_key(&node) {
                return true; // given meanwhile, by another response
            }
            nodes.values().map(|e| e.port).collect()
        };
        let range = self.cfg.broker_ports;
        if self.cfg.port_assignment == PortAssignment::NodeId {
            return self.node_id_port(node, upstream.to_owned(), &used).is_some();
        }
        for p in (range.first..=range.last).filter(|p| !used.contains(p)) {
            match self.start_broker_listener(node, p, upstream.to_owned()) {
                Ok(()) => {
                    metrics::counter!("mskdns_proxy_port_allocations_total", "proxy" => self.label.clone())
                        .increment(1);
                    tracing::info!(proxy = %self.label, node, port = p, upstream = %upstream, "broker port allocated");
                    return true;
                }
                // Taken by another process: try the next one.
                Err(e) => tracing::debug!(port = p, error = %e, "broker port not bindable"),
            }
        }
        metrics::counter!("mskdns_proxy_port_exhausted_total", "proxy" => self.label.clone()).increment(1);
        tracing::error!(
            proxy = %self.label, node, upstream = %upstream, broker_ports = ?range,
            "no free port in broker_ports for a new broker: it is left out of responses (widen broker_ports)"
        );
        false
    }
}

impl Shared {
    /// `port_assignment = "node_id"`: the port is a function of the node id alone, so every
    /// instance with this configuration gives a broker the same port.
    fn node_id_port(self: &Arc<Self>, node: i32, upstream: String, used: &[u16]) -> Option<u16> {
        let range = self.cfg.broker_ports;
        let size = range.last as i64 - range.first as i64 + 1;
        let p = (range.first as i64 + (node as i64).rem_euclid(size)) as u16;
        if used.contains(&p) {
            metrics::counter!("mskdns_proxy_port_collisions_total", "proxy" => self.label.clone()).increment(1);
            tracing::error!(
                proxy = %self.label, node, port = p, broker_ports = ?range,
                "another node id maps to this broker's port (node id modulo the size of broker_ports): it is left out of responses (widen broker_ports)"
            );
            return None;
        }
        // The listener was bound at start, with every port of the range.
        tracing::info!(proxy = %self.label, node, port = p, upstream = %upstream, "broker port assigned (node_id)");
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node, NodeEntry { port: p, upstream, seen: Instant::now(), stop: None });
        metrics::counter!("mskdns_proxy_port_allocations_total", "proxy" => self.label.clone()).increment(1);
        self.ports_changed();
        Some(p)
    }

    /// Where a listener leads now, without asking the cluster: its node's broker, else the
    /// cluster's bootstrap address (after a switch, a port the new cluster has no node for).
    pub(super) fn leads_to(&self, which: super::Listener, to: &super::Upstream) -> String {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let found = match which {
            super::Listener::Bootstrap => None,
            super::Listener::Node(n) => nodes.get(&n).map(|e| e.upstream.clone()),
            super::Listener::Port(p) => nodes.values().find(|e| e.port == p).map(|e| e.upstream.clone()),
        };
        found.unwrap_or_else(|| to.bootstrap.clone())
    }

    /// The upstream of the node on `port` (`port_assignment = "node_id"`); when no node is known
    /// there yet (no response naming it has passed this instance), the cluster is asked first.
    pub(super) async fn upstream_at(self: &Arc<Self>, port: u16) -> Option<String> {
        let find = || {
            self.nodes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .find(|e| e.port == port)
                .map(|e| e.upstream.clone())
        };
        if let Some(u) = find() {
            return Some(u);
        }
        self.learn_brokers().await;
        find()
    }

    /// Asks the cluster for its brokers (Metadata v4 for no topic, on the bootstrap address) and
    /// assigns each its port. One request at a time, at most one a second; a failure is logged
    /// and changes nothing. A SASL listener answers only after authentication, which the proxy
    /// cannot do: there, brokers are learned from the responses clients get.
    pub(super) async fn learn_brokers(self: &Arc<Self>) {
        let mut last = self.learned.lock().await;
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(std::time::Instant::now());
        let limit = Duration::from_millis(self.cfg.connect_timeout_ms + self.cfg.handshake_timeout_ms);
        match tokio::time::timeout(limit, ask_brokers(self)).await.unwrap_or(Err(format!("no answer within {limit:?}")))
        {
            Ok(brokers) => {
                tracing::info!(proxy = %self.label, brokers = brokers.len(), "brokers learned from the cluster");
                let nodes: Vec<(i32, String)> =
                    brokers.into_iter().map(|(node, host, port)| (node, rewrite::upstream_addr(&host, port))).collect();
                self.learn(&nodes).await;
            }
            Err(e) => {
                tracing::warn!(proxy = %self.label, upstream = %self.current.load().bootstrap, error = %e, "cannot ask the cluster for its brokers")
            }
        }
    }
}

/// One Metadata round trip with the bootstrap broker: (node id, host, port) of every broker.
async fn ask_brokers(shared: &Arc<Shared>) -> Result<Vec<(i32, String, i32)>, String> {
    use kafka_protocol::messages::MetadataRequest;
    // The oldest Metadata version Kafka 4 still serves (not flexible); an empty topic list (null
    // would be every topic): the brokers alone.
    let request = MetadataRequest::default().with_topics(Some(Vec::new())).with_allow_auto_topic_creation(false);
    let (_, m) = ask_metadata(shared, 4, request).await?;
    Ok(m.brokers.into_iter().map(|b| (b.node_id.0, b.host.to_string(), b.port)).collect())
}

impl Shared {
    /// Asks the cluster the proxy leads to for every topic's id (Metadata v12), so that ids are
    /// translated (topic_ids.rs) before clients reconnect and ask: after a switch, and at start
    /// when the state file kept ids. Best effort, as [`Shared::learn_brokers`]: a SASL listener
    /// answers nothing before authentication; clients' own Metadata requests teach the same.
    pub(super) async fn learn_topic_ids(self: &Arc<Self>) {
        use kafka_protocol::messages::MetadataRequest;
        let limit = Duration::from_millis(self.cfg.connect_timeout_ms + self.cfg.handshake_timeout_ms);
        let request = MetadataRequest::default().with_topics(None).with_allow_auto_topic_creation(false);
        let asked = tokio::time::timeout(limit, ask_metadata(self, 12, request));
        match asked.await.unwrap_or(Err(format!("no answer within {limit:?}"))) {
            Ok((to, m)) => {
                use super::topic_ids::Ids;
                let mut topics = m.topics;
                topics
                    .iter_mut()
                    .for_each(|t| to.ids.to_client(t.name.as_deref().map(|n| n.as_str()), &mut t.topic_id));
                let translated = to.ids.translated();
                tracing::info!(proxy = %self.label, upstream = %to.bootstrap, topics = topics.len(), translated, "topic ids learned from the cluster");
            }
            Err(e) => {
                tracing::warn!(proxy = %self.label, upstream = %self.current.load().bootstrap, error = %e, "cannot ask the cluster for its topic ids: clients' requests teach them")
            }
        }
    }
}

/// One Metadata request of `version` to the bootstrap broker of the cluster the proxy leads to
/// now, and that cluster with the response.
async fn ask_metadata(
    shared: &Arc<Shared>,
    version: i16,
    request: kafka_protocol::messages::MetadataRequest,
) -> Result<(Arc<super::switch::Upstream>, kafka_protocol::messages::MetadataResponse), String> {
    use bytes::{Buf, BytesMut};
    use kafka_protocol::messages::{ApiKey, MetadataResponse, RequestHeader, ResponseHeader};
    use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let to = shared.current.load_full();
    let mut s = super::connect(shared, &to, &to.bootstrap).await.map_err(|e| e.to_string())?;
    let mut body = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Metadata as i16)
        .with_request_api_version(version)
        .with_correlation_id(1)
        .with_client_id(Some(StrBytes::from_static_str("mskdns-proxy")))
        .encode(&mut body, ApiKey::Metadata.request_header_version(version))
        .map_err(|e| e.to_string())?;
    request.encode(&mut body, version).map_err(|e| e.to_string())?;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    s.write_all(&frame).await.map_err(|e| e.to_string())?;
    let mut size = [0u8; 4];
    s.read_exact(&mut size).await.map_err(|e| e.to_string())?;
    let n = crate::proxy::frame::frame_size(size, shared.cfg.max_frame_bytes).map_err(|e| e.to_string())?;
    // Read as it arrives: a declared size is not allocated before its bytes come.
    let mut buf = BytesMut::new();
    while buf.len() < n {
        buf.reserve((n - buf.len()).min(64 * 1024));
        let room = (n - buf.len()).min(buf.capacity() - buf.len());
        if (&mut s).take(room as u64).read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
            return Err(format!("the Metadata response ended after {} of {n} bytes", buf.len()));
        }
    }
    let mut buf = buf.freeze();
    let header = ResponseHeader::decode(&mut buf, ApiKey::Metadata.response_header_version(version))
        .map_err(|e| format!("Metadata response header: {e}"))?;
    if header.correlation_id != 1 {
        return Err(format!("response with correlation id {}", header.correlation_id));
    }
    let m = MetadataResponse::decode(&mut buf, version).map_err(|e| format!("Metadata response: {e}"))?;
    if buf.has_remaining() {
        tracing::debug!(left = buf.remaining(), "bytes after the Metadata response ignored");
    }
    Ok((to, m))
}

/// Frees the ports of brokers not seen in any response for `broker_grace_secs`.
pub(super) async fn sweep(shared: Arc<Shared>) {
    let grace = Duration::from_secs(shared.cfg.broker_grace_secs);
    let every = (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let gone: Vec<(i32, NodeEntry)> = {
            let mut nodes = shared.nodes.lock().unwrap_or_else(|e| e.into_inner());
            let old: Vec<i32> = nodes.iter().filter(|(_, e)| e.seen.elapsed() >= grace).map(|(n, _)| *n).collect();
            old.into_iter().filter_map(|n| nodes.remove(&n).map(|e| (n, e))).collect()
        };
        for (node, e) in &gone {
            if let Some(stop) = &e.stop {
                stop.cancel();
            }
            tracing::info!(proxy = %shared.label, node, port = e.port, "broker gone past the grace period: port freed");
        }
        if !gone.is_empty() {
            shared.ports_changed();
            shared.save_state();
        }
    }
}

/// Writes the topic ids clients were shown to the state file when they change: at most once a
/// second (a fleet's first Metadata requests name many topics), and once more at shutdown.
pub(super) async fn keep_topic_ids(shared: Arc<Shared>) {
    loop {
        let stop = tokio::select! {
            _ = shared.shown.wake.notified() => false,
            _ = shared.shutdown.cancelled() => true,
        };
        if !stop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shared.shutdown.cancelled() => {}
            }
        }
        if shared.shown.take_changed() {
            let s = shared.clone();
            let _ = tokio::task::spawn_blocking(move || s.save_state()).await;
        }
        if shared.shutdown.is_cancelled() {
            return;
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::Proxy;
    use super::*;
    use crate::config::{PortAssignment, PortRange, ProxyConfig};
    use crate::proxy::rewrite::Ports;
    use tokio_util::task::TaskTracker;

    pub(crate) fn config(grace: u64) -> ProxyConfig {
        let first = 40000 + (std::process::id() % 2000) as u16 * 10;
        ProxyConfig {
            mode: Default::default(),
            port_assignment: Default::default(),
            proxy_protocol: false,
            allow_endpoints: Vec::new(),
            proxy_protocol_from: Vec::new(),
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream: "127.0.0.1:9".into(),
            advertise_host: "kafka-proxy.test".into(),
            broker_ports: PortRange { first, last: first + 9 },
            broker_bind: None,
            state_file: None,
            broker_grace_secs: grace,
            max_frame_bytes: 1 << 20,
            idle_timeout_secs: 60,
            connect_timeout_ms: 2000,
            max_connections: 10,
            tls_cert: None,
            tls_key: None,
            upstream_tls: false,
            upstream_ca_file: None,
            upstream_tls_cert: None,
            upstream_tls_key: None,
            handshake_timeout_ms: 2000,
            allow: crate::config::default_allow(),
            max_connections_per_client: 10,
            first_request_timeout_ms: 1000,
            shutdown_grace_secs: 30,
            switch_drain_secs: 30,
        }
    }

    /// What a response naming `node` at `host:9098` leads to: the port it is rewritten to.
    async fn port_for(shared: &Arc<Shared>, node: i32, host: &str) -> Option<u16> {
        shared.learn(&[(node, rewrite::upstream_addr(host, 9098))]).await;
        shared.port_map().port_of(node)
    }

    /// The clock is tokio's, paused: the sweep's minute passes at once.
    #[tokio::test(start_paused = true)]
    async fn a_broker_unseen_for_the_grace_period_gives_its_port_back() {
        let cfg = config(60);
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let proxy = Proxy::bind(0, &cfg, tasks.clone(), shutdown.clone()).unwrap();
        let shared = proxy.shared.clone();
        tasks.spawn(proxy.run(tokio::sync::watch::channel(Default::default()).1, Arc::default()));
        let held = |node| shared.nodes.lock().unwrap().get(&node).map(|e| e.port);

        let port = port_for(&shared, 7, "10.0.0.7").await.expect("a port");
        assert!(cfg.broker_ports.contains(port));
        assert_eq!(port_for(&shared, 8, "10.0.0.8").await, Some(port + 1).filter(|p| cfg.broker_ports.contains(*p)));
        tokio::time::sleep(Duration::from_secs(40)).await;
        assert_eq!(port_for(&shared, 7, "10.0.0.7").await, Some(port), "seen again: the same port");
        tokio::time::sleep(Duration::from_secs(40)).await;
        // Node 8, unseen for 80 s, is gone; node 7, seen 40 s ago, stays.
        assert_eq!(held(7), Some(port));
        assert_eq!(held(8), None);
        // Its port is free again: a new broker can take it.
        tokio::time::sleep(Duration::from_secs(40)).await;
        assert_eq!(held(7), None);
        assert_eq!(port_for(&shared, 9, "10.0.0.9").await, Some(port));
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
    }

    #[tokio::test]
    async fn node_id_ports_depend_on_the_node_id_alone() {
        let mut cfg = config(60);
        cfg.port_assignment = PortAssignment::NodeId;
        let first = cfg.broker_ports.first;
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let proxy = Proxy::bind(0, &cfg, tasks.clone(), shutdown.clone()).unwrap();
        let shared = proxy.shared.clone();
        tasks.spawn(proxy.run(tokio::sync::watch::channel(Default::default()).1, Arc::default()));
        // Order of appearance does not matter: node 3 first, then node 1.
        assert_eq!(port_for(&shared, 3, "10.0.0.3").await, Some(first + 3));
        assert_eq!(port_for(&shared, 1, "10.0.0.1").await, Some(first + 1));
        assert_eq!(port_for(&shared, 3, "10.0.0.3").await, Some(first + 3));
        // MSK's large node ids wrap around the range.
        assert_eq!(port_for(&shared, 1004, "10.0.0.4").await, Some(first + 4));
        // Two ids on one port: the second is left out, not given another node's port.
        assert_eq!(port_for(&shared, 13, "10.0.0.13").await, None);
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
    }

    /// A switch to cluster B, for either assignment: every port leads to B's bootstrap at once; a
    /// node id B shares keeps its port and gets B's address once learned; a node only A had
    /// leads to B's bootstrap until its grace ends; B's new nodes get ports of their own.
    #[tokio::test(start_paused = true)]
    async fn after_a_switch_every_port_leads_to_the_new_cluster() {
        use super::super::Listener;
        for assignment in [PortAssignment::FirstCome, PortAssignment::NodeId] {
            let mut cfg = config(60);
            cfg.port_assignment = assignment;
            let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
            let proxy = Proxy::bind(0, &cfg, tasks.clone(), shutdown.clone()).unwrap();
            let shared = proxy.shared.clone();
            tasks.spawn(proxy.run(tokio::sync::watch::channel(Default::default()).1, Arc::default()));
            let p1 = port_for(&shared, 1, "127.0.1.1").await.unwrap();
            let p2 = port_for(&shared, 2, "127.0.1.2").await.unwrap();

            let mut b = cfg.clone();
            b.upstream = "127.0.2.100:9".into();
            shared.switch(&b, &Arc::default()).unwrap();
            let to = shared.current.load_full();
            for which in
                [Listener::Node(1), Listener::Node(2), Listener::Port(p1), Listener::Port(p2), Listener::Bootstrap]
            {
                assert_eq!(shared.leads_to(which, &to), "127.0.2.100:9", "{assignment:?}");
            }
            // B's metadata names its nodes 1 and 3.
            assert_eq!(port_for(&shared, 1, "127.0.2.1").await, Some(p1), "{assignment:?}: node 1 keeps its port");
            assert_eq!(shared.upstream_of(1).as_deref(), Some("127.0.2.1:9098"));
            let p3 = port_for(&shared, 3, "127.0.2.3").await.unwrap();
            assert!(![p1, p2].contains(&p3), "{assignment:?}");
            assert_eq!(shared.leads_to(Listener::Port(p2), &to), "127.0.2.100:9", "{assignment:?}: A's node 2");
            // Node 2, named by no response of B, gives its port back after the grace period.
            tokio::time::sleep(Duration::from_secs(130)).await;
            assert_eq!(shared.upstream_of(2), None, "{assignment:?}");
            shutdown.cancel();
            tasks.close();
            tasks.wait().await;
        }
    }
}
