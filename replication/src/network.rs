//! Raft RPCs between nodes over TCP.
//!
//! Each node has one Raft port, a [`RaftRouter`], serving every group it
//! hosts (the metadata group, its partitions' replicas). A request frame
//! is a little-endian `u32` length, then the group's name (`u16` length
//! and bytes), then a [`RaftRequest`] in postcard (a compact binary serde
//! encoding). The reply frame is a status byte and, when the group is
//! served, the [`RaftReply`]. One request at a time on a connection. A
//! leader or candidate reaches the same group on its peers through
//! [`TcpNetworkFactory`]: one connection per peer and group, opened on
//! first use and again after any error. Requests that are not Raft's own
//! (a forwarded write, a read index, a membership change) go through the
//! node's `PeerConnections`, connections kept open between requests.
//!
//! Hostile or broken input: a frame longer than [`MAX_FRAME_BYTES`], a
//! group name past the frame's end, or a request that does not decode
//! closes that connection (logged), nothing else; a request for a group
//! not served here is answered "unknown group" and the connection stays.
//! Either way the caller sees an unreachable peer and openraft backs off
//! and retries.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{
    CheckIsLeaderError, ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError,
    RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::responder::OneshotResponder;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft, RaftTypeConfig};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::net::{TcpListener, TcpStream};

use crate::forward_order::{ForwardOrder, ForwardPlace};
use crate::partition::Payload;
use crate::NodeId;

/// The longest frame read from a peer (a snapshot chunk or a batch of
/// entries fits well within it).
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// The groups this transport carries: nodes known by id and address,
/// and writes answered through openraft's one-shot responder.
pub trait GroupTypes:
    RaftTypeConfig<NodeId = NodeId, Node = BasicNode, Responder = OneshotResponder<Self>>
{
    /// Whether the record bytes ([`Payload`]s) of a request this group is
    /// sent may be views of the request's frame instead of copies. Only
    /// for groups that keep no payload after the request is handled: a
    /// view keeps its whole frame (up to 64 MiB) alive.
    const PAYLOADS_VIEW_FRAMES: bool;
}

/// A partition's entries are appended to its log (copied there) and
/// dropped: its requests' record bytes are views of their frame.
impl GroupTypes for crate::partition::PartitionTypes {
    const PAYLOADS_VIEW_FRAMES: bool = true;
}

/// The metadata state keeps journal payloads for as long as their
/// journal lives: they are copied out of their frame.
impl GroupTypes for crate::MetaTypes {
    const PAYLOADS_VIEW_FRAMES: bool = false;
}

/// A Raft RPC, as sent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum RaftRequest<C: GroupTypes> {
    /// Replicate entries (or a heartbeat).
    AppendEntries(AppendEntriesRequest<C>),
    /// Ask for a vote.
    Vote(VoteRequest<NodeId>),
    /// A chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<C>),
    /// A client write a follower forwards to the leader: the group's
    /// application data (`C::D`) in postcard. A [`Payload`], not a
    /// `Vec<u8>`: serde writes and reads a `Vec<u8>` one element at a time
    /// (the same bytes on the wire in postcard, at several times the CPU
    /// for a forwarded batch of records).
    Forward(Payload),
    /// Makes these nodes the group's voters (a voter left out stays as a
    /// learner), asked of the leader: answered like [`RaftRequest::Forward`]
    /// with an empty response once the change is committed.
    ChangeVoters(std::collections::BTreeSet<NodeId>),
    /// Forgets member `node` (voter or learner) and takes it back as a
    /// learner at Raft address `addr`, asked of the leader: see
    /// `readmit`. Answered like [`RaftRequest::ChangeVoters`].
    Readmit {
        /// The member whose disk was lost.
        node: NodeId,
        /// Its Raft address.
        addr: String,
    },
    /// The group's read index, asked of the leader: once it confirmed with
    /// a quorum that it still leads, the index of the last entry it knows
    /// committed (at least its own term's first), answered like
    /// [`RaftRequest::Forward`] with the index (`Option<u64>`) in postcard.
    ReadIndex,
    /// Takes member `node` (voter or learner) out of the group for good,
    /// asked of the leader: see `remove_member`. Answered like
    /// [`RaftRequest::ChangeVoters`].
    RemoveMember {
        /// The member leaving.
        node: NodeId,
    },
    /// Stop calling elections (still voting) for `for_ms`, then call them
    /// again as usual; 0 calls them again now. Asked of a member by a
    /// leader that hands over (`crate::transfer`); answered like
    /// [`RaftRequest::ChangeVoters`].
    HoldElections {
        /// How long, in milliseconds.
        for_ms: u64,
    },
    /// Call an election now. Asked of the member a leader hands over to;
    /// answered like [`RaftRequest::ChangeVoters`] once called.
    Elect,
    /// Hand the leadership to voter `to`, asked of the leader
    /// (`crate::transfer`); answered like [`RaftRequest::ChangeVoters`]
    /// once `to` leads.
    TransferLeader {
        /// The voter to lead next.
        to: NodeId,
    },
    /// [`RaftRequest::Forward`] with its place in the sender's stream of
    /// writes: the leader submits a stream's forwards in their order
    /// (`crate::forward_order`). Answered like [`RaftRequest::Forward`].
    /// (Last, so that the variants before keep their tags.)
    ForwardInOrder {
        /// The sending replica's stream.
        stream: u64,
        /// This write's number in it.
        seq: u64,
        /// Every smaller number below this is answered on the sender.
        floor: u64,
        /// As in [`RaftRequest::Forward`].
        data: Payload,
    },
}

/// The answer to a [`RaftRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    /// To AppendEntries.
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To Vote.
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To InstallSnapshot.
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// To Forward: the group's response (`C::R`) in postcard once the
    /// write is committed and applied on the leader, or why not.
    Forwarded(Result<Vec<u8>, ForwardRefusal>),
}

/// Why a forwarded write was not applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardRefusal {
    /// The node asked is not the leader (nothing was proposed); the leader
    /// it knows of.
    NotLeader {
        /// The leader's id, if known.
        leader: Option<NodeId>,
        /// The leader's Raft address, if known.
        addr: Option<String>,
    },
    /// The leader proposed it but could not answer (Raft stopped, or
    /// leadership was lost before the commit): it may or may not be
    /// committed.
    Failed(String),
}

/// Why [`forward`] has no answer.
#[derive(Debug)]
pub(crate) enum ForwardError {
    /// The leader refused or failed, as it said.
    Refused(ForwardRefusal),
    /// Nothing reached the leader (no connection): safe to try again.
    NotSent(io::Error),
    /// The request may have reached the leader but no answer came back:
    /// the write may or may not be committed.
    Lost(io::Error),
}

/// Sends `data`, a write of group `group`, to the node at `addr` (its
/// leader, as far as the caller knows) through `peers`, at `place` in this
/// node's stream of writes, and waits at most `ttl` for the answer.
pub(crate) async fn forward<C: GroupTypes>(
    peers: &PeerConnections,
    addr: &str,
    group: &str,
    data: &C::D,
    place: ForwardPlace,
    ttl: Duration,
) -> Result<C::R, ForwardError> {
    let request = encode(&RaftRequest::<C>::ForwardInOrder {
        stream: place.stream,
        seq: place.seq,
        floor: place.floor,
        data: Payload(encode(data).map_err(ForwardError::NotSent)?.into()),
    })
    .map_err(ForwardError::NotSent)?;
    let response = ask_leader(peers, addr, group, &request, ttl).await?;
    decode(&response).map_err(ForwardError::Lost)
}

