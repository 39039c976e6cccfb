//! The admin HTTP endpoint: `/healthz` (the process answers), `/readyz` (serving, and why not),
//! `/metrics` (Prometheus text).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Renders the metrics exposition; the binary owns the recorder, the library only calls this.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Readiness: serving, with no open problems. Components report problems by name: a problem
/// makes /readyz fail (503); a degradation (serving from last known data) is reported with 200.
#[derive(Default)]
pub struct Health {
    serving: AtomicBool,
    problems: Mutex<BTreeMap<String, String>>,
    degraded: Mutex<BTreeMap<String, String>>,
    /// Parts gone for good (a listener that cannot serve again): /healthz fails.
    lost: Mutex<BTreeMap<String, String>>,
}

impl Health {
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
    }

    /// Records (or with `None` clears) a problem that makes the service not ready.
    pub fn set_problem(&self, component: &str, problem: Option<String>) {
        set(&self.problems, component, problem);
    }

    /// Records (or clears) a degradation: still serving, from last known data.
    pub fn set_degraded(&self, component: &str, reason: Option<String>) {
        set(&self.degraded, component, reason);
    }

    /// Records (or clears) a part of the service that is gone until a restart.
    pub fn set_lost(&self, component: &str, reason: Option<String>) {
        set(&self.lost, component, reason);
    }

    /// `Ok` while every listener is alive, else `Err` with what is gone, one per line.
    pub fn liveness(&self) -> Result<(), String> {
        let m = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        if m.is_empty() { Ok(()) } else { Err(m.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()) }
    }

    /// `Ok` with `ready` or `degraded` and its reasons, else `Err` with the reasons, one per line.
    pub fn readiness(&self) -> Result<String, String> {
        if !self.serving.load(Ordering::Acquire) {
            return Err("not serving yet\n".into());
        }
        let lines = |m: &Mutex<BTreeMap<String, String>>| -> String {
            let m = m.lock().unwrap_or_else(|e| e.into_inner());
            m.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
        };
        let (problems, degraded) = (lines(&self.problems), lines(&self.degraded));
        match (problems.is_empty(), degraded.is_empty()) {
            (false, _) => Err(problems + &degraded),
            (true, true) => Ok("ready\n".into()),
            (true, false) => Ok(format!("degraded\n{degraded}")),
        }
    }
}

fn set(map: &Mutex<BTreeMap<String, String>>, component: &str, reason: Option<String>) {
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    match reason {
        Some(reason) => m.insert(component.to_owned(), reason),
        None => m.remove(component),
    };
}

#[derive(Clone)]
struct AdminState {
    render: Render,
    health: Arc<Health>,
}

pub async fn serve(
    listener: TcpListener,
    render: Render,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { render, health });
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

async fn healthz(State(s): State<AdminState>) -> impl IntoResponse {
    match s.health.liveness() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(lost) => (StatusCode::SERVICE_UNAVAILABLE, lost),
    }
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    match s.health.readiness() {
        Ok(body) => (StatusCode::OK, body),
        Err(reasons) => (StatusCode::SERVICE_UNAVAILABLE, reasons),
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], (s.render)())
}
