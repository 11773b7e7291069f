//! What a node needs from the network between nodes, whatever carries it: the RPCs it serves
//! ([`Rpc`], fed by the in-process router or by the QUIC layer), and a [`Forwarder`] that hands a
//! follower's sealed batches to the leader.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use futures_channel::{mpsc, oneshot};
use futures_util::future::LocalBoxFuture;
use futures_util::{SinkExt, StreamExt};
use openraft::alias::{SnapshotOf, VoteOf};
use openraft::error::{Fatal, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::storage::RaftStateMachine;
use openraft::Raft;

use crate::node::error::SubmitError;
use crate::node::handle::Committed;
use crate::node::stages::{Stage, Stages};
use crate::raft::{BatchBytes, SnapshotBlob, TypeConfig};

/// Requests one node may have queued from all others before senders wait.
pub const RPC_QUEUE_MAX: usize = 256;
/// RPCs one node handles concurrently.
pub const RPC_HANDLERS_MAX: u64 = 64;
/// Append requests of one replication stream queued before its sender waits.
pub const STREAM_APPEND_QUEUE_MAX: usize = 64;

/// A reply channel.
pub type Reply<T, E> = oneshot::Sender<Result<T, E>>;

/// The outcome of one request of a replication stream, or why the stream ended.
pub type StreamAppendReply = Result<StreamAppendResult<TypeConfig>, String>;

/// A Raft RPC (or forwarded batch) addressed to one node.
pub enum Rpc {
    /// AppendEntries (replication and heartbeats), one at a time.
    Append(
        AppendEntriesRequest<TypeConfig>,
        Reply<AppendEntriesResponse<TypeConfig>, RaftError<TypeConfig>>,
    ),
    /// A pipelined replication stream: requests in order, one result per request, in order; the
    /// stream ends after an error.
    StreamAppend(
        mpsc::Receiver<AppendEntriesRequest<TypeConfig>>,
        mpsc::Sender<StreamAppendReply>,
    ),
    /// RequestVote.
    Vote(
        VoteRequest<TypeConfig>,
        Reply<VoteResponse<TypeConfig>, RaftError<TypeConfig>>,
    ),
    /// A leader hands leadership to this node (it stops soon): campaign at once.
    TransferLeader(
        TransferLeaderRequest<TypeConfig>,
        Reply<TransferLeaderResponse<TypeConfig>, Fatal<TypeConfig>>,
    ),
    /// A whole snapshot.
    Snapshot(
        VoteOf<TypeConfig>,
        SnapshotOf<TypeConfig, SnapshotBlob>,
        Reply<SnapshotResponse<TypeConfig>, Fatal<TypeConfig>>,
    ),
    /// A batch sealed by a follower, to be proposed by this node (the leader). The bytes were
    /// validated where they entered the process. Never forwarded again.
    Forward(BatchBytes, Reply<Committed, SubmitError>),
    /// A follower asks the leader for a read index (a linearizable read on the follower).
    ReadIndex(Reply<u64, SubmitError>),
}

/// Sends a follower's sealed batch to the leader and returns where it committed. Implemented
/// by the network layer; called on the Raft shard.
pub trait Forwarder: Send + 'static {
    /// Proposes `batch` through `leader` (reachable at its membership address `addr`).
    fn forward(
        &self,
        leader: u64,
        addr: String,
        batch: BatchBytes,
    ) -> LocalBoxFuture<'static, Result<Committed, SubmitError>>;

    /// Asks `leader` to confirm its leadership with a quorum and return its read index: the
    /// log index a linearizable read must have applied.
    fn read_index(
        &self,
        leader: u64,
        addr: String,
    ) -> LocalBoxFuture<'static, Result<u64, SubmitError>>;
}

/// A sealed batch on its way to the proposer on the Raft shard.
pub(crate) struct Proposal {
    pub(crate) bytes: BatchBytes,
    pub(crate) reply: oneshot::Sender<Result<Committed, SubmitError>>,
    /// Came from a follower: propose here or fail, never forward again.
    pub(crate) forwarded: bool,
    /// When its shard sealed it, or it arrived from a follower ([`super::Stage::ToRaft`]).
    pub(crate) sealed_at: std::time::Instant,
}

