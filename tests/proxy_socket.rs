//! The proxy over real sockets, against an upstream written with kafka-protocol whose metadata
//! names sparse node ids (1, 37, 523, then a broker 4000 that appears later), as MSK Serverless
//! does. Clients speak to it with frames encoded by kafka-protocol.
//!
//! The daemon's allocator is this test's too, for the hostile array count below.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
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
static ALLOC: mskdns::alloc::Allocator = mskdns::alloc::Allocator;

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
                    sock.write_u32(out.len() as u32).await.unwrap();
                    sock.write_all(&out).await.unwrap();
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
    tasks.spawn(proxy.run());

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
    tasks.spawn(proxy.run());
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
    tasks.spawn(proxy.run());

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
