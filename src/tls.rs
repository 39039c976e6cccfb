//! TLS (rustls) for every listener that terminates it (DoT, DoH, the proxy) and the proxy's
//! connections to brokers: termination towards clients with the `tls_cert`/`tls_key` files, origination towards brokers with SNI set to the broker's own name
//! and its certificate verified against the system roots or `upstream_ca_file`, presenting
//! `upstream_tls_cert`/`upstream_tls_key` when the brokers ask for a client certificate (MSK's
//! mutual-TLS authentication, port 9094).
//!
//! The client-side certificate is read again when its files change (checked every
//! [`WATCH_EVERY`]), so a renewed certificate needs no restart; a pair that does not load is
//! logged and counted, and the previous one stays in use.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub const WATCH_EVERY: Duration = Duration::from_secs(10);

/// A TLS setup error, with the key of the file it came from.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

fn err(key: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError { key, message: format!("{}: {e}", path.display()) }
}

/// The server side: a certificate chain and its key, reloadable.
pub struct Terminator {
    cert: PathBuf,
    key: PathBuf,
    /// The config keys the files came from, for errors.
    keys: (&'static str, &'static str),
    /// ALPN protocols offered, in order of preference (empty: none).
    alpn: Vec<Vec<u8>>,
    acceptor: ArcSwap<TlsAcceptor>,
    stamps: std::sync::Mutex<Stamps>,
}

type Stamps = [Option<(SystemTime, u64)>; 2];

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Terminator {
    pub fn load(cert: &Path, key: &Path) -> Result<Terminator, TlsError> {
        Terminator::load_with(cert, key, ("tls_cert", "tls_key"), Vec::new())
    }

    /// As [`Terminator::load`], with the files' config keys and the ALPN protocols to offer.
    pub fn load_with(
        cert: &Path,
        key: &Path,
        keys: (&'static str, &'static str),
        alpn: Vec<Vec<u8>>,
    ) -> Result<Terminator, TlsError> {
        let stamps = [stamp(cert), stamp(key)];
        let config = server_config(cert, key, keys, &alpn)?;
        Ok(Terminator {
            cert: cert.to_owned(),
            key: key.to_owned(),
            keys,
            alpn,
            acceptor: ArcSwap::from_pointee(TlsAcceptor::from(config)),
            stamps: std::sync::Mutex::new(stamps),
        })
    }

    pub fn acceptor(&self) -> Arc<TlsAcceptor> {
        self.acceptor.load_full()
    }

    /// Loads the files again if either changed. `Ok(true)`: a new certificate is in use.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let now = [stamp(&self.cert), stamp(&self.key)];
        let mut seen = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
        if *seen == now {
            return Ok(false);
        }
        // Either way, do not retry the same files every tick: the next change is tried again.
        *seen = now;
        drop(seen);
        let config = server_config(&self.cert, &self.key, self.keys, &self.alpn)?;
        self.acceptor.store(Arc::new(TlsAcceptor::from(config)));
        Ok(true)
    }
}

/// A certificate chain and its private key, from the files under the keys named.
struct Pair {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load_pair(cert: &Path, key: &Path, keys: (&'static str, &'static str)) -> Result<Pair, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(keys.0, cert, e))?;
    if chain.is_empty() {
        return Err(err(keys.0, cert, "no CERTIFICATE in the file"));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| err(keys.1, key, e))?;
    Ok(Pair { chain, key: private })
}

fn server_config(
    cert: &Path,
    key: &Path,
    keys: (&'static str, &'static str),
    alpn: &[Vec<u8>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let pair = load_pair(cert, key, keys)?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(pair.chain, pair.key)
        .map_err(|e| err(keys.1, key, format!("does not match {}: {e}", keys.0)))?;
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// The client side towards brokers: trust `ca_file` (default: the system's CA certificates) and
/// present `client` (certificate and key files) if given.
pub fn connector(ca_file: Option<&Path>, client: Option<(&Path, &Path)>) -> Result<TlsConnector, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| err("upstream_ca_file", path, e))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(err("upstream_ca_file", path, "no usable CA certificate in the file"));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's CA certificates");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError {
                    key: "upstream_ca_file",
                    message: "unset, and the system has no CA certificates (install ca-certificates or set it)".into(),
                });
            }
        }
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let pair = load_pair(cert, key, ("upstream_tls_cert", "upstream_tls_key"))?;
            builder
                .with_client_auth_cert(pair.chain, pair.key)
                .map_err(|e| err("upstream_tls_key", key, format!("does not match upstream_tls_cert: {e}")))?
        }
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name a broker's certificate must carry: the host of `host:port` (an address is checked
/// against the certificate's IP addresses, and sent without SNI).
pub fn server_name(upstream: &str) -> Result<ServerName<'static>, String> {
    let host = upstream.rsplit_once(':').map_or(upstream, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| format!("`{host}` is not a TLS server name: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert_eq!(
            server_name("b-1.orders.abc123.c2.kafka.us-east-1.amazonaws.com:9098").unwrap(),
            ServerName::try_from("b-1.orders.abc123.c2.kafka.us-east-1.amazonaws.com").unwrap()
        );
        assert!(matches!(server_name("10.0.0.7:9094").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(server_name("[fd00::7]:9094").unwrap(), ServerName::IpAddress(_)));
        assert!(server_name("bad name:9094").is_err());
    }

    #[test]
    fn bad_files_name_their_key() {
        let dir = std::env::temp_dir().join(format!("mskdns-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = Terminator::load(&junk, &junk).err().unwrap();
        assert_eq!(e.key, "tls_cert");
        let e = Terminator::load(&dir.join("missing.pem"), &junk).err().unwrap();
        assert_eq!(e.key, "tls_cert");
        let e = connector(Some(&junk), None).err().unwrap();
        assert_eq!(e.key, "upstream_ca_file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
