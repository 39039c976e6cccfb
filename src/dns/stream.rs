//! What every DNS stream transport (TCP, DoT, DoH) is bounded by, the limits a connection is
//! served with, and one TCP or DoT connection served: queries read as they arrive (pipelined),
//! answers written in batches, misses answered out of order by their own tasks, a connection's
//! misses bounded. The listeners themselves are in [`super::server`] and [`super::doh`].

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::engine::{Engine, Handled, Origin, ServFail};

/// TCP limits: connections at once (in all and per client address), how long a connection may
/// go without completing a query, and how long writing one answer may take.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    pub max_connections: usize,
    pub max_per_client: usize,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    /// TCP_NODELAY on TCP and DoT connections (DoH always has it).
    pub nodelay: bool,
}

/// Queries of one connection being resolved at once; past it, the next query is read only when
/// one of them is answered (RFC 7766 section 6.2.1.1: answers go out as they are ready).
pub const TCP_INFLIGHT_PER_CONNECTION: usize = 64;

/// Bytes read ahead from a TCP or DoT client: a pipelining client's queries come in with one read.
pub const TCP_READ_BUFFER: usize = 16 * 1024;

/// Answers gathered while more queries are already read, written in one go (one write, one
/// segment or TLS record) once no complete query is left in the read buffer or past this size.
/// This is what Nagle's algorithm would buy without its wait: a lone query is answered at once.
pub const TCP_ANSWER_BATCH: usize = 16 * 1024;

/// One write at a time on a connection's write side, from the reader (cache hits and our own
/// answers, gathered) and from the misses resolving beside it.
struct Writer<W> {
    half: tokio::sync::Mutex<(W, Vec<u8>)>,
    timeout: Duration,
    /// Set when a write failed or timed out: the connection is over.
    failed: CancellationToken,
}

impl<W: tokio::io::AsyncWrite + Unpin> Writer<W> {
    fn new(half: W, timeout: Duration) -> Self {
        Writer {
            half: tokio::sync::Mutex::new((half, Vec::with_capacity(4098))),
            timeout,
            failed: CancellationToken::new(),
        }
    }

    /// One answer, framed here.
    async fn send(&self, answer: &[u8]) -> io::Result<()> {
        let mut guard = tokio::select! {
            g = self.half.lock() => g,
            () = self.failed.cancelled() => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the connection failed")),
        };
        let (half, framed) = &mut *guard;
        framed.clear();
        push_framed(framed, answer);
        self.write(half, framed).await
    }

    /// Answers framed by the caller.
    async fn send_framed(&self, framed: &[u8]) -> io::Result<()> {
        let mut guard = self.half.lock().await;
        self.write(&mut guard.0, framed).await
    }

    async fn write(&self, half: &mut W, bytes: &[u8]) -> io::Result<()> {
        // Writes queued behind one that failed fail at once, not after a timeout each.
        if self.failed.is_cancelled() {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "an earlier answer could not be written"));
        }
        let mut write = std::pin::pin!(async {
            half.write_all(bytes).await?;
            half.flush().await
        });
        // Most writes are done at the first try; only one that has to wait gets a timer.
        let r = match std::future::poll_fn(|cx| std::task::Poll::Ready(write.as_mut().poll(cx))).await {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => match tokio::time::timeout(self.timeout, write).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "client does not read its answers")),
            },
        };
        if r.is_err() {
            self.failed.cancel();
        }
        r
    }
}

/// An answer with its two-byte length in front (RFC 1035 section 4.2.2).
fn push_framed(out: &mut Vec<u8>, answer: &[u8]) {
    out.extend_from_slice(&(answer.len() as u16).to_be_bytes());
    out.extend_from_slice(answer);
}

/// Whether `buffered` starts with a whole length-prefixed message.
fn holds_message(buffered: &[u8]) -> bool {
    framed_len(buffered).is_some_and(|len| buffered.len() - 2 >= len)
}

/// The length in front of the message `buffered` starts with, once its two bytes are there.
fn framed_len(buffered: &[u8]) -> Option<usize> {
    match *buffered {
        [hi, lo, ..] => Some(usize::from(u16::from_be_bytes([hi, lo]))),
        _ => None,
    }
}

/// The read side of a stream connection: bytes read ahead into one buffer, queries taken out of
/// it whole. Reading is cancel-safe (a read interrupted by a timer or a failed write loses
/// nothing), and the buffer holds [`TCP_READ_BUFFER`] bytes unless a larger message comes: it
/// grows to hold that one (64 KiB at most) and shrinks again once it has been read out empty.
struct Inbox {
    bytes: Vec<u8>,
    /// Where the unread bytes start in `bytes`.
    start: usize,
}

