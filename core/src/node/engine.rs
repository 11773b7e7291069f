//! Starting a node: S shard threads (glommio executors); shard 0 also runs Raft.
//!
//! ```text
//! NodeHandle::submit ─(bounded, per-shard groups)─▶ shard k: validate, hash, dedup, batch
//!        ─(bounded, sealed batches)─▶ shard 0: raft.client_write ─▶ WAL ∥ replication
//!        ◀─(commit: index per batch)── shard 0 ◀── state machine apply
//! shard k resolves each waiting transaction with (index, offset) and answers the request.
//! ```

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_channel::{mpsc, oneshot};
use futures_util::{SinkExt, StreamExt};
use glommio::{LocalExecutorBuilder, Placement};
use openraft::RaftNetworkFactory;

use crate::batcher::{Batcher, IncomingTx, PushOutcome, SealedBatch, TxSlot};
use crate::hash::TxHash;
use crate::merkle::MerkleTree;
use crate::node::config::NodeConfig;
use crate::node::error::{LeadershipRejection, NodeError, SubmitError};
use crate::node::handle::{
    Committed, Control, LeaderTransferred, Member, NodeHandle, NodeStatus, PeerProgress, Role,
    ShardSubmit, SubmitReply,
};
use crate::node::local_net::LocalRouter;
use crate::node::peer::{serve, Forwarder, Proposal, Rpc};
use crate::node::stages::{Stage, Stages, STAGE_REPORT_INTERVAL};
use crate::raft::state_machine::HashedBatches;
use crate::raft::types::SealTicket;
use crate::raft::{BatchBytes, SnapshotBlob, TypeConfig};
use crate::receipt::{AckLevel, Receipt, SignedHeader};
use crate::sequencer::KnownHashes;

/// Committed batches whose positions a shard remembers to answer duplicates without asking the
/// state machine.
const RECENT_BATCHES_MAX: usize = 4096;
/// Transactions (Merkle leaves) in the batches a shard remembers: their trees, kept to prove
/// duplicates, take about 64 bytes per leaf, so this bounds them to about 16 MiB per shard
/// whatever the batch size. Older duplicates are proven by the Raft shard from the log.
const RECENT_LEAVES_MAX: usize = 1 << 18;

/// How nodes reach each other in one process.
#[derive(Clone)]
pub enum Network {
    /// In-process channels (tests, benchmarks); followers refuse submissions with `NotLeader`.
    Local(LocalRouter),
    /// In-process channels; followers forward sealed batches to the leader.
    LocalForwarding(LocalRouter),
}

/// Starts a node on an in-process network and returns its handle once every shard is running
/// (Raft may still be electing).
pub fn start(config: NodeConfig, network: Network) -> Result<NodeHandle, NodeError> {
    let id = config.id;
    let (router, forwarder) = match network {
        Network::Local(r) => (r, None),
        Network::LocalForwarding(r) => {
            let f: Box<dyn Forwarder> = Box::new(r.forwarder(id));
            (r, Some(f))
        }
    };
    let inbound = router.register(id);
    let peers = Peers {
        factory: router.factory(id),
        inbound,
        forwarder,
        on_stop: Some(Box::new(move || router.unregister(id))),
    };
    start_with(config, peers)
}

/// A node's connection to the other nodes, provided by the network layer.
pub struct Peers<F> {
    /// openraft's network factory (moved to the Raft shard).
    pub factory: F,
    /// RPCs from other nodes, served on the Raft shard.
    pub inbound: mpsc::Receiver<Rpc>,
    /// Hands a follower's sealed batches to the leader; `None`: followers answer `NotLeader`.
    pub forwarder: Option<Box<dyn Forwarder>>,
    /// Called on the Raft shard when the node stops, before Raft shuts down.
    pub on_stop: Option<Box<dyn FnOnce() + Send>>,
}

/// Starts a node whose peers are reached through `peers` and returns its handle once every
/// shard is running (Raft may still be electing).
pub fn start_with<F>(config: NodeConfig, peers: Peers<F>) -> Result<NodeHandle, NodeError>
where
    F: RaftNetworkFactory<TypeConfig> + Send + 'static,
    F::Network: openraft::network::NetSnapshot<TypeConfig, SnapshotData = SnapshotBlob>,
{
    if config.shards == 0 || config.id == 0 {
        return Err(NodeError::Config {
            reason: "shards and id must be at least 1".into(),
        });
    }
    config.batch.validate().map_err(|e| NodeError::Config {
        reason: e.to_string(),
    })?;
    config
        .check_shard_cpus()
        .map_err(|reason| NodeError::Config { reason })?;
    crate::cpus::remember_start_mask();
    // A sealed batch must fit in one WAL record, behind the log store's entry prefix.
    let entry_max = config.batch.batch_bytes_max
        + crate::raft::log_store::ENTRY_PREFIX_BYTES
        + crate::receipt::SIGNED_HEADER_BYTES;
    if entry_max > config.wal.payload_bytes_max {
        return Err(NodeError::Config {
            reason: format!(
                "batch_bytes_max {} plus the entry prefix exceeds the WAL's payload_bytes_max {}",
                config.batch.batch_bytes_max, config.wal.payload_bytes_max
            ),
        });
    }
    config.wal.validate().map_err(|e| NodeError::Config {
        reason: e.to_string(),
    })?;
    baton_wal::check_io_memory(config.wal_io_memory_bytes).map_err(|e| NodeError::Config {
        reason: format!("wal_io_memory_bytes {}: {e}", config.wal_io_memory_bytes),
    })?;
    let raft_config = Arc::new(config.raft_config().map_err(|e| NodeError::Config {
        reason: e.to_string(),
    })?);
    let (control_tx, control_rx) = mpsc::channel(64);
    let (fatal_tx, fatal_rx) = futures_channel::oneshot::channel();
    let (propose_tx, propose_rx) = mpsc::channel(config.propose_queue_max);
    let mut shard_txs = Vec::new();
    let mut threads = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), NodeError>>();
    // Shard 0 also runs Raft: it takes these.
    let registry = crate::raft::state_machine::RollupRegistry::default();
    let hashed = HashedBatches::default();
    let stages = Stages::default();
    let mut raft_part = Some((
        raft_config,
        peers,
        propose_tx.clone(),
        propose_rx,
        control_rx,
        registry.clone(),
        hashed.clone(),
        fatal_tx,
        stages.clone(),
    ));
    let wakes: Vec<Arc<ShardWake>> = (0..config.shards).map(|_| Arc::default()).collect();
    for (k, wake) in wakes.iter().enumerate() {
        let (tx, rx) = mpsc::channel(config.submit_queue_max);
        shard_txs.push(tx);
        let shard_config = config.clone();
        let propose = propose_tx.clone();
        let control = control_tx.clone();
        let raft = raft_part.take();
        let shard_hashed = hashed.clone();
        let shard_stages = stages.clone();
        let t = spawn_shard(
            &config,
            k,
            wake.clone(),
            ready_tx.clone(),
            move |ready| async move {
                let config = shard_config;
                // Before the shard reports ready: its dedup window is allocated and written with
                // the rest of the node's start-time memory (`crate::memory`).
                let batcher = match Batcher::new(config.batch, config.dedup_window_txs) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = ready.send(Err(NodeError::Config {
                            reason: format!("shard {k}: {e}"),
                        }));
                        return;
                    }
                };
                let batching = batching_shard(
                    config.clone(),
                    batcher,
                    rx,
                    propose,
                    shard_hashed,
                    control,
                    shard_stages,
                );
                match raft {
                    Some((
                        raft_config,
                        peers,
                        propose_tx,
                        propose_rx,
                        control_rx,
                        registry,
                        hashed,
                        fatal,
                        stages,
                    )) => {
                        let queues = RaftQueues {
                            propose_tx,
                            propose_rx,
                            control_rx,
                            registry,
                            hashed,
                            fatal,
                            stages,
                        };
                        let raft = raft_shard(config, raft_config, peers, queues, ready);
                        futures_util::future::join(raft, batching).await;
                    }
                    None => {
                        let _ = ready.send(Ok(()));
                        drop(ready);
                        batching.await;
                    }
                }
            },
        )?;
        threads.push(t);
    }
    drop(ready_tx);
    let mut reported = 0;
    while reported < config.shards {
        // Every shard reports once (an executor that cannot start reports its error). Until
        // then, the shards are woken every START_WAKE_EVERY (`ShardWake`).
        match ready_rx.recv_timeout(START_WAKE_EVERY) {
            Ok(r) => {
                r?;
                reported += 1;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                for w in &wakes {
                    w.wake();
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(NodeError::ShuttingDown)
            }
        }
    }
    Ok(NodeHandle {
        id: config.id,
        shards: shard_txs,
        control: control_tx,
        threads: Arc::new(Mutex::new(threads)),
        signer: config.signer.address(),
        registry,
        fatal: futures_util::FutureExt::shared(fatal_rx),
        stages,
    })
}

type Ready = std::sync::mpsc::Sender<Result<(), NodeError>>;

