//! The request path: any datagram in, a well-formed response with the query's id out, or nothing.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use mskdns::config::Config;
use mskdns::dns::catalog::EndpointAddr;
use mskdns::dns::engine::{Engine, Handled, Origin, Transport};

fn engine() -> &'static Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        // Parsed without validation: this build has no AWS support, but the engine answers VPC
        // endpoint targets the same way (their addresses are set below, as EC2 would).
        let config = Config::parse_toml(
            r#"
            [dns]
            upstreams = ["127.0.0.1:1"]
            rate_limit = 1000
            rate_limit_exempt = []
            [[clusters]]
            bootstrap = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
            addresses = ["10.1.0.10", "fd00::10"]
            [[clusters]]
            bootstrap = "boot-prox1.c1.kafka-serverless.us-east-1.amazonaws.com"
            proxy = ["10.9.0.2"]
            [[clusters]]
            bootstrap = "boot-vpce1.c1.kafka-serverless.us-east-1.amazonaws.com"
            vpc_endpoint = "vpce-0fuzz"
            [[clusters]]
            bootstrap = "boot-fwd1.c1.kafka-serverless.us-east-1.amazonaws.com"
            forward = ["127.0.0.1:2"]
            [[clusters]]
            bootstrap = "b-1.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com"
            brokers = { "1" = ["10.3.0.1"] }
            [[clusters]]
            bootstrap = "b-1.prox.ab12cd.c3.kafka.us-east-1.amazonaws.com"
            proxy = ["10.9.0.3"]
            [[clusters]]
            bootstrap = "b-1.vpce.ab12cd.c3.kafka.us-east-1.amazonaws.com"
            vpc_endpoint = "vpce-0fuzz2"
            brokers = { "2" = ["10.3.0.2"] }
            [[clusters]]
            bootstrap = "b-1.fwd.ab12cd.c3.kafka.us-east-1.amazonaws.com"
            forward = ["127.0.0.1:3"]
            brokers = { "3" = ["10.3.0.3"] }
            [[views]]
            name = "v"
            clients = ["10.0.0.0/8"]
            az = "use1-az1"
            az_affinity = "prefer"
            [[views.clusters]]
            bootstrap = "boot-abcd1234.c2.kafka-serverless.us-east-1.amazonaws.com"
            proxy = ["10.9.0.1"]
            [[views.clusters]]
            bootstrap = "b-1.orders.ab12cd.c3.kafka.us-east-1.amazonaws.com"
            forward = ["127.0.0.1:4"]
            [[views.clusters]]
            bootstrap = "boot-fwd1.c1.kafka-serverless.us-east-1.amazonaws.com"
            vpc_endpoint = "vpce-0fuzz3"
            "#,
        )
        .expect("fuzz config");
        let engine = Engine::from_config(&config).expect("fuzz engine");
        for (i, e) in engine.snapshot().catalog.endpoints().enumerate() {
            if i > 0 {
                e.set(vec![
                    EndpointAddr { ip: [10, 40, 0, i as u8].into(), az: "us-east-1a".into(), az_id: Some("use1-az1".into()) },
                    EndpointAddr { ip: "fd00::40".parse().unwrap(), az: "us-east-1b".into(), az_id: None },
                ]);
            }
        }
        engine
    })
}

fuzz_target!(|data: &[u8]| {
    let engine = engine();
    let mut out = Vec::new();
    for (client, transport) in
        [([127, 0, 0, 1], Transport::Udp), ([10, 1, 2, 3], Transport::Tcp), ([8, 8, 8, 8], Transport::Udp)]
    {
        let from = Origin { client: client.into(), port: 5300, listener: 0, transport };
        let handled = engine.handle(data, from, &mut out);
        if matches!(handled, Handled::Reply | Handled::ReplyAndPrefetch) {
            assert!(out.len() >= 12, "a response has a header");
            assert_eq!(out[..2], data[..2], "the response carries the query's id");
            assert!(out[2] & 0x80 != 0, "QR is set");
            if transport == Transport::Udp {
                assert!(out.len() <= 4096, "UDP responses respect the payload limit");
            }
        }
        // Answering must never panic (a caught panic would be answered SERVFAIL and counted).
        assert_eq!(engine.panics(), 0, "a panic while answering");
    }
});
