//! What an upstream sends back: any bytes through the cache's parser, and a parsed answer served
//! again must decode to the same records (from_bytes -> to_bytes -> from_bytes).
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use mskdns::config::CacheConfig;
use mskdns::dns::cache::Answer;
use mskdns::dns::wire::{self, Query};

fuzz_target!(|data: &[u8]| {
    let mut query = Vec::new();
    let name = wire::name_to_wire("www.example.test").unwrap();
    wire::build_upstream_query(&mut query, 0x4242, &name, wire::TYPE_A, wire::CLASS_IN, false, false);
    // Make most inputs pass the id and question checks so the record walk gets exercised.
    let mut resp = query.clone();
    resp.truncate(wire::HEADER_LEN + name.len() + 4);
    resp[2] |= 0x80;
    if data.len() >= 6 {
        resp[6..12].copy_from_slice(&data[..6]);
        resp.extend_from_slice(&data[6..]);
    }
    let now = Instant::now();
    for candidate in [data, &resp[..]] {
        let Ok(answer) = Answer::from_upstream(candidate, &query, &CacheConfig::default(), now) else { continue };
        let client = Query::parse(&query).expect("our own query parses");
        let mut out = Vec::new();
        answer.serve(&client, &mut out, now, 65_535, 1232);
        let again =
            Answer::from_upstream(&out, &query, &CacheConfig::default(), now).expect("served bytes parse again");
        let mut out2 = Vec::new();
        again.serve(&client, &mut out2, now, 65_535, 1232);
        assert_eq!(out, out2, "a served answer round-trips");
    }
});
