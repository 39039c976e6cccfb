//! KIP-951 leader hints in large responses, rewritten without holding the response.
//!
//! Produce v10+ and Fetch v16+ responses end with a `NodeEndpoints` tagged field (tag 0 of the
//! top-level tagged fields): the addresses of new partition leaders, which must be rewritten like
//! any broker address. A Fetch response is mostly record batches, and can be as large as the
//! client's `fetch.max.bytes`; decoding it whole would hold all of it per connection. Responses up
//! to [`WHOLE_MAX`] bytes are still rewritten whole (rewrite.rs); larger ones are walked here as
//! they arrive: every field before the top-level tagged fields is forwarded as it is read (record
//! batches straight from the read buffer), and only those tagged fields, at most [`TAIL_MAX`]
//! bytes, are held and rewritten.
//!
//! The size prefix has left before the hints are seen, so the rewritten tagged fields must take
//! exactly the bytes the broker's did. A shorter result is padded with one or two unknown tagged
//! fields of zeros after the last tag (clients skip tags they do not know); when the result is
//! longer (an `advertise_host` longer than the brokers' names), hints are left out from the end
//! until it fits, and the client falls back to a metadata refresh for those leaders, as it does
//! without KIP-951. No crate does this: kafka-protocol decodes whole messages only.
//!
//! The same walk translates a Fetch response's topic ids (v13+, in place: an id is 16 bytes
//! either way) once the proxy has switched to a cluster whose ids differ (topic_ids.rs); every
//! Fetch response of such a connection comes here then, whatever its size.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, fetch_response, produce_response};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::ConnError;
use super::rewrite::{self, Ports, RewriteError, Rewritten};
use super::topic_ids::Ids;
use crate::proxy::frame::{FETCH, PRODUCE, copy_exact};

/// Responses up to this many bytes are decoded and rewritten whole.
pub const WHOLE_MAX: usize = 1 << 20;
/// The most bytes of top-level tagged fields held for one streamed response.
pub const TAIL_MAX: usize = 1 << 20;

/// Whether a response to this request is streamed here rather than rewritten whole: `ids` are
/// those of the connection's cluster.
pub fn streamed(api_key: i16, version: i16, size: usize, ids: &dyn Ids) -> bool {
    if api_key == FETCH && version >= 13 && ids.mapped() {
        return true;
    }
    size > WHOLE_MAX && ((api_key == FETCH && version >= 16) || (api_key == PRODUCE && version >= 10))
}

/// Forwards one response of `size` bytes (after its size prefix, whose first four bytes, the
/// correlation id, were read already into `corr`) from `r` to `w` up to its top-level tagged
/// fields, and returns those: the caller rewrites them ([`rewrite_tail`]) and sends them. A
/// Fetch response's topic ids are translated by `ids` on the way.
pub(super) async fn forward_head<R, W>(
    (api_key, version): (i16, i16),
    r: &mut BufReader<R>,
    w: &mut W,
    (size, corr): (usize, [u8; 4]),
    ids: &dyn Ids,
) -> Result<Vec<u8>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let api = ApiKey::try_from(api_key).map_err(|_| RewriteError::UnknownApi(api_key))?;
    w.write_all(&(size as u32).to_be_bytes()).await?;
    w.write_all(&corr).await?;
    let mut walk = Walk { r, w, left: size.saturating_sub(4), api, version, ids };
    walk.tags().await?; // the response header's
    if api_key == FETCH {
        walk.fetch().await?;
    } else {
        walk.produce().await?;
    }
    let Walk { r, left, .. } = walk;
    if left > TAIL_MAX {
        return Err(malformed(api, version, format!("{left} bytes of top-level tagged fields, over {TAIL_MAX}")));
    }
    let mut tail = vec![0u8; left];
    r.read_exact(&mut tail).await?;
    Ok(tail)
}

