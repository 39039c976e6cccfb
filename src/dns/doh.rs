//! DNS over HTTPS (RFC 8484) on a TLS connection: HTTP/2 or HTTP/1.1 (by ALPN), GET with
//! `?dns=` (base64url) and POST `application/dns-message`, answered by the same engine as every
//! other transport. hyper does the HTTP; this is only the mapping between requests and messages.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::engine::{Engine, Handled, Origin};
use super::server::TcpLimits;
use super::wire;

const DNS_MESSAGE: &str = "application/dns-message";
/// The largest DNS message: a request body (or a decoded `dns` parameter) past it gets 413.
pub const MAX_MESSAGE: usize = 65_535;
/// How much of a body over [`MAX_MESSAGE`] is read and dropped before the 413; a declared
/// length past it gets the 413 at once.
const DRAIN_MAX: usize = 256 * 1024;
/// Request headers, in all, per request (HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE; HTTP/1.1's buffer).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// What a DoH listener needs beside the engine.
#[derive(Debug, Clone)]
pub struct DohSettings {
    pub path: String,
    pub max_streams: u32,
}

/// Serves one TLS connection until the client closes it or leaves it idle for
/// `limits.idle_timeout` with no request open.
pub async fn connection<S>(
    engine: Arc<Engine>,
    stream: S,
    from: Origin,
    settings: Arc<DohSettings>,
    limits: TcpLimits,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let epoch = Instant::now();
    let max_streams = settings.max_streams;
    let activity = Arc::new(Activity { last: AtomicU64::new(0), open: AtomicUsize::new(0) });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let (engine, settings, activity) = (engine.clone(), settings.clone(), activity.clone());
            async move {
                activity.open.fetch_add(1, Ordering::Relaxed);
                let r = respond(&engine, from, &settings, req).await;
                activity.last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                activity.open.fetch_sub(1, Ordering::Relaxed);
                Ok::<_, Infallible>(r)
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(max_streams)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_send_buf_size(256 * 1024);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let check = (limits.idle_timeout / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            r = conn.as_mut() => return r.map_err(io::Error::other),
            _ = tokio::time::sleep(check) => {
                let quiet = (epoch.elapsed().as_millis() as u64).saturating_sub(activity.last.load(Ordering::Relaxed));
                if activity.open.load(Ordering::Relaxed) == 0 && quiet >= limits.idle_timeout.as_millis() as u64 {
                    break;
                }
            }
        }
    }
    // Idle: a GOAWAY (HTTP/2) or close after the response in progress (HTTP/1.1), bounded.
    conn.as_mut().graceful_shutdown();
    match tokio::time::timeout(limits.write_timeout, conn).await {
        Ok(r) => r.map_err(io::Error::other),
        Err(_) => Ok(()),
    }
}

struct Activity {
    /// Milliseconds since the connection's start when the last request was answered.
    last: AtomicU64,
    /// Requests being answered.
    open: AtomicUsize,
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, "text/plain; charset=utf-8".parse().expect("static"));
    r
}

