//! The Kafka proxy's parsers on any bytes: the size prefix, the request header (with Produce's
//! acks), and the response rewriter for every API and version it decodes. None may panic; a
//! rewritten response must carry its own size and decode again.
//!
//! It runs with the daemon's allocator: kafka-protocol 0.18 reserves `Vec::with_capacity(count)`
//! from the wire before decoding an element, and a count near 2^32 must be a decode error, not an
//! aborted process (see mskdns::alloc and docs/fuzzing.md).
#![no_main]

use std::sync::Mutex;

use bytes::Bytes;
use kafka_protocol::protocol::StrBytes;
use libfuzzer_sys::fuzz_target;
use mskdns::proxy::frame;
use mskdns::proxy::rewrite::{self, Ports};

struct Counting(Mutex<u16>);

impl Ports for Counting {
    fn port_for(&self, _node: i32, _host: &str, _port: i32) -> Option<u16> {
        let mut n = self.0.lock().unwrap();
        *n = n.wrapping_add(1);
        (*n % 7 != 0).then_some(9100 + *n % 100)
    }
}

#[global_allocator]
static ALLOC: mskdns::alloc::Allocator = mskdns::alloc::Allocator;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = frame::frame_size(data[..4].try_into().unwrap(), 1 << 20);
    }
    let _ = frame::parse_request(data);
    if data.len() < 4 {
        return;
    }
    // The first two bytes pick the API and version; the rest is the response message.
    let api = [frame::METADATA, frame::FIND_COORDINATOR, frame::DESCRIBE_CLUSTER, frame::PRODUCE, frame::FETCH, frame::API_VERSIONS]
        [data[0] as usize % 6];
    let version = (data[1] % 20) as i16;
    let message = Bytes::copy_from_slice(&data[2..]);
    let advertise = StrBytes::from_static_str("kafka-proxy.internal");
    if let Ok((Some(out), _)) = rewrite::rewrite(api, version, message, &advertise, &Counting(Mutex::new(0))) {
        let size = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(size, out.len() - 4);
        let again = rewrite::rewrite(api, version, out.freeze().slice(4..), &advertise, &Counting(Mutex::new(0)));
        assert!(again.is_ok(), "a rewritten response no longer decodes: {:?}", again.err());
    }
});
