//! A node whose disk came back empty does not rejoin under its old id.
//!
//! Raft's safety rests on votes: a candidate is elected only by a quorum
//! whose logs are no longer than its own. A node that once held entries
//! and lost them (a dead disk, a wiped data directory) but rejoins under
//! its id votes as if it never held them: with three nodes, an entry
//! committed on two of them, one of which then lost its disk, is on one
//! disk only, and the third node (which lacks it) can be elected with the
//! wiped node's vote, and the entry is lost. openraft's leaders also stop
//! when a follower's log goes back.
//!
//! So:
//! - the metadata group's leader records every node it sees hold entries
//!   (its log matched at index 1 or later), itself included, as a
//!   [`MetaCommand::HeldData`] write ([`note_held_data`]); every node
//!   applies it;
//! - every node answers on its Raft port (the pseudo-group
//!   [`NODE_GROUP`]) what it knows of a node ([`PeerView`]), even before
//!   its own metadata group starts ([`NodeViews`]);
//! - a node that starts with no metadata state asks its peers first
//!   ([`check_rejoin`]): if any knows it held data, it refuses to start
//!   ([`RejoinError::DataLost`]); it goes on once a peer with state says
//!   it never did, or once a majority of the cluster (itself included) is
//!   pristine (a new cluster forming), and waits otherwise.
//!
//! - a node being replaced ([`MetaCommand::ReplaceNode`]: a learner of
//!   every group, so its vote counts nowhere) is answered
//!   [`PeerView::Replacing`] and may start with nothing.
//!
//! What it does not cover: a node wiped before any leader recorded it
//! (within moments of its first entries), and a wiped node that starts
//! while only pristine peers are up and they make a majority with it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::metadata::MetaCommand;
use crate::network::{ask, decode, encode, GroupHandler, RaftRouter};
use crate::node::MetadataNode;
use crate::{MetadataStateMachine, NodeId};

/// The Raft port's pseudo-group that answers [`PeerView`] queries.
pub const NODE_GROUP: &str = "node";

/// What a node knows of another node's past.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerView {
    /// It has no metadata state either (it is new, or lost its disk too).
    Pristine,
    /// It has state but its metadata group is still starting: ask again.
    Starting,
    /// From its applied metadata: whether the node asked about held data.
    Knows {
        /// A leader saw it hold entries.
        held_data: bool,
    },
    /// From its applied metadata: the node asked about is being replaced
    /// (a learner of every group): it may start with nothing.
    Replacing,
    /// From its applied metadata: the node asked about was removed from
    /// the cluster (`MetaCommand::RemoveNode`): it must not start.
    Removed,
    /// From its applied metadata: the node asked about is being added
    /// (`MetaCommand::AddNode`): it starts with nothing and forms no
    /// group, each group's leader takes it as a learner.
    Joining,
    /// From its applied metadata: the node asked about is no member of
    /// the cluster and is not being added: it must not start (it would
    /// form groups of its own with its peer list).
    NotMember,
}

/// How a node that starts with no metadata state goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejoin {
    /// As a member of a new cluster, or of one that knows it held
    /// nothing, or being replaced: it forms its groups as every member
    /// does.
    Member,
    /// As a node being added: it forms no group, it is taken in.
    Joining,
}

#[derive(Debug, Clone)]
enum View {
    Pristine,
    Starting,
    Running(MetadataStateMachine),
}

/// This node's answers to [`PeerView`] queries, by the stage it is in.
#[derive(Debug)]
pub struct NodeViews {
    view: Mutex<View>,
}

impl NodeViews {
    /// Answers on `router` from now on: [`PeerView::Pristine`] if this
    /// node starts with no metadata state, [`PeerView::Starting`]
    /// otherwise, until [`NodeViews::running`].
    pub fn serve(router: &RaftRouter, pristine: bool) -> Arc<NodeViews> {
        let views = Arc::new(NodeViews {
            view: Mutex::new(if pristine {
                View::Pristine
            } else {
                View::Starting
            }),
        });
        router.register_handler(NODE_GROUP, Arc::clone(&views) as Arc<dyn GroupHandler>);
        views
    }