/// Starts shard `k`'s thread and executor and runs `f` on it; `f` gets the channel on which it
/// must report once that it is ready. An executor that cannot start reports its error there.
fn spawn_shard<F, Fut>(
    config: &NodeConfig,
    k: usize,
    wake: Arc<ShardWake>,
    ready: Ready,
    f: F,
) -> Result<std::thread::JoinHandle<()>, NodeError>
where
    F: FnOnce(Ready) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let cpu = config.shard_cpus.as_ref().map(|cpus| cpus[k]);
    let placement = cpu.map_or(Placement::Unbound, Placement::Fixed);
    let name = format!("baton-{}-s{k}", config.id);
    let io_memory = config.wal_io_memory_bytes;
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let mut builder = LocalExecutorBuilder::new(placement)
                .name(&name)
                .preempt_timer(PREEMPT_EVERY);
            if k == 0 {
                builder = builder.io_memory(io_memory);
            }
            match builder.make() {
                Ok(ex) => {
                    // Not signalled once this thread's executor is gone (returned or panicked).
                    let _thread = wake.set_thread();
                    ex.run(async move {
                        let probe = glommio::spawn_local(lag_probe(k));
                        // Let the probe arm its timer before the start's long synchronous work.
                        yield_once().await;
                        f(ready).await;
                        probe.cancel().await;
                    })
                }
                Err(e) => {
                    let source = std::io::Error::other(format!(
                        "glommio executor (locked memory?{}): {e}",
                        cpu.map(|c| format!(" CPU {c} available?"))
                            .unwrap_or_default()
                    ));
                    let _ = ready.send(Err(NodeError::Spawn { shard: k, source }));
                }
            }
        })
        .map_err(|source| NodeError::Spawn { shard: k, source })
}

/// How long a shard's executor runs ready tasks before it must return to its reactor (I/O
/// completions, timers, and wake-ups from other threads such as the network thread's answers to
/// heartbeats). glommio's default is 100 ms: a shard kept busy by tasks that wake each other
/// would then hear its peers' heartbeat answers up to 100 ms late, after their 50 ms deadline,
/// and a leader could not renew its lease (docs/performance.md, the wedge). Preemption only
/// happens between polls, never inside one.
pub const PREEMPT_EVERY: Duration = Duration::from_millis(2);

/// How often a node that is starting wakes its shards.
const START_WAKE_EVERY: Duration = Duration::from_millis(50);

/// Wakes a shard's executor from outside while the node starts.
///
/// glommio 0.9 can put an executor to sleep while it has tasks ready to run: when its
/// preemption timer has already expired at the top of a scheduling round (the thread was off
/// the CPU for longer than [`PREEMPT_EVERY`]), the round runs nothing and reports "nothing
/// ran", and the executor parks until some I/O completes or a timer fires. A running shard
/// always has a timer (its lag probe, every 10 ms), so such a sleep ends within 10 ms; but a
/// shard that parks before its first task ran has neither timer nor I/O, and sleeps for good.
/// On 2 loaded cores that left one node of a test cluster silent at start, once in a few
/// runs of the suite; any signal ended it (a debugger attaching did). Reproduced alone with
/// three executors started over and over on 2 busy cores: stuck within 100–1,000 starts; with
/// these wakes, none in 3,000 (docs/performance.md, "A node that never started"). A start
/// stalled once more in the suite with the wakes limited to shards whose probe had not run
/// yet (the node had opened no log in 8 s), so they now cover the whole start.
///
/// So until every shard has reported ready, the node's start sends each shard's thread a
/// signal every [`START_WAKE_EVERY`] (a no-op handler installed without `SA_RESTART`): a sleep
/// in `io_uring_enter` returns `EINTR` and the executor goes round its loop again (ready
/// tasks, completions, other threads' wake-ups). glommio takes the `EINTR` in its stride, and
/// the start's own blocking calls are file-system calls the standard library retries.
#[derive(Default)]
struct ShardWake {
    /// The shard's thread id, once its executor is made (0 before).
    tid: std::sync::atomic::AtomicI32,
}

/// The signal that wakes a shard (ignored by default; here handled by a no-op).
const WAKE_SIGNAL: libc::c_int = libc::SIGURG;

impl ShardWake {
    /// Called on the shard's thread once its executor exists; the thread is no longer
    /// signalled once the returned guard is dropped (before the thread ends).
    fn set_thread(self: &Arc<Self>) -> ShardThread {
        install_wake_handler();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.tid.store(tid, std::sync::atomic::Ordering::Release);
        ShardThread(self.clone())
    }

    /// Signals the shard's thread once it has an executor; true if it did.
    fn wake(&self) -> bool {
        let tid = self.tid.load(std::sync::atomic::Ordering::Acquire);
        if tid == 0 {
            return false;
        }
        // SAFETY: tgkill to a thread of this process that has not yet dropped its
        // `ShardThread` (a thread that has ended would give ESRCH, not another thread's
        // signal, unless its id was reused within this process in between; the handler does
        // nothing either way).
        unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, WAKE_SIGNAL) == 0 }
    }
}

/// Runs `f` to completion on a fresh glommio executor on this thread (default settings: tests,
/// tools), woken from outside (`ShardWake`) until `f` has been polled once: an executor that
/// parks before its first task ran sleeps for good otherwise (see `ShardWake`; with glommio's
/// default 100 ms preemption timer it takes the thread being off the CPU that long at the
/// wrong moment, which a loaded test machine does now and then).
pub fn run_local<T>(f: impl std::future::Future<Output = T>) -> T {
    use std::sync::atomic::{AtomicBool, Ordering};
    let executor = LocalExecutorBuilder::default()
        .make()
        .unwrap_or_else(|e| panic!("cannot create a glommio executor: {e}"));
    let wake = Arc::new(ShardWake::default());
    let thread = wake.set_thread();
    let polled = Arc::new(AtomicBool::new(false));
    let waker = {
        let (wake, polled) = (wake.clone(), polled.clone());
        std::thread::spawn(move || {
            while !polled.load(Ordering::Acquire) {
                std::thread::sleep(START_WAKE_EVERY);
                if !polled.load(Ordering::Acquire) {
                    wake.wake();
                }
            }
        })
    };
    /// Stops the waker when dropped, unwinding included.
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let stop = Stop(polled.clone());
    let out = executor.run(async {
        polled.store(true, Ordering::Release);
        f.await
    });
    drop(stop);
    drop(thread);
    let _ = waker.join();
    out
}

/// Clears a shard's thread id when dropped, so that it is not signalled after its executor.
struct ShardThread(Arc<ShardWake>);

impl Drop for ShardThread {
    fn drop(&mut self) {
        self.0.tid.store(0, std::sync::atomic::Ordering::Release);
    }
}

/// Returns to the executor once (other ready tasks run first).
async fn yield_once() {
    let mut yielded = false;
    futures_util::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

/// Installs the no-op handler of [`WAKE_SIGNAL`], once per process, without `SA_RESTART` so
/// that the executor's sleep (`io_uring_enter`) returns.
fn install_wake_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn nothing(_: libc::c_int) {}
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe (does nothing).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(WAKE_SIGNAL, &action, std::ptr::null_mut());
        }
    });
}

/// The period of each shard's lag probe: a timer whose lateness is how long the shard did not
/// get back to its reactor.
const LAG_PROBE_EVERY: Duration = Duration::from_millis(10);
/// A probe this late is logged (debug, target `baton_core::lag`).
const LAG_LOG_AFTER: Duration = Duration::from_millis(50);

/// Logs when shard `k`'s reactor was not reached for a long time (a task that does not yield,
/// a blocking call, or the thread starved of CPU): cheap to keep on, and the first thing to
/// look at when timers fire late.
async fn lag_probe(k: usize) {
    loop {
        let before = Instant::now();
        glommio::timer::sleep(LAG_PROBE_EVERY).await;
        let late = before.elapsed().saturating_sub(LAG_PROBE_EVERY);
        if late >= LAG_LOG_AFTER {
            tracing::debug!(
                target: "baton_core::lag",
                shard = k,
                late_ms = late.as_millis() as u64,
                "shard reactor reached late"
            );
        }
    }
}

fn now_us(origin: Instant) -> u64 {
    origin.elapsed().as_micros() as u64
}

/// One request's transactions on this shard, waiting for their batches.
struct Request {
    results: Vec<Option<Result<Receipt, SubmitError>>>,
    remaining: usize,
    reply: Option<SubmitReply>,
    /// When its transactions are answered.
    ack: AckLevel,
    /// The node's stages and when the request was handed to the shard: its
    /// [`Stage::Total`] is recorded once its last slot is answered (`None`: not measured).
    timing: Option<(Stages, Instant)>,
}

impl Request {
    /// Answers `slot`, unless it was answered already (a preconfirmed transaction whose batch
    /// then commits or fails); replies once every slot is answered.
    fn fill(&mut self, slot: usize, r: Result<Receipt, SubmitError>) {
        if self.reply.is_none() {
            return;
        }
        if self.results[slot].is_none() {
            self.results[slot] = Some(r);
            self.remaining -= 1;
        }
        if self.remaining == 0 {
            if let Some(reply) = self.reply.take() {
                let results = self
                    .results
                    .drain(..)
                    .map(|r| r.expect("all filled"))
                    .collect();
                // Recorded first: whoever the reply wakes finds it counted.
                if let Some((stages, since)) = &self.timing {
                    stages.record_since(Stage::Total, *since);
                }
                let _ = reply.send(results);
            }
        }
    }
}