/// Sends `request` (one the leader answers with an empty
/// [`RaftReply::Forwarded`] once done) to the node at `addr` (the group's
/// leader, as far as the caller knows) and waits at most `ttl`.
pub(crate) async fn ask_leader_to<C: GroupTypes>(
    peers: &PeerConnections,
    addr: &str,
    group: &str,
    request: &RaftRequest<C>,
    ttl: Duration,
) -> Result<(), ForwardError> {
    let request = encode(request).map_err(ForwardError::NotSent)?;
    ask_leader(peers, addr, group, &request, ttl)
        .await
        .map(|_| ())
}

/// Asks the node at `addr` (the group's leader, as far as the caller
/// knows) to make `voters` the voters of group `group` (of types `C`),
/// within `ttl`.
pub(crate) async fn change_voters_at<C: GroupTypes>(
    peers: &PeerConnections,
    addr: &str,
    group: &str,
    voters: std::collections::BTreeSet<NodeId>,
    ttl: Duration,
) -> Result<(), ForwardError> {
    let request = RaftRequest::<C>::ChangeVoters(voters);
    ask_leader_to(peers, addr, group, &request, ttl).await
}

/// Asks the node at `addr` (the group's leader, as far as the caller
/// knows) to [`readmit`] member `node` (Raft address `node_addr`) to
/// group `group`, within `ttl`.
pub(crate) async fn readmit_at<C: GroupTypes>(
    peers: &PeerConnections,
    addr: &str,
    group: &str,
    node: NodeId,
    node_addr: &str,
    ttl: Duration,
) -> Result<(), ForwardError> {
    let request = RaftRequest::<C>::Readmit {
        node,
        addr: node_addr.to_string(),
    };
    ask_leader_to(peers, addr, group, &request, ttl).await
}

/// Asks the node at `addr` (the group's leader, as far as the caller
/// knows) for group `group`'s read index ([`RaftRequest::ReadIndex`]),
/// within `ttl`.
pub(crate) async fn read_index_at<C: GroupTypes>(
    peers: &PeerConnections,
    addr: &str,
    group: &str,
    ttl: Duration,
) -> Result<Option<u64>, ForwardError> {
    let request = encode(&RaftRequest::<C>::ReadIndex).map_err(ForwardError::NotSent)?;
    let response = ask_leader(peers, addr, group, &request, ttl).await?;
    decode(&response).map_err(ForwardError::Lost)
}

/// At the leader: removes member `node` from the group (a voter first
/// leaves the voters through a joint configuration), then adds it back as
/// a learner at `addr`.
///
/// For a member whose disk was lost. Kept as a learner, the leader would
/// keep the replication progress it had before the loss and take the
/// member's empty log for a follower log going back, which openraft
/// refuses (it panics the leader's Raft core in builds with debug
/// assertions and leaves the stream stuck otherwise). Removed and added
/// again, its progress starts empty and the leader finds where its log
/// ends. Taking it again after it was readmitted starts its progress over
/// once more and loses nothing: a learner counts for no quorum.
pub(crate) async fn readmit<C: GroupTypes>(
    raft: &Raft<C>,
    node: NodeId,
    addr: &str,
) -> Result<(), RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> {
    let membership = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    let removal = if membership.voter_ids().any(|id| id == node) {
        Some(openraft::ChangeMembers::RemoveVoters([node].into()))
    } else if membership.learner_ids().any(|id| id == node) {
        Some(openraft::ChangeMembers::RemoveNodes([node].into()))
    } else {
        None
    };
    if let Some(removal) = removal {
        raft.change_membership(removal, false).await?;
    }
    raft.add_learner(
        node,
        BasicNode {
            addr: addr.to_string(),
        },
        false,
    )
    .await
    .map(|_| ())
}

/// Asks the node at `addr` (the group's leader, as far as the caller
/// knows) to [`remove_member`] `node` from group `group`, within `ttl`.
pub(crate) async fn remove_member_at<C: GroupTypes>(
    peers: &PeerConnections,
    addr: &str,
    group: &str,
    node: NodeId,
    ttl: Duration,
) -> Result<(), ForwardError> {
    let request = RaftRequest::<C>::RemoveMember { node };
    ask_leader_to(peers, addr, group, &request, ttl).await
}

/// At the leader: takes member `node` out of the group for good. A voter
/// first leaves the voters through a joint configuration (so the new
/// voters commit the change by their own quorum too), then is dropped as
/// a learner; a learner is dropped. Nothing to do for a node that is not
/// a member, so it may be asked again after a failure.
pub(crate) async fn remove_member<C: GroupTypes>(
    raft: &Raft<C>,
    node: NodeId,
) -> Result<(), RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> {
    let membership = || {
        raft.metrics()
            .borrow()
            .membership_config
            .membership()
            .clone()
    };
    if membership().voter_ids().any(|id| id == node) {
        raft.change_membership(openraft::ChangeMembers::RemoveVoters([node].into()), false)
            .await?;
    }
    if membership().learner_ids().any(|id| id == node) {
        raft.change_membership(openraft::ChangeMembers::RemoveNodes([node].into()), false)
            .await?;
    }
    Ok(())
}

/// Asks the node at `addr` (the group's leader, as far as the caller
/// knows) to hand its leadership to `to`, within `ttl`.
pub(crate) async fn transfer_leader_at<C: GroupTypes>(
    peers: &PeerConnections,
    addr: &str,
    group: &str,
    to: NodeId,
    ttl: Duration,
) -> Result<(), ForwardError> {
    let request = RaftRequest::<C>::TransferLeader { to };
    ask_leader_to(peers, addr, group, &request, ttl).await
}

/// Sends `request` (a [`RaftRequest`] the leader answers with
/// [`RaftReply::Forwarded`]) on a connection of `peers` and returns the
/// answer's bytes. The connection goes back to `peers` once its answer
/// (or "unknown group") is read whole, and is dropped on any error or
/// timeout, so a late answer is never read as the next request's.
pub(crate) async fn ask_leader(
    peers: &PeerConnections,
    addr: &str,
    group: &str,
    request: &[u8],
    ttl: Duration,
) -> Result<Vec<u8>, ForwardError> {
    let group_length = u16::try_from(group.len())
        .map_err(|_| ForwardError::NotSent(invalid("group name too long")))?;
    let mut stream = match peers.take(addr) {
        Some(stream) => stream,
        None => match tokio::time::timeout(ttl, connect(addr, peers.source)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                stream
            }
            Ok(Err(error)) => return Err(ForwardError::NotSent(error)),
            Err(_) => {
                return Err(ForwardError::NotSent(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connecting to the leader timed out",
                )))
            }
        },
    };
    let exchange = async {
        write_frame(
            &mut stream,
            &[&group_length.to_le_bytes(), group.as_bytes(), request],
        )
        .await?;
        decode_reply(&read_frame(&mut stream).await?)
    };
    // Each outcome, and whether its answer was read whole (the connection
    // then serves the next request).
    let (outcome, whole) = match tokio::time::timeout(ttl, exchange).await {
        Ok(Ok(RaftReply::Forwarded(Ok(response)))) => (Ok(response), true),
        Ok(Ok(RaftReply::Forwarded(Err(refusal)))) => (Err(ForwardError::Refused(refusal)), true),
        // An unknown group proposes nothing.
        Ok(Err(error)) if error.kind() == io::ErrorKind::NotFound => {
            (Err(ForwardError::NotSent(error)), true)
        }
        Ok(Ok(_)) => (
            Err(ForwardError::Lost(invalid("reply of another kind"))),
            false,
        ),
        Ok(Err(error)) => (Err(ForwardError::Lost(error)), false),
        Err(_) => (
            Err(ForwardError::Lost(io::Error::new(
                io::ErrorKind::TimedOut,
                "the leader did not answer in time",
            ))),
            false,
        ),
    };
    if whole {
        peers.give_back(addr, stream);
    }
    outcome
}

