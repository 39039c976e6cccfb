//! DNS over HTTPS (RFC 8484) on a TLS connection: HTTP/2 or HTTP/1.1 (by ALPN), GET with
//! `?dns=` (base64url) and POST `application/dns-message`, answered by the same engine as every
//! other transport. hyper does the HTTP; this is only the mapping between requests and messages.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::engine::{Engine, Handled, Origin};
use super::stream::TcpLimits;
use super::wire;

const DNS_MESSAGE: &str = "application/dns-message";
/// The largest DNS message: a request body (or a decoded `dns` parameter) past it gets 413.
pub const MAX_MESSAGE: usize = 65_535;
/// How much of a body over [`MAX_MESSAGE`] is read and dropped before the 413; a declared
/// length past it gets the 413 at once.
const DRAIN_MAX: usize = 256 * 1024;
/// Request headers, in all, per request (HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE; HTTP/1.1's buffer).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Bytes buffered under a DoH connection's TLS: the records written between two flushes leave
/// in one write (see [`FrameCut`]).
pub const WRITE_BUFFER: usize = 16 * 1024;

/// An HTTP/2 server's output, with a TLS record ending after each frame that ends a stream, so
/// that no record carries more than one response. The bytes are the same; only where records
/// end changes.
///
/// hyper hands TLS every frame that is ready in one write, which TLS seals into one record of
/// many responses. nghttp2 clients that take one response per read and wait for the socket
/// before the next (dnsperf 2.10 among them) leave the rest of such a record unread until more
/// bytes arrive, and time those answers out. Servers that write each frame on its own (unbound)
/// never meet this. Ending records here keeps one write per flush: the TCP side below TLS is
/// buffered ([`WRITE_BUFFER`]).
pub struct FrameCut<S> {
    inner: S,
    /// Off for HTTP/1.1, whose output is not framed this way.
    on: bool,
    frames: Frames,
    /// Response body bytes written so far (HTTP/2 DATA payload), read by the connection to tell
    /// a client that does not take its responses.
    sent: Arc<AtomicU64>,
}

/// Where the output stands in the HTTP/2 frame it is in (frames are a 9-byte header, then as
/// many bytes of payload as the header's first three bytes say).
#[derive(Debug, Clone, Copy, Default)]
struct Frames {
    head: [u8; 9],
    /// Header bytes of the current frame seen so far (9: the header is whole).
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The current frame is DATA or HEADERS with END_STREAM.
    ends: bool,
    /// The current frame is DATA.
    data: bool,
    /// DATA payload bytes moved over so far: response bodies, as written.
    data_bytes: u64,
}

impl Frames {
    /// Moves over `buf`, stopping right after a frame that ends a stream; returns the bytes moved over.
    fn advance(&mut self, buf: &[u8]) -> usize {
        let mut i = 0;
        while i < buf.len() {
            if self.have < 9 {
                let k = (9 - self.have).min(buf.len() - i);
                self.head[self.have..self.have + k].copy_from_slice(&buf[i..i + k]);
                self.have += k;
                i += k;
                if self.have < 9 {
                    break;
                }
                let h = self.head;
                self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                self.ends = matches!(h[3], 0 | 1) && h[4] & 1 != 0;
                self.data = h[3] == 0;
            }
            let k = self.left.min(buf.len() - i);
            self.left -= k;
            if self.data {
                self.data_bytes += k as u64;
            }
            i += k;
            if self.left == 0 {
                self.have = 0;
                if self.ends {
                    break;
                }
            }
        }
        i
    }
}