type RequestRef = Rc<RefCell<Request>>;

/// A transaction waiting for a batch: which request slot, its hash, its offset in the batch.
struct Waiter {
    request: RequestRef,
    slot: usize,
    tx_hash: TxHash,
    offset: u32,
    duplicate: bool,
}

/// A batch being built or handed to the Raft shard: who waits, and once sealed its Merkle tree
/// (for receipts' paths).
#[derive(Default)]
struct InFlight {
    tree: Option<Rc<MerkleTree>>,
    waiters: Vec<Waiter>,
    /// The leader's signed header, once preconfirmed.
    seal: Option<SignedHeader>,
}

/// A committed batch the shard remembers, to answer duplicates of its transactions.
struct Recent {
    committed: Committed,
    tree: Rc<MerkleTree>,
}

struct ShardState {
    /// Batches handed to the Raft shard and not yet resolved, by batch sequence number.
    waiting: HashMap<u64, InFlight>,
    /// Recently committed batches, by sequence number.
    recent: HashMap<u64, Recent>,
    recent_order: VecDeque<u64>,
    /// Merkle leaves of the trees in `recent`.
    recent_leaves: usize,
    /// Transactions of failed batches, for the batcher to forget before it accepts more.
    forget: Vec<(TxHash, TxSlot)>,
    /// Batches handed to the Raft shard and not yet resolved.
    in_flight: usize,
    /// Of those, batches the leader has not signed yet (no preconfirmation).
    unsigned: usize,
    /// To ask the Raft shard for receipts of transactions committed in other batches.
    control: mpsc::Sender<Control>,
    /// The node's stage latencies.
    stages: Stages,
    /// What the batcher's microsecond times count from.
    origin: Instant,
}

/// The receipt of the transaction at `offset` of the batch with `tree` and `seal`.
fn receipt_at(
    tree: &MerkleTree,
    seal: Option<&SignedHeader>,
    index: u64,
    tx_hash: TxHash,
    offset: u32,
    level: AckLevel,
    duplicate: bool,
) -> Result<Receipt, SubmitError> {
    let batch = *seal.ok_or(SubmitError::ReceiptUnavailable { index })?;
    let path = tree
        .proof(offset as usize)
        .map_err(|_| SubmitError::ReceiptUnavailable { index })?
        .path;
    Ok(Receipt {
        tx_hash,
        level,
        batch,
        offset,
        path,
        duplicate,
    })
}

/// What a waiter gets from a committed batch: its receipt, or `None` when the state machine
/// found the transaction was sequenced earlier, in a batch this shard may not remember (then
/// the original receipt is looked up).
fn answer(
    c: &Committed,
    tree: &MerkleTree,
    tx_hash: TxHash,
    offset: u32,
    dup: bool,
) -> Option<Result<Receipt, SubmitError>> {
    if c.duplicates.iter().any(|(o, _)| *o == offset) {
        return None;
    }
    Some(receipt_at(
        tree,
        c.seal.as_ref(),
        c.index,
        tx_hash,
        offset,
        AckLevel::Committed,
        dup,
    ))
}

impl ShardState {
    fn new(control: mpsc::Sender<Control>, stages: Stages, origin: Instant) -> ShardState {
        ShardState {
            waiting: HashMap::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            recent_leaves: 0,
            forget: Vec::new(),
            in_flight: 0,
            unsigned: 0,
            control,
            stages,
            origin,
        }
    }

    /// The leader signed batch `seq`: answer the waiters that asked for preconfirmations.
    fn preconfirm(&mut self, seq: u64, seal: SignedHeader) {
        let Some(f) = self.waiting.get_mut(&seq) else {
            return;
        };
        let Some(tree) = f.tree.clone() else {
            return;
        };
        // A seal over other transactions (a leader's forward answer gone astray) would make
        // receipts that do not verify: never use it.
        if seal.header.tx_merkle_root != tree.root() {
            tracing::warn!(
                seq,
                index = seal.header.index,
                "a seal whose Merkle root is not this batch's, ignored"
            );
            return;
        }
        if f.seal.is_none() {
            self.unsigned -= 1;
        }
        f.seal = Some(seal);
        for w in &f.waiters {
            let mut request = w.request.borrow_mut();
            if request.ack == AckLevel::Preconfirmed {
                let r = receipt_at(
                    &tree,
                    Some(&seal),
                    seal.header.index,
                    w.tx_hash,
                    w.offset,
                    AckLevel::Preconfirmed,
                    w.duplicate,
                );
                request.fill(w.slot, r);
            }
        }
    }

    fn resolve(&mut self, seq: u64, result: Result<Committed, SubmitError>) {
        self.in_flight -= 1;
        let Some(f) = self.waiting.remove(&seq) else {
            return;
        };
        if f.seal.is_none() {
            self.unsigned -= 1;
        }
        let tree = f.tree.unwrap_or_else(|| Rc::new(MerkleTree::new(&[])));
        if result.is_err() {
            let slots = f.waiters.iter().filter(|w| !w.duplicate);
            self.forget.extend(slots.map(|w| {
                (
                    w.tx_hash,
                    TxSlot {
                        batch_seq: seq,
                        offset_in_batch: w.offset,
                    },
                )
            }));
        }
        for w in f.waiters {
            match &result {
                Ok(c) => match answer(c, &tree, w.tx_hash, w.offset, w.duplicate) {
                    Some(r) => w.request.borrow_mut().fill(w.slot, r),
                    None => self.look_up(w.request, w.slot, w.tx_hash),
                },
                Err(e) => w.request.borrow_mut().fill(w.slot, Err(e.clone())),
            }
        }
        if let Ok(committed) = result {
            self.recent_leaves += tree.count();
            self.recent.insert(seq, Recent { committed, tree });
            self.recent_order.push_back(seq);
            while self.recent_order.len() > RECENT_BATCHES_MAX
                || (self.recent_leaves > RECENT_LEAVES_MAX && self.recent_order.len() > 1)
            {
                let old = self.recent_order.pop_front().expect("non-empty");
                if let Some(r) = self.recent.remove(&old) {
                    self.recent_leaves -= r.tree.count();
                }
            }
        }
    }

    /// Answers `slot` of `request` with the original receipt of `tx_hash`, from the Raft shard
    /// (on a task: the state machine and log are read there).
    fn look_up(&self, request: RequestRef, slot: usize, tx_hash: TxHash) {
        let control = self.control.clone();
        glommio::spawn_local(async move {
            let r = match committed_receipt(&control, tx_hash).await {
                Some(r) => r.map(|r| Receipt {
                    duplicate: true,
                    ..r
                }),
                // Its earlier batch failed and the shard forgot it meanwhile: retry.
                None => Err(SubmitError::Overloaded {
                    what: "dedup window (retry the submission)",
                }),
            };
            request.borrow_mut().fill(slot, r);
        })
        .detach();
    }
}

/// Shard k: takes groups of transactions, batches them, hands sealed batches to the Raft shard
/// and answers each request when all its transactions are resolved.
async fn batching_shard(
    config: NodeConfig,
    mut batcher: Batcher,
    mut rx: mpsc::Receiver<ShardSubmit>,
    mut propose: mpsc::Sender<Proposal>,
    hashed: HashedBatches,
    control: mpsc::Sender<Control>,
    stages: Stages,
) {
    let origin = Instant::now();
    let state = Rc::new(RefCell::new(ShardState::new(control, stages, origin)));
    loop {
        let msg = match batcher.next_deadline_us() {
            None => rx.next().await,
            Some(deadline) => {
                let wait = Duration::from_micros(deadline.saturating_sub(now_us(origin)));
                let next = rx.next();
                let timer = glommio::timer::sleep(wait);
                futures_util::pin_mut!(next, timer);
                match futures_util::future::select(next, timer).await {
                    futures_util::future::Either::Left((m, _)) => m,
                    futures_util::future::Either::Right(_) => {
                        flush_sealed(&mut batcher, &state, &mut propose, &hashed, now_us(origin))
                            .await;
                        continue;
                    }
                }
            }
        };
        let Some(msg) = msg else { break };
        for (tx_hash, slot) in state.borrow_mut().forget.drain(..) {
            batcher.forget(&tx_hash, slot);
        }
        let ack = msg.ack;
        accept(&mut batcher, &state, msg, origin);
        flush_sealed(&mut batcher, &state, &mut propose, &hashed, now_us(origin)).await;
        // Nothing of this shard's is waiting for what this request waits for (a commit, or for
        // preconfirmations the leader's signature): lingering for company would only add latency
        // (a lone client). While batches are in flight, new transactions linger and gather
        // (batching under load).
        let idle = match ack {
            AckLevel::Committed => state.borrow().in_flight == 0,
            AckLevel::Preconfirmed => state.borrow().unsigned == 0,
        };
        if config.seal_when_idle && idle {
            while let Some(b) = batcher.seal_now() {
                dispatch(b, &state, &mut propose, &hashed).await;
            }
        }
    }
    // Shutting down: hand over what was accepted; the Raft shard answers or fails it.
    while let Some(b) = batcher.seal_now() {
        dispatch(b, &state, &mut propose, &hashed).await;
    }
}