impl Inbox {
    fn new() -> Self {
        Inbox { bytes: Vec::with_capacity(TCP_READ_BUFFER), start: 0 }
    }

    fn unread(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    /// Whether a whole message is waiting.
    fn holds_message(&self) -> bool {
        holds_message(self.unread())
    }

    /// The next whole message's place in `bytes`, if one is waiting (it is taken out).
    fn take(&mut self) -> io::Result<Option<std::ops::Range<usize>>> {
        let unread = self.unread();
        let Some(len) = framed_len(unread).filter(|&len| unread.len() - 2 >= len) else { return Ok(None) };
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "zero-length message"));
        }
        let at = self.start + 2;
        self.start = at + len;
        Ok(Some(at..at + len))
    }

    /// Reads what the peer has sent, at least one byte or the end of the stream (`Ok(0)`).
    async fn fill<R: tokio::io::AsyncRead + Unpin>(&mut self, rd: &mut R) -> io::Result<usize> {
        let have = self.bytes.len() - self.start;
        if have == 0 && self.bytes.capacity() > TCP_READ_BUFFER {
            self.bytes = Vec::with_capacity(TCP_READ_BUFFER);
        } else if self.start > 0 {
            self.bytes.copy_within(self.start.., 0);
            self.bytes.truncate(have);
        }
        self.start = 0;
        // The message being read must fit whole (65,537 bytes at most, its length included).
        let want = 2 + framed_len(&self.bytes).unwrap_or(0);
        if want > self.bytes.capacity() {
            self.bytes.reserve_exact(want - self.bytes.len());
        }
        rd.read_buf(&mut self.bytes).await
    }
}

/// Length-prefixed queries on a stream (TCP, or DoT once TLS is up), answered out of order:
/// hits at once, misses each in a task of their own, at most [`TCP_INFLIGHT_PER_CONNECTION`].
/// When the client stops sending (end of stream or idle), the answers still due are sent first.
pub async fn stream_connection<R, W>(
    engine: &Arc<Engine>,
    mut rd: R,
    wr: W,
    from: Origin,
    limits: TcpLimits,
    stop: &CancellationToken,
) -> io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let writer = Arc::new(Writer::new(wr, limits.write_timeout));
    let inflight = Arc::new(Semaphore::new(TCP_INFLIGHT_PER_CONNECTION));
    // Cancelled when this function returns, however it returns: the miss tasks end with it.
    let gone = CancellationToken::new();
    let _gone = gone.clone().drop_guard();
    let mut inbox = Inbox::new();
    let mut out = Vec::with_capacity(4096);
    let mut batch = Vec::with_capacity(TCP_ANSWER_BATCH);
    // One timer and one wait for a failed write for the connection's life, not one per query:
    // only a complete query moves the idle deadline (a trickle of bytes does not), and the timer
    // is moved to it only when it fires early.
    let mut last_query = tokio::time::Instant::now();
    let idle = tokio::time::sleep_until(last_query + limits.idle_timeout);
    tokio::pin!(idle);
    let failed = writer.failed.clone().cancelled_owned();
    tokio::pin!(failed);
    let ended = loop {
        // Gathered answers leave before the reader would wait for the client.
        if !batch.is_empty() && (batch.len() >= TCP_ANSWER_BATCH || !inbox.holds_message()) {
            writer.send_framed(&batch).await?;
            batch.clear();
        }
        let at = match next_query(&mut inbox, &mut rd, idle.as_mut(), last_query, limits, failed.as_mut(), stop).await {
            Next::Query(at) => at,
            Next::Ended(r) => break r,
            Next::Failed => return Err(write_failed()),
        };
        last_query = tokio::time::Instant::now();
        let pkt = &inbox.bytes[at];
        match engine.handle(pkt, from, &mut out) {
            Handled::Reply => push_framed(&mut batch, &out),
            Handled::ReplyAndPrefetch => {
                push_framed(&mut batch, &out);
                engine.spawn_prefetch(pkt, from);
            }
            Handled::Miss => {
                let Some(local) = miss_slot(&inflight, &writer, &mut batch, failed.as_mut()).await? else {
                    break Ok(());
                };
                // Past `dns.max_inflight` (all transports together): SERVFAIL at once.
                match engine.miss_permit() {
                    Some(permit) => spawn_miss(engine, &writer, pkt, from, (local, permit), &gone),
                    None => {
                        if engine.servfail(pkt, from, &mut out, ServFail::Busy) == Handled::Reply {
                            push_framed(&mut batch, &out);
                        }
                    }
                }
            }
            Handled::Drop => {}
        }
    };
    if !batch.is_empty() {
        writer.send_framed(&batch).await?;
    }
    // The client is done sending (or broke the framing): the answers it is owed still go out.
    tokio::select! {
        _ = inflight.acquire_many(TCP_INFLIGHT_PER_CONNECTION as u32) => {}
        _ = writer.failed.cancelled() => {}
    }
    ended
}

