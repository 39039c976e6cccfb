//! Kafka framing: a 4-byte big-endian size, then the message. Only what routing needs is read
//! by hand here: the request header's api key, version and correlation id, and a Produce
//! request's `acks` (acks=0 gets no response, so it takes no place in the FIFO). Decoding a
//! whole request with kafka-protocol to learn those would cost a copy of every Produce batch.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};

pub const PRODUCE: i16 = 0;
pub const FETCH: i16 = 1;
pub const METADATA: i16 = 3;
pub const FIND_COORDINATOR: i16 = 10;
pub const API_VERSIONS: i16 = 18;
pub const DESCRIBE_CLUSTER: i16 = 60;
pub const DESCRIBE_CONFIGS: i16 = 32;
pub const DESCRIBE_QUORUM: i16 = 55;
pub const SHARE_FETCH: i16 = 78;
pub const SHARE_ACKNOWLEDGE: i16 = 79;
pub const OFFSET_COMMIT: i16 = 8;
pub const OFFSET_FETCH: i16 = 9;
pub const CREATE_TOPICS: i16 = 19;
pub const DELETE_TOPICS: i16 = 20;
pub const CONSUMER_GROUP_HEARTBEAT: i16 = 68;
pub const CONSUMER_GROUP_DESCRIBE: i16 = 69;
pub const DESCRIBE_TOPIC_PARTITIONS: i16 = 75;
pub const SHARE_GROUP_HEARTBEAT: i16 = 76;
pub const SHARE_GROUP_DESCRIBE: i16 = 77;
pub const DESCRIBE_SHARE_GROUP_OFFSETS: i16 = 90;
pub const ALTER_SHARE_GROUP_OFFSETS: i16 = 91;
pub const DELETE_SHARE_GROUP_OFFSETS: i16 = 92;

/// How many bytes of a request are read before it is forwarded: enough for the header and a
/// Produce request's transactional id and acks (both strings are at most 32767 bytes).
pub const REQUEST_PREFIX: usize = 72 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    /// False only for Produce with acks=0.
    pub expects_response: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit of {1}")]
    TooLarge(i64, u32),
    #[error(
        "a TLS ClientHello arrived on a plaintext listener: the client is configured for TLS (security.protocol=SSL or SASL_SSL) but this listener is plaintext"
    )]
    TlsOnPlaintext,
    #[error("negative frame size {0}")]
    Negative(i32),
    #[error("request header truncated")]
    Truncated,
}

/// Checks a frame's size prefix.
pub fn frame_size(prefix: [u8; 4], max: u32) -> Result<usize, FrameError> {
    // 0x16 0x03 0x0[0-4]: a TLS handshake record, not a Kafka size.
    if prefix[0] == 0x16 && prefix[1] == 0x03 && prefix[2] <= 0x04 {
        return Err(FrameError::TlsOnPlaintext);
    }
    let n = i32::from_be_bytes(prefix);
    if n < 0 {
        return Err(FrameError::Negative(n));
    }
    if n as u32 > max {
        return Err(FrameError::TooLarge(n as i64, max));
    }
    Ok(n as usize)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], FrameError> {
        // Lengths come from the client: `at + n` must not overflow (a varint of 2^64-1).
        let end = self.at.checked_add(n).ok_or(FrameError::Truncated)?;
        let s = self.b.get(self.at..end).ok_or(FrameError::Truncated)?;
        self.at = end;
        Ok(s)
    }
    fn i16(&mut self) -> Result<i16, FrameError> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn i32(&mut self) -> Result<i32, FrameError> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn uvarint(&mut self) -> Result<u64, FrameError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(FrameError::Truncated)
    }
    /// A nullable string with an i16 size (-1: null).
    fn string(&mut self) -> Result<(), FrameError> {
        let n = self.i16()?;
        if n > 0 {
            self.take(n as usize)?;
        }
        Ok(())
    }
    /// A compact nullable string: size + 1 as an unsigned varint (0: null).
    fn compact_string(&mut self) -> Result<(), FrameError> {
        let n = self.uvarint()?;
        if n > 1 {
            self.take(usize::try_from(n - 1).map_err(|_| FrameError::Truncated)?)?;
        }
        Ok(())
    }
    fn tagged_fields(&mut self) -> Result<(), FrameError> {
        for _ in 0..self.uvarint()? {
            self.uvarint()?;
            let size = self.uvarint()?;
            self.take(usize::try_from(size).map_err(|_| FrameError::Truncated)?)?;
        }
        Ok(())
    }
}

/// Reads a request's header (and a Produce request's acks) from the start of its message,
/// after the size prefix. `message` may be a prefix of the whole message.
pub fn parse_request(message: &[u8]) -> Result<RequestHeader, FrameError> {
    let mut r = Reader { b: message, at: 0 };
    let api_key = r.i16()?;
    let api_version = r.i16()?;
    let correlation_id = r.i32()?;
    let mut h = RequestHeader { api_key, api_version, correlation_id, expects_response: true };
    if api_key != PRODUCE {
        return Ok(h);
    }
    // Header v1: client_id (i16 string); v2 (flexible Produce, v9+): then tagged fields.
    r.string()?;
    let flexible = ApiKey::Produce.request_header_version(api_version) >= 2;
    if flexible {
        r.tagged_fields()?;
    }
    if api_version >= 3 {
        if flexible { r.compact_string()? } else { r.string()? }
    }
    h.expects_response = r.i16()? != 0;
    Ok(h)
}

