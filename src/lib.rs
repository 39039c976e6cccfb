//! mskdns: a DNS daemon that answers Amazon MSK broker names per cluster and forwards the rest.
//!
//! - [`names`]: the grammar of MSK Serverless and provisioned names, and the cluster keys in them.
//! - [`config`]: configuration (figment layering, validation that names the key).
//! - [`dns`]: wire format, the catalog of our own answers, the cache, the upstreams, the listeners.
//! - [`discovery`]: MSK clusters found through the MSK API; VPC endpoint addresses and subnet AZs from EC2.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`control`]: the file configuration and the discovered clusters, merged; the only writer of
//!   the engine's snapshots; the configuration in force published on a watch channel.
//! - [`reload`]: SIGHUP and file changes apply a new configuration, or keep the running one.
//!
//! [`Server::bind`] binds everything (port 0 allowed) so the caller can report the real ports,
//! then [`Server::run`] serves until the cancellation token fires.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod activation;
pub mod admin;
pub mod alloc;
pub mod config;
pub mod control;
#[cfg(feature = "aws")]
pub mod discovery;
pub mod dns;
pub mod limits;
pub mod names;
pub mod net;
pub mod panic;
pub mod proxy;
pub mod querylog;
pub mod reload;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Health, Render};
use crate::config::Config;
use crate::control::Control;
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
    #[error("dns.{key} {addr}: {source}")]
    BindSecure { key: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}

/// The TLS pairs of the DoT and DoH listeners (`dns.tls_cert`, `dns.tls_key`), loaded; `None`
/// when neither kind of listener is configured. ALPN: `dot` (RFC 7858), `h2` and `http/1.1`.
pub fn dns_terminators(config: &Config) -> Result<Option<(tls::Terminator, tls::Terminator)>, tls::TlsError> {
    let d = &config.dns;
    let (Some(cert), Some(key)) = (&d.tls_cert, &d.tls_key) else { return Ok(None) };
    if d.listen_dot.is_empty() && d.listen_doh.is_empty() {
        return Ok(None);
    }
    let keys = ("dns.tls_cert", "dns.tls_key");
    let dot = tls::Terminator::load_with(cert, key, keys, vec![b"dot".to_vec()])?;
    let doh = tls::Terminator::load_with(cert, key, keys, vec![b"h2".to_vec(), b"http/1.1".to_vec()])?;
    Ok(Some((dot, doh)))
}

/// Everything bound and built, not yet serving.
pub struct Server {
    engine: Arc<Engine>,
    control: Arc<Control>,
    listeners: Vec<Listener>,
    /// DoT then DoH listeners, in the order of `dns.listen_dot` and `dns.listen_doh`.
    secure: Vec<(tokio::net::TcpListener, server::Secure)>,
    admin: tokio::net::TcpListener,
    tcp_limits: TcpLimits,
    udp_threads: usize,
    #[cfg_attr(not(feature = "aws"), allow(dead_code))]
    ec2_refresh: Duration,
    config: Config,
    pub health: Arc<Health>,
    proxies: Vec<proxy::Bound>,
    /// Every task of the daemon, the proxies' included.
    tasks: TaskTracker,
    /// The root of every cancellation: the proxies hold child tokens of it.
    shutdown: CancellationToken,
    /// Discovered clusters read from the snapshot before serving.
    #[cfg(feature = "aws")]
    msk: discovery::msk::Msk,
    /// The fleet snapshot's reader, its saved copy read before serving.
    #[cfg(feature = "aws")]
    fleet: discovery::fleet::reader::Snapshot,
}

