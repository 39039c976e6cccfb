//! The proxy over real sockets, against an upstream written with kafka-protocol whose metadata
//! names sparse node ids (1, 37, 523, then a broker 4000 that appears later), as MSK Serverless
//! does. Clients speak to it with frames encoded by kafka-protocol.
//!
//! The daemon's allocator is this test's too, for the hostile array count below, counted for the
//! memory bound of streamed responses (nextest runs each test in a process of its own).

use std::alloc::{GlobalAlloc, Layout};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
use kafka_protocol::messages::{ApiKey, BrokerId, MetadataRequest, MetadataResponse, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use mskdns::config::{PortRange, ProxyConfig};
use mskdns::proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[global_allocator]
static ALLOC: Counting = Counting;

/// The daemon's allocator, counting the bytes live and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn count_up(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is passed on unchanged to the daemon's allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_up(layout.size());
        unsafe { mskdns::alloc::Allocator.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_up(layout.size());
        unsafe { mskdns::alloc::Allocator.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { mskdns::alloc::Allocator.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_up(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { mskdns::alloc::Allocator.realloc(ptr, layout, new_size) }
    }
}

const VERSION: i16 = 12;
const ADVERTISE: &str = "kafka-proxy.test";

/// An upstream broker: answers every Metadata request with the node ids in `nodes`, all at its
/// own address (each node id still gets its own proxy port). While `hostile` is set, the answer
/// declares 2^32 - 2 brokers and carries none.
async fn upstream(nodes: Arc<Mutex<Vec<i32>>>) -> SocketAddr {
    upstream_with(nodes, Arc::default()).await
}

async fn upstream_with(nodes: Arc<Mutex<Vec<i32>>>, hostile: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let (nodes, hostile) = (nodes.clone(), hostile.clone());
            tokio::spawn(async move {
                while let Ok(frame) = read_frame(&mut sock).await {
                    let mut b = frame;
                    let version = i16::from_be_bytes([b[2], b[3]]);
                    let h = RequestHeader::decode(&mut b, ApiKey::Metadata.request_header_version(version)).unwrap();
                    assert_eq!(h.request_api_key, ApiKey::Metadata as i16);
                    let brokers = nodes
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|&n| {
                            MetadataResponseBroker::default()
                                .with_node_id(BrokerId(n))
                                .with_host(StrBytes::from_string(addr.ip().to_string()))
                                .with_port(addr.port() as i32)
                        })
                        .collect();
                    let body = MetadataResponse::default().with_brokers(brokers);
                    let mut out = BytesMut::new();
                    ResponseHeader::default()
                        .with_correlation_id(h.correlation_id)
                        .encode(&mut out, ApiKey::Metadata.response_header_version(version))
                        .unwrap();
                    if hostile.load(Ordering::Relaxed) {
                        // throttle_time_ms, then the brokers' compact array count as a varint.
                        out.put_i32(0);
                        out.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0]);
                    } else {
                        body.encode(&mut out, version).unwrap();
                    }
                    // The proxy may have closed this connection (its client left): not an error here.
                    if sock.write_u32(out.len() as u32).await.is_err() || sock.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn read_frame(sock: &mut TcpStream) -> std::io::Result<Bytes> {
    let n = sock.read_u32().await? as usize;
    let mut buf = vec![0u8; n];
    sock.read_exact(&mut buf).await?;
    Ok(Bytes::from(buf))
}

/// One Metadata round trip from a client; the brokers it was told about, by node id.
async fn metadata(sock: &mut TcpStream, correlation_id: i32) -> Vec<(i32, String, i32)> {
    let mut req = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Metadata as i16)
        .with_request_api_version(VERSION)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("socket-test")))
        .encode(&mut req, ApiKey::Metadata.request_header_version(VERSION))
        .unwrap();
    MetadataRequest::default().encode(&mut req, VERSION).unwrap();
    let mut frame = BytesMut::new();
    frame.put_u32(req.len() as u32);
    frame.extend_from_slice(&req);
    sock.write_all(&frame).await.unwrap();
    let mut b = tokio::time::timeout(Duration::from_secs(5), read_frame(sock)).await.unwrap().unwrap();
    let h = ResponseHeader::decode(&mut b, ApiKey::Metadata.response_header_version(VERSION)).unwrap();
    assert_eq!(h.correlation_id, correlation_id);
    let m = MetadataResponse::decode(&mut b, VERSION).unwrap();
    assert_eq!(b.remaining(), 0);
    let mut brokers: Vec<_> = m.brokers.iter().map(|b| (b.node_id.0, b.host.to_string(), b.port)).collect();
    brokers.sort();
    brokers
}

/// A block of `len` ports from a pseudo-random base; the proxy skips any another process holds.
fn port_range(len: u16) -> PortRange {
    let base = 20000 + (std::process::id() % 2000) as u16 * 10;
    PortRange { first: base, last: base + len - 1 }
}

fn config(upstream: SocketAddr, broker_ports: PortRange, max_frame_bytes: u32) -> ProxyConfig {
    ProxyConfig {
        mode: Default::default(),
        port_assignment: Default::default(),
        proxy_protocol: false,
        allow_endpoints: Vec::new(),
        proxy_protocol_from: Vec::new(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: upstream.to_string(),
        advertise_host: ADVERTISE.into(),
        broker_ports,
        broker_bind: None,
        state_file: None,
        broker_grace_secs: 3600,
        max_frame_bytes,
        idle_timeout_secs: 60,
        connect_timeout_ms: 2000,
        max_connections: 100,
        tls_cert: None,
        tls_key: None,
        upstream_tls: false,
        upstream_ca_file: None,
        upstream_tls_cert: None,
        upstream_tls_key: None,
        handshake_timeout_ms: 2000,
        allow: mskdns::config::default_allow(),
        max_connections_per_client: 100,
        first_request_timeout_ms: 1000,
        shutdown_grace_secs: 30,
        switch_drain_secs: 30,
    }
}

async fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_node_ids_get_ports_and_a_later_broker_gets_its_own() {
    let nodes = Arc::new(Mutex::new(vec![1, 37, 523]));
    let up = upstream(nodes.clone()).await;
    let range = port_range(10);
    let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
    let proxy = Proxy::bind(0, &config(up, range, 1 << 20), tasks.clone(), shutdown.clone()).unwrap();
    let boot = proxy.local_addr().unwrap();
    tasks.spawn(proxy.run(tokio::sync::watch::channel(Default::default()).1, Default::default()));

    let mut client = TcpStream::connect(boot).await.unwrap();
    let first = metadata(&mut client, 1).await;
    assert_eq!(first.iter().map(|b| b.0).collect::<Vec<_>>(), [1, 37, 523]);
    for (_, host, port) in &first {
        assert_eq!(host, ADVERTISE);
        assert!(range.contains(*port as u16), "{port} outside {range:?}");
    }
    let mut ports: Vec<i32> = first.iter().map(|b| b.2).collect();
    ports.dedup();
    assert_eq!(ports.len(), 3, "one port per node id: {first:?}");

    // Broker 4000 appears: it gets a fourth port, the others keep theirs.
    nodes.lock().unwrap().push(4000);
    let second = metadata(&mut client, 2).await;
    assert_eq!(&second[..3], &first[..]);
    assert_eq!(second[3].0, 4000);
    assert!(range.contains(second[3].2 as u16) && !ports.contains(&second[3].2));

    // Each broker port leads upstream: a client there is answered too.
    for (node, _, port) in &second {
        let mut b = TcpStream::connect(("127.0.0.1", *port as u16)).await.unwrap();
        assert_eq!(metadata(&mut b, 100 + node).await.len(), 4);
    }
    shutdown.cancel();
    tasks.close();
    tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await.expect("every task ends at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_mid_request_or_send_too_much_leave_no_task_behind() {
    let nodes = Arc::new(Mutex::new(vec![1]));
    let up = upstream(nodes).await;
    let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
    let proxy = Proxy::bind(0, &config(up, port_range(10), 4096), tasks.clone(), shutdown.clone()).unwrap();
    let boot = proxy.local_addr().unwrap();
    tasks.spawn(proxy.run(tokio::sync::watch::channel(Default::default()).1, Default::default()));
    // The proxy's own tasks: the bootstrap accept loop and the broker-port sweeper.
    assert!(wait_until(|| tasks.len() == 2).await, "{} tasks at rest", tasks.len());

    // Mid-request: a header saying 100 bytes, 6 of them sent, then gone. Over and over.
    for _ in 0..50 {
        let mut s = TcpStream::connect(boot).await.unwrap();
        s.write_all(&100u32.to_be_bytes()).await.unwrap();
        s.write_all(&[0, 3, 0, 12, 0, 0]).await.unwrap();
    }
    // Mid-response: a full request, and the client gone before the answer.
    for i in 0..20 {
        let mut s = TcpStream::connect(boot).await.unwrap();
        let mut req = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(ApiKey::Metadata as i16)
            .with_request_api_version(VERSION)
            .with_correlation_id(i)
            .encode(&mut req, ApiKey::Metadata.request_header_version(VERSION))
            .unwrap();
        MetadataRequest::default().encode(&mut req, VERSION).unwrap();
        s.write_u32(req.len() as u32).await.unwrap();
        s.write_all(&req).await.unwrap();
    }
    // Larger than max_frame_bytes: closed at once.
    let mut big = TcpStream::connect(boot).await.unwrap();
    big.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), big.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "the proxy closes an oversized frame's connection");
    drop(big);

    // Every connection's task ends (the mid-response ones allocated a broker port: +1 loop).
    assert!(wait_until(|| tasks.len() <= 3).await, "{} tasks left", tasks.len());
    // And the proxy still answers.
    let mut c = TcpStream::connect(boot).await.unwrap();
    assert_eq!(metadata(&mut c, 99).await.len(), 1);
    shutdown.cancel();
    tasks.close();
    tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await.expect("every task ends at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_declaring_billions_of_brokers_closes_one_connection_not_the_process() {
    let hostile = Arc::new(AtomicBool::new(true));
    let up = upstream_with(Arc::new(Mutex::new(vec![1])), hostile.clone()).await;
    let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
    let proxy = Proxy::bind(0, &config(up, port_range(10), 1 << 20), tasks.clone(), shutdown.clone()).unwrap();
    let boot = proxy.local_addr().unwrap();
    tasks.spawn(proxy.run(tokio::sync::watch::channel(Default::default()).1, Default::default()));

    let mut c = TcpStream::connect(boot).await.unwrap();
    let mut req = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Metadata as i16)
        .with_request_api_version(VERSION)
        .with_correlation_id(5)
        .encode(&mut req, ApiKey::Metadata.request_header_version(VERSION))
        .unwrap();
    MetadataRequest::default().encode(&mut req, VERSION).unwrap();
    c.write_u32(req.len() as u32).await.unwrap();
    c.write_all(&req).await.unwrap();
    // Never forwarded undecoded: the client's connection is closed instead.
    let mut buf = [0u8; 4];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    hostile.store(false, Ordering::Relaxed);
    let mut c = TcpStream::connect(boot).await.unwrap();
    assert_eq!(metadata(&mut c, 6).await.len(), 1);
    shutdown.cancel();
}

/// An upstream that counts its connections and answers every request, acks=0 Produce requests
/// too (as some Kafka-compatible brokers do), with a frame of its correlation id and two zero
/// bytes. Only pass-through APIs are used with it, so nothing is decoded.
async fn answering_upstream(connections: Arc<std::sync::atomic::AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                while let Ok(frame) = read_frame(&mut sock).await {
                    let mut out = BytesMut::new();
                    out.put_u32(6);
                    out.extend_from_slice(&frame[4..8]);
                    out.put_i16(0);
                    if sock.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn produce_acks0(correlation_id: i32) -> BytesMut {
    use kafka_protocol::messages::ProduceRequest;
    let version = 9;
    let mut b = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Produce as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("socket-test")))
        .encode(&mut b, ApiKey::Produce.request_header_version(version))
        .unwrap();
    ProduceRequest::default().with_acks(0).with_timeout_ms(1000).encode(&mut b, version).unwrap();
    let mut frame = BytesMut::new();
    frame.put_u32(b.len() as u32);
    frame.extend_from_slice(&b);
    frame
}

/// A Heartbeat v0 request (passed through unchanged), header and body by hand.
fn heartbeat(correlation_id: i32) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_i16(ApiKey::Heartbeat as i16);
    b.put_i16(0);
    b.put_i32(correlation_id);
    b.put_i16(-1);
    b.put_i16(1);
    b.extend_from_slice(b"g");
    b.put_i32(1);
    b.put_i16(1);
    b.extend_from_slice(b"m");
    let mut frame = BytesMut::new();
    frame.put_u32(b.len() as u32);
    frame.extend_from_slice(&b);
    frame
}