    /// The node passed its check and is starting its metadata group.
    pub fn starting(&self) {
        *self.lock() = View::Starting;
    }

    /// The metadata group runs: answers come from its applied state.
    pub fn running(&self, state: MetadataStateMachine) {
        *self.lock() = View::Running(state);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn answer(&self, node: NodeId) -> PeerView {
        match &*self.lock() {
            View::Pristine => PeerView::Pristine,
            View::Starting => PeerView::Starting,
            View::Running(state) if state.removed(node) => PeerView::Removed,
            View::Running(state) if state.replacing(node) => PeerView::Replacing,
            View::Running(state) if state.joining(node) => PeerView::Joining,
            View::Running(state) if state.is_member(node) == Some(false) => PeerView::NotMember,
            View::Running(state) => PeerView::Knows {
                held_data: state.held_data(node),
            },
        }
    }
}

impl GroupHandler for NodeViews {
    fn handle<'a>(
        &'a self,
        body: bytes::Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<u8>>> + Send + 'a>>
    {
        Box::pin(async move {
            let node: NodeId = decode(&body)?;
            encode(&self.answer(node))
        })
    }
}

/// Why a node may not start.
#[derive(Debug, thiserror::Error)]
pub enum RejoinError {
    /// Its peers know it held data that its disk no longer has.
    #[error(
        "node {node} starts with no cluster data, but node {told_by} knows it held data: \
         its disk was lost or wiped. Rejoining under the same id could lose acknowledged \
         messages (an empty node votes as if it held nothing). Restore its data directory, \
         or replace it: `dmq cluster replace-node {node}` on a live node, then start it \
         again (docs/replication.md)"
    )]
    DataLost {
        /// This node.
        node: NodeId,
        /// The peer that knew.
        told_by: NodeId,
    },
    /// It is no member of the cluster its peers run.
    #[error(
        "node {node} is no member of the cluster node {told_by} belongs to: add it first, \
         `dmq cluster add-node {node} --raft <its raft address> --client <its client address>` \
         on a live node, then start it (docs/replication.md)"
    )]
    NotMember {
        /// This node.
        node: NodeId,
        /// The peer that knew.
        told_by: NodeId,
    },
    /// It was removed from the cluster.
    #[error(
        "node {node} was removed from the cluster (`dmq cluster remove-node {node}`), as node \
         {told_by} knows: it is no member of any group and must not start again. Take it \
         out of every node's [[cluster.peers]] and delete its data directory"
    )]
    Removed {
        /// This node.
        node: NodeId,
        /// The peer that knew.
        told_by: NodeId,
    },
}

/// How long one peer gets to answer, and the pause between rounds.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
const ROUND_PAUSE: Duration = Duration::from_millis(200);