impl Server {
    /// Builds the engine and binds every listener. Must run inside a tokio runtime.
    pub fn bind(config: &Config) -> Result<Self, StartError> {
        panic::install_hook();
        let engine = Engine::from_config(config)?;
        let control = Control::new(engine.clone(), config.clone());
        let listeners = config
            .dns
            .listen
            .iter()
            .map(|&addr| server::bind(addr).map_err(|source| StartError::BindDns { addr, source }))
            .collect::<Result<_, _>>()?;
        let mut secure = Vec::new();
        if let Some((dot, doh)) = dns_terminators(config)? {
            let handshake_timeout = Duration::from_millis(config.dns.tls_handshake_timeout_ms);
            let settings = Arc::new(dns::doh::DohSettings {
                path: config.dns.doh_path.clone(),
                max_streams: config.dns.doh_max_streams,
            });
            let kinds = [
                ("listen_dot", &config.dns.listen_dot, Arc::new(dot), server::Inside::Dot),
                ("listen_doh", &config.dns.listen_doh, Arc::new(doh), server::Inside::Doh(settings)),
            ];
            for (key, addrs, terminator, inside) in kinds {
                for &addr in addrs {
                    let l = server::bind_stream(addr).map_err(|source| StartError::BindSecure { key, addr, source })?;
                    let s =
                        server::Secure { terminator: terminator.clone(), handshake_timeout, inside: inside.clone() };
                    secure.push((l, s));
                }
            }
        }
        let addr = config.admin.listen;
        let admin = net::bind_tcp(addr, || std::net::TcpListener::bind(addr))
            .map_err(|source| StartError::BindAdmin { addr, source })?;
        let tcp_limits = TcpLimits {
            max_connections: config.dns.max_tcp_connections,
            max_per_client: config.dns.max_tcp_connections_per_client,
            idle_timeout: Duration::from_millis(config.dns.tcp_idle_timeout_ms),
            write_timeout: Duration::from_millis(config.dns.tcp_write_timeout_ms),
            nodelay: config.dns.tcp_nodelay,
        };
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let proxies = proxy::bind_all(&config.proxies, &engine, &tasks, &shutdown.child_token())?;
        let health: Arc<Health> = Arc::default();
        // A restart with AWS unreachable answers the discovered clusters from the first query.
        #[cfg(feature = "aws")]
        let msk = restore_source(discovery::msk::Msk::new(), config, &control, &health);
        #[cfg(feature = "aws")]
        let fleet = restore_source(discovery::fleet::reader::Snapshot::new(), config, &control, &health);
        #[cfg(feature = "aws")]
        discovery::ec2::restore(&control.endpoints(), &health, config.ec2_state_dir());
        Ok(Server {
            engine,
            control,
            listeners,
            secure,
            admin,
            tcp_limits,
            udp_threads: config.dns.udp_threads(),
            ec2_refresh: Duration::from_secs(config.aws.refresh_secs),
            config: config.clone(),
            health,
            proxies,
            tasks,
            shutdown,
            #[cfg(feature = "aws")]
            msk,
            #[cfg(feature = "aws")]
            fleet,
        })
    }

    /// The DNS addresses actually bound (UDP and TCP share each).
    pub fn dns_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// The DoT (`"dot"`) and DoH (`"doh"`) addresses actually bound.
    pub fn secure_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        self.secure.iter().filter_map(|(l, s)| Some((s.transport().label(), l.local_addr().ok()?))).collect()
    }

    /// Each `[[proxies]]` block's client-facing addresses, as bound (a bootstrap listener, or
    /// every SNI listener).
    pub fn proxy_addrs(&self) -> Vec<SocketAddr> {
        self.proxies.iter().flat_map(|p| p.local_addrs()).collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Cancelling it stops the daemon (the caller's signal handlers hold it).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until [`Server::shutdown_token`] fires, then waits a bounded time for misses in
    /// flight. With the config file's path, SIGHUP and changes to the file reload it.
    /// `on_ready` is called once everything serves (and /readyz says so).
    pub async fn run(self, render: Render, config_path: Option<std::path::PathBuf>, on_ready: impl FnOnce()) {
        let (tasks, shutdown) = (self.tasks.clone(), self.shutdown.clone());
        let nofile = server::raise_nofile_limit();
        let limit = server::inflight_limit(self.config.dns.max_inflight, nofile);
        metrics::gauge!("mskdns_open_files_limit").set(nofile as f64);
        metrics::gauge!("mskdns_inflight_limit").set(limit as f64);
        tracing::info!(open_files = nofile, inflight = limit, "limits");
        self.engine.limit_inflight(limit);
        let ctx = Serving {
            engine: self.engine.clone(),
            limits: self.tcp_limits,
            gate: server::StreamGate::new(&self.tcp_limits, self.config.dns.tcp_per_client_exempt.clone()),
            health: self.health.clone(),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
        };
        // On before any listener serves: a configured log holds every query from the first.
        let log = self.config.query_log.as_ref().map(|q| querylog::start(&self.engine, &self.config, q, &tasks));
        ctx.secure(self.secure, self.listeners.len());
        let threads = ctx.plain(self.listeners, self.udp_threads);
        tasks.spawn(report_budgets(self.engine.clone(), self.health.clone(), shutdown.clone()));
        tasks.spawn(querylog::follow(
            self.engine.clone(),
            self.control.subscribe(),
            tasks.clone(),
            shutdown.clone(),
            log,
        ));
        if let Some(path) = config_path {
            tasks.spawn(reload::run(
                self.control.clone(),
                path,
                self.config.clone(),
                self.health.clone(),
                Duration::from_secs(self.config.reload.poll_secs),
                shutdown.clone(),
            ));
        }
        #[cfg(feature = "aws")]
        {
            let cells = Arc::new(self.control.endpoints());
            let config = self.control.subscribe();
            tasks.spawn(discovery::ec2::run(cells, config, self.health.clone(), self.ec2_refresh, shutdown.clone()));
            use discovery::driver::Source;
            let passes = self.msk.passes();
            let cells: Arc<dyn discovery::ec2::Endpoints> = Arc::new(self.control.endpoints());
            let config = self.control.subscribe();
            let health = self.health.clone();
            tasks.spawn(discovery::fleet::publisher::run(passes, config, cells, health, shutdown.clone()));
            let to = self.control.discovery_channel(discovery::msk::Msk::NAME, &tasks, shutdown.clone());
            tasks.spawn(discovery::driver::run(self.msk, to, self.health.clone(), shutdown.clone()));
            let to = self.control.discovery_channel(discovery::fleet::reader::Snapshot::NAME, &tasks, shutdown.clone());
            tasks.spawn(discovery::driver::run(self.fleet, to, self.health.clone(), shutdown.clone()));
        }
        ctx.admin(self.admin, proxy::with_client_connections(render, &self.proxies));
        for p in self.proxies {
            tasks.spawn(p.run(self.control.subscribe(), self.health.clone()));
        }
        #[cfg(feature = "aws")]
        discovery::ec2::mark_unread(&self.control.endpoints(), &self.health);
        self.health.set_serving(true);
        on_ready();
        tracing::info!(
            clusters = self.engine.snapshot().catalog.cluster_count(),
            upstreams = ?self.engine.upstream_addrs(),
            "serving"
        );
        shutdown.cancelled().await;
        self.health.set_serving(false);
        let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
        tasks.close();
        self.engine.tasks().close();
        // DNS: the misses in flight; the proxies: their shutdown grace (connections drain).
        let proxies = self.config.proxies.iter().map(|p| p.shutdown_grace()).max().unwrap_or_default();
        let grace = (self.engine.resolve_deadline() + Duration::from_secs(1)).max(proxies + Duration::from_secs(1));
        let all = async { tokio::join!(tasks.wait(), self.engine.tasks().wait()) };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(?grace, "tasks still running at the end of the shutdown grace period");
        }
    }
}

