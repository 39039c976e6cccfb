//! The Kafka proxy's parsers on any bytes: the size prefix, the request header (with Produce's
//! acks), and the response rewriter for every API and version it decodes. None may panic; a
//! rewritten response must carry its own size and decode again.
//!
//! Known and left out: kafka-protocol 0.18 sizes arrays with `Vec::with_capacity(count)` from the
//! wire before decoding an element, so a response declaring ~2^31 elements asks for hundreds of
//! GiB and aborts the process (upstream: kafka-protocol-rs pull requests 152, 161 and 200, open).
//! The proxy decodes only responses from its own upstream broker whose correlation id matched
//! the request, so reaching that takes a hostile broker; inputs with a 32-bit value or varint
//! of a million or more (where a count that large could be) are skipped here so the rest of the
//! decoders stay fuzzed. docs/fuzzing.md has the details.
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

/// Whether any position could be read as an array count of a million or more.
fn implausible_counts(m: &[u8]) -> bool {
    const LIMIT: u64 = 1_000_000;
    m.windows(4).any(|w| u64::from(u32::from_be_bytes(w.try_into().unwrap())) >= LIMIT)
        || (0..m.len()).any(|i| {
            let (mut v, mut shift) = (0u64, 0);
            for &b in m[i..].iter().take(5) {
                v |= u64::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    break;
                }
                shift += 7;
            }
            v >= LIMIT
        })
}

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = frame::frame_size(data[..4].try_into().unwrap(), 1 << 20);
    }
    let _ = frame::parse_request(data);
    if data.len() < 4 || implausible_counts(&data[2..]) {
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