/// [`forward`] over one response `message` in memory (after its size prefix, correlation id
/// first): what the client would be sent, size prefix included, or why the connection would
/// close. For fuzzing: nothing in memory waits, so one poll completes it.
pub fn forward_in_memory(
    api_key: i16,
    version: i16,
    message: &[u8],
    advertise: &StrBytes,
    ports: &(dyn Ports + Sync),
    ids: &dyn Ids,
) -> Result<Vec<u8>, String> {
    use std::task::{Context, Poll, Waker};
    let Some((corr, body)) = message.split_first_chunk::<4>() else {
        return Err("shorter than a correlation id".into());
    };
    let mut r = BufReader::new(body);
    let mut out = Vec::new();
    let polled = {
        let fut = forward_head((api_key, version), &mut r, &mut out, (message.len(), *corr), ids);
        std::pin::pin!(fut).as_mut().poll(&mut Context::from_waker(Waker::noop()))
    };
    match polled {
        Poll::Ready(Ok(tail)) => {
            let (rewritten, _) = rewrite_tail(api_key, version, &tail, advertise, ports).map_err(|e| e.to_string())?;
            out.extend_from_slice(rewritten.as_deref().unwrap_or(&tail));
            Ok(out)
        }
        Poll::Ready(Err(e)) => Err(e.to_string()),
        Poll::Pending => Err("reading from memory waited".into()),
    }
}

fn malformed(api: ApiKey, version: i16, error: String) -> ConnError {
    RewriteError::Decode { api, version, error }.into()
}

/// Reads a response field by field, forwarding each byte as it goes, never past the frame.
struct Walk<'a, R, W> {
    r: &'a mut BufReader<R>,
    w: &'a mut W,
    left: usize,
    api: ApiKey,
    version: i16,
    ids: &'a dyn Ids,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Walk<'_, R, W> {
    fn claim(&mut self, n: usize) -> Result<(), ConnError> {
        match self.left.checked_sub(n) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(malformed(self.api, self.version, "a field runs past the end of the frame".into())),
        }
    }

    /// Forwards `n` bytes unread.
    async fn pass(&mut self, n: usize) -> Result<(), ConnError> {
        self.claim(n)?;
        copy_exact(self.r, self.w, n as u64).await?;
        Ok(())
    }

    async fn uvarint(&mut self) -> Result<u32, ConnError> {
        let mut value = 0u32;
        for shift in (0..35).step_by(7) {
            self.claim(1)?;
            let b = self.r.read_u8().await?;
            self.w.write_u8(b).await?;
            value |= u32::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed(self.api, self.version, "a varint longer than five bytes".into()))
    }

    /// A compact array's element count or a compact string's length; null is 0.
    async fn compact(&mut self) -> Result<usize, ConnError> {
        Ok((self.uvarint().await? as usize).saturating_sub(1))
    }

    /// A tagged-fields section, forwarded whole. Every element consumes bytes, so a hostile
    /// count ends at the frame's end.
    async fn tags(&mut self) -> Result<(), ConnError> {
        for _ in 0..self.uvarint().await? {
            self.uvarint().await?;
            let size = self.uvarint().await? as usize;
            self.pass(size).await?;
        }
        Ok(())
    }

    /// A topic id, translated for the client.
    async fn topic_id(&mut self) -> Result<(), ConnError> {
        self.claim(16)?;
        let mut id = [0u8; 16];
        self.r.read_exact(&mut id).await?;
        let mut id = uuid::Uuid::from_bytes(id);
        self.ids.to_client(None, &mut id);
        self.w.write_all(id.as_bytes()).await?;
        Ok(())
    }

    /// Fetch v13+, up to the top-level tagged fields.
    async fn fetch(&mut self) -> Result<(), ConnError> {
        self.pass(4 + 2 + 4).await?; // throttle_time_ms, error_code, session_id
        for _ in 0..self.compact().await? {
            self.topic_id().await?;
            for _ in 0..self.compact().await? {
                // partition_index, error_code, high_watermark, last_stable_offset, log_start_offset
                self.pass(4 + 2 + 8 + 8 + 8).await?;
                for _ in 0..self.compact().await? {
                    self.pass(8 + 8).await?; // aborted transaction: producer_id, first_offset
                    self.tags().await?;
                }
                self.pass(4).await?; // preferred_read_replica
                let records = self.compact().await?;
                self.pass(records).await?;
                self.tags().await?; // diverging_epoch, current_leader, snapshot_id
            }
            self.tags().await?;
        }
        Ok(())
    }

    /// Produce v10+, up to the top-level tagged fields.
    async fn produce(&mut self) -> Result<(), ConnError> {
        for _ in 0..self.compact().await? {
            if self.version <= 12 {
                let name = self.compact().await?;
                self.pass(name).await?;
            } else {
                self.pass(16).await?; // topic_id
            }
            for _ in 0..self.compact().await? {
                // index, error_code, base_offset, log_append_time_ms, log_start_offset
                self.pass(4 + 2 + 8 + 8 + 8).await?;
                for _ in 0..self.compact().await? {
                    self.pass(4).await?; // batch_index
                    let message = self.compact().await?;
                    self.pass(message).await?;
                    self.tags().await?;
                }
                let message = self.compact().await?;
                self.pass(message).await?; // error_message
                self.tags().await?; // current_leader
            }
            self.tags().await?;
        }
        self.pass(4).await // throttle_time_ms
    }
}