/// Asks the Raft shard for the committed receipt of `tx_hash` (`None` if it was not sequenced).
async fn committed_receipt(
    control: &mpsc::Sender<Control>,
    tx_hash: TxHash,
) -> Option<Result<Receipt, SubmitError>> {
    let (tx, rx) = oneshot::channel();
    control
        .clone()
        .send(Control::Receipt(tx_hash, tx))
        .await
        .ok()?;
    rx.await.ok().flatten()
}

/// How many transactions ahead `accept` asks the CPU to load the dedup window's entries.
const DEDUP_PREFETCH_AHEAD: usize = 8;

/// Pushes a message's transactions into the batcher and registers their waiters; duplicates of
/// transactions committed in batches the shard no longer remembers are looked up on the Raft
/// shard.
fn accept(
    batcher: &mut Batcher,
    state: &Rc<RefCell<ShardState>>,
    msg: ShardSubmit,
    origin: Instant,
) {
    let n = msg.txs.len();
    if n == 0 {
        let _ = msg.reply.send(Vec::new());
        return;
    }
    let stages = state.borrow().stages.clone();
    stages.record_since(Stage::Queue, msg.queued_at);
    let request = Rc::new(RefCell::new(Request {
        results: (0..n).map(|_| None).collect(),
        remaining: n,
        reply: Some(msg.reply),
        ack: msg.ack,
        timing: Some((stages, msg.queued_at)),
    }));
    // Hashed together, several per permutation (keccak_many). A transaction over the size
    // limit is refused by the batcher before its hash is used, so it is not hashed here.
    let mut hashes = Vec::with_capacity(n);
    crate::keccak_many::keccak256_many(
        msg.txs.iter().map(|(_, tx)| match tx.bytes.len() {
            0..=crate::limits::TX_BYTES_MAX => tx.bytes.as_ref(),
            _ => &[][..],
        }),
        &mut hashes,
    );
    for (slot, (position, tx)) in msg.txs.iter().enumerate() {
        // The dedup window's lookup, insert and eviction are cache misses in a table of tens
        // of MiB: start them a few transactions ahead.
        if let Some(later) = hashes.get(slot + DEDUP_PREFETCH_AHEAD) {
            batcher.prefetch(&TxHash(*later), DEDUP_PREFETCH_AHEAD);
        }
        let hash = hashes[slot];
        let incoming = IncomingTx {
            rollup_id: tx.rollup_id,
            kind: tx.kind.clone(),
            bytes: &tx.bytes,
        };
        match batcher.push_hashed(incoming, TxHash(hash), now_us(origin)) {
            Ok(PushOutcome::Accepted { slot: at, tx_hash }) => {
                let w = Waiter {
                    request: request.clone(),
                    slot,
                    tx_hash,
                    offset: at.offset_in_batch,
                    duplicate: false,
                };
                state
                    .borrow_mut()
                    .waiting
                    .entry(at.batch_seq)
                    .or_default()
                    .waiters
                    .push(w);
            }
            Ok(PushOutcome::Duplicate {
                tx_hash,
                first_seen,
            }) => {
                let mut st = state.borrow_mut();
                let w = Waiter {
                    request: request.clone(),
                    slot,
                    tx_hash,
                    offset: first_seen.offset_in_batch,
                    duplicate: true,
                };
                let seq = first_seen.batch_seq;
                if let Some(f) = st.waiting.get_mut(&seq) {
                    // Its batch is being built or in flight; if already preconfirmed, a
                    // preconfirmation request is answered now.
                    if let (Some(seal), Some(tree), AckLevel::Preconfirmed) =
                        (f.seal, &f.tree, request.borrow().ack)
                    {
                        let r = receipt_at(
                            tree,
                            Some(&seal),
                            seal.header.index,
                            tx_hash,
                            w.offset,
                            AckLevel::Preconfirmed,
                            true,
                        );
                        request.borrow_mut().fill(slot, r);
                    }
                    f.waiters.push(w);
                } else if let Some(r) = st.recent.get(&seq) {
                    match answer(&r.committed, &r.tree, tx_hash, w.offset, true) {
                        Some(r) => request.borrow_mut().fill(slot, r),
                        None => st.look_up(request.clone(), slot, tx_hash),
                    }
                } else {
                    // Committed long ago: the Raft shard knows.
                    st.look_up(request.clone(), slot, tx_hash);
                }
            }
            Err(reason) => {
                let err = match reason {
                    crate::batcher::SubmitRejection::SealedQueueFull { .. } => {
                        SubmitError::Overloaded {
                            what: "sealed batch queue",
                        }
                    }
                    reason => SubmitError::Invalid {
                        position: *position,
                        reason,
                    },
                };
                request.borrow_mut().fill(slot, Err(err));
            }
        }
    }
}

async fn flush_sealed(
    batcher: &mut Batcher,
    state: &Rc<RefCell<ShardState>>,
    propose: &mut mpsc::Sender<Proposal>,
    hashed: &HashedBatches,
    now: u64,
) {
    while let Some(b) = batcher.poll_seal(now) {
        dispatch(b, state, propose, hashed).await;
    }
}

/// Sends one sealed batch to the Raft shard (waiting while its queue is full: back-pressure) and
/// resolves the batch's waiters when the answer comes.
async fn dispatch(
    b: SealedBatch,
    state: &Rc<RefCell<ShardState>>,
    propose: &mut mpsc::Sender<Proposal>,
    hashed: &HashedBatches,
) {
    let seq = b.seq;
    let sealed_at = Instant::now();
    let stages = {
        let st = state.borrow();
        let opened = Duration::from_micros(now_us(st.origin).saturating_sub(b.opened_us));
        st.stages.record(Stage::Batching, opened);
        st.stages.clone()
    };
    let (ticket, sealed) = SealTicket::new();
    let bytes = BatchBytes::from_aligned(b.bytes);
    // The state machine applies this batch (wherever it is sequenced) with the hashes found here.
    hashed.remember(
        bytes.as_bytes(),
        KnownHashes {
            leaves: b.tree.leaves().to_vec(),
            tx_hashes: b.tx_hashes,
            root: b.merkle_root,
        },
    );
    {
        let mut st = state.borrow_mut();
        st.in_flight += 1;
        st.unsigned += 1;
        st.waiting.entry(seq).or_default().tree = Some(Rc::new(b.tree));
    }
    let (tx, rx) = oneshot::channel();
    let proposal = Proposal {
        bytes: bytes.with_ticket(ticket),
        reply: tx,
        forwarded: false,
        sealed_at,
    };
    if propose.send(proposal).await.is_err() {
        state
            .borrow_mut()
            .resolve(seq, Err(SubmitError::ShuttingDown));
        return;
    }
    let state = state.clone();
    glommio::spawn_local(async move {
        // The preconfirmation comes first, or never (the batch failed before it was signed).
        let result = {
            futures_util::pin_mut!(rx);
            match futures_util::future::select(sealed, &mut rx).await {
                futures_util::future::Either::Left((Ok(seal), _)) => {
                    stages.record_since(Stage::Preconfirm, sealed_at);
                    state.borrow_mut().preconfirm(seq, seal);
                    rx.await
                }
                futures_util::future::Either::Left((Err(_), _)) => rx.await,
                futures_util::future::Either::Right((r, _)) => r,
            }
        };
        let result = result.unwrap_or(Err(SubmitError::ShuttingDown));
        let answering = Instant::now();
        state.borrow_mut().resolve(seq, result);
        stages.record_since(Stage::Answer, answering);
    })
    .detach();
}

type Sm = crate::raft::state_machine::StateMachine;
type Ls = crate::raft::log_store::LogStore;

/// The Raft shard's queues.
struct RaftQueues {
    /// For forwarded batches that peers hand in.
    propose_tx: mpsc::Sender<Proposal>,
    propose_rx: mpsc::Receiver<Proposal>,
    control_rx: mpsc::Receiver<Control>,
    /// Where the state machine publishes the registered rollups.
    registry: crate::raft::state_machine::RollupRegistry,
    /// Hashes of the batches this node's shards built, for the state machine.
    hashed: HashedBatches,
    /// Told why, if the Raft core stops on its own.
    fatal: futures_channel::oneshot::Sender<String>,
    /// The node's stage latencies.
    stages: Stages,
}

/// Logs the node's stage window every [`STAGE_REPORT_INTERVAL`] while the target
/// `baton_core::stages` is enabled at `info` (windows with nothing recorded are not logged).
/// When it is off, windows are left to [`crate::node::NodeHandle::stages`].
async fn report_stages(id: u64, stages: Stages) {
    loop {
        glommio::timer::sleep(STAGE_REPORT_INTERVAL).await;
        if tracing::enabled!(target: "baton_core::stages", tracing::Level::INFO) {
            let report = stages.take();
            if !report.is_empty() {
                tracing::info!(target: "baton_core::stages", node = id, "{report}");
            }
        }
    }
}

/// Log bytes a node applies before its size rule starts counting towards its first snapshot:
/// `(id mod 4) / 8` of the minimum, so the nodes of a 3-node cluster (ids 1-3) build theirs
/// an eighth of the minimum apart (32 MiB of log by default: about a second at 200k tx/s), not
/// all at once on a machine they share or at the same moment of a load they share.
fn snapshot_phase_bytes(id: u64, min_bytes: u64) -> u64 {
    min_bytes / 8 * (id % 4)
}

