//! When to ask a producer group about a transaction that neither committed
//! nor rolled back (check-back): [`CheckSchedule`].
//!
//! - The first check of a transaction is due `timeout_ms` after it began;
//!   check `n` (from 1) is followed by the next after
//!   `min(timeout_ms × 2^(n−1), backoff_max_ms)` plus up to a quarter of
//!   that as jitter (derived from the handle and `n`, so a seeded
//!   simulation replays it, and transactions begun together do not all
//!   come back together).
//! - Checks of one producer group are rate limited: they are spaced
//!   `1000 / per_second` ms apart (a virtual clock per group). A check
//!   due while the group's clock is ahead reserves the next slot and waits
//!   for it, so a backlog of due checks costs one decision each, never a
//!   re-examination every interval.
//! - After `max_checks` checks the transaction is *unresolved*: no more
//!   checks; it stays open (never discarded) until its producer or an
//!   operator ends it.
//!
//! Due checks are found in a `BTreeSet` ordered by due time: no scan of the
//! open transactions. Entries are dropped lazily: a due entry whose
//! transaction ended (or is ending) is discarded when it comes up, and the
//! caller schedules again a transaction whose end failed.
//!
//! Counts survive a restart (the transaction store journals them): an open
//! transaction resumes with its count ([`CheckSchedule::resume`]), its next
//! check one backoff after the restart, and an unresolved one stays
//! unresolved.

use std::collections::{BTreeSet, HashMap};

/// Check-back settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLimits {
    /// The first check comes this long after a transaction began.
    pub timeout_ms: u64,
    /// The longest wait between two checks of one transaction.
    pub backoff_max_ms: u64,
    /// Checks of a transaction before it is left unresolved.
    pub max_checks: u32,
    /// Checks per second of one producer group, at most.
    pub per_second: u32,
}

/// One check to send: ask a live member of `group` how transaction `id`
/// (handle `handle`) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnCheck {
    /// The producer group.
    pub group: String,
    /// The transaction id.
    pub id: String,
    /// The transaction's handle.
    pub handle: u64,
    /// When it began (ms since the epoch).
    pub opened_ms: i64,
    /// This is the transaction's check number `checks` (from 1).
    pub checks: u32,
}

/// What a due entry asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckDecision {
    /// Send check number `checks` (from 1) now.
    Send {
        /// Its number.
        checks: u32,
    },
    /// The group has no token: tried again later (rescheduled already).
    Throttled,
    /// The last check was sent before: the transaction is now unresolved.
    Unresolved,
}

#[derive(Debug, Default, Clone, Copy)]
struct CheckState {
    sent: u32,
    unresolved: bool,
    /// Its check waits for a slot it reserved: sent when it comes due.
    reserved: bool,
}

/// The check schedule of the open transactions (see the module doc).
#[derive(Debug)]
pub struct CheckSchedule {
    limits: CheckLimits,
    due: BTreeSet<(i64, u64)>,
    states: HashMap<u64, CheckState>,
    /// Each producer group's next free slot (ms, fractional).
    slots: HashMap<String, f64>,
    sent_total: u64,
}

impl CheckSchedule {
    /// An empty schedule.
    pub fn new(limits: CheckLimits) -> CheckSchedule {
        CheckSchedule {
            limits,
            due: BTreeSet::new(),
            states: HashMap::new(),
            slots: HashMap::new(),
            sent_total: 0,
        }
    }

    /// A transaction began at `opened_ms` (or was found open at a
    /// restart): its first check is due `timeout_ms` later.
    pub fn begin(&mut self, handle: u64, opened_ms: i64) {
        self.states.entry(handle).or_default();
        let due = opened_ms.saturating_add(self.limits.timeout_ms as i64);
        self.due.insert((due, handle));
    }

    /// A transaction found open at a restart (`now_ms`) with `sent` checks
    /// sent before it: unresolved if they ran out, else its next check is
    /// due one backoff after `now_ms` (none sent: `timeout_ms` after it
    /// began, but not before `timeout_ms` after the restart, so that the
    /// producer groups' listeners can connect again first: a check nobody
    /// hears counts as unanswered).
    pub fn resume(&mut self, handle: u64, opened_ms: i64, sent: u32, now_ms: i64) {
        if sent == 0 {
            self.states.entry(handle).or_default();
            let timeout = self.limits.timeout_ms as i64;
            let due = opened_ms
                .saturating_add(timeout)
                .max(now_ms.saturating_add(timeout));
            self.due.insert((due, handle));
            return;
        }
        let unresolved = sent >= self.limits.max_checks;
        self.states.insert(
            handle,
            CheckState {
                sent,
                unresolved,
                reserved: false,
            },
        );
        if !unresolved {
            let due = now_ms.saturating_add(self.backoff_ms(handle, sent));
            self.due.insert((due, handle));
        }
    }

    /// A transaction whose end failed is open again: checked at `due_ms`.
    pub fn again(&mut self, handle: u64, due_ms: i64) {
        if self.states.get(&handle).is_some_and(|s| s.unresolved) {
            return;
        }
        self.states.entry(handle).or_default();
        self.due.insert((due_ms, handle));
    }

