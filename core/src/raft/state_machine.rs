//! [`StateMachine`]: openraft's `RaftStateMachine` around the pure [`Sequencer`], in memory.
//!
//! - Normal entries go to [`Sequencer::apply_batch`]. A batch whose content is invalid (it fails
//!   validation or its Merkle root) was still committed: every node rejects the same bytes the
//!   same way, records the entry as applied and answers `rejected`; the state does not change. A
//!   batch applied out of order is a bug and stops Raft (an I/O error to openraft).
//! - Command entries go to [`Sequencer::apply_command`]; a rejected command is answered with its
//!   typed rejection and changes nothing. Registered rollups are published to a
//!   [`RollupRegistry`] that submission paths on other threads read.
//! - Blank and membership entries only move the last applied log id (and the membership).
//! - A snapshot is one blob (format below) built from the state when the builder is made, so
//!   later applies do not change it. Installing one replaces the whole state.
//!
//! Snapshot blob (version 2, integers little-endian):
//!
//! ```text
//! magic "BATONSMS" | version u32 | last applied log id | membership log id | membership |
//! sequencer snapshot (its own versioned, checksummed format) | crc32 of all before u32
//! ```
//!
//! Log ids and the membership use the log store's encodings
//! ([`encode_membership`](super::log_store)).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{BasicNode, EntryPayload, OptionalSend};

use super::log_store::{
    decode_log_id, decode_membership, encode_log_id, encode_membership, CodecError, Reader,
};
use super::types::{ApplyResult, LogId, SnapshotBlob, TypeConfig};
use crate::hash::TxHash;
use crate::node::stages::{Stage, Stages};
use crate::sequencer::{
    KnownHashes, Position, Sequencer, SequencerError, SnapshotError, SnapshotSink, SnapshotWriter,
    SNAPSHOT_PATCH_WITHIN,
};

type CommittedLeaderId = openraft::vote::leader_id_std::CommittedLeaderId<u64>;

/// The last applied membership and the log id that set it.
pub type StoredMembership = openraft::StoredMembership<CommittedLeaderId, u64, BasicNode>;

/// Snapshot metadata of [`TypeConfig`].
pub type SnapshotMeta = openraft::SnapshotMeta<CommittedLeaderId, u64, BasicNode>;

/// A snapshot of [`TypeConfig`] with its blob.
pub type Snapshot = openraft::Snapshot<CommittedLeaderId, u64, BasicNode, SnapshotBlob>;

const MAGIC: [u8; 8] = *b"BATONSMS";
/// Snapshot blob format version written by this build.
pub const SNAPSHOT_BLOB_VERSION: u32 = 2;
/// The trailing crc32. Corruption (disk, memory) is what it is for: blobs travel between nodes
/// over mutually authenticated TLS, and a keccak over hundreds of MiB cost a third of a second.
const CHECKSUM_BYTES: usize = 4;

/// Errors of the state machine.
#[derive(Debug, thiserror::Error)]
pub enum StateMachineError {
    /// The sequencer refused an entry for a reason other than its content (an apply-order bug).
    #[error("applying entry {log_id}: {source}")]
    Apply {
        /// The entry.
        log_id: LogId,
        /// What the sequencer reported.
        #[source]
        source: SequencerError,
    },
    /// The snapshot blob's framing or checksum is wrong.
    #[error("snapshot blob: {reason}")]
    BlobFraming {
        /// What is wrong.
        reason: &'static str,
    },
    /// A snapshot blob format version this build cannot read.
    #[error("snapshot blob version {found} is not supported (this build reads {supported})")]
    BlobVersion {
        /// Version found.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The blob's log ids or membership could not be decoded (or encoded).
    #[error("snapshot blob metadata: {source}")]
    BlobMeta {
        /// What is wrong.
        #[source]
        source: CodecError,
    },
    /// The sequencer part of the blob was refused.
    #[error("snapshot blob sequencer state: {source}")]
    Sequencer {
        /// What is wrong.
        #[source]
        source: SnapshotError,
    },
    /// A snapshot blob could not be written (its file).
    #[error("writing the snapshot blob: {source}")]
    BlobWrite {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The persisted snapshot file could not be read.
    #[error("reading the snapshot file: {source}")]
    SnapshotFile {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The blob describes another state than the snapshot metadata it came with.
    #[error("snapshot blob is at {blob:?}, its metadata says {meta:?}")]
    MetaMismatch {
        /// Last applied log id in the blob.
        blob: Option<LogId>,
        /// Last log id in the metadata.
        meta: Option<LogId>,
    },
}

impl From<StateMachineError> for io::Error {
    fn from(e: StateMachineError) -> io::Error {
        io::Error::other(e)
    }
}

/// What a snapshot blob holds.
#[derive(Debug)]
struct Decoded {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    sequencer: Sequencer,
}

/// A [`SnapshotSink`] that can say the crc32 of everything in it (patches included): the
/// blob's trailing checksum.
trait BlobSink: SnapshotSink {
    fn crc(&self) -> u32;
}

impl BlobSink for Vec<u8> {
    fn crc(&self) -> u32 {
        crc32fast::hash(self)
    }
}

/// Writes a snapshot blob (format in the module docs) holding `snapshot` to `out`, which must
/// be empty.
fn write_blob<S: BlobSink>(
    last_applied: Option<&LogId>,
    membership: &StoredMembership,
    snapshot: SnapshotWriter,
    out: &mut S,
) -> Result<(), StateMachineError> {
    let write = |source| StateMachineError::BlobWrite { source };
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&SNAPSHOT_BLOB_VERSION.to_le_bytes());
    encode_log_id(last_applied, &mut head);
    encode_log_id(membership.log_id().as_ref(), &mut head);
    encode_membership(membership.membership(), &mut head)
        .map_err(|source| StateMachineError::BlobMeta { source })?;
    if head.len() as u64 + 64 > SNAPSHOT_PATCH_WITHIN {
        // The sequencer's header must lie where sinks accept patches; a membership record
        // of tens of KiB would be a bug elsewhere.
        return Err(StateMachineError::BlobFraming {
            reason: "membership too large for the blob header",
        });
    }
    out.put(&head).map_err(write)?;
    snapshot.write(out).map_err(write)?;
    let crc = out.crc();
    out.put(&crc.to_le_bytes()).map_err(write)
}

/// The blob of a snapshot, in memory.
#[cfg(test)]
fn encode_blob(
    last_applied: Option<&LogId>,
    membership: &StoredMembership,
    sequencer: Sequencer,
) -> Result<Vec<u8>, StateMachineError> {
    let mut out = Vec::with_capacity(sequencer.snapshot_len_hint() + 4096);
    write_blob(
        last_applied,
        membership,
        sequencer.into_snapshot_writer(),
        &mut out,
    )?;
    Ok(out)
}

fn decode_blob(blob: &[u8]) -> Result<Decoded, StateMachineError> {
    let (meta, rest) = decode_blob_meta(blob)?;
    let sequencer =
        Sequencer::from_snapshot(rest).map_err(|source| StateMachineError::Sequencer { source })?;
    Ok(Decoded {
        last_applied: meta.last_log_id,
        membership: meta.last_membership,
        sequencer,
    })
}

/// Checks a blob's framing and checksum and reads its metadata (last applied log id and
/// membership), leaving the sequencer's part undecoded: returns that part.
fn decode_blob_meta(blob: &[u8]) -> Result<(SnapshotMeta, &[u8]), StateMachineError> {
    let framing = |reason| StateMachineError::BlobFraming { reason };
    if blob.len() < MAGIC.len() + 4 + CHECKSUM_BYTES {
        return Err(framing("shorter than header and checksum"));
    }
    let (content, crc) = blob.split_at(blob.len() - CHECKSUM_BYTES);
    if crc32fast::hash(content).to_le_bytes() != crc {
        return Err(framing("checksum mismatch"));
    }
    if content[..MAGIC.len()] != MAGIC {
        return Err(framing("bad magic"));
    }
    let meta = |source| StateMachineError::BlobMeta { source };
    let mut r = Reader::new(&content[MAGIC.len()..], "snapshot blob");
    let version = r.u32().map_err(meta)?;
    if version != SNAPSHOT_BLOB_VERSION {
        return Err(StateMachineError::BlobVersion {
            found: version,
            supported: SNAPSHOT_BLOB_VERSION,
        });
    }
    let last_applied = decode_log_id(&mut r).map_err(meta)?;
    let membership_log_id = decode_log_id(&mut r).map_err(meta)?;
    let membership = decode_membership(&mut r).map_err(meta)?;
    let meta = SnapshotMeta {
        last_log_id: last_applied,
        last_membership: StoredMembership::new(membership_log_id, membership),
    };
    Ok((meta, r.rest()))
}

/// The ids of the registered rollups as of the last applied entry, shared with the threads that
/// accept submissions (they refuse transactions of other rollups).
#[derive(Clone, Debug, Default)]
pub struct RollupRegistry(Arc<RwLock<BTreeSet<u64>>>);

impl RollupRegistry {
    /// True if `rollup_id` is registered.
    pub fn contains(&self, rollup_id: u64) -> bool {
        self.0
            .read()
            .map(|s| s.contains(&rollup_id))
            .unwrap_or(false)
    }

    /// Runs `f` on the registered ids.
    pub fn with<R>(&self, f: impl FnOnce(&BTreeSet<u64>) -> R) -> R {
        match self.0.read() {
            Ok(s) => f(&s),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    fn publish(&self, sequencer: &Sequencer) {
        let ids: BTreeSet<u64> = sequencer.rollups().iter().map(|(id, _)| id).collect();
        match self.0.write() {
            Ok(mut s) => *s = ids,
            Err(poisoned) => *poisoned.into_inner() = ids,
        }
    }
}

/// Hashes of the batches this node's own batchers built (or forwarded), kept until the state
/// machine applies them so it need not hash their transactions, leaves and root again: on a
/// three-node cluster each node built about a third of what it applies, and this was 3 of the
/// ~15 keccak permutations spent per transaction on one machine.
///
/// An entry is found by the batch's Merkle root (from the leader's seal) and used only for
/// bytes of the same length and CRC-32 as those it was computed from: the root itself commits
/// to the transactions, so this only has to tell the batch apart from a damaged or rewritten
/// copy under the same header, which Raft's crash-fault model (a leader that does not lie)
/// already rules out. The batch's bytes are not kept (their buffers are sized for the largest
/// batch). Batches never applied here (failed, retried elsewhere, covered by an installed
/// snapshot) age out: at most [`HASHED_TXS_MAX`] transactions and [`HASHED_BATCHES_MAX`]
/// batches are kept. The hashes are the batcher's, computed with the same functions the
/// sequencer uses (`keccak256_many`, `MerkleTree`); a batcher that got them wrong would now
/// make this node accept what the others reject, where before all nodes rejected alike.
#[derive(Clone, Default)]
pub struct HashedBatches(Arc<Mutex<HashedInner>>);

#[derive(Default)]
struct HashedInner {
    /// (bytes' length, their CRC-32, the hashes), oldest first.
    batches: VecDeque<(usize, u32, KnownHashes)>,
    txs: usize,
}

/// Most transactions whose hashes [`HashedBatches`] keeps (64 bytes each: 16 MiB).
pub const HASHED_TXS_MAX: usize = 1 << 18;
/// Most batches [`HashedBatches`] keeps (bounds the scan of a lookup).
pub const HASHED_BATCHES_MAX: usize = 1024;

impl HashedBatches {
    /// Keeps `known`, computed from exactly `bytes`.
    pub fn remember(&self, bytes: &[u8], known: KnownHashes) {
        let crc = crc32fast::hash(bytes);
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        inner.txs += known.tx_hashes.len();
        inner.batches.push_back((bytes.len(), crc, known));
        while (inner.txs > HASHED_TXS_MAX || inner.batches.len() > HASHED_BATCHES_MAX)
            && inner.batches.len() > 1
        {
            if let Some((_, _, old)) = inner.batches.pop_front() {
                inner.txs -= old.tx_hashes.len();
            }
        }
    }

    /// The hashes of the batch `bytes` whose header root is `root`, if kept (and forgets them).
    pub fn take(&self, root: &[u8; 32], bytes: &[u8]) -> Option<KnownHashes> {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // The bytes' CRC is computed only once a kept batch has the same root and length.
        let mut crc = None;
        let at = inner.batches.iter().position(|(len, kept_crc, k)| {
            k.root == *root
                && *len == bytes.len()
                && *kept_crc == *crc.get_or_insert_with(|| crc32fast::hash(bytes))
        })?;
        let (_, _, known) = inner.batches.remove(at)?;
        inner.txs -= known.tx_hashes.len();
        Some(known)
    }

    /// Batches kept.
    pub fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .batches
            .len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for HashedBatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashedBatches")
            .field("batches", &self.len())
            .finish()
    }
}

/// The applied state.
#[derive(Debug, Default)]
struct State {
    sequencer: Sequencer,
    registry: RollupRegistry,
    /// Hashes of batches this node built, for their apply.
    hashed: HashedBatches,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Batches committed but rejected for their content.
    rejected_batches: u64,
    /// Whether the idempotency index is kept at its full size from the start
    /// ([`StateMachine::with_reserved_index`]), also for a sequencer installed from a snapshot.
    index_reserved: bool,
}

impl State {
    fn apply(&mut self, entry: &super::types::Entry) -> Result<ApplyResult, StateMachineError> {
        let log_id = entry.log_id();
        let mut result = ApplyResult {
            index: log_id.index,
            ..ApplyResult::default()
        };
        match &entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(log_id), m.clone());
            }
            EntryPayload::Normal(command) if command.is_command() => {
                let r = self
                    .sequencer
                    .apply_command(log_id.index, command.as_bytes());
                if let Ok(crate::sequencer::CommandApplied::Registered { .. }) = r {
                    self.registry.publish(&self.sequencer);
                }
                result.command = Some(r);
            }
            EntryPayload::Normal(batch) => {
                let known = batch
                    .seal()
                    .and_then(|s| self.hashed.take(&s.header.tx_merkle_root, batch.as_bytes()));
                match self.sequencer.apply_known_batch(
                    log_id.index,
                    log_id.leader_id.term,
                    batch.as_bytes(),
                    batch.seal(),
                    known,
                ) {
                    Ok(applied) => {
                        result.tx_count = applied.tx_count;
                        result.duplicates = applied.duplicates;
                        result.seal = batch.seal().copied();
                    }
                    Err(e) if e.is_content_rejection() => {
                        // Counted, not logged: core has no logger; the node reports the count.
                        self.rejected_batches += 1;
                        result.rejected = true;
                    }
                    Err(source) => return Err(StateMachineError::Apply { log_id, source }),
                }
            }
        }
        self.last_applied = Some(log_id);
        Ok(result)
    }
}

