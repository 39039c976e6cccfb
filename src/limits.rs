//! Limits shared by the listeners: connections per client address.

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
}