/// Shard 0's Raft side: opens storage, runs Raft, serves peer RPCs, proposes sealed batches and
/// answers control requests.
async fn raft_shard<F>(
    config: NodeConfig,
    raft_config: Arc<openraft::Config>,
    peers: Peers<F>,
    queues: RaftQueues,
    ready: Ready,
) where
    F: RaftNetworkFactory<TypeConfig> + 'static,
    F::Network: openraft::network::NetSnapshot<TypeConfig, SnapshotData = SnapshotBlob>,
{
    let RaftQueues {
        propose_tx,
        mut propose_rx,
        mut control_rx,
        registry,
        hashed,
        fatal,
        stages,
    } = queues;
    let id = config.id;
    let fail = |reason: String| NodeError::Raft { id, reason };
    tracing::info!(node = id, dir = %config.data_dir.display(), "opening the log");
    let log_store = match Ls::open(&config.data_dir, config.wal.clone()).await {
        Ok((l, report)) => {
            tracing::info!(node = id, verdict = ?report.verdict, "log recovered");
            l
        }
        Err(e) => {
            let _ = ready.send(Err(fail(e.to_string())));
            return;
        }
    };
    log_store.set_signer(id, config.signer.clone());
    log_store.set_stages(stages.clone());
    let log_reader = log_store.reader();
    // Proofs of recently proven batches, for the receipts of their duplicates and reads.
    let proofs = ProofCache::default();
    let wal_shutdown = log_store.wal().shutdown_handle();
    let (sm, mut snapshot_asked) = match Sm::open(&config.data_dir) {
        Ok(sm) => sm
            .with_registry(registry)
            .with_hashed(hashed)
            .with_stages(stages.clone())
            .with_reserved_index()
            .with_snapshot_by_size(
                config.raft.snapshot_log_bytes_min,
                config.raft.snapshot_log_ratio,
                snapshot_phase_bytes(id, config.raft.snapshot_log_bytes_min),
            ),
        Err(e) => {
            let _ = ready.send(Err(fail(e.to_string())));
            return;
        }
    };
    let Peers {
        factory,
        inbound,
        forwarder,
        on_stop,
    } = peers;
    let forwarder: Option<Rc<dyn Forwarder>> = forwarder.map(Rc::from);
    let view = sm.view();
    let raft = match openraft::Raft::new(id, raft_config, factory, log_store, sm).await {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(fail(e.to_string())));
            return;
        }
    };
    let server = glommio::spawn_local(serve(raft.clone(), inbound, propose_tx, stages.clone()));
    // Snapshots the state machine asks for by the log's size (openraft's own policy counts
    // entries). Ends when the state machine is dropped with Raft.
    let snapshot_by_size = {
        let raft = raft.clone();
        glommio::spawn_local(async move {
            while snapshot_asked.next().await.is_some() {
                if raft.trigger().snapshot().await.is_err() {
                    break;
                }
            }
        })
    };
    // A storage error stops openraft's core for good, and the node with it: it says why (once,
    // here, instead of an error per incoming request) to whoever runs it. openraft reports the
    // stop only in its metrics, so this task is polled at each metrics update (a local task on
    // this shard reading one field: no thread is woken for it).
    let core_watch = {
        use openraft::async_runtime::WatchReceiver;
        let mut metrics = raft.metrics();
        glommio::spawn_local(async move {
            loop {
                let stopped = match &metrics.borrow_watched().running_state {
                    Ok(()) => None,
                    Err(openraft::error::Fatal::Stopped) => return,
                    Err(e) => Some(e.to_string()),
                };
                if let Some(reason) = stopped {
                    tracing::error!(
                        node = id,
                        %reason,
                        "the Raft core stopped: this node no longer takes part; restart it (it \
                         recovers from its log)"
                    );
                    let _ = fatal.send(reason);
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    let _ = ready.send(Ok(()));
    drop(ready);

    // Proposer: one task per batch, bounded by the in-flight semaphore; openraft groups
    // concurrent writes into one append.
    let lease_wait = Duration::from_millis(2 * config.raft.election_timeout_max_ms);
    let commit_wait = Duration::from_millis(config.commit_wait_ms);
    let in_flight = Rc::new(glommio::sync::Semaphore::new(
        config.proposals_in_flight_max as u64,
    ));
    let sealer = glommio::spawn_local(super::blocks::seal_blocks(
        raft.clone(),
        view.clone(),
        config.signer.clone(),
        (lease_wait, commit_wait),
    ));
    let reporter = glommio::spawn_local(report_stages(id, stages.clone()));
    let proposer = {
        let forwarder = forwarder.clone();
        let raft = raft.clone();
        let stages = stages.clone();
        glommio::spawn_local(async move {
            while let Some(p) = propose_rx.next().await {
                let Ok(permit) = in_flight.acquire_static_permit(1).await else {
                    break;
                };
                let raft = raft.clone();
                let forwarder = forwarder.clone().filter(|_| !p.forwarded);
                let stages = stages.clone();
                stages.record_since(Stage::ToRaft, p.sealed_at);
                glommio::spawn_local(async move {
                    let waits = (lease_wait, commit_wait);
                    let started = Instant::now();
                    let result = sequence(&raft, forwarder, p.bytes, waits).await;
                    stages.record_since(Stage::Commit, started);
                    let _ = p.reply.send(result);
                    drop(permit);
                })
                .detach();
            }
        })
    };

    let mut shutdown_reply = None;
    // Set while a leadership transfer runs on this shard (one at a time).
    let transferring = Rc::new(std::cell::Cell::new(false));
    while let Some(c) = control_rx.next().await {
        match c {
            Control::Status(reply) => {
                let _ = reply.send(status_of(&raft));
            }
            // Handled on their own tasks so a busy state machine never holds up Status or
            // Shutdown. Lookups are bounded: each shard awaits its own, one at a time.
            Control::Initialize(members, reply) => {
                let raft = raft.clone();
                glommio::spawn_local(async move {
                    let r = raft.initialize(members).await.map_err(|e| e.to_string());
                    let _ = reply.send(r);
                })
                .detach();
            }
            Control::Lookup(tx_hash, reply) => {
                let raft = raft.clone();
                glommio::spawn_local(async move {
                    let found = raft
                        .with_state_machine(move |sm: &mut Sm| {
                            let found = sm.lookup(&tx_hash).map(|p| (p.index, p.offset));
                            Box::pin(async move { found })
                        })
                        .await
                        .ok()
                        .flatten();
                    let _ = reply.send(found);
                })
                .detach();
            }
            Control::Receipt(tx_hash, reply) => {
                let raft = raft.clone();
                let proofs = proofs.clone();
                let reader = log_reader.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(receipt_of(&raft, reader, &proofs, tx_hash).await);
                })
                .detach();
            }
            Control::WaitFor(condition, timeout, reply) => {
                let raft = raft.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(wait_for(&raft, condition, timeout).await);
                })
                .detach();
            }
            Control::Command(command, reply) => {
                let (raft, view) = (raft.clone(), view.clone());
                glommio::spawn_local(async move {
                    let waits = (lease_wait, commit_wait);
                    let r = super::blocks::run_command(&raft, &view, command, waits).await;
                    let _ = reply.send(r);
                })
                .detach();
            }
            Control::Read(consistency, timeout, read) => {
                let (raft, view, forwarder) = (raft.clone(), view.clone(), forwarder.clone());
                glommio::spawn_local(async move {
                    let barrier =
                        super::blocks::barrier(&raft, forwarder.as_ref(), consistency, timeout);
                    match barrier.await {
                        Ok(()) => {
                            let applied = super::blocks::applied_index(&view);
                            view.with(|s| read(Ok((applied, s))));
                        }
                        Err(e) => read(Err(e)),
                    }
                })
                .detach();
            }
            Control::BlockTxs(rollup_id, height, consistency, timeout, reply) => {
                let (raft, view, forwarder) = (raft.clone(), view.clone(), forwarder.clone());
                let reader = log_reader.clone();
                glommio::spawn_local(async move {
                    let barrier =
                        super::blocks::barrier(&raft, forwarder.as_ref(), consistency, timeout);
                    let r = match barrier.await {
                        Ok(()) => {
                            Ok(super::blocks::block_txs(&view, reader, rollup_id, height).await)
                        }
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                })
                .detach();
            }
            Control::Tx(tx_hash, consistency, timeout, reply) => {
                let (raft, view, forwarder) = (raft.clone(), view.clone(), forwarder.clone());
                let (reader, proofs) = (log_reader.clone(), proofs.clone());
                glommio::spawn_local(async move {
                    let barrier =
                        super::blocks::barrier(&raft, forwarder.as_ref(), consistency, timeout);
                    let r = match barrier.await {
                        Ok(()) => Ok(super::blocks::tx_info(
                            &raft, &view, reader, &proofs, tx_hash,
                        )
                        .await),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                })
                .detach();
            }
            Control::TransferLeader(to, reply) => {
                if transferring.get() {
                    let busy = LeadershipRejection::InProgress;
                    let _ = reply.send(Err(SubmitError::Leadership(busy)));
                    continue;
                }
                transferring.set(true);
                let raft = raft.clone();
                let transferring = transferring.clone();
                glommio::spawn_local(async move {
                    // A candidate must have answered within the longest election timeout.
                    let recent = lease_wait / 2;
                    let r = transfer_leader(&raft, to, recent, lease_wait).await;
                    transferring.set(false);
                    let _ = reply.send(r);
                })
                .detach();
            }
            Control::ChangeMembers(change, catch_up, reply) => {
                let raft = raft.clone();
                glommio::spawn_local(async move {
                    let r =
                        super::members::change_members(&raft, change, catch_up, commit_wait).await;
                    let _ = reply.send(r);
                })
                .detach();
            }
            Control::ReadIndex(reply) => {
                let raft = raft.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(super::peer::leader_read_index(&raft).await);
                })
                .detach();
            }
            Control::Stall(pause, reply) => {
                // Fault injection: the whole shard stops, as in a long GC-like pause or CPU
                // starvation.
                std::thread::sleep(pause);
                let _ = reply.send(());
            }
            Control::Shutdown(reply) => {
                shutdown_reply = Some(reply);
                break;
            }
        }
    }
    // Asked to stop, or every handle is gone. A leader first hands leadership to a voter that
    // is up to date, so that writes go on after one round instead of an election timeout.
    if shutdown_reply.is_some() {
        hand_over(&raft, lease_wait, &transferring).await;
    }
    if let Some(on_stop) = on_stop {
        on_stop();
    }
    server.cancel().await;
    sealer.cancel().await;
    snapshot_by_size.cancel().await;
    let _ = raft.shutdown().await;
    core_watch.cancel().await;
    // The purge point and committed id openraft asked for last are saved in the background:
    // let that finish (a failure was logged when it happened).
    let _ = log_reader.written_behind().await;
    // Tasks of the stopped Raft may still hold the log store: close the WAL so none of them can
    // write again and the directory can be reopened.
    wal_shutdown.shutdown().await;
    proposer.cancel().await;
    reporter.cancel().await;
    if let Some(reply) = shutdown_reply {
        let _ = reply.send(());
    }
}