/// Run by node `node` when it starts with no metadata state, before it
/// starts Raft: asks `peers` (id → Raft address, this node included;
/// connecting from `source` if set)
/// whether it held data. Returns once it may go on (see the module doc),
/// saying how; waits while it cannot tell.
pub async fn check_rejoin(
    node: NodeId,
    peers: &BTreeMap<NodeId, String>,
    source: Option<std::net::IpAddr>,
) -> Result<Rejoin, RejoinError> {
    let others: Vec<(NodeId, &String)> = peers
        .iter()
        .filter(|(id, _)| **id != node)
        .map(|(id, addr)| (*id, addr))
        .collect();
    let cluster = others.len() + 1;
    let question = match encode(&node) {
        Ok(question) => question,
        Err(error) => {
            tracing::error!(%error, "encoding the rejoin question");
            return Ok(Rejoin::Member);
        }
    };
    let mut rounds = 0u64;
    loop {
        let mut pristine = 1;
        for (peer, addr) in &others {
            let answer = ask(addr, source, NODE_GROUP, &question, ASK_TIMEOUT)
                .await
                .and_then(|reply| decode::<PeerView>(&reply));
            match answer {
                Ok(PeerView::Removed) => {
                    return Err(RejoinError::Removed {
                        node,
                        told_by: *peer,
                    })
                }
                Ok(PeerView::Knows { held_data: true }) => {
                    return Err(RejoinError::DataLost {
                        node,
                        told_by: *peer,
                    })
                }
                Ok(PeerView::NotMember) => {
                    return Err(RejoinError::NotMember {
                        node,
                        told_by: *peer,
                    })
                }
                Ok(PeerView::Knows { held_data: false }) | Ok(PeerView::Replacing) => {
                    return Ok(Rejoin::Member)
                }
                Ok(PeerView::Joining) => return Ok(Rejoin::Joining),
                Ok(PeerView::Pristine) => pristine += 1,
                Ok(PeerView::Starting) | Err(_) => {}
            }
        }
        if pristine * 2 > cluster {
            return Ok(Rejoin::Member);
        }
        if rounds % 25 == 0 {
            tracing::warn!(
                node,
                "this node has no cluster data: waiting for a peer to tell whether it held \
                 data before (or for a majority of new nodes)"
            );
        }
        rounds += 1;
        tokio::time::sleep(ROUND_PAUSE).await;
    }
}

/// Run by node `node` when it starts with metadata state, before it
/// starts Raft: asks each of `peers` once (at most [`ASK_TIMEOUT`] each,
/// all at once) whether it was removed from the cluster. A node that was
/// down when it was removed never hears of it from its own log (no group
/// sends it anything any more), so only its peers can tell it. Peers
/// that do not answer are passed over: a node that starts while none of
/// its peers is up is not stopped here.
pub async fn check_not_removed(
    node: NodeId,
    peers: &BTreeMap<NodeId, String>,
    source: Option<std::net::IpAddr>,
) -> Result<(), RejoinError> {
    let Ok(question) = encode(&node) else {
        return Ok(());
    };
    let mut asks = tokio::task::JoinSet::new();
    for (id, addr) in peers.iter().filter(|(id, _)| **id != node) {
        let (id, addr, question) = (*id, addr.clone(), question.clone());
        asks.spawn(async move {
            let answer = ask(&addr, source, NODE_GROUP, &question, ASK_TIMEOUT)
                .await
                .and_then(|reply| decode::<PeerView>(&reply));
            (id, answer)
        });
    }
    while let Some(asked) = asks.join_next().await {
        if let Ok((peer, Ok(PeerView::Removed))) = asked {
            return Err(RejoinError::Removed {
                node,
                told_by: peer,
            });
        }
    }
    Ok(())
}

