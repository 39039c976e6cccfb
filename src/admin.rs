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

/// Readiness: serving, with no open problems. Components report problems by name.
#[derive(Default)]
pub struct Health {
    serving: AtomicBool,
    problems: Mutex<BTreeMap<String, String>>,
}

impl Health {
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
    }

    /// Records (or with `None` clears) a problem that makes the service not ready.
    pub fn set_problem(&self, component: &str, problem: Option<String>) {
        let mut p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        match problem {
            Some(reason) => p.insert(component.to_owned(), reason),
            None => p.remove(component),
        };
    }

    /// `Ok` when ready, else the reasons, one per line.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.serving.load(Ordering::Acquire) {
            return Err("not serving yet\n".into());
        }
        let p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_empty() {
            return Ok(());
        }
        Err(p.iter().map(|(k, v)| format!("{k}: {v}\n")).collect())
    }
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
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { render, health });
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    match s.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reasons) => (StatusCode::SERVICE_UNAVAILABLE, reasons),
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], (s.render)())
}
