//! Moving a routed connection's bytes both ways, untouched: socket to socket through a pipe per
//! direction (splice(2)) on Linux, through buffers elsewhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Per direction, once spliced (when no pipe can be had).
const SPLICE_BUF: usize = 16 * 1024;

/// Moves bytes both ways until both sides are done, either fails, either side is idle `idle`
/// long, or `grace` after shutdown; returns the bytes sent each way (to the broker, to the client). On Linux
/// the bytes go socket to socket through a pipe per direction (splice(2)) and never enter user
/// space; elsewhere, or with no file descriptors left for the pipes, through 16 KiB buffers.
pub(super) async fn splice(
    client: TcpStream,
    broker: TcpStream,
    idle: Duration,
    shutdown: &CancellationToken,
    grace: Duration,
) -> (u64, u64) {
    let last = Arc::new(AtomicU64::new(0));
    let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let epoch = Instant::now();
    let moved = async {
        #[cfg(target_os = "linux")]
        if let (Ok(p1), Ok(p2)) = (zero_copy::Pipe::new(), zero_copy::Pipe::new()) {
            let to_broker = zero_copy::one_way(&client, &broker, &p1, Activity { bytes: &up, last: &last, epoch });
            let to_client = zero_copy::one_way(&broker, &client, &p2, Activity { bytes: &down, last: &last, epoch });
            return tokio::try_join!(to_broker, to_client).map(|_| ());
        }
        let mut c = Touch { inner: client, last: last.clone(), bytes: up.clone(), epoch };
        let mut b = Touch { inner: broker, last: last.clone(), bytes: down.clone(), epoch };
        tokio::io::copy_bidirectional_with_sizes(&mut c, &mut b, SPLICE_BUF, SPLICE_BUF).await.map(|_| ())
    };
    let end = super::end_of_grace(shutdown, grace);
    tokio::pin!(moved, end);
    let quiet =
        || Duration::from_millis((epoch.elapsed().as_millis() as u64).saturating_sub(last.load(Ordering::Relaxed)));
    loop {
        tokio::select! {
            r = &mut moved => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection closed");
                }
                break;
            }
            _ = tokio::time::sleep(idle.saturating_sub(quiet())) => {
                if quiet() >= idle {
                    tracing::debug!(?idle, "idle: closed");
                    break;
                }
            }
            () = &mut end => break,
        }
    }
    (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed))
}

/// Where one direction counts its bytes and notes its last activity (for the idle timeout).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
struct Activity<'a> {
    bytes: &'a AtomicU64,
    last: &'a AtomicU64,
    epoch: Instant,
}

#[cfg(target_os = "linux")]
mod zero_copy {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::Ordering;

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::Activity;

    /// Bytes asked for per splice: the pipe's default capacity (16 pages).
    const CHUNK: usize = 64 * 1024;

    /// A non-blocking pipe: the kernel buffer bytes pass through between two sockets.
    pub struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
    }

    impl Pipe {
        pub fn new() -> io::Result<Pipe> {
            let mut fds = [0; 2];
            // SAFETY: pipe2 fills the two-element array it is given.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: both descriptors were just opened and are owned by nothing else.
            Ok(unsafe { Pipe { read: OwnedFd::from_raw_fd(fds[0]), write: OwnedFd::from_raw_fd(fds[1]) } })
        }
    }

    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: plain system call on descriptors the caller holds open; no offsets.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }

    /// Moves what `src` sends to `dst` until `src` ends, then half-closes `dst` (as
    /// `copy_bidirectional` does). The pipe is empty whenever `src` is read, so an EAGAIN from
    /// reading means `src` has nothing and one from writing means `dst` is full.
    pub async fn one_way(src: &TcpStream, dst: &TcpStream, pipe: &Pipe, seen: Activity<'_>) -> io::Result<()> {
        loop {
            src.readable().await?;
            let n = match src.try_io(Interest::READABLE, || splice(src.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            seen.bytes.fetch_add(n as u64, Ordering::Relaxed);
            seen.last.store(seen.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            let mut left = n;
            while left > 0 {
                dst.writable().await?;
                match dst.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(k) => left -= k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
        Ok(())
    }
}

/// A stream that counts what it reads and notes when (for the idle timeout).
struct Touch {
    inner: TcpStream,
    last: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    epoch: Instant,
}

impl AsyncRead for Touch {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
            self.last.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Touch {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
