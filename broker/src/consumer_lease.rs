//! Which node of a cluster delivers to the consumers of cluster topics:
//! the metadata group's leader, while it holds the consumer lease, with
//! `[cluster] consumer_lease = true` (the default); off, every node serves
//! its own consumers.
//!
//! Every node's dispatcher reads its own replica of each partition, and
//! each would deliver from its own cursor: two nodes serving one group
//! would hand the same messages to two members. So one node at a time
//! serves every consumer of cluster topics: the metadata group's leader
//! (whose group journal writes, the replicated acks, then commit without a
//! forward). The other nodes refuse SUBSCRIBE and FETCH of cluster topics
//! with `WrongNode` and the serving node's client address, and a node that
//! stops serving closes its consumers' connections the same way; clients
//! reconnect there (`PROTOCOL.md` §7, docs/replication.md).
//!
//! **The lease.** Every heartbeat, the leader asks a quorum to confirm
//! that it still leads (openraft's read index, `get_read_log_id`). A
//! confirmation asked for at `t` lets it serve until `t + lease`, where
//! `lease` is the election timeout's minimum. A node that starts leading
//! serves only after `takeover`, the election timeout's maximum.
//!
//! Invariants:
//! - A node hands deliveries of cluster topics to its connections only
//!   while [`ConsumerLease::serving_now`] holds: it leads the metadata
//!   group, has led it for `takeover`, and a quorum confirmed that within
//!   the last `lease` (the monotonic clock: a process paused past its lease
//!   finds it expired when it resumes, before its lease task runs again),
//!   and, once per term, after `takeover`, it refreshed its copies of the
//!   groups (the `refresh` given to [`ConsumerLease::keep`]: the broker
//!   loads its idle copies of cluster topics' groups again from their
//!   replicated journals, with what the node that served in between did,
//!   seeks included; merging from the journal only adds acks).
//! - A deposed leader's last confirmation was asked for before the next
//!   leader was elected (a member that voted for the next term answers no
//!   heartbeat of the old one), so it stops serving at most `lease` after
//!   that election, and the next leader starts `takeover` (> `lease`)
//!   after it: the two never serve at once, as long as the nodes' clocks
//!   run at rates within that margin. Deliveries already handed to a
//!   connection's writer may still go out a moment later: consumers get
//!   at least once, as on one node.

use std::sync::Mutex;
use std::time::Duration;

use dmq_replication::MetadataNode;
use tokio::sync::watch;
use tokio::time::Instant;

/// Where the consumers of cluster topics are served now, as this node
/// knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerHome {
    /// Here: this node holds the lease.
    Here,
    /// At another node: its client address.
    At(String),
    /// Not known yet (an election, or a new leader's takeover wait).
    Unknown,
}

/// The consumer lease of one node (see the module docs).
#[derive(Debug)]
pub struct ConsumerLease {
    lease: Duration,
    takeover: Duration,
    state: Mutex<LeaseState>,
    serving: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct LeaseState {
    /// The metadata term this node leads, and since when (as it saw it).
    leading: Option<(u64, Instant)>,
    /// Until when the last confirmation lets it serve.
    confirmed_until: Option<Instant>,
    /// The term whose takeover refreshed this node's copies of the groups.
    refreshed: Option<u64>,
}

impl ConsumerLease {
    /// A lease of `election_timeout_ms.0` after each confirmation, taken
    /// up `election_timeout_ms.1` after leadership began.
    pub fn new(election_timeout_ms: (u64, u64)) -> ConsumerLease {
        let (min, max) = election_timeout_ms;
        let lease = Duration::from_millis(min.max(1));
        ConsumerLease {
            lease,
            // Strictly longer than the lease, whatever the configuration.
            takeover: Duration::from_millis(max).max(lease * 2),
            state: Mutex::new(LeaseState::default()),
            serving: watch::channel(false).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this node may hand deliveries of cluster topics to its
    /// connections now.
    pub fn serving_now(&self) -> bool {
        self.serving_at(Instant::now())
    }

    fn serving_at(&self, now: Instant) -> bool {
        let state = self.state();
        state.leading.is_some_and(|(term, since)| {
            now >= since + self.takeover && state.refreshed == Some(term)
        }) && state.confirmed_until.is_some_and(|until| now < until)
    }

    /// Changes to whether this node serves (updated by [`Self::keep`] each
    /// round; [`Self::serving_now`] is the fence).
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.serving.subscribe()
    }

    /// Renews the lease every `every` until `stop`. In each term this node
    /// leads, once its takeover wait is over, `refresh` runs before it
    /// serves (again next round until it answers true).
    pub async fn keep<F: std::future::Future<Output = bool>>(
        &self,
        metadata: std::sync::Arc<MetadataNode>,
        every: Duration,
        mut stop: watch::Receiver<bool>,
        refresh: impl Fn() -> F,
    ) {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
            self.renew(&metadata, &refresh).await;
        }
        self.state().confirmed_until = None;
        self.serving.send_replace(false);
    }