/// Idle connections kept per peer address, at most: as many as writes
/// this node forwards to one leader at once, in a steady stream.
const IDLE_CONNECTIONS_PER_PEER: usize = 64;

/// How a node sends other nodes' Raft ports the requests that are not
/// Raft's own (forwarded writes, read indexes, membership changes, the
/// steps of a leadership transfer): from its source address, on
/// connections kept open between requests, one request at a time on
/// each. Clones share the connections.
///
/// A connection per request cost a connect, an accept and a task for
/// every forwarded produce, and left a socket in TIME_WAIT for a minute
/// after each: Linux reuses those on loopback only, so a follower
/// forwarding more than about 470 writes a second to a leader on another
/// host would run out of ephemeral ports (28,232 by default).
///
/// A connection is taken back only after its whole answer was read, and
/// is checked before it is reused: one the peer closed meanwhile (it
/// stopped or restarted) is dropped and another opened, so a request is
/// not sent on a connection known dead. One closed after the check is a
/// lost answer, as when the peer dies during a request on a new
/// connection.
#[derive(Clone, Default)]
pub(crate) struct PeerConnections {
    /// Where connections leave from (none: the address the OS picks).
    source: Option<std::net::IpAddr>,
    /// Connections not in use, by the peer address they were opened to.
    idle: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<TcpStream>>>>,
}

impl std::fmt::Debug for PeerConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConnections")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl PeerConnections {
    /// No connection yet; those opened leave from `source`.
    pub(crate) fn new(source: Option<std::net::IpAddr>) -> PeerConnections {
        PeerConnections {
            source,
            idle: Arc::default(),
        }
    }

    /// An idle connection to `addr` still open, if there is one.
    fn take(&self, addr: &str) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let streams = idle.get_mut(addr)?;
        while let Some(stream) = streams.pop() {
            if still_open(&stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Keeps `stream`, its last answer read whole, for the next request
    /// to `addr` (or closes it if enough are kept).
    fn give_back(&self, addr: &str, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let streams = idle.entry(addr.to_string()).or_default();
        if streams.len() < IDLE_CONNECTIONS_PER_PEER {
            streams.push(stream);
        }
    }

    /// Idle connections kept to `addr`.
    #[cfg(test)]
    fn idle(&self, addr: &str) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.get(addr).map_or(0, Vec::len)
    }
}

/// Whether an idle connection is still open: nothing to read yet. The
/// peer's close (or reset) or bytes nobody asked for make it unusable.
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(error) if error.kind() == io::ErrorKind::WouldBlock)
}

/// Sends `body` to group `group` on the Raft port at `addr` on a
/// connection of its own and returns the reply's body, within `ttl`; a
/// group the port does not serve is an error of kind `NotFound`.
pub(crate) async fn ask(
    addr: &str,
    source: Option<std::net::IpAddr>,
    group: &str,
    body: &[u8],
    ttl: Duration,
) -> io::Result<Vec<u8>> {
    let group_length = u16::try_from(group.len()).map_err(|_| invalid("group name too long"))?;
    let exchange = async {
        let mut stream = connect(addr, source).await?;
        let _ = stream.set_nodelay(true);
        write_frame(
            &mut stream,
            &[&group_length.to_le_bytes(), group.as_bytes(), body],
        )
        .await?;
        let reply = read_frame(&mut stream).await?;
        match reply.split_first() {
            Some((&REPLY_OK, body)) => Ok(body.to_vec()),
            Some((&REPLY_UNKNOWN_GROUP, _)) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the peer does not serve this group",
            )),
            _ => Err(invalid("reply of an unknown kind")),
        }
    };
    tokio::time::timeout(ttl, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))?
}

/// Connects to `addr` from `source` (none: the address the OS picks).
pub(crate) async fn connect(addr: &str, source: Option<std::net::IpAddr>) -> io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(addr).await;
    };
    let mut last = None;
    for target in tokio::net::lookup_host(addr).await? {
        let socket = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(std::net::SocketAddr::new(source, 0))?;
        match socket.connect(target).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// A frame of a body over this many bytes is written part by part (a
/// copy saved); a smaller one is gathered into one write (one segment).
const GATHER_MAX_BYTES: usize = 64 * 1024;

async fn write_frame(stream: &mut TcpStream, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let length = u32::try_from(len)
        .ok()
        .filter(|&length| length as usize <= MAX_FRAME_BYTES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too long"))?;
    if len > GATHER_MAX_BYTES {
        stream.write_all(&length.to_le_bytes()).await?;
        for part in parts {
            stream.write_all(part).await?;
        }
        return Ok(());
    }
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&length.to_le_bytes());
    for part in parts {
        frame.extend_from_slice(part);
    }
    stream.write_all(&frame).await
}

async fn read_frame(stream: &mut TcpStream) -> io::Result<Bytes> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).await?;
    let length = u32::from_le_bytes(length) as usize;
    if length > MAX_FRAME_BYTES {
        return Err(invalid(format!(
            "frame of {length} bytes over the limit of {MAX_FRAME_BYTES}"
        )));
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    Ok(Bytes::from(body))
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// `value` in postcard, in a buffer allocated once at its exact size: a
/// batch of records grown into a buffer from empty was copied about twice
/// more (3 % of a three-node cluster's CPU in reallocations).
pub(crate) fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let size = postcard::experimental::serialized_size(value).map_err(io::Error::other)?;
    postcard::serialize_with_flavor(value, ExactVec(Vec::with_capacity(size)))
        .map_err(io::Error::other)
}

/// A postcard output that appends to a vector (postcard's own `AllocVec`
/// cannot start from one with room).
struct ExactVec(Vec<u8>);

impl postcard::ser_flavors::Flavor for ExactVec {
    type Output = Vec<u8>;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| invalid(e.to_string()))
}

/// A request to a group of types `C`: its payloads viewing `bytes` if
/// the group allows it ([`GroupTypes::PAYLOADS_VIEW_FRAMES`]), copied
/// otherwise.
fn decode_request<C: GroupTypes, T: for<'de> Deserialize<'de>>(bytes: &Bytes) -> io::Result<T> {
    if C::PAYLOADS_VIEW_FRAMES {
        crate::partition::with_payloads_viewing(bytes, || decode(bytes))
    } else {
        decode(bytes)
    }
}