/// If this node leads and another voter answered it lately, asks openraft to transfer
/// leadership to the voter whose log matches furthest, and waits (at most `wait`) until another
/// node leads. The node keeps serving meanwhile. Returns the new leader, if there is one in time.
async fn hand_over(
    raft: &openraft::Raft<TypeConfig, Sm>,
    wait: Duration,
    transferring: &std::cell::Cell<bool>,
) -> Option<u64> {
    if !raft.is_leader() {
        return None;
    }
    if transferring.get() {
        // An operator's transfer is under way: wait for its outcome instead of starting another.
        let me = raft_id(raft);
        let other =
            move |s: &NodeStatus| s.role != Role::Leader && s.leader.is_some_and(|l| l != me);
        return wait_for(raft, Box::new(other), wait).await.ok()?.leader;
    }
    tracing::info!("stopping: handing leadership over");
    // Only a voter heard from within a quarter of `wait` (half the longest election timeout):
    // when the whole cluster stops, the others are gone already and waiting for one of them to
    // take over would only delay this node's stop.
    match transfer_leader(raft, None, wait / 4, wait).await {
        Ok(moved) => {
            tracing::info!(leader = moved.leader, "leadership handed over");
            Some(moved.leader)
        }
        Err(SubmitError::Leadership(LeadershipRejection::NoCandidate)) => {
            tracing::info!("stopping: no voter heard from lately to hand leadership to");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "stopping anyway");
            None
        }
    }
}

/// Moves leadership from this node (which must lead) to voter `to`, or with `None` to the voter
/// whose log matches furthest. Only a voter that answered the leader within `recent` is a
/// candidate: transferring to a silent one would stop this node's writes and heartbeats for
/// nothing, and leave the cluster to an election. None while the membership is changing (the transfer would cut the change short, or pick a
/// voter the change removes). Then waits at most `wait` for the target to lead: another node
/// winning an election instead is `TakenOverBy`, not success.
pub(crate) async fn transfer_leader(
    raft: &openraft::Raft<TypeConfig, Sm>,
    to: Option<u64>,
    recent: Duration,
    wait: Duration,
) -> Result<LeaderTransferred, SubmitError> {
    let status = status_of(raft);
    if status.role != Role::Leader {
        return Err(SubmitError::NotLeader {
            leader_hint: status.leader.filter(|l| *l != status.id),
        });
    }
    let refuse = |r| Err(SubmitError::Leadership(r));
    if membership_changing(raft) {
        return refuse(LeadershipRejection::InProgress);
    }
    let me = status.id;
    let recent = recent.as_millis() as u64;
    let heard = |id: u64| {
        status
            .replication
            .iter()
            .any(|p| p.id == id && p.last_heard_ms.is_some_and(|ms| ms < recent))
    };
    let voter = |id: u64| status.members.iter().any(|m| m.id == id && m.voter);
    let to = match to {
        Some(id) if id == me => {
            return Ok(LeaderTransferred {
                from: me,
                leader: me,
                term: status.term,
            })
        }
        Some(id) => match status.members.iter().find(|m| m.id == id) {
            None => return refuse(LeadershipRejection::NotAMember { id }),
            Some(m) if !m.voter => return refuse(LeadershipRejection::NotAVoter { id }),
            Some(_) if !heard(id) => return refuse(LeadershipRejection::Unreachable { id }),
            Some(_) => id,
        },
        None => match status
            .replication
            .iter()
            .filter(|p| p.id != me && voter(p.id) && heard(p.id))
            .max_by_key(|p| p.matched_index)
        {
            Some(p) => p.id,
            None => return refuse(LeadershipRejection::NoCandidate),
        },
    };
    tracing::info!(to, "transferring leadership");
    // An error: the core stopped (this node is shutting down).
    raft.trigger()
        .transfer_leader(to)
        .await
        .map_err(|_| SubmitError::ShuttingDown)?;
    let other = move |s: &NodeStatus| s.role != Role::Leader && s.leader.is_some_and(|l| l != me);
    match wait_for(raft, Box::new(other), wait).await {
        Ok(s) if s.leader == Some(to) => Ok(LeaderTransferred {
            from: me,
            leader: to,
            term: s.term,
        }),
        Ok(s) => {
            let leader = s.leader.unwrap_or_default();
            tracing::warn!(to, leader, "another node won an election instead");
            refuse(LeadershipRejection::TakenOverBy { leader })
        }
        Err(s) => {
            tracing::warn!(role = ?s.role, leader = ?s.leader, "no other leader in time");
            refuse(LeadershipRejection::NotTakenOver {
                waited_ms: wait.as_millis() as u64,
            })
        }
    }
}

/// True while the membership is joint, or its latest entry is not committed yet.
fn membership_changing(raft: &openraft::Raft<TypeConfig, Sm>) -> bool {
    use openraft::async_runtime::WatchReceiver;
    let m = raft.metrics().borrow_watched().clone();
    let joint = m.membership_config.membership().get_joint_config().len() > 1;
    let entry = m.membership_config.log_id().as_ref().map(|l| l.index);
    let committed = m.local_committed.as_ref().map(|l| l.index);
    joint || entry > committed
}

