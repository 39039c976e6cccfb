//! How a ports-mode connection ended, and how that is logged and counted.

use std::time::Duration;

use super::rewrite;
use crate::proxy::frame::FrameError;

#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("client: {0}")]
    ClientFrame(FrameError),
    #[error("upstream: {0}")]
    UpstreamFrame(FrameError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("response with correlation id {got} where {want} was expected")]
    Correlation { got: i32, want: i32 },
    #[error("a response arrived with no request waiting for it")]
    Unexpected,
    #[error("{0}")]
    Rewrite(#[from] rewrite::RewriteError),
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("{0} v{1} is not offered through the proxy (its answer would carry broker addresses it cannot rewrite)")]
    Refused(String, i16),
    #[error("no request within {0:?} of connecting (first_request_timeout_ms)")]
    FirstRequest(Duration),
    #[error("TLS handshake with the client: {0}")]
    ClientTls(String),
    #[error("a plaintext Kafka request on a TLS listener: the client needs security.protocol SSL or SASL_SSL")]
    PlaintextOnTls,
    #[error("TLS handshake with {0}: {1}")]
    UpstreamTls(String, String),
    #[error("cannot translate the topic ids of a {0} v{1} request: {2}")]
    Translate(String, i16, String),
}

impl ConnError {
    /// Logged inside the connection's span (proxy, peer, upstream, listener).
    pub(super) fn log(&self, proxy: &str) {
        match self {
            ConnError::ClientFrame(FrameError::TlsOnPlaintext) => {
                metrics::counter!("mskdns_proxy_tls_on_plaintext_total", "proxy" => proxy.to_owned()).increment(1);
                tracing::warn!("{self}");
            }
            ConnError::Io(e)
                if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) =>
            {
                tracing::debug!("connection closed: {e}")
            }
            ConnError::Idle(_) | ConnError::FirstRequest(_) => tracing::debug!("{self}"),
            ConnError::Io(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                tracing::debug!("connection closed: {e}")
            }
            // A TLS error after the handshake: in TLS 1.3 a server that wants a client
            // certificate says so only then (an alert: CertificateRequired).
            ConnError::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>()) => {
                metrics::counter!("mskdns_proxy_tls_errors_total", "proxy" => proxy.to_owned(), "side" => "either", "kind" => "session")
                    .increment(1);
                tracing::warn!("connection closed: TLS: {e}");
            }
            ConnError::ClientTls(_) | ConnError::PlaintextOnTls => {
                let kind = if matches!(self, ConnError::PlaintextOnTls) { "plaintext" } else { "handshake" };
                metrics::counter!("mskdns_proxy_tls_errors_total", "proxy" => proxy.to_owned(), "side" => "client", "kind" => kind)
                    .increment(1);
                tracing::warn!("{self}");
            }
            ConnError::UpstreamTls(..) => {
                metrics::counter!("mskdns_proxy_tls_errors_total", "proxy" => proxy.to_owned(), "side" => "upstream", "kind" => "handshake")
                    .increment(1);
                tracing::warn!("connection closed: {self}");
            }
            _ => tracing::warn!("connection closed: {self}"),
        }
    }
}