/// What every DNS listener is started with: a listener kind is one method here.
struct Serving {
    engine: Arc<Engine>,
    limits: TcpLimits,
    gate: Arc<server::StreamGate>,
    health: Arc<Health>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Serving {
    /// DoT and DoH listeners (their indices follow the `dns.listen` ones), and the watcher of
    /// their certificate files.
    fn secure(&self, secure: Vec<(tokio::net::TcpListener, server::Secure)>, first: usize) {
        let mut terminators: Vec<Arc<tls::Terminator>> = Vec::new();
        for (i, (l, secure)) in secure.into_iter().enumerate() {
            if !terminators.iter().any(|t| Arc::ptr_eq(t, &secure.terminator)) {
                terminators.push(secure.terminator.clone());
            }
            let listener = first + i;
            let kind = secure.transport().label();
            let serve = self.stream(l, listener, Some(secure));
            supervise(&self.tasks, &self.health, &self.shutdown, format!("dns {kind} listener {listener}"), serve);
        }
        if !terminators.is_empty() {
            self.tasks.spawn(watch_dns_certificates(terminators, self.shutdown.clone()));
        }
    }

    /// UDP (`udp_threads` threads per address, returned to be joined) and TCP on every `dns.listen`.
    fn plain(&self, listeners: Vec<Listener>, udp_threads: usize) -> Vec<std::thread::JoinHandle<()>> {
        let mut threads = Vec::new();
        for (listener, l) in listeners.into_iter().enumerate() {
            let sock = Arc::new(l.udp);
            for index in 0..udp_threads {
                let worker = dns::udp::Worker {
                    index,
                    listener,
                    engine: self.engine.clone(),
                    sock: sock.clone(),
                    runtime: tokio::runtime::Handle::current(),
                    tasks: self.tasks.clone(),
                    shutdown: self.shutdown.clone(),
                    health: self.health.clone(),
                };
                match std::thread::Builder::new().name("mskdns-udp".into()).spawn(move || worker.run()) {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a UDP thread; shutting down");
                        self.shutdown.cancel();
                    }
                }
            }
            let tcp = self.stream(l.tcp, listener, None);
            supervise(&self.tasks, &self.health, &self.shutdown, format!("dns tcp listener {listener}"), tcp);
        }
        threads
    }

