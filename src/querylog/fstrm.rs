//! Frame Streams (the framing dnstap travels in): data frames are a 32-bit big-endian length and
//! the payload; control frames are an escape (a zero length), their own length, a type and fields.
//! A file is written unidirectionally (START, data, STOP); a socket is bidirectional (READY →
//! ACCEPT, START, data, STOP → FINISH). Written by hand: the crates for it are a "preliminary"
//! blocking implementation last released in 2020 (framestream) or tied to mio 0.6 (dnstap), and the
//! format is a few lines.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The content type of dnstap.
pub const CONTENT_TYPE: &[u8] = b"protobuf:dnstap.Dnstap";

const ACCEPT: u32 = 1;
const START: u32 = 2;
const STOP: u32 = 3;
const READY: u32 = 4;
const FINISH: u32 = 5;
const FIELD_CONTENT_TYPE: u32 = 1;
/// The largest control frame read from a collector.
const MAX_CONTROL: u32 = 512;

/// A control frame of `kind` naming the content type (STOP and FINISH name none).
pub fn control(kind: u32) -> Vec<u8> {
    let fields: &[&[u8]] = if matches!(kind, STOP | FINISH) { &[] } else { &[CONTENT_TYPE] };
    let len = 4 + fields.iter().map(|f| 8 + f.len()).sum::<usize>();
    let mut out = Vec::with_capacity(8 + len);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    for f in fields {
        out.extend_from_slice(&FIELD_CONTENT_TYPE.to_be_bytes());
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// What a file (or a stream without a handshake) starts with.
pub fn start() -> Vec<u8> {
    control(START)
}

/// What ends a stream.
pub fn stop() -> Vec<u8> {
    control(STOP)
}

/// Appends one data frame.
pub fn data(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer to READY within {0:?}")]
    Timeout(Duration),
    #[error("the collector answered {0}, not ACCEPT with {ct}", ct = String::from_utf8_lossy(CONTENT_TYPE))]
    Refused(String),
}

/// The writer's side of the bidirectional handshake: READY, then the collector's ACCEPT (naming
/// our content type), then START; all within `limit`.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, limit: Duration) -> Result<(), HandshakeError> {
    let steps = async {
        s.write_all(&control(READY)).await?;
        let (kind, fields) = read_control(s).await?;
        if kind != ACCEPT || !fields.iter().any(|f| f == CONTENT_TYPE) {
            return Err(HandshakeError::Refused(format!("control frame {kind}")));
        }
        s.write_all(&start()).await?;
        Ok(())
    };
    tokio::time::timeout(limit, steps).await.map_err(|_| HandshakeError::Timeout(limit))?
}

/// Reads one control frame: its type and its content-type fields.
async fn read_control<S: AsyncRead + Unpin>(s: &mut S) -> Result<(u32, Vec<Vec<u8>>), HandshakeError> {
    let escape = s.read_u32().await?;
    if escape != 0 {
        return Err(HandshakeError::Refused("a data frame".into()));
    }
    let len = s.read_u32().await?;
    if !(4..=MAX_CONTROL).contains(&len) {
        return Err(HandshakeError::Refused(format!("a control frame of {len} bytes")));
    }
    let mut body = vec![0; len as usize];
    s.read_exact(&mut body).await?;
    let kind = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let mut fields = Vec::new();
    let mut rest = &body[4..];
    while rest.len() >= 8 {
        let ftype = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let flen = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let Some(value) = rest.get(8..8 + flen) else { break };
        if ftype == FIELD_CONTENT_TYPE {
            fields.push(value.to_vec());
        }
        rest = &rest[8 + flen..];
    }
    Ok((kind, fields))
}

/// Ends a bidirectional stream: STOP, then the collector's FINISH (not waited for past `limit`).
pub async fn finish<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, limit: Duration) {
    let steps = async {
        s.write_all(&stop()).await?;
        s.flush().await?;
        read_control(s).await.map(|_| ())
    };
    let _ = tokio::time::timeout(limit, steps).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_frames_are_escaped_and_name_the_content_type() {
        let f = start();
        assert_eq!(&f[..4], &[0, 0, 0, 0]);
        assert_eq!(u32::from_be_bytes(f[4..8].try_into().unwrap()) as usize, f.len() - 8);
        assert_eq!(&f[8..12], &START.to_be_bytes());
        assert_eq!(&f[12..16], &FIELD_CONTENT_TYPE.to_be_bytes());
        assert_eq!(&f[20..], CONTENT_TYPE);
        assert_eq!(stop(), [0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 3]);
    }

    #[tokio::test]
    async fn the_handshake_with_a_collector_that_accepts() {
        let (mut ours, mut theirs) = tokio::io::duplex(4096);
        let collector = tokio::spawn(async move {
            let (kind, fields) = read_control(&mut theirs).await.unwrap();
            assert_eq!((kind, fields), (READY, vec![CONTENT_TYPE.to_vec()]));
            theirs.write_all(&control(ACCEPT)).await.unwrap();
            let (kind, _) = read_control(&mut theirs).await.unwrap();
            assert_eq!(kind, START);
            let mut frame = [0u8; 7];
            theirs.read_exact(&mut frame).await.unwrap();
            assert_eq!(frame, [0, 0, 0, 3, b'a', b'b', b'c']);
            let (kind, _) = read_control(&mut theirs).await.unwrap();
            assert_eq!(kind, STOP);
            theirs.write_all(&control(FINISH)).await.unwrap();
        });
        handshake(&mut ours, Duration::from_secs(1)).await.unwrap();
        let mut out = Vec::new();
        data(&mut out, b"abc");
        ours.write_all(&out).await.unwrap();
        finish(&mut ours, Duration::from_secs(1)).await;
        collector.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_collector_that_never_answers_is_timed_out() {
        let (mut ours, _theirs) = tokio::io::duplex(4096);
        let e = handshake(&mut ours, Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(e, HandshakeError::Timeout(_)), "{e}");
    }
}
