//! `NodeHandle`: the `Send + Clone` API of a running node, usable from any thread or runtime
//! (the QUIC layer runs on tokio). Every call is a message on a bounded channel to a shard.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures_channel::{mpsc, oneshot};
use futures_util::SinkExt;

use crate::hash::TxHash;
use crate::node::error::{NodeError, SubmitError};
pub use crate::receipt::{AckLevel, Receipt, SignedHeader};
use crate::sign::Address;
use crate::tx::Transaction;

/// A node's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sequences.
    Leader,
    /// Replicates.
    Follower,
    /// Campaigning.
    Candidate,
    /// Non-voting replica.
    Learner,
    /// Stopped.
    Shutdown,
}

impl Role {
    /// Its lower-case name, as status output and results print it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        }
    }
}

/// A snapshot of a node's Raft state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// Node id.
    pub id: u64,
    /// Current role.
    pub role: Role,
    /// Current term.
    pub term: u64,
    /// The leader this node knows of.
    pub leader: Option<u64>,
    /// Last index in the local log.
    pub last_log_index: Option<u64>,
    /// Highest index known committed.
    pub committed_index: Option<u64>,
    /// Highest index applied to the state machine.
    pub applied_index: Option<u64>,
    /// Index covered by the latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Log entries up to this index have been purged (they live on in the snapshot).
    pub purged_index: Option<u64>,
    /// Members of the cluster configuration, in id order.
    pub members: Vec<Member>,
    /// On the leader: how far each other member's log is known to match; empty elsewhere.
    pub replication: Vec<PeerProgress>,
    /// Address of the node's signing key (its batch and block signatures recover to it).
    pub signer: Address,
}

/// A member of the cluster configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Node id.
    pub id: u64,
    /// Its peer address (`host:port`), as recorded in the membership.
    pub addr: String,
    /// True for voters, false for learners.
    pub voter: bool,
}

/// Replication progress of one follower, as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerProgress {
    /// Node id.
    pub id: u64,
    /// Highest index known to be replicated to it.
    pub matched_index: Option<u64>,
}

/// Where a committed batch landed: its Raft index and signed header, and for transactions the
/// state machine found to repeat an earlier one, the original position.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// Raft index of the batch.
    pub index: u64,
    /// `(offset in this batch, (index, offset) of the first occurrence))` per duplicate.
    pub duplicates: Vec<(u32, (u64, u32))>,
    /// The leader's signed header (`None` only if that leader had no key).
    pub seal: Option<SignedHeader>,
}

pub(crate) type SubmitReply = oneshot::Sender<Vec<Result<Receipt, SubmitError>>>;

/// A group of transactions for one shard (never single transactions across threads).
pub(crate) struct ShardSubmit {
    /// (position in the caller's request, transaction)
    pub txs: Vec<(usize, Transaction)>,
    /// When the transactions are answered.
    pub ack: AckLevel,
    pub reply: SubmitReply,
}

/// Requests to the Raft shard.
pub(crate) enum Control {
    Status(oneshot::Sender<NodeStatus>),
    Initialize(
        BTreeMap<u64, openraft::BasicNode>,
        oneshot::Sender<Result<(), String>>,
    ),
    Lookup(TxHash, oneshot::Sender<Option<(u64, u32)>>),
    /// The committed receipt of a transaction; `None` if it was not sequenced.
    Receipt(
        TxHash,
        oneshot::Sender<Option<Result<Receipt, SubmitError>>>,
    ),
    WaitFor(
        StatusCondition,
        std::time::Duration,
        oneshot::Sender<Result<NodeStatus, NodeStatus>>,
    ),
    Shutdown(oneshot::Sender<()>),
}

/// A condition on a node's status, evaluated on every Raft metrics change.
pub type StatusCondition = Box<dyn Fn(&NodeStatus) -> bool + Send>;

/// Handle to a running node. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct NodeHandle {
    pub(crate) id: u64,
    pub(crate) shards: Vec<mpsc::Sender<ShardSubmit>>,
    pub(crate) control: mpsc::Sender<Control>,
    pub(crate) threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    /// Address of the node's signing key.
    pub(crate) signer: Address,
}

/// Which shard owns a transaction: a cheap hash of its bytes, so the same transaction always
/// meets the same shard's dedup window.
fn shard_of(bytes: &[u8], shards: usize) -> usize {
    (crc32fast::hash(bytes) as usize) % shards
}

impl NodeHandle {
    /// Node id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Address of this node's signing key (what its batch and block signatures recover to).
    pub fn signer(&self) -> Address {
        self.signer
    }

    /// Sequences `txs`; resolves when each is committed (or failed), one result per
    /// transaction, in request order.
    pub async fn submit(&self, txs: Vec<Transaction>) -> Vec<Result<Receipt, SubmitError>> {
        self.submit_with(txs, AckLevel::Committed).await
    }

