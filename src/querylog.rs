//! The query log (`[query_log]`): every query (or a sample), as dnstap in Frame Streams to a file
//! or a collector's socket, or as JSON lines in Route 53 Resolver's format to a file or stdout.
//!
//! The query path never waits for it: the engine's observer ([`QueryLog`]) copies a sampled
//! query's bytes into a queue bounded in bytes (`max_queue_bytes`) and returns; past the bound the
//! record is dropped and counted. One writer task drains the queue, encodes and writes; a writer
//! error (a full disk, a collector gone) drops what it could not write, is counted, and is logged
//! at most once a minute. A reload that adds, changes or removes the section starts, restarts or
//! stops the log.

pub mod dnstap;
pub mod fstrm;
pub mod json;
mod sink;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, QueryLogConfig, QueryLogFormat};
use crate::dns::engine::{Engine, Observed, Observer, Outcome, Transport};
use sink::Sink;

/// The bytes a record is counted as beyond its messages.
const RECORD_OVERHEAD: usize = 160;
/// How often the writer wakes with nothing queued (to flush and to retry a collector).
const TICK: Duration = Duration::from_millis(250);
/// At most one log line about writer errors this often.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

/// One query, as the writer gets it.
#[derive(Debug)]
pub struct Record {
    pub received: SystemTime,
    pub answered: SystemTime,
    pub latency: Duration,
    pub client: SocketAddr,
    /// The address the query arrived on, when known.
    pub local: Option<SocketAddr>,
    pub listener: usize,
    pub transport: Transport,
    pub query: Box<[u8]>,
    pub response: Box<[u8]>,
    pub outcome: Outcome,
    pub upstream: Option<SocketAddr>,
    pub forwarded: Option<Forwarded>,
}

/// The upstream exchange that answered a record's query (told once per exchange).
#[derive(Debug)]
pub struct Forwarded {
    pub upstream: SocketAddr,
    /// Over TCP (after a truncated answer over UDP).
    pub tcp: bool,
    pub sent: SystemTime,
    pub received: SystemTime,
    /// The query as it was sent, rebuilt from the answer's id and question.
    pub query: Vec<u8>,
    pub response: Box<[u8]>,
}

impl Record {
    fn of(q: &Observed<'_>, local: Option<SocketAddr>) -> Self {
        let answered = SystemTime::now();
        let forwarded = q.exchange.map(|e| Forwarded {
            upstream: e.upstream,
            tcp: e.tcp,
            sent: e.received.checked_sub(e.rtt).unwrap_or(e.received),
            received: e.received,
            query: rebuilt_query(e.response),
            response: e.response.into(),
        });
        Record {
            received: answered.checked_sub(q.latency).unwrap_or(answered),
            answered,
            latency: q.latency,
            client: SocketAddr::new(q.from.client, q.from.port),
            local,
            listener: q.from.listener,
            transport: q.from.transport,
            query: q.query.into(),
            response: q.response.into(),
            outcome: q.outcome,
            upstream: q.upstream,
            forwarded,
        }
    }

    fn size(&self) -> usize {
        RECORD_OVERHEAD
            + self.query.len()
            + self.response.len()
            + self.forwarded.as_ref().map_or(0, |f| f.query.len() + f.response.len())
    }
}

