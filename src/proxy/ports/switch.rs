//! The live cluster switch: a reload that changes a ports-mode block's `upstream` (or its TLS
//! keys) moves clients to the new cluster without touching them. New connections go to the new
//! cluster at once; every broker port leads to the new cluster (a node it has to that node, any
//! other to its bootstrap address: Kafka clients recover from a wrong broker by refreshing
//! metadata, which then names the new cluster's brokers); open connections to the old cluster
//! leave in turn (paced), each at its next request boundary once the responses it is owed have
//! been sent, and are cut at `switch_drain_secs` at the latest.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::topic_ids::{Shown, TopicIds};
use crate::admin::Health;
use crate::config::{Config, ProxyBlock, ProxyConfig};

/// Closes per second after a switch at least; more when there are many connections, so that all
/// have had their turn by half the drain time. A fleet reconnecting all at once would hit the new
/// cluster's connection-rate limits (MSK limits new IAM connections per broker per second).
const MIN_LEAVES_PER_SEC: f64 = 100.0;

/// How a connection to a cluster the proxy switched away from ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Left {
    /// At its turn, with no response owed.
    Idle = 0,
    /// At the request boundary after its turn, once the responses it was owed were sent.
    Boundary = 1,
    /// At `switch_drain_secs`, with responses still owed.
    Cut = 2,
}

/// One cluster the proxy leads to: its bootstrap address and TLS, and the connections to it.
pub(super) struct Upstream {
    /// The cluster's bootstrap `host:port`.
    pub(super) bootstrap: String,
    /// TLS towards its brokers (`upstream_tls`).
    pub(super) connector: Option<TlsConnector>,
    /// Its topic ids next to those clients were shown (topic_ids.rs).
    pub(super) ids: TopicIds,
    /// Cancelled when the proxy switches away from it or shuts down (a child of shutdown).
    leaving: CancellationToken,
    /// Set when the switch away happens: the drain time, and the pause between turns.
    drain: AtomicU64,
    pace_nanos: AtomicU64,
    turns: AtomicU64,
    active: AtomicUsize,
    left: [AtomicU64; 3],
    label: String,
}

impl Upstream {
    pub(super) fn new(
        label: &str,
        bootstrap: String,
        connector: Option<TlsConnector>,
        shutdown: &CancellationToken,
        shown: Arc<Shown>,
    ) -> Self {
        Upstream {
            ids: TopicIds::new(label, shown),
            bootstrap,
            connector,
            leaving: shutdown.child_token(),
            drain: AtomicU64::new(0),
            pace_nanos: AtomicU64::new(0),
            turns: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            left: Default::default(),
            label: label.to_owned(),
        }
    }

    /// A connection to it: counted (and shown by upstream) while the guard lives.
    pub(super) fn enter(self: &Arc<Self>) -> Connected {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.gauge().increment(1.0);
        Connected(self.clone())
    }

    fn gauge(&self) -> metrics::Gauge {
        metrics::gauge!("mskdns_proxy_upstream_connections", "proxy" => self.label.clone(), "upstream" => self.bootstrap.clone())
    }

    pub(super) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Resolves when a connection to it is to read no more requests: at once on shutdown; after
    /// a switch, at the connection's turn.
    pub(super) async fn leave(&self, shutdown: &CancellationToken) {
        self.leaving.cancelled().await;
        if !shutdown.is_cancelled() {
            let turn = self.turns.fetch_add(1, Ordering::Relaxed);
            let pause = Duration::from_nanos(self.pace_nanos.load(Ordering::Relaxed).saturating_mul(turn));
            tokio::time::sleep(pause).await;
        }
    }

    /// Resolves when a connection to it is closed whatever it is owed: `shutdown_grace` after
    /// shutdown, the drain time after a switch.
    pub(super) async fn hard_stop(&self, shutdown: &CancellationToken, shutdown_grace: Duration) {
        self.leaving.cancelled().await;
        let grace = if shutdown.is_cancelled() {
            shutdown_grace
        } else {
            Duration::from_secs(self.drain.load(Ordering::Relaxed))
        };
        tokio::time::sleep(grace).await;
    }

    /// Counts how a connection left after a switch (not at shutdown).
    pub(super) fn record(&self, how: Left, shutdown: &CancellationToken) {
        if shutdown.is_cancelled() {
            return;
        }
        self.left[how as usize].fetch_add(1, Ordering::Relaxed);
        let label = ["idle", "boundary", "cut"][how as usize];
        metrics::counter!("mskdns_proxy_switch_closed_total", "proxy" => self.label.clone(), "how" => label)
            .increment(1);
    }

