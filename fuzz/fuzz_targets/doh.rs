//! DNS over HTTPS past TLS: any bytes from a client (HTTP/1.1, or HTTP/2 after its preface) into
//! the DoH connection, as the daemon serves it (hyper, the request mapping, the engine, and the
//! record cutting of the output). It must end without a panic and answer nothing it cannot frame.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mskdns::config::Config;
use mskdns::dns::doh::{self, DohSettings, FrameCut};
use mskdns::dns::engine::{Engine, Origin, Transport};
use mskdns::dns::server::TcpLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn engine() -> &'static Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let config = Config::parse_toml(
            r#"
            [dns]
            upstreams = ["127.0.0.1:1"]
            upstream_timeout_ms = 1
            [[clusters]]
            bootstrap = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
            addresses = ["10.1.0.10", "fd00::10"]
            "#,
        )
        .expect("fuzz config");
        Engine::from_config(&config).expect("fuzz engine")
    })
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    rt.block_on(async {
        let engine = engine().clone();
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let http2 = data.starts_with(b"PRI * HTTP/2.0");
        let from = Origin { client: [127, 0, 0, 1].into(), port: 5300, listener: 0, transport: Transport::Doh };
        let settings = Arc::new(DohSettings { path: "/dns-query".into(), max_streams: 8 });
        let limits = TcpLimits {
            max_connections: 1,
            max_per_client: 1,
            idle_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
            nodelay: true,
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let served = tokio::spawn(doh::connection(engine.clone(), FrameCut::new(server, http2), from, settings, limits, stop));
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        // Time is paused: the idle and write timeouts pass at once once nothing else can run.
        let _ = tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut out)).await;
        let r = tokio::time::timeout(Duration::from_secs(30), served).await;
        assert!(r.is_ok(), "the connection ended");
        assert!(r.unwrap().is_ok(), "the connection task did not panic");
        assert_eq!(engine.panics(), 0, "a panic while answering");
    });
});