/// A reply frame as its [`RaftReply`]; "unknown group" is an error of
/// kind `NotFound` (nothing was done).
fn decode_reply(reply: &[u8]) -> io::Result<RaftReply> {
    match reply.split_first() {
        Some((&REPLY_OK, body)) => decode::<RaftReply>(body),
        Some((&REPLY_UNKNOWN_GROUP, _)) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the peer does not serve this group",
        )),
        _ => Err(invalid("reply of an unknown kind")),
    }
}

/// A reply frame's first byte.
const REPLY_OK: u8 = 0;
/// The group named is not served here (not started yet, or stopped).
const REPLY_UNKNOWN_GROUP: u8 = 1;

/// One group's side of a node's Raft port: decodes a request of its
/// type, runs it, encodes the reply.
pub(crate) trait GroupHandler: Send + Sync {
    fn handle<'a>(
        &'a self,
        body: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Vec<u8>>> + Send + 'a>>;
}

/// A group as its node's Raft port serves it: its Raft, and the gate
/// that holds its writes while its leader hands over.
pub(crate) struct GroupService<C: GroupTypes> {
    /// The group's Raft.
    pub(crate) raft: Raft<C>,
    /// Held while this node, leading, hands over (`crate::transfer`).
    pub(crate) gate: Arc<crate::transfer::WriteGate>,
    /// The group's name.
    pub(crate) group: String,
    /// This node's connections for requests to its peers' ports.
    pub(crate) peers: PeerConnections,
    /// The order of the streams of writes forwarded here.
    pub(crate) order: ForwardOrder,
}

impl<C: GroupTypes> GroupService<C> {
    /// Proposes a forwarded write once its place's turn came (`place`:
    /// none for a forward that has no place, from an earlier build), and
    /// answers once it is committed and applied.
    async fn forwarded(
        &self,
        data: &Payload,
        place: Option<ForwardPlace>,
    ) -> io::Result<RaftReply> {
        let data: C::D = decode_request::<C, _>(&data.0)?;
        let mut arrival = None;
        if let Some(place) = place {
            let arrived = self.order.wait_turn(place).await;
            if !arrived.in_turn() {
                tracing::debug!(group = %self.group, ?place, "a forward went without an earlier one");
            }
            arrival = Some(arrived);
        }
        self.gate.pass().await;
        let proposed = self.raft.client_write_ff(data).await;
        if let Some(arrival) = arrival {
            arrival.submitted();
        }
        let written = match proposed {
            Ok(answer) => match answer.await {
                Ok(written) => written.map_err(RaftError::APIError),
                Err(_) => {
                    return Ok(RaftReply::Forwarded(Err(ForwardRefusal::Failed(
                        "the Raft core stopped".to_string(),
                    ))))
                }
            },
            Err(fatal) => Err(RaftError::Fatal(fatal)),
        };
        Ok(RaftReply::Forwarded(match written {
            Ok(written) => Ok(encode(&written.data)?),
            Err(error) => Err(refusal(error)),
        }))
    }
}

impl<C: GroupTypes> GroupHandler for GroupService<C> {
    fn handle<'a>(
        &'a self,
        body: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Vec<u8>>> + Send + 'a>> {
        Box::pin(async move {
            let raft = &self.raft;
            let reply = match decode_request::<C, RaftRequest<C>>(&body)? {
                RaftRequest::AppendEntries(rpc) => {
                    RaftReply::AppendEntries(raft.append_entries(rpc).await)
                }
                RaftRequest::Vote(rpc) => RaftReply::Vote(raft.vote(rpc).await),
                RaftRequest::InstallSnapshot(rpc) => {
                    RaftReply::InstallSnapshot(raft.install_snapshot(rpc).await)
                }
                RaftRequest::Forward(data) => self.forwarded(&data, None).await?,
                RaftRequest::ForwardInOrder {
                    stream,
                    seq,
                    floor,
                    data,
                } => {
                    let place = ForwardPlace { stream, seq, floor };
                    self.forwarded(&data, Some(place)).await?
                }
                RaftRequest::ChangeVoters(voters) => {
                    let changed = raft.change_membership(voters, true).await;
                    RaftReply::Forwarded(changed.map(|_| Vec::new()).map_err(refusal))
                }
                RaftRequest::Readmit { node, addr } => {
                    let readmitted = readmit(raft, node, &addr).await;
                    RaftReply::Forwarded(readmitted.map(|_| Vec::new()).map_err(refusal))
                }
                RaftRequest::RemoveMember { node } => {
                    let removed = remove_member(raft, node).await;
                    RaftReply::Forwarded(removed.map(|_| Vec::new()).map_err(refusal))
                }
                RaftRequest::HoldElections { for_ms } => {
                    let hold = Duration::from_millis(for_ms);
                    crate::transfer::hold_elections(raft, &self.gate, hold);
                    RaftReply::Forwarded(Ok(Vec::new()))
                }
                RaftRequest::Elect => RaftReply::Forwarded(
                    raft.trigger()
                        .elect()
                        .await
                        .map(|_| Vec::new())
                        .map_err(|fatal| ForwardRefusal::Failed(fatal.to_string())),
                ),
                RaftRequest::TransferLeader { to } => {
                    use crate::transfer::{transfer_leader, TransferError};
                    let transferred =
                        transfer_leader(raft, &self.gate, &self.group, &self.peers, to).await;
                    RaftReply::Forwarded(match transferred {
                        Ok(()) => Ok(Vec::new()),
                        Err(TransferError::NotLeader { leader, addr }) => {
                            Err(ForwardRefusal::NotLeader { leader, addr })
                        }
                        Err(error) => Err(ForwardRefusal::Failed(error.to_string())),
                    })
                }
                RaftRequest::ReadIndex => {
                    RaftReply::Forwarded(match raft.get_read_log_id().await {
                        Ok((read, _applied)) => Ok(encode(&read.map(|id| id.index))?),
                        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(to))) => {
                            Err(ForwardRefusal::NotLeader {
                                leader: to.leader_id,
                                addr: to.leader_node.map(|node| node.addr),
                            })
                        }
                        Err(error) => Err(ForwardRefusal::Failed(error.to_string())),
                    })
                }
            };
            encode(&reply)
        })
    }
}

/// How the leader's refusal of a forwarded write or membership change
/// is told to the node that forwarded it.
fn refusal(error: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ForwardRefusal {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(to)) => ForwardRefusal::NotLeader {
            leader: to.leader_id,
            addr: to.leader_node.map(|node| node.addr),
        },
        error => ForwardRefusal::Failed(error.to_string()),
    }
}

type Groups = std::sync::RwLock<std::collections::HashMap<String, Arc<dyn GroupHandler>>>;

/// A node's Raft port: one TCP address for every group the node hosts
/// (the metadata group and its partitions' replicas). A request frame
/// names its group (`u16` length, the name's bytes, then the request);
/// a request for a group not served here is answered "unknown group"
/// and the caller backs off as from an unreachable peer.
///
/// Clones share the port. Dropping the last clone does not stop it:
/// [`RaftRouter::shutdown`] does, closing every connection.
#[derive(Clone)]
pub struct RaftRouter {
    addr: std::net::SocketAddr,
    /// This node's connections for requests to its peers' ports, from
    /// the source address set (none: the OS picks).
    peers: PeerConnections,
    groups: Arc<Groups>,
    server: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// Requests being handled, and whether new ones are still taken.
    requests: Arc<Requests>,
}