/// Sequences one batch: proposes it here when this node leads; otherwise, with a forwarder,
/// hands it to the leader, following leader changes (bounded by `commit_wait`). Retrying a
/// batch whose earlier attempt did commit is safe: the state machine reports its transactions
/// as duplicates with their original positions.
async fn sequence(
    raft: &openraft::Raft<TypeConfig, Sm>,
    forwarder: Option<Rc<dyn Forwarder>>,
    bytes: BatchBytes,
    (lease_wait, commit_wait): (Duration, Duration),
) -> Result<Committed, SubmitError> {
    let id = raft_id(raft);
    let deadline = Instant::now() + commit_wait;
    loop {
        let result = propose_one(raft, bytes.clone(), lease_wait, commit_wait).await;
        let (Some(forwarder), Err(SubmitError::NotLeader { leader_hint })) = (&forwarder, &result)
        else {
            return result;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let leader = match leader_hint.filter(|&l| l != id) {
            Some(l) => l,
            None => {
                // No leader known (an election is running): wait for one, then try again.
                let known = move |s: &NodeStatus| s.leader.is_some() || s.role == Role::Leader;
                if left.is_zero() || wait_for(raft, Box::new(known), left).await.is_err() {
                    return result;
                }
                continue;
            }
        };
        if raft.is_leader() {
            // This node is handing leadership over: openraft already names the target while
            // this node still leads. Forwarding now would race the takeover (and every change
            // of this node's metrics would send the batch again): wait until it has stepped
            // down, then go again.
            let stepped_down = |s: &NodeStatus| s.role != Role::Leader;
            let wait = left.min(lease_wait);
            if wait.is_zero() || wait_for(raft, Box::new(stepped_down), wait).await.is_err() {
                return result;
            }
            continue;
        }
        let addr = member_addr(raft, leader).unwrap_or_default();
        // A leader that dies with our batch in flight never answers (until its connection times
        // out): once this node hears of a new leader, or the deadline passes, stop waiting and
        // send the batch again; the state machine reports whatever already committed as
        // duplicates with their original positions.
        let forward = forwarder.forward(leader, addr, bytes.clone());
        let moved = move |s: &NodeStatus| s.leader.is_some_and(|l| l != leader);
        let changed = wait_for(raft, Box::new(moved), left);
        futures_util::pin_mut!(forward, changed);
        let outcome = match futures_util::future::select(forward, changed).await {
            futures_util::future::Either::Left((r, _)) => r,
            futures_util::future::Either::Right((Ok(_), _)) => continue,
            futures_util::future::Either::Right((Err(_), _)) => {
                return Err(SubmitError::CommitTimeout {
                    waited_ms: commit_wait.as_millis() as u64,
                })
            }
        };
        match outcome {
            // The link may have failed, or the leader was deposed: wait (at most about an
            // election) for this node to hear of another leader, then try again either way,
            // until the deadline.
            Err(SubmitError::NotLeader { .. }) if !left.is_zero() => {
                let moved = move |s: &NodeStatus| s.leader.is_some_and(|l| l != leader);
                let _ = wait_for(raft, Box::new(moved), left.min(lease_wait / 2)).await;
            }
            other => return other,
        }
    }
}

/// A committed batch's Merkle tree and the leader's signed header: what proves its transactions.
struct BatchProof {
    tree: MerkleTree,
    seal: SignedHeader,
}

type ProofFuture = futures_util::future::Shared<
    futures_util::future::LocalBoxFuture<'static, Option<Rc<BatchProof>>>,
>;

/// Batches whose proofs the Raft shard keeps at hand.
const PROOF_CACHE_BATCHES: usize = 8;

/// The proofs of the last few batches the Raft shard proved transactions of, built once per
/// batch: the duplicates of one batch (a client retrying a request after a leader change, a
/// follower re-forwarding) arrive together, and each one would otherwise read the batch from the
/// log and hash all of its transactions and its tree again. A batch being read is shared by
/// every lookup that asks for it meanwhile.
#[derive(Clone, Default)]
pub(crate) struct ProofCache(Rc<RefCell<VecDeque<(u64, ProofFuture)>>>);

impl ProofCache {
    /// The proof of the committed batch at `index` (`None` if the log no longer has it, or it
    /// carries no signed header).
    async fn get(&self, reader: crate::raft::LogReader, index: u64) -> Option<Rc<BatchProof>> {
        use futures_util::FutureExt;
        let cached = self
            .0
            .borrow()
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, f)| f.clone());
        let proof = match cached {
            Some(f) => f,
            None => {
                let f = proof_from_log(reader, index).boxed_local().shared();
                let mut cache = self.0.borrow_mut();
                cache.push_back((index, f.clone()));
                if cache.len() > PROOF_CACHE_BATCHES {
                    cache.pop_front();
                }
                f
            }
        };
        let found = proof.await;
        if found.is_none() {
            // Not kept: a later lookup reads the log again.
            self.0.borrow_mut().retain(|(i, _)| *i != index);
        }
        found
    }
}

/// Reads the batch at `index` from the log and builds its proof.
async fn proof_from_log(mut reader: crate::raft::LogReader, index: u64) -> Option<Rc<BatchProof>> {
    use openraft::storage::RaftLogReader;
    let entries = reader.try_get_log_entries(index..index + 1).await.ok()?;
    // Anything else: purged into a snapshot.
    let openraft::EntryPayload::Normal(batch) = &entries.first()?.payload else {
        return None;
    };
    let archived = batch.batch().ok()?;
    // A batch of a leader without a signing key carries no signed header.
    let seal = *batch.seal()?;
    let mut raw = Vec::with_capacity(archived.txs.len());
    crate::keccak_many::keccak256_many(archived.txs.iter().map(|t| t.bytes.as_slice()), &mut raw);
    let hashes: Vec<TxHash> = raw.into_iter().map(TxHash).collect();
    Some(Rc::new(BatchProof {
        tree: MerkleTree::new(&hashes),
        seal,
    }))
}

/// The committed receipt of `tx_hash`: its position from the state machine, its Merkle path and
/// the leader's signed header from the batch's entry in the log (through `proofs`). `None` if
/// this node has not applied it.
pub(crate) async fn receipt_of(
    raft: &openraft::Raft<TypeConfig, Sm>,
    reader: crate::raft::LogReader,
    proofs: &ProofCache,
    tx_hash: TxHash,
) -> Option<Result<Receipt, SubmitError>> {
    let found = raft
        .with_state_machine(move |sm: &mut Sm| {
            let found = sm.lookup(&tx_hash);
            Box::pin(async move { found })
        })
        .await
        .ok()
        .flatten();
    let position = found?;
    let index = position.index;
    let Some(proof) = proofs.get(reader, index).await else {
        return Some(Err(SubmitError::ReceiptUnavailable { index }));
    };
    Some(receipt_at(
        &proof.tree,
        Some(&proof.seal),
        index,
        tx_hash,
        position.offset,
        AckLevel::Committed,
        false,
    ))
}

/// The Raft of a node.
pub(crate) type Raft = openraft::Raft<TypeConfig, Sm>;

fn raft_id(raft: &openraft::Raft<TypeConfig, Sm>) -> u64 {
    use openraft::async_runtime::WatchReceiver;
    raft.metrics().borrow_watched().id
}

/// The membership address of node `id`.
pub(crate) fn member_addr(raft: &openraft::Raft<TypeConfig, Sm>, id: u64) -> Option<String> {
    use openraft::async_runtime::WatchReceiver;
    let m = raft.metrics().borrow_watched().clone();
    let node = m.membership_config.membership().get_node(&id)?;
    Some(node.addr.clone())
}

/// Proposes one batch and maps what applying it returned to its receipt data.
async fn propose_one(
    raft: &openraft::Raft<TypeConfig, Sm>,
    bytes: BatchBytes,
    lease_wait: Duration,
    commit_wait: Duration,
) -> Result<Committed, SubmitError> {
    let (index, data) = propose_entry(raft, bytes, (lease_wait, commit_wait)).await?;
    if data.rejected {
        return Err(SubmitError::Rejected { index });
    }
    Ok(Committed {
        index,
        seal: data.seal,
        duplicates: data
            .duplicates
            .iter()
            .map(|d| (d.offset, (d.original.index, d.original.offset)))
            .collect(),
    })
}

/// Proposes one entry (a batch or a command); returns its index and what applying it returned.
/// A leader refuses writes until a quorum has acknowledged it in its term (its lease); right
/// after an election, or after a stall that let the lease lapse, that is a matter of a round
/// trip, so while it is still leader it waits for its log to commit and tries again, until
/// `lease_wait` (twice the longest election timeout) has passed.
pub(crate) async fn propose_entry(
    raft: &openraft::Raft<TypeConfig, Sm>,
    bytes: BatchBytes,
    (lease_wait, commit_wait): (Duration, Duration),
) -> Result<(u64, crate::raft::ApplyResult), SubmitError> {
    let deadline = Instant::now() + lease_wait;
    loop {
        match write_once(raft, bytes.clone(), commit_wait).await {
            // Still leader but without a valid lease: wait (bounded) for the log to commit
            // (a quorum acked this term), then try again.
            Err(SubmitError::NotLeader { leader_hint: None })
                if raft.is_leader() && Instant::now() < deadline =>
            {
                let left = deadline.saturating_duration_since(Instant::now());
                if !wait_quorum_ack(raft, quorum_acked(raft), left).await {
                    return Err(SubmitError::NotLeader { leader_hint: None });
                }
            }
            other => return other,
        }
    }
}

/// When a quorum last acknowledged this node as leader (openraft's metrics).
fn quorum_acked(raft: &openraft::Raft<TypeConfig, Sm>) -> Option<Instant> {
    use openraft::async_runtime::WatchReceiver;
    raft.metrics()
        .borrow_watched()
        .last_quorum_acked
        .as_ref()
        .map(|t| **t)
}

/// Waits, at most `timeout`, until a quorum acknowledges this leader after `since` (which renews
/// its lease); false if it stopped leading or the time ran out.
///
/// This waits for an event. Retrying the write until the lease is back would be a loop of
/// tasks waking each other (proposer, Raft core) that never leaves the executor's run queue: the
/// heartbeat answers that renew the lease arrive as wake-ups from the network thread, which the
/// executor only handles when it returns to its reactor. That loop kept a leader whose lease had
/// lapsed in a stall from ever renewing it (docs/performance.md, the wedge).
async fn wait_quorum_ack(
    raft: &openraft::Raft<TypeConfig, Sm>,
    since: Option<Instant>,
    timeout: Duration,
) -> bool {
    use openraft::async_runtime::WatchReceiver;
    let mut metrics = raft.metrics();
    let acked = async {
        loop {
            {
                let m = metrics.borrow_watched();
                if m.state != openraft::ServerState::Leader {
                    return false;
                }
                let now = m.last_quorum_acked.as_ref().map(|t| **t);
                if now > since {
                    return true;
                }
            }
            if metrics.changed().await.is_err() {
                return false;
            }
        }
    };
    super::blocks::tokio_free_timeout(acked, timeout)
        .await
        .unwrap_or(false)
}

