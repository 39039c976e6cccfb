//! What every TCP listener shares (DNS over TCP, DoT, DoH, both proxy modes): accepting with a
//! pause on errors, and the gauge of connections open.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// How long an accept error (out of file descriptors, say) pauses the listener.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next accepted connection; accept errors are logged (with `what` the listener is) and
/// retried after a pause rather than ending the listener or spinning.
pub async fn next_client(listener: &TcpListener, what: &'static str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// One open connection in a gauge, for as long as it lives (a panic included).
pub struct Active(metrics::Gauge);

impl Active {
    pub fn new(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Active(gauge)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A TCP listener on `addr`: the one the service manager passed (socket activation), else
/// `bind()`'s; non-blocking, for tokio.
pub fn bind_tcp(
    addr: std::net::SocketAddr,
    bind: impl FnOnce() -> std::io::Result<std::net::TcpListener>,
) -> std::io::Result<tokio::net::TcpListener> {
    let l = match crate::activation::take_tcp(addr) {
        Some(l) => l,
        None => bind()?,
    };
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}