/// The port's requests in progress, its closing flag, and when a peer
/// last came other than as Raft: a connection accepted, or, once
/// closing, a request refused that was not Raft's own.
#[derive(Default)]
struct Requests {
    closing: std::sync::atomic::AtomicBool,
    in_flight: std::sync::atomic::AtomicUsize,
    last_came: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Requests {
    fn came(&self) {
        *self.last_came.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(tokio::time::Instant::now());
    }

    fn last_came(&self) -> Option<tokio::time::Instant> {
        *self.last_came.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a request's body is one of Raft's own (AppendEntries, Vote,
/// InstallSnapshot: postcard writes an enum's variant index first, as a
/// varint, and these are [`RaftRequest`]'s first three). A leader keeps
/// sending them to a member that stopped; they say nothing of whether
/// its peers still take it for the leader.
fn is_raft_traffic(body: &[u8]) -> bool {
    matches!(body.first(), Some(0..=2))
}

impl std::fmt::Debug for RaftRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftRouter")
            .field("addr", &self.addr)
            .finish()
    }
}

impl RaftRouter {
    /// Binds `listen` and starts serving it.
    pub async fn bind(listen: std::net::SocketAddr) -> io::Result<RaftRouter> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let groups: Arc<Groups> = Arc::default();
        let requests: Arc<Requests> = Arc::default();
        let server = tokio::spawn(serve(listener, Arc::clone(&groups), Arc::clone(&requests)));
        Ok(RaftRouter {
            addr,
            peers: PeerConnections::default(),
            groups,
            server: Arc::new(std::sync::Mutex::new(Some(server))),
            requests,
        })
    }

    /// The address peers reach this node's groups on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Makes this node's Raft connections (replication, votes, forwarded
    /// writes) leave from `source` (`[cluster] raft_source_ip`): on a host
    /// with several addresses, the one its peers expect (and on one
    /// machine, a loopback address per node, so a test can tell nodes
    /// apart by where a connection comes from).
    pub fn with_source(mut self, source: Option<std::net::IpAddr>) -> RaftRouter {
        self.peers = PeerConnections::new(source);
        self
    }

    /// The address this node's Raft connections leave from, if set.
    pub fn source(&self) -> Option<std::net::IpAddr> {
        self.peers.source
    }

    /// This node's connections for requests to its peers' ports.
    pub(crate) fn peers(&self) -> &PeerConnections {
        &self.peers
    }

    /// Serves `raft` as group `group` from now on, its forwarded writes
    /// through `gate`.
    pub(crate) fn register<C: GroupTypes>(
        &self,
        group: &str,
        raft: Raft<C>,
        gate: Arc<crate::transfer::WriteGate>,
    ) {
        let service = GroupService {
            raft,
            gate,
            group: group.to_string(),
            peers: self.peers.clone(),
            order: ForwardOrder::default(),
        };
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group.to_string(), Arc::new(service));
    }

