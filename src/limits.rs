//! Limits shared by the listeners: connections per client address, log lines per interval.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Connections open per client address; a [`ClientSlot`] holds one.
#[derive(Default)]
pub struct PerClient {
    open: std::sync::Mutex<HashMap<IpAddr, usize>>,
}

pub struct ClientSlot {
    table: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    /// Each client holding a connection now, with how many.
    pub fn counts(&self) -> Vec<(IpAddr, usize)> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(IpAddr, usize)> = open.iter().map(|(ip, n)| (*ip, *n)).collect();
        out.sort();
        out
    }

    /// A slot for `ip`, unless it already holds `max`.
    pub fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot { table: self.clone(), ip })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Log lines a listener writes about connections it refuses: at most [`LogBudget::LINES`] per
/// [`LogBudget::WINDOW_SECS`], so that clients inside `allow` cannot flood the log (the metrics
/// still count every refusal). The first line after a quiet spell says how many were skipped.
#[derive(Default)]
pub struct LogBudget {
    /// Seconds since the process started at which the current window began.
    window: std::sync::atomic::AtomicU64,
    used: std::sync::atomic::AtomicU32,
    skipped: std::sync::atomic::AtomicU64,
}

impl LogBudget {
    pub const LINES: u32 = 10;
    pub const WINDOW_SECS: u64 = 10;

    /// `Some(lines skipped since the last one written)` when a line may be written now.
    pub fn take(&self) -> Option<u64> {
        self.take_at(process_secs())
    }

    fn take_at(&self, now: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let start = self.window.load(Relaxed);
        if now >= start + Self::WINDOW_SECS && self.window.compare_exchange(start, now, Relaxed, Relaxed).is_ok() {
            self.used.store(0, Relaxed);
        }
        if self.used.fetch_add(1, Relaxed) < Self::LINES {
            Some(self.skipped.swap(0, Relaxed))
        } else {
            self.skipped.fetch_add(1, Relaxed);
            None
        }
    }
}

fn process_secs() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_per_address_are_capped_and_given_back() {
        let t: Arc<PerClient> = Arc::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = t.take(a, 2).unwrap();
        let _second = t.take(a, 2).unwrap();
        assert!(t.take(a, 2).is_none());
        assert!(t.take(b, 2).is_some());
        drop(first);
        assert!(t.take(a, 2).is_some());
    }

    #[test]
    fn log_lines_are_capped_per_window_and_the_next_says_how_many_were_skipped() {
        let b = LogBudget::default();
        let written = (0..25).filter(|_| b.take_at(3).is_some()).count();
        assert_eq!(written, LogBudget::LINES as usize);
        assert_eq!(b.take_at(9), None, "same window (the first starts at 0)");
        assert_eq!(b.take_at(10), Some(16), "a new window; 15 + 1 skipped before it");
        assert_eq!(b.take_at(11), Some(0));
        let rest = (0..20).filter(|_| b.take_at(19).is_some()).count();
        assert_eq!(rest, LogBudget::LINES as usize - 2);
    }
}