/// A read-only view of the applied state, for serving lookups next to Raft (same thread).
#[derive(Clone)]
pub struct SequencerView {
    state: Rc<RefCell<State>>,
}

impl SequencerView {
    /// Runs `f` on the sequencer. Do not hold anything borrowed from it across an `.await`.
    pub fn with<R>(&self, f: impl FnOnce(&Sequencer) -> R) -> R {
        f(&self.state.borrow().sequencer)
    }

    /// Last applied log id (any entry kind).
    pub fn last_applied(&self) -> Option<LogId> {
        self.state.borrow().last_applied
    }

    /// Committed batches rejected for invalid content since start (or snapshot install).
    pub fn rejected_batches(&self) -> u64 {
        self.state.borrow().rejected_batches
    }
}

/// The latest snapshot: its metadata, and its blob unless that is in the snapshot file.
#[derive(Clone)]
struct Current {
    meta: SnapshotMeta,
    /// `None` once the blob is in the store's file (a node's data directory), which
    /// `get_current_snapshot` then reads: with a full idempotency window a blob is ~92 MB, which
    /// stayed resident on every node for the rare follower that needs a snapshot sent, and
    /// doubled while the next one was encoded (2x overload peaked at 0.9-1.0 GiB per node).
    blob: Option<Bytes>,
}

/// openraft's state machine for baton (see the module docs). `!Send`, like the log store.
#[derive(Default)]
pub struct StateMachine {
    state: Rc<RefCell<State>>,
    current: Rc<RefCell<Option<Current>>>,
    /// Where snapshots are persisted (no directory: in memory only, for tests).
    store: SnapshotStore,
    /// When the log has grown enough, next to the state, to be worth a snapshot.
    by_size: Rc<SnapshotBySize>,
    /// Where each entry's apply time is recorded ([`Stage::Apply`]), if anywhere.
    stages: Option<Stages>,
}

/// Asks for a snapshot once the log applied since the last one holds at least
/// `max(min_bytes, ratio × the last snapshot's bytes)` ([`StateMachine::with_snapshot_by_size`]).
///
/// A snapshot costs about the size of the state (the idempotency index: up to ~90 MB written,
/// and 0.1-0.2 s of CPU per node to copy and sort), whatever happened since the previous one.
/// Counted in entries, as openraft's own policy does, that cost is paid as often for entries of
/// one transaction as for entries of thousands: a lone client's 10,000 one-transaction entries
/// are ~2 MB of log, and a node rewrote a state of up to ~90 MB for each ~2 MB appended. Counted
/// against the state's size, the snapshots written are at most `1 / ratio` of the log's bytes.
#[derive(Debug, Default)]
struct SnapshotBySize {
    min_bytes: std::cell::Cell<u64>,
    ratio: std::cell::Cell<u64>,
    /// Entry payload bytes applied since the state the last snapshot captured.
    since: std::cell::Cell<u64>,
    /// Bytes of the last snapshot built or installed (0: none yet).
    last_snapshot_bytes: std::cell::Cell<u64>,
    /// `since` when a snapshot was last asked for (0: not since the last one started).
    asked_at: std::cell::Cell<u64>,
    /// Bytes applied before `since` starts counting, until the first snapshot: a node-specific
    /// offset, so that the nodes of a cluster, which apply the same log, do not all build
    /// their snapshots at the same moment ([`StateMachine::with_snapshot_by_size`]).
    phase: std::cell::Cell<u64>,
    /// Where to ask (none: the rule is off).
    ask: RefCell<Option<futures_channel::mpsc::Sender<()>>>,
}

impl SnapshotBySize {
    /// Bytes of log that call for the next snapshot.
    fn threshold(&self) -> u64 {
        self.min_bytes.get().max(
            self.ratio
                .get()
                .saturating_mul(self.last_snapshot_bytes.get()),
        )
    }

    /// Counts an applied entry's bytes; asks for a snapshot when they reach the threshold, and
    /// again after every further eighth of it until one starts (openraft ignores a trigger
    /// while it is building a snapshot, for instance one its entry count started).
    fn applied(&self, bytes: u64) {
        let phase = self.phase.get();
        let skip = phase.min(bytes);
        self.phase.set(phase - skip);
        let since = self.since.get().saturating_add(bytes - skip);
        self.since.set(since);
        let threshold = self.threshold();
        let asked_at = self.asked_at.get();
        if since < threshold || (asked_at > 0 && since - asked_at < (threshold / 8).max(1)) {
            return;
        }
        if let Some(ask) = self.ask.borrow_mut().as_mut() {
            // Full: a request is already pending.
            let _ = ask.try_send(());
            self.asked_at.set(since);
        }
    }

