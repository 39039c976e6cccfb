//! The wiring, in process: one `Server` bound on port 0 answers the same cluster name over UDP,
//! TCP, DoT and DoH (HTTP/1.1), and stops when its token is cancelled. The e2e suite covers each
//! transport in depth against the binary; this catches a listener left unwired without it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const BOOT: &str = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com.";

/// A self-signed certificate for 127.0.0.1 (openssl, as the benchmarks make theirs).
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs (tests/run.sh installs it)")
        .success();
    assert!(ok, "openssl made no certificate");
    (cert, key)
}

fn query(id: u16) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(BOOT).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

/// The answer's id and A records.
fn answer(wire: &[u8]) -> (u16, Vec<String>) {
    let m = Message::from_vec(wire).unwrap();
    let ips = m.answers.iter().filter_map(|r| if let RData::A(a) = &r.data { Some(a.to_string()) } else { None });
    (m.metadata.id, ips.collect())
}

async fn framed<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, id: u16) -> (u16, Vec<String>) {
    let q = query(id);
    s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
    s.write_all(&q).await.unwrap();
    let len = s.read_u16().await.unwrap();
    let mut buf = vec![0; usize::from(len)];
    s.read_exact(&mut buf).await.unwrap();
    answer(&buf)
}

async fn tls(addr: SocketAddr, ca: &Path) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = mskdns::tls::connector(Some(ca), None).unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, TcpStream::connect(addr).await.unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_answers_udp_tcp_dot_and_doh() {
    let dir = std::env::temp_dir().join(format!("mskdns-wiring-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = certificate(&dir);
    let config = mskdns::config::Config::parse_toml(&format!(
        r#"
        [dns]
        listen = ["127.0.0.1:0"]
        listen_dot = ["127.0.0.1:0"]
        listen_doh = ["127.0.0.1:0"]
        tls_cert = "{}"
        tls_key = "{}"
        upstreams = ["127.0.0.1:9"]
        udp_threads = 1
        [admin]
        listen = "127.0.0.1:0"
        [[clusters]]
        bootstrap = "{}"
        addresses = ["10.1.0.10"]
        "#,
        cert.display(),
        key.display(),
        BOOT.trim_end_matches('.')
    ))
    .unwrap();
    let server = mskdns::Server::bind(&config).unwrap();
    let dns = server.dns_addrs()[0];
    let secure = server.secure_addrs();
    let find = |kind| secure.iter().find(|(k, _)| *k == kind).unwrap().1;
    let (dot, doh) = (find("dot"), find("doh"));
    assert!(dns.port() != 0 && dot.port() != 0 && doh.port() != 0, "port 0 resolved");
    let stop = server.shutdown_token();
    let served = tokio::spawn(server.run(Arc::new(String::new), None, || {}));
    let want = vec!["10.1.0.10".to_string()];

    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(&query(1), dns).await.unwrap();
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(5), udp.recv(&mut buf)).await.unwrap().unwrap();
    assert_eq!(answer(&buf[..n]), (1, want.clone()), "UDP");

    // A listener left unwired is bound but never accepts: fail within a bound, do not hang.
    let within = Duration::from_secs(5);
    let tcp = tokio::time::timeout(within, async { framed(TcpStream::connect(dns).await.unwrap(), 2).await });
    assert_eq!(tcp.await.expect("TCP answers"), (2, want.clone()), "TCP");
    let dot = tokio::time::timeout(within, async { framed(tls(dot, &cert).await, 3).await });
    assert_eq!(dot.await.expect("DoT answers"), (3, want.clone()), "DoT");

    let mut s = tokio::time::timeout(within, tls(doh, &cert)).await.expect("DoH handshakes");
    let q = query(4);
    let head = format!(
        "POST /dns-query HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/dns-message\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        q.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&q).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut response)).await.expect("DoH answers");
    let at = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a whole HTTP response") + 4;
    assert!(response.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&response[..at]));
    assert_eq!(answer(&response[at..]), (4, want), "DoH");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), served).await.expect("stops when cancelled").unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