/// The correlation id at the start of a response message.
pub fn response_correlation(message: &[u8]) -> Option<i32> {
    Some(i32::from_be_bytes(message.get(..4)?.try_into().ok()?))
}

/// Streams exactly `n` bytes from `r` to `w` (straight from `r`'s buffer); the peer closing
/// before that is an error.
pub(super) async fn copy_exact<R, W>(r: &mut BufReader<R>, w: &mut W, n: u64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if n > 0 && tokio::io::copy_buf(&mut r.take(n), w).await? < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Encodes `m` after `out` and decodes the result again, which must give `m` back: kafka-protocol's
/// encoders are not the exact inverse of its decoders on every input (a tagged field numbered 2^31
/// or more decodes as a negative tag that is then counted but not written, and the bytes after it
/// are read as something else), and a message that would not decode, or would decode to another,
/// must never reach a client or a broker. Only rewritten messages come here, and they are rare
/// (metadata, coordinators, the leader hints of a Produce or Fetch after a leader change, topic
/// ids after a switch).
pub fn encode_checked<T: Encodable + Decodable + PartialEq>(
    m: &T,
    out: &mut BytesMut,
    version: i16,
) -> Result<(), String> {
    let start = out.len();
    m.encode(out, version).map_err(|e| e.to_string())?;
    let mut again = Bytes::copy_from_slice(&out[start..]);
    let back = T::decode(&mut again, version).map_err(|e| format!("re-encoded message does not decode: {e}"))?;
    if !again.is_empty() {
        return Err(format!("re-encoded message has {} bytes past its end", again.len()));
    }
    if back != *m {
        return Err("re-encoded message decodes to another (a field kafka-protocol cannot write back)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::messages::{ProduceRequest, RequestHeader as KHeader};
    use kafka_protocol::protocol::{Encodable, StrBytes};

    fn produce(version: i16, acks: i16, txn: Option<&str>) -> Vec<u8> {
        let mut b = BytesMut::new();
        let header = KHeader::default()
            .with_request_api_key(PRODUCE)
            .with_request_api_version(version)
            .with_correlation_id(77)
            .with_client_id(Some(StrBytes::from_static_str("a-client")));
        header.encode(&mut b, ApiKey::Produce.request_header_version(version)).unwrap();
        let req = ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(1000)
            .with_transactional_id(txn.map(|t| StrBytes::from_string(t.to_owned()).into()));
        req.encode(&mut b, version).unwrap();
        b.to_vec()
    }

    #[test]
    fn produce_acks_zero_expects_no_response_in_every_version() {
        for v in 3..=13 {
            for (acks, expects) in [(0, false), (1, true), (-1, true)] {
                for txn in [None, Some("txn-1")] {
                    let h = parse_request(&produce(v, acks, txn)).unwrap();
                    assert_eq!((h.api_key, h.api_version, h.correlation_id), (PRODUCE, v, 77));
                    assert_eq!(h.expects_response, expects, "v{v} acks={acks} txn={txn:?}");
                }
            }
        }
    }

    #[test]
    fn huge_varint_lengths_are_truncation_not_overflow() {
        // Produce v9 (flexible): api key, version, correlation id, client id, then tagged fields
        // claiming one field of 2^64-1 bytes, or a transactional id of that length.
        let head = [&PRODUCE.to_be_bytes()[..], &9i16.to_be_bytes(), &1i32.to_be_bytes(), &[0, 0]].concat();
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        let tagged = [&head[..], &[1, 0], &max].concat();
        assert_eq!(parse_request(&tagged), Err(FrameError::Truncated));
        let txn = [&head[..], &[0], &max].concat();
        assert_eq!(parse_request(&txn), Err(FrameError::Truncated));
    }

    #[test]
    fn sizes_tls_and_truncation() {
        assert_eq!(frame_size(100u32.to_be_bytes(), 1000), Ok(100));
        assert_eq!(frame_size(1001u32.to_be_bytes(), 1000), Err(FrameError::TooLarge(1001, 1000)));
        assert_eq!(frame_size((-5i32).to_be_bytes(), 1000), Err(FrameError::Negative(-5)));
        assert_eq!(frame_size([0x16, 0x03, 0x01, 0x02], u32::MAX), Err(FrameError::TlsOnPlaintext));
        assert_eq!(parse_request(&[0, 3, 0]), Err(FrameError::Truncated));
        let p = produce(9, 0, None);
        for cut in 8..p.len().min(40) {
            // Any prefix either parses to the same answer or says truncated: never a panic.
            if let Ok(h) = parse_request(&p[..cut]) {
                assert!(!h.expects_response);
            }
        }
    }
}