    /// A snapshot of the state as applied now was started: what is applied next counts towards
    /// the one after.
    fn captured(&self) {
        self.since.set(0);
        self.asked_at.set(0);
        self.phase.set(0);
    }

    /// The latest snapshot (built or installed) has `bytes`.
    fn snapshot_is(&self, bytes: u64) {
        self.last_snapshot_bytes.set(bytes);
    }
}

/// File holding the latest snapshot blob in a node's data directory.
pub const SNAPSHOT_FILE: &str = "SNAPSHOT";

/// Nice value of the thread that encodes snapshots where the idle scheduling class is refused.
const SNAPSHOT_THREAD_NICE: libc::c_int = 10;

/// Puts the calling thread in Linux's idle scheduling class (`SCHED_IDLE`), or failing that at
/// nice `SNAPSHOT_THREAD_NICE`. Encoding a snapshot of millions of transactions is a fraction of
/// a second to seconds of CPU, on every node of a machine at the same index. At equal priority
/// the shards lost most of their CPU to it and throughput fell to a tenth for those seconds. At
/// nice 10 a shard that woke up still waited for the encoder's time slice at every hop: each
/// snapshot (every 10,000 entries, ~14 s at 70k tx/s) showed as one second with p99 160-250 ms
/// in the open loop. A thread of the idle class is preempted as soon as any other thread wants
/// its core, so the encoder runs on what the node leaves idle (and, on a saturated machine,
/// still gets a sliver). Failure (a sandbox forbidding both) is harmless: the snapshot is built
/// at normal priority.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` outlives the call; pid 0 is the calling thread.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
            return;
        }
    }
    // SAFETY: setpriority reads no memory of ours; `who == 0` is the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, SNAPSHOT_THREAD_NICE) };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "could not lower the snapshot thread's priority");
    }
}

/// Runs `f` on a thread of its own, which `f` puts in the lowest priority class once it has
/// copied the state out ([`encode_in_background`]). Not glommio's blocking pool: its threads
/// live on and run the executor's other blocking work, which must not inherit the idle class.
async fn run_in_background<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = futures_channel::oneshot::channel();
    std::thread::Builder::new()
        .name("snapshot-encode".into())
        .spawn(move || {
            // Started from the Raft shard: not on its core when that one is pinned.
            if let Err(e) = crate::cpus::release_current_thread() {
                tracing::warn!(error = %e, "snapshot encoder stays on its shard's CPU");
            }
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| io::Error::other("the snapshot encoding thread panicked"))
}

/// Nice value at which the snapshot encoder copies the index out, before it drops to the idle
/// class. At nice 0 the three nodes' copies (30-50 ms each, at the same log index) took the
/// shards' cores for long enough to show as one second with p99 63-107 ms in the open loop at
/// 70k tx/s; at nice 5 a shard that wakes up gets its core back sooner (16-19 ms), while the
/// copy, unlike in the idle class, still gets a share on a saturated machine (2x overload:
/// 1.3-2.7 s per snapshot, max RSS under 1 GiB; see [`Sequencer::into_snapshot_writer`]).
const SNAPSHOT_COPY_NICE: libc::c_int = 5;

/// Sets the calling thread's nice value (best effort: a failure leaves it as it was).
fn set_thread_nice(nice: libc::c_int) {
    // SAFETY: setpriority reads no memory of ours; `who == 0` is the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), nice, "could not set the snapshot thread's nice value");
    }
}

/// Encodes a snapshot of `sequencer` on a thread of its own with `write`: the index is copied
/// out at nice `SNAPSHOT_COPY_NICE` (tens of milliseconds, during which the live state copies
/// each index part it writes to that the snapshot still shares: see
/// [`Sequencer::into_snapshot_writer`]), the rest, sorting and writing, seconds under load, in
/// the idle class ([`lower_thread_priority`]).
async fn encode_in_background<T: Send + 'static>(
    sequencer: Sequencer,
    write: impl FnOnce(SnapshotWriter) -> T + Send + 'static,
) -> io::Result<T> {
    run_in_background(move || {
        set_thread_nice(SNAPSHOT_COPY_NICE);
        let snapshot = sequencer.into_snapshot_writer();
        lower_thread_priority();
        write(snapshot)
    })
    .await
}

/// How much of a snapshot file is written at once, between two syncs of it. Each write is one
/// request the WAL's small writes and syncs queue behind on the same disk: with 8 MiB pieces
/// the second snapshot of an open-loop run at 70k tx/s (~88 MB per node, three nodes at once)
/// showed as seconds with p99 106 and 243 ms; with 1 MiB, 38-42 and 29 ms (256 KiB: no
/// better, and more syncs).
const SNAPSHOT_SYNC_EVERY_BYTES: usize = 1 << 20;

// `SnapshotFile` keeps the patchable head whole in its first piece.
const _: () = assert!(SNAPSHOT_PATCH_WITHIN as usize <= SNAPSHOT_SYNC_EVERY_BYTES);

/// Most bytes a second a snapshot file is written at (a 44 MB snapshot in ~1.3 s, 88 MB in
/// ~2.6 s). Written as fast as the device takes them (60-110 MB/s per node on the development
/// VM, the three nodes of a local cluster at once, at the same log index), the pieces kept the
/// WAL's group commit rounds of every node at 8-44 ms for the second or so it took (15-17
/// rounds of 8 ms or more per 35 s run); paced at this rate, 0-13 such rounds. The writer is a
/// thread of its own, so nothing waits on it but the snapshot's completion (and the purge of
/// the log behind it).
pub const SNAPSHOT_WRITE_BYTES_PER_S: u64 = 32 << 20;

/// Alignment of O_DIRECT writes: offsets, lengths and buffer addresses.
const DIRECT_ALIGN: usize = 4096;

/// A snapshot blob being written to a temporary file in a node's data directory, a piece of
/// `SNAPSHOT_SYNC_EVERY_BYTES` at a time, as it is encoded: the blob of a full idempotency
/// window is ~92 MB, which a node under load held in memory on top of everything else while it
/// was built (2x overload peaked at 1.09 GiB on the leader). [`SnapshotFile::finish`] makes it
/// durable and [`Written::install`] renames it into place, so a snapshot is replaced atomically.
/// Blocking: run it off the shards.
///
/// The file is written with O_DIRECT where the file system allows it, else through the page
/// cache, and synced after every piece. Through the page cache a blob of tens to hundreds of
/// MiB costs the kernel a copy into fresh cache pages (0.34 s of CPU over three nodes for a
/// 45 MB snapshot on the development VM, time the shards lost even when the copy ran in the
/// idle scheduling class), and dirty pages left behind would be flushed by the next journal
/// commit (ext4, data=ordered), which the WAL's syncs make. With O_DIRECT the data goes from an
/// aligned buffer of ours straight to the device; the syncs then only commit metadata.
///
/// The first `SNAPSHOT_PATCH_WITHIN` bytes are also kept aside: patches ([`SnapshotSink::patch`])
/// land there and are written again at the end, and the crc32 of the whole is that of this head
/// combined with that of the rest, which is hashed as it is put.
struct SnapshotFile {
    /// `None` only while switching from O_DIRECT to the page cache.
    file: Option<std::fs::File>,
    tmp: TempFile,
    direct: bool,
    buf: AlignedBuf,
    /// Bytes of `buf` in use.
    filled: usize,
    /// Bytes handed to the file so far.
    flushed: u64,
    head: Vec<u8>,
    /// A patch landed in the head after it went to the file.
    head_patched: bool,
    rest_crc: crc32fast::Hasher,
    /// When the first piece went out (pacing, see [`SNAPSHOT_WRITE_BYTES_PER_S`]).
    started: Option<std::time::Instant>,
    /// Paced: a snapshot this node built. One received from the leader is written at full
    /// speed, since the node catches up only once it is in place.
    paced: bool,
}

/// A file removed when dropped, unless renamed away first.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A snapshot file written whole and synced, not yet in place.
struct Written {
    tmp: TempFile,
    len: u64,
}

