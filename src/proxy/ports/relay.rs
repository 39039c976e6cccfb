//! One client connection's two directions: requests forwarded as they arrive (only their header
//! read), responses paired with their request and rewritten when they carry broker addresses.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc;

use super::switch::{Left, Upstream};
use super::topic_ids::{self, Ids};
use super::{ConnError, Shared, hints, rewrite};
use crate::proxy::frame::{self, FrameError, RequestHeader, copy_exact};

/// Requests in flight per connection before the proxy stops reading from the client.
const MAX_INFLIGHT: usize = 1024;
/// acks=0 correlation ids remembered per connection, in case a broker answers them.
const MAX_ACKS0: usize = 1024;
/// Read-ahead and write buffer per direction of a connection.
const BUFFER: usize = 64 * 1024;

pub(super) async fn relay<CR, CW, SR, SW>(
    shared: &Arc<Shared>,
    to: &Upstream,
    cr: CR,
    cw: CW,
    sr: SR,
    sw: SW,
) -> Result<(), ConnError>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    // Bounded both ways: BUFFER bytes read ahead and BUFFER bytes waiting to be written per
    // direction; a slow reader on one side stops the proxy reading from the other.
    let mut client_in = BufReader::with_capacity(BUFFER, cr);
    let mut client_out = BufWriter::with_capacity(BUFFER, cw);
    let server = (BufReader::with_capacity(BUFFER, sr), BufWriter::with_capacity(BUFFER, sw));
    match exchange(shared, to, &mut client_in, &mut client_out, server).await? {
        Ended::Done => Ok(()),
        Ended::Drained => {
            linger(&mut client_in, &mut client_out).await;
            Ok(())
        }
    }
}

/// How an exchange ended without an error.
enum Ended {
    /// A side closed, or the grace ran out.
    Done,
    /// Left at a request boundary with every answer owed delivered.
    Drained,
}

/// How long the end of stream waits after the last answer of a drained connection.
const BEFORE_FIN: Duration = Duration::from_millis(500);