/// The DNS message a request carries, or the HTTP answer it gets instead.
async fn message(settings: &DohSettings, req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    if req.uri().path() != settings.path {
        return Err(plain(StatusCode::NOT_FOUND, "not found: DNS queries go to the DoH path\n"));
    }
    match *req.method() {
        Method::GET => {
            let dns = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("dns="))
                .ok_or_else(|| plain(StatusCode::BAD_REQUEST, "missing the dns parameter\n"))?;
            // base64url without padding (RFC 8484 section 4.1); padding is tolerated.
            let dns = dns.trim_end_matches("%3D").trim_end_matches('=');
            if dns.len() > MAX_MESSAGE.div_ceil(3) * 4 {
                return Err(plain(StatusCode::PAYLOAD_TOO_LARGE, "DNS message too large\n"));
            }
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(dns)
                .map(Bytes::from)
                .map_err(|_| plain(StatusCode::BAD_REQUEST, "the dns parameter is not base64url\n"))
        }
        Method::POST => {
            let ctype = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            let essence = ctype.split(';').next().unwrap_or("").trim();
            if !essence.eq_ignore_ascii_case(DNS_MESSAGE) {
                return Err(plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, "the body must be application/dns-message\n"));
            }
            let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if declared.is_some_and(|n| n > DRAIN_MAX as u64) {
                return Err(plain(StatusCode::PAYLOAD_TOO_LARGE, "DNS message too large\n"));
            }
            // A body over the cap is read on (up to DRAIN_MAX) and dropped, so that the client has
            // sent it all when the 413 comes: an HTTP/2 client still sending would see a reset.
            let mut body = req.into_body();
            let (mut kept, mut seen) = (Vec::new(), 0usize);
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Err(plain(StatusCode::BAD_REQUEST, "the request body did not arrive whole\n"));
                };
                if let Ok(data) = frame.into_data() {
                    seen += data.len();
                    if seen <= MAX_MESSAGE {
                        kept.extend_from_slice(&data);
                    } else if seen > DRAIN_MAX {
                        break;
                    }
                }
            }
            if seen > MAX_MESSAGE {
                return Err(plain(StatusCode::PAYLOAD_TOO_LARGE, "DNS message too large\n"));
            }
            Ok(Bytes::from(kept))
        }
        _ => {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "GET or POST\n");
            r.headers_mut().insert(ALLOW, "GET, POST".parse().expect("static"));
            Err(r)
        }
    }
}

async fn respond(
    engine: &Arc<Engine>,
    from: Origin,
    settings: &DohSettings,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let pkt = match message(settings, req).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    if pkt.len() < 12 {
        return plain(StatusCode::BAD_REQUEST, "not a DNS message\n");
    }
    let mut out = Vec::with_capacity(512);
    let handled = match engine.handle(&pkt, from, &mut out) {
        Handled::Miss => engine.resolve(&pkt, from, &mut out).await,
        Handled::ReplyAndPrefetch => {
            let (engine, pkt) = (engine.clone(), pkt.clone());
            tokio::spawn(async move { engine.prefetch(&pkt, from).await });
            Handled::Reply
        }
        h => h,
    };
    if handled != Handled::Reply {
        // The engine drops what it cannot even read a header of.
        return plain(StatusCode::BAD_REQUEST, "not a DNS message\n");
    }
    let max_age = wire::min_ttl(&out).unwrap_or(0);
    let mut r = Response::new(Full::new(Bytes::from(out)));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, DNS_MESSAGE.parse().expect("static"));
    h.insert(CACHE_CONTROL, format!("max-age={max_age}").parse().expect("digits"));
    r
}

#[cfg(test)]
mod tests {
    use super::super::wire::min_ttl;

    #[test]
    fn min_ttl_over_answer_and_authority() {
        use hickory_proto::op::{Message, Query};
        use hickory_proto::rr::{Name, RData, Record, RecordType, rdata};
        let name = Name::from_ascii("www.example.test.").unwrap();
        let mut m = Message::new(7, hickory_proto::op::MessageType::Response, hickory_proto::op::OpCode::Query);
        m.add_query(Query::query(name.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(name.clone(), 300, RData::A(rdata::A::new(192, 0, 2, 1))));
        m.add_answer(Record::from_rdata(name.clone(), 60, RData::A(rdata::A::new(192, 0, 2, 2))));
        m.add_authority(Record::from_rdata(name.clone(), 120, RData::A(rdata::A::new(192, 0, 2, 3))));
        let wire = m.to_vec().unwrap();
        assert_eq!(min_ttl(&wire), Some(60));
        // No records: none; a short message: none.
        let mut empty = Message::new(7, hickory_proto::op::MessageType::Response, hickory_proto::op::OpCode::Query);
        empty.add_query(Query::query(name, RecordType::A));
        assert_eq!(min_ttl(&empty.to_vec().unwrap()), None);
        assert_eq!(min_ttl(&wire[..20]), None);
    }
}
