//! PROXY protocol v2 in front of a proxy listener (an NLB, a PrivateLink endpoint service): the
//! client's own address, and the VPC endpoint id PrivateLink adds (AWS TLV 0xEA, subtype 0x01).
//! The header is parsed with the `ppp` crate; this module reads it from the socket, bounded.

use std::net::{IpAddr, SocketAddr};

use ppp::v2::{Addresses, Command, ParseError};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest header read: addresses plus the TLVs an NLB or PrivateLink adds take well under
/// 300 bytes; a header longer than this is refused rather than buffered.
pub const MAX_HEADER: usize = 1024;
const AWS_TLV: u8 = 0xEA;
const AWS_VPCE_ID: u8 = 0x01;

/// What a header says about the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The client; `None` for a `LOCAL` header (the load balancer's own health check) or an
    /// unspecified / UNIX address family.
    pub client: Option<SocketAddr>,
    /// PrivateLink's VPC endpoint id, when present.
    pub endpoint: Option<String>,
}

impl Origin {
    /// Whether the client (the peer itself for a header without one: the load balancer's
    /// health check) is in `allow` and, when `endpoints` is set, came through one of them.
    pub fn allowed(&self, peer: SocketAddr, allow: &[ipnet::IpNet], endpoints: &[String]) -> bool {
        let client = self.client.unwrap_or(peer).ip().to_canonical();
        let endpoint_ok = endpoints.is_empty() || self.endpoint.as_ref().is_some_and(|e| endpoints.contains(e));
        endpoint_ok && allow.iter().any(|n| n.contains(&client))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("no PROXY protocol v2 header (proxy_protocol is on)")]
    Missing,
    #[error("PROXY protocol header: {0}")]
    Invalid(ParseError),
    #[error("PROXY protocol header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("closed before the PROXY protocol header was complete")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Parses a header at the start of `buf`: `Ok(None)` asks for more bytes; `Ok(Some((origin,
/// len)))`: the header is `buf[..len]`, what follows is the client's.
pub fn parse(buf: &[u8]) -> Result<Option<(Origin, usize)>, HeaderError> {
    let header = match ppp::v2::Header::try_from(buf) {
        Ok(h) => h,
        Err(ParseError::Incomplete(_)) => return Ok(None),
        Err(ParseError::Partial(_, need)) if 16 + need > MAX_HEADER => return Err(HeaderError::TooLong),
        Err(ParseError::Partial(..)) => return Ok(None),
        Err(ParseError::Prefix) => return Err(HeaderError::Missing),
        Err(e) => return Err(HeaderError::Invalid(e)),
    };
    let client = match (header.command, header.addresses) {
        (Command::Local, _) => None,
        (Command::Proxy, Addresses::IPv4(a)) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
        (Command::Proxy, Addresses::IPv6(a)) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
        (Command::Proxy, _) => None,
    };
    let mut endpoint = None;
    for tlv in header.tlvs() {
        let tlv = tlv.map_err(HeaderError::Invalid)?;
        if tlv.kind == AWS_TLV && tlv.value.first() == Some(&AWS_VPCE_ID) {
            endpoint = Some(String::from_utf8_lossy(&tlv.value[1..]).into_owned());
        }
    }
    Ok(Some((Origin { client, endpoint }, header.len())))
}

/// Reads exactly one header from `sock`, not a byte more (what follows is the client's: a TLS
/// handshake or a Kafka request, for whoever reads next). The caller bounds the time it takes.
pub async fn read<S: AsyncRead + Unpin>(sock: &mut S) -> Result<Origin, HeaderError> {
    let closed = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof { HeaderError::Closed } else { HeaderError::Io(e) }
    };
    let mut buf = vec![0u8; 16];
    sock.read_exact(&mut buf).await.map_err(closed)?;
    if buf[..12] != *b"\r\n\r\n\0\r\nQUIT\n" {
        return Err(HeaderError::Missing);
    }
    let len = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > MAX_HEADER {
        return Err(HeaderError::TooLong);
    }
    buf.resize(len, 0);
    sock.read_exact(&mut buf[16..]).await.map_err(closed)?;
    match parse(&buf)? {
        Some((origin, _)) => Ok(origin),
        None => Err(HeaderError::Closed),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A v2 header as an NLB behind PrivateLink sends it (PROXY, TCP over IPv4, the AWS TLV).
    pub(crate) fn header(client: SocketAddr, vpce: Option<&str>) -> Vec<u8> {
        let mut tlvs = Vec::new();
        if let Some(id) = vpce {
            tlvs.push(AWS_TLV);
            tlvs.extend(((id.len() + 1) as u16).to_be_bytes());
            tlvs.push(AWS_VPCE_ID);
            tlvs.extend(id.as_bytes());
        }
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        let (fam, addrs): (u8, Vec<u8>) = match client.ip() {
            IpAddr::V4(ip) => (0x11, [ip.octets().to_vec(), vec![10, 0, 0, 1]].concat()),
            IpAddr::V6(ip) => (0x21, [ip.octets().to_vec(), [0u8; 16].to_vec()].concat()),
        };
        h.extend([0x21, fam]);
        h.extend(((addrs.len() + 4 + tlvs.len()) as u16).to_be_bytes());
        h.extend(addrs);
        h.extend(client.port().to_be_bytes());
        h.extend(9098u16.to_be_bytes());
        h.extend(tlvs);
        h
    }

    #[test]
    fn reads_the_client_and_the_endpoint_id() {
        let client: SocketAddr = "10.9.8.7:40000".parse().unwrap();
        let mut bytes = header(client, Some("vpce-0abc123def4567890"));
        let n = bytes.len();
        bytes.extend(b"\x16\x03\x01");
        let (o, len) = parse(&bytes).unwrap().unwrap();
        assert_eq!(len, n);
        assert_eq!(o, Origin { client: Some(client), endpoint: Some("vpce-0abc123def4567890".into()) });
        // Every prefix of the header asks for more; none is mistaken for a whole one.
        for cut in 0..n {
            assert!(parse(&bytes[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        let v6: SocketAddr = "[fd00::5]:1234".parse().unwrap();
        assert_eq!(parse(&header(v6, None)).unwrap().unwrap().0, Origin { client: Some(v6), endpoint: None });
    }

    #[test]
    fn refuses_what_is_not_a_header() {
        assert!(matches!(parse(b"\x16\x03\x01\x02\x00"), Err(HeaderError::Missing)));
        assert!(matches!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), Err(HeaderError::Missing)));
        let mut long = header("10.0.0.1:1".parse().unwrap(), None);
        long[14..16].copy_from_slice(&4000u16.to_be_bytes());
        assert!(matches!(parse(&long), Err(HeaderError::TooLong)));
        let mut bad = header("10.0.0.1:1".parse().unwrap(), None);
        bad[12] = 0x31;
        assert!(matches!(parse(&bad), Err(HeaderError::Invalid(_))));
        // A TLV that runs past the header's end.
        let mut tlv = header("10.0.0.1:1".parse().unwrap(), Some("vpce-1"));
        let at = tlv.len() - 8;
        tlv[at] = 0x7f;
        assert!(parse(&tlv).is_err());
    }

    #[tokio::test]
    async fn read_takes_the_header_and_nothing_after_it() {
        let client: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let mut bytes = header(client, Some("vpce-0abc"));
        bytes.extend(b"\x16\x03\x01rest");
        let mut r = &bytes[..];
        assert_eq!(read(&mut r).await.unwrap().endpoint.as_deref(), Some("vpce-0abc"));
        assert_eq!(r, b"\x16\x03\x01rest");
        let mut short = &bytes[..20];
        assert!(matches!(read(&mut short).await, Err(HeaderError::Closed)));
        let mut kafka = &b"\x00\x00\x00\x10\x00\x12\x00\x03\x00\x00\x00\x01\x00\x03abc"[..];
        assert!(matches!(read(&mut kafka).await, Err(HeaderError::Missing)));
    }

    #[test]
    fn never_panics_on_any_bytes() {
        let good = header("10.0.0.1:1".parse().unwrap(), Some("vpce-0abc"));
        for i in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                let _ = parse(&b);
            }
        }
    }
}