async fn closed(sock: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(within, sock.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_answering_acks0_produce_keeps_the_connection() {
    let up = answering_upstream(Arc::default()).await;
    let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
    let proxy = Proxy::bind(0, &config(up, port_range(10), 1 << 20), tasks.clone(), shutdown.clone()).unwrap();
    let boot = proxy.local_addr().unwrap();
    tasks.spawn(proxy.run(tokio::sync::watch::channel(Default::default()).1, Default::default()));
    let mut c = TcpStream::connect(boot).await.unwrap();
    for i in 0..50 {
        c.write_all(&produce_acks0(1000 + i)).await.unwrap();
    }
    c.write_all(&heartbeat(7)).await.unwrap();
    // The client sees only the answer it waits for: the acks=0 answers were dropped.
    let frame = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut c)).await.unwrap().unwrap();
    assert_eq!(i32::from_be_bytes(frame[..4].try_into().unwrap()), 7);
    c.write_all(&heartbeat(8)).await.unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut c)).await.unwrap().unwrap();
    assert_eq!(i32::from_be_bytes(frame[..4].try_into().unwrap()), 8);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_broker_connection_for_strangers_silent_clients_or_past_the_per_client_cap() {
    let upstream_conns: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
    let up = answering_upstream(upstream_conns.clone()).await;
    let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
    let mut cfg = config(up, port_range(10), 1 << 20);
    cfg.allow = vec!["127.0.0.2/32".parse().unwrap(), "127.0.0.3/32".parse().unwrap()];
    cfg.max_connections_per_client = 3;
    cfg.first_request_timeout_ms = 300;
    let proxy = Proxy::bind(0, &cfg, tasks.clone(), shutdown.clone()).unwrap();
    let boot = proxy.local_addr().unwrap();
    tasks.spawn(proxy.run(tokio::sync::watch::channel(Default::default()).1, Default::default()));
    let from = |ip: &str| {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        s.connect(boot)
    };

    // Outside `allow`: closed, even with a request ready.
    let mut stranger = from("127.0.0.1").await.unwrap();
    let _ = stranger.write_all(&heartbeat(1)).await;
    assert!(closed(&mut stranger, Duration::from_secs(3)).await);

    // Connected and silent: no broker connection, and closed after first_request_timeout_ms.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(from("127.0.0.2").await.unwrap());
    }
    // Past the per-client cap: closed at once.
    let mut fourth = from("127.0.0.2").await.unwrap();
    assert!(closed(&mut fourth, Duration::from_secs(2)).await);
    for s in &mut silent {
        assert!(closed(s, Duration::from_secs(3)).await, "a silent client is cut off");
    }
    assert_eq!(upstream_conns.load(Ordering::SeqCst), 0, "no broker connection was opened");

    // A client that speaks gets its broker connection, and its answer.
    let mut ok = from("127.0.0.3").await.unwrap();
    ok.write_all(&heartbeat(9)).await.unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut ok)).await.unwrap().unwrap();
    assert_eq!(i32::from_be_bytes(frame[..4].try_into().unwrap()), 9);
    assert_eq!(upstream_conns.load(Ordering::SeqCst), 1);
    shutdown.cancel();
}

