//! What a Fetch response costs the ports-mode proxy after a switch to a cluster whose topic ids
//! differ (topic_ids.rs): walked field by field with its ids translated, against the plain copy
//! every Fetch response gets before a switch (or on a cluster whose ids match).

use std::hint::black_box;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{ApiKey, FetchResponse, ResponseHeader};
use kafka_protocol::protocol::{Encodable, StrBytes};
use mskdns::proxy::topic_ids::{Ids, Plain, Shown, TopicIds};

/// A Fetch v16 response (after its size prefix): `topics` topics of 4 partitions, each with
/// `per_partition` bytes of records.
fn response(topics: u128, per_partition: usize) -> Bytes {
    let partition = |i| {
        PartitionData::default()
            .with_partition_index(i)
            .with_high_watermark(1 << 20)
            .with_records(Some(Bytes::from(vec![7u8; per_partition])))
    };
    let topic = |t: u128| {
        FetchableTopicResponse::default()
            .with_topic_id(uuid::Uuid::from_u128(1000 + t))
            .with_partitions((0..4).map(partition).collect())
    };
    let m = FetchResponse::default().with_session_id(9).with_responses((0..topics).map(topic).collect());
    let mut b = BytesMut::new();
    ResponseHeader::default().with_correlation_id(5).encode(&mut b, ApiKey::Fetch.response_header_version(16)).unwrap();
    m.encode(&mut b, 16).unwrap();
    b.freeze()
}

/// Clients were shown ids 1..; the cluster switched to names the same topics 1000...
fn switched(topics: u128) -> TopicIds {
    let shown = Arc::new(Shown::default());
    let first = TopicIds::new("bench", shown.clone());
    let ids = TopicIds::new("bench", shown);
    for t in 0..topics {
        let name = format!("topic-{t}");
        first.to_client(Some(&name), &mut uuid::Uuid::from_u128(1 + t));
        ids.to_client(Some(&name), &mut uuid::Uuid::from_u128(1000 + t));
    }
    assert!(ids.mapped());
    ids
}

fn bench(c: &mut Criterion) {
    let advertise = StrBytes::from_static_str("kafka-proxy.internal");
    let ports = std::collections::HashMap::<i32, u16>::new();
    let mut g = c.benchmark_group("fetch response");
    for (label, topics, per_partition) in [("1 MiB, 8 topics", 8, 32 << 10), ("64 KiB, 64 topics", 64, 256)] {
        let msg = response(topics, per_partition);
        let ids = switched(topics);
        let out = mskdns::proxy::hints::forward_in_memory(1, 16, &msg, &advertise, &ports, &ids).unwrap();
        assert_eq!(out.len(), msg.len() + 4);
        g.throughput(Throughput::Bytes(msg.len() as u64));
        g.bench_function(format!("{label}: copied as it is"), |b| {
            b.iter(|| {
                let mut out = Vec::with_capacity(msg.len() + 4);
                out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                out.extend_from_slice(black_box(&msg));
                out.len()
            })
        });
        g.bench_function(format!("{label}: walked, no ids to translate"), |b| {
            b.iter(|| {
                mskdns::proxy::hints::forward_in_memory(1, 16, black_box(&msg), &advertise, &ports, &Plain)
                    .unwrap()
                    .len()
            })
        });
        g.bench_function(format!("{label}: walked, ids translated"), |b| {
            b.iter(|| {
                mskdns::proxy::hints::forward_in_memory(1, 16, black_box(&msg), &advertise, &ports, &ids).unwrap().len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