/// One of the connection's miss slots. At its cap, reading stops until a miss is answered (the
/// client waits, not memory), its gathered answers sent first; a failed write ends the wait (and
/// the connection). `None`: the slots are closed.
async fn miss_slot<W, F>(
    inflight: &Arc<Semaphore>,
    writer: &Writer<W>,
    batch: &mut Vec<u8>,
    failed: std::pin::Pin<&mut F>,
) -> io::Result<Option<tokio::sync::OwnedSemaphorePermit>>
where
    W: tokio::io::AsyncWrite + Unpin,
    F: std::future::Future<Output = ()>,
{
    if inflight.available_permits() == 0 && !batch.is_empty() {
        writer.send_framed(batch).await?;
        batch.clear();
    }
    tokio::select! {
        p = inflight.clone().acquire_owned() => Ok(p.ok()),
        () = failed => Err(write_failed()),
    }
}

fn write_failed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "writing an answer failed")
}

/// What the read side of a stream connection found next.
enum Next {
    /// A whole query, at this place in the inbox's bytes.
    Query(std::ops::Range<usize>),
    /// The client is done (`Ok`: at a message boundary) or broke the framing or went idle.
    Ended(io::Result<()>),
    /// Writing an answer failed: the connection is over.
    Failed,
}

/// Reads until a whole query is in `inbox`, the client ends or stalls (no query completed for
/// the idle timeout since `last_query`), or a write fails.
async fn next_query<R: tokio::io::AsyncRead + Unpin>(
    inbox: &mut Inbox,
    rd: &mut R,
    mut idle: std::pin::Pin<&mut tokio::time::Sleep>,
    last_query: tokio::time::Instant,
    limits: TcpLimits,
    mut failed: std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFutureOwned>,
    stop: &CancellationToken,
) -> Next {
    loop {
        match inbox.take() {
            Ok(Some(at)) => return Next::Query(at),
            Ok(None) => {}
            Err(e) => return Next::Ended(Err(e)),
        }
        // Shutting down: the queries already read were answered; nothing more is read.
        if stop.is_cancelled() {
            return Next::Ended(Ok(()));
        }
        tokio::select! {
            biased;
            () = failed.as_mut() => return Next::Failed,
            () = stop.cancelled() => return Next::Ended(Ok(())),
            r = inbox.fill(rd) => match r {
                Ok(0) if inbox.unread().is_empty() => return Next::Ended(Ok(())),
                Ok(0) => return Next::Ended(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "ended mid-message"))),
                Ok(_) => {}
                Err(e) => return Next::Ended(Err(e)),
            },
            () = idle.as_mut() => {
                let due = last_query + limits.idle_timeout;
                if due > tokio::time::Instant::now() {
                    idle.as_mut().reset(due);
                } else if inbox.unread().is_empty() {
                    return Next::Ended(Ok(()));
                } else {
                    return Next::Ended(Err(io::Error::new(io::ErrorKind::TimedOut, "stalled mid-message")));
                }
            }
        }
    }
}

