//! Leadership transfer: a group's leader hands its role to a member it
//! names (`dmq cluster transfer-leader`), for maintenance such as a
//! rolling restart, without waiting for it to fail.
//!
//! openraft 0.9 has no transfer of its own, and a follower refuses to vote
//! while its leader lease runs (`election_timeout_max` after it last heard
//! from the leader), so a member that simply calls an election is refused.
//! The leader therefore steps aside in this order ([`transfer_leader`]):
//!
//! 1. It holds new writes ([`WriteGate`]: proposals made here and writes
//!    forwarded to it wait), so that its log stops growing.
//! 2. It waits until the target's log matches its own (the target would
//!    be refused votes with a shorter log).
//! 3. The other members hold their elections for a while
//!    ([`RaftRequest::HoldElections`](crate::network::RaftRequest), which
//!    ends by itself), and so does the leader, which also stops its
//!    heartbeats: nothing renews the followers' leases.
//! 4. Once the leases ran out, the target calls an election
//!    (`RaftRequest::Elect`); it has the longest log, so it wins.
//! 5. Whatever happened (also when the caller drops the transfer
//!    midway), the leader turns its heartbeats and elections back on,
//!    tells the others to elect again and opens the gate; writes held
//!    meanwhile go on, to the new leader if there is one.
//!
//! Invariants: no step can make two leaders (elections are Raft's own);
//! a failed transfer leaves the group as it was, led by the old leader or
//! electing as usual; an election hold ends by itself even if the leader
//! dies mid-transfer; writes are held at most [`HOLD_WRITES_MAX`].

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::Raft;
use tokio::sync::Notify;

use crate::network::{ask_leader_to, ForwardError, GroupTypes, PeerConnections, RaftRequest};
use crate::NodeId;

/// The longest a transfer holds a group's writes.
pub const HOLD_WRITES_MAX: Duration = Duration::from_secs(5);
/// How long the target gets to catch up with the leader's log.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(3);
/// How long the target gets to win its election.
const ELECTED_WITHIN: Duration = Duration::from_secs(3);

/// Holds a group's new writes at its leader while it hands over, and
/// counts the election holds asked of this member (so that an earlier
/// hold's end does not cut a later one short).
#[derive(Debug, Default)]
pub struct WriteGate {
    closed: AtomicBool,
    opened: Notify,
    holds: std::sync::atomic::AtomicU64,
    /// One transfer at a time per group.
    transferring: tokio::sync::Mutex<()>,
}

impl WriteGate {
    /// Returns once the gate is open (at once, usually), or after
    /// [`HOLD_WRITES_MAX`] whatever it is.
    pub async fn pass(&self) {
        let deadline = tokio::time::Instant::now() + HOLD_WRITES_MAX;
        loop {
            let opened = self.opened.notified();
            if !self.closed.load(Ordering::SeqCst) {
                return;
            }
            if tokio::time::timeout_at(deadline, opened).await.is_err() {
                return;
            }
        }
    }

    /// Closes the gate until the returned guard is dropped.
    fn close(self: &Arc<Self>) -> GateClosed {
        self.closed.store(true, Ordering::SeqCst);
        GateClosed(Arc::clone(self))
    }
}

/// The gate stays closed while this lives.
struct GateClosed(Arc<WriteGate>);

impl Drop for GateClosed {
    fn drop(&mut self) {
        self.0.closed.store(false, Ordering::SeqCst);
        self.0.opened.notify_waiters();
    }
}

/// Why a transfer did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// This node does not lead the group.
    #[error("this node does not lead the group")]
    NotLeader {
        /// The leader it knows of.
        leader: Option<NodeId>,
        /// Its Raft address.
        addr: Option<String>,
    },
    /// The target is no voter of the group.
    #[error("node {0} is no voter of the group")]
    NotAVoter(NodeId),
    /// A step did not complete in time; the group is led as before or
    /// elects as usual.
    #[error("{0}")]
    Failed(String),
}

/// Makes a member stop calling elections for `hold` (it still votes), then
/// call them again by itself, unless a later hold was asked meanwhile;
/// a zero `hold` ends every hold now.
pub(crate) fn hold_elections<C: GroupTypes>(raft: &Raft<C>, gate: &Arc<WriteGate>, hold: Duration) {
    let this = gate.holds.fetch_add(1, Ordering::SeqCst) + 1;
    if hold.is_zero() {
        raft.runtime_config().elect(true);
        return;
    }
    raft.runtime_config().elect(false);
    let (raft, gate) = (raft.clone(), Arc::clone(gate));
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        if gate.holds.load(Ordering::SeqCst) == this {
            raft.runtime_config().elect(true);
        }
    });
}