    /// Serves `handler` as group `group` from now on (a service of the
    /// port that is not a Raft group, such as `crate::rejoin`'s).
    pub(crate) fn register_handler(&self, group: &str, handler: Arc<dyn GroupHandler>) {
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group.to_string(), handler);
    }

    /// Stops serving group `group` (and its record service,
    /// `crate::repair`).
    pub(crate) fn unregister(&self, group: &str) {
        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
        groups.remove(group);
        groups.remove(&crate::repair::records_service(group));
    }

    /// Names of the groups served.
    pub fn groups(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Takes no new request (each is answered "unknown group", which a
    /// peer treats as unreachable and a forwarding node retries
    /// elsewhere), then waits up to `within` for those in progress: a
    /// node that stops lets the writes forwarded to it finish instead of
    /// failing them with its Raft.
    pub async fn close_and_drain(&self, within: Duration) {
        use std::sync::atomic::Ordering;
        self.requests.closing.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + within;
        while self.requests.in_flight.load(Ordering::SeqCst) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Keeps the closed port answering every request "unknown group"
    /// until no peer came for `quiet` (at most `within`), then stops it
    /// ([`RaftRouter::shutdown`]). A node whose groups have stopped calls
    /// it with `quiet` an election timeout: its peers take it for the
    /// leader of the groups it led until they elect another, and send it
    /// the writes they forward meanwhile (each refused, on a connection
    /// kept or a new one). Once none comes, they know the new leader.
    /// Stopping sooner would reset the connection of a write forwarded
    /// after its request was sent, and the forwarding node could not tell
    /// whether it was taken (its outcome is unknown: a producer without
    /// idempotence gets an error); answered "unknown group", it surely was
    /// not, and is tried again at the next leader. Raft's own requests
    /// (a leader's heartbeats to a member that stopped) do not count.
    pub async fn linger_then_shutdown(&self, quiet: Duration, within: Duration) {
        self.requests
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let start = tokio::time::Instant::now();
        let deadline = start + within;
        loop {
            let since = self.requests.last_came().map_or(start, |at| at.max(start));
            let now = tokio::time::Instant::now();
            if now >= deadline || now.duration_since(since) >= quiet {
                break;
            }
            tokio::time::sleep((since + quiet).min(deadline) - now).await;
        }
        self.shutdown().await;
    }

    /// Stops the port and closes every connection it accepted.
    pub async fn shutdown(&self) {
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(server) = server {
            server.abort();
            let _ = server.await;
        }
    }
}

/// Serves Raft RPCs from peers on `listener` until the task is dropped;
/// dropping it also closes every connection it accepted.
async fn serve(listener: TcpListener, groups: Arc<Groups>, requests: Arc<Requests>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                requests.came();
                accepted
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a Raft connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        connections.spawn(serve_connection(
            stream,
            peer,
            Arc::clone(&groups),
            Arc::clone(&requests),
        ));
    }
}

/// Splits a request frame into its group's name and the request.
fn split_group(frame: &[u8]) -> io::Result<(&str, &[u8])> {
    let (length, rest) = frame
        .split_first_chunk::<2>()
        .ok_or_else(|| invalid("frame shorter than its group name's length"))?;
    let length = u16::from_le_bytes(*length) as usize;
    if rest.len() < length {
        return Err(invalid("group name past the end of the frame"));
    }
    let (name, body) = rest.split_at(length);
    let name = std::str::from_utf8(name).map_err(|_| invalid("group name is not UTF-8"))?;
    Ok((name, body))
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    groups: Arc<Groups>,
    requests: Arc<Requests>,
) {
    use std::sync::atomic::Ordering;
    let _ = stream.set_nodelay(true);
    loop {
        let answered = async {
            let frame = read_frame(&mut stream).await?;
            let (group, body) = split_group(&frame)?;
            let body = frame.slice_ref(body);
            requests.in_flight.fetch_add(1, Ordering::SeqCst);
            let handler = if requests.closing.load(Ordering::SeqCst) {
                None
            } else {
                groups
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(group)
                    .cloned()
            };
            let handled = match handler {
                Some(handler) => handler.handle(body).await.map(Some),
                None => {
                    if !is_raft_traffic(&body) {
                        requests.came();
                    }
                    Ok(None)
                }
            };
            requests.in_flight.fetch_sub(1, Ordering::SeqCst);
            match handled? {
                Some(reply) => write_frame(&mut stream, &[&[REPLY_OK], &reply]).await,
                None => write_frame(&mut stream, &[&[REPLY_UNKNOWN_GROUP]]).await,
            }
        }
        .await;
        if let Err(error) = answered {
            if error.kind() != io::ErrorKind::UnexpectedEof {
                tracing::warn!(%peer, %error, "bad Raft frame; connection closed");
            }
            return;
        }
    }
}

/// The entries one AppendEntries carries at most, in encoded bytes (at
/// least one entry goes, whatever its size). openraft gives an
/// AppendEntries one heartbeat interval to be answered; a follower far
/// behind is sent its backlog in pieces that fit, instead of one frame
/// that never does (and is sent again, forever).
pub const APPEND_BYTES_MAX: usize = 2 << 20;

/// `rpc` cut to its longest prefix of entries within `budget` encoded
/// bytes (at least one entry), and the log id of the last entry kept if
/// any were cut (`None`: the whole request goes). The leader's commit
/// index sent is at most the last entry sent.
fn bounded_append<C: GroupTypes>(
    mut rpc: AppendEntriesRequest<C>,
    budget: usize,
) -> (AppendEntriesRequest<C>, Option<openraft::LogId<NodeId>>) {
    use openraft::RaftLogId;
    let mut used = 0usize;
    let mut keep = 0usize;
    for entry in &rpc.entries {
        let size = postcard::experimental::serialized_size(entry).unwrap_or(usize::MAX);
        if keep > 0 && used.saturating_add(size) > budget {
            break;
        }
        used = used.saturating_add(size);
        keep += 1;
    }
    if keep >= rpc.entries.len() {
        return (rpc, None);
    }
    rpc.entries.truncate(keep);
    let last = rpc.entries.last().map(|entry| *entry.get_log_id());
    if let (Some(last), Some(commit)) = (last, rpc.leader_commit) {
        if commit.index > last.index {
            rpc.leader_commit = Some(last);
        }
    }
    (rpc, last)
}

/// Opens [`TcpNetwork`]s to the same group on peers.
#[derive(Debug)]
pub struct TcpNetworkFactory<C> {
    /// This node's id (named in timeout errors).
    node_id: NodeId,
    /// The group's name on every node's Raft port.
    group: String,
    /// The address connections leave from (none: the OS picks).
    source: Option<std::net::IpAddr>,
    _group: std::marker::PhantomData<fn() -> C>,
}

impl<C> TcpNetworkFactory<C> {
    /// The factory of node `node_id` for group `group`, connecting from
    /// `source` (none: the address the OS picks).
    pub fn new(node_id: NodeId, group: &str, source: Option<std::net::IpAddr>) -> Self {
        TcpNetworkFactory {
            node_id,
            group: group.to_string(),
            source,
            _group: std::marker::PhantomData,
        }
    }
}

impl<C: GroupTypes> RaftNetworkFactory<C> for TcpNetworkFactory<C> {
    type Network = TcpNetwork<C>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> TcpNetwork<C> {
        let mut prefix = Vec::with_capacity(2 + self.group.len());
        prefix.extend_from_slice(&(self.group.len() as u16).to_le_bytes());
        prefix.extend_from_slice(self.group.as_bytes());
        TcpNetwork {
            node_id: self.node_id,
            target,
            addr: node.addr.clone(),
            source: self.source,
            group_prefix: prefix,
            stream: None,
            exchange_open: false,
            _group: std::marker::PhantomData,
        }
    }
}

/// The connection to one peer.
#[derive(Debug)]
pub struct TcpNetwork<C> {
    node_id: NodeId,
    target: NodeId,
    addr: String,
    source: Option<std::net::IpAddr>,
    /// The group's name, as each request frame starts.
    group_prefix: Vec<u8>,
    stream: Option<TcpStream>,
    /// A request went out on `stream` and its answer was not read.
    exchange_open: bool,
    _group: std::marker::PhantomData<fn() -> C>,
}

/// Why a call failed before an answer came.
enum CallError {
    Io(io::Error),
    Timeout,
}

impl<C: GroupTypes> TcpNetwork<C> {
    async fn call(
        &mut self,
        request: &RaftRequest<C>,
        ttl: Duration,
    ) -> Result<RaftReply, CallError> {
        // A call dropped midway (openraft wraps every RPC in a timeout of
        // its own) left its request, or part of it, on the connection and
        // its answer to come: a connection is used again only after an
        // exchange that finished. Otherwise the next call would read the
        // dropped one's answer as its own (a stale AppendEntries success
        // made a leader count an entry its follower never had).
        if self.exchange_open {
            self.stream = None;
        }
        let exchange = async {
            if self.stream.is_none() {
                let stream = connect(&self.addr, self.source).await?;
                stream.set_nodelay(true)?;
                self.stream = Some(stream);
            }
            let stream = self
                .stream
                .as_mut()
                .ok_or_else(|| io::Error::other("no connection"))?;
            let body = encode(request)?;
            self.exchange_open = true;
            write_frame(stream, &[&self.group_prefix, &body]).await?;
            let reply = read_frame(stream).await?;
            self.exchange_open = false;
            decode_reply(&reply)
        };
        let outcome = tokio::time::timeout(ttl, exchange).await;
        match outcome {
            Ok(Ok(reply)) => Ok(reply),
            // The exchange finished: a group the peer does not serve
            // (yet, or any more) leaves the connection usable.
            Ok(Err(error)) if error.kind() == io::ErrorKind::NotFound => Err(CallError::Io(error)),
            Ok(Err(error)) => {
                self.stream = None;
                Err(CallError::Io(error))
            }
            Err(_) => {
                // The answer may still come on this connection: start over.
                self.stream = None;
                Err(CallError::Timeout)
            }
        }
    }

    fn failed<E: std::error::Error>(
        &self,
        error: CallError,
        action: RPCTypes,
        ttl: Duration,
    ) -> RPCError<NodeId, BasicNode, E> {
        match error {
            CallError::Io(error) => RPCError::Unreachable(Unreachable::new(&error)),
            CallError::Timeout => RPCError::Timeout(Timeout {
                action,
                id: self.node_id,
                target: self.target,
                timeout: ttl,
            }),
        }
    }

    fn unexpected<E: std::error::Error>(&self) -> RPCError<NodeId, BasicNode, E> {
        let error = io::Error::new(io::ErrorKind::InvalidData, "reply of another kind");
        RPCError::Network(NetworkError::new(&error))
    }
}

impl<C: GroupTypes> RaftNetwork<C> for TcpNetwork<C> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let ttl = option.hard_ttl();
        let (rpc, sent_up_to) = bounded_append(rpc, APPEND_BYTES_MAX);
        match self.call(&RaftRequest::AppendEntries(rpc), ttl).await {
            // Only a prefix went: the peer holds up to its last entry.
            Ok(RaftReply::AppendEntries(Ok(AppendEntriesResponse::Success)))
                if sent_up_to.is_some() =>
            {
                Ok(AppendEntriesResponse::PartialSuccess(sent_up_to))
            }
            Ok(RaftReply::AppendEntries(Ok(response))) => Ok(response),
            Ok(RaftReply::AppendEntries(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(_) => Err(self.unexpected()),
            Err(error) => Err(self.failed(error, RPCTypes::AppendEntries, ttl)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let ttl = option.hard_ttl();
        match self.call(&RaftRequest::InstallSnapshot(rpc), ttl).await {
            Ok(RaftReply::InstallSnapshot(Ok(response))) => Ok(response),
            Ok(RaftReply::InstallSnapshot(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(_) => Err(self.unexpected()),
            Err(error) => Err(self.failed(error, RPCTypes::InstallSnapshot, ttl)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let ttl = option.hard_ttl();
        match self.call(&RaftRequest::Vote(rpc), ttl).await {
            Ok(RaftReply::Vote(Ok(response))) => Ok(response),
            Ok(RaftReply::Vote(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(_) => Err(self.unexpected()),
            Err(error) => Err(self.failed(error, RPCTypes::Vote, ttl)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{MetaCommand, MetaTypes, TopicSpec};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    fn entry(index: u64, name_bytes: usize) -> Entry<MetaTypes> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(MetaCommand::CreateTopic {
                name: "x".repeat(name_bytes),
                spec: TopicSpec {
                    partitions: 1,
                    ordered: false,
                },
            }),
        }
    }

    fn request(entries: Vec<Entry<MetaTypes>>, commit: u64) -> AppendEntriesRequest<MetaTypes> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: Some(LogId::new(CommittedLeaderId::new(1, 1), commit)),
            entries,
        }
    }

    /// A forwarded write carries its data as bytes; on the wire that is
    /// what the earlier `Forward(Vec<u8>)` wrote, so nodes of both builds
    /// still understand each other during a rolling upgrade.
    #[test]
    fn a_forward_is_written_as_before_and_read_back_whole() {
        #[derive(Serialize)]
        enum Earlier {
            #[allow(dead_code)]
            AppendEntries(()),
            #[allow(dead_code)]
            Vote(()),
            #[allow(dead_code)]
            InstallSnapshot(()),
            Forward(Vec<u8>),
        }
        let data: Vec<u8> = (0..70_000u32).map(|n| (n * 7 % 251) as u8).collect();
        let now = encode(&RaftRequest::<MetaTypes>::Forward(Payload(
            data.clone().into(),
        )))
        .unwrap();
        assert_eq!(now, encode(&Earlier::Forward(data.clone())).unwrap());
        match decode::<RaftRequest<MetaTypes>>(&now).unwrap() {
            RaftRequest::Forward(read) => assert_eq!(read.0, data),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_encoding_is_allocated_once_at_its_exact_size() {
        let data = bytes::Bytes::from(vec![5u8; 300_000]);
        let request = RaftRequest::<MetaTypes>::Forward(Payload(data.clone()));
        let bytes = encode(&request).unwrap();
        assert_eq!(bytes.capacity(), bytes.len());
        assert_eq!(bytes, postcard::to_allocvec(&request).unwrap());
        match decode::<RaftRequest<MetaTypes>>(&bytes).unwrap() {
            RaftRequest::Forward(Payload(back)) => assert_eq!(back, data),
            _ => panic!("another request"),
        }
    }

    #[test]
    fn a_partition_requests_payloads_view_its_frame_and_a_metadata_requests_are_copies() {
        fn forwarded<C: GroupTypes>(bytes: &Bytes) -> Bytes {
            match decode_request::<C, RaftRequest<C>>(bytes).unwrap() {
                RaftRequest::Forward(Payload(data)) => data,
                _ => panic!("another request"),
            }
        }
        let data = Bytes::from(vec![9u8; 4096]);
        let frame = Bytes::from(
            encode(&RaftRequest::<crate::partition::PartitionTypes>::Forward(
                Payload(data.clone()),
            ))
            .unwrap(),
        );
        let within = |part: &Bytes| {
            let start = frame.as_ptr() as usize;
            (start..start + frame.len()).contains(&(part.as_ptr() as usize))
        };
        let viewed = forwarded::<crate::partition::PartitionTypes>(&frame);
        assert_eq!(viewed, data);
        assert!(within(&viewed), "a partition's payload is a view");
        let copied = forwarded::<MetaTypes>(&frame);
        assert_eq!(copied, data);
        assert!(!within(&copied), "a metadata payload is a copy");
        // Nothing is viewed once the decode is over.
        let after: RaftRequest<crate::partition::PartitionTypes> = decode(&frame).unwrap();
        match after {
            RaftRequest::Forward(Payload(data)) => assert!(!within(&data)),
            _ => panic!("another request"),
        }
    }

    /// A peer that answers each request on a connection with a vote of
    /// term n (the n-th request), the first one late.
    async fn numbering_peer() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut answered = 0u64;
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                while read_frame(&mut stream).await.is_ok() {
                    answered += 1;
                    if answered == 1 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let reply = RaftReply::Vote(Ok(VoteResponse {
                        vote: Vote::new(answered, 1),
                        vote_granted: true,
                        last_log_id: None,
                    }));
                    let body = encode(&reply).unwrap();
                    if write_frame(&mut stream, &[&[REPLY_OK], &body])
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        });
        addr
    }

    /// openraft wraps every RPC in a timeout of its own: a call dropped
    /// after its request went out must not leave its late answer to be
    /// read as the next call's (a vote, or an AppendEntries success that
    /// made a leader count an entry a follower never had).
    /// A peer that answers every request with `Forwarded(Ok(n))`, `n`
    /// counting its requests from 1, the first answer after `first_delay`;
    /// it closes a connection after each answer if `close_each`. Returns
    /// its address and how many connections it accepted.
    async fn forwarding_peer(
        first_delay: Duration,
        close_each: bool,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&accepted);
        let answered = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let answered = Arc::clone(&answered);
                tokio::spawn(async move {
                    while read_frame(&mut stream).await.is_ok() {
                        let n = answered.fetch_add(1, Ordering::SeqCst) + 1;
                        if n == 1 {
                            tokio::time::sleep(first_delay).await;
                        }
                        let reply = RaftReply::Forwarded(Ok(encode(&n).unwrap()));
                        let body = encode(&reply).unwrap();
                        if write_frame(&mut stream, &[&[REPLY_OK], &body])
                            .await
                            .is_err()
                            || close_each
                        {
                            break;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn read_index_request() -> Vec<u8> {
        encode(&RaftRequest::<MetaTypes>::ReadIndex).unwrap()
    }

    async fn ask_number(
        peers: &PeerConnections,
        addr: &str,
        ttl: Duration,
    ) -> Result<u64, ForwardError> {
        let answer = ask_leader(peers, addr, "meta", &read_index_request(), ttl).await?;
        Ok(decode(&answer).unwrap())
    }

    #[tokio::test]
    async fn requests_to_a_leader_share_one_connection() {
        let (addr, accepted) = forwarding_peer(Duration::ZERO, false).await;
        let peers = PeerConnections::new(None);
        for n in 1..=5u64 {
            let answer = ask_number(&peers, &addr, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(answer, n);
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(peers.idle(&addr), 1);
        // Requests at once take a connection each, and keep them all.
        let ttl = Duration::from_secs(5);
        let asked = tokio::join!(
            ask_number(&peers, &addr, ttl),
            ask_number(&peers, &addr, ttl),
            ask_number(&peers, &addr, ttl),
            ask_number(&peers, &addr, ttl),
        );
        assert!(asked.0.is_ok() && asked.1.is_ok() && asked.2.is_ok() && asked.3.is_ok());
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert_eq!(peers.idle(&addr), 4);
    }

    #[tokio::test]
    async fn a_connection_the_peer_closed_is_not_used_again() {
        let (addr, accepted) = forwarding_peer(Duration::ZERO, true).await;
        let peers = PeerConnections::new(None);
        for n in 1..=3u64 {
            // The peer's close reaches this end before the next request.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let answer = ask_number(&peers, &addr, Duration::from_secs(5)).await;
            assert_eq!(
                answer.unwrap(),
                n,
                "request {n} was sent on a closed connection"
            );
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_request_not_answered_in_time_keeps_its_connection_from_the_next() {
        let (addr, _) = forwarding_peer(Duration::from_millis(300), false).await;
        let peers = PeerConnections::new(None);
        let late = ask_number(&peers, &addr, Duration::from_millis(50)).await;
        assert!(matches!(late, Err(ForwardError::Lost(_))), "{late:?}");
        assert_eq!(peers.idle(&addr), 0);
        let next = ask_number(&peers, &addr, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(next, 2, "the second request got the first one's answer");
    }

    #[test]
    fn raft_traffic_is_told_from_other_requests_by_its_first_byte() {
        let append = encode(&RaftRequest::<MetaTypes>::AppendEntries(request(
            vec![entry(1, 3)],
            1,
        )))
        .unwrap();
        let vote = encode(&RaftRequest::<MetaTypes>::Vote(VoteRequest::new(
            Vote::new(2, 1),
            None,
        )))
        .unwrap();
        assert!(is_raft_traffic(&append));
        assert!(is_raft_traffic(&vote));
        let others = [
            RaftRequest::<MetaTypes>::Forward(Payload(Bytes::from_static(b"write"))),
            RaftRequest::<MetaTypes>::ReadIndex,
            RaftRequest::<MetaTypes>::Elect,
            RaftRequest::<MetaTypes>::RemoveMember { node: 3 },
            RaftRequest::<MetaTypes>::TransferLeader { to: 2 },
            RaftRequest::<MetaTypes>::HoldElections { for_ms: 1 },
        ];
        for other in &others {
            assert!(!is_raft_traffic(&encode(other).unwrap()));
        }
    }

    /// A closed port lingers while writes forwarded to it keep coming on
    /// a kept connection, and stops a quiet time after the last, however
    /// many heartbeats it is still sent.
    #[tokio::test]
    async fn a_closed_port_lingers_while_forwarded_writes_come_on_a_kept_connection() {
        let router = RaftRouter::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = router.addr().to_string();
        let peers = PeerConnections::new(None);
        // Opened before the port closes, as a forwarding node's would be.
        let refused = ask_number(&peers, &addr, Duration::from_secs(5)).await;
        assert!(
            matches!(refused, Err(ForwardError::NotSent(_))),
            "{refused:?}"
        );
        assert_eq!(peers.idle(&addr), 1);
        let quiet = Duration::from_millis(300);
        let forwarding_for = Duration::from_millis(900);
        let started = tokio::time::Instant::now();
        let stopping = {
            let router = router.clone();
            tokio::spawn(async move {
                router
                    .linger_then_shutdown(quiet, Duration::from_secs(10))
                    .await;
                started.elapsed()
            })
        };
        let heartbeats = {
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut stream = connect(&addr, None).await.unwrap();
                let body = encode(&RaftRequest::<MetaTypes>::AppendEntries(request(
                    Vec::new(),
                    0,
                )))
                .unwrap();
                loop {
                    let sent =
                        write_frame(&mut stream, &[&4u16.to_le_bytes(), b"meta", &body]).await;
                    if sent.is_err() || read_frame(&mut stream).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        while started.elapsed() < forwarding_for {
            let refused = ask_number(&peers, &addr, Duration::from_secs(5)).await;
            assert!(
                matches!(refused, Err(ForwardError::NotSent(_))),
                "{refused:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            peers.idle(&addr),
            1,
            "the refusals came on the kept connection"
        );
        let lingered = stopping.await.unwrap();
        assert!(
            lingered >= forwarding_for && lingered < forwarding_for + Duration::from_secs(2),
            "lingered {lingered:?}: it stopped while writes still came, or waited on heartbeats"
        );
        heartbeats.await.unwrap();
    }

    #[tokio::test]
    async fn a_call_dropped_midway_never_hands_its_answer_to_the_next() {
        let addr = numbering_peer().await;
        let mut factory = TcpNetworkFactory::<MetaTypes>::new(1, "meta", None);
        let mut network = factory
            .new_client(2, &BasicNode { addr: addr.clone() })
            .await;
        let request = VoteRequest::new(Vote::new(9, 1), None);
        let option = RPCOption::new(Duration::from_secs(5));
        let dropped = tokio::time::timeout(
            Duration::from_millis(50),
            network.vote(request.clone(), option.clone()),
        )
        .await;
        assert!(dropped.is_err(), "the first answer comes late");
        let next = network.vote(request, option).await.unwrap();
        assert_eq!(
            next.vote,
            Vote::new(2, 1),
            "the second call got the first call's answer"
        );
    }

    #[tokio::test]
    async fn connections_leave_from_the_source_address_when_one_is_set() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let source: std::net::IpAddr = "127.0.0.3".parse().unwrap();
        let (_stream, accepted) = tokio::join!(
            async { connect(&addr, Some(source)).await.unwrap() },
            async { listener.accept().await.unwrap() }
        );
        assert_eq!(accepted.1.ip(), source);
        let (_stream, accepted) =
            tokio::join!(async { connect(&addr, None).await.unwrap() }, async {
                listener.accept().await.unwrap()
            });
        assert_eq!(accepted.1.ip().to_string(), "127.0.0.1");
    }

    #[test]
    fn a_backlog_goes_in_pieces_that_fit_the_budget() {
        // Ten entries of about 1 KiB, a budget of about three.
        let entries: Vec<_> = (1..=10).map(|i| entry(i, 1000)).collect();
        let (cut, sent_up_to) = bounded_append(request(entries, 10), 3_100);
        assert_eq!(cut.entries.len(), 3);
        assert_eq!(sent_up_to.map(|id| id.index), Some(3));
        assert_eq!(
            cut.leader_commit.map(|id| id.index),
            Some(3),
            "no commit index past what was sent"
        );
    }

    #[test]
    fn one_entry_goes_whatever_its_size_and_a_small_request_is_whole() {
        let (cut, sent_up_to) = bounded_append(request(vec![entry(1, 5000), entry(2, 10)], 2), 100);
        assert_eq!(
            (cut.entries.len(), sent_up_to.map(|id| id.index)),
            (1, Some(1))
        );
        let (whole, sent_up_to) = bounded_append(request(vec![entry(1, 10)], 1), 100);
        assert_eq!((whole.entries.len(), sent_up_to), (1, None));
        assert_eq!(whole.leader_commit.map(|id| id.index), Some(1));
    }
}