    /// One round: notes whether this node leads (and since when), asks a
    /// quorum to confirm it, refreshes once per term after the takeover
    /// wait, and publishes whether it serves.
    async fn renew<F: std::future::Future<Output = bool>>(
        &self,
        metadata: &MetadataNode,
        refresh: &impl Fn() -> F,
    ) {
        let term = metadata.leading_term();
        {
            let mut state = self.state();
            if state.leading.map(|(t, _)| t) != term {
                state.leading = term.map(|t| (t, Instant::now()));
                state.confirmed_until = None;
            }
        }
        if term.is_some() {
            let asked = Instant::now();
            let confirmed = tokio::time::timeout(self.lease, metadata.raft().get_read_log_id())
                .await
                .is_ok_and(|answer| answer.is_ok());
            let mut state = self.state();
            if confirmed && state.leading.map(|(t, _)| t) == term {
                state.confirmed_until = Some(asked + self.lease);
            }
        }
        let due = {
            let state = self.state();
            match state.leading {
                Some((term, since))
                    if Instant::now() >= since + self.takeover && state.refreshed != Some(term) =>
                {
                    Some(term)
                }
                _ => None,
            }
        };
        if let Some(term) = due {
            if refresh().await {
                let mut state = self.state();
                if state.leading.map(|(t, _)| t) == Some(term) {
                    state.refreshed = Some(term);
                }
            }
        }
        let serving = self.serving_now();
        self.serving.send_if_modified(|was| {
            let changed = *was != serving;
            *was = serving;
            changed
        });
    }

    /// Where consumers are served, as this node knows it now: here, the
    /// metadata leader's client address (from `client_addr`), or unknown.
    pub fn home(
        &self,
        metadata: &MetadataNode,
        client_addr: impl Fn(u64) -> Option<String>,
    ) -> ConsumerHome {
        if self.serving_now() {
            return ConsumerHome::Here;
        }
        match metadata.status().leader {
            Some(leader) if leader != metadata.id() => {
                client_addr(leader).map_or(ConsumerHome::Unknown, ConsumerHome::At)
            }
            _ => ConsumerHome::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_serves_after_its_takeover_wait_and_until_its_lease_runs_out() {
        let lease = ConsumerLease::new((200, 400));
        let began = Instant::now();
        let at = |ms: u64| began + Duration::from_millis(ms);
        assert!(!lease.serving_at(at(0)), "no leadership yet");
        lease.state().leading = Some((3, began));
        lease.state().confirmed_until = Some(at(200));
        assert!(!lease.serving_at(at(100)), "within the takeover wait");
        assert!(!lease.serving_at(at(400)), "confirmed too long ago");
        lease.state().confirmed_until = Some(at(600));
        assert!(
            !lease.serving_at(at(400)),
            "its copies of the groups not refreshed yet"
        );
        lease.state().refreshed = Some(2);
        assert!(!lease.serving_at(at(400)), "refreshed in another term");
        lease.state().refreshed = Some(3);
        assert!(lease.serving_at(at(400)));
        assert!(lease.serving_at(at(599)));
        assert!(
            !lease.serving_at(at(600)),
            "the lease ran out: a node paused past it stops"
        );
    }

    #[test]
    fn the_takeover_wait_is_longer_than_the_lease_whatever_the_configuration() {
        let lease = ConsumerLease::new((300, 300));
        assert!(lease.takeover > lease.lease);
    }
}