impl Written {
    /// Renames the file to `SNAPSHOT_FILE` in `dir` and syncs the directory.
    ///
    /// The snapshot it replaces (tens of MB) is not freed by the rename: it gets a second name
    /// first, which the file deleter frees a step at a time once nothing in this process maps
    /// it ([`baton_wal::slow_delete`]: freeing it at once stalled the disk's other writers,
    /// the WAL's group commit first, for tens of milliseconds on every node at each snapshot).
    fn install(mut self, dir: &Path) -> io::Result<()> {
        let target = dir.join(SNAPSHOT_FILE);
        let old = match std::fs::metadata(&target) {
            Ok(meta) => {
                static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                // A name taken by trash not yet freed (a previous process with the same pid,
                // as in a container restarted) is skipped.
                let mut tries = 0;
                let trash = loop {
                    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let trash = dir.join(format!(
                        "{SNAPSHOT_FILE}.old.{}.{n}{}",
                        std::process::id(),
                        baton_wal::slow_delete::TRASH_SUFFIX
                    ));
                    match std::fs::hard_link(&target, &trash) {
                        Ok(()) => break trash,
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 64 => {
                            tries += 1;
                        }
                        Err(e) => return Err(e),
                    }
                };
                Some((trash, FileKey::of(&meta)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        std::fs::rename(&self.tmp.path, &target)?;
        self.tmp.armed = false;
        std::fs::File::open(dir)?.sync_all()?;
        if let Some((trash, key)) = old {
            baton_wal::slow_delete::remove_when(trash, Box::new(move || !key.is_mapped()));
        }
        Ok(())
    }

    /// The file's bytes, mapped, not read: nothing is in memory until touched.
    fn map(&self) -> io::Result<Bytes> {
        map_file(&self.tmp.path)
    }
}

/// Maps a snapshot file read-only. Snapshot files are never written once complete (a new
/// snapshot is a new file renamed over the old one, which leaves existing mappings of the old
/// one intact), so the mapping stays valid and unchanged for as long as it lives.
fn map_file(path: &Path) -> io::Result<Bytes> {
    let file = std::fs::File::open(path)?;
    let key = FileKey::of(&file.metadata()?);
    // SAFETY: see above: nothing of ours writes to a complete snapshot file, and the file
    // deleter truncates a replaced one only once no mapping of it is left ([`FileKey`]).
    // Something outside baton changing the file (an operator editing the data directory) could
    // change the bytes under us; the blob's checksum is checked before its content is used.
    let map = unsafe { memmap2::Mmap::map(&file) }?;
    Ok(Bytes::from_owner(Mapped::new(map, key)))
}

/// A file's identity (device, inode), under which its live mappings are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct FileKey {
    dev: u64,
    ino: u64,
}

/// Live mappings of snapshot files in this process, by file.
static MAPPINGS: std::sync::Mutex<BTreeMap<FileKey, usize>> =
    std::sync::Mutex::new(BTreeMap::new());

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> FileKey {
        use std::os::unix::fs::MetadataExt;
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// Whether some blob of this process still maps the file.
    fn is_mapped(&self) -> bool {
        MAPPINGS.lock().expect("mappings lock").contains_key(self)
    }
}

/// A mapped snapshot file, counted in [`MAPPINGS`] while it lives.
struct Mapped {
    map: memmap2::Mmap,
    key: FileKey,
}

impl Mapped {
    fn new(map: memmap2::Mmap, key: FileKey) -> Mapped {
        *MAPPINGS
            .lock()
            .expect("mappings lock")
            .entry(key)
            .or_insert(0) += 1;
        Mapped { map, key }
    }
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        let mut mappings = MAPPINGS.lock().expect("mappings lock");
        if let Some(n) = mappings.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                mappings.remove(&self.key);
            }
        }
    }
}

impl SnapshotFile {
    /// A new temporary file in `dir`.
    fn create(dir: &Path) -> io::Result<Self> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("SNAPSHOT.tmp.{}.{n}", std::process::id()));
        // tmpfs and some others refuse O_DIRECT at open, a few only at the first write (EINVAL
        // either way): the page cache it is then.
        let (file, direct) = match create_direct(&path) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (std::fs::File::create(&path)?, false)
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            file: Some(file),
            tmp: TempFile { path, armed: true },
            direct,
            buf: AlignedBuf::zeroed(SNAPSHOT_SYNC_EVERY_BYTES)?,
            filled: 0,
            flushed: 0,
            head: Vec::with_capacity(SNAPSHOT_PATCH_WITHIN as usize),
            head_patched: false,
            rest_crc: crc32fast::Hasher::new(),
            started: None,
            paced: true,
        })
    }

    fn file(&self) -> &std::fs::File {
        self.file
            .as_ref()
            .expect("a file outside the O_DIRECT fallback")
    }

    /// Writes `buf[..filled]` at `flushed` and syncs; padded to the alignment with zeros under
    /// O_DIRECT (the file is cut to length at the end).
    fn flush(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.filled == 0 {
            return Ok(());
        }
        if self.direct {
            let padded = self.filled.next_multiple_of(DIRECT_ALIGN);
            let out = &mut self.buf.as_mut()[..padded];
            out[self.filled..].fill(0);
            let file = self.file.as_ref().expect("open");
            match file.write_all_at(out, self.flushed) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && self.flushed == 0 => {
                    // O_DIRECT refused at the first write: start over through the page cache.
                    self.file = None;
                    self.file = Some(std::fs::File::create(&self.tmp.path)?);
                    self.direct = false;
                    return self.flush();
                }
                Err(e) => return Err(e),
            }
        } else {
            let file = self.file.as_ref().expect("open");
            file.write_all_at(&self.buf.as_mut()[..self.filled], self.flushed)?;
        }
        self.file().sync_data()?;
        self.flushed += self.filled as u64;
        self.filled = 0;
        self.pace();
        Ok(())
    }

    /// Sleeps until the bytes written so far fit [`SNAPSHOT_WRITE_BYTES_PER_S`] since the first
    /// piece.
    fn pace(&mut self) {
        if !self.paced {
            return;
        }
        let started = *self.started.get_or_insert_with(std::time::Instant::now);
        let due = started
            + std::time::Duration::from_secs_f64(
                self.flushed as f64 / SNAPSHOT_WRITE_BYTES_PER_S as f64,
            );
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
    }

    /// Writes what is left, the patched head again if it was already out, cuts the file to the
    /// blob's length and syncs it.
    fn finish(mut self) -> io::Result<Written> {
        use std::os::unix::fs::FileExt;
        let len = SnapshotSink::len(&self);
        self.flush()?;
        if self.head_patched {
            let head_len = self.head.len();
            if self.direct {
                // A patched head went out with a whole first piece: it is all there, a whole
                // number of blocks.
                debug_assert_eq!(head_len, SNAPSHOT_PATCH_WITHIN as usize);
                let out = &mut self.buf.as_mut()[..head_len];
                out.copy_from_slice(&self.head);
                self.file.as_ref().expect("open").write_all_at(out, 0)?;
            } else {
                self.file().write_all_at(&self.head, 0)?;
            }
        }
        let file = self.file.take().expect("file");
        file.set_len(len)?;
        file.sync_all()?;
        Ok(Written {
            tmp: TempFile {
                path: std::mem::take(&mut self.tmp.path),
                armed: std::mem::replace(&mut self.tmp.armed, false),
            },
            len,
        })
    }
}

impl SnapshotSink for SnapshotFile {
    fn put(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        let at = SnapshotSink::len(self);
        if at < SNAPSHOT_PATCH_WITHIN {
            let n = bytes.len().min((SNAPSHOT_PATCH_WITHIN - at) as usize);
            self.head.extend_from_slice(&bytes[..n]);
            let (_, rest) = bytes.split_at(n);
            self.rest_crc.update(rest);
        } else {
            self.rest_crc.update(bytes);
        }
        while !bytes.is_empty() {
            let room = SNAPSHOT_SYNC_EVERY_BYTES - self.filled;
            let n = room.min(bytes.len());
            self.buf.as_mut()[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == SNAPSHOT_SYNC_EVERY_BYTES {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.flushed + self.filled as u64
    }

    fn patch(&mut self, at: u64, bytes: &[u8]) -> io::Result<()> {
        let end = at + bytes.len() as u64;
        if end > self.head.len() as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "snapshot patch outside the file's head",
            ));
        }
        let (at, end) = (at as usize, end as usize);
        self.head[at..end].copy_from_slice(bytes);
        // Nothing is flushed until a whole piece is, and a piece is longer than the head: the
        // head is either all in the buffer still or all in the file.
        if self.flushed == 0 {
            self.buf.as_mut()[at..end].copy_from_slice(bytes);
        } else {
            self.head_patched = true;
        }
        Ok(())
    }
}

impl BlobSink for SnapshotFile {
    fn crc(&self) -> u32 {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.head);
        crc.combine(&self.rest_crc);
        crc.finalize()
    }
}

/// Writes a snapshot blob that is in memory (one received from the leader) atomically and
/// durably: temporary file, sync, rename, directory sync. Blocking.
fn persist_snapshot(dir: &Path, blob: &[u8]) -> io::Result<()> {
    let mut file = SnapshotFile::create(dir)?;
    file.paced = false;
    file.put(blob)?;
    file.finish()?.install(dir)
}

/// Creates (truncating) `path` for O_DIRECT writes.
fn create_direct(path: &Path) -> io::Result<std::fs::File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }
}

/// A zeroed heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len, DIRECT_ALIGN)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        assert!(layout.size() > 0, "callers ask for at least one block");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(ptr)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(Self { ptr, layout })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `layout.size()` initialized (zeroed) bytes owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Where snapshots go, and which one is on disk. Builds and installs run as separate tasks and
/// can overlap; writes are serialized here and an older snapshot never replaces a newer one.
#[derive(Clone, Default)]
struct SnapshotStore {
    dir: Option<PathBuf>,
    persisted: Rc<futures_util::lock::Mutex<Option<LogId>>>,
}

impl SnapshotStore {
    /// Writes `blob` (the snapshot at `last`) unless a newer one is already on disk; returns
    /// whether it was written. Blocking file I/O runs on the blocking pool.
    async fn persist(&self, last: Option<LogId>, blob: Bytes) -> io::Result<bool> {
        let Some(dir) = self.dir.clone() else {
            return Ok(true);
        };
        let mut persisted = self.persisted.lock().await;
        if persisted.is_some() && *persisted > last {
            return Ok(false);
        }
        glommio::executor()
            .spawn_blocking(move || persist_snapshot(&dir, &blob))
            .await?;
        *persisted = last;
        Ok(true)
    }

    /// Puts `written` (the snapshot at `last`) in place unless a newer one is already on disk;
    /// returns whether it did.
    async fn commit(&self, last: Option<LogId>, written: Written) -> io::Result<bool> {
        let Some(dir) = self.dir.clone() else {
            return Err(io::Error::other("no snapshot directory"));
        };
        let mut persisted = self.persisted.lock().await;
        if persisted.is_some() && *persisted > last {
            return Ok(false);
        }
        glommio::executor()
            .spawn_blocking(move || written.install(&dir))
            .await?;
        *persisted = last;
        Ok(true)
    }

    /// Whether a snapshot's blob must stay in memory (no directory to read it back from).
    fn in_memory(&self) -> bool {
        self.dir.is_none()
    }