/// At the leader of group `group`: hands the leadership to voter `to`
/// (see the module doc). Answers once `to` leads, as this node sees it.
pub(crate) async fn transfer_leader<C: GroupTypes>(
    raft: &Raft<C>,
    gate: &Arc<WriteGate>,
    group: &str,
    peers: &PeerConnections,
    to: NodeId,
) -> Result<(), TransferError> {
    let me = raft.metrics().borrow().id;
    let (leader, voters, addrs) = {
        let metrics = raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let addrs: std::collections::BTreeMap<NodeId, String> = membership
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        (metrics.current_leader, voters, addrs)
    };
    if leader != Some(me) {
        return Err(TransferError::NotLeader {
            leader,
            addr: leader.and_then(|id| addrs.get(&id).cloned()),
        });
    }
    if to == me {
        return Ok(());
    }
    if !voters.contains(&to) {
        return Err(TransferError::NotAVoter(to));
    }
    let Some(target) = addrs.get(&to).cloned() else {
        return Err(TransferError::NotAVoter(to));
    };
    let lease = Duration::from_millis(raft.config().election_timeout_max);
    let _one_at_a_time = gate.transferring.lock().await;
    if raft.metrics().borrow().current_leader != Some(me) {
        return Err(TransferError::Failed(
            "the leadership moved while this transfer waited for another".to_string(),
        ));
    }
    let _held = gate.close();
    caught_up(raft, to).await?;
    // Nothing renews the followers' leases from now on, and no member but
    // the target calls an election until well after it won.
    let hold = lease * 2 + ELECTED_WITHIN;
    let hold_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX);
    let others: Vec<(NodeId, String)> = voters
        .iter()
        .filter(|id| **id != me && **id != to)
        .filter_map(|id| addrs.get(id).map(|addr| (*id, addr.clone())))
        .collect();
    for (id, addr) in &others {
        let request = RaftRequest::<C>::HoldElections { for_ms: hold_ms };
        if let Err(error) = ask(&request, addr, peers, group).await {
            tracing::warn!(
                group,
                node = id,
                ?error,
                "a member did not hold its elections"
            );
        }
    }
    // Put back when this ends, however it ends (the caller may drop it).
    let _restore = Restore {
        raft: raft.clone(),
        gate: Arc::clone(gate),
        others: others.iter().map(|(_, addr)| addr.clone()).collect(),
        group: group.to_string(),
        peers: peers.clone(),
    };
    raft.runtime_config().heartbeat(false);
    hold_elections(raft, gate, hold);
    async {
        tokio::time::sleep(lease + Duration::from_millis(50)).await;
        ask(&RaftRequest::<C>::Elect, &target, peers, group)
            .await
            .map_err(|error| {
                TransferError::Failed(format!("node {to} did not call an election: {error:?}"))
            })?;
        let mut metrics = raft.metrics();
        let waited = tokio::time::timeout(
            ELECTED_WITHIN,
            metrics.wait_for(|metrics| metrics.current_leader == Some(to)),
        )
        .await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => Err(TransferError::Failed(format!(
                "node {to} did not win its election within {} s",
                ELECTED_WITHIN.as_secs()
            ))),
        }
    }
    .await
}

/// Turns the leader's heartbeats and elections back on and tells the
/// other members to elect again, when a transfer ends (also when it is
/// dropped midway): the others' holds would end by themselves, the
/// leader's heartbeats would not.
struct Restore<C: GroupTypes> {
    raft: Raft<C>,
    gate: Arc<WriteGate>,
    others: Vec<String>,
    group: String,
    peers: PeerConnections,
}

impl<C: GroupTypes> Drop for Restore<C> {
    fn drop(&mut self) {
        self.raft.runtime_config().heartbeat(true);
        hold_elections(&self.raft, &self.gate, Duration::ZERO);
        let (others, group, peers) = (
            std::mem::take(&mut self.others),
            std::mem::take(&mut self.group),
            self.peers.clone(),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for addr in &others {
                    let request = RaftRequest::<C>::HoldElections { for_ms: 0 };
                    let _ = ask(&request, addr, &peers, &group).await;
                }
            });
        }
    }
}

/// Waits until `to`'s log matches this leader's last entry.
async fn caught_up<C: GroupTypes>(raft: &Raft<C>, to: NodeId) -> Result<(), TransferError> {
    let mut metrics = raft.metrics();
    let waited = tokio::time::timeout(
        CATCH_UP_WITHIN,
        metrics.wait_for(|metrics| {
            let matched = metrics
                .replication
                .as_ref()
                .and_then(|replication| replication.get(&to).cloned().flatten());
            matched.is_some() && matched.map(|id| id.index) == metrics.last_log_index
        }),
    )
    .await;
    match waited {
        Ok(Ok(_)) => Ok(()),
        _ => Err(TransferError::Failed(format!(
            "node {to} did not catch up with the leader's log within {} s",
            CATCH_UP_WITHIN.as_secs()
        ))),
    }
}

/// Asks the member at `addr` to carry out `request` (one answered with an
/// empty `Forwarded`).
async fn ask<C: GroupTypes>(
    request: &RaftRequest<C>,
    addr: &str,
    peers: &PeerConnections,
    group: &str,
) -> Result<(), ForwardError> {
    ask_leader_to(peers, addr, group, request, Duration::from_secs(2)).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_waits_at_a_closed_gate_until_it_opens() {
        let gate = Arc::new(WriteGate::default());
        tokio::time::timeout(Duration::from_millis(50), gate.pass())
            .await
            .expect("an open gate lets writes by");
        let closed = gate.close();
        let waiting = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.pass().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "a write passed a closed gate");
        drop(closed);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the write goes on once the gate opens")
            .unwrap();
    }
}