/// Closes a drained connection gently: its end of stream (FIN) a moment after the last answer,
/// then what the client still sends is read and dropped until it closes too (for a second at
/// most). The pause: some clients read until the socket would block and, when the end of stream
/// comes in that same read, drop the bytes read with it (kafka-python 3.0): the last answer would
/// be lost and its request sent again to the new cluster, a record written twice. Closing with
/// unread bytes in the socket would send a reset, and a client's kernel may then throw away
/// answers it has received but not read yet: the same loss.
async fn linger<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(client_in: &mut R, client_out: &mut W) {
    let discard = async {
        let mut sink = [0u8; 4096];
        let pause = tokio::time::sleep(BEFORE_FIN);
        tokio::pin!(pause);
        let client_open = loop {
            tokio::select! {
                _ = &mut pause => break true,
                r = client_in.read(&mut sink) => if !matches!(r, Ok(n) if n > 0) { break false },
            }
        };
        let _ = client_out.shutdown().await;
        if client_open {
            while matches!(client_in.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    };
    let _ = tokio::time::timeout(BEFORE_FIN + Duration::from_secs(1), discard).await;
}

/// Both directions until a side closes, the connection idles out, or it leaves (shutdown or a
/// switch away from `to`).
async fn exchange<CR, CW, SR, SW>(
    shared: &Arc<Shared>,
    to: &Upstream,
    client_in: &mut BufReader<CR>,
    client_out: &mut BufWriter<CW>,
    (server_in, server_out): (BufReader<SR>, BufWriter<SW>),
) -> Result<Ended, ConnError>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let (tx, rx) = mpsc::channel::<RequestHeader>(MAX_INFLIGHT);
    let state = Both::default();
    // Shutdown, or a switch away (at this connection's turn): read no more requests, answer those
    // forwarded, close; what is still owed at the end of the grace is cut.
    let leave = to.leave(&shared.shutdown);
    let hard_stop = to.hard_stop(&shared.shutdown, Duration::from_secs(shared.cfg.shutdown_grace_secs));
    tokio::pin!(leave);
    let requests = requests(shared, to, leave.as_mut(), client_in, server_out, tx, state.clone());
    let responses = responses(shared, to, server_in, client_out, rx, state.clone());
    let watchdog = idle_watch(&state, Duration::from_secs(shared.cfg.idle_timeout_secs));
    tokio::pin!(requests, responses, watchdog, hard_stop);
    tokio::select! {
        r = &mut requests => match r {
            // Leaving: no request was cut; the answers to those forwarded still come back.
            Ok(Stopped::Draining) => {}
            Ok(Stopped::ClientDone) => return Ok(Ended::Done),
            Err(e) => return Err(e),
        },
        r = &mut responses => return r.map(|()| Ended::Done),
        r = &mut watchdog => return r.map(|()| Ended::Done),
        () = &mut hard_stop => {
            to.record(Left::Cut, &shared.shutdown);
            return Ok(Ended::Done);
        }
    }
    let how = if state.pending.load(Ordering::Relaxed) == 0 { Left::Idle } else { Left::Boundary };
    loop {
        if state.pending.load(Ordering::Relaxed) == 0 {
            to.record(how, &shared.shutdown);
            return Ok(Ended::Drained);
        }
        tokio::select! {
            r = &mut responses => return r.map(|()| Ended::Done),
            r = &mut watchdog => return r.map(|()| Ended::Done),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            () = &mut hard_stop => {
                to.record(Left::Cut, &shared.shutdown);
                return Ok(Ended::Done);
            }
        }
    }
}

/// Ends with an error once neither direction has moved for `idle`.
async fn idle_watch(state: &Both, idle: Duration) -> Result<(), ConnError> {
    loop {
        let last = *state.activity.lock().unwrap_or_else(|e| e.into_inner());
        let left = idle.saturating_sub(last.elapsed());
        if left.is_zero() {
            return Err(ConnError::Idle(idle));
        }
        tokio::time::sleep(left).await;
    }
}

/// Why the client-to-broker direction ended without an error.
enum Stopped {
    /// The client closed its side.
    ClientDone,
    /// Shutdown, at a request boundary: nothing of a request was forwarded half.
    Draining,
}

/// What a connection's two directions share.
#[derive(Clone)]
struct Both {
    /// acks=0 correlation ids, in case the broker answers them.
    acks0: Arc<Mutex<VecDeque<i32>>>,
    /// The last traffic either way (the idle timer).
    activity: Arc<Mutex<Instant>>,
    /// Requests forwarded and not answered yet: a draining connection closes when none is left.
    pending: Arc<AtomicUsize>,
}

impl Default for Both {
    fn default() -> Self {
        Both { acks0: Arc::default(), activity: Arc::new(Mutex::new(Instant::now())), pending: Arc::default() }
    }
}

fn touch(activity: &Mutex<Instant>) {
    *activity.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
}

/// Reads a size prefix; `Ok(None)` at a clean end of stream.
async fn read_size<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<[u8; 4]>> {
    let mut size = [0u8; 4];
    match r.read_exact(&mut size[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut size[1..]).await?;
    Ok(Some(size))
}

/// Writes out what `w` holds unless the next frame is already complete in `r`'s buffer: then it
/// is forwarded first and both leave in one write. Flushing whenever the next frame is not all
/// there means the proxy never waits to read while holding bytes the peer is waiting for.
async fn flush_unless_more<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &BufReader<R>,
    w: &mut W,
) -> std::io::Result<()> {
    let buf = r.buffer();
    let ready = buf.len() >= 4 && {
        let size = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        size >= 0 && buf.len() - 4 >= size as usize
    };
    if ready { Ok(()) } else { w.flush().await }
}

/// Client → upstream: each request's header is read, noted in the FIFO, and the request is
/// forwarded; bodies past the first [`frame::REQUEST_PREFIX`] bytes are streamed, not held.
async fn requests<R, W, L>(
    shared: &Shared,
    to: &Upstream,
    mut leave: std::pin::Pin<&mut L>,
    client: &mut BufReader<R>,
    mut server: W,
    fifo: mpsc::Sender<RequestHeader>,
    state: Both,
) -> Result<Stopped, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    L: std::future::Future<Output = ()>,
{
    let max = shared.cfg.max_frame_bytes;
    let bytes =
        metrics::counter!("mskdns_proxy_bytes_total", "proxy" => shared.label.clone(), "direction" => "to_upstream");
    let mut prefix = vec![0u8; frame::REQUEST_PREFIX];
    let mut by_api: BTreeMap<i16, metrics::Counter> = BTreeMap::new();
    loop {
        // Leaving is looked at only between requests, and first: one that has begun is forwarded
        // whole, and a client that keeps sending still stops at the next boundary (requests it
        // sent after are not forwarded: unanswered on a closed connection, a client sends them
        // again on its next one).
        let size = tokio::select! {
            biased;
            _ = &mut leave => {
                server.flush().await?;
                return Ok(Stopped::Draining);
            }
            r = read_size(client) => r?,
        };
        let Some(size) = size else { return Ok(Stopped::ClientDone) };
        let n = frame::frame_size(size, max).map_err(ConnError::ClientFrame)?;
        let head = n.min(frame::REQUEST_PREFIX);
        client.read_exact(&mut prefix[..head]).await?;
        touch(&state.activity);
        let h = frame::parse_request(&prefix[..head]).map_err(ConnError::ClientFrame)?;
        if rewrite::refused(h.api_key, h.api_version) {
            return Err(ConnError::Refused(api_name(h.api_key), h.api_version));
        }
        // The registry is asked once per connection and api key, not once per request.
        by_api
            .entry(h.api_key)
            .or_insert_with(|| {
                metrics::counter!("mskdns_proxy_requests_total", "proxy" => shared.label.clone(), "api_key" => api_name(h.api_key))
            })
            .increment(1);
        if h.expects_response {
            // Bounded: with MAX_INFLIGHT unanswered requests, stop reading from the client,
            // after sending on what is held (the answers that free the FIFO need it).
            let closed = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
            match fifo.try_send(h) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(h)) => {
                    server.flush().await?;
                    fifo.send(h).await.map_err(|_| closed())?;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(closed().into()),
            }
            state.pending.fetch_add(1, Ordering::Relaxed);
        } else {
            // Remembered (the most recent ones) in case the broker answers anyway.
            let mut q = state.acks0.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() == MAX_ACKS0 {
                q.pop_front();
            }
            q.push_back(h.correlation_id);
        }
        forward(client, &mut server, (size, &prefix[..head], n), h, to).await?;
        flush_unless_more(client, &mut server).await?;
        bytes.increment(4 + n as u64);
    }
}