    /// The snapshot in the file, mapped on the blocking pool, with the metadata its blob holds
    /// (checksum and framing checked; the sequencer part is left to whoever installs it).
    async fn read(&self) -> io::Result<Snapshot> {
        let Some(dir) = self.dir.clone() else {
            return Err(io::Error::other("no snapshot directory"));
        };
        // Not while a newer one is being put in place (the rename would be seen either way,
        // but a read racing it would be wasted).
        let _persisted = self.persisted.lock().await;
        let (blob, meta) = glommio::executor()
            .spawn_blocking(move || {
                let blob = map_file(&dir.join(SNAPSHOT_FILE))
                    .map_err(|source| StateMachineError::SnapshotFile { source })?;
                let (meta, _) = decode_blob_meta(&blob)?;
                Ok::<_, StateMachineError>((blob, meta))
            })
            .await?;
        Ok(Snapshot {
            meta,
            snapshot: blob,
        })
    }
}

impl StateMachine {
    /// An empty state machine: nothing applied, no snapshot, nothing persisted.
    pub fn new() -> Self {
        Self::default()
    }

    /// A state machine that persists its snapshots in `dir`, starting from the snapshot found
    /// there (if any). openraft then replays the log entries after it.
    pub fn open(dir: &Path) -> Result<Self, StateMachineError> {
        // Replaced snapshots the file deleter had not freed when this node last stopped.
        match baton_wal::slow_delete::sweep(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(StateMachineError::SnapshotFile { source: e })
            }
            _ => {}
        }
        let sm = StateMachine {
            store: SnapshotStore {
                dir: Some(dir.to_path_buf()),
                ..SnapshotStore::default()
            },
            ..Self::default()
        };
        let blob = match map_file(&dir.join(SNAPSHOT_FILE)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(sm),
            Err(e) => return Err(StateMachineError::SnapshotFile { source: e }),
        };
        let decoded = decode_blob(&blob)?;
        sm.by_size.snapshot_is(blob.len() as u64);
        drop(blob);
        *sm.store.persisted.try_lock().expect("new, uncontended") = decoded.last_applied;
        let meta = SnapshotMeta {
            last_log_id: decoded.last_applied,
            last_membership: decoded.membership.clone(),
        };
        *sm.state.borrow_mut() = State {
            sequencer: decoded.sequencer,
            registry: RollupRegistry::default(),
            hashed: HashedBatches::default(),
            last_applied: decoded.last_applied,
            membership: decoded.membership,
            rejected_batches: 0,
            index_reserved: false,
        };
        *sm.current.borrow_mut() = Some(Current { meta, blob: None });
        Ok(sm)
    }

    /// Allocates the idempotency index's full size now and faults it in
    /// ([`Sequencer::reserve_index`]): what a node does at start.
    pub fn with_reserved_index(self) -> Self {
        let mut state = self.state.borrow_mut();
        state.sequencer.reserve_index();
        state.index_reserved = true;
        drop(state);
        self
    }

    /// Asks for a snapshot on the returned receiver whenever the log applied since the last one
    /// holds at least `max(min_bytes, ratio × the last snapshot's bytes)` (the node then calls
    /// `Raft::trigger().snapshot()`), and again after every further eighth of that until a
    /// snapshot starts. Without this, only openraft's own policy (entries) makes snapshots.
    ///
    /// The first `phase_bytes` applied do not count, until the first snapshot: every node
    /// applies the same log, and with the same rule all of them would build their snapshots at
    /// once, each a burst of CPU and disk writes; a phase per node (the node passes a few eighths
    /// of `min_bytes` by its id) keeps them apart for good, as each counts anew from its own.
    pub fn with_snapshot_by_size(
        self,
        min_bytes: u64,
        ratio: u64,
        phase_bytes: u64,
    ) -> (Self, futures_channel::mpsc::Receiver<()>) {
        let (tx, rx) = futures_channel::mpsc::channel(1);
        self.by_size.min_bytes.set(min_bytes);
        self.by_size.ratio.set(ratio);
        self.by_size.phase.set(phase_bytes);
        *self.by_size.ask.borrow_mut() = Some(tx);
        (self, rx)
    }

    /// Records how long each entry's apply takes in `stages` ([`Stage::Apply`]).
    pub fn with_stages(mut self, stages: Stages) -> Self {
        self.stages = Some(stages);
        self
    }

    /// Applies batches found in `hashed` with the hashes kept there.
    pub fn with_hashed(self, hashed: HashedBatches) -> Self {
        self.state.borrow_mut().hashed = hashed;
        self
    }

    /// Publishes the registered rollups to `registry` from now on (and at once).
    pub fn with_registry(self, registry: RollupRegistry) -> Self {
        {
            let mut state = self.state.borrow_mut();
            registry.publish(&state.sequencer);
            state.registry = registry;
        }
        self
    }

    /// Position of the first transaction with this hash, if it was sequenced.
    pub fn lookup(&self, tx_hash: &TxHash) -> Option<Position> {
        self.state.borrow().sequencer.lookup(tx_hash)
    }

    /// A view that follows this state machine as it applies.
    pub fn view(&self) -> SequencerView {
        SequencerView {
            state: self.state.clone(),
        }
    }
}

/// Builds the snapshot captured when it was created.
///
/// Encoding a snapshot is O(state): sorting and writing every transaction's position and
/// checksumming the result, about 0.4 s per million transactions ordered. Done on the Raft
/// shard, that stalled the leader past its heartbeats and lease, and every node at once (they
/// snapshot at the same index): elections and seconds without commits every
/// `snapshot_every_entries`. So the shard only copies the state (`get_snapshot_builder`), and
/// the encoding runs on a thread of its own in the idle scheduling class.
pub struct SnapshotBuilder {
    meta: SnapshotMeta,
    /// The state at `meta`, taken by the first `build_snapshot`.
    captured: Option<Sequencer>,
    current: Rc<RefCell<Option<Current>>>,
    store: SnapshotStore,
    by_size: Rc<SnapshotBySize>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotBlob;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let Some(sequencer) = self.captured.take() else {
            return Err(io::Error::other("snapshot builder used twice"));
        };
        let (last, membership) = (self.meta.last_log_id, self.meta.last_membership.clone());
        let started = std::time::Instant::now();
        let Some(dir) = self.store.dir.clone() else {
            let blob = encode_in_background(sequencer, move |snapshot| {
                let mut out = Vec::new();
                write_blob(last.as_ref(), &membership, snapshot, &mut out).map(|()| out)
            })
            .await??;
            let snapshot = Snapshot {
                meta: self.meta.clone(),
                snapshot: Bytes::from(blob),
            };
            self.by_size.snapshot_is(snapshot.snapshot.len() as u64);
            let mut current = self.current.borrow_mut();
            if !newer_exists(&current, &snapshot.meta) {
                *current = Some(Current {
                    meta: snapshot.meta.clone(),
                    blob: Some(snapshot.snapshot.clone()),
                });
            }
            return Ok(snapshot);
        };
        // Encoded straight into its file (see `SnapshotFile`), durable before openraft learns
        // of it: it purges the log behind a built snapshot.
        let (written, blob) = encode_in_background(sequencer, move |snapshot| {
            let mut file = SnapshotFile::create(&dir)?;
            write_blob(last.as_ref(), &membership, snapshot, &mut file)?;
            let written = file.finish()?;
            let blob = written.map()?;
            Ok::<_, io::Error>((written, blob))
        })
        .await??;
        let snapshot = Snapshot {
            meta: self.meta.clone(),
            snapshot: blob,
        };
        let bytes = written.len;
        // An install may have put a newer snapshot in place since this builder was made; if
        // one reached the disk meanwhile, it stays.
        if newer_exists(&self.current.borrow(), &snapshot.meta)
            || !self
                .store
                .commit(snapshot.meta.last_log_id, written)
                .await?
        {
            return Ok(snapshot);
        }
        self.by_size.snapshot_is(bytes);
        tracing::info!(
            last = ?snapshot.meta.last_log_id,
            bytes,
            ms = started.elapsed().as_millis() as u64,
            "snapshot built"
        );
        let mut current = self.current.borrow_mut();
        if !newer_exists(&current, &snapshot.meta) {
            *current = Some(Current {
                meta: snapshot.meta.clone(),
                blob: None,
            });
        }
        Ok(snapshot)
    }
}