    /// The switch away: its connections take turns leaving, all by half of `drain`.
    fn start_leaving(&self, drain: Duration) {
        let n = self.active() as f64;
        let rate = (n / (drain.as_secs_f64() / 2.0).max(0.001)).max(MIN_LEAVES_PER_SEC);
        self.pace_nanos.store((1e9 / rate) as u64, Ordering::Relaxed);
        self.drain.store(drain.as_secs(), Ordering::Relaxed);
        self.ids.retire();
        self.leaving.cancel();
    }

    pub(super) fn left(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.left[i].load(Ordering::Relaxed))
    }
}

/// One connection to an upstream cluster.
pub(super) struct Connected(Arc<Upstream>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.gauge().decrement(1.0);
    }
}

impl Shared {
    /// Switches to the cluster `new` names: new connections and every broker port lead there;
    /// the old cluster's connections drain within `new.switch_drain_secs`.
    pub(super) fn switch(self: &Arc<Self>, new: &ProxyConfig, health: &Arc<Health>) -> Result<(), String> {
        let (_, connector) = super::tls_sides(new).map_err(|e| format!("{}.{e}", self.label))?;
        let next =
            Arc::new(Upstream::new(&self.label, new.upstream.clone(), connector, &self.shutdown, self.shown.clone()));
        let old = self.current.swap(next);
        let moved = self.lead_every_port_to(&new.upstream);
        let drain = Duration::from_secs(new.switch_drain_secs);
        let connections = old.active();
        old.start_leaving(drain);
        metrics::counter!("mskdns_proxy_switches_total", "proxy" => self.label.clone()).increment(1);
        tracing::info!(
            proxy = %self.label, from = %old.bootstrap, to = %new.upstream, connections, broker_ports = moved,
            drain_secs = drain.as_secs(),
            "switching clusters: new connections go to the new one, open ones drain"
        );
        let shared = self.clone();
        self.tasks.spawn(async move {
            *shared.learned.lock().await = None;
            tokio::join!(shared.learn_brokers(), shared.learn_topic_ids());
        });
        self.tasks.spawn(watch_drain(self.clone(), old, drain, health.clone()));
        Ok(())
    }

    /// Points every known broker port at `bootstrap` until the new cluster's own brokers are
    /// learned (a node id it shares keeps its port and gets its address); returns how many.
    fn lead_every_port_to(self: &Arc<Self>, bootstrap: &str) -> usize {
        let n = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
            for e in nodes.values_mut() {
                e.upstream = bootstrap.to_owned();
            }
            nodes.len()
        };
        let shared = self.clone();
        tokio::task::spawn_blocking(move || shared.save_state());
        n
    }
}

/// Logs what drained, and keeps `/readyz` degraded while the old cluster still has connections
/// past the drain time.
async fn watch_drain(shared: Arc<Shared>, old: Arc<Upstream>, drain: Duration, health: Arc<Health>) {
    let key = format!("{} switch", shared.label);
    let deadline = tokio::time::Instant::now() + drain;
    loop {
        if old.active() == 0 {
            let [idle, boundary, cut] = old.left();
            tracing::info!(
                proxy = %shared.label, from = %old.bootstrap, idle, at_request_boundary = boundary, cut_at_drain_time = cut,
                "switch drained: no connection left to the old cluster"
            );
            health.set_degraded(&key, None);
            return;
        }
        if tokio::time::Instant::now() >= deadline + Duration::from_secs(1) {
            health.set_degraded(
                &key,
                Some(format!("{} connections still on {} past switch_drain_secs", old.active(), old.bootstrap)),
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// Follows the configuration in force: a change of block `index` that is a switch is applied; any
/// other change of the block waits for a restart (the reload says so).
pub(super) async fn follow(
    shared: Arc<Shared>,
    index: usize,
    mut config: watch::Receiver<Arc<Config>>,
    health: Arc<Health>,
) {
    let mut applied = shared.cfg.clone();
    loop {
        tokio::select! {
            r = config.changed() => if r.is_err() { return },
            _ = shared.shutdown.cancelled() => return,
        }
        let now = config.borrow_and_update().clone();
        let Some(ProxyBlock::Ports(block)) = now.proxies.get(index) else { continue };
        if *block == applied || block.without_upstream() != applied.without_upstream() {
            continue;
        }
        if !applied.switches_to(block) {
            // Only switch_drain_secs: for the next switch.
            applied = block.clone();
            continue;
        }
        match shared.switch(block, &health) {
            Ok(()) => applied = block.clone(),
            Err(e) => {
                metrics::counter!("mskdns_proxy_switch_errors_total", "proxy" => shared.label.clone()).increment(1);
                tracing::error!(proxy = %shared.label, error = %e, "cannot switch clusters: the proxy stays on {}", applied.upstream);
            }
        }
    }
}