/// A node endpoint of either response.
trait Endpoint: Encodable + Decodable {
    fn address(&mut self) -> (i32, &mut StrBytes, &mut i32);
}

impl Endpoint for fetch_response::NodeEndpoint {
    fn address(&mut self) -> (i32, &mut StrBytes, &mut i32) {
        (self.node_id.0, &mut self.host, &mut self.port)
    }
}

impl Endpoint for produce_response::NodeEndpoint {
    fn address(&mut self) -> (i32, &mut StrBytes, &mut i32) {
        (self.node_id.0, &mut self.host, &mut self.port)
    }
}

/// Rewrites the leader hints in a response's top-level tagged fields `tail`, into exactly as many
/// bytes. `Ok(None)`: there are none, forward `tail` unchanged.
pub fn rewrite_tail(
    api_key: i16,
    version: i16,
    tail: &[u8],
    advertise: &StrBytes,
    ports: &dyn Ports,
) -> Result<(Option<Vec<u8>>, Rewritten), RewriteError> {
    let api = ApiKey::try_from(api_key).map_err(|_| RewriteError::UnknownApi(api_key))?;
    let bad = |error: &str| RewriteError::Decode { api, version, error: error.into() };
    let (fields, used) = tagged_fields(tail).ok_or_else(|| bad("malformed top-level tagged fields"))?;
    let Some(at) = fields.iter().position(|f| f.0 == 0) else { return Ok((None, Rewritten::default())) };
    let rewritten = if api_key == FETCH {
        rewrite_hints::<fetch_response::NodeEndpoint>(api, version, &fields, at, used, advertise, ports)
    } else {
        rewrite_hints::<produce_response::NodeEndpoint>(api, version, &fields, at, used, advertise, ports)
    }?;
    // Bytes past the message (which the whole rewriter ignores too) are passed on as they came.
    Ok(match rewritten {
        (Some(mut out), done) => {
            out.extend_from_slice(&tail[used..]);
            (Some(out), done)
        }
        none => none,
    })
}

fn rewrite_hints<E: Endpoint>(
    api: ApiKey,
    version: i16,
    fields: &[(u32, &[u8])],
    at: usize,
    want: usize,
    advertise: &StrBytes,
    ports: &dyn Ports,
) -> Result<(Option<Vec<u8>>, Rewritten), RewriteError> {
    let bad = |error: String| RewriteError::Decode { api, version, error };
    let mut buf = Bytes::copy_from_slice(fields[at].1);
    let count = get_uvarint(&mut buf).ok_or_else(|| bad("malformed node endpoints".into()))?;
    if count <= 1 {
        return Ok((None, Rewritten::default()));
    }
    let mut endpoints = Vec::new();
    for _ in 1..count {
        if !buf.has_remaining() {
            return Err(bad("node endpoints past the end of their field".into()));
        }
        endpoints.push(E::decode(&mut buf, version).map_err(|e| bad(e.to_string()))?);
    }
    let mut done = Rewritten::default();
    endpoints.retain_mut(|e| {
        let (node, host, port) = e.address();
        rewrite::swap(ports, advertise, node, host, port, &mut done)
    });
    loop {
        let mut hints = BytesMut::new();
        put_uvarint(&mut hints, endpoints.len() as u32 + 1);
        for e in &endpoints {
            e.encode(&mut hints, version).map_err(|e| RewriteError::Encode { api, version, error: e.to_string() })?;
        }
        let mut with = fields.to_vec();
        with[at].1 = &hints;
        if let Some(out) = fit(&with, want) {
            return Ok((Some(out), done));
        }
        if endpoints.pop().is_none() {
            return Err(bad("rewritten leader hints do not fit the broker's bytes".into()));
        }
        done.addresses = done.addresses.saturating_sub(1);
        done.unfit += 1;
    }
}

