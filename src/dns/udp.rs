//! The UDP fast path: datagrams received and answered in batches with `recvmmsg`/`sendmmsg`
//! over buffers allocated once. Local answers and cache hits never leave the thread; misses go
//! to the tokio runtime, which answers on the same socket when the upstream has replied.
//!
//! Each listen address has one socket read by one thread per CPU. The first thread runs at
//! normal priority; the others run `SCHED_IDLE`, so they take only CPU time nobody else wants.
//! On a host whose other CPUs are busy (a load generator, a Kafka client, another service) the
//! extra threads cost nothing; on an idle host they add the spare cores. With one socket shared
//! (not one `SO_REUSEPORT` socket each) no share of the traffic is stuck behind a starved thread.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::engine::{Engine, Handled, Origin, ServFail, Transport};

const BATCH: usize = 64;
/// Queries are small; a larger datagram (flagged MSG_TRUNC) is dropped unread.
const RX_BUF: usize = 4096;
/// How often a blocked receive wakes to notice shutdown.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Everything a receive thread needs (the engine's in-flight limit bounds the misses it starts).
pub struct Worker {
    /// Thread 0 runs at normal priority, the rest at idle priority.
    pub index: usize,
    /// Which `dns.listen` entry this socket serves (views can be chosen by it).
    pub listener: usize,
    pub engine: Arc<Engine>,
    pub sock: Arc<UdpSocket>,
    pub runtime: tokio::runtime::Handle,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    pub health: Arc<crate::admin::Health>,
}

struct Batch {
    bufs: Vec<[u8; RX_BUF]>,
    names: Vec<libc::sockaddr_storage>,
    rx_iov: Vec<libc::iovec>,
    rx: Vec<libc::mmsghdr>,
    outs: Vec<Vec<u8>>,
    /// For each queued reply, the index of the datagram it answers (whose address it goes to).
    reply_to: Vec<usize>,
    tx_iov: Vec<libc::iovec>,
    tx: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new() -> Box<Self> {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let zeroed_hdr = || unsafe { zeroed::<libc::mmsghdr>() };
        let iov = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        Box::new(Batch {
            bufs: vec![[0; RX_BUF]; BATCH],
            // SAFETY: all-zero is a valid sockaddr_storage.
            names: vec![unsafe { zeroed() }; BATCH],
            rx_iov: vec![iov; BATCH],
            rx: (0..BATCH).map(|_| zeroed_hdr()).collect(),
            outs: (0..BATCH).map(|_| Vec::with_capacity(RX_BUF)).collect(),
            reply_to: Vec::with_capacity(BATCH),
            tx_iov: vec![iov; BATCH],
            tx: (0..BATCH).map(|_| zeroed_hdr()).collect(),
        })
    }
}

/// Restarts of one receive thread's loop after a panic outside the per-packet guard, before the
/// listener is given up (and /healthz fails).
const MAX_RESTARTS: u32 = 100;

impl Worker {
    /// Serves until shutdown. The per-packet work is guarded in [`Engine::handle`]; should the
    /// batch loop itself panic, it is restarted with fresh buffers.
    pub fn run(self) {
        let panics = metrics::counter!("mskdns_panics_total", "where" => "udp_loop");
        let mut restarts = 0;
        loop {
            match crate::panic::catch(|| self.serve()) {
                Ok(()) => return,
                Err(e) if restarts < MAX_RESTARTS => {
                    restarts += 1;
                    panics.increment(1);
                    tracing::error!(listener = self.listener, panic = %e, "UDP receive loop panicked; restarting it");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    tracing::error!(listener = self.listener, panic = %e, "UDP receive loop keeps panicking; giving it up");
                    self.health.set_lost(
                        &format!("dns udp listener {} thread {}", self.listener, self.index),
                        Some(format!("panicked {MAX_RESTARTS} times: {e}")),
                    );
                    return;
                }
            }
        }
    }

