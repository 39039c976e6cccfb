//! The mskdns binary: arguments, logging, the metrics recorder, signals; the rest is the library.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mskdns::config::{Config, LogFormat};
use tokio_util::sync::CancellationToken;

// Cache entries are allocated on tokio threads and freed on UDP threads; glibc's per-thread
// arenas held twice the memory for the same cache (195 vs 84 MiB at 100k entries).
// Blocks of 1 GiB or more are reserved address space, so that a hostile array count in a Kafka
// response is a decode error rather than an aborted process (see mskdns::alloc).
#[global_allocator]
static GLOBAL: mskdns::alloc::Allocator = mskdns::alloc::Allocator;

#[derive(Parser)]
#[command(version, about = "DNS for Amazon MSK: per-cluster answers for broker names, cached forwarding for the rest")]
struct Cli {
    /// Config file (TOML). Without one, the built-in default: 127.0.0.1:5353, upstreams from /etc/resolv.conf.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file; exits non-zero with a message naming the bad key.
    Check { file: PathBuf },
    /// Show which view, cluster and target answer NAME, and why (uses --config).
    Explain {
        name: String,
        /// The client's address (chooses views by client network).
        #[arg(long, default_value = "127.0.0.1")]
        client: std::net::IpAddr,
        /// The dns.listen entry the query arrives on (chooses views by listener).
        #[arg(long)]
        listener: Option<std::net::SocketAddr>,
    },
    /// List the clusters `[discovery.aws]` finds (or `[discovery.snapshot]` holds) and what each
    /// would be answered with (uses --config). Reads only: writes no state file, changes nothing.
    /// Exits 1 if a call failed or the snapshot cannot be read.
    #[cfg(feature = "aws")]
    Discover {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// Publish what `[discovery.aws]` finds to this S3 object (for readers' `[discovery.snapshot]`)
        /// and exit; nothing is written if any call failed.
        #[arg(long, value_name = "s3://BUCKET/KEY")]
        publish: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Check { file }) = &cli.command {
        let config = Config::load(Some(file))?;
        mskdns::dns::catalog::Catalog::from_config(&config)?;
        mskdns::proxy::check_tls(&config.proxies)?;
        mskdns::dns_terminators(&config)?;
        println!("{}: ok ({} clusters, {} zones)", file.display(), config.clusters.len(), config.zones.len());
        return Ok(());
    }
    let config = Config::load(cli.config.as_deref())?;
    if let Some(Command::Explain { name, client, listener }) = &cli.command {
        let index = match listener {
            Some(l) => Some(
                config
                    .dns
                    .all_listeners()
                    .iter()
                    .position(|a| a == l)
                    .with_context(|| format!("{l} is not a dns listener"))?,
            ),
            None => None,
        };
        let catalog = mskdns::dns::catalog::Catalog::from_config(&config)?;
        print!("{}", catalog.explain(name, *client, index));
        return Ok(());
    }
    #[cfg(feature = "aws")]
    if let Some(Command::Discover { json, publish }) = &cli.command {
        return discover(&config, *json, publish.as_deref());
    }
    init_logging(&config);
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
        .context("metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    // Before any other thread: the sockets a service manager passed, matched to listeners below.
    mskdns::activation::init()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let server = mskdns::Server::bind(&config)?;
        mskdns::activation::check_all_taken()?;
        // Bound addresses on stdout, one per line, then `ready`: tests and scripts read these.
        for addr in server.dns_addrs() {
            println!("listening dns {addr}");
        }
        for (kind, addr) in server.secure_addrs() {
            println!("listening {kind} {addr}");
        }
        for addr in server.proxy_addrs() {
            println!("listening proxy {addr}");
        }
        if let Some(addr) = server.admin_addr() {
            println!("listening admin {addr}");
        }
        let shutdown = server.shutdown_token();
        // Installed before `ready` is said: a SIGTERM right after it must find the handler.
        let signals = signals(shutdown.clone())?;
        tokio::spawn(signals);
        // `ready` once every listener is served and /readyz can say so.
        let ready = || {
            println!("ready");
            // Under systemd (Type=notify).
            if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
                tracing::warn!(error = %e, "cannot tell systemd we are ready");
            }
        };
        server.run(Arc::new(move || recorder.render()), cli.config.clone(), ready).await;
        tracing::info!("stopped");
        Ok(())
    })
}

#[cfg(feature = "aws")]
fn discover(config: &Config, json: bool, publish: Option<&str>) -> anyhow::Result<()> {
    use mskdns::discovery::cli;
    use mskdns::discovery::fleet::publisher::Outcome;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    if let Some(url) = publish {
        let (report, outcome) = runtime.block_on(cli::publish_once(config, url)).map_err(anyhow::Error::msg)?;
        print_report(&report, json)?;
        match outcome {
            Outcome::Written { etag } => eprintln!("published {url} ({} clusters, ETag {etag})", report.clusters.len()),
            Outcome::Unchanged { etag } => eprintln!("unchanged: {url} already holds this state (ETag {etag})"),
        }
        return Ok(());
    }
    let (report, failed) = runtime.block_on(cli::report(config)).map_err(anyhow::Error::msg)?;
    print_report(&report, json)?;
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(feature = "aws")]
fn print_report(report: &mskdns::discovery::msk::Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!("{:<60} {:<12} {:<14} {:<12} {:<28} STATUS", "BOOTSTRAP", "KIND", "ACCOUNT", "REGION", "TARGET");
    for r in &report.clusters {
        let f = &r.found;
        println!("{:<60} {:<12} {:<14} {:<12} {:<28} {}", f.bootstrap, f.kind, f.account, f.region, f.target, r.status);
    }
    for s in &report.skipped {
        println!("skipped {} ({}): {}", s.name, s.arn, s.reason);
    }
    if let Some(s) = &report.snapshot {
        println!("snapshot {} (pass {}, written by {})", s.url, s.pass_time, s.publisher);
        for (id, addrs) in &s.endpoints {
            let ips: Vec<String> = addrs.iter().map(|a| format!("{} ({})", a.ip, a.az)).collect();
            println!("endpoint {id}: {}", ips.join(", "));
        }
    }
    Ok(())
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Installs the SIGTERM and SIGINT handlers now; the returned future cancels `shutdown` on either.
fn signals(shutdown: CancellationToken) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    })
}