/// Encodes `fields` into exactly `want` bytes, padded with one or two unknown tagged fields of
/// zeros after the last; `None` if they take more, or the rest cannot be padded (one byte).
fn fit(fields: &[(u32, &[u8])], want: usize) -> Option<Vec<u8>> {
    let plain = encode_fields(fields, &[]);
    if plain.len() >= want {
        return (plain.len() == want).then_some(plain);
    }
    let first = fields.iter().map(|f| f.0).max()?.checked_add(1)?;
    let second = first.checked_add(1)?;
    for tags in [&[first][..], &[first, second]] {
        let mut pads: Vec<(u32, usize)> = tags.iter().map(|&t| (t, 0)).collect();
        let least = encode_fields(fields, &pads).len();
        let Some(room) = want.checked_sub(least) else { continue };
        // A longer pad may take a longer size varint: try the few lengths that can fit.
        for len in (room.saturating_sub(4)..=room).rev() {
            if let Some(last) = pads.last_mut() {
                last.1 = len;
            }
            let out = encode_fields(fields, &pads);
            if out.len() == want {
                return Some(out);
            }
        }
    }
    None
}

fn encode_fields(fields: &[(u32, &[u8])], pads: &[(u32, usize)]) -> Vec<u8> {
    let mut out = BytesMut::new();
    put_uvarint(&mut out, (fields.len() + pads.len()) as u32);
    for (tag, data) in fields {
        put_uvarint(&mut out, *tag);
        put_uvarint(&mut out, data.len() as u32);
        out.put_slice(data);
    }
    for &(tag, len) in pads {
        put_uvarint(&mut out, tag);
        put_uvarint(&mut out, len as u32);
        out.put_bytes(0, len);
    }
    out.to_vec()
}

/// Tagged fields as (tag, data), in wire order.
type Fields<'a> = Vec<(u32, &'a [u8])>;

/// Splits the tagged-fields section at the start of `b`; the bytes it takes.
fn tagged_fields(mut b: &[u8]) -> Option<(Fields<'_>, usize)> {
    let all = b.len();
    let count = get_uvarint(&mut b)?;
    let mut fields = Vec::new();
    for _ in 0..count {
        let tag = get_uvarint(&mut b)?;
        let size = get_uvarint(&mut b)? as usize;
        if size > b.len() {
            return None;
        }
        let (data, rest) = b.split_at(size);
        fields.push((tag, data));
        b = rest;
    }
    Some((fields, all - b.len()))
}