/// Record bytes as the upstream below sends them: byte `i` of the records is `i % 251`.
const PATTERN: usize = 251;
const LEADER: &str = "b-2.mycluster.abc123.c2.kafka.eu-west-1.amazonaws.com";

/// The Fetch v16 response the upstream below sends, around `records` bytes of records: what comes
/// before them (from the correlation id on) and what comes after (ending in a leader hint naming
/// node 2 at [`LEADER`]).
fn fetch_v16_parts(correlation_id: i32, records: usize) -> (Vec<u8>, Vec<u8>) {
    use kafka_protocol::messages::fetch_response::NodeEndpoint;
    fn uvarint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut head = Vec::new();
    head.extend_from_slice(&correlation_id.to_be_bytes());
    head.push(0); // header tagged fields
    head.extend_from_slice(&[0; 4 + 2 + 4]); // throttle_time_ms, error_code, session_id
    uvarint(&mut head, 2); // one topic
    head.extend_from_slice(&[7; 16]); // topic_id
    uvarint(&mut head, 2); // one partition
    head.extend_from_slice(&[0; 4 + 2 + 8 + 8 + 8]);
    head.push(0); // aborted_transactions: null
    head.extend_from_slice(&(-1i32).to_be_bytes()); // preferred_read_replica
    uvarint(&mut head, records as u64 + 1);
    let mut tail = vec![0, 0]; // the partition's and the topic's tagged fields
    let mut hint = BytesMut::new();
    hint.put_u8(2); // one endpoint
    NodeEndpoint::default()
        .with_node_id(BrokerId(2))
        .with_host(StrBytes::from_static_str(LEADER))
        .with_port(9098)
        .encode(&mut hint, 16)
        .unwrap();
    tail.push(1); // one top-level tagged field: node_endpoints
    tail.push(0);
    uvarint(&mut tail, hint.len() as u64);
    tail.extend_from_slice(&hint);
    (head, tail)
}

