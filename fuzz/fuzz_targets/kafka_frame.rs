//! The Kafka proxy's parsers on any bytes: the size prefix, the request header (with Produce's
//! acks), and the response rewriter for every API and version it decodes. None may panic; a
//! rewritten response must carry its own size and decode again. Produce and Fetch responses also
//! go through the streaming rewriter of large responses (hints.rs): whatever the whole rewriter
//! accepts it must accept, in as many bytes, and what it sends must decode. Topic ids are
//! translated as after a switch to a cluster whose ids differ (topic_ids.rs), which also sends
//! every Fetch v13+ response through the streaming walker; the requests whose ids are translated
//! go through that translator.
//!
//! It runs with the daemon's allocator: kafka-protocol 0.18 reserves `Vec::with_capacity(count)`
//! from the wire before decoding an element, and a count near 2^32 must be a decode error, not an
//! aborted process (see mskdns::alloc and docs/fuzzing.md).
#![no_main]

use std::sync::{Arc, LazyLock, Mutex};

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, FetchResponse, ProduceResponse, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use libfuzzer_sys::fuzz_target;
use mskdns::proxy::rewrite::{self, Ports};
use mskdns::proxy::topic_ids::{Ids, Shown, TopicIds};
use mskdns::proxy::{frame, hints};

/// A cluster switched to, where topic "t" has id 2 and clients were shown id 1.
static IDS: LazyLock<TopicIds> = LazyLock::new(|| {
    let shown = Arc::new(Shown::default());
    let mut first = uuid::Uuid::from_u128(1);
    TopicIds::new("fuzz", shown.clone()).to_client(Some("t"), &mut first);
    let ids = TopicIds::new("fuzz", shown);
    let mut theirs = uuid::Uuid::from_u128(2);
    ids.to_client(Some("t"), &mut theirs);
    assert!(ids.mapped());
    ids
});

struct Counting(Mutex<u16>);

impl Ports for Counting {
    fn port_of(&self, _node: i32) -> Option<u16> {
        let mut n = self.0.lock().unwrap();
        *n = n.wrapping_add(1);
        (*n % 7 != 0).then_some(9100 + *n % 100)
    }
}

fn canonical<T: Decodable + Encodable>(api: ApiKey, version: i16, message: &[u8]) -> bool {
    let header_version = api.response_header_version(version);
    let mut b = Bytes::copy_from_slice(message);
    let (Ok(h), Ok(m)) = (ResponseHeader::decode(&mut b, header_version), T::decode(&mut b, version)) else {
        return false;
    };
    let mut again = bytes::BytesMut::new();
    b.is_empty()
        && h.encode(&mut again, header_version).is_ok()
        && m.encode(&mut again, version).is_ok()
        && again[..] == *message
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
    let api = [
        frame::METADATA,
        frame::FIND_COORDINATOR,
        frame::DESCRIBE_CLUSTER,
        frame::PRODUCE,
        frame::FETCH,
        frame::API_VERSIONS,
    ][data[0] as usize % 6];
    let version = (data[1] % 20) as i16;
    let message = Bytes::copy_from_slice(&data[2..]);
    let advertise = StrBytes::from_static_str("kafka-proxy.internal");
    for request in [frame::FETCH, frame::METADATA, frame::CONSUMER_GROUP_HEARTBEAT] {
        if let Ok(out) = mskdns::proxy::topic_ids::request(request, version, message.clone(), &*IDS) {
            assert_eq!(u32::from_be_bytes(out[..4].try_into().unwrap()) as usize, out.len() - 4);
        }
    }
    let whole = rewrite::rewrite(api, version, message.clone(), &advertise, &Counting(Mutex::new(0)), &*IDS);
    if let Ok((Some(out), _)) = &whole {
        let size = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(size, out.len() - 4);
        let again = rewrite::rewrite(
            api,
            version,
            out.clone().freeze().slice(4..),
            &advertise,
            &Counting(Mutex::new(0)),
            &*IDS,
        );
        assert!(again.is_ok(), "a rewritten response no longer decodes: {:?}", again.err());
    }
    let streamable = (api == frame::FETCH && version >= 13) || (api == frame::PRODUCE && version >= 10);
    if streamable {
        let streamed = hints::forward_in_memory(api, version, &message, &advertise, &Counting(Mutex::new(0)), &*IDS);
        if let Ok(out) = &streamed {
            assert_eq!(out.len(), message.len() + 4);
            assert_eq!(u32::from_be_bytes(out[..4].try_into().unwrap()) as usize, message.len());
        }
        // kafka-protocol reads a known tagged field without bounding it by its declared size,
        // so it accepts messages the walker (which goes by the sizes) rejects: the two must agree
        // on messages in their canonical encoding, those that decode and encode to the same bytes.
        let canonical = if api == frame::FETCH {
            canonical::<FetchResponse>(ApiKey::Fetch, version, &message)
        } else {
            canonical::<ProduceResponse>(ApiKey::Produce, version, &message)
        };
        if canonical {
            let out = streamed.expect("a well-formed response the streaming rewriter did not accept");
            let again = rewrite::rewrite(
                api,
                version,
                Bytes::from(out).slice(4..),
                &advertise,
                &Counting(Mutex::new(0)),
                &*IDS,
            );
            assert!(again.is_ok(), "a streamed response no longer decodes: {:?}", again.err());
        }
    }
});