    fn serve(&self) {
        if self.index > 0 {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: plain system call on the calling thread (pid 0) with a valid parameter.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
                tracing::debug!(error = %io::Error::last_os_error(), "cannot lower a UDP thread's priority");
            }
        }
        let fd = self.sock.as_raw_fd();
        let mut b = Batch::new();
        while !self.shutdown.is_cancelled() {
            for i in 0..BATCH {
                b.rx_iov[i] = libc::iovec { iov_base: b.bufs[i].as_mut_ptr().cast(), iov_len: RX_BUF };
                let h = &mut b.rx[i].msg_hdr;
                h.msg_name = (&mut b.names[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
                h.msg_iov = &mut b.rx_iov[i];
                h.msg_iovlen = 1;
                h.msg_flags = 0;
            }
            // SAFETY: every header points at buffers owned by `b`, alive for the call.
            let n = unsafe {
                libc::recvmmsg(fd, b.rx.as_mut_ptr(), BATCH as u32, libc::MSG_WAITFORONE, std::ptr::null_mut())
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {}
                    // ICMP errors from earlier sends surface here; the socket is still fine.
                    io::ErrorKind::ConnectionRefused => {}
                    _ => {
                        tracing::warn!(error = %e, "udp receive failed");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                continue;
            }
            b.reply_to.clear();
            for i in 0..n as usize {
                let len = b.rx[i].msg_len as usize;
                if b.rx[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                    continue;
                }
                let Some(peer) = to_std(&b.names[i]) else { continue };
                let slot = b.reply_to.len();
                let pkt = &b.bufs[i][..len];
                let from =
                    Origin { client: peer.ip(), port: peer.port(), listener: self.listener, transport: Transport::Udp };
                match self.engine.handle(pkt, from, &mut b.outs[slot]) {
                    Handled::Reply => b.reply_to.push(i),
                    Handled::ReplyAndPrefetch => {
                        b.reply_to.push(i);
                        self.prefetch(pkt, from);
                    }
                    Handled::Drop => {}
                    Handled::Miss => self.miss(pkt, peer, from, &mut b.outs[slot], &mut b.reply_to, i),
                }
            }
            self.send(fd, &mut b);
        }
    }

    /// Hands a miss to the runtime, or answers SERVFAIL at once when too many are in flight.
    fn miss(&self, pkt: &[u8], peer: SocketAddr, from: Origin, out: &mut Vec<u8>, reply_to: &mut Vec<usize>, i: usize) {
        match self.engine.miss_permit() {
            Some(permit) => {
                let (engine, sock, pkt) = (self.engine.clone(), self.sock.clone(), pkt.to_vec());
                self.tasks.spawn_on(
                    async move {
                        let mut out = Vec::with_capacity(512);
                        if engine.resolve(&pkt, from, &mut out, permit).await == Handled::Reply
                            && let Err(e) = sock.send_to(&out, peer)
                        {
                            tracing::debug!(error = %e, %peer, "udp send failed");
                        }
                    },
                    &self.runtime,
                );
            }
            None => {
                if self.engine.servfail(pkt, from, out, ServFail::Busy) == Handled::Reply {
                    reply_to.push(i);
                }
            }
        }
    }

    /// Refreshes a cached answer in the background, if a slot for it is free.
    fn prefetch(&self, pkt: &[u8], from: Origin) {
        if let Some(permit) = self.engine.miss_permit() {
            let (engine, pkt) = (self.engine.clone(), pkt.to_vec());
            self.tasks.spawn_on(
                async move {
                    engine.prefetch(&pkt, from, permit).await;
                },
                &self.runtime,
            );
        }
    }

    fn send(&self, fd: i32, b: &mut Batch) {
        let count = b.reply_to.len();
        for (slot, &i) in b.reply_to.iter().enumerate() {
            let out = &b.outs[slot];
            b.tx_iov[slot] = libc::iovec { iov_base: out.as_ptr() as *mut _, iov_len: out.len() };
            let h = &mut b.tx[slot].msg_hdr;
            h.msg_name = (&mut b.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = b.rx[i].msg_hdr.msg_namelen;
            h.msg_iov = &mut b.tx_iov[slot];
            h.msg_iovlen = 1;
        }
        let mut sent = 0;
        while sent < count {
            // SAFETY: headers `sent..count` point at buffers owned by `b`.
            let r = unsafe { libc::sendmmsg(fd, b.tx[sent..].as_mut_ptr(), (count - sent) as u32, 0) };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // One bad destination must not stall the batch: skip it and go on.
                tracing::debug!(error = %e, "udp send failed");
                sent += 1;
            } else {
                sent += r as usize;
            }
        }
    }
}

const _: () = assert!(size_of::<libc::sockaddr_in6>() <= size_of::<libc::sockaddr_storage>());

fn to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddrV4::new(u32::from_be(a.sin_addr.s_addr).into(), u16::from_be(a.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let ip = a.sin6_addr.s6_addr.into();
            Some(SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id).into())
        }
        _ => None,
    }
}