fn get_uvarint<B: Buf>(b: &mut B) -> Option<u32> {
    let mut value = 0u32;
    for shift in (0..35).step_by(7) {
        if !b.has_remaining() {
            return None;
        }
        let byte = b.get_u8();
        value |= u32::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn put_uvarint(out: &mut BytesMut, mut v: u32) {
    while v >= 0x80 {
        out.put_u8((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

#[cfg(test)]
mod tests {
    use super::super::rewrite::tests::{TestPorts, adv, decoded, message, ports};
    use super::super::topic_ids::{Plain, Shown, TopicIds};
    use super::*;
    use kafka_protocol::messages::fetch_response::{
        AbortedTransaction, FetchableTopicResponse, LeaderIdAndEpoch, PartitionData,
    };
    use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
    use kafka_protocol::messages::{BrokerId, FetchResponse, ProduceResponse};

    const MSK: &str = "b-1.mycluster.abc123.c2.kafka.eu-west-1.amazonaws.com";

    fn records(len: usize) -> Bytes {
        (0..len).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>().into()
    }

    fn fetch(hosts: &[&str], records_len: usize) -> FetchResponse {
        let moved = PartitionData::default()
            .with_partition_index(1)
            .with_error_code(6)
            .with_current_leader(LeaderIdAndEpoch::default().with_leader_id(BrokerId(2)).with_leader_epoch(7));
        let data = PartitionData::default()
            .with_high_watermark(1 << 40)
            .with_aborted_transactions(Some(vec![
                AbortedTransaction::default().with_producer_id(kafka_protocol::messages::ProducerId(9)),
            ]))
            .with_records(Some(records(records_len)));
        let topic = FetchableTopicResponse::default().with_partitions(vec![data, moved]);
        let hints = hosts.iter().enumerate().map(|(i, h)| {
            fetch_response::NodeEndpoint::default()
                .with_node_id(BrokerId(i as i32 + 1))
                .with_host(StrBytes::from_string(h.to_string()))
                .with_port(9098)
                .with_rack(Some(StrBytes::from_static_str("euw1-az1")))
        });
        FetchResponse::default().with_session_id(5).with_responses(vec![topic]).with_node_endpoints(hints.collect())
    }

    fn produce(version: i16, hosts: &[&str]) -> ProduceResponse {
        let partition = PartitionProduceResponse::default()
            .with_error_code(6)
            .with_error_message(Some(StrBytes::from_static_str("not the leader")));
        let mut topic = TopicProduceResponse::default().with_partition_responses(vec![partition]);
        if version <= 12 {
            topic.name = StrBytes::from_static_str("orders").into();
        }
        let hints = hosts.iter().enumerate().map(|(i, h)| {
            produce_response::NodeEndpoint::default()
                .with_node_id(BrokerId(i as i32 + 1))
                .with_host(StrBytes::from_string(h.to_string()))
                .with_port(9098)
        });
        ProduceResponse::default()
            .with_throttle_time_ms(3)
            .with_responses(vec![topic])
            .with_node_endpoints(hints.collect())
    }

    /// What relay.rs does with a streamed response: its head forwarded, its tail rewritten over
    /// `ports` and sent.
    #[allow(clippy::too_many_arguments)]
    async fn forward<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        api_key: i16,
        version: i16,
        r: &mut BufReader<R>,
        w: &mut W,
        size: usize,
        corr: [u8; 4],
        advertise: &StrBytes,
        ports: &dyn Ports,
    ) -> Result<Rewritten, ConnError> {
        let tail = forward_head((api_key, version), r, w, (size, corr), &Plain).await?;
        let (out, done) = rewrite_tail(api_key, version, &tail, advertise, ports)?;
        w.write_all(out.as_deref().unwrap_or(&tail)).await?;
        Ok(done)
    }

    /// Streams `msg` (a response after its size prefix) through [`forward`], reading 4 KiB at a time.
    async fn stream(
        api: ApiKey,
        version: i16,
        msg: &Bytes,
        p: &TestPorts,
        advertise: &StrBytes,
    ) -> (BytesMut, Rewritten) {
        let (corr, body) = msg.split_at(4);
        let mut r = BufReader::with_capacity(4096, body);
        let mut out = Vec::new();
        let corr = corr.try_into().unwrap();
        let done = forward(api as i16, version, &mut r, &mut out, msg.len(), corr, advertise, p).await.unwrap();
        assert_eq!(out.len(), msg.len() + 4, "the size prefix that left first stays true");
        (BytesMut::from(&out[..]), done)
    }

    #[tokio::test]
    async fn fetch_hints_rewritten_in_as_many_bytes_records_untouched() {
        for v in 16..=18 {
            let p = ports(100);
            let m = fetch(&[MSK, &MSK.replace("b-1", "b-2"), &MSK.replace("b-1", "b-3")], 3 << 20);
            let (out, done) = stream(ApiKey::Fetch, v, &message(ApiKey::Fetch, v, &m), &p, &adv()).await;
            assert_eq!((done.addresses, done.dropped, done.unfit), (3, 0, 0));
            let back: FetchResponse = decoded(ApiKey::Fetch, v, out);
            assert_eq!(back.responses, m.responses);
            assert_eq!(back.session_id, 5);
            let seen: Vec<_> =
                back.node_endpoints.iter().map(|e| (e.node_id.0, e.host.as_str(), e.port, e.rack.clone())).collect();
            let rack = Some(StrBytes::from_static_str("euw1-az1"));
            assert_eq!(
                seen,
                [
                    (1, "kafka-proxy.internal", 9100, rack.clone()),
                    (2, "kafka-proxy.internal", 9101, rack.clone()),
                    (3, "kafka-proxy.internal", 9102, rack)
                ]
            );
            // The bytes saved are an unknown tagged field of zeros, after the hints.
            let pad = back.unknown_tagged_fields.get(&1).expect("padding");
            assert!(pad.iter().all(|&b| b == 0));
        }
    }

    #[tokio::test]
    async fn hints_that_grow_are_left_out_from_the_end_until_they_fit() {
        let long = StrBytes::from_static_str("kafka-proxy.a-rather-long-internal-name.example.com");
        let p = ports(100);
        let m = fetch(&["b-1", "b-2", "b-3", "b-4"], 1000);
        let (out, done) = stream(ApiKey::Fetch, 16, &message(ApiKey::Fetch, 16, &m), &p, &long).await;
        let back: FetchResponse = decoded(ApiKey::Fetch, 16, out);
        assert!(done.unfit > 0);
        assert_eq!(back.node_endpoints.len() + done.unfit, 4);
        assert_eq!(done.addresses, back.node_endpoints.len());
        assert!(back.node_endpoints.iter().all(|e| e.host == long));
        let nodes: Vec<i32> = back.node_endpoints.iter().map(|e| e.node_id.0).collect();
        assert_eq!(nodes, (1..=nodes.len() as i32).collect::<Vec<_>>(), "kept from the front");
        assert_eq!(back.responses, m.responses);
    }

    #[tokio::test]
    async fn produce_hints_rewritten_every_version() {
        for v in 10..=13 {
            let p = ports(100);
            let m = produce(v, &[MSK, &MSK.replace("b-1", "b-2")]);
            let (out, done) = stream(ApiKey::Produce, v, &message(ApiKey::Produce, v, &m), &p, &adv()).await;
            assert_eq!(done.addresses, 2);
            let back: ProduceResponse = decoded(ApiKey::Produce, v, out);
            assert_eq!(back.responses, m.responses);
            assert_eq!(back.throttle_time_ms, 3);
            assert!(back.node_endpoints.iter().all(|e| e.host == adv()));
            assert_eq!(back.node_endpoints.iter().map(|e| e.port).collect::<Vec<_>>(), [9100, 9101]);
        }
    }

    #[tokio::test]
    async fn without_hints_the_bytes_pass_unchanged() {
        let p = ports(100);
        let msg = message(ApiKey::Fetch, 17, &fetch(&[], 5000));
        let (out, done) = stream(ApiKey::Fetch, 17, &msg, &p, &adv()).await;
        assert_eq!(done, Rewritten::default());
        assert_eq!(&out[4..], &msg[..]);
    }

    #[tokio::test]
    async fn hostile_bytes_end_in_an_error_or_a_frame_of_the_same_size() {
        let p = ports(100);
        let msg = message(ApiKey::Fetch, 16, &fetch(&[MSK, "b-2"], 40)).to_vec();
        let runs = (4..msg.len()).flat_map(|at| [0x00u16, 0x7f, 0x80, 0xff].map(|b| (at, b)));
        for (at, b) in runs.chain((5..msg.len()).map(|cut| (cut, 0x100))) {
            let mut bad = msg.clone();
            if b == 0x100 {
                bad.truncate(at);
            } else {
                bad[at] = b as u8;
            }
            // The frame claims the original size when cut: the stream ends early.
            let (corr, body) = bad.split_at(4);
            let mut r = BufReader::with_capacity(64, body);
            let mut out = Vec::new();
            let corr = corr.try_into().unwrap();
            if forward(1, 16, &mut r, &mut out, msg.len(), corr, &adv(), &p).await.is_ok() {
                assert_eq!(out.len(), msg.len() + 4, "byte {at} set to {b:#x}");
            }
        }
    }

    /// After a switch to a cluster whose ids differ, a Fetch response of any v13+ size is walked:
    /// its topic ids become those clients saw, its records and hints are what they were.
    #[test]
    fn fetch_topic_ids_are_translated_in_place_records_untouched() {
        let shown = std::sync::Arc::new(Shown::default());
        let mut seen = uuid::Uuid::from_u128(1);
        TopicIds::new("p", shown.clone()).to_client(Some("orders"), &mut seen);
        let b = TopicIds::new("p", shown);
        let theirs = uuid::Uuid::from_u128(2);
        let mut first = theirs;
        b.to_client(Some("orders"), &mut first);
        assert_eq!(first, uuid::Uuid::from_u128(1));
        let other = uuid::Uuid::from_u128(3);
        for v in 13..=18 {
            let mut m = fetch(if v >= 16 { &[MSK] } else { &[] }, 2000);
            m.responses[0].topic_id = theirs;
            let mut second = m.responses[0].clone();
            second.topic_id = other;
            m.responses.push(second);
            let msg = message(ApiKey::Fetch, v, &m);
            assert!(streamed(FETCH, v, msg.len(), &b) && !streamed(FETCH, v, msg.len(), &Plain));
            let out = forward_in_memory(FETCH, v, &msg, &adv(), &ports(10), &b).unwrap();
            assert_eq!(out.len(), msg.len() + 4);
            let back: FetchResponse = decoded(ApiKey::Fetch, v, BytesMut::from(&out[..]));
            assert_eq!(back.responses[0].topic_id, uuid::Uuid::from_u128(1), "v{v}");
            assert_eq!(back.responses[1].topic_id, other, "an id B alone has passes as it is");
            assert_eq!(back.responses[0].partitions, m.responses[0].partitions);
            if v >= 16 {
                assert_eq!(back.node_endpoints[0].host, adv());
            }
        }
    }

    #[test]
    fn every_shorter_result_but_one_byte_is_padded_exactly() {
        let data = [1u8, 2, 3];
        let fields = [(0u32, &data[..])];
        let plain = encode_fields(&fields, &[]).len();
        assert_eq!(fit(&fields, plain).map(|o| o.len()), Some(plain));
        assert_eq!(fit(&fields, plain - 1), None);
        assert_eq!(fit(&fields, plain + 1), None);
        for want in plain + 2..plain + 40_000 {
            let out = fit(&fields, want).unwrap_or_else(|| panic!("{want}"));
            assert_eq!(out.len(), want);
            let (parsed, used) = tagged_fields(&out).unwrap();
            assert_eq!(used, want);
            assert_eq!(parsed[0], (0, &data[..]));
            assert!(parsed[1..].iter().all(|(tag, pad)| *tag > 0 && pad.iter().all(|&b| b == 0)));
        }
    }
}

#[cfg(test)]
mod seeds {
    use super::super::rewrite::tests::{adv, decoded, ports};
    use super::super::topic_ids::Plain;
    use super::*;
    use kafka_protocol::messages::{FetchResponse, ProduceResponse, ResponseHeader};

    /// The fuzz corpus's Produce and Fetch responses with leader hints are in their canonical
    /// encoding (where the fuzz target holds the streaming rewriter to the whole one) and stream.
    #[test]
    fn fuzz_seeds_with_hints_are_canonical_and_stream() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/kafka_frame");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if !path.to_string_lossy().ends_with("-hints") {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            let (api, version, message) = match data[0] % 6 {
                3 => (ApiKey::Produce, data[1] as i16, &data[2..]),
                4 => (ApiKey::Fetch, data[1] as i16, &data[2..]),
                _ => panic!("{path:?}"),
            };
            let mut b = Bytes::copy_from_slice(message);
            let hv = api.response_header_version(version);
            let h = ResponseHeader::decode(&mut b, hv).unwrap();
            let mut again = BytesMut::new();
            h.encode(&mut again, hv).unwrap();
            let hosts: Vec<String> = if api == ApiKey::Fetch {
                let m = FetchResponse::decode(&mut b, version).unwrap();
                m.encode(&mut again, version).unwrap();
                m.node_endpoints.iter().map(|e| e.host.to_string()).collect()
            } else {
                let m = ProduceResponse::decode(&mut b, version).unwrap();
                m.encode(&mut again, version).unwrap();
                m.node_endpoints.iter().map(|e| e.host.to_string()).collect()
            };
            assert!(b.is_empty() && again[..] == *message, "{path:?} is not canonical");
            assert_eq!(hosts.len(), 2);
            let out = forward_in_memory(api as i16, version, message, &adv(), &ports(10), &Plain).unwrap();
            let out = BytesMut::from(&out[..]);
            let hosts: Vec<String> = if api == ApiKey::Fetch {
                decoded::<FetchResponse>(api, version, out).node_endpoints.iter().map(|e| e.host.to_string()).collect()
            } else {
                decoded::<ProduceResponse>(api, version, out)
                    .node_endpoints
                    .iter()
                    .map(|e| e.host.to_string())
                    .collect()
            };
            assert_eq!(hosts, [adv().to_string(), adv().to_string()], "{path:?}");
            seen += 1;
        }
        assert_eq!(seen, 5);
    }
}
