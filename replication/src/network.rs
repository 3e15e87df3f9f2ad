//! Raft RPCs between nodes over TCP.
//!
//! A frame is a little-endian `u32` length and that many bytes of
//! postcard (a compact binary serde encoding): a
//! [`RaftRequest`] from the caller, a [`RaftReply`] back, one at a time on
//! a connection. Each node serves its Raft RPC address with [`serve`]; a
//! leader or candidate reaches its peers through [`TcpNetworkFactory`],
//! one connection per peer, opened on first use and again after any error.
//!
//! Hostile or broken input: a frame longer than [`MAX_FRAME_BYTES`] or
//! that does not decode closes that connection (logged), nothing else; the
//! caller sees an unreachable peer and openraft backs off and retries.

use std::io;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft, RaftTypeConfig};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::NodeId;

/// The longest frame read from a peer (a snapshot chunk or a batch of
/// entries fits well within it).
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// The groups this transport carries: nodes known by id and address.
pub trait GroupTypes: RaftTypeConfig<NodeId = NodeId, Node = BasicNode> {}

impl<C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>> GroupTypes for C {}

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
}

async fn write_frame<T: Serialize>(stream: &mut TcpStream, value: &T) -> io::Result<()> {
    let body = postcard::to_allocvec(value).map_err(io::Error::other)?;
    let length = u32::try_from(body.len())
        .ok()
        .filter(|&length| length as usize <= MAX_FRAME_BYTES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too long"))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&length.to_le_bytes());
    frame.extend_from_slice(&body);
    stream.write_all(&frame).await
}

async fn read_frame<T: for<'de> Deserialize<'de>>(stream: &mut TcpStream) -> io::Result<T> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).await?;
    let length = u32::from_le_bytes(length) as usize;
    if length > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {length} bytes over the limit of {MAX_FRAME_BYTES}"),
        ));
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    postcard::from_bytes(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Serves Raft RPCs from peers on `listener` until the task is dropped;
/// dropping it also closes every connection it accepted.
pub async fn serve<C: GroupTypes>(listener: TcpListener, raft: Raft<C>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting a Raft connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        connections.spawn(serve_connection(stream, peer, raft.clone()));
    }
}

async fn serve_connection<C: GroupTypes>(
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    raft: Raft<C>,
) {
    let _ = stream.set_nodelay(true);
    loop {
        let request: RaftRequest<C> = match read_frame(&mut stream).await {
            Ok(request) => request,
            Err(error) => {
                if error.kind() != io::ErrorKind::UnexpectedEof {
                    tracing::warn!(%peer, %error, "bad Raft frame; connection closed");
                }
                return;
            }
        };
        let reply = match request {
            RaftRequest::AppendEntries(rpc) => {
                RaftReply::AppendEntries(raft.append_entries(rpc).await)
            }
            RaftRequest::Vote(rpc) => RaftReply::Vote(raft.vote(rpc).await),
            RaftRequest::InstallSnapshot(rpc) => {
                RaftReply::InstallSnapshot(raft.install_snapshot(rpc).await)
            }
        };
        if write_frame(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}

/// Opens [`TcpNetwork`]s to peers.
#[derive(Debug)]
pub struct TcpNetworkFactory<C> {
    /// This node's id (named in timeout errors).
    node_id: NodeId,
    _group: std::marker::PhantomData<fn() -> C>,
}

impl<C> TcpNetworkFactory<C> {
    /// The factory of node `node_id`.
    pub fn new(node_id: NodeId) -> Self {
        TcpNetworkFactory {
            node_id,
            _group: std::marker::PhantomData,
        }
    }
}

impl<C: GroupTypes> RaftNetworkFactory<C> for TcpNetworkFactory<C> {
    type Network = TcpNetwork<C>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> TcpNetwork<C> {
        TcpNetwork {
            node_id: self.node_id,
            target,
            addr: node.addr.clone(),
            stream: None,
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
    stream: Option<TcpStream>,
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
        let exchange = async {
            if self.stream.is_none() {
                let stream = TcpStream::connect(&self.addr).await?;
                stream.set_nodelay(true)?;
                self.stream = Some(stream);
            }
            let stream = self
                .stream
                .as_mut()
                .ok_or_else(|| io::Error::other("no connection"))?;
            write_frame(stream, request).await?;
            read_frame::<RaftReply>(stream).await
        };
        let outcome = tokio::time::timeout(ttl, exchange).await;
        match outcome {
            Ok(Ok(reply)) => Ok(reply),
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
        match self.call(&RaftRequest::AppendEntries(rpc), ttl).await {
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