/// Whether `current` is newer than a snapshot at `meta`.
fn newer_exists(current: &Option<Current>, meta: &SnapshotMeta) -> bool {
    current
        .as_ref()
        .is_some_and(|c| c.meta.last_log_id > meta.last_log_id)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotBlob;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let state = self.state.borrow();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let started = std::time::Instant::now();
            let result = self.state.borrow_mut().apply(&entry)?;
            if let EntryPayload::Normal(b) = &entry.payload {
                self.by_size.applied(b.as_bytes().len() as u64);
            }
            if let Some(responder) = responder {
                responder.send(result);
            }
            if let Some(stages) = &self.stages {
                stages.record_since(Stage::Apply, started);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let state = self.state.borrow();
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
        };
        self.by_size.captured();
        SnapshotBuilder {
            meta,
            captured: Some(state.sequencer.clone()),
            current: self.current.clone(),
            store: self.store.clone(),
            by_size: self.by_size.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotBlob,
    ) -> Result<(), io::Error> {
        let decoded = decode_blob(&snapshot)?;
        if decoded.last_applied != meta.last_log_id || decoded.membership != meta.last_membership {
            return Err(StateMachineError::MetaMismatch {
                blob: decoded.last_applied,
                meta: meta.last_log_id,
            }
            .into());
        }
        self.store
            .persist(meta.last_log_id, snapshot.clone())
            .await?;
        let mut sequencer = decoded.sequencer;
        let mut state = self.state.borrow_mut();
        if state.index_reserved {
            // A pause of the Raft shard (~0.1-0.2 s for the default generation), once per
            // installed snapshot, instead of growing the index's tables during the applies after.
            sequencer.reserve_index();
        }
        let registry = state.registry.clone();
        registry.publish(&sequencer);
        *state = State {
            sequencer,
            registry,
            hashed: state.hashed.clone(),
            last_applied: decoded.last_applied,
            membership: decoded.membership,
            rejected_batches: 0,
            index_reserved: state.index_reserved,
        };
        drop(state);
        self.by_size.captured();
        self.by_size.snapshot_is(snapshot.len() as u64);
        *self.current.borrow_mut() = Some(Current {
            meta: meta.clone(),
            blob: self.store.in_memory().then_some(snapshot),
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let Some(current) = self.current.borrow().clone() else {
            return Ok(None);
        };
        match current.blob {
            Some(snapshot) => Ok(Some(Snapshot {
                meta: current.meta,
                snapshot,
            })),
            // The file holds this snapshot or, if one was persisted since, a newer one: the
            // metadata returned is the file's own either way.
            None => self.store.read().await.map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use futures_util::stream;
    use openraft::Membership;

    use super::*;

    /// Trash names left by an earlier process with the same pid (a container restarted) do not
    /// stop a snapshot from replacing another. (Each test runs in a process of its own under
    /// nextest, so the names taken here are the first this process would pick.)
    #[test]
    fn a_snapshot_replaces_another_when_its_trash_names_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        for n in 0..3 {
            let name = format!(
                "{SNAPSHOT_FILE}.old.{}.{n}{}",
                std::process::id(),
                baton_wal::slow_delete::TRASH_SUFFIX
            );
            std::fs::write(dir.path().join(name), b"left behind").unwrap();
        }
        persist_snapshot(dir.path(), b"first").unwrap();
        persist_snapshot(dir.path(), b"second").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap(),
            b"second"
        );
    }

    /// A snapshot replaced while a blob still maps it stays intact under that mapping (no
    /// truncation under it: that would be SIGBUS), and is freed once the mapping is gone.
    #[test]
    fn a_replaced_snapshot_is_freed_only_once_nothing_maps_it() {
        use baton_wal::slow_delete;
        let dir = tempfile::tempdir().unwrap();
        let blob = |seed: u8| -> Vec<u8> {
            (0..(3usize << 20))
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect()
        };
        let trash = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    let name = e.as_ref().unwrap().file_name();
                    name.to_string_lossy().ends_with(slow_delete::TRASH_SUFFIX)
                })
                .count()
        };
        persist_snapshot(dir.path(), &blob(1)).unwrap();
        let first = map_file(&dir.path().join(SNAPSHOT_FILE)).unwrap();
        persist_snapshot(dir.path(), &blob(2)).unwrap();
        assert_eq!(trash(), 1);
        // Still waiting for the mapping to go.
        assert!(!slow_delete::wait_idle(std::time::Duration::from_millis(
            300
        )));
        assert_eq!(&first[..], &blob(1)[..]);
        drop(first);
        assert!(slow_delete::wait_idle(std::time::Duration::from_secs(30)));
        assert_eq!(trash(), 0);
        let now = map_file(&dir.path().join(SNAPSHOT_FILE)).unwrap();
        assert_eq!(&now[..], &blob(2)[..]);
    }
    use crate::batch::{encode_batch, Batch};
    use crate::raft::types::{BatchBytes, Entry};
    use crate::sequencer::Duplicate;
    use crate::tx::Transaction;
    use crate::tx_kind::TxKind;

    fn batch(payloads: &[&[u8]]) -> BatchBytes {
        let txs: Vec<Transaction> = payloads
            .iter()
            .map(|p| Transaction {
                rollup_id: 1,
                kind: TxKind::Raw,
                bytes: p.to_vec(),
            })
            .collect();
        BatchBytes::from_aligned(encode_batch(&Batch::new(txs, 1, 1, 0)).unwrap())
    }

    fn membership() -> Membership<u64, BasicNode> {
        let nodes = BTreeMap::from([(1, BasicNode::new("a:1")), (2, BasicNode::new("b:2"))]);
        Membership::new(vec![[1, 2].into()], nodes).unwrap()
    }

    async fn apply_all(sm: &mut StateMachine, entries: Vec<Entry>) -> io::Result<()> {
        sm.apply(stream::iter(entries.into_iter().map(|e| Ok((e, None)))))
            .await
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        futures_util::FutureExt::now_or_never(f).expect("state machine futures never wait")
    }

    /// The snapshot encoder runs on a thread of its own: it copies the state out at nice
    /// `SNAPSHOT_COPY_NICE` (the nice value stays with the thread through its change of class),
    /// then writes in the idle scheduling class (Linux lets any thread lower itself to it); the
    /// calling thread keeps its class and nice value.
    #[cfg(target_os = "linux")]
    #[test]
    fn snapshots_are_encoded_on_a_thread_of_their_own_written_in_the_idle_class() {
        // SAFETY: sched_getscheduler reads no memory of ours; pid 0 is the calling thread.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        // SAFETY: getpriority reads no memory of ours; `who == 0` is the calling thread.
        let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let (caller, caller_nice) = (policy(), nice());
        let here = std::thread::current().id();
        let mut sequencer = Sequencer::default();
        sequencer
            .apply_batch(1, 1, batch(&[b"a", b"b"]).as_bytes())
            .unwrap();
        let expected = sequencer.snapshot_bytes();
        let (writer_policy, writer_nice, elsewhere, bytes) =
            on_glommio(encode_in_background(sequencer, move |snapshot| {
                let mut out = Vec::new();
                snapshot.write(&mut out).unwrap();
                (policy(), nice(), std::thread::current().id() != here, out)
            }))
            .unwrap();
        assert_eq!(writer_policy, libc::SCHED_IDLE);
        // Unless the caller already runs above it without the right to go back down.
        let kept = writer_nice == caller_nice && caller_nice > SNAPSHOT_COPY_NICE;
        assert!(
            writer_nice == SNAPSHOT_COPY_NICE || kept,
            "nice {writer_nice}"
        );
        assert!(elsewhere);
        assert_eq!(bytes, expected);
        assert_eq!((policy(), nice()), (caller, caller_nice));
        // A panicking encoder is an error to the builder, not a hang.
        let e: io::Result<()> = on_glommio(run_in_background(|| panic!("encoder bug")));
        assert!(e.unwrap_err().to_string().contains("panicked"));
    }

    /// Snapshot files are written whole and exact, whatever their length against the O_DIRECT
    /// block and the sync piece (the last block padded, then cut), replacing the previous
    /// one, and no temporary file is left behind.
    #[test]
    fn snapshot_files_hold_exactly_their_blob() {
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        // tmpfs, where O_DIRECT may be refused (then the page cache is used).
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            dirs.push(shm);
        }
        for dir in &dirs {
            check_snapshot_files(dir.path());
            check_streamed_files(dir.path());
        }
    }

    /// A blob streamed into its file in pieces of any size, with its head patched before and
    /// after the head went out, ends byte for byte as the same writes to memory, with the same
    /// checksum: whether the file's first flush (`SNAPSHOT_SYNC_EVERY_BYTES`) came before the
    /// patches or not, and whatever the length against the O_DIRECT block.
    fn check_streamed_files(dir: &Path) {
        let lengths = [
            10,
            SNAPSHOT_PATCH_WITHIN as usize - 1,
            SNAPSHOT_PATCH_WITHIN as usize + 5,
            SNAPSHOT_SYNC_EVERY_BYTES - 1,
            SNAPSHOT_SYNC_EVERY_BYTES + DIRECT_ALIGN,
            2 * SNAPSHOT_SYNC_EVERY_BYTES + 4_099,
        ];
        for (i, len) in lengths.into_iter().enumerate() {
            let mut memory = Vec::new();
            let mut file = SnapshotFile::create(dir).unwrap();
            let piece_sizes = [1usize, 44, 4_096, 100_003, 3 << 20];
            let mut at = 0;
            let mut step = 0;
            while at < len {
                let n = piece_sizes[step % piece_sizes.len()].min(len - at);
                let piece: Vec<u8> = (at..at + n).map(|j| (j * 7 + i) as u8).collect();
                memory.put(&piece).unwrap();
                file.put(&piece).unwrap();
                if step == 1 {
                    // Early, while the head is still in the buffer.
                    memory.patch(3, b"early").unwrap();
                    file.patch(3, b"early").unwrap();
                }
                at += n;
                step += 1;
            }
            let late = (len.min(SNAPSHOT_PATCH_WITHIN as usize) - 4) as u64;
            for (offset, bytes) in [(0u64, &b"late"[..]), (late, &b"tail"[..])] {
                memory.patch(offset, bytes).unwrap();
                file.patch(offset, bytes).unwrap();
            }
            assert!(file.patch(SNAPSHOT_PATCH_WITHIN, b"x").is_err());
            assert_eq!(BlobSink::crc(&file), BlobSink::crc(&memory), "{len} bytes");
            assert_eq!(SnapshotSink::len(&file), len as u64);
            let written = file.finish().unwrap();
            assert!(
                written.map().unwrap() == memory,
                "{len} bytes differ (mapped)"
            );
            written.install(dir).unwrap();
            let on_disk = std::fs::read(dir.join(SNAPSHOT_FILE)).unwrap();
            assert!(on_disk == memory, "{len} bytes differ");
        }
        // A file given up on (an encoding error) leaves nothing behind.
        let mut file = SnapshotFile::create(dir).unwrap();
        file.put(b"abandoned").unwrap();
        drop(file);
        assert!(baton_wal::slow_delete::wait_idle(
            std::time::Duration::from_secs(30)
        ));
        let names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [SNAPSHOT_FILE]);
    }

    fn check_snapshot_files(dir: &Path) {
        let sizes = [
            0,
            1,
            DIRECT_ALIGN - 1,
            DIRECT_ALIGN,
            DIRECT_ALIGN + 1,
            SNAPSHOT_SYNC_EVERY_BYTES - 3,
            SNAPSHOT_SYNC_EVERY_BYTES,
            2 * SNAPSHOT_SYNC_EVERY_BYTES + 4_097,
        ];
        for (i, len) in sizes.into_iter().enumerate() {
            let blob: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8).collect();
            persist_snapshot(dir, &blob).unwrap();
            let on_disk = std::fs::read(dir.join(SNAPSHOT_FILE)).unwrap();
            assert_eq!(on_disk.len(), len);
            assert!(on_disk == blob, "{len} bytes differ");
        }
        // Replaced snapshots are freed by the file deleter, in the background.
        assert!(baton_wal::slow_delete::wait_idle(
            std::time::Duration::from_secs(30)
        ));
        let names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [SNAPSHOT_FILE]);
    }

    /// Runs `f` on a glommio executor: building a snapshot waits on another thread.
    fn on_glommio<T>(f: impl std::future::Future<Output = T>) -> T {
        glommio::LocalExecutorBuilder::default()
            .make()
            .expect("glommio executor")
            .run(f)
    }

    /// The size rule asks for one snapshot once the log applied since the last reaches
    /// `max(min_bytes, ratio × last snapshot bytes)`, counts anew from the state a snapshot
    /// captures, and raises its threshold with the snapshot's size.
    #[test]
    fn snapshots_are_asked_for_by_the_log_size_against_the_last_snapshot() {
        let payload = vec![7u8; 100];
        let entry_bytes = batch(&[&payload]).as_bytes().len() as u64;
        let (mut sm, mut asked) = StateMachine::new().with_snapshot_by_size(10 * entry_bytes, 4, 0);
        let mut next = 0u64;
        let mut apply = |sm: &mut StateMachine, n: u64| {
            let entries = (0..n)
                .map(|_| {
                    next += 1;
                    let p = [&payload[..], &next.to_le_bytes()[..]].concat();
                    Entry::new_normal(LogId::new_term_index(1, next), batch(&[&p]))
                })
                .collect();
            run(apply_all(sm, entries)).unwrap();
        };
        let mut pending = || {
            let mut n = 0;
            while asked.try_recv().is_ok() {
                n += 1;
            }
            n
        };
        // A little over 9 entries' bytes (each entry carries 8 more payload bytes): not yet.
        apply(&mut sm, 9);
        assert_eq!(pending(), 0);
        // The tenth crosses the minimum: one request.
        apply(&mut sm, 1);
        assert_eq!(pending(), 1);
        // No snapshot starts (openraft was busy with another): asked again only once another
        // eighth of the threshold is applied (an entry here is ~1/10 of it).
        apply(&mut sm, 1);
        assert_eq!(pending(), 0);
        apply(&mut sm, 1);
        assert_eq!(pending(), 1);
        // A snapshot captures the state: counting starts again, and its size now counts.
        let snap =
            on_glommio(async { sm.get_snapshot_builder().await.build_snapshot().await }).unwrap();
        let snapshot_bytes = snap.snapshot.len() as u64;
        let threshold = (10 * entry_bytes).max(4 * snapshot_bytes);
        assert!(
            threshold > 10 * entry_bytes,
            "12 transactions' state outweighs 10 entries"
        );
        let below = threshold / (entry_bytes + 8) - 1;
        apply(&mut sm, below);
        assert_eq!(
            pending(),
            0,
            "{below} entries of ~{entry_bytes} B < {threshold} B"
        );
        apply(&mut sm, 2);
        assert_eq!(pending(), 1);
        // An installed snapshot counts the same way: its size sets the threshold.
        let mut follower = StateMachine::new().with_snapshot_by_size(1, 1, 0);
        let (ref mut f, ref mut f_asked) = follower;
        run(f.install_snapshot(&snap.meta, snap.snapshot.clone())).unwrap();
        let small = Entry::new_normal(LogId::new_term_index(1, next + 1), batch(&[b"one"]));
        run(apply_all(f, vec![small])).unwrap();
        assert!(
            f_asked.try_recv().is_err(),
            "one small entry < the snapshot's size"
        );
    }

    /// A node's phase delays its first size-rule snapshot by that many bytes of log, and only
    /// the first: from a snapshot on it counts like any other node, from its own snapshot.
    #[test]
    fn the_snapshot_phase_delays_only_the_first_size_rule_snapshot() {
        let entry = |i: u64| {
            let p = [&[7u8; 100][..], &i.to_le_bytes()[..]].concat();
            Entry::new_normal(LogId::new_term_index(1, i), batch(&[&p]))
        };
        let entry_bytes = match &entry(1).payload {
            EntryPayload::Normal(b) => b.as_bytes().len() as u64,
            _ => unreachable!(),
        };
        let min = 10 * entry_bytes;
        let (mut plain, mut plain_asked) = StateMachine::new().with_snapshot_by_size(min, 0, 0);
        let (mut phased, mut phased_asked) =
            StateMachine::new().with_snapshot_by_size(min, 0, 3 * entry_bytes);
        let asked_after =
            |sm: &mut StateMachine, asked: &mut futures_channel::mpsc::Receiver<()>, from: u64| {
                (from..from + 40).find(|i| {
                    run(apply_all(sm, vec![entry(*i)])).unwrap();
                    asked.try_recv().is_ok()
                })
            };
        assert_eq!(asked_after(&mut plain, &mut plain_asked, 1), Some(10));
        assert_eq!(asked_after(&mut phased, &mut phased_asked, 1), Some(13));
        // Each builds its snapshot; from there both count the same distance.
        for sm in [&mut plain, &mut phased] {
            on_glommio(async { sm.get_snapshot_builder().await.build_snapshot().await }).unwrap();
        }
        assert_eq!(asked_after(&mut plain, &mut plain_asked, 11), Some(20));
        assert_eq!(asked_after(&mut phased, &mut phased_asked, 14), Some(23));
    }

    /// The builder captures the state when it is made; applies after that (while the blob is
    /// encoded on its own thread) are not in it, and are not disturbed by it.
    #[test]
    fn a_snapshot_holds_the_state_at_its_builder_not_later_applies() {
        let mut sm = StateMachine::new();
        let view = sm.view();
        let many: Vec<Vec<u8>> = (0..3_000u32).map(|i| i.to_le_bytes().to_vec()).collect();
        let refs: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
        run(apply_all(
            &mut sm,
            vec![
                Entry::new_membership(LogId::new_term_index(1, 0), membership()),
                Entry::new_normal(LogId::new_term_index(1, 1), batch(&refs)),
            ],
        ))
        .unwrap();
        let at_capture = view.with(|s| s.snapshot_bytes());
        let (snap, after) = on_glommio(async {
            let mut builder = sm.get_snapshot_builder().await;
            apply_all(
                &mut sm,
                vec![Entry::new_normal(
                    LogId::new_term_index(1, 2),
                    batch(&[b"later", &[0, 0, 0, 0]]),
                )],
            )
            .await
            .unwrap();
            let snap = builder.build_snapshot().await.unwrap();
            (snap, view.with(|s| s.snapshot_bytes()))
        });
        assert_eq!(snap.meta.last_log_id, Some(LogId::new_term_index(1, 1)));
        let mut restored = StateMachine::new();
        run(restored.install_snapshot(&snap.meta, snap.snapshot.clone())).unwrap();
        assert_eq!(restored.view().with(|s| s.snapshot_bytes()), at_capture);
        assert_eq!(restored.view().with(|s| s.tx_total()), 3_000);
        // The live state went on: one new transaction, one duplicate of the first batch.
        let live = view.with(|s| (s.tx_total(), s.duplicates_total()));
        assert_eq!(live, (3_002, 1));
        assert_ne!(after, at_capture);
    }

    /// A batch of `payloads` at (term 1, `index`) carrying the leader's seal, and the hashes
    /// its batcher would have kept for it.
    fn sealed_batch(index: u64, payloads: &[&[u8]]) -> (BatchBytes, KnownHashes) {
        let tx_hashes: Vec<TxHash> = payloads.iter().map(|p| TxHash::of(p)).collect();
        let tree = crate::merkle::MerkleTree::new(&tx_hashes);
        let bytes = batch(payloads);
        let header = crate::batch::BatchHeader {
            term: 1,
            index,
            prev_batch_hash: [0; 32],
            tx_merkle_root: tree.root(),
            tx_count: payloads.len() as u32,
            timestamp_us: 0,
        };
        let seal = crate::receipt::SignedHeader::sign(header, &crate::sign::Signer::random());
        let known = KnownHashes {
            leaves: tree.leaves().to_vec(),
            tx_hashes,
            root: tree.root(),
        };
        (bytes.with_seal(seal), known)
    }

    #[test]
    fn a_batch_this_node_built_is_applied_with_the_hashes_it_kept() {
        let hashed = HashedBatches::default();
        let mut sm = StateMachine::new().with_hashed(hashed.clone());
        let view = sm.view();
        let (first, known) = sealed_batch(1, &[b"a", b"b"]);
        // Mark the kept hashes (one tx hash swapped for another's): if apply takes them, the
        // index holds the marked hash; if it derived its own, it would hold the real one.
        let mut marked = known.clone();
        marked.tx_hashes[1] = TxHash::of(b"marker");
        hashed.remember(first.as_bytes(), marked);
        // Kept for other bytes (same root and count): never used for this batch.
        let (second, second_known) = sealed_batch(2, &[b"c", b"d"]);
        let mut other_bytes = second.as_bytes().to_vec();
        other_bytes.push(0);
        let mut wrong = second_known.clone();
        wrong.tx_hashes[0] = TxHash::of(b"wrong");
        hashed.remember(&other_bytes, wrong.clone());
        // Same length, other content: refused by the CRC.
        let mut same_len = second.as_bytes().to_vec();
        *same_len.last_mut().unwrap() ^= 1;
        hashed.remember(&same_len, wrong);
        run(apply_all(
            &mut sm,
            vec![
                Entry::new_normal(LogId::new_term_index(1, 1), first),
                Entry::new_normal(LogId::new_term_index(1, 2), second),
            ],
        ))
        .unwrap();
        view.with(|s| {
            assert!(
                s.lookup(&TxHash::of(b"marker")).is_some(),
                "kept hashes used"
            );
            assert!(s.lookup(&TxHash::of(b"b")).is_none());
            assert!(
                s.lookup(&TxHash::of(b"c")).is_some(),
                "derived from its bytes"
            );
            assert!(
                s.lookup(&TxHash::of(b"wrong")).is_none(),
                "other bytes' hashes unused"
            );
        });
        assert_eq!(hashed.len(), 2, "the used entry is gone, the others stay");
    }

    #[test]
    fn kept_hashes_are_bounded_by_transactions() {
        let hashed = HashedBatches::default();
        let (bytes, known) = sealed_batch(1, &[b"a"]);
        let big = KnownHashes {
            tx_hashes: vec![TxHash::of(b"x"); HASHED_TXS_MAX / 2],
            leaves: vec![[0; 32]; HASHED_TXS_MAX / 2],
            root: [7; 32],
        };
        hashed.remember(bytes.as_bytes(), known.clone());
        hashed.remember(b"one", big.clone());
        hashed.remember(b"two", big.clone());
        // Over the transaction bound: the oldest went.
        assert_eq!(hashed.len(), 2);
        assert!(hashed.take(&known.root, bytes.as_bytes()).is_none());
        assert!(
            hashed.take(&[7; 32], b"two") == Some(big),
            "same root and length as \"one\""
        );
        assert!(hashed.take(&[7; 32], b"two").is_none(), "taken once");
        // And the batch bound.
        for i in 0..HASHED_BATCHES_MAX as u32 + 10 {
            hashed.remember(&i.to_le_bytes(), known.clone());
        }
        assert_eq!(hashed.len(), HASHED_BATCHES_MAX);
        assert!(
            hashed.take(&known.root, &9u32.to_le_bytes()).is_none(),
            "aged out"
        );
        let last = HASHED_BATCHES_MAX as u32 + 9;
        assert!(hashed.take(&known.root, &last.to_le_bytes()).is_some());
    }

    #[test]
    fn applies_batches_and_survives_snapshot_transfer() {
        let mut sm = StateMachine::new();
        let view = sm.view();
        run(apply_all(
            &mut sm,
            vec![
                Entry::new_membership(LogId::new_term_index(1, 0), membership()),
                Entry::new_blank(LogId::new_term_index(1, 1)),
                Entry::new_normal(LogId::new_term_index(1, 2), batch(&[b"a", b"b"])),
                Entry::new_normal(
                    LogId::new_term_index(1, 3),
                    BatchBytes::from(Bytes::from_static(&[0u8; 32])),
                ),
                Entry::new_normal(LogId::new_term_index(2, 4), batch(&[b"b", b"c"])),
            ],
        ))
        .unwrap();
        assert_eq!(view.last_applied(), Some(LogId::new_term_index(2, 4)));
        assert_eq!(view.rejected_batches(), 1);
        assert_eq!(view.with(|s| (s.tx_total(), s.duplicates_total())), (4, 1));

        let snap = on_glommio(async {
            let mut b = sm.get_snapshot_builder().await;
            b.build_snapshot().await
        })
        .unwrap();
        assert_eq!(snap.meta.last_log_id, Some(LogId::new_term_index(2, 4)));
        assert_eq!(
            snap.meta.last_membership.log_id(),
            &Some(LogId::new_term_index(1, 0))
        );

        let mut follower = StateMachine::new();
        run(follower.install_snapshot(&snap.meta, snap.snapshot.clone())).unwrap();
        let (applied, m) = run(follower.applied_state()).unwrap();
        assert_eq!(applied, snap.meta.last_log_id);
        assert_eq!(m, snap.meta.last_membership);
        assert_eq!(
            follower.view().with(|s| s.snapshot_bytes()),
            view.with(|s| s.snapshot_bytes())
        );
        let current = run(follower.get_current_snapshot()).unwrap().unwrap();
        assert_eq!(current.meta, snap.meta);

        // A node's state machine keeps its index at full size (two generations of 2^20: 32
        // slots in each of 2 × 65,536 parts), also once a snapshot replaced its state.
        let full = 2 * crate::tx_index::PARTS * 32;
        assert!(sm.view().with(|s| s.index_slots()) < full);
        let reserved = StateMachine::new().with_reserved_index();
        assert_eq!(reserved.view().with(|s| s.index_slots()), full);
        let mut reserved = reserved;
        run(reserved.install_snapshot(&snap.meta, snap.snapshot.clone())).unwrap();
        assert_eq!(reserved.view().with(|s| s.index_slots()), full);
        assert_eq!(
            reserved.view().with(|s| s.snapshot_bytes()),
            view.with(|s| s.snapshot_bytes())
        );
    }

    /// With a directory, a built or installed snapshot's blob is not kept in memory: it is
    /// read back from the file when asked for, whole and with the metadata it was built with,
    /// also after a restart.
    #[test]
    fn a_persisted_snapshot_is_served_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let follower_dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path()).unwrap();
        let entries = vec![
            Entry::new_membership(LogId::new_term_index(1, 0), membership()),
            Entry::new_normal(LogId::new_term_index(1, 1), batch(&[b"a", b"b", b"c"])),
        ];
        let (built, served) = on_glommio(async {
            apply_all(&mut sm, entries).await.unwrap();
            assert!(sm.get_current_snapshot().await.unwrap().is_none());
            let built = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            (built, sm.get_current_snapshot().await.unwrap().unwrap())
        });
        assert!(sm.current.borrow().as_ref().unwrap().blob.is_none());
        assert_eq!(served.meta, built.meta);
        assert_eq!(served.snapshot, built.snapshot);
        // Streamed to the file, the blob is the one encoded in memory.
        let in_memory = sm.state.borrow();
        let expected = encode_blob(
            in_memory.last_applied.as_ref(),
            &in_memory.membership,
            in_memory.sequencer.clone(),
        )
        .unwrap();
        drop(in_memory);
        assert!(built.snapshot == expected);
        assert_eq!(
            std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap(),
            expected
        );

        // Installed on a follower with a directory: kept on disk only, served the same.
        let mut follower = StateMachine::open(follower_dir.path()).unwrap();
        let served_by_follower = on_glommio(async {
            follower
                .install_snapshot(&built.meta, built.snapshot.clone())
                .await
                .unwrap();
            follower.get_current_snapshot().await.unwrap().unwrap()
        });
        assert!(follower.current.borrow().as_ref().unwrap().blob.is_none());
        assert_eq!(served_by_follower.meta, built.meta);
        assert_eq!(served_by_follower.snapshot, built.snapshot);

        // After a restart, from the file.
        drop(sm);
        let mut reopened = StateMachine::open(dir.path()).unwrap();
        let after_restart = on_glommio(async { reopened.get_current_snapshot().await })
            .unwrap()
            .unwrap();
        assert_eq!(after_restart.meta, built.meta);
        assert_eq!(after_restart.snapshot, built.snapshot);

        // A file damaged since is an error, not a snapshot.
        let mut bytes = std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(dir.path().join(SNAPSHOT_FILE), &bytes).unwrap();
        let err = on_glommio(async { reopened.get_current_snapshot().await }).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn apply_results_report_index_count_duplicates_and_rejection() {
        let mut sm = StateMachine::new();
        let mut state = sm.state.borrow_mut();
        let r = state
            .apply(&Entry::new_normal(
                LogId::new_term_index(1, 2),
                batch(&[b"x", b"x", b"y"]),
            ))
            .unwrap();
        assert_eq!((r.index, r.tx_count, r.rejected), (2, 3, false));
        assert_eq!(
            r.duplicates,
            vec![Duplicate {
                offset: 1,
                original: Position {
                    index: 2,
                    offset: 0
                }
            }]
        );
        let r = state
            .apply(&Entry::new_normal(
                LogId::new_term_index(1, 3),
                BatchBytes::from(Bytes::from_static(b"not a batch")),
            ))
            .unwrap();
        assert!(r.rejected);
        assert_eq!(r.index, 3);
        let err = state
            .apply(&Entry::new_normal(
                LogId::new_term_index(1, 2),
                batch(&[b"z"]),
            ))
            .unwrap_err();
        assert!(matches!(err, StateMachineError::Apply { .. }), "{err}");
        drop(state);
        let _ = &mut sm;
    }

    #[test]
    fn corrupt_or_mismatched_blobs_are_refused() {
        let mut sm = StateMachine::new();
        run(apply_all(
            &mut sm,
            vec![Entry::new_normal(
                LogId::new_term_index(1, 1),
                batch(&[b"a"]),
            )],
        ))
        .unwrap();
        let snap =
            on_glommio(async { sm.get_snapshot_builder().await.build_snapshot().await }).unwrap();

        let mut target = StateMachine::new();
        let mut bad = snap.snapshot.to_vec();
        bad[20] ^= 1;
        let err = run(target.install_snapshot(&snap.meta, Bytes::from(bad))).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");

        let mut other_meta = snap.meta.clone();
        other_meta.last_log_id = Some(LogId::new_term_index(1, 9));
        let err = run(target.install_snapshot(&other_meta, snap.snapshot.clone())).unwrap_err();
        assert!(err.to_string().contains("metadata says"), "{err}");
        assert_eq!(
            run(target.applied_state()).unwrap().0,
            None,
            "state untouched"
        );

        assert!(decode_blob(&[0; 10]).is_err());
    }
}