impl<S> FrameCut<S> {
    pub fn new(inner: S, http2: bool) -> Self {
        FrameCut { inner, on: http2, frames: Frames::default(), sent: Arc::default() }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameCut<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameCut<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.on {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        let upto = this.frames.clone().advance(buf);
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..upto]))?;
        this.frames.advance(&buf[..n]);
        this.sent.store(this.frames.data_bytes, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What a DoH listener needs beside the engine.
#[derive(Debug, Clone)]
pub struct DohSettings {
    pub path: String,
    pub max_streams: u32,
}

/// Response body bytes one HTTP/2 connection may have waiting to be sent (answered, not yet
/// taken by the client). Past it, new requests get 503 and the connection a GOAWAY.
pub const MAX_UNSENT: u64 = 256 * 1024;

/// Serves one TLS connection until the client closes it, leaves it idle for
/// `limits.idle_timeout` with no request open, or stops taking its responses: responses not
/// sent for `limits.write_timeout` close it. A request's body must arrive within
/// `limits.idle_timeout` (408 otherwise); only then does the request count as open.
pub async fn connection<S>(
    engine: Arc<Engine>,
    stream: FrameCut<S>,
    from: Origin,
    settings: Arc<DohSettings>,
    limits: TcpLimits,
    stop: tokio_util::sync::CancellationToken,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let epoch = Instant::now();
    let max_streams = settings.max_streams;
    let activity = Arc::new(Activity {
        last: AtomicU64::new(0),
        open: AtomicUsize::new(0),
        queued: AtomicU64::new(0),
        sent: stream.sent.clone(),
        http2: stream.on,
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let (engine, settings, activity) = (engine.clone(), settings.clone(), activity.clone());
            async move {
                let r = respond(&engine, from, &settings, req, &activity, limits.idle_timeout).await;
                if activity.http2 {
                    let len = hyper::body::Body::size_hint(r.body()).exact().unwrap_or(0);
                    activity.queued.fetch_add(len, Ordering::Relaxed);
                }
                activity.last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                Ok::<_, Infallible>(r)
            }
        })
    };
    let builder = http(limits, max_streams);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let check = (limits.idle_timeout.min(limits.write_timeout) / 4).max(Duration::from_millis(50));
    // When the responses waiting to be sent last made progress (or there were none).
    let (mut sent_before, mut progress_at) = (0u64, Instant::now());
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => return r.map_err(io::Error::other),
            // Shutting down: no new streams (a GOAWAY, or close after the response in progress);
            // the requests already read are answered.
            _ = stop.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep(check) => {
                let sent = activity.sent.load(Ordering::Relaxed);
                let unsent = activity.unsent();
                if unsent == 0 || sent != sent_before {
                    (sent_before, progress_at) = (sent, Instant::now());
                } else if progress_at.elapsed() >= limits.write_timeout {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "client does not take its responses"));
                }
                if unsent > MAX_UNSENT && !closing {
                    // No new streams; the stalled check above ends it if the client never reads.
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                let quiet = (epoch.elapsed().as_millis() as u64).saturating_sub(activity.last.load(Ordering::Relaxed));
                if !closing && activity.open.load(Ordering::Relaxed) == 0 && unsent == 0
                    && quiet >= limits.idle_timeout.as_millis() as u64 {
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

/// hyper's settings for both protocols: header and body bounds, flow-control windows, pings.
fn http(limits: TcpLimits, max_streams: u32) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
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
        .max_send_buf_size(64 * 1024)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(Some(limits.idle_timeout))
        .keep_alive_timeout(limits.write_timeout);
    builder
}

/// HTTP/2 receive windows: how much request data a client may send ahead per stream and per
/// connection (a DNS message is at most 64 KiB; larger bodies are drained within these).
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 256 * 1024;

struct Activity {
    /// Milliseconds since the connection's start when the last request was answered.
    last: AtomicU64,
    /// Requests whose body is whole, being answered.
    open: AtomicUsize,
    /// Response body bytes handed to hyper (HTTP/2), error pages included.
    queued: AtomicU64,
    /// Response body bytes written (HTTP/2 DATA payload; see [`FrameCut`]).
    sent: Arc<AtomicU64>,
    http2: bool,
}

impl Activity {
    /// Response bytes answered and not yet written: what a client that does not read holds here.
    fn unsent(&self) -> u64 {
        self.queued.load(Ordering::Relaxed).saturating_sub(self.sent.load(Ordering::Relaxed))
    }
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
    activity: &Activity,
    body_deadline: Duration,
) -> Response<Full<Bytes>> {
    let pkt = match tokio::time::timeout(body_deadline, message(settings, req)).await {
        Ok(Ok(p)) => p,
        Ok(Err(r)) => return r,
        Err(_) => return plain(StatusCode::REQUEST_TIMEOUT, "the request did not arrive in time\n"),
    };
    if pkt.len() < 12 {
        return plain(StatusCode::BAD_REQUEST, "not a DNS message\n");
    }
    if activity.unsent() > MAX_UNSENT {
        // Nothing more is answered for a client that does not take what it was given.
        return plain(StatusCode::SERVICE_UNAVAILABLE, "responses are waiting to be read\n");
    }
    activity.open.fetch_add(1, Ordering::Relaxed);
    let _open = Open(&activity.open);
    let mut out = Vec::with_capacity(512);
    let handled = match engine.handle(&pkt, from, &mut out) {
        Handled::Miss => engine.resolve_or_servfail(&pkt, from, &mut out).await,
        Handled::ReplyAndPrefetch => {
            engine.spawn_prefetch(&pkt, from);
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

/// A request counted open until its answer is built (or its task is dropped).
struct Open<'a>(&'a AtomicUsize);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::min_ttl;
    use super::{FrameCut, Frames};
    use tokio::io::AsyncWriteExt;

    /// An HTTP/2 frame: 9-byte header, then the payload.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Records each write it is given, as TLS would seal each into records of its own.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl tokio::io::AsyncWrite for Writes {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            // At most 50 bytes at a time, so that frames also arrive cut at odd places.
            let n = buf.len().min(50);
            self.get_mut().0.push(buf[..n].to_vec());
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_write_ends_after_each_frame_that_ends_a_stream() {
        // Two responses (HEADERS, then DATA with END_STREAM), a SETTINGS ACK between them, a
        // bodiless response (HEADERS with END_STREAM), and a long DATA frame that ends its stream.
        let (h1, d1) = (frame(1, 4, 1, &[0x88; 20]), frame(0, 1, 1, &[7; 60]));
        let ack = frame(4, 1, 0, &[]);
        let (h3, d3) = (frame(1, 4, 3, &[0x88; 5]), frame(0, 1, 3, &[9; 30]));
        let h5 = frame(1, 5, 5, &[0x89; 3]);
        let d7 = frame(0, 1, 7, &[1; 120]);
        let all: Vec<u8> = [&h1[..], &d1, &ack, &h3, &d3, &h5, &d7].concat();
        let mut cut = FrameCut::new(Writes::default(), true);
        cut.write_all(&all).await.unwrap();
        let writes = cut.inner.0;
        assert_eq!(writes.concat(), all, "the bytes are unchanged");
        // Where writes end: after d1 (a SETTINGS ACK's flag is not END_STREAM), after d3, after
        // h5, after d7; and every 50 bytes as the writer takes them.
        let mut ends = vec![];
        let mut at = 0;
        for w in &writes {
            at += w.len();
            ends.push(at);
        }
        let boundaries = [h1.len() + d1.len(), h1.len() + d1.len() + ack.len() + h3.len() + d3.len()];
        let after_h5 = boundaries[1] + h5.len();
        for b in [boundaries[0], boundaries[1], after_h5, all.len()] {
            assert!(ends.contains(&b), "a write ends at {b}: {ends:?}");
        }
        // No write spans two responses.
        for w in writes.iter().scan(0, |at, w| {
            let start = *at;
            *at += w.len();
            Some((start, *at))
        }) {
            for b in [boundaries[0], boundaries[1], after_h5] {
                assert!(!(w.0 < b && b < w.1), "write {w:?} spans the end of a response at {b}");
            }
        }
    }

    #[tokio::test]
    async fn http1_output_passes_as_written() {
        let mut cut = FrameCut::new(Writes::default(), false);
        cut.write_all(&[0u8; 40]).await.unwrap();
        assert_eq!(cut.inner.0.len(), 1);
    }

    #[test]
    fn frames_track_headers_split_across_writes() {
        let f = [frame(0, 1, 1, &[1; 3]), frame(0, 0, 3, &[2; 2])].concat();
        let mut st = Frames::default();
        // The header arrives in two pieces, then the payload.
        assert_eq!(st.advance(&f[..4]), 4);
        assert_eq!(st.advance(&f[4..9]), 5);
        // Stops after the END_STREAM frame, not at the end of the buffer.
        assert_eq!(st.advance(&f[9..]), 3);
        assert_eq!(st.advance(&f[12..]), f.len() - 12);
    }

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
