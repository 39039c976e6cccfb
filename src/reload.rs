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

/// Watches until `shutdown`. `poll` 0: SIGHUP only. The SIGHUP handler is installed when this is
/// called, not when the future first runs: a SIGHUP right after the daemon said it is ready must
/// reload it, not end it (the signal's default action).
pub fn run(
    control: Arc<Control>,
    path: PathBuf,
    mut running: Config,
    health: Arc<Health>,
    poll: Duration,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> {
    let hup = signal(SignalKind::hangup());
    async move {
        let mut hup = hup
            .inspect_err(
                |e| tracing::error!(error = %e, "cannot install the SIGHUP handler: reload on file change only"),
            )
            .ok();
        let mut seen = stamps(&path, &running);
        loop {
            let signalled = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            let why = tokio::select! {
                _ = signalled => "SIGHUP",
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
                    health.set_degraded(
                        HEALTH_KEY,
                        Some(format!("reload failed, running the previous configuration: {e}")),
                    );
                }
            }
            seen = stamps(&path, &running);
        }
    }
}

/// Modification time and size of the config file and its zone files.
fn stamps(path: &Path, config: &Config) -> Vec<Option<(SystemTime, u64)>> {
    std::iter::once(path)
        .chain(config.zones.iter().map(|z| z.file.as_path()))
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

/// What the TCP, DoT and DoH listeners took at start.
fn stream_keys(d: &crate::config::DnsConfig) -> impl PartialEq + '_ {
    (
        (d.max_tcp_connections, d.max_tcp_connections_per_client, d.tcp_idle_timeout_ms, d.tcp_write_timeout_ms),
        (d.tcp_nodelay, &d.tcp_per_client_exempt),
        (&d.listen_dot, &d.listen_doh, &d.tls_cert, &d.tls_key, &d.doh_path),
        (d.tls_handshake_timeout_ms, d.doh_max_streams),
    )
}

/// Keys whose new value needs new sockets or a new logger.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if old.dns.udp_threads != new.dns.udp_threads {
        keys.push("dns.udp_threads");
    }
    if stream_keys(&old.dns) != stream_keys(&new.dns) {
        keys.push("dns TCP, DoT and DoH listeners (tcp_*, max_tcp_connections*, listen_dot, listen_doh, tls_*, doh_*)");
    }
    if old.admin.listen != new.admin.listen {
        keys.push("admin.listen");
    }
    if old.log != new.log {
        keys.push("log");
    }
    if proxies_shape(old) != proxies_shape(new) {
        keys.push("proxies (all but a ports-mode block's upstream, upstream TLS keys and switch_drain_secs)");
    }
    keys
}

/// The `[[proxies]]` blocks without what a ports-mode block switches live.
fn proxies_shape(c: &Config) -> Vec<crate::config::ProxyBlock> {
    use crate::config::ProxyBlock;
    let shape = |b: &ProxyBlock| match b {
        ProxyBlock::Ports(p) => ProxyBlock::Ports(p.without_upstream()),
        other => other.clone(),
    };
    c.proxies.iter().map(shape).collect()
}

#[cfg(test)]
mod tests {
    use super::restart_only;
    use crate::config::Config;

    #[test]
    fn listener_settings_are_named_as_needing_a_restart() {
        let old = Config::default();
        let mut new = old.clone();
        new.dns.upstream_timeout_ms += 1;
        assert!(restart_only(&old, &new).is_empty(), "applied on reload");
        for change in [
            |c: &mut Config| c.dns.tcp_nodelay = false,
            |c: &mut Config| c.dns.tcp_idle_timeout_ms = 1,
            |c: &mut Config| c.dns.doh_max_streams = 7,
            |c: &mut Config| c.dns.listen_dot = vec!["127.0.0.1:0".parse().unwrap()],
        ] {
            let mut new = old.clone();
            change(&mut new);
            let keys = restart_only(&old, &new);
            assert!(keys.len() == 1 && keys[0].contains("tcp_*"), "{keys:?}");
        }
    }
}
