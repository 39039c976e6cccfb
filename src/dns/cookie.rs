//! DNS cookies (RFC 7873) with interoperable server cookies (RFC 9018): version 1, three zero
//! bytes, a timestamp, and SipHash-2-4 over client cookie, version, reserved, timestamp and client
//! address under a 16-byte secret. Servers sharing the secret (mskdns instances behind one
//! address, or unbound and BIND configured with it) accept each other's cookies.
//!
//! A client that returns a valid server cookie has shown it receives what is sent to its
//! address: it cannot be a spoofed source, so the UDP rate limit never applies to it.

use std::hash::Hasher;
use std::net::IpAddr;
use std::sync::OnceLock;

use siphasher::sip::SipHasher24;

/// Client cookie (8) and a version 1 server cookie (16).
pub const COOKIE_LEN: usize = 24;
/// The COOKIE option in a response: code, length, data.
pub const OPTION_LEN: usize = 4 + COOKIE_LEN;
pub const OPTION_CODE: u16 = 10;

/// RFC 9018 4.3: a cookie from more than an hour ago, or more than five minutes ahead, is invalid.
const MAX_AGE: u32 = 3600;
const MAX_AHEAD: u32 = 300;

pub struct Cookies {
    secret: [u8; 16],
}

/// The secret every snapshot uses unless `dns.cookie_secret` names one: random per process.
fn process_secret() -> [u8; 16] {
    static SECRET: OnceLock<[u8; 16]> = OnceLock::new();
    *SECRET.get_or_init(rand::random)
}

/// Seconds since the Unix epoch, as the serial number of RFC 1982 the timestamp is.
pub fn now() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0)
}

impl Cookies {
    pub fn new(secret: Option<[u8; 16]>) -> Self {
        Cookies { secret: secret.unwrap_or_else(process_secret) }
    }

    fn hash(&self, client_cookie: &[u8], head: &[u8; 8], client: IpAddr) -> [u8; 8] {
        let mut h = SipHasher24::new_with_key(&self.secret);
        h.write(client_cookie);
        h.write(head);
        match client.to_canonical() {
            IpAddr::V4(a) => h.write(&a.octets()),
            IpAddr::V6(a) => h.write(&a.octets()),
        }
        h.finish().to_le_bytes()
    }

    /// The server cookie for `client_cookie` from `client` at time `now`.
    pub fn server_cookie(&self, client_cookie: &[u8], client: IpAddr, now: u32) -> [u8; 16] {
        let mut head = [1, 0, 0, 0, 0, 0, 0, 0];
        head[4..].copy_from_slice(&now.to_be_bytes());
        let mut out = [0; 16];
        out[..8].copy_from_slice(&head);
        out[8..].copy_from_slice(&self.hash(client_cookie, &head, client));
        out
    }

    /// Whether a query's COOKIE option data holds a server cookie we made for this client
    /// cookie and address, neither too old nor from the future.
    pub fn valid(&self, option: &[u8], client: IpAddr, now: u32) -> bool {
        if option.len() != COOKIE_LEN || option[8] != 1 || option[9..12] != [0, 0, 0] {
            return false;
        }
        let ts = u32::from_be_bytes([option[12], option[13], option[14], option[15]]);
        let (age, ahead) = (now.wrapping_sub(ts), ts.wrapping_sub(now));
        if age > MAX_AGE && ahead > MAX_AHEAD {
            return false;
        }
        let head: [u8; 8] = option[8..16].try_into().expect("8 bytes");
        // Not a secret-dependent early exit: every byte is compared.
        let want = self.hash(&option[..8], &head, client);
        want.iter().zip(&option[16..24]).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(hex: &str) -> [u8; 16] {
        hex.parse::<crate::config::CookieSecret>().unwrap().0
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// RFC 9018 appendix A.1 (IPv4) and A.3 (IPv6, another secret).
    #[test]
    fn rfc9018_test_vectors() {
        let c = Cookies::new(Some(secret("e5e973e5a6b2a43f48e7dc849e37bfcf")));
        let ip: IpAddr = "198.51.100.100".parse().unwrap();
        let sc = c.server_cookie(&unhex("2464c4abcf10c957"), ip, 1559731985);
        assert_eq!(sc.to_vec(), unhex("010000005cf79f111f8130c3eee29480"));
        let c = Cookies::new(Some(secret("dd3bdf9344b678b185a6f5cb60fca715")));
        let ip6: IpAddr = "2001:db8:220:1:59de:d0f4:8769:82b8".parse().unwrap();
        let sc = c.server_cookie(&unhex("22681ab97d52c298"), ip6, 1559741817);
        assert_eq!(sc.to_vec(), unhex("010000005cf7c57926556bd0934c72f8"));
    }

    #[test]
    fn validity_window_client_and_address() {
        let c = Cookies::new(Some([7; 16]));
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let cc = [9u8; 8];
        let opt = |ts: u32| [cc.as_slice(), &c.server_cookie(&cc, ip, ts)].concat();
        assert!(c.valid(&opt(1000), ip, 1000));
        assert!(c.valid(&opt(1000), ip, 1000 + 3600));
        assert!(!c.valid(&opt(1000), ip, 1000 + 3601), "over an hour old");
        assert!(c.valid(&opt(1300), ip, 1000) && !c.valid(&opt(1301), ip, 1000), "five minutes ahead at most");
        assert!(!c.valid(&opt(1000), "10.1.2.4".parse().unwrap(), 1000), "another address");
        let mut other_client = opt(1000);
        other_client[0] ^= 1;
        assert!(!c.valid(&other_client, ip, 1000));
        assert!(!Cookies::new(Some([8; 16])).valid(&opt(1000), ip, 1000), "another secret");
        assert!(!c.valid(&cc, ip, 1000), "a client cookie alone");
    }
}
