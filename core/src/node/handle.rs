//! `NodeHandle`: the `Send + Clone` API of a running node, usable from any thread or runtime
//! (the QUIC layer runs on tokio). Every call is a message on a bounded channel to a shard.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures_channel::{mpsc, oneshot};
use futures_util::SinkExt;

use crate::command::{Command, RollupPolicy};
use crate::encrypted::{KEY_BYTES, OVERHEAD_BYTES};
use crate::hash::TxHash;
use crate::node::error::{NodeError, SubmitError};
use crate::raft::state_machine::RollupRegistry;
pub use crate::receipt::{AckLevel, Receipt, SignedHeader};
use crate::sequencer::{CommandApplied, Sequencer};
use crate::sign::Address;
use crate::tx::Transaction;
use crate::tx_kind::TxKind;

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
    /// Every role.
    pub const ALL: [Role; 5] = [
        Role::Leader,
        Role::Follower,
        Role::Candidate,
        Role::Learner,
        Role::Shutdown,
    ];

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

/// Longest member address accepted, in bytes (the wire carries no longer one).
pub const MEMBER_ADDR_BYTES_MAX: usize = 1024;

/// Longest wait for a new member to catch up (`NodeHandle::change_members` uses at most this).
pub const CATCH_UP_MAX: std::time::Duration = std::time::Duration::from_secs(600);

/// A change of the cluster's membership (`NodeHandle::change_members`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// Add node `id`, reachable by its peers at `addr`: first as a learner, which the leader
    /// brings up to date (by snapshot if its log was purged), then, if `voter`, as a voter.
    /// Asking again for a node that is already a member at `addr` resumes (or does nothing).
    Add {
        /// The new node's id (not 0).
        id: u64,
        /// Where its peers dial it (`host:port`).
        addr: String,
        /// Make it a voter once caught up (else it stays a learner: it replicates and serves
        /// reads, and does not count towards a majority).
        voter: bool,
    },
    /// Remove node `id` (voter or learner). Removing the leader makes it hand leadership to
    /// the most up-to-date voter once the change commits.
    Remove {
        /// The node's id.
        id: u64,
    },
}

/// What a membership change left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipChanged {
    /// Log index of the membership entry that holds the change (0 when nothing had to change).
    pub index: u64,
    /// The membership the leader has then, in id order.
    pub members: Vec<Member>,
}

/// Who leads after a leadership transfer (`NodeHandle::transfer_leader`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaderTransferred {
    /// The node that led when the transfer was asked for.
    pub from: u64,
    /// The node that leads now (`from` itself when it was asked to keep leading).
    pub leader: u64,
    /// The term of `leader`'s leadership.
    pub term: u64,
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
    /// Milliseconds since the leader sent the last request (a heartbeat or a replication
    /// request) this follower has acknowledged: how long the leader has gone without news of
    /// it, plus at most a round trip. `None` if it has acknowledged none in this term.
    pub last_heard_ms: Option<u64>,
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
    /// When the caller handed them over ([`super::Stage::Queue`], [`super::Stage::Total`]).
    pub queued_at: std::time::Instant,
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
    /// A control command from a client: checked against the applied state, then proposed
    /// (leader only).
    Command(
        Command,
        oneshot::Sender<Result<CommandReceipt, SubmitError>>,
    ),
    /// A read of the applied state after the consistency barrier; the closure answers.
    Read(Consistency, std::time::Duration, ReadFn),
    /// A block's transactions, read from the log.
    BlockTxs(
        u64,
        u64,
        Consistency,
        std::time::Duration,
        oneshot::Sender<Result<Read<Option<BlockTxs>>, SubmitError>>,
    ),
    /// A transaction's status.
    Tx(
        TxHash,
        Consistency,
        std::time::Duration,
        oneshot::Sender<Result<Read<Option<TxInfo>>, SubmitError>>,
    ),
    /// A leadership transfer (leader only) to the voter named, or the one furthest along.
    TransferLeader(
        Option<u64>,
        oneshot::Sender<Result<LeaderTransferred, SubmitError>>,
    ),
    /// A membership change (leader only); the duration bounds a new node's catch-up.
    ChangeMembers(
        MemberChange,
        std::time::Duration,
        oneshot::Sender<Result<MembershipChanged, SubmitError>>,
    ),
    /// The leader's read index (for a follower's linearizable read).
    ReadIndex(oneshot::Sender<Result<u64, SubmitError>>),
    /// Fault injection: block the Raft shard's thread this long.
    Stall(std::time::Duration, oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// A read closure: runs on the Raft shard with the applied state and its applied index, or
/// with the error of the consistency barrier.
pub(crate) type ReadFn = Box<dyn FnOnce(Result<(u64, &Sequencer), SubmitError>) + Send>;

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Whatever this node has applied.
    #[default]
    Local,
    /// Wait (bounded by the read's timeout) until this node has applied this index: read your
    /// own writes by passing the index a receipt or command reported.
    MinIndex(u64),
    /// Confirm with the leader (a read index through a quorum round) and wait until this node
    /// has applied that far: the read sees every write acknowledged before it started.
    Linearizable,
}