/// An upstream answering every request with a Fetch v16 response of `records` bytes of records,
/// written from one small buffer: it never holds the response.
async fn fetch_upstream(records: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let chunk: Vec<u8> = (0..PATTERN * 256).map(|i| (i % PATTERN) as u8).collect();
                while let Ok(frame) = read_frame(&mut sock).await {
                    let corr = i32::from_be_bytes(frame[4..8].try_into().unwrap());
                    let (head, tail) = fetch_v16_parts(corr, records);
                    let size = head.len() + records + tail.len();
                    let mut sent = sock.write_u32(size as u32).await.and(sock.write_all(&head).await);
                    let mut left = records;
                    while left > 0 && sent.is_ok() {
                        let n = left.min(chunk.len());
                        sent = sock.write_all(&chunk[..n]).await;
                        left -= n;
                    }
                    if sent.and(sock.write_all(&tail).await).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One Fetch v16 round trip, read 64 KiB at a time: the records arrive as sent and the leader
/// hint names the proxy, not the broker; returns the bytes after the records.
async fn fetch_through(boot: SocketAddr, records: usize) -> Vec<u8> {
    use kafka_protocol::messages::FetchRequest;
    let mut c = TcpStream::connect(boot).await.unwrap();
    let mut req = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Fetch as i16)
        .with_request_api_version(16)
        .with_correlation_id(7)
        .encode(&mut req, ApiKey::Fetch.request_header_version(16))
        .unwrap();
    FetchRequest::default().encode(&mut req, 16).unwrap();
    c.write_u32(req.len() as u32).await.unwrap();
    c.write_all(&req).await.unwrap();

    let (head, tail) = fetch_v16_parts(7, records);
    let size = c.read_u32().await.unwrap() as usize;
    assert_eq!(size, head.len() + records + tail.len(), "the response keeps its size");
    let mut got = vec![0u8; head.len()];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(got, head);
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0;
    while at < records {
        let n = c.read(&mut buf[..(records - at).min(64 * 1024)]).await.unwrap();
        assert!(n > 0, "closed after {at} bytes of records");
        assert!(buf[..n].iter().enumerate().all(|(i, &b)| b as usize == (at + i) % PATTERN), "records at {at}");
        at += n;
    }
    let mut rest = vec![0u8; tail.len()];
    c.read_exact(&mut rest).await.unwrap();
    rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_fetch_responses_with_leader_hints_stream_through_in_bounded_memory() {
    const RECORDS: usize = 60 << 20;
    let up = fetch_upstream(RECORDS).await;
    let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
    let proxy = Proxy::bind(0, &config(up, port_range(10), 100 << 20), tasks.clone(), shutdown.clone()).unwrap();
    let boot = proxy.local_addr().unwrap();
    tasks.spawn(proxy.run(tokio::sync::watch::channel(Default::default()).1, Default::default()));

    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let clients: Vec<_> = (0..3).map(|_| tokio::spawn(fetch_through(boot, RECORDS))).collect();
    for c in clients {
        let rest = tokio::time::timeout(Duration::from_secs(60), c).await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&rest);
        assert!(text.contains(ADVERTISE) && !text.contains(LEADER), "{rest:?}");
    }
    // Three 60 MiB responses held whole would take 180 MiB; streamed, each connection holds its
    // buffers (4 x 64 KiB) and the request prefix (72 KiB).
    let grew = PEAK.load(Ordering::Relaxed) - before;
    assert!(grew < 8 << 20, "peak allocation grew by {} KiB", grew >> 10);
    shutdown.cancel();
}
