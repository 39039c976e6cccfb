//! systemd socket activation: sockets passed by the service manager (`LISTEN_PID`, `LISTEN_FDS`
//! from fd 3 on; `LISTEN_FDNAMES` is informational), each matched to a configured listener by
//! address and type (UDP or TCP) and used instead of binding. A restart then loses no query: the
//! sockets live in the service manager between the old process and the new one, UDP queries wait
//! in the receive buffer and TCP connections in the backlog.
//!
//! Written by hand (a few lines of libc): the crates for it (listenfd, sd-notify's) hand out sockets
//! by index or name, not by what they are bound to.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

/// The first passed descriptor (SD_LISTEN_FDS_START).
const FIRST_FD: RawFd = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Udp,
    Tcp,
}

struct Socket {
    fd: RawFd,
    kind: Kind,
    addr: SocketAddr,
    owned: Option<OwnedFd>,
}

static PASSED: OnceLock<Mutex<Vec<Socket>>> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("passed socket fd {fd}: {message}")]
    Bad { fd: RawFd, message: String },
    #[error("passed socket fd {fd} ({kind:?} {addr}) matches no configured listener")]
    Unmatched { fd: RawFd, kind: Kind, addr: SocketAddr },
}

/// Takes the sockets the service manager passed, if the variables are meant for this process.
/// Called once, at start, before anything is bound (and before other threads exist: it unsets
/// the variables so that nothing started later takes them for its own).
pub fn init() -> Result<usize, ActivationError> {
    let pid_ok = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<i32>().ok()).unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").ok();
    // SAFETY: called at start, while the process has one thread: nothing reads the environment
    // concurrently.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let mut sockets = Vec::new();
    if pid_ok {
        for fd in FIRST_FD..FIRST_FD + count.max(0) {
            sockets.push(describe(fd)?);
        }
        if !sockets.is_empty() {
            tracing::info!(sockets = sockets.len(), names = ?names, "sockets passed by the service manager");
        }
    }
    let n = sockets.len();
    let _ = PASSED.set(Mutex::new(sockets));
    Ok(n)
}

/// What a passed descriptor is: its type and the address it is bound to.
fn describe(fd: RawFd) -> Result<Socket, ActivationError> {
    let bad = |message: String| ActivationError::Bad { fd, message };
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `kind` and `len` are valid for writes of the sizes given.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&raw mut kind).cast(), &mut len) };
    if r != 0 {
        return Err(bad(format!("not a socket: {}", std::io::Error::last_os_error())));
    }
    let kind = match kind {
        libc::SOCK_DGRAM => Kind::Udp,
        libc::SOCK_STREAM => Kind::Tcp,
        other => return Err(bad(format!("socket type {other}, neither UDP nor TCP"))),
    };
    // SAFETY: the service manager passed `fd` to this process, open, and it is taken only here.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: FD_CLOEXEC on a descriptor this process owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let sock = socket2::SockRef::from(&owned);
    let addr = sock.local_addr().map_err(|e| bad(e.to_string()))?;
    let addr = addr.as_socket().ok_or_else(|| bad("not an internet socket".into()))?;
    Ok(Socket { fd, kind, addr, owned: Some(owned) })
}

fn take(kind: Kind, addr: SocketAddr) -> Option<OwnedFd> {
    let mut passed = PASSED.get()?.lock().unwrap_or_else(|e| e.into_inner());
    let s = passed.iter_mut().find(|s| s.kind == kind && s.addr.ip() == addr.ip() && s.addr.port() == addr.port())?;
    s.owned.take()
}

/// The passed UDP socket bound to `addr`, if there is one.
pub fn take_udp(addr: SocketAddr) -> Option<std::net::UdpSocket> {
    take(Kind::Udp, addr).map(std::net::UdpSocket::from)
}

/// The passed TCP listening socket bound to `addr`, if there is one.
pub fn take_tcp(addr: SocketAddr) -> Option<std::net::TcpListener> {
    take(Kind::Tcp, addr).map(std::net::TcpListener::from)
}

/// A passed socket no listener took: a start error naming it.
pub fn check_all_taken() -> Result<(), ActivationError> {
    let Some(passed) = PASSED.get() else { return Ok(()) };
    let passed = passed.lock().unwrap_or_else(|e| e.into_inner());
    match passed.iter().find(|s| s.owned.is_some()) {
        Some(s) => Err(ActivationError::Unmatched { fd: s.fd, kind: s.kind, addr: s.addr }),
        None => Ok(()),
    }
}
