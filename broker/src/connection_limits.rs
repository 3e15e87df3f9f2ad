//! Connection limits shared by the protocol and admin listeners: at most a
//! total and a per-IP-address number of open connections ([`ConnectionLimits`],
//! one [`Slot`] per admitted connection, freed on drop), and refusals
//! logged at most once per [`REFUSAL_LOG_INTERVAL`] with how many they
//! stand for ([`QuietWarning`]), so a flood of connections cannot flood the
//! log.
//!
//! Invariant: `open.total` equals the number of live slots, and
//! `by_address` holds exactly the addresses with a live slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Refusals and accept errors are logged at most once per this.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener's total is open.
    TooManyConnections,
    /// The per-address limit is open from its address.
    TooManyFromAddress,
}

impl Refusal {
    /// The `reason` label of the refusal counter.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::TooManyFromAddress => "too_many_from_address",
        }
    }
}

/// A listener's open connections and refusals: at most `max_total` open,
/// at most `max_per_address` from one IP address.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<OpenConnections>,
    refused_total: AtomicU64,
    refused_per_address: AtomicU64,
}

#[derive(Debug, Default)]
struct OpenConnections {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One admitted connection; frees its place when dropped.
#[derive(Debug)]
pub struct Slot {
    connections: Arc<ConnectionLimits>,
    address: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.connections.lock_open();
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.by_address.get_mut(&self.address) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.by_address.remove(&self.address);
            }
        }
    }
}

impl ConnectionLimits {
    /// Limits of `max_total` connections, `max_per_address` per address.
    pub fn new(max_total: usize, max_per_address: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_total,
            max_per_address,
            open: Mutex::new(OpenConnections::default()),
            refused_total: AtomicU64::new(0),
            refused_per_address: AtomicU64::new(0),
        }
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for a connection from `address`, or says which limit
    /// refuses it (and counts the refusal).
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Slot, Refusal> {
        let mut open = self.lock_open();
        let from_address = open.by_address.get(&address).copied().unwrap_or(0);
        let refusal = if open.total >= self.max_total {
            Some((Refusal::TooManyConnections, &self.refused_total))
        } else if from_address >= self.max_per_address {
            Some((Refusal::TooManyFromAddress, &self.refused_per_address))
        } else {
            None
        };
        if let Some((refusal, counter)) = refusal {
            counter.fetch_add(1, Ordering::Relaxed);
            return Err(refusal);
        }
        open.total += 1;
        *open.by_address.entry(address).or_insert(0) += 1;
        Ok(Slot {
            connections: Arc::clone(self),
            address,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock_open().total
    }

    /// Connections refused so far because of `refusal`'s limit.
    pub fn refused(&self, refusal: Refusal) -> u64 {
        match refusal {
            Refusal::TooManyConnections => self.refused_total.load(Ordering::Relaxed),
            Refusal::TooManyFromAddress => self.refused_per_address.load(Ordering::Relaxed),
        }
    }
}

/// A warning that is logged at most once per interval, with the number of
/// occurrences it stands for.
#[derive(Debug)]
pub(crate) struct QuietWarning {
    interval: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

/// Notes a refused connection of `listener` ("protocol", "admin") and logs
/// it if `warning` says it is time, with how many it stands for.
pub(crate) fn log_refusal(
    warning: &mut QuietWarning,
    listener: &'static str,
    peer: std::net::SocketAddr,
    refusal: Refusal,
) {
    if warning.note(Instant::now()) {
        tracing::warn!(
            listener,
            %peer,
            reason = refusal.reason(),
            refused = warning.take(),
            "connections refused (a connection limit is reached); logged at most every {} s",
            REFUSAL_LOG_INTERVAL.as_secs()
        );
    }
}

impl QuietWarning {
    pub(crate) fn new(interval: Duration) -> QuietWarning {
        QuietWarning {
            interval,
            last: None,
            unlogged: 0,
        }
    }

    /// Counts one occurrence; true when it is time to log (the count is
    /// then in [`take`](Self::take)).
    pub(crate) fn note(&mut self, now: Instant) -> bool {
        self.unlogged += 1;
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if due {
            self.last = Some(now);
        }
        due
    }

    /// Occurrences since the last log line.
    pub(crate) fn take(&mut self) -> u64 {
        std::mem::take(&mut self.unlogged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_per_address_and_in_all() {
        let connections = Arc::new(ConnectionLimits::new(3, 2));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = connections.admit(a).unwrap();
        let _second = connections.admit(a).unwrap();
        assert_eq!(
            connections.admit(a).unwrap_err(),
            Refusal::TooManyFromAddress
        );
        let _third = connections.admit(b).unwrap();
        assert_eq!(
            connections.admit(b).unwrap_err(),
            Refusal::TooManyConnections
        );
        assert_eq!(connections.open(), 3);
        drop(first);
        assert_eq!(connections.open(), 2);
        let _again = connections.admit(a).unwrap();
        assert_eq!(connections.refused(Refusal::TooManyFromAddress), 1);
        assert_eq!(connections.refused(Refusal::TooManyConnections), 1);
    }

    #[test]
    fn warnings_are_logged_once_per_interval_with_their_count() {
        let mut warning = QuietWarning::new(Duration::from_secs(10));
        let start = Instant::now();
        assert!(warning.note(start));
        assert_eq!(warning.take(), 1);
        for i in 1..1000 {
            assert!(!warning.note(start + Duration::from_millis(i)));
        }
        assert!(warning.note(start + Duration::from_secs(10)));
        assert_eq!(warning.take(), 1000);
    }
}
