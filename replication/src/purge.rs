//! Bounding a partition replica's Raft rows: what may be purged, and when.
//!
//! A partition's records live in its segment log (retention owns them);
//! its Raft log keeps one row per entry besides, in memory and in its row
//! journal. Without purging, rows grow with every batch for as long as
//! the cluster runs.
//!
//! A row may go only once no member will ever ask for its entry again:
//! a partition snapshot holds no records, so a member sent one instead of
//! entries would have a hole ([`crate::partition`] refuses to install
//! it). Hence the rule, run by [`PurgeTask`] on every replica:
//!
//! 1. **The leader** finds the lowest index every member of the group
//!    (voters and learners) has matched, bounded by what it has applied
//!    (so committed: never cut by a later leader). Once that is
//!    `purge_after_entries` past the last allowance, it proposes
//!    [`PartitionCommand::PurgeAllowed`] with it. A member that is down,
//!    or has never answered, holds the allowance back.
//! 2. **Every replica**, once it has applied an allowance past what it has
//!    purged, builds a snapshot (its state machine, kept in a file) and
//!    then asks openraft to purge up to the allowance (openraft purges
//!    only what a snapshot covers, and waits for replication in flight).
//!
//! Every member held the allowed entries when the allowance was
//! proposed, and a member's matched entries are durable on it, so every
//! replica that later leads has every entry any member lacks. openraft's
//! own purging after snapshots is off for partition groups
//! (`max_in_snapshot_log_to_keep` is `u64::MAX`): this task is the only
//! one that purges.

use std::time::Duration;

use openraft::{Raft, ServerState};

use crate::partition::{PartitionCommand, PartitionStateMachine, PartitionTypes};
use crate::NodeId;

/// How often a replica looks at whether to allow or do a purge.
const PURGE_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// How long the leader waits for an allowance to commit before it tries
/// again at a later check.
const ALLOWANCE_TIMEOUT: Duration = Duration::from_secs(5);

/// The lowest Raft index every member of the group has matched, bounded
/// by `applied`; `None` while any member has matched nothing (or is not
/// in `matched`, the leader's replication progress).
pub(crate) fn held_by_every_member(
    members: impl IntoIterator<Item = NodeId>,
    leader: NodeId,
    applied: u64,
    matched: &std::collections::BTreeMap<NodeId, Option<openraft::LogId<NodeId>>>,
) -> Option<u64> {
    let mut held = applied;
    for member in members {
        if member == leader {
            continue;
        }
        let index = matched.get(&member).copied().flatten()?.index;
        held = held.min(index);
    }
    Some(held)
}

/// The background task that allows (on the leader) and performs (on
/// every replica) the purge of a partition's rows. Dropping it stops it.
#[derive(Debug)]
pub(crate) struct PurgeTask(tokio::task::JoinHandle<()>);

impl PurgeTask {
    /// Starts the task for `raft`, whose state machine is `state`. An
    /// allowance is proposed once `every_entries` entries more are held by
    /// every member; 0 turns purging off.
    pub(crate) fn start(
        raft: Raft<PartitionTypes>,
        state: PartitionStateMachine,
        every_entries: u64,
    ) -> Option<PurgeTask> {
        if every_entries == 0 {
            return None;
        }
        Some(PurgeTask(tokio::spawn(run(raft, state, every_entries))))
    }
}

impl Drop for PurgeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run(raft: Raft<PartitionTypes>, state: PartitionStateMachine, every_entries: u64) {
    let mut ticks = tokio::time::interval(PURGE_CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let metrics = raft.metrics().borrow().clone();
        if metrics.running_state.is_err() {
            return;
        }
        if metrics.state == ServerState::Leader {
            if let (Some(matched), Some(applied)) = (&metrics.replication, metrics.last_applied) {
                let members = metrics
                    .membership_config
                    .membership()
                    .nodes()
                    .map(|(id, _)| *id)
                    .collect::<Vec<_>>();
                let held = held_by_every_member(members, metrics.id, applied.index, matched);
                if let Some(upto) = held {
                    if upto >= state.purge_allowed() + every_entries {
                        let proposed = raft.client_write(PartitionCommand::PurgeAllowed { upto });
                        match tokio::time::timeout(ALLOWANCE_TIMEOUT, proposed).await {
                            Ok(Ok(_)) => tracing::debug!(upto, "rows purge allowed"),
                            Ok(Err(error)) => tracing::debug!(%error, "purge allowance"),
                            Err(_) => tracing::debug!("purge allowance timed out"),
                        }
                    }
                }
            }
        }
        let allowed = state.purge_allowed();
        let purged_next = metrics.purged.map_or(0, |p| p.index + 1);
        if allowed == 0 || allowed < purged_next {
            continue;
        }
        let snapshot = metrics.snapshot.map(|s| s.index);
        let step = if snapshot.is_some_and(|s| s >= allowed) {
            raft.trigger().purge_log(allowed).await
        } else {
            raft.trigger().snapshot().await
        };
        if step.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId};
    use std::collections::BTreeMap;

    fn at(index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(1, 1), index))
    }

    #[test]
    fn the_purge_point_is_the_lowest_member_and_never_past_applied() {
        let matched = BTreeMap::from([(1, at(90)), (2, at(70)), (3, at(120))]);
        assert_eq!(held_by_every_member([1, 2, 3], 1, 100, &matched), Some(70));
        let matched = BTreeMap::from([(1, at(900)), (2, at(700)), (3, at(800))]);
        assert_eq!(held_by_every_member([1, 2, 3], 1, 100, &matched), Some(100));
    }

    #[test]
    fn a_member_that_has_matched_nothing_holds_purging_back() {
        let matched = BTreeMap::from([(1, at(90)), (2, None), (3, at(80))]);
        assert_eq!(held_by_every_member([1, 2, 3], 1, 100, &matched), None);
        // A member the leader has no progress for (just added) too.
        let matched = BTreeMap::from([(1, at(90)), (3, at(80))]);
        assert_eq!(held_by_every_member([1, 2, 3, 4], 1, 100, &matched), None);
    }
}