/// Forwards a request whose size prefix and first bytes (`prefix` of `n`) were read: as it is,
/// or with its topic ids translated for the cluster.
async fn forward<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    client: &mut BufReader<R>,
    server: &mut W,
    (size, prefix, n): ([u8; 4], &[u8], usize),
    h: RequestHeader,
    to: &Upstream,
) -> Result<(), ConnError> {
    if to.ids.mapped() && topic_ids::in_request(h.api_key, h.api_version) {
        let request = translated(client, prefix, n, h, &to.ids).await?;
        server.write_all(&request).await?;
    } else {
        server.write_all(&size).await?;
        server.write_all(prefix).await?;
        copy_exact(client, server, (n - prefix.len()) as u64).await?;
    }
    Ok(())
}

/// A request that names topic ids, read whole (its first `prefix` bytes already read), with the
/// ids clients were shown translated to the cluster's (topic_ids.rs).
async fn translated<R: AsyncRead + Unpin>(
    client: &mut BufReader<R>,
    prefix: &[u8],
    n: usize,
    h: RequestHeader,
    ids: &topic_ids::TopicIds,
) -> Result<BytesMut, ConnError> {
    let name = || api_name(h.api_key);
    if n > topic_ids::MAX_REQUEST {
        return Err(ConnError::Translate(name(), h.api_version, format!("{n} bytes, over {}", topic_ids::MAX_REQUEST)));
    }
    let mut message = BytesMut::with_capacity(n);
    message.extend_from_slice(prefix);
    message.resize(n, 0);
    client.read_exact(&mut message[prefix.len()..]).await?;
    topic_ids::request(h.api_key, h.api_version, message.freeze(), ids)
        .map_err(|e| ConnError::Translate(name(), h.api_version, e))
}