/// Serves the RPCs queued for one node until its queue closes. Runs on the node's Raft shard;
/// each RPC is handled in its own task so a snapshot install does not hold up heartbeats.
pub(crate) async fn serve<SM>(
    raft: Raft<TypeConfig, SM>,
    mut rx: mpsc::Receiver<Rpc>,
    propose: mpsc::Sender<Proposal>,
    stages: Stages,
) where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotBlob>,
{
    // At most this many RPCs are handled at once; beyond it the queue (and then the senders)
    // wait, instead of piling up handlers behind a slow node.
    let handlers = Rc::new(glommio::sync::Semaphore::new(RPC_HANDLERS_MAX));
    while let Some(rpc) = rx.next().await {
        // Votes, replication sessions and forwarded batches never wait for a permit: a vote
        // must not queue behind bulk work, sessions live long (one per follower), and forwards
        // are bounded by each follower's proposals in flight. The rest share the permits.
        let permit = match rpc {
            Rpc::Vote(..)
            | Rpc::TransferLeader(..)
            | Rpc::StreamAppend(..)
            | Rpc::Forward(..)
            | Rpc::ReadIndex(..) => None,
            Rpc::Append(..) | Rpc::Snapshot(..) => match handlers.acquire_static_permit(1).await {
                Ok(p) => Some(p),
                Err(_) => break,
            },
        };
        let raft = raft.clone();
        let mut propose = propose.clone();
        let stages = stages.clone();
        glommio::spawn_local(async move {
            let _permit = permit;
            match rpc {
                Rpc::Append(req, reply) => {
                    let started = (!req.entries.is_empty()).then(Instant::now);
                    let r = raft.append_entries(req).await;
                    if let Some(started) = started {
                        stages.record_since(Stage::Append, started);
                    }
                    let _ = reply.send(r);
                }
                Rpc::StreamAppend(requests, mut results) => {
                    // One result per request, in order: each request's arrival waits here for
                    // its result ([`Stage::Append`]; `None`: no entries, not timed).
                    let arrived = Rc::new(RefCell::new(VecDeque::new()));
                    let requests = {
                        let arrived = arrived.clone();
                        requests.map(move |req: AppendEntriesRequest<TypeConfig>| {
                            let at = (!req.entries.is_empty()).then(Instant::now);
                            arrived.borrow_mut().push_back(at);
                            req
                        })
                    };
                    let out = raft.stream_append(requests);
                    futures_util::pin_mut!(out);
                    while let Some(r) = out.next().await {
                        if let Some(Some(at)) = arrived.borrow_mut().pop_front() {
                            stages.record_since(Stage::Append, at);
                        }
                        let failed = !matches!(r, Ok(Ok(_)));
                        let r = r.map_err(|fatal| fatal.to_string());
                        if results.send(r).await.is_err() || failed {
                            break;
                        }
                    }
                }
                Rpc::Vote(req, reply) => {
                    let _ = reply.send(raft.vote(req).await);
                }
                Rpc::TransferLeader(req, reply) => {
                    let _ = reply.send(raft.handle_transfer_leader(req).await);
                }
                Rpc::Snapshot(vote, snapshot, reply) => {
                    let _ = reply.send(raft.install_full_snapshot(vote, snapshot).await);
                }
                Rpc::Forward(bytes, reply) => {
                    let (tx, rx) = oneshot::channel();
                    let p = Proposal {
                        bytes,
                        reply: tx,
                        forwarded: true,
                        sealed_at: Instant::now(),
                    };
                    let r = match propose.send(p).await {
                        Ok(()) => rx.await.unwrap_or(Err(SubmitError::ShuttingDown)),
                        Err(_) => Err(SubmitError::ShuttingDown),
                    };
                    let _ = reply.send(r);
                }
                Rpc::ReadIndex(reply) => {
                    let _ = reply.send(leader_read_index(&raft).await);
                }
            }
        })
        .detach();
    }
}

/// On the leader: confirms leadership through a quorum round (Raft's ReadIndex) and returns the
/// index a linearizable read must have applied; `NotLeader` elsewhere.
///
/// The index is the larger of openraft's read log id and the leader's last log index. A leader
/// that restarted restores its leadership from its committed vote, but its commit index only
/// from the META hint (persisted every `COMMITTED_PERSIST_EVERY_ENTRIES`), so openraft's read
/// log id can be far behind what was acknowledged before the restart. Every entry in a leader's
/// log commits while it leads (and a committed entry is in its log), so waiting for the last log
/// index is safe; it costs a read the wait for the writes in flight when it started.
pub(crate) async fn leader_read_index<SM>(raft: &Raft<TypeConfig, SM>) -> Result<u64, SubmitError>
where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotBlob>,
{
    use openraft::error::{LinearizableReadError, RaftError};
    match raft
        .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
        .await
    {
        Ok(read) => {
            use openraft::async_runtime::WatchReceiver;
            let last = raft.metrics().borrow_watched().last_log_index;
            Ok(read.log_id().index.max(last.unwrap_or(0)))
        }
        Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
            Err(SubmitError::NotLeader {
                leader_hint: f.leader_id,
            })
        }
        Err(RaftError::APIError(_)) => Err(SubmitError::NotLeader { leader_hint: None }),
        Err(RaftError::Fatal(_)) => Err(SubmitError::ShuttingDown),
    }
}
