//! The request path: any datagram in, a well-formed response with the query's id out, or nothing.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use mskdns::config::Config;
use mskdns::dns::engine::{Engine, Handled, Origin, Transport};

fn engine() -> &'static Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let config = Config::from_toml(
            r#"
            [dns]
            upstreams = ["127.0.0.1:1"]
            rate_limit = 1000
            [[clusters]]
            bootstrap = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
            addresses = ["10.1.0.10", "fd00::10"]
            [[clusters]]
            bootstrap = "b-1.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com"
            brokers = { "1" = ["10.3.0.1"] }
            [[views]]
            name = "v"
            clients = ["10.0.0.0/8"]
            [[views.clusters]]
            bootstrap = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
            proxy = ["10.9.0.1"]
            "#,
        )
        .expect("fuzz config");
        Engine::from_config(&config).expect("fuzz engine")
    })
}

fuzz_target!(|data: &[u8]| {
    let engine = engine();
    let mut out = Vec::new();
    for (client, transport) in
        [([127, 0, 0, 1], Transport::Udp), ([10, 1, 2, 3], Transport::Tcp), ([8, 8, 8, 8], Transport::Udp)]
    {
        let from = Origin { client: client.into(), listener: 0, transport };
        if engine.handle(data, from, &mut out) == Handled::Reply {
            assert!(out.len() >= 12, "a response has a header");
            assert_eq!(out[..2], data[..2], "the response carries the query's id");
            assert!(out[2] & 0x80 != 0, "QR is set");
            if transport == Transport::Udp {
                assert!(out.len() <= 4096, "UDP responses respect the payload limit");
            }
        }
    }
});