    /// Sequences `txs`; resolves when each has a receipt at level `ack` (or failed), one result
    /// per transaction, in request order.
    pub async fn submit_with(
        &self,
        txs: Vec<Transaction>,
        ack: AckLevel,
    ) -> Vec<Result<Receipt, SubmitError>> {
        let n = txs.len();
        let mut groups: Vec<Vec<(usize, Transaction)>> =
            (0..self.shards.len()).map(|_| Vec::new()).collect();
        for (i, tx) in txs.into_iter().enumerate() {
            groups[shard_of(&tx.bytes, self.shards.len())].push((i, tx));
        }
        let mut waits = Vec::new();
        let mut out: Vec<Result<Receipt, SubmitError>> = vec![Err(SubmitError::ShuttingDown); n];
        for (k, group) in groups.into_iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let positions: Vec<usize> = group.iter().map(|(i, _)| *i).collect();
            let (tx, rx) = oneshot::channel();
            let mut shard = self.shards[k].clone();
            // A full queue makes the caller wait: back-pressure, never a silent drop.
            if shard
                .send(ShardSubmit {
                    txs: group,
                    ack,
                    reply: tx,
                })
                .await
                .is_err()
            {
                continue;
            }
            waits.push((positions, rx));
        }
        for (positions, rx) in waits {
            if let Ok(results) = rx.await {
                for (p, r) in positions.into_iter().zip(results) {
                    out[p] = r;
                }
            }
        }
        out
    }

    /// The node's Raft state.
    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .clone()
            .send(Control::Status(tx))
            .await
            .map_err(|_| NodeError::ShuttingDown)?;
        let mut status = rx.await.map_err(|_| NodeError::ShuttingDown)?;
        status.signer = self.signer;
        Ok(status)
    }

    /// The committed receipt of a sequenced transaction, from this node's state machine and log
    /// (`None` if this node has not applied it).
    pub async fn receipt(
        &self,
        tx_hash: TxHash,
    ) -> Result<Option<Result<Receipt, SubmitError>>, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .clone()
            .send(Control::Receipt(tx_hash, tx))
            .await
            .map_err(|_| NodeError::ShuttingDown)?;
        rx.await.map_err(|_| NodeError::ShuttingDown)
    }

    /// Position of a sequenced transaction, from this node's state machine.
    pub async fn lookup(&self, tx_hash: TxHash) -> Result<Option<(u64, u32)>, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .clone()
            .send(Control::Lookup(tx_hash, tx))
            .await
            .map_err(|_| NodeError::ShuttingDown)?;
        rx.await.map_err(|_| NodeError::ShuttingDown)
    }

    /// Waits until `condition` holds for this node's status (checked on every Raft metrics
    /// change, no polling), or `timeout` passes: `Err` carries the last status seen.
    pub async fn wait_for(
        &self,
        timeout: std::time::Duration,
        condition: impl Fn(&NodeStatus) -> bool + Send + 'static,
    ) -> Result<NodeStatus, Option<NodeStatus>> {
        let (tx, rx) = oneshot::channel();
        let msg = Control::WaitFor(Box::new(condition), timeout, tx);
        if self.control.clone().send(msg).await.is_err() {
            return Err(None);
        }
        let signed = |mut s: NodeStatus| {
            s.signer = self.signer;
            s
        };
        match rx.await {
            Ok(Ok(s)) => Ok(signed(s)),
            Ok(Err(s)) => Err(Some(signed(s))),
            Err(_) => Err(None),
        }
    }

    /// Makes a fresh cluster of `members` (call on one node once).
    pub async fn initialize(
        &self,
        members: BTreeMap<u64, openraft::BasicNode>,
    ) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .clone()
            .send(Control::Initialize(members, tx))
            .await
            .map_err(|_| NodeError::ShuttingDown)?;
        rx.await
            .map_err(|_| NodeError::ShuttingDown)?
            .map_err(|reason| NodeError::Raft {
                id: self.id,
                reason,
            })
    }

    /// Stops the node: Raft shuts down and the shards finish. Durable work that completed stays
    /// durable; pending submissions fail with `ShuttingDown` or `NotLeader`. Call [`join`]
    /// (from a thread that is not one of the node's shards) to wait for the threads.
    ///
    /// [`join`]: NodeHandle::join
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self
            .control
            .clone()
            .send(Control::Shutdown(tx))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        for s in &self.shards {
            s.clone().close_channel();
        }
        self.control.clone().close_channel();
    }

    /// Blocks until every shard thread has exited (after [`shutdown`](NodeHandle::shutdown)).
    pub fn join(&self) {
        let threads: Vec<_> = self
            .threads
            .lock()
            .expect("threads lock")
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}