/// One `client_write`, bounded by `commit_wait`: a leader cut off from its quorum keeps writes
/// pending indefinitely, and the submitter must hear that the outcome is unknown.
async fn write_once(
    raft: &openraft::Raft<TypeConfig, Sm>,
    bytes: BatchBytes,
    commit_wait: Duration,
) -> Result<(u64, crate::raft::ApplyResult), SubmitError> {
    use openraft::error::{ClientWriteError, RaftError};
    let write = raft.client_write(bytes);
    let timer = glommio::timer::sleep(commit_wait);
    futures_util::pin_mut!(write, timer);
    let result = match futures_util::future::select(write, timer).await {
        futures_util::future::Either::Left((r, _)) => r,
        futures_util::future::Either::Right(_) => {
            return Err(SubmitError::CommitTimeout {
                waited_ms: commit_wait.as_millis() as u64,
            })
        }
    };
    match result {
        Ok(resp) => Ok((resp.log_id.index, resp.data)),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(SubmitError::NotLeader {
                leader_hint: f.leader_id,
            })
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(_))) => {
            Err(SubmitError::Overloaded {
                what: "membership change",
            })
        }
        // The entry was overwritten by a new leader before it committed: not sequenced.
        Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_))) => {
            Err(SubmitError::NotLeader { leader_hint: None })
        }
        Err(RaftError::APIError(ClientWriteError::PreconditionFailed(_))) => {
            Err(SubmitError::NotLeader { leader_hint: None })
        }
        Err(RaftError::Fatal(_)) => Err(SubmitError::ShuttingDown),
    }
}

pub(crate) fn status_of(raft: &openraft::Raft<TypeConfig, Sm>) -> NodeStatus {
    use openraft::async_runtime::WatchReceiver;
    let m = raft.metrics().borrow_watched().clone();
    let role = match m.state {
        openraft::ServerState::Leader => Role::Leader,
        openraft::ServerState::Follower => Role::Follower,
        openraft::ServerState::Candidate => Role::Candidate,
        openraft::ServerState::Learner => Role::Learner,
        openraft::ServerState::Shutdown => Role::Shutdown,
    };
    let membership = m.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let heard_ms = |id: &u64| {
        m.heartbeat
            .as_ref()
            .and_then(|h| h.get(id).cloned().flatten())
            .map(|at| at.elapsed().as_millis() as u64)
    };
    NodeStatus {
        id: m.id,
        role,
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index,
        committed_index: m.local_committed.map(|l| l.index),
        applied_index: m.last_applied.map(|l| l.index),
        snapshot_index: m.snapshot.map(|l| l.index),
        purged_index: m.purged.map(|l| l.index),
        members: membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
            })
            .collect(),
        replication: m
            .replication
            .iter()
            .flatten()
            .filter(|(id, _)| **id != m.id)
            .map(|(id, matched)| PeerProgress {
                id: *id,
                matched_index: matched.as_ref().map(|l| l.index),
                last_heard_ms: heard_ms(id),
            })
            .collect(),
        // Filled in by `NodeHandle`, which knows the key's address.
        signer: crate::sign::Address::default(),
    }
}

pub(crate) async fn wait_for(
    raft: &openraft::Raft<TypeConfig, Sm>,
    condition: crate::node::handle::StatusCondition,
    timeout: Duration,
) -> Result<NodeStatus, NodeStatus> {
    use openraft::async_runtime::WatchReceiver;
    let mut metrics = raft.metrics();
    let watch = async {
        loop {
            let status = status_of(raft);
            if condition(&status) {
                return status;
            }
            if metrics.changed().await.is_err() {
                return status;
            }
        }
    };
    let timer = glommio::timer::sleep(timeout);
    futures_util::pin_mut!(watch, timer);
    match futures_util::future::select(watch, timer).await {
        futures_util::future::Either::Left((s, _)) if condition(&s) => Ok(s),
        futures_util::future::Either::Left((s, _)) => Err(s),
        futures_util::future::Either::Right(_) => Err(status_of(raft)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchHeader;

    /// A thread asleep in a blocking call is woken by `wake` (the handler is installed: the
    /// signal's default action, ignore, would not end the sleep), and the process lives on.
    #[test]
    fn a_shard_thread_asleep_is_woken() {
        let wake = Arc::new(ShardWake::default());
        assert!(!wake.wake(), "no thread yet");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let sleeper = {
            let wake = wake.clone();
            std::thread::spawn(move || {
                let thread = wake.set_thread();
                // SAFETY: pause() only waits for a signal.
                let rc = unsafe { libc::pause() };
                drop(thread);
                let _ = done_tx.send(rc);
            })
        };
        // Until the sleeper has signalled, keep waking it (it may not be in pause() yet).
        let deadline = Instant::now() + Duration::from_secs(10);
        let rc = loop {
            wake.wake();
            match done_rx.recv_timeout(Duration::from_millis(20)) {
                Ok(rc) => break rc,
                Err(_) => assert!(Instant::now() < deadline, "the wake never ended pause()"),
            }
        };
        assert_eq!(rc, -1, "pause() returns -1 (EINTR) when a handler ran");
        sleeper.join().unwrap();
        assert!(!wake.wake(), "a thread that is done is not signalled");
    }

    /// Soak: shards started over and over on busy CPUs all come up. Before `ShardWake`, an
    /// executor that parked before its first task ran slept for good: stuck within 100–1,000
    /// starts of three shards on the 2-core machine.
    #[test]
    #[ignore = "soak: 2,000 shard starts on busy CPUs, about two minutes"]
    fn shards_started_on_busy_cpus_all_come_up() {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy: Vec<_> = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let config = NodeConfig::new(1, std::env::temp_dir());
        let started = Instant::now();
        for round in 0..2_000 {
            if started.elapsed() > Duration::from_secs(300) {
                break;
            }
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), NodeError>>();
            let wakes: Vec<Arc<ShardWake>> = (0..3).map(|_| Arc::default()).collect();
            let threads: Vec<_> = (0..3)
                .map(|k| {
                    spawn_shard(
                        &config,
                        k,
                        wakes[k].clone(),
                        ready_tx.clone(),
                        |ready| async move {
                            glommio::timer::sleep(Duration::from_millis(1)).await;
                            let _ = ready.send(Ok(()));
                        },
                    )
                    .unwrap()
                })
                .collect();
            drop(ready_tx);
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut reported = 0;
            while reported < 3 {
                match ready_rx.recv_timeout(START_WAKE_EVERY) {
                    Ok(r) => {
                        r.unwrap();
                        reported += 1;
                    }
                    Err(_) => {
                        assert!(
                            Instant::now() < deadline,
                            "round {round}: a shard never ran"
                        );
                        wakes.iter().for_each(|w| {
                            w.wake();
                        });
                    }
                }
            }
            threads.into_iter().for_each(|t| t.join().unwrap());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        busy.into_iter().for_each(|t| t.join().unwrap());
    }

    /// A shard state with batch 1 sealed over `hashes`, one preconfirmed request waiting on it.
    fn waiting_on(
        hashes: &[TxHash],
    ) -> (
        ShardState,
        oneshot::Receiver<Vec<Result<Receipt, SubmitError>>>,
    ) {
        let (control, _) = mpsc::channel(1);
        let mut st = ShardState::new(control, Stages::default(), Instant::now());
        let (reply, answered) = oneshot::channel();
        let request = Rc::new(RefCell::new(Request {
            results: vec![None],
            remaining: 1,
            reply: Some(reply),
            ack: AckLevel::Preconfirmed,
            timing: None,
        }));
        st.in_flight += 1;
        st.unsigned += 1;
        let f = st.waiting.entry(1).or_default();
        f.tree = Some(Rc::new(MerkleTree::new(hashes)));
        f.waiters.push(Waiter {
            request,
            slot: 0,
            tx_hash: hashes[0],
            offset: 0,
            duplicate: false,
        });
        (st, answered)
    }

    fn seal_over(root: [u8; 32]) -> SignedHeader {
        let header = BatchHeader {
            term: 2,
            index: 9,
            prev_batch_hash: [0; 32],
            tx_merkle_root: root,
            tx_count: 2,
            timestamp_us: 1,
        };
        SignedHeader::sign(header, &crate::sign::Signer::random())
    }

    #[test]
    fn a_seal_over_other_transactions_preconfirms_nothing() {
        let hashes = [TxHash::of(b"a"), TxHash::of(b"b")];
        let (mut st, mut answered) = waiting_on(&hashes);
        st.preconfirm(1, seal_over(MerkleTree::new(&[TxHash::of(b"c")]).root()));
        assert_eq!(st.unsigned, 1, "still unsigned");
        assert!(st.waiting[&1].seal.is_none());
        assert!(matches!(answered.try_recv(), Ok(None)), "nobody answered");
        // The batch's own seal answers the request at the preconfirmed level.
        st.preconfirm(1, seal_over(MerkleTree::new(&hashes).root()));
        assert_eq!(st.unsigned, 0);
        let receipts = answered.try_recv().unwrap().expect("answered");
        let r = receipts[0].as_ref().expect("a receipt");
        assert_eq!(
            (r.level, r.index(), r.offset),
            (AckLevel::Preconfirmed, 9, 0)
        );
    }
}