/// Upstream → client: each response is matched with the oldest request waiting; those that
/// carry broker addresses are rewritten, the rest streamed through unchanged.
async fn responses<R, W>(
    shared: &Arc<Shared>,
    to: &Upstream,
    mut server: BufReader<R>,
    client: &mut W,
    mut fifo: mpsc::Receiver<RequestHeader>,
    state: Both,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max = shared.cfg.max_frame_bytes;
    let bytes =
        metrics::counter!("mskdns_proxy_bytes_total", "proxy" => shared.label.clone(), "direction" => "to_client");
    let acks0_dropped =
        metrics::counter!("mskdns_proxy_acks0_responses_dropped_total", "proxy" => shared.label.clone());
    loop {
        let Some(size) = read_size(&mut server).await? else { return Ok(()) };
        let n = frame::frame_size(size, max).map_err(ConnError::UpstreamFrame)?;
        let mut corr = [0u8; 4];
        if n < 4 {
            return Err(ConnError::UpstreamFrame(FrameError::Truncated));
        }
        server.read_exact(&mut corr).await?;
        touch(&state.activity);
        let got = i32::from_be_bytes(corr);
        if answers_acks0(&state.acks0, got) {
            acks0_dropped.increment(1);
            copy_exact(&mut server, &mut tokio::io::sink(), (n - 4) as u64).await?;
            bytes.increment(4 + n as u64);
            continue;
        }
        let want = fifo.try_recv().map_err(|_| ConnError::Unexpected)?;
        if got != want.correlation_id {
            return Err(ConnError::Correlation { got, want: want.correlation_id });
        }
        if hints::streamed(want.api_key, want.api_version, n, &to.ids) {
            let (api, version) = (want.api_key, want.api_version);
            let tail = hints::forward_head((api, version), &mut server, client, (n, corr), &to.ids).await?;
            let (out, done) =
                over_registry(shared, to, |ports| hints::rewrite_tail(api, version, &tail, &shared.advertise, ports))
                    .await?;
            client.write_all(out.as_deref().unwrap_or(&tail)).await?;
            count_rewrite(shared, api, &done);
        } else if decoded_whole(want, to) {
            let mut message = BytesMut::with_capacity(n);
            message.extend_from_slice(&corr);
            message.resize(n, 0);
            server.read_exact(&mut message[4..]).await?;
            let message: Bytes = message.freeze();
            let (api, version) = (want.api_key, want.api_version);
            let (out, done) = over_registry(shared, to, |ports| {
                rewrite::rewrite(api, version, message.clone(), &shared.advertise, ports, &to.ids)
            })
            .await?;
            count_rewrite(shared, want.api_key, &done);
            match out {
                Some(out) => client.write_all(&out).await?,
                None => {
                    client.write_all(&size).await?;
                    client.write_all(&message).await?;
                }
            }
        } else {
            client.write_all(&size).await?;
            client.write_all(&corr).await?;
            copy_exact(&mut server, client, (n - 4) as u64).await?;
        }
        flush_unless_more(&server, client).await?;
        bytes.increment(4 + n as u64);
        // Counted as answered once written: the last one of a draining connection goes out now,
        // and only then is it counted (the drain closes the connection when none is owed).
        if state.pending.load(Ordering::Relaxed) == 1 {
            client.flush().await?;
        }
        state.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether the response to `want` is read whole and decoded: it carries broker addresses, or
/// topic ids to translate.
fn decoded_whole(want: RequestHeader, to: &Upstream) -> bool {
    rewrite::needs_rewrite(want.api_key, want.api_version)
        || (to.ids.mapped() && topic_ids::in_response(want.api_key, want.api_version))
}

/// Rewrites a response over the registry's port map. The registry learns from the brokers it
/// named; when one had no port, it gets one (bound before this returns) and the response is
/// rewritten again, so that a client never sees a broker it cannot reach through us. A response
/// from a cluster the proxy has switched away from teaches nothing: its brokers are not where the
/// ports lead any more.
async fn over_registry<T>(
    shared: &Arc<Shared>,
    from: &Upstream,
    rewrite: impl Fn(&dyn rewrite::Ports) -> Result<(T, rewrite::Rewritten), rewrite::RewriteError>,
) -> Result<(T, rewrite::Rewritten), rewrite::RewriteError> {
    let (out, done) = rewrite(shared.port_map().as_ref())?;
    let current = std::ptr::eq(Arc::as_ptr(&shared.current.load()), from);
    if current && shared.learn(&done.nodes).await {
        return rewrite(shared.port_map().as_ref());
    }
    Ok((out, done))
}

/// Some brokers answer acks=0 Produce requests: the client expects nothing, so the answer with
/// correlation id `got` is dropped, not treated as a broken stream.
fn answers_acks0(acks0: &Mutex<VecDeque<i32>>, got: i32) -> bool {
    let mut q = acks0.lock().unwrap_or_else(|e| e.into_inner());
    q.iter().position(|&c| c == got).map(|i| q.drain(..=i).count()).is_some()
}

fn count_rewrite(shared: &Shared, api_key: i16, done: &rewrite::Rewritten) {
    if done.addresses > 0 || done.dropped > 0 || done.unfit > 0 {
        metrics::counter!("mskdns_proxy_rewrites_total", "proxy" => shared.label.clone(), "api_key" => api_name(api_key))
            .increment(1);
    }
    if done.unfit > 0 {
        metrics::counter!("mskdns_proxy_leader_hints_unfit_total", "proxy" => shared.label.clone())
            .increment(done.unfit as u64);
    }
}

/// The API's name as Kafka spells it (`Produce`, `DescribeQuorum`, …), for metric labels.
fn api_name(key: i16) -> String {
    match kafka_protocol::messages::ApiKey::try_from(key) {
        Ok(k) => format!("{k:?}"),
        Err(_) => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::Proxy;
    use crate::proxy::ports::registry::tests::config;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    /// A Heartbeat v4 request (flexible header: api key, version, correlation id, null client
    /// id, no tags) with an empty body, as the client sends it.
    fn heartbeat(correlation_id: i32) -> Vec<u8> {
        let mut m = vec![0, 12, 0, 4];
        m.extend_from_slice(&correlation_id.to_be_bytes());
        m.extend_from_slice(&[0xff, 0xff, 0]);
        let mut f = (m.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&m);
        f
    }

    fn shared(idle_secs: u64) -> (Arc<Shared>, TaskTracker, CancellationToken) {
        let mut cfg = config(60);
        cfg.idle_timeout_secs = idle_secs;
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let p = Proxy::bind(0, &cfg, tasks.clone(), shutdown.clone()).unwrap();
        (p.shared, tasks, shutdown)
    }

    #[tokio::test]
    async fn requests_go_up_as_they_came_and_answers_come_back_in_order() {
        let (shared, _tasks, _stop) = shared(60);
        let (mut client, proxy_client) = duplex(1 << 16);
        let (proxy_server, mut broker) = duplex(1 << 16);
        let (cr, cw) = tokio::io::split(proxy_client);
        let (sr, sw) = tokio::io::split(proxy_server);
        let relay = tokio::spawn(async move { relay(&shared, &shared.current.load_full(), cr, cw, sr, sw).await });

        client.write_all(&[heartbeat(1), heartbeat(2)].concat()).await.unwrap();
        let mut got = vec![0u8; 2 * heartbeat(1).len()];
        broker.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [heartbeat(1), heartbeat(2)].concat(), "forwarded byte for byte");
        // The broker answers both (size, correlation id, header tags, error code, tags).
        for id in [1i32, 2] {
            let mut r = vec![0, 0, 0, 8];
            r.extend_from_slice(&id.to_be_bytes());
            r.extend_from_slice(&[0, 0, 0, 0]);
            broker.write_all(&r).await.unwrap();
        }
        let mut back = [0u8; 24];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back[4..8], &1i32.to_be_bytes());
        assert_eq!(&back[16..20], &2i32.to_be_bytes());
        // An answer nobody asked for ends the connection.
        broker.write_all(&[0, 0, 0, 8, 0, 0, 0, 9, 0, 0, 0, 0]).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), relay).await.unwrap().unwrap();
        assert!(matches!(ended, Err(ConnError::Unexpected)), "{ended:?}");
    }

    /// Shutdown while a request is with the broker: its answer still reaches the client, a request
    /// sent after shutdown is not forwarded, and the connection then closes (before the grace).
    #[tokio::test]
    async fn a_draining_connection_delivers_the_answers_it_owes_then_closes_at_a_request_boundary() {
        let (shared, _tasks, stop) = shared(60);
        let (mut client, proxy_client) = duplex(1 << 16);
        let (proxy_server, mut broker) = duplex(1 << 16);
        let (cr, cw) = tokio::io::split(proxy_client);
        let (sr, sw) = tokio::io::split(proxy_server);
        let relay = tokio::spawn(async move { relay(&shared, &shared.current.load_full(), cr, cw, sr, sw).await });
        client.write_all(&heartbeat(1)).await.unwrap();
        let mut got = vec![0u8; heartbeat(1).len()];
        broker.read_exact(&mut got).await.unwrap();
        stop.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!relay.is_finished(), "an answer is owed: the connection waits for it");
        client.write_all(&heartbeat(2)).await.unwrap();
        broker.write_all(&[0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0]).await.unwrap();
        let mut back = [0u8; 12];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back[4..8], &1i32.to_be_bytes(), "the answer owed was delivered");
        let ended = tokio::time::timeout(Duration::from_secs(5), relay).await.expect("closed, well within the grace");
        assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
        // Nothing of the request sent after shutdown reached the broker.
        let mut rest = Vec::new();
        broker.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }

    /// The end of stream of a drained connection comes apart from its last answer (a client that
    /// reads both in one go may drop the answer), and what the client sends meanwhile is dropped.
    #[tokio::test(start_paused = true)]
    async fn the_end_of_stream_comes_a_moment_after_the_last_answer() {
        let (shared, _tasks, stop) = shared(60);
        let (mut client, mut broker, relay) = connect_one(&shared);
        client.write_all(&heartbeat(1)).await.unwrap();
        let mut got = vec![0u8; heartbeat(1).len()];
        broker.read_exact(&mut got).await.unwrap();
        stop.cancel();
        tokio::time::sleep(Duration::from_millis(10)).await;
        broker.write_all(&[0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0]).await.unwrap();
        let mut back = [0u8; 12];
        client.read_exact(&mut back).await.unwrap();
        let answered = Instant::now();
        client.write_all(&heartbeat(2)).await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let apart = answered.elapsed();
        assert!(apart >= BEFORE_FIN && apart < BEFORE_FIN + Duration::from_millis(50), "{apart:?}");
        drop(client);
        assert!(matches!(relay.await.unwrap(), Ok(())));
        let mut upstream = Vec::new();
        broker.read_to_end(&mut upstream).await.unwrap();
        assert!(upstream.is_empty(), "nothing sent after the boundary went up: {upstream:?}");
    }

    /// The idle timer on tokio's paused clock: a connection silent for idle_timeout_secs ends;
    /// every request moves the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_connection_idle_for_the_timeout_ends_and_traffic_moves_the_deadline() {
        let (shared, _tasks, _stop) = shared(600);
        let (mut client, proxy_client) = duplex(1 << 16);
        let (proxy_server, mut broker) = duplex(1 << 16);
        let (cr, cw) = tokio::io::split(proxy_client);
        let (sr, sw) = tokio::io::split(proxy_server);
        let started = Instant::now();
        let relay = tokio::spawn(async move { relay(&shared, &shared.current.load_full(), cr, cw, sr, sw).await });
        tokio::time::sleep(Duration::from_secs(500)).await;
        client.write_all(&heartbeat(1)).await.unwrap();
        let mut got = vec![0u8; heartbeat(1).len()];
        broker.read_exact(&mut got).await.unwrap();
        let ended = relay.await.unwrap();
        assert!(matches!(ended, Err(ConnError::Idle(_))), "{ended:?}");
        let lasted = started.elapsed();
        assert!(lasted >= Duration::from_secs(1100) && lasted < Duration::from_secs(1110), "{lasted:?}");
    }

    /// A relay of a client connection to the cluster the proxy leads to now.
    fn connect_one(
        shared: &Arc<Shared>,
    ) -> (tokio::io::DuplexStream, tokio::io::DuplexStream, tokio::task::JoinHandle<Result<(), ConnError>>) {
        let (client, proxy_client) = duplex(1 << 16);
        let (proxy_server, broker) = duplex(1 << 16);
        let (cr, cw) = tokio::io::split(proxy_client);
        let (sr, sw) = tokio::io::split(proxy_server);
        let (shared, to) = (shared.clone(), shared.current.load_full());
        let relay = tokio::spawn(async move {
            let _counted = to.enter();
            relay(&shared, &to, cr, cw, sr, sw).await
        });
        (client, broker, relay)
    }

    fn switched(shared: &Arc<Shared>, upstream: &str, drain_secs: u64) -> Arc<Upstream> {
        let old = shared.current.load_full();
        let mut to = shared.cfg.clone();
        to.upstream = upstream.into();
        to.switch_drain_secs = drain_secs;
        shared.switch(&to, &Arc::default()).unwrap();
        old
    }

    fn answer(id: i32) -> [u8; 12] {
        let mut r = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0];
        r[4..8].copy_from_slice(&id.to_be_bytes());
        r
    }

    /// A switch: the idle connection closes at once; the busy one delivers the answer it owes,
    /// forwards nothing sent after the switch, then closes; a new one goes to the new cluster.
    #[tokio::test]
    async fn a_switch_closes_idle_connections_at_once_and_busy_ones_after_their_answers() {
        let (shared, _tasks, _stop) = shared(60);
        let (_idle_client, _idle_broker, idle) = connect_one(&shared);
        let (mut client, mut broker, busy) = connect_one(&shared);
        client.write_all(&heartbeat(1)).await.unwrap();
        let mut got = vec![0u8; heartbeat(1).len()];
        broker.read_exact(&mut got).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let old = switched(&shared, "127.0.0.1:10", 30);
        assert_eq!(shared.current.load().bootstrap, "127.0.0.1:10");
        let ended = tokio::time::timeout(Duration::from_secs(2), idle).await.expect("the idle one closed at once");
        assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
        assert!(!busy.is_finished(), "an answer is owed");
        // Past its turn (connections leave paced): what it sends now is not forwarded.
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(&heartbeat(2)).await.unwrap();
        broker.write_all(&answer(1)).await.unwrap();
        let mut back = [0u8; 12];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(back, answer(1), "the answer owed was delivered");
        let ended = tokio::time::timeout(Duration::from_secs(5), busy).await.expect("closed after its answer");
        assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
        let mut rest = Vec::new();
        broker.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing sent after the switch reached the old cluster: {rest:?}");
        assert_eq!(old.active(), 0);
        assert_eq!(old.left(), [1, 1, 0]);
    }

    /// A client that never pauses still stops at the next request boundary, not at the drain time.
    #[tokio::test]
    async fn a_client_that_keeps_sending_leaves_at_a_request_boundary() {
        let (shared, _tasks, _stop) = shared(60);
        let (client, broker, relay) = connect_one(&shared);
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let (mut broker_r, mut broker_w) = tokio::io::split(broker);
        let sender = tokio::spawn(async move {
            let mut id = 0;
            loop {
                id += 1;
                if client_w.write_all(&heartbeat(id)).await.is_err() {
                    return id;
                }
                tokio::task::yield_now().await;
            }
        });
        // The broker answers whatever reaches it.
        tokio::spawn(async move {
            let mut frame = vec![0u8; heartbeat(1).len()];
            while broker_r.read_exact(&mut frame).await.is_ok() {
                let id = i32::from_be_bytes([frame[8], frame[9], frame[10], frame[11]]);
                if broker_w.write_all(&answer(id)).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move { while client_r.read(&mut [0u8; 4096]).await.is_ok_and(|n| n > 0) {} });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let old = switched(&shared, "127.0.0.1:10", 30);
        let ended = tokio::time::timeout(Duration::from_secs(5), relay).await.expect("left well before the drain time");
        assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
        assert_eq!(old.left()[2], 0, "not cut");
        sender.abort();
    }

    /// On tokio's paused clock: a connection whose answer never comes is cut at switch_drain_secs.
    #[tokio::test(start_paused = true)]
    async fn a_connection_still_owed_an_answer_is_cut_at_the_drain_time() {
        let (shared, _tasks, _stop) = shared(600);
        let (mut client, mut broker, relay) = connect_one(&shared);
        client.write_all(&heartbeat(1)).await.unwrap();
        let mut got = vec![0u8; heartbeat(1).len()];
        broker.read_exact(&mut got).await.unwrap();
        let started = Instant::now();
        let old = switched(&shared, "127.0.0.1:10", 20);
        let ended = relay.await.unwrap();
        assert!(matches!(ended, Ok(())), "{ended:?}");
        let lasted = started.elapsed();
        assert!(lasted >= Duration::from_secs(20) && lasted < Duration::from_secs(21), "{lasted:?}");
        assert_eq!(old.left(), [0, 0, 1]);
    }

    /// Many idle connections take turns: all gone by half the drain time, not all at once.
    #[tokio::test(start_paused = true)]
    async fn idle_connections_leave_paced_within_half_the_drain_time() {
        let (shared, _tasks, _stop) = shared(600);
        let mut conns = Vec::new();
        for _ in 0..400 {
            conns.push(connect_one(&shared));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let started = Instant::now();
        let old = switched(&shared, "127.0.0.1:10", 4);
        let mut ends = Vec::new();
        for (_c, _b, relay) in conns {
            relay.await.unwrap().unwrap();
            ends.push(started.elapsed());
        }
        let last = *ends.iter().max().unwrap();
        // 400 in 2 s: 200 a second (more than the 100/s floor); each then sends its end of stream
        // after BEFORE_FIN and waits a second for its client (which never closes here) to close.
        let linger = BEFORE_FIN + Duration::from_secs(1);
        assert!(last >= linger + Duration::from_millis(1900) && last <= linger + Duration::from_secs(2), "{last:?}");
        assert!(ends.iter().filter(|e| **e < linger + Duration::from_millis(500)).count() < 150, "paced, not at once");
        assert_eq!(old.left(), [400, 0, 0]);
    }
}