/// The query mskdns sent for an answer: its id and question, with RD set.
fn rebuilt_query(answer: &[u8]) -> Vec<u8> {
    use crate::dns::wire;
    let Some(qend) = wire::skip_name(answer, wire::HEADER_LEN).map(|e| e + 4).filter(|e| *e <= answer.len()) else {
        return Vec::new();
    };
    let mut q = answer[..qend].to_vec();
    q[2] = 0x01; // a query, RD
    q[3] = 0;
    q[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    q
}

struct Queue {
    records: VecDeque<Record>,
    bytes: usize,
}

/// What the observer and the writer share.
struct Shared {
    queue: Mutex<Queue>,
    notify: Notify,
    max_bytes: usize,
    /// Queued bytes that wake the writer before its tick.
    wake_bytes: usize,
    /// A query is logged when a random u64 is below this.
    sample_below: u64,
    /// The `dns.listen` entries, by listener index (the address a query arrived on).
    listeners: Vec<SocketAddr>,
    /// The view name of each listener index (for JSON lines), as of the configuration in force.
    views: ArcSwap<Vec<String>>,
    dropped_full: metrics::Counter,
    queued_bytes: metrics::Gauge,
}

/// The engine's observer: samples, copies and queues; never blocks.
pub struct QueryLog(Arc<Shared>);

impl Observer for QueryLog {
    fn observe(&self, q: &Observed<'_>) {
        let s = &self.0;
        if s.sample_below != u64::MAX && rand::random::<u64>() >= s.sample_below {
            return;
        }
        let local = s.listeners.get(q.from.listener).copied().filter(|a| a.port() != 0);
        let record = Record::of(q, local);
        let size = record.size();
        let mut queue = s.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.bytes + size > s.max_bytes {
            drop(queue);
            s.dropped_full.increment(1);
            return;
        }
        queue.bytes += size;
        queue.records.push_back(record);
        // The writer wakes on its tick; early only for a batch worth writing at once.
        let wake = queue.bytes >= s.wake_bytes && queue.bytes - size < s.wake_bytes;
        drop(queue);
        if wake {
            s.notify.notify_one();
        }
    }
}

/// A running query log: its writer, stopped (and its stream closed) with [`Running::stop`].
pub struct Running {
    config: QueryLogConfig,
    stop: CancellationToken,
    shared: Arc<Shared>,
}

impl Running {
    pub fn stop(self) {
        self.stop.cancel();
    }
}

/// Starts the log `config` describes: the observer goes on `engine`, the writer on `tasks`.
pub fn start(engine: &Engine, config: &Config, q: &QueryLogConfig, tasks: &TaskTracker) -> Running {
    let sample_below = if q.sample >= 1.0 { u64::MAX } else { (q.sample * u64::MAX as f64) as u64 };
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue { records: VecDeque::new(), bytes: 0 }),
        notify: Notify::new(),
        max_bytes: q.max_queue_bytes,
        wake_bytes: (q.max_queue_bytes / 8).min(256 << 10),
        sample_below,
        listeners: config.dns.all_listeners(),
        views: ArcSwap::from_pointee(engine.views_by_listener()),
        dropped_full: metrics::counter!("mskdns_query_log_dropped_total", "reason" => "queue_full"),
        queued_bytes: metrics::gauge!("mskdns_query_log_queue_bytes"),
    });
    let stop = CancellationToken::new();
    let writer = Writer::new(q.clone(), shared.clone());
    tasks.spawn(writer.run(stop.clone()));
    engine.set_observer(Some(Box::new(QueryLog(shared.clone()))));
    tracing::info!(format = ?q.format, path = %q.path, sample = q.sample, "query log on");
    Running { config: q.clone(), stop, shared }
}

/// Follows the configuration in force: starts, restarts (on a change of the section) or stops
/// the log. `running` is the log started before the listeners served (so the first query is
/// logged too), if the configuration had one.
pub async fn follow(
    engine: Arc<Engine>,
    mut config: watch::Receiver<Arc<Config>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    mut running: Option<Running>,
) {
    loop {
        let c = config.borrow_and_update().clone();
        let wanted = c.query_log.clone();
        if running.as_ref().map(|r| &r.config) != wanted.as_ref() {
            if let Some(r) = running.take() {
                engine.set_observer(None);
                r.stop();
                tracing::info!("query log off");
            }
            running = wanted.map(|q| start(&engine, &c, &q, &tasks));
        } else if let Some(r) = &running {
            // A reload that renamed views: JSON lines name the views in force.
            r.shared.views.store(Arc::new(engine.views_by_listener()));
        }
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            _ = shutdown.cancelled() => break,
        }
    }
    if let Some(r) = running {
        engine.set_observer(None);
        r.stop();
    }
}

/// Drains the queue, encodes, writes.
struct Writer {
    config: QueryLogConfig,
    shared: Arc<Shared>,
    sink: Sink,
    dnstap: dnstap::Encoder,
    aws: json::Aws,
    written: metrics::Counter,
    bytes: metrics::Counter,
    errors: metrics::Counter,
    last_error_log: Option<Instant>,
}