    fn stream(
        &self,
        l: tokio::net::TcpListener,
        index: usize,
        secure: Option<server::Secure>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (engine, gate, shutdown, tasks) =
            (self.engine.clone(), self.gate.clone(), self.shutdown.clone(), self.tasks.clone());
        server::serve_tcp(engine, l, index, self.limits, gate, secure, shutdown, tasks)
    }

    /// `/metrics`, `/healthz`, `/readyz`; the cache's and the in-flight gauges are read when metrics
    /// are rendered.
    fn admin(&self, admin: tokio::net::TcpListener, render: Render) {
        let engine = self.engine.clone();
        let (cache_entries, cache_bytes, front_reserved, inflight) = (
            metrics::gauge!("mskdns_cache_entries"),
            metrics::gauge!("mskdns_cache_bytes"),
            metrics::gauge!("mskdns_cache_front_reserved_bytes"),
            metrics::gauge!("mskdns_inflight"),
        );
        let render: Render = Arc::new(move || {
            let (entries, bytes, reserved) = engine.cache_usage();
            cache_entries.set(entries as f64);
            cache_bytes.set(bytes as f64);
            front_reserved.set(reserved as f64);
            inflight.set(engine.inflight() as f64);
            render()
        });
        let (health, shutdown) = (self.health.clone(), self.shutdown.clone());
        self.tasks.spawn(async move {
            if let Err(e) = admin::serve(admin, render, health, shutdown.clone()).await {
                tracing::error!(error = %e, "admin endpoint failed; shutting down");
                shutdown.cancel();
            }
        });
    }
}

/// Runs a listener's accept loop; one that ends or panics before shutdown is logged and marks
/// `/healthz` failed with its name (the process goes on serving what it still can).
/// Reads a discovery source's snapshot (if its settings name one) and puts its clusters in force,
/// so that a restart with AWS unreachable answers them from the first query.
#[cfg(feature = "aws")]
fn restore_source<S: discovery::driver::Source>(
    mut source: S,
    config: &Config,
    control: &Control,
    health: &Health,
) -> S {
    if let Some(s) = S::settings(config) {
        discovery::driver::restore(&mut source, &s, health);
        if let Err(e) = control.set_found(S::NAME, source.clusters(&s), source.cells(&s)) {
            tracing::error!(source = S::NAME, error = %e, "cannot apply the restored discovered clusters");
        }
    }
    source
}

/// Shows each upstream packet budget that binds (refused a packet in the last two seconds) as a
/// degradation on /readyz, naming the upstream; checked every second.
async fn report_budgets(engine: Arc<Engine>, health: Arc<Health>, shutdown: CancellationToken) {
    let mut shown: Vec<String> = Vec::new();
    loop {
        let snap = engine.snapshot();
        let mut now = Vec::new();
        for b in snap.catalog.budgets() {
            let key = format!("upstream {}", b.label);
            let reason = b.binding().then(|| {
                format!(
                    "at its packet budget of {}/s (dns.upstream_max_pps): misses past it answered stale or SERVFAIL",
                    b.limit
                )
            });
            if reason.is_some() {
                now.push(key.clone());
            }
            health.set_degraded(&key, reason);
        }
        for gone in shown.iter().filter(|k| !now.contains(k)) {
            health.set_degraded(gone, None);
        }
        shown = now;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

fn supervise(
    tasks: &TaskTracker,
    health: &Arc<Health>,
    shutdown: &CancellationToken,
    name: String,
    serve: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (health, shutdown) = (health.clone(), shutdown.clone());
    tasks.spawn(async move {
        let ended = panic::guarded(serve).await;
        if !shutdown.is_cancelled() {
            let why = match ended {
                Ok(()) => "the accept loop ended".to_string(),
                Err(e) => format!("the accept loop panicked: {e}"),
            };
            tracing::error!(listener = %name, "{why}");
            health.set_lost(&name, Some(why));
        }
    });
}

/// Picks up a renewed `dns.tls_cert`/`dns.tls_key` pair; one that does not load keeps the previous.
async fn watch_dns_certificates(terminators: Vec<Arc<tls::Terminator>>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tls::WATCH_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        for t in &terminators {
            match t.refresh() {
                Ok(true) => tracing::info!("dns.tls_cert reloaded: new DoT/DoH connections use it"),
                Ok(false) => {}
                Err(e) => {
                    metrics::counter!("mskdns_tls_reload_errors_total", "listener" => "dns").increment(1);
                    tracing::error!(error = %e, "dns TLS certificate not reloaded: the previous one stays");
                }
            }
        }
    }
}
