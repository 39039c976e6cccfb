//! One upstream query per key in flight: the single-flight table misses wait on.

use std::sync::Arc;

use super::{Answer, Key};

/// What every client waiting on one resolution receives.
pub type Shared = Result<Arc<Answer>, Failure>;

/// Why a resolution has no answer.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The upstream packet budget did not let the query go (`dns.upstream_max_pps`).
    Budget,
    /// The upstreams failed, or the resolution ended without a result.
    Upstream(Arc<str>),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Budget => f.write_str("the upstream packet budget is spent"),
            Failure::Upstream(e) => f.write_str(e),
        }
    }
}

/// Resolutions in flight, by key: the first asker starts the resolution, and every asker (the
/// first one too) waits for its result. The resolution belongs to this table, not to any asker:
/// an asker that goes away (a DoH stream reset, a closed connection) cancels only its own wait.
#[derive(Default)]
pub struct Inflight {
    waiting: std::sync::Mutex<std::collections::HashMap<Key, Vec<tokio::sync::oneshot::Sender<Shared>>>>,
}

/// Held by the resolution of a key; dropping it unfinished (a panic) releases the waiters.
pub struct Leader {
    inflight: Arc<Inflight>,
    key: Key,
}

pub enum Join {
    /// No resolution of the key was in flight: the caller starts one with the [`Leader`]; the
    /// receiver gets its result like every other asker's.
    Lead(Leader, tokio::sync::oneshot::Receiver<Shared>),
    Wait(tokio::sync::oneshot::Receiver<Shared>),
}

impl Inflight {
    pub fn join(self: &Arc<Self>, key: &[u8]) -> Join {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let (tx, rx) = tokio::sync::oneshot::channel();
        match w.get_mut(key) {
            Some(waiters) => {
                waiters.push(tx);
                Join::Wait(rx)
            }
            None => {
                w.insert(key.into(), vec![tx]);
                Join::Lead(Leader { inflight: self.clone(), key: key.into() }, rx)
            }
        }
    }
}

impl Leader {
    /// Hands the result to everyone still waiting.
    pub fn finish(self, result: &Shared) {
        for tx in self.take_waiters() {
            let _ = tx.send(result.clone());
        }
    }

    fn take_waiters(&self) -> Vec<tokio::sync::oneshot::Sender<Shared>> {
        let mut w = self.inflight.waiting.lock().unwrap_or_else(|e| e.into_inner());
        w.remove(&self.key).unwrap_or_default()
    }
}

impl Drop for Leader {
    /// A resolution that ended without a result (it panicked) drops its waiters' senders: they
    /// answer SERVFAIL.
    fn drop(&mut self) {
        drop(self.take_waiters());
    }
}
