//! The per-query path, measured piece by piece and whole: parse, cluster match, answer bytes.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use mskdns::dns::catalog::Catalog;
use mskdns::dns::wire::{self, Query};

fn query(name: &str) -> Vec<u8> {
    let mut pkt = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
    pkt.extend(wire::name_to_wire(name).unwrap());
    pkt.extend([0, 1, 0, 1]);
    wire::push_opt(&mut pkt, 1232, false, 0);
    pkt[11] = 1;
    pkt
}

fn catalog() -> Catalog {
    let mut toml = String::from("[dns]\nupstreams = [\"127.0.0.1:53\"]\n");
    for i in 0..50 {
        toml += &format!(
            "[[clusters]]\nbootstrap = \"boot-clus{i:04}.c{}.kafka-serverless.us-east-1.amazonaws.com\"\naddresses = [\"10.{i}.0.1\", \"10.{i}.1.1\", \"10.{i}.2.1\"]\n",
            i % 4 + 1
        );
    }
    Catalog::from_config(&mskdns::config::Config::from_toml(&toml).unwrap()).unwrap()
}

fn bench(c: &mut Criterion) {
    let pkt = query("b0437-clus0025.c2.kafka-serverless.us-east-1.amazonaws.com");
    c.bench_function("parse query", |b| b.iter(|| Query::parse(black_box(&pkt)).unwrap().qtype));
    let q = Query::parse(&pkt).unwrap();
    let mut lc = [0u8; wire::MAX_NAME_LEN];
    let n = wire::lowercase_name(q.name(), &mut lc);
    c.bench_function("match serverless name", |b| {
        b.iter(|| mskdns::names::match_serverless(black_box(&lc[..n])).unwrap().apex)
    });
    let cat = catalog();
    let mut out = Vec::with_capacity(4096);
    let client = std::net::IpAddr::from([10, 0, 0, 1]);
    c.bench_function("cluster query to response bytes", |b| {
        b.iter(|| {
            let q = Query::parse(black_box(&pkt)).unwrap();
            let n = wire::lowercase_name(q.name(), &mut lc);
            cat.answer(&q, &lc[..n], 0, client, &mut out, q.udp_limit(1232), 1232);
            out.len()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
