//! mskdns: a DNS daemon that answers Amazon MSK broker names per cluster and forwards the rest.
//!
//! - [`names`]: the grammar of MSK Serverless and provisioned names, and the cluster keys in them.
//! - [`config`]: configuration (figment layering, validation that names the key).
//! - [`dns`]: wire format, the catalog of our own answers, the cache, the upstreams, the listeners.
//! - [`discovery`]: MSK clusters found through the MSK API; VPC endpoint addresses and subnet AZs from EC2.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`reload`]: SIGHUP and file changes apply a new configuration, or keep the running one.
//!
//! [`Server::bind`] binds everything (port 0 allowed) so the caller can report the real ports,
//! then [`Server::run`] serves until the cancellation token fires.

pub mod admin;
pub mod alloc;
pub mod config;
#[cfg(feature = "aws")]
pub mod discovery;
pub mod dns;
pub mod names;
pub mod proxy;
pub mod reload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Health, Render};
use crate::config::Config;
use crate::dns::Engine;
use crate::dns::server::{self, Listener, TcpLimits};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Engine(#[from] dns::engine::EngineError),
    #[error("dns.listen {addr}: {source}")]
    BindDns { addr: SocketAddr, source: std::io::Error },
    #[error("admin.listen {addr}: {source}")]
    BindAdmin { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
}

/// Everything bound and built, not yet serving.
pub struct Server {
    engine: Arc<Engine>,
    listeners: Vec<Listener>,
    admin: tokio::net::TcpListener,
    tcp_limits: TcpLimits,
    udp_threads: usize,
    #[cfg_attr(not(feature = "aws"), allow(dead_code))]
    ec2_refresh: Duration,
    config: Config,
    pub health: Arc<Health>,
    proxies: Vec<proxy::Proxy>,
    proxy_tasks: TaskTracker,
    proxy_shutdown: CancellationToken,
    /// Discovered clusters read from the snapshot before serving.
    #[cfg(feature = "aws")]
    restored: Vec<discovery::msk::Found>,
}

impl Server {
    /// Builds the engine and binds every listener. Must run inside a tokio runtime.
    pub fn bind(config: &Config) -> Result<Self, StartError> {
        let engine = Engine::from_config(config)?;
        let listeners = config
            .dns
            .listen
            .iter()
            .map(|&addr| server::bind(addr).map_err(|source| StartError::BindDns { addr, source }))
            .collect::<Result<_, _>>()?;
        let addr = config.admin.listen;
        let admin = std::net::TcpListener::bind(addr)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .map_err(|source| StartError::BindAdmin { addr, source })?;
        let tcp_limits = TcpLimits {
            max_connections: config.dns.max_tcp_connections,
            idle_timeout: Duration::from_millis(config.dns.tcp_idle_timeout_ms),
        };
        let (proxy_tasks, proxy_shutdown) = (TaskTracker::new(), CancellationToken::new());
        let proxies = proxy::bind_all(&config.proxies, &proxy_tasks, &proxy_shutdown)?;
        let health: Arc<Health> = Arc::default();
        // A restart with AWS unreachable answers the discovered clusters from the first query.
        #[cfg(feature = "aws")]
        let restored = match &config.discovery.aws {
            Some(d) => discovery::msk::restore(&engine, &health, d),
            None => Vec::new(),
        };
        Ok(Server {
            engine,
            listeners,
            admin,
            tcp_limits,
            udp_threads: config.dns.udp_threads(),
            ec2_refresh: Duration::from_secs(config.aws.refresh_secs),
            config: config.clone(),
            health,
            proxies,
            proxy_tasks,
            proxy_shutdown,
            #[cfg(feature = "aws")]
            restored,
        })
    }

    /// The DNS addresses actually bound (UDP and TCP share each).
    pub fn dns_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// Each `[[proxies]]` block's bootstrap address, as bound.
    pub fn proxy_addrs(&self) -> Vec<SocketAddr> {
        self.proxies.iter().filter_map(|p| p.local_addr()).collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Serves until `shutdown` fires, then waits a bounded time for misses in flight. With the
    /// config file's path, SIGHUP and changes to the file reload it.
    pub async fn run(self, render: Render, shutdown: CancellationToken, config_path: Option<std::path::PathBuf>) {
        let tasks = TaskTracker::new();
        let inflight = Arc::new(tokio::sync::Semaphore::new(server::MAX_INFLIGHT_MISSES));
        let mut threads = Vec::new();
        for (listener, l) in self.listeners.into_iter().enumerate() {
            let sock = Arc::new(l.udp);
            for index in 0..self.udp_threads {
                let worker = dns::udp::Worker {
                    index,
                    listener,
                    engine: self.engine.clone(),
                    sock: sock.clone(),
                    runtime: tokio::runtime::Handle::current(),
                    tasks: tasks.clone(),
                    inflight: inflight.clone(),
                    shutdown: shutdown.clone(),
                };
                match std::thread::Builder::new().name("mskdns-udp".into()).spawn(move || worker.run()) {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a UDP thread; shutting down");
                        shutdown.cancel();
                    }
                }
            }
            tasks.spawn(server::serve_tcp(
                self.engine.clone(),
                l.tcp,
                listener,
                self.tcp_limits,
                shutdown.clone(),
                tasks.clone(),
            ));
        }
        if let Some(path) = config_path {
            tasks.spawn(reload::run(
                self.engine.clone(),
                path,
                self.config.clone(),
                self.health.clone(),
                Duration::from_secs(self.config.reload.poll_secs),
                shutdown.clone(),
            ));
        }
        #[cfg(feature = "aws")]
        tasks.spawn(discovery::ec2::run(self.engine.clone(), self.health.clone(), self.ec2_refresh, shutdown.clone()));
        #[cfg(feature = "aws")]
        tasks.spawn(discovery::msk::run(self.engine.clone(), self.health.clone(), self.restored, shutdown.clone()));
        let engine = self.engine.clone();
        let cache_entries = metrics::gauge!("mskdns_cache_entries");
        let render: Render = Arc::new(move || {
            cache_entries.set(engine.cache_entries() as f64);
            render()
        });
        let (health, admin_shutdown) = (self.health.clone(), shutdown.clone());
        let admin = self.admin;
        tasks.spawn(async move {
            if let Err(e) = admin::serve(admin, render, health, admin_shutdown.clone()).await {
                tracing::error!(error = %e, "admin endpoint failed; shutting down");
                admin_shutdown.cancel();
            }
        });
        for p in self.proxies {
            self.proxy_tasks.spawn(p.run());
        }
        #[cfg(feature = "aws")]
        discovery::ec2::mark_unread(&self.engine.snapshot().catalog, &self.health);
        self.health.set_serving(true);
        tracing::info!(
            clusters = self.engine.snapshot().catalog.cluster_count(),
            upstreams = ?self.engine.upstream_addrs(),
            "serving"
        );
        shutdown.cancelled().await;
        self.health.set_serving(false);
        self.proxy_shutdown.cancel();
        self.proxy_tasks.close();
        let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
        tasks.close();
        let grace = self.engine.resolve_deadline() + Duration::from_secs(1);
        if tokio::time::timeout(grace, async { tokio::join!(tasks.wait(), self.proxy_tasks.wait()) }).await.is_err() {
            tracing::warn!(?grace, "tasks still running at the end of the shutdown grace period");
        }
    }
}