/// Until the metadata group stops: whenever this node leads it and sees
/// nodes (itself included) hold entries that the group has not recorded,
/// records them.
pub async fn note_held_data(metadata: Arc<MetadataNode>) {
    let me = metadata.id();
    let mut metrics = metadata.raft().metrics();
    loop {
        let holding: Vec<NodeId> = {
            let now = metrics.borrow();
            let mut holding = Vec::new();
            if now.current_leader == Some(me) {
                if now.last_log_index.unwrap_or(0) >= 1 {
                    holding.push(me);
                }
                for (peer, matched) in now.replication.iter().flatten() {
                    if matched.is_some_and(|id| id.index >= 1) {
                        holding.push(*peer);
                    }
                }
            }
            holding
        };
        let state = metadata.state_machine();
        let new: Vec<NodeId> = holding
            .into_iter()
            .filter(|node| !state.held_data(*node))
            .collect();
        if !new.is_empty() {
            if let Err(error) = metadata.write(MetaCommand::HeldData { nodes: new }).await {
                tracing::debug!(%error, "recording the nodes that hold data");
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

    async fn router() -> RaftRouter {
        RaftRouter::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_pristine_node_goes_on_with_a_pristine_majority_or_a_peer_that_never_saw_it() {
        let (one, two) = (router().await, router().await);
        let peers: BTreeMap<NodeId, String> = [
            (1, one.addr().to_string()),
            (2, two.addr().to_string()),
            (3, "127.0.0.1:1".to_string()),
        ]
        .into();
        // Node 3 unreachable, node 2 pristine: with node 1, a majority.
        let _two_views = NodeViews::serve(&two, true);
        check_rejoin(1, &peers, None).await.unwrap();

        // Node 2 runs and has node 1 on record as holding data: refused.
        let dir = tempfile::tempdir().unwrap();
        let mut state = MetadataStateMachine::open(&dir.path().join("s")).unwrap();
        state
            .apply(vec![Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 2), 1),
                payload: EntryPayload::Normal(MetaCommand::HeldData { nodes: vec![1] }),
            }])
            .await
            .unwrap();
        let views = NodeViews::serve(&two, false);
        views.running(state);
        let refused = check_rejoin(1, &peers, None).await.unwrap_err();
        assert!(refused.to_string().contains("node 2 knows it held data"));
        // Node 3, which it never saw hold data, goes on.
        check_rejoin(3, &peers, None).await.unwrap();

        // Node 2 still starting and node 3 unreachable: node 1 waits.
        views.starting();
        let waited =
            tokio::time::timeout(Duration::from_millis(600), check_rejoin(1, &peers, None)).await;
        assert!(waited.is_err(), "went on without knowing: {waited:?}");
        one.shutdown().await;
        two.shutdown().await;
    }

    /// What a running peer answers of a node it does not have as a
    /// member, of one being added, and of one removed.
    #[tokio::test]
    async fn a_running_peer_refuses_a_stranger_and_a_removed_node_and_takes_in_an_added_one() {
        let two = router().await;
        let peers: BTreeMap<NodeId, String> =
            [(2, two.addr().to_string()), (4, "127.0.0.1:1".to_string())].into();
        let dir = tempfile::tempdir().unwrap();
        let mut state = MetadataStateMachine::open(&dir.path().join("s")).unwrap();
        let at = |index| LogId::new(CommittedLeaderId::new(1, 2), index);
        state
            .apply(vec![Entry {
                log_id: at(1),
                payload: EntryPayload::Membership(openraft::Membership::new(
                    vec![[1, 2, 3].into()],
                    None,
                )),
            }])
            .await
            .unwrap();
        let views = NodeViews::serve(&two, false);
        views.running(state.clone());
        let refused = check_rejoin(4, &peers, None).await.unwrap_err();
        assert!(matches!(
            refused,
            RejoinError::NotMember {
                node: 4,
                told_by: 2
            }
        ));
        check_not_removed(4, &peers, None).await.unwrap();

        let command = |index, command| Entry {
            log_id: at(index),
            payload: EntryPayload::Normal(command),
        };
        let add = MetaCommand::AddNode {
            node: 4,
            raft: "127.0.0.1:1".to_string(),
            client: "127.0.0.1:2".to_string(),
        };
        state.apply(vec![command(2, add)]).await.unwrap();
        assert_eq!(
            check_rejoin(4, &peers, None).await.unwrap(),
            Rejoin::Joining
        );
        assert_eq!(check_rejoin(3, &peers, None).await.unwrap(), Rejoin::Member);

        state
            .apply(vec![command(3, MetaCommand::RemoveNode { node: 4 })])
            .await
            .unwrap();
        let refused = check_rejoin(4, &peers, None).await.unwrap_err();
        assert!(matches!(
            refused,
            RejoinError::Removed {
                node: 4,
                told_by: 2
            }
        ));
        let refused = check_not_removed(4, &peers, None).await.unwrap_err();
        assert!(refused.to_string().contains("was removed from the cluster"));
        two.shutdown().await;
    }
}