/// A value read from a node's applied state, and the index it had applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read<T> {
    /// The node's last applied log index when it read.
    pub applied_index: u64,
    /// The value.
    pub value: T,
}

/// Where a control command was applied and what it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandReceipt {
    /// Raft index of the command entry.
    pub index: u64,
    /// Its effect.
    pub applied: CommandApplied,
}

/// One transaction of a block, as a rollup consumes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockTx {
    /// Its hash.
    pub tx_hash: TxHash,
    /// Where it was sequenced.
    pub index: u64,
    /// Its offset in that batch.
    pub offset: u32,
    /// The transaction as submitted (ciphertext for an encrypted one).
    pub tx: Transaction,
    /// The plaintext of a revealed encrypted transaction.
    pub plaintext: Option<Vec<u8>>,
}

/// What became of an encrypted transaction, as reads report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reveal {
    /// Waiting for its key.
    Pending,
    /// Revealed: the plaintext recorded through the log.
    Revealed {
        /// The decrypted transaction.
        plaintext: Vec<u8>,
        /// Raft index of the reveal.
        revealed_at: u64,
    },
    /// Not revealed within the reveal window.
    Expired,
}

/// A sequenced transaction's status on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxInfo {
    /// Raft index of its batch.
    pub index: u64,
    /// Its offset in that batch.
    pub offset: u32,
    /// Its rollup (`None` if this node purged its batch and it is not encrypted).
    pub rollup_id: Option<u64>,
    /// Height of the block holding it, once sealed.
    pub block_height: Option<u64>,
    /// Its committed receipt, or why this node cannot build one.
    pub receipt: Result<Receipt, SubmitError>,
    /// For an encrypted transaction: its reveal status.
    pub reveal: Option<Reveal>,
}

/// A sealed block with its transactions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockTxs {
    /// The block.
    pub block: crate::rollups::Block,
    /// Its transactions in block order; `None` if this node purged some of its batches into a
    /// snapshot (the header and metadata are still served).
    pub txs: Option<Vec<BlockTx>>,
}