/// Resolves a miss in a task of its own that answers on `writer`, holding the connection's slot
/// and the engine's; the task ends with its connection (`gone`).
fn spawn_miss<W: tokio::io::AsyncWrite + Unpin + Send + 'static>(
    engine: &Arc<Engine>,
    writer: &Arc<Writer<W>>,
    pkt: &[u8],
    from: Origin,
    (local, permit): (tokio::sync::OwnedSemaphorePermit, super::engine::MissPermit),
    gone: &CancellationToken,
) {
    let (engine, writer, pkt, gone) = (engine.clone(), writer.clone(), pkt.to_vec(), gone.clone());
    engine.clone().tasks().spawn(async move {
        let _local = local;
        let mut out = Vec::with_capacity(512);
        tokio::select! {
            h = engine.resolve(&pkt, from, &mut out, permit) => if h == Handled::Reply {
                let _ = writer.send(&out).await;
            },
            () = gone.cancelled() => {}
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::dns::engine::Transport;
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::task::{Context, Poll};

    const BOOT: &str = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com.";

    fn engine() -> Arc<Engine> {
        let config = Config::parse_toml(&format!(
            r#"
            [dns]
            upstreams = ["127.0.0.1:9"]
            allow = ["127.0.0.0/8"]
            rate_limit = 0
            [[clusters]]
            bootstrap = "{}"
            addresses = ["10.1.0.10"]
            "#,
            BOOT.trim_end_matches('.')
        ))
        .unwrap();
        Engine::from_config(&config).unwrap()
    }

    fn framed_query(id: u16) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(BOOT).unwrap(), RecordType::A));
        let wire = m.to_vec().unwrap();
        let mut out = Vec::new();
        push_framed(&mut out, &wire);
        out
    }

    /// Splits length-prefixed answers; each one's id and its A records.
    fn answers(mut bytes: &[u8]) -> Vec<(u16, Vec<String>)> {
        let mut seen = Vec::new();
        while !bytes.is_empty() {
            let len = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
            let m = Message::from_vec(&bytes[2..2 + len]).unwrap();
            let ips =
                m.answers.iter().filter_map(|r| if let RData::A(a) = &r.data { Some(a.to_string()) } else { None });
            seen.push((m.metadata.id, ips.collect()));
            bytes = &bytes[2 + len..];
        }
        seen
    }

    fn limits() -> TcpLimits {
        TcpLimits {
            max_connections: 1,
            max_per_client: 1,
            idle_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            nodelay: true,
        }
    }

    fn origin() -> Origin {
        Origin { client: [127, 0, 0, 1].into(), port: 5300, listener: 0, transport: Transport::Tcp }
    }

    /// Records every write call it gets.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl tokio::io::AsyncWrite for Writes {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(b.to_vec());
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn pipelined_queries_read_together_are_answered_in_one_write() {
        let queries: Vec<u8> = (1..=40).flat_map(framed_query).collect();
        let writes = Writes::default();
        stream_connection(&engine(), &queries[..], writes.clone(), origin(), limits(), &CancellationToken::new())
            .await
            .unwrap();
        let writes = writes.0.lock().unwrap().clone();
        assert_eq!(writes.len(), 1, "one write for the 40 answers");
        let got = answers(&writes[0]);
        assert_eq!(got.iter().map(|a| a.0).collect::<Vec<_>>(), (1..=40).collect::<Vec<_>>());
        assert!(got.iter().all(|a| a.1 == ["10.1.0.10"]));
    }

    #[tokio::test]
    async fn a_lone_query_is_answered_before_the_next_one_is_sent() {
        let (mut client, served) = serve_in_memory();
        for id in [7, 8] {
            client.write_all(&framed_query(id)).await.unwrap();
            // An answer held back for a next query would never come: fail instead of hanging.
            let answer = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut client))
                .await
                .expect("answered without a next query");
            assert_eq!(answer, (id, vec!["10.1.0.10".to_string()]));
        }
        drop(client);
        served.await.unwrap().unwrap();
    }

    /// A connection served over an in-memory pipe: the client's end and the serving task.
    fn serve_in_memory() -> (tokio::io::DuplexStream, tokio::task::JoinHandle<io::Result<()>>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (rd, wr) = tokio::io::split(server);
        let engine = engine();
        (
            client,
            tokio::spawn(async move {
                stream_connection(&engine, rd, wr, origin(), limits(), &CancellationToken::new()).await
            }),
        )
    }

    /// Shutdown: the queries already read are answered, nothing more is read, the connection
    /// ends cleanly.
    #[tokio::test]
    async fn on_shutdown_a_connection_answers_what_it_read_then_ends() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (rd, wr) = tokio::io::split(server);
        let engine = engine();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let served = tokio::spawn(async move { stream_connection(&engine, rd, wr, origin(), limits(), &s).await });
        client.write_all(&[framed_query(1), framed_query(2)].concat()).await.unwrap();
        assert_eq!(read_answer(&mut client).await.0, 1);
        assert_eq!(read_answer(&mut client).await.0, 2);
        stop.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), served).await.expect("ends at once").unwrap();
        assert!(ended.is_ok(), "{ended:?}");
        client.write_all(&framed_query(3)).await.ok();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing answered after shutdown: {rest:?}");
    }

    /// Reads one framed answer and returns its id and A records.
    async fn read_answer(client: &mut tokio::io::DuplexStream) -> (u16, Vec<String>) {
        let len = client.read_u16().await.unwrap();
        let mut answer = vec![0; usize::from(len)];
        client.read_exact(&mut answer).await.unwrap();
        let mut framed = Vec::new();
        push_framed(&mut framed, &answer);
        answers(&framed).remove(0)
    }

    #[tokio::test]
    async fn a_message_larger_than_the_read_buffer_is_read_whole() {
        // A 40 KB query (a padding option past the name) and, behind it, a query of normal size.
        let mut big = Message::new(9, MessageType::Query, OpCode::Query);
        big.add_query(Query::query(Name::from_ascii(BOOT).unwrap(), RecordType::A));
        let mut edns = hickory_proto::op::Edns::new();
        edns.options_mut().insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(12, vec![0; 40_000]));
        big.set_edns(edns);
        let mut queries = Vec::new();
        push_framed(&mut queries, &big.to_vec().unwrap());
        assert!(queries.len() > 2 * TCP_READ_BUFFER);
        queries.extend(framed_query(10));
        let writes = Writes::default();
        stream_connection(&engine(), &queries[..], writes.clone(), origin(), limits(), &CancellationToken::new())
            .await
            .unwrap();
        let got = answers(&writes.0.lock().unwrap().concat());
        let ids: Vec<u16> = got.iter().map(|a| a.0).collect();
        assert_eq!(ids, [9, 10], "both answered, in order: {got:?}");
        assert!(got.iter().all(|a| a.1 == ["10.1.0.10"]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_sent_a_byte_at_a_time_is_answered_and_moves_the_idle_deadline() {
        let (mut client, served) = serve_in_memory();
        let start = tokio::time::Instant::now();
        // Single bytes spread over 4 s: inside the 5 s idle limit, so answered.
        let query = framed_query(11);
        let gap = Duration::from_secs(4) / query.len() as u32;
        for b in &query {
            client.write_all(std::slice::from_ref(b)).await.unwrap();
            tokio::time::sleep(gap).await;
        }
        assert_eq!(read_answer(&mut client).await, (11, vec!["10.1.0.10".to_string()]));
        // The completed query moved the deadline: quiet from here, the server closes 5 s after it.
        let answered = tokio::time::Instant::now();
        served.await.unwrap().unwrap();
        let closed = tokio::time::Instant::now();
        assert!(closed - start > Duration::from_secs(8), "closed {:?} after the start", closed - start);
        assert!(closed - answered <= Duration::from_secs(5));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_stalled_mid_message_is_closed_at_the_idle_deadline() {
        let (mut client, served) = serve_in_memory();
        let start = tokio::time::Instant::now();
        // A trickle of bytes that never completes a query does not keep the connection open.
        for b in &framed_query(12)[..10] {
            if client.write_all(std::slice::from_ref(b)).await.is_err() {
                break; // closed by the server
            }
            tokio::time::sleep(Duration::from_millis(900)).await;
        }
        let err = served.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        let closed = tokio::time::Instant::now() - start;
        assert!(closed >= Duration::from_secs(5) && closed < Duration::from_secs(6), "{closed:?}");
    }

    #[tokio::test]
    async fn a_client_that_pipelines_misses_and_never_reads_is_cut_off_within_about_one_write_timeout() {
        // Misses (upstream 127.0.0.1:9 refuses at once: each is answered SERVFAIL) whose answers
        // fill the pipe the client never reads from.
        let (mut client, server) = tokio::io::duplex(2048);
        let (rd, wr) = tokio::io::split(server);
        let engine = engine();
        let limits = TcpLimits { write_timeout: Duration::from_millis(500), ..limits() };
        let served = tokio::spawn(async move {
            stream_connection(&engine, rd, wr, origin(), limits, &CancellationToken::new()).await
        });
        let started = tokio::time::Instant::now();
        let writer = tokio::spawn(async move {
            for id in 0..2000u16 {
                let mut m = Message::new(id, MessageType::Query, OpCode::Query);
                let name = Name::from_ascii(format!("n{id}.example.org.")).unwrap();
                m.add_query(Query::query(name, RecordType::TXT));
                let mut framed = Vec::new();
                push_framed(&mut framed, &m.to_vec().unwrap());
                if client.write_all(&framed).await.is_err() {
                    break;
                }
            }
            client
        });
        let ended = tokio::time::timeout(Duration::from_secs(5), served).await.expect("cut off, not held");
        let err = ended.unwrap().unwrap_err();
        assert!(matches!(err.kind(), io::ErrorKind::TimedOut | io::ErrorKind::BrokenPipe), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        drop(writer.await);
    }

    #[test]
    fn a_message_is_whole_only_with_its_length_and_every_byte() {
        assert!(!holds_message(&[]));
        assert!(!holds_message(&[0]));
        assert!(!holds_message(&[0, 3, 1, 2]));
        assert!(holds_message(&[0, 3, 1, 2, 3]));
        assert!(holds_message(&[0, 0]));
    }
}