    /// The transaction ended: no more checks.
    pub fn forget(&mut self, handle: u64) {
        self.states.remove(&handle);
    }

    /// Handles whose check is due by `now_ms`, at most `max`, earliest
    /// first (their entries are removed: the caller decides on each with
    /// [`decide`](Self::decide), or drops it).
    pub fn due(&mut self, now_ms: i64, max: usize) -> Vec<u64> {
        let mut handles = Vec::new();
        while handles.len() < max {
            let Some(&(due, handle)) = self.due.first() else {
                break;
            };
            if due > now_ms {
                break;
            }
            self.due.remove(&(due, handle));
            if self.states.contains_key(&handle) {
                handles.push(handle);
            }
        }
        handles
    }

    /// Decides on a due check of transaction `handle` of producer group
    /// `group`, and schedules its next one.
    pub fn decide(&mut self, handle: u64, group: &str, now_ms: i64) -> CheckDecision {
        let state = *self.states.entry(handle).or_default();
        if state.unresolved {
            return CheckDecision::Unresolved;
        }
        if state.sent >= self.limits.max_checks {
            if let Some(state) = self.states.get_mut(&handle) {
                state.unresolved = true;
            }
            return CheckDecision::Unresolved;
        }
        if !state.reserved {
            let slot = self.take_slot(group, now_ms);
            if slot > now_ms {
                if let Some(state) = self.states.get_mut(&handle) {
                    state.reserved = true;
                }
                self.due.insert((slot, handle));
                return CheckDecision::Throttled;
            }
        }
        let sent = state.sent + 1;
        if let Some(state) = self.states.get_mut(&handle) {
            state.sent = sent;
            state.reserved = false;
        }
        self.sent_total += 1;
        let next = now_ms.saturating_add(self.backoff_ms(handle, sent));
        self.due.insert((next, handle));
        CheckDecision::Send { checks: sent }
    }

    /// The wait after check number `sent` of `handle`, jitter included.
    pub fn backoff_ms(&self, handle: u64, sent: u32) -> i64 {
        let timeout = self.limits.timeout_ms.max(1);
        let base = timeout
            .saturating_mul(1u64 << sent.saturating_sub(1).min(32))
            .min(self.limits.backoff_max_ms.max(1));
        let jitter = mix(handle ^ (u64::from(sent) << 48)) % (base / 4 + 1);
        i64::try_from(base + jitter).unwrap_or(i64::MAX)
    }

    /// Takes `group`'s next free slot at or after `now_ms`: the time (ms)
    /// its check may be sent.
    fn take_slot(&mut self, group: &str, now_ms: i64) -> i64 {
        let interval = 1_000.0 / f64::from(self.limits.per_second.max(1));
        let next = self.slots.entry(group.to_string()).or_insert(f64::MIN);
        let slot = next.max(now_ms as f64);
        *next = slot + interval;
        slot.ceil() as i64
    }

    /// True if the transaction's checks ran out.
    pub fn is_unresolved(&self, handle: u64) -> bool {
        self.states.get(&handle).is_some_and(|s| s.unresolved)
    }

    /// Checks sent for the transaction so far.
    pub fn sent(&self, handle: u64) -> u32 {
        self.states.get(&handle).map_or(0, |s| s.sent)
    }

    /// Checks sent since this process started.
    pub fn sent_total(&self) -> u64 {
        self.sent_total
    }

    /// When the next check is due, if any is scheduled.
    pub fn next_due_ms(&self) -> Option<i64> {
        self.due.first().map(|&(due, _)| due)
    }
}

