//! Hot reload: SIGHUP, or a change to the config file or one of its zone files, loads the
//! configuration again and swaps it in between two queries. A bad file keeps the running
//! configuration; the error (which names the key) is logged, counted and shown on /readyz.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::config::Config;
use crate::control::Control;

const HEALTH_KEY: &str = "config";

/// Watches until `shutdown`. `poll` 0: SIGHUP only.
pub async fn run(
    control: Arc<Control>,
    path: PathBuf,
    mut running: Config,
    health: Arc<Health>,
    poll: Duration,
    shutdown: CancellationToken,
) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler: reload on file change only");
        return;
    };
    let mut seen = stamps(&path, &running);
    loop {
        let why = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            _ = tokio::time::sleep(if poll.is_zero() { Duration::from_secs(3600) } else { poll }) => {
                if poll.is_zero() || stamps(&path, &running) == seen {
                    continue;
                }
                "file changed"
            }
            _ = shutdown.cancelled() => return,
        };
        let result = Config::load(Some(&path)).map_err(|e| e.to_string()).and_then(|next| {
            // Views chosen by listener refer to dns.listen by position: with other sockets
            // than the running ones, clients could get another view's answers.
            if next.dns.listen != running.dns.listen {
                return Err("`dns.listen` changed: restart to apply it (nothing was reloaded)".into());
            }
            control.reload(next.clone()).map_err(|e| e.to_string())?;
            Ok(next)
        });
        match result {
            Ok(next) => {
                for key in restart_only(&running, &next) {
                    tracing::warn!(key, "changed, but takes effect only after a restart");
                }
                running = next;
                metrics::counter!("mskdns_config_reloads_total", "result" => "ok").increment(1);
                health.set_degraded(HEALTH_KEY, None);
                tracing::info!(trigger = why, file = %path.display(), "configuration reloaded");
            }
            Err(e) => {
                metrics::counter!("mskdns_config_reloads_total", "result" => "error").increment(1);
                tracing::error!(trigger = why, error = %e, "reload failed; the running configuration stays");
                health
                    .set_degraded(HEALTH_KEY, Some(format!("reload failed, running the previous configuration: {e}")));
            }
        }
        seen = stamps(&path, &running);
    }
}

/// Modification time and size of the config file and its zone files.
fn stamps(path: &Path, config: &Config) -> Vec<Option<(SystemTime, u64)>> {
    std::iter::once(path)
        .chain(config.zones.iter().map(|z| z.file.as_path()))
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

/// Keys whose new value needs new sockets or a new logger.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if old.dns.udp_threads != new.dns.udp_threads {
        keys.push("dns.udp_threads");
    }
    if old.admin.listen != new.admin.listen {
        keys.push("admin.listen");
    }
    if old.log != new.log {
        keys.push("log");
    }
    if old.proxies != new.proxies {
        keys.push("proxies");
    }
    keys
}