impl Writer {
    fn new(config: QueryLogConfig, shared: Arc<Shared>) -> Self {
        let identity = config.identity.clone().unwrap_or_else(host_name).into_bytes();
        let aws = json::Aws {
            account_id: config.account_id.clone(),
            region: config.region.clone(),
            vpc_id: config.vpc_id.clone(),
            instance_id: config.instance_id.clone(),
        };
        Writer {
            sink: Sink::new(&config),
            config,
            shared,
            dnstap: dnstap::Encoder::new(identity),
            aws,
            written: metrics::counter!("mskdns_query_log_records_total"),
            bytes: metrics::counter!("mskdns_query_log_bytes_total"),
            errors: metrics::counter!("mskdns_query_log_write_errors_total"),
            last_error_log: None,
        }
    }

    async fn run(mut self, stop: CancellationToken) {
        if self.config.format == QueryLogFormat::Json && self.config.instance_metadata {
            self.aws = fill_from_instance_metadata(self.aws.clone()).await;
        }
        let mut buf = Vec::with_capacity(64 << 10);
        loop {
            let stopping = tokio::select! {
                _ = self.shared.notify.notified() => false,
                _ = tokio::time::sleep(TICK) => false,
                _ = stop.cancelled() => true,
            };
            let records = self.take();
            buf.clear();
            let views = self.shared.views.load_full();
            for r in &records {
                self.encode(r, &views, &mut buf);
            }
            let count = records.len();
            drop(records);
            if !buf.is_empty() || self.sink.wants_tick() {
                let result = self.sink.write(&buf).await;
                self.account(result, count, buf.len());
            }
            if stopping {
                self.sink.close().await;
                return;
            }
        }
    }

    fn take(&self) -> Vec<Record> {
        let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = std::mem::take(&mut q.bytes);
        let out: Vec<Record> = q.records.drain(..).collect();
        drop(q);
        self.shared.queued_bytes.set(bytes as f64);
        out
    }

    fn encode(&mut self, r: &Record, views: &[String], out: &mut Vec<u8>) {
        match self.config.format {
            QueryLogFormat::Dnstap => self.dnstap.frames(r, &self.config.messages, out),
            QueryLogFormat::Json => {
                let view = views.get(r.listener).map(String::as_str).filter(|v| *v != "default");
                json::line(r, &self.aws, view, out)
            }
        }
    }

    fn account(&mut self, result: Result<(), sink::WriteError>, records: usize, bytes: usize) {
        match result {
            Ok(()) => {
                self.written.increment(records as u64);
                self.bytes.increment(bytes as u64);
            }
            Err(e) => {
                metrics::counter!("mskdns_query_log_dropped_total", "reason" => e.reason()).increment(records as u64);
                self.errors.increment(1);
                let now = Instant::now();
                if self.last_error_log.is_none_or(|t| now.duration_since(t) >= ERROR_LOG_EVERY) {
                    self.last_error_log = Some(now);
                    tracing::warn!(path = %self.config.path, error = %e, records, "query log: cannot write; records dropped (logged at most once a minute)");
                }
            }
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "mskdns".into())
}

/// Fills what the configuration left out from the instance metadata service (IMDSv2), when it
/// answers within a second; off AWS (or with `AWS_EC2_METADATA_DISABLED=true`) nothing is asked.
#[cfg(feature = "aws")]
async fn fill_from_instance_metadata(mut aws: json::Aws) -> json::Aws {
    use aws_config::imds::Client;
    let complete =
        aws.account_id.is_some() && aws.region.is_some() && aws.vpc_id.is_some() && aws.instance_id.is_some();
    if complete || std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return aws;
    }
    let client = Client::builder().connect_timeout(Duration::from_secs(1)).read_timeout(Duration::from_secs(1)).build();
    let get = |path: String| {
        let client = client.clone();
        async move { tokio::time::timeout(Duration::from_secs(1), client.get(path)).await.ok()?.ok().map(String::from) }
    };
    if let Some(doc) = get("/latest/dynamic/instance-identity/document".into()).await
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&doc)
    {
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        aws.account_id = aws.account_id.or_else(|| field("accountId"));
        aws.region = aws.region.or_else(|| field("region"));
        aws.instance_id = aws.instance_id.or_else(|| field("instanceId"));
    }
    if aws.vpc_id.is_none()
        && let Some(mac) = get("/latest/meta-data/mac".into()).await
    {
        aws.vpc_id = get(format!("/latest/meta-data/network/interfaces/macs/{mac}/vpc-id")).await;
    }
    aws
}

#[cfg(not(feature = "aws"))]
async fn fill_from_instance_metadata(aws: json::Aws) -> json::Aws {
    aws
}
