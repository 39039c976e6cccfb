//! The SNI proxy's front on any bytes: a PROXY protocol v2 header (when the first input byte is
//! odd), then a ClientHello read in pieces of the sizes the input gives, its server name, and the
//! MSK name grammar on that name. Nothing may panic; what is kept to be sent on is exactly the
//! bytes read after the header, at most the cap; a name that parses as MSK is lower case on the wire.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use mskdns::names;
use mskdns::proxy::sni::parse_front;
use tokio::io::{AsyncRead, ReadBuf};

const MAX: usize = 4096;

/// Hands out the input in pieces of 1 to 64 bytes (the sizes taken from the input's second byte
/// on), as TCP segments would arrive.
struct Pieces<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, step, rest @ ..] = data else { return };
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut stream = Pieces { data: rest, step: 1 + *step as usize % 64 };
    let result = rt.block_on(parse_front(&mut stream, flags & 1 == 1, MAX));
    let Ok((_, name, kept)) = result else { return };
    let consumed = rest.len() - stream.data.len();
    assert!(kept.len() <= MAX && kept.len() <= consumed);
    assert_eq!(&rest[consumed - kept.len()..consumed], &kept[..]);
    if let Some(wire) = name.as_deref().and_then(names::name_to_wire) {
        if names::match_serverless(&wire).is_some() || names::match_provisioned(&wire).is_some() {
            assert!(!wire.iter().any(u8::is_ascii_uppercase));
        }
    }
});
