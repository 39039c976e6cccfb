//! Where the query log goes: a file (rotated by size, a few kept), stdout, or a Frame Streams
//! collector's unix socket (the bidirectional handshake, reconnecting with backoff). A write that
//! fails loses its batch, never blocks the writer past [`WRITE_TIMEOUT`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::fstrm;
use crate::config::{QueryLogConfig, QueryLogFormat};

/// The longest one batch may take to write (a collector or a disk that stops taking data).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest a collector may take to answer READY.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no collector connected ({0})")]
    NoCollector(String),
    #[error("writing took over {WRITE_TIMEOUT:?}")]
    Timeout,
}

impl WriteError {
    /// The `reason` of `mskdns_query_log_dropped_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            WriteError::NoCollector(_) => "no_collector",
            WriteError::Io(_) | WriteError::Timeout => "write_error",
        }
    }
}

pub enum Sink {
    File(FileSink),
    Stdout { dnstap: bool, started: bool },
    Socket(SocketSink),
}

impl Sink {
    pub fn new(c: &QueryLogConfig) -> Self {
        let dnstap = c.format == QueryLogFormat::Dnstap;
        if let Some(path) = c.socket() {
            return Sink::Socket(SocketSink {
                path: path.into(),
                stream: None,
                retry_at: None,
                backoff: Duration::ZERO,
            });
        }
        if c.path == "-" {
            return Sink::Stdout { dnstap, started: false };
        }
        Sink::File(FileSink {
            path: PathBuf::from(&c.path),
            dnstap,
            max_bytes: c.max_file_bytes,
            keep: c.keep_files,
            file: None,
            size: 0,
        })
    }

    /// Whether the writer should call [`Sink::write`] even with nothing to write: a collector to
    /// connect to.
    pub fn wants_tick(&self) -> bool {
        matches!(self, Sink::Socket(s) if s.stream.is_none())
    }

    pub async fn write(&mut self, buf: &[u8]) -> Result<(), WriteError> {
        match self {
            Sink::File(f) => timed(f.write(buf)).await,
            Sink::Stdout { dnstap, started } => {
                let mut out = tokio::io::stdout();
                let w = async {
                    if *dnstap && !*started {
                        out.write_all(&fstrm::start()).await?;
                        *started = true;
                    }
                    out.write_all(buf).await?;
                    out.flush().await?;
                    Ok(())
                };
                timed(w).await
            }
            Sink::Socket(s) => s.write(buf).await,
        }
    }

    /// Ends the stream: STOP (dnstap), FINISH awaited from a collector, the file flushed.
    pub async fn close(&mut self) {
        match self {
            Sink::File(f) => {
                let _ = timed(f.close()).await;
            }
            Sink::Stdout { dnstap: true, started: true } => {
                let _ = tokio::io::stdout().write_all(&fstrm::stop()).await;
            }
            Sink::Stdout { .. } => {}
            Sink::Socket(s) => {
                if let Some(mut st) = s.stream.take() {
                    fstrm::finish(&mut st, HANDSHAKE_TIMEOUT).await;
                }
            }
        }
    }
}

async fn timed<F: std::future::Future<Output = Result<(), std::io::Error>>>(f: F) -> Result<(), WriteError> {
    match tokio::time::timeout(WRITE_TIMEOUT, f).await {
        Ok(r) => r.map_err(WriteError::Io),
        Err(_) => Err(WriteError::Timeout),
    }
}

pub struct FileSink {
    path: PathBuf,
    dnstap: bool,
    max_bytes: u64,
    keep: u32,
    file: Option<tokio::fs::File>,
    size: u64,
}

impl FileSink {
    async fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            self.open().await?;
        }
        if self.max_bytes > 0 && self.size > 0 && self.size + buf.len() as u64 > self.max_bytes {
            self.close().await?;
            rotate(&self.path, self.keep).await;
            self.open().await?;
        }
        let Some(f) = self.file.as_mut() else { return Ok(()) };
        f.write_all(buf).await?;
        f.flush().await?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// Opens the file to append; a dnstap file already holding a stream is rotated first (a
    /// Frame Streams file is one stream: START, frames, STOP).
    async fn open(&mut self) -> std::io::Result<()> {
        let existing = tokio::fs::metadata(&self.path).await.map(|m| m.len()).unwrap_or(0);
        let is_file = tokio::fs::metadata(&self.path).await.map(|m| m.is_file()).unwrap_or(true);
        if self.dnstap && existing > 0 && is_file {
            rotate(&self.path, self.keep.max(1)).await;
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = tokio::fs::create_dir_all(dir).await;
        }
        let mut f = tokio::fs::OpenOptions::new().create(true).append(true).open(&self.path).await?;
        self.size = f.metadata().await.map(|m| m.len()).unwrap_or(0);
        if self.dnstap {
            let start = fstrm::start();
            f.write_all(&start).await?;
            self.size += start.len() as u64;
        }
        self.file = Some(f);
        Ok(())
    }

    async fn close(&mut self) -> std::io::Result<()> {
        if let Some(mut f) = self.file.take() {
            if self.dnstap {
                f.write_all(&fstrm::stop()).await?;
            }
            f.flush().await?;
            f.sync_data().await.ok();
        }
        Ok(())
    }
}

/// `path` → `path.1` → … → `path.<keep>` (the oldest dropped).
async fn rotate(path: &Path, keep: u32) {
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    for n in (1..keep).rev() {
        let _ = tokio::fs::rename(numbered(n), numbered(n + 1)).await;
    }
    let _ = tokio::fs::rename(path, numbered(1)).await;
}

pub struct SocketSink {
    path: PathBuf,
    stream: Option<UnixStream>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl SocketSink {
    async fn write(&mut self, buf: &[u8]) -> Result<(), WriteError> {
        if self.stream.is_none() {
            self.connect().await?;
        }
        if buf.is_empty() {
            return Ok(());
        }
        let Some(s) = self.stream.as_mut() else { return Err(WriteError::NoCollector("not connected".into())) };
        match tokio::time::timeout(WRITE_TIMEOUT, s.write_all(buf)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.down();
                Err(WriteError::Io(e))
            }
            Err(_) => {
                // A collector that stopped reading: a half-written frame ends this stream.
                self.down();
                Err(WriteError::Timeout)
            }
        }
    }

    fn down(&mut self) {
        self.stream = None;
        self.backoff = Duration::from_secs(1);
        self.retry_at = Some(Instant::now() + self.backoff);
    }

    async fn connect(&mut self) -> Result<(), WriteError> {
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return Err(WriteError::NoCollector("waiting to reconnect".into()));
        }
        let attempt = async {
            let mut s = tokio::time::timeout(HANDSHAKE_TIMEOUT, UnixStream::connect(&self.path))
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            fstrm::handshake(&mut s, HANDSHAKE_TIMEOUT).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(s)
        };
        match attempt.await {
            Ok(s) => {
                tracing::info!(socket = %self.path.display(), "query log: dnstap collector connected");
                self.stream = Some(s);
                self.backoff = Duration::ZERO;
                self.retry_at = None;
                Ok(())
            }
            Err(e) => {
                self.backoff = (self.backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
                self.retry_at = Some(Instant::now() + self.backoff);
                Err(WriteError::NoCollector(format!("{}: {e}", self.path.display())))
            }
        }
    }
}
