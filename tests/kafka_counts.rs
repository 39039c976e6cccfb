//! Hostile array counts against the (patched) kafka-protocol decoders, with the system
//! allocator: a count the bytes cannot hold is a decode error, never an allocation of it (which
//! aborts the process when the allocator fails, under RLIMIT_AS or vm.overcommit_memory=2).

use bytes::Bytes;
use kafka_protocol::messages::MetadataResponse;
use kafka_protocol::protocol::{Decodable, Encodable};

#[test]
fn counts_past_the_bytes_left_are_errors_not_allocations() {
    // v12 (flexible): throttle_time_ms, then the brokers as a compact array of 2^32 - 2.
    let compact = [&0i32.to_be_bytes()[..], &[0xff, 0xff, 0xff, 0xff, 0x0f], &[0; 8]].concat();
    let e = MetadataResponse::decode(&mut Bytes::from(compact), 12).unwrap_err();
    assert!(e.to_string().contains("exceeds"), "{e}");
    // v1: the brokers as an i32-counted array of 2^31 - 1.
    let classic = [&i32::MAX.to_be_bytes()[..], &[0; 8]].concat();
    let e = MetadataResponse::decode(&mut Bytes::from(classic), 1).unwrap_err();
    assert!(e.to_string().contains("exceeds"), "{e}");
    // A count that fits decodes as before.
    let mut ok = bytes::BytesMut::new();
    MetadataResponse::default().encode(&mut ok, 12).unwrap();
    assert!(MetadataResponse::decode(&mut ok.freeze(), 12).is_ok());
}