/// How long a submission waits to confirm through the leader that a rollup it does not know is
/// unknown cluster-wide.
const UNKNOWN_ROLLUP_CONFIRM: std::time::Duration = std::time::Duration::from_secs(2);

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
    /// Rollups registered as of the applied state.
    pub(crate) registry: RollupRegistry,
    /// Why the Raft core stopped on its own, once it has ([`NodeHandle::failed`]).
    pub(crate) fatal: futures_util::future::Shared<oneshot::Receiver<String>>,
    /// Stage latencies ([`NodeHandle::stages`]).
    pub(crate) stages: super::Stages,
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

    /// How long each stage of the sequencing path took since the last call (or the node's
    /// start), and a new window from now ([`super::stages`]). The node's reporter takes windows
    /// too while `baton_core::stages` logs at `info`.
    pub fn stages(&self) -> super::StageReport {
        self.stages.take()
    }

    /// The node's stage histograms, for a layer around it (the network's) to record its own
    /// stages into ([`super::Stage::Replicate`], [`super::Stage::Respond`]).
    pub fn stage_recorder(&self) -> super::Stages {
        self.stages.clone()
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
        let mut out: Vec<Result<Receipt, SubmitError>> = vec![Err(SubmitError::ShuttingDown); n];
        // A rollup this node does not know may be one it has not applied yet (it just
        // restarted, or lags): before refusing, confirm through the leader (a linearizable read
        // barrier) that it is unknown as of now.
        let any_unknown = self
            .registry
            .with(|registered| txs.iter().any(|t| !registered.contains(&t.rollup_id)));
        let confirmed = if any_unknown {
            self.read(Consistency::Linearizable, UNKNOWN_ROLLUP_CONFIRM, |_| ())
                .await
                .err()
        } else {
            None
        };
        self.registry.with(|registered| {
            for (i, tx) in txs.into_iter().enumerate() {
                if !registered.contains(&tx.rollup_id) {
                    out[i] = Err(match &confirmed {
                        // Could not confirm: the outcome is open, the client may retry.
                        Some(_) => SubmitError::NotLeader { leader_hint: None },
                        None => SubmitError::UnknownRollup {
                            position: i,
                            rollup_id: tx.rollup_id,
                        },
                    });
                } else if matches!(tx.kind, TxKind::Encrypted { .. })
                    && tx.bytes.len() < OVERHEAD_BYTES
                {
                    out[i] = Err(SubmitError::MalformedCiphertext {
                        position: i,
                        len: tx.bytes.len(),
                    });
                } else {
                    groups[shard_of(&tx.bytes, self.shards.len())].push((i, tx));
                }
            }
        });
        let mut waits = Vec::new();
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
                    queued_at: std::time::Instant::now(),
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

    /// True if `rollup_id` is registered in this node's applied state.
    pub fn is_registered(&self, rollup_id: u64) -> bool {
        self.registry.contains(rollup_id)
    }

    /// Sends the control request `make` builds and waits for its answer (`ShuttingDown` when
    /// the Raft shard is gone).
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, SubmitError>>) -> Control,
    ) -> Result<T, SubmitError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .clone()
            .send(make(tx))
            .await
            .map_err(|_| SubmitError::ShuttingDown)?;
        rx.await.map_err(|_| SubmitError::ShuttingDown)?
    }

    /// Proposes a control command (leader only: a follower answers `NotLeader` with its hint).
    /// It is checked against the applied state first, so a command that would be refused is
    /// answered with its [`SubmitError::Command`] rejection without reaching the log.
    pub async fn command(&self, command: Command) -> Result<CommandReceipt, SubmitError> {
        self.ask(|reply| Control::Command(command, reply)).await
    }

    /// Changes the cluster's membership (leader only: a follower answers `NotLeader` with its
    /// hint). An addition waits up to `catch_up` for the new node to replicate the leader's log
    /// (at most [`CATCH_UP_MAX`]) before making it a voter; each membership entry must then
    /// commit within the node's commit wait.
    /// Answers once the new membership is committed, or with a
    /// [`SubmitError::Membership`] rejection.
    pub async fn change_members(
        &self,
        change: MemberChange,
        catch_up: std::time::Duration,
    ) -> Result<MembershipChanged, SubmitError> {
        let catch_up = catch_up.min(CATCH_UP_MAX);
        self.ask(|reply| Control::ChangeMembers(change, catch_up, reply))
            .await
    }

    /// Moves leadership (leader only: a follower answers `NotLeader` with its hint) to voter
    /// `to`, or, with `None`, to the voter whose log matches the leader's furthest among those
    /// that answered it within the longest election timeout. Answers once that voter leads (the
    /// wait is bounded by twice the longest election timeout), or with a
    /// [`SubmitError::Leadership`] rejection (`InProgress` while another transfer or a
    /// membership change runs). Naming the leader itself answers at once with nothing changed.
    pub async fn transfer_leader(&self, to: Option<u64>) -> Result<LeaderTransferred, SubmitError> {
        self.ask(|reply| Control::TransferLeader(to, reply)).await
    }

    /// Registers a rollup through the log.
    pub async fn register_rollup(
        &self,
        rollup_id: u64,
        policy: RollupPolicy,
    ) -> Result<CommandReceipt, SubmitError> {
        self.command(Command::RegisterRollup { rollup_id, policy })
            .await
    }

    /// Reveals an encrypted transaction's key; its plaintext is recorded through the log.
    pub async fn reveal(
        &self,
        tx_hash: TxHash,
        key: [u8; KEY_BYTES],
    ) -> Result<CommandReceipt, SubmitError> {
        self.command(Command::Reveal { tx_hash, key }).await
    }

    /// Reads the applied state with `f` once `consistency` holds (waiting at most `timeout`).
    pub async fn read<R: Send + 'static>(
        &self,
        consistency: Consistency,
        timeout: std::time::Duration,
        f: impl FnOnce(&Sequencer) -> R + Send + 'static,
    ) -> Result<Read<R>, SubmitError> {
        let (tx, rx) = oneshot::channel();
        let read: ReadFn = Box::new(move |state| {
            let _ = tx.send(state.map(|(applied_index, s)| Read {
                applied_index,
                value: f(s),
            }));
        });
        self.control
            .clone()
            .send(Control::Read(consistency, timeout, read))
            .await
            .map_err(|_| SubmitError::ShuttingDown)?;
        rx.await.map_err(|_| SubmitError::ShuttingDown)?
    }

    /// A block and its transactions (read from this node's log).
    pub async fn block(
        &self,
        rollup_id: u64,
        height: u64,
        consistency: Consistency,
        timeout: std::time::Duration,
    ) -> Result<Read<Option<BlockTxs>>, SubmitError> {
        self.ask(|reply| Control::BlockTxs(rollup_id, height, consistency, timeout, reply))
            .await
    }

    /// A sequenced transaction's status: position, block, receipt, reveal (`None` if this node
    /// has not sequenced it).
    pub async fn tx(
        &self,
        tx_hash: TxHash,
        consistency: Consistency,
        timeout: std::time::Duration,
    ) -> Result<Read<Option<TxInfo>>, SubmitError> {
        self.ask(|reply| Control::Tx(tx_hash, consistency, timeout, reply))
            .await
    }

    /// On the leader: confirms leadership with a quorum and returns the index a linearizable
    /// read must have applied (`NotLeader` elsewhere).
    pub async fn read_index(&self) -> Result<u64, SubmitError> {
        self.ask(Control::ReadIndex).await
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

    /// Fault injection for tests: blocks this node's Raft shard (its thread, every task on it)
    /// for `pause`, like a long stop-the-world pause or CPU starvation; returns when the shard
    /// runs again.
    #[doc(hidden)]
    pub async fn stall_for_testing(&self, pause: std::time::Duration) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .clone()
            .send(Control::Stall(pause, tx))
            .await
            .map_err(|_| NodeError::ShuttingDown)?;
        rx.await.map_err(|_| NodeError::ShuttingDown)
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

    /// Resolves with the reason when the node's Raft core stopped on its own: a storage error
    /// (a WAL write or sync, a snapshot file) that openraft treats as fatal. Such a node no
    /// longer takes part in the cluster and answers every submission `ShuttingDown`; stop it
    /// ([`shutdown`](NodeHandle::shutdown)) and start it again, which recovers from its log
    /// (`baton node` does the first and exits with status 1). Resolves with `None` once the
    /// node has shut down normally.
    pub async fn failed(&self) -> Option<String> {
        self.fatal.clone().await.ok()
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