/// splitmix64's finalizer: a deterministic spread for the jitter.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> CheckLimits {
        CheckLimits {
            timeout_ms: 1_000,
            backoff_max_ms: 8_000,
            max_checks: 5,
            per_second: 1_000,
        }
    }

    #[test]
    fn a_resumed_count_goes_on_where_it_stopped() {
        let mut schedule = CheckSchedule::new(limits());
        // Two checks were sent before the restart at 50,000.
        schedule.resume(7, 10_000, 2, 50_000);
        let next = schedule.next_due_ms().unwrap();
        assert!((52_000..=52_500).contains(&next), "{next}");
        assert_eq!(schedule.due(next, 10), vec![7]);
        assert_eq!(
            schedule.decide(7, "g", next),
            CheckDecision::Send { checks: 3 }
        );
        // Ran out before the restart: unresolved at once, nothing due.
        schedule.resume(8, 10_000, 5, 50_000);
        assert!(schedule.is_unresolved(8));
        assert_eq!(schedule.sent(8), 5);
        // None sent: from its timeout, but not before a timeout after the
        // restart (listeners connect again first).
        schedule.resume(9, 10_000, 0, 50_000);
        assert!(schedule.due(50_999, 10).is_empty());
        assert_eq!(schedule.due(51_000, 10), vec![9]);
    }

    #[test]
    fn checks_back_off_then_leave_the_transaction_unresolved() {
        let mut schedule = CheckSchedule::new(limits());
        schedule.begin(7, 10_000);
        assert!(schedule.due(10_999, 10).is_empty());
        let mut now = 11_000;
        let mut sent_at = Vec::new();
        loop {
            let due = schedule.due(now, 10);
            if due == vec![7] {
                match schedule.decide(7, "g", now) {
                    CheckDecision::Send { checks } => sent_at.push((checks, now)),
                    CheckDecision::Unresolved => break,
                    CheckDecision::Throttled => panic!("no throttling at this rate"),
                }
            }
            now = schedule.next_due_ms().unwrap();
        }
        assert_eq!(sent_at.len(), 5);
        assert_eq!(sent_at[0], (1, 11_000));
        // Each wait is the backoff (1 s, 2 s, 4 s, 8 s, capped) plus at most
        // a quarter of it.
        for pair in sent_at.windows(2) {
            let (checks, at) = pair[0];
            let base = (1_000i64 << (checks - 1)).min(8_000);
            let wait = pair[1].1 - at;
            assert!(wait >= base && wait <= base + base / 4, "{pair:?}");
        }
        assert!(schedule.is_unresolved(7));
        assert_eq!(schedule.sent_total(), 5);
        assert!(schedule.due(i64::MAX, 10).is_empty(), "no more checks");
    }

    #[test]
    fn an_ended_transaction_is_not_checked_and_a_failed_end_is() {
        let mut schedule = CheckSchedule::new(limits());
        schedule.begin(1, 0);
        schedule.begin(2, 0);
        schedule.forget(1);
        assert_eq!(schedule.due(1_000, 10), vec![2]);
        schedule.again(1, 5_000);
        assert_eq!(schedule.due(5_000, 10), vec![1]);
    }

    #[test]
    fn one_group_is_rate_limited_and_others_are_not() {
        // One check each: the later ones of early handles do not take
        // slots in the middle of the backlog.
        let mut schedule = CheckSchedule::new(CheckLimits {
            per_second: 10,
            max_checks: 1,
            ..limits()
        });
        for handle in 1..=30 {
            schedule.begin(handle, 0);
        }
        let mut sent = Vec::new();
        for handle in schedule.due(1_000, 100) {
            if let CheckDecision::Send { .. } = schedule.decide(handle, "busy", 1_000) {
                sent.push((handle, 1_000));
            }
        }
        assert_eq!(sent.len(), 1, "the others wait for their slots");
        schedule.begin(99, 0);
        let due = schedule.due(1_000, 100);
        assert_eq!(due, vec![99], "another group is not held back");
        assert!(matches!(
            schedule.decide(99, "quiet", 1_000),
            CheckDecision::Send { checks: 1 }
        ));
        // Each throttled check comes back once, at its own slot, 100 ms
        // apart: 10 a second.
        let mut now = 1_000;
        while sent.len() < 30 {
            now = schedule.next_due_ms().unwrap();
            for handle in schedule.due(now, 100) {
                let group = if handle == 99 { "quiet" } else { "busy" };
                match schedule.decide(handle, group, now) {
                    CheckDecision::Send { checks: 1 } => sent.push((handle, now)),
                    CheckDecision::Unresolved => {}
                    other => panic!("{handle} at {now}: {other:?}"),
                }
            }
        }
        assert_eq!(now, 1_000 + 29 * 100);
        for pair in sent.windows(2) {
            assert_eq!(pair[1].1 - pair[0].1, 100, "{pair:?}");
        }
    }

    proptest! {
        /// Whatever the order of begins, ends and time, a transaction is
        /// never checked more than `max_checks` times, never before its
        /// timeout, and never after it ended.
        #[test]
        fn checks_stay_within_their_rules(
            ops in proptest::collection::vec((0u8..4, 1u64..6, 0i64..3_000), 1..200)
        ) {
            let mut schedule = CheckSchedule::new(limits());
            let mut began: HashMap<u64, i64> = HashMap::new();
            let mut ended: BTreeSet<u64> = BTreeSet::new();
            let mut sent: HashMap<u64, u32> = HashMap::new();
            let mut now = 0i64;
            for (op, handle, step) in ops {
                now += step;
                match op {
                    0 if !began.contains_key(&handle) => {
                        began.insert(handle, now);
                        schedule.begin(handle, now);
                    }
                    1 if began.contains_key(&handle) => {
                        ended.insert(handle);
                        schedule.forget(handle);
                    }
                    _ => {
                        for due in schedule.due(now, 100) {
                            prop_assert!(!ended.contains(&due), "{due} checked after its end");
                            if let CheckDecision::Send { checks } = schedule.decide(due, "g", now) {
                                prop_assert!(now >= began[&due] + 1_000, "checked before its timeout");
                                let count = sent.entry(due).or_default();
                                *count += 1;
                                prop_assert_eq!(*count, checks);
                                prop_assert!(checks <= 5);
                            }
                        }
                    }
                }
            }
        }
    }
}
