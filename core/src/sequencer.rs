//! The deterministic sequencer state: which batch sits at which Raft index, the position of every
//! transaction, and the idempotency index from transaction hash to position. The index remembers
//! the last [`IDEMPOTENCY_GENERATION_TXS`] to twice that many sequenced transactions
//! (`tx_index::Window`): a hash seen again within it is a duplicate of its first occurrence, one
//! seen again after it is ordered again.
//!
//! Pure code: no runtime, no I/O, no openraft types. [`Sequencer::apply_batch`] takes the bytes of
//! a committed batch and its Raft log id and returns what it ordered; two sequencers fed the same
//! batches end in the same state and write byte-identical snapshots.
//!
//! It also holds the per-rollup state ([`Rollups`]: registrations, blocks, encrypted
//! transactions) and applies the control commands ([`Sequencer::apply_command`]).
//!
//! Of the batches it keeps only the last one's record (term, digest, signed header): receipts
//! take the signed header from the batch's log entry, so the state does not grow with the log.
//!
//! Snapshot format (version 6, all integers little-endian; version 5, the same layout with a
//! record of every batch ever applied, is still read, keeping the last):
//!
//! ```text
//! header (32 bytes): magic "BATONSEQ" | version u32 | reserved u32 (0) | body_len u64 |
//!                    crc32(body) u32 | reserved u32 (0)
//! body:              has_applied u64 (0 or 1) | applied_index u64 | applied_term u64 |
//!                    tx_total u64 | duplicates_total u64 | batch_count u64 | position_count u64 |
//!                    generation_txs u64 | previous_count u64 |
//!                    batch_count × { index u64 | term u64 | header_digest [32] | tx_count u32 |
//!                                    signed u32 (0 or 1) | signed header [160] (zero when
//!                                    unsigned) }   (216 bytes; batch_count is 0 before the
//!                                                     first batch, else 1: the last one)
//!                    position_count × { tx_hash [32] | index u64 | offset u32 }
//!                             (44 bytes: the idempotency index's previous generation, its
//!                              first previous_count records, then its current one; each hash
//!                              ascending)
//!                    rollup section:
//!   rollup_count u64 | unblocked u64 | secret_count u64 |
//!   rollup_count × { rollup_id u64 | block_time_ms u32 | max_block_txs u32 |
//!                    reveal_window_blocks u32 | 0 u32 | registered_at u64 | pending_count u64 |
//!                    block_count u64 |
//!                    pending_count × { tx_hash [32] | index u64 | offset u32 | encrypted u32 } |
//!                    block_count × { signed block header [176] | encrypted u32 | revealed u32 |
//!                                    expired u32 | 0 u32 | sealed_at u64 | first index u64 |
//!                                    first offset u32 | last index u64 | last offset u32 } }
//!                                                                   (rollup id ascending)
//!   secret_count × { tx_hash [32] | rollup_id u64 | key_commitment [32] | height u64 (0: none) |
//!                    state u32 (0 sealed, 1 revealed, 2 expired) | len u32 | revealed_at u64 |
//!                    key [32] (zero unless revealed) | len bytes (ciphertext if sealed,
//!                    plaintext if revealed, none if expired) }       (hash ascending)
//! ```
//!
//! Records are sorted, so the encoding depends only on the state, never on hash-map order.

use std::collections::BTreeMap;

use crate::batch::access_batch;
use crate::command::{Command, CommandRejection};
use crate::error::ModelError;
use crate::hash::TxHash;
use crate::keccak_many::{keccak256_many, leaf_hashes};
use crate::limits::IDEMPOTENCY_GENERATION_TXS;
use crate::merkle::root_of_leaf_hashes;
use crate::receipt::{SignedHeader, SIGNED_HEADER_BYTES};
use crate::rollups::{Rollups, Sealed};
use crate::tx_index::{TxIndex, Window, PREFETCH_AHEAD};

/// Where a transaction was ordered: the Raft index of its batch and its offset in the batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Raft log index of the batch.
    pub index: u64,
    /// Offset of the transaction within the batch.
    pub offset: u32,
}

/// A transaction whose hash was already sequenced: it gets no new position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duplicate {
    /// Offset of the repeated transaction within the applied batch.
    pub offset: u32,
    /// Position of the first occurrence of the same hash.
    pub original: Position,
}

/// A batch's transaction hashes and Merkle leaves, computed by this node from exactly the
/// batch's bytes (its own batcher built the batch): applying it need not derive them again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownHashes {
    /// Transaction hashes in batch order.
    pub tx_hashes: Vec<TxHash>,
    /// Their Merkle leaf hashes.
    pub leaves: Vec<[u8; 32]>,
    /// The Merkle root over them (as in the batch's header).
    pub root: [u8; 32],
}

/// What applying one batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Raft log index of the batch.
    pub index: u64,
    /// Raft term of the batch.
    pub term: u64,
    /// Transactions in the batch, duplicates included.
    pub tx_count: u32,
    /// The transactions that repeat an earlier hash, in offset order; every other offset `o`
    /// got the new position `(index, o)`.
    pub duplicates: Vec<Duplicate>,
}

impl Applied {
    /// Transactions that got a new position.
    pub fn sequenced(&self) -> u32 {
        self.tx_count - self.duplicates.len() as u32
    }
}

/// What the sequencer remembers about an applied batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRecord {
    /// Raft log index.
    pub index: u64,
    /// Raft term.
    pub term: u64,
    /// `digest()` of the batch header (what the leader signs, and the next batch's
    /// `prev_batch_hash`): of the signed header when there is one.
    pub header_digest: [u8; 32],
    /// Transactions in the batch, duplicates included.
    pub tx_count: u32,
    /// The leader's signed header, for batches a leader signed (all but those of a leader
    /// without a key).
    pub signed: Option<SignedHeader>,
}

/// Why a batch was not applied. The state is unchanged whenever this is returned.
#[derive(Debug, thiserror::Error)]
pub enum SequencerError {
    /// The batch bytes fail validation (`access_batch`).
    #[error("batch at index {index} is invalid: {source}")]
    InvalidBatch {
        /// Raft index of the rejected batch.
        index: u64,
        /// What validation rejected.
        #[source]
        source: ModelError,
    },
    /// The header's Merkle root is not the root of the batch's transaction hashes.
    #[error("batch at index {index}: header Merkle root does not match its transactions")]
    MerkleRootMismatch {
        /// Raft index of the rejected batch.
        index: u64,
        /// Root the header claims.
        header: [u8; 32],
        /// Root of the transactions.
        computed: [u8; 32],
    },
    /// The leader's signed header does not describe the batch it came with.
    #[error("batch at index {index}: signed header does not match its transactions")]
    SignedHeaderMismatch {
        /// Raft index of the rejected batch.
        index: u64,
    },
    /// Batches must be applied in increasing index order.
    #[error("batch index {index} is not after the last applied batch index {applied}")]
    IndexNotAfterApplied {
        /// Raft index of the batch.
        index: u64,
        /// Last applied batch index.
        applied: u64,
    },
    /// Terms never decrease along the Raft log.
    #[error("batch at index {index} has term {term}, below the last applied term {applied_term}")]
    TermRegressed {
        /// Raft index of the batch.
        index: u64,
        /// Its term.
        term: u64,
        /// Term of the last applied batch.
        applied_term: u64,
    },
}

impl SequencerError {
    /// True if the batch's content is at fault (every node rejects the same committed bytes the
    /// same way); false if the caller broke the apply order, which is a bug.
    pub fn is_content_rejection(&self) -> bool {
        matches!(
            self,
            SequencerError::InvalidBatch { .. }
                | SequencerError::MerkleRootMismatch { .. }
                | SequencerError::SignedHeaderMismatch { .. }
        )
    }
}

/// Why snapshot bytes were refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Fewer bytes than the fixed header.
    #[error("snapshot is {len} bytes, the header alone needs {need}")]
    TooShort {
        /// Bytes given.
        len: usize,
        /// Header length.
        need: usize,
    },
    /// Not a sequencer snapshot.
    #[error("snapshot magic is {found:02x?}, expected \"BATONSEQ\"")]
    BadMagic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// A format version this build cannot read.
    #[error("snapshot format version {found} is not supported (this build reads {supported})")]
    UnsupportedVersion {
        /// Version in the header.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The header's body length disagrees with the bytes present.
    #[error("snapshot header says {header} body bytes, {actual} present")]
    LengthMismatch {
        /// Body length in the header.
        header: u64,
        /// Body bytes present.
        actual: usize,
    },
    /// The body's crc32 is not the one in the header (corrupted on disk or on the way).
    #[error("snapshot body checksum mismatch: header {stored:#010x}, body {computed:#010x}")]
    ChecksumMismatch {
        /// crc32 in the header.
        stored: u32,
        /// crc32 of the body.
        computed: u32,
    },
    /// The body is well framed but states something impossible.
    #[error("snapshot body is inconsistent: {reason} (at record {at})")]
    Inconsistent {
        /// What is wrong.
        reason: &'static str,
        /// Record number (or field number in the fixed part) where it was found.
        at: u64,
    },
}

const MAGIC: [u8; 8] = *b"BATONSEQ";
/// Snapshot format version written by this build.
pub const SNAPSHOT_VERSION: u32 = 6;
/// The previous format, still read: the same layout with a record of every batch ever applied
/// (pruned on load).
const SNAPSHOT_VERSION_ALL_BATCHES: u32 = 5;
const HEADER_BYTES: usize = 32;
const FIXED_BODY_BYTES: usize = 9 * 8;
const BATCH_RECORD_BYTES: usize = 56 + SIGNED_HEADER_BYTES;
const POSITION_RECORD_BYTES: usize = 44;

/// The sequencer state machine (see the module docs).
#[derive(Debug, Clone)]
pub struct Sequencer {
    /// Last applied batch: (index, term).
    applied: Option<(u64, u64)>,
    /// The last applied batch. Older batches need no record here: a receipt takes the leader's
    /// signed header from the batch's log entry (where its Merkle path comes from too), and
    /// the next batch chains to the log's last signed batch. So the state stays bounded
    /// however long the node runs.
    last_batch: Option<BatchRecord>,
    /// Recently sequenced transactions' positions (the idempotency index): two generations
    /// of [`IDEMPOTENCY_GENERATION_TXS`], each split in parts so its growth never stalls the
    /// shard (see `tx_index`).
    positions: Window<Position>,
    tx_total: u64,
    duplicates_total: u64,
    rollups: Rollups,
}

/// What an applied control command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandApplied {
    /// A rollup was registered.
    Registered {
        /// Its id.
        rollup_id: u64,
    },
    /// A block was sealed.
    Sealed(Sealed),
    /// An encrypted transaction's plaintext was recorded.
    Revealed {
        /// Its hash.
        tx_hash: TxHash,
    },
}

impl PartialEq for Sequencer {
    fn eq(&self, other: &Self) -> bool {
        self.rollups == other.rollups
            && self.applied == other.applied
            && self.last_batch == other.last_batch
            && self.positions == other.positions
            && self.tx_total == other.tx_total
            && self.duplicates_total == other.duplicates_total
    }
}

impl Eq for Sequencer {}

impl Default for Sequencer {
    fn default() -> Self {
        Self::with_idempotency_generation(IDEMPOTENCY_GENERATION_TXS)
    }
}

impl Sequencer {
    /// An empty sequencer: nothing applied.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty sequencer whose idempotency index generations hold `generation` transactions
    /// (tests; nodes use [`IDEMPOTENCY_GENERATION_TXS`]).
    pub fn with_idempotency_generation(generation: usize) -> Self {
        Self {
            applied: None,
            last_batch: None,
            positions: Window::new(generation),
            tx_total: 0,
            duplicates_total: 0,
            rollups: Rollups::default(),
        }
    }

    /// Allocates and faults in the idempotency index's full size now ([`Window::reserve`]).
    pub fn reserve_index(&mut self) {
        self.positions.reserve();
    }

    /// Slots the idempotency index's tables have (tests).
    #[cfg(test)]
    pub(crate) fn index_slots(&self) -> usize {
        self.positions.slots()
    }

    /// Validates the batch at Raft log id `(term, index)` and orders its transactions.
    ///
    /// Each transaction at offset `o` gets position `(index, o)`, unless its hash was sequenced
    /// before (in an earlier batch or earlier in this one): then it is reported as a
    /// [`Duplicate`] of the first occurrence and gets no position. On error nothing changes.
    pub fn apply_batch(
        &mut self,
        index: u64,
        term: u64,
        batch_bytes: &[u8],
    ) -> Result<Applied, SequencerError> {
        self.apply_signed_batch(index, term, batch_bytes, None)
    }

    /// `apply_batch` for a batch the leader signed: `signed` must name `(term, index)` and carry
    /// the batch's Merkle root and count, or the batch is rejected
    /// ([`SequencerError::SignedHeaderMismatch`]); it is kept with the batch's record.
    pub fn apply_signed_batch(
        &mut self,
        index: u64,
        term: u64,
        batch_bytes: &[u8],
        signed: Option<&SignedHeader>,
    ) -> Result<Applied, SequencerError> {
        self.apply_known_batch(index, term, batch_bytes, signed, None)
    }

    /// `apply_signed_batch` with the batch's hashes already at hand: `known` must have been
    /// computed from exactly `batch_bytes` (the caller compared the bytes). It is used only
    /// where it matches the batch (transaction count and header root); otherwise, or when
    /// `None`, everything is derived from the bytes. Either way the outcome is the same.
    pub fn apply_known_batch(
        &mut self,
        index: u64,
        term: u64,
        batch_bytes: &[u8],
        signed: Option<&SignedHeader>,
        known: Option<KnownHashes>,
    ) -> Result<Applied, SequencerError> {
        if let Some((applied, applied_term)) = self.applied {
            if index <= applied {
                return Err(SequencerError::IndexNotAfterApplied { index, applied });
            }
            if term < applied_term {
                return Err(SequencerError::TermRegressed {
                    index,
                    term,
                    applied_term,
                });
            }
        }
        let batch = access_batch(batch_bytes)
            .map_err(|source| SequencerError::InvalidBatch { index, source })?;
        let known = known.filter(|k| {
            k.tx_hashes.len() == batch.txs.len()
                && k.leaves.len() == k.tx_hashes.len()
                && k.root == batch.header.tx_merkle_root
        });
        let (hashes, leaves, computed) = match known {
            Some(k) => (k.tx_hashes, k.leaves, k.root),
            None => {
                // The transactions' hashes, leaves and tree levels are each independent of
                // one another: hashed several per permutation (keccak_many).
                let mut raw = Vec::with_capacity(batch.txs.len());
                keccak256_many(batch.txs.iter().map(|tx| tx.bytes.as_slice()), &mut raw);
                let hashes: Vec<TxHash> = raw.into_iter().map(TxHash).collect();
                let mut leaves = Vec::with_capacity(hashes.len());
                leaf_hashes(&hashes, &mut leaves);
                let computed = root_of_leaf_hashes(&leaves, &mut Vec::new());
                (hashes, leaves, computed)
            }
        };
        if computed != batch.header.tx_merkle_root {
            return Err(SequencerError::MerkleRootMismatch {
                index,
                header: batch.header.tx_merkle_root,
                computed,
            });
        }
        // `access_batch` bounds the count by BATCH_TXS_MAX, so offsets fit in u32.
        let tx_count = hashes.len() as u32;
        if let Some(h) = signed.map(|s| &s.header) {
            if (h.term, h.index, h.tx_merkle_root, h.tx_count) != (term, index, computed, tx_count)
            {
                return Err(SequencerError::SignedHeaderMismatch { index });
            }
        }
        // Validation passed: from here on nothing can fail, so the update is all or nothing.
        let mut duplicates = Vec::new();
        // Rollups this batch ordered into (consecutive repeats skipped), for catch_up_heads.
        let mut touched: Vec<u64> = Vec::new();
        let txs = hashes.iter().zip(leaves).zip(batch.txs.iter());
        for (offset, ((&hash, leaf), tx)) in txs.enumerate() {
            // The index entries of hashes a little further on start loading now
            // (`Window::prefetch`): the lookups are memory-bound.
            let ahead = |k: usize| &hashes[(offset + k).min(hashes.len() - 1)];
            self.positions.prefetch(
                ahead(PREFETCH_AHEAD),
                ahead(PREFETCH_AHEAD / 2),
                ahead(PREFETCH_AHEAD / 4),
            );
            let offset = offset as u32;
            let position = Position { index, offset };
            match self.positions.insert_new(hash, position) {
                Err(original) => duplicates.push(Duplicate { offset, original }),
                Ok(()) => {
                    if touched.last() != Some(&tx.rollup_id()) {
                        touched.push(tx.rollup_id());
                    }
                    self.rollups.order(
                        tx.rollup_id(),
                        position,
                        hash,
                        leaf,
                        tx.kind.key_commitment(),
                        tx.bytes.as_slice(),
                    );
                }
            }
        }
        self.rollups.catch_up_heads(&touched);
        self.last_batch = Some(BatchRecord {
            index,
            term,
            header_digest: match signed {
                Some(s) => s.digest(),
                None => batch.header.digest(),
            },
            tx_count,
            signed: signed.copied(),
        });
        self.applied = Some((index, term));
        self.tx_total += u64::from(tx_count);
        self.duplicates_total += duplicates.len() as u64;
        debug_assert!(
            self.positions.len() as u64 + self.duplicates_total <= self.tx_total,
            "every remembered transaction is one of those sequenced"
        );
        Ok(Applied {
            index,
            term,
            tx_count,
            duplicates,
        })
    }

    /// Applies the control command `bytes` at Raft index `index` (see [`crate::command`]). A
    /// rejected command changes nothing; every node rejects it the same way.
    pub fn apply_command(
        &mut self,
        index: u64,
        bytes: &[u8],
    ) -> Result<CommandApplied, CommandRejection> {
        match Command::decode(bytes)? {
            Command::RegisterRollup { rollup_id, policy } => {
                self.rollups.register(index, rollup_id, policy)?;
                Ok(CommandApplied::Registered { rollup_id })
            }
            Command::SealBlock(signed) => {
                Ok(CommandApplied::Sealed(self.rollups.seal(index, &signed)?))
            }
            Command::Reveal { tx_hash, key } => {
                let sequenced = self.positions.contains_key(&tx_hash);
                self.rollups.reveal(index, &tx_hash, &key, sequenced)?;
                Ok(CommandApplied::Revealed { tx_hash })
            }
        }
    }

    /// Whether `command` would be applied now: the check a node runs before proposing a
    /// client's command. (A seal marker is the leader's own; it is checked on apply.)
    pub fn check_command(&self, command: &Command) -> Result<(), CommandRejection> {
        match command {
            Command::RegisterRollup { rollup_id, policy } => {
                self.rollups.check_register(*rollup_id, policy)
            }
            Command::SealBlock(_) => Ok(()),
            Command::Reveal { tx_hash, key } => self
                .rollups
                .check_reveal(tx_hash, key, self.positions.contains_key(tx_hash))
                .map(|_| ()),
        }
    }

    /// The per-rollup state.
    pub fn rollups(&self) -> &Rollups {
        &self.rollups
    }

    /// Position of the first transaction with this hash, if it was sequenced and is still in
    /// the idempotency window (at least [`IDEMPOTENCY_GENERATION_TXS`] transactions back).
    pub fn lookup(&self, tx_hash: &TxHash) -> Option<Position> {
        self.positions.get(tx_hash)
    }

    /// Raft index of the last applied batch, `None` before the first.
    pub fn applied_index(&self) -> Option<u64> {
        self.applied.map(|(index, _)| index)
    }

    /// The last applied batch.
    pub fn last_batch(&self) -> Option<&BatchRecord> {
        self.last_batch.as_ref()
    }

    /// Transactions applied, duplicates included.
    pub fn tx_total(&self) -> u64 {
        self.tx_total
    }

    /// Transactions applied that repeated an earlier hash.
    pub fn duplicates_total(&self) -> u64 {
        self.duplicates_total
    }

    /// The state in the versioned, checksummed snapshot format (see the module docs).
    pub fn snapshot_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.snapshot_len_hint());
        self.write_snapshot(&mut out)
            .expect("writing to memory does not fail");
        out
    }

    /// About how many bytes [`Sequencer::snapshot_bytes`] writes (a lower bound), for
    /// reserving a buffer that will hold it.
    pub fn snapshot_len_hint(&self) -> usize {
        HEADER_BYTES
            + FIXED_BODY_BYTES
            + usize::from(self.last_batch.is_some()) * BATCH_RECORD_BYTES
            + self.positions.len() * POSITION_RECORD_BYTES
            + self.rollups.encoded_len_hint()
    }

    /// Writes [`Sequencer::snapshot_bytes`] to `out`, from the sink's current length on (it
    /// can be part of a larger blob). See [`Sequencer::into_snapshot`]; this writes a clone
    /// (cheap: the index's parts are shared).
    pub fn write_snapshot<S: SnapshotSink>(&self, out: &mut S) -> std::io::Result<()> {
        self.clone().into_snapshot(out)
    }

    /// Writes [`Sequencer::snapshot_bytes`] of this state to `out`, consuming it: see
    /// [`Sequencer::into_snapshot_writer`] and [`SnapshotWriter::write`].
    pub fn into_snapshot<S: SnapshotSink>(self, out: &mut S) -> std::io::Result<()> {
        self.into_snapshot_writer().write(out)
    }

    /// The first half of encoding a snapshot, consuming this state: copies the idempotency
    /// index out into its records (unsorted) and encodes the rest, which is small.
    ///
    /// This is how a snapshot of the live state is taken: from a clone that shares the index's
    /// parts with it, on another thread, while the live state goes on. Each part the clone
    /// holds is copied when the live state next writes to it: the copies, and the originals
    /// freed among parts still in use, had left a node's RSS 100-170 MiB higher after every
    /// snapshot under 2x overload, when the clone held every part until the whole snapshot was
    /// written, seconds later. So the current generation (the one written to) is copied out
    /// first, each part let go as soon as it is read ([`TxIndex::into_entries`]), then the
    /// previous one (a generation rotating meanwhile regrows the tables a clone holds). The
    /// caller does this at about normal priority (nice 5), so that it takes tens of
    /// milliseconds and the live state copies few parts meanwhile, and sorts and writes
    /// ([`SnapshotWriter::write`]) at the lowest.
    pub fn into_snapshot_writer(self) -> SnapshotWriter {
        let Sequencer {
            applied,
            last_batch,
            positions,
            tx_total,
            duplicates_total,
            rollups,
        } = self;
        let generation = positions.generation();
        let (previous, current) = positions.into_generations();
        let current = records(current);
        let previous = records(previous);
        // Its length is in the header. It is small next to the index (pending transactions
        // and secrets of open blocks).
        let mut rollup_section = Vec::with_capacity(rollups.encoded_len_hint());
        rollups.encode(&mut rollup_section);
        SnapshotWriter {
            applied,
            last_batch,
            tx_total,
            duplicates_total,
            generation,
            previous,
            current,
            rollup_section,
        }
    }

    /// Restores a sequencer from [`Sequencer::snapshot_bytes`] output, checking framing,
    /// digest and every invariant of the state.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Sequencer, SnapshotError> {
        let (version, body) = check_header(bytes)?;
        let field = |i: usize| le_u64(&body[i * 8..i * 8 + 8]);
        let (has_applied, index, term) = (field(0), field(1), field(2));
        let (tx_total, duplicates_total) = (field(3), field(4));
        let (batch_count, position_count) = (field(5), field(6));
        let (generation, previous_count) = (field(7), field(8));
        let inconsistent = |reason, at| SnapshotError::Inconsistent { reason, at };
        let applied = match has_applied {
            0 if index == 0 && term == 0 => None,
            1 => Some((index, term)),
            _ => return Err(inconsistent("bad applied flag", 0)),
        };
        let records = &body[FIXED_BODY_BYTES..];
        let expected = batch_count
            .checked_mul(BATCH_RECORD_BYTES as u64)
            .and_then(|b| {
                position_count
                    .checked_mul(POSITION_RECORD_BYTES as u64)
                    .and_then(|p| b.checked_add(p))
            })
            .ok_or_else(|| inconsistent("record counts overflow", 5))?;
        if expected > records.len() as u64 {
            return Err(inconsistent("record counts exceed the body length", 5));
        }
        let (records, rollup_section) = records.split_at(expected as usize);
        let rollups = Rollups::decode(rollup_section)?;
        let (batch_bytes, position_bytes) =
            records.split_at(batch_count as usize * BATCH_RECORD_BYTES);

        let mut batches = BTreeMap::new();
        let mut sum_tx = 0u64;
        for (at, rec) in batch_bytes.chunks_exact(BATCH_RECORD_BYTES).enumerate() {
            let at = at as u64;
            let signed = match le_u32(&rec[52..56]) {
                0 if rec[56..].iter().all(|b| *b == 0) => None,
                0 => return Err(inconsistent("unsigned batch with header bytes", at)),
                1 => Some(
                    SignedHeader::decode(&rec[56..])
                        .map_err(|_| inconsistent("malformed signed header", at))?,
                ),
                _ => return Err(inconsistent("bad signed flag", at)),
            };
            let b = BatchRecord {
                index: le_u64(&rec[0..8]),
                term: le_u64(&rec[8..16]),
                header_digest: rec[16..48].try_into().expect("32 bytes"),
                tx_count: le_u32(&rec[48..52]),
                signed,
            };
            if let Some(s) = &b.signed {
                let h = &s.header;
                if (h.index, h.term, h.tx_count) != (b.index, b.term, b.tx_count)
                    || s.digest() != b.header_digest
                {
                    return Err(inconsistent("signed header disagrees with its batch", at));
                }
            }
            let prev: Option<&BatchRecord> = batches.values().next_back();
            if prev.is_some_and(|p| b.index <= p.index || b.term < p.term) {
                return Err(inconsistent("batches out of order", at));
            }
            sum_tx += u64::from(b.tx_count);
            batches.insert(b.index, b);
        }
        let last = batches.values().next_back().map(|b| (b.index, b.term));
        if last != applied {
            return Err(inconsistent("applied batch is not the last batch", 0));
        }
        // Format 5 kept every batch; since, only the last one.
        let all_batches = version == SNAPSHOT_VERSION_ALL_BATCHES;
        if all_batches && sum_tx != tx_total {
            return Err(inconsistent("tx_total is not the sum of batch sizes", 3));
        }
        if !all_batches && (batch_count > 1 || sum_tx > tx_total) {
            return Err(inconsistent("more than the last batch recorded", 5));
        }
        if position_count
            .checked_add(duplicates_total)
            .is_none_or(|n| n > tx_total)
        {
            return Err(inconsistent("positions plus duplicates exceed tx_total", 4));
        }
        // A generation rotates when it reaches `generation` entries: the previous one is empty
        // or exactly full, the current one never full.
        if generation == 0 || generation > u64::from(u32::MAX) {
            return Err(inconsistent("idempotency generation out of range", 7));
        }
        let current_count = position_count
            .checked_sub(previous_count)
            .ok_or_else(|| inconsistent("previous generation larger than the index", 8))?;
        // Nothing is forgotten before a second generation is dropped, so until the first
        // rotation every transaction is remembered or a duplicate.
        if previous_count == 0 && position_count + duplicates_total != tx_total {
            return Err(inconsistent(
                "positions plus duplicates differ from tx_total",
                4,
            ));
        }
        if (previous_count != 0 && previous_count != generation) || current_count >= generation {
            return Err(inconsistent("idempotency generations not of their size", 8));
        }

        let mut previous = TxIndex::with_capacity(previous_count as usize);
        let mut current = TxIndex::with_capacity(current_count as usize);
        let mut prev_hash: Option<TxHash> = None;
        for (at, rec) in position_bytes
            .chunks_exact(POSITION_RECORD_BYTES)
            .enumerate()
        {
            let at = at as u64;
            if at == previous_count {
                prev_hash = None;
            }
            let hash = TxHash(rec[0..32].try_into().expect("32 bytes"));
            let pos = Position {
                index: le_u64(&rec[32..40]),
                offset: le_u32(&rec[40..44]),
            };
            if prev_hash.is_some_and(|p| p >= hash) {
                return Err(inconsistent(
                    "positions not in strictly ascending hash order",
                    at,
                ));
            }
            prev_hash = Some(hash);
            // With every batch recorded (format 5), a position must fall inside one; with only
            // the last, inside it or in an earlier batch of at most BATCH_TXS_MAX.
            let inside = match batches.get(&pos.index) {
                Some(b) => pos.offset < b.tx_count,
                None => {
                    !all_batches
                        && last.is_some_and(|(i, _)| pos.index < i)
                        && (pos.offset as usize) < crate::limits::BATCH_TXS_MAX
                }
            };
            if !inside {
                return Err(inconsistent("position outside every batch", at));
            }
            if at < previous_count {
                previous
                    .insert_new(hash, pos)
                    .expect("hashes checked strictly ascending");
            } else if previous.contains_key(&hash) {
                return Err(inconsistent("hash in both generations", at));
            } else {
                current
                    .insert_new(hash, pos)
                    .expect("hashes checked strictly ascending");
            }
        }
        let positions = Window::from_generations(previous, current, generation as usize);
        Ok(Sequencer {
            applied,
            last_batch: batches.into_values().next_back(),
            positions,
            tx_total,
            duplicates_total,
            rollups,
        })
    }
}

/// A generation of the idempotency index as its snapshot records (`tx_hash | index | offset`),
/// in no particular order, its parts let go as they are read ([`TxIndex::into_entries`]).
fn records(generation: TxIndex<Position>) -> Vec<[u8; POSITION_RECORD_BYTES]> {
    let mut records = Vec::with_capacity(generation.len());
    for (hash, pos) in generation.into_entries() {
        let mut record = [0u8; POSITION_RECORD_BYTES];
        record[0..32].copy_from_slice(hash.as_bytes());
        record[32..40].copy_from_slice(&pos.index.to_le_bytes());
        record[40..44].copy_from_slice(&pos.offset.to_le_bytes());
        records.push(record);
    }
    records
}

/// Sorts records by hash (distinct within a generation). The first 8 bytes, read big-endian,
/// order almost every pair (a full comparison only on equal prefixes).
fn sort_records(records: &mut [[u8; POSITION_RECORD_BYTES]]) {
    let prefix =
        |r: &[u8; POSITION_RECORD_BYTES]| u64::from_be_bytes(r[..8].try_into().expect("8 bytes"));
    records.sort_unstable_by(|a, b| {
        prefix(a)
            .cmp(&prefix(b))
            .then_with(|| a[..32].cmp(&b[..32]))
    });
}

/// A snapshot taken out of a [`Sequencer`] ([`Sequencer::into_snapshot_writer`]), no longer
/// sharing anything with it, to be written.
#[derive(Debug)]
pub struct SnapshotWriter {
    applied: Option<(u64, u64)>,
    last_batch: Option<BatchRecord>,
    tx_total: u64,
    duplicates_total: u64,
    generation: usize,
    previous: Vec<[u8; POSITION_RECORD_BYTES]>,
    current: Vec<[u8; POSITION_RECORD_BYTES]>,
    rollup_section: Vec<u8>,
}

impl SnapshotWriter {
    /// Writes the snapshot (format in the module docs) to `out`, from the sink's current length
    /// on (it can be part of a larger blob). The bytes go out in order as they are encoded, so
    /// a sink that writes to a file holds no copy of the whole snapshot; only the header's
    /// checksum is written over at the end ([`SnapshotSink::patch`]).
    pub fn write<S: SnapshotSink>(self, out: &mut S) -> std::io::Result<()> {
        let SnapshotWriter {
            applied,
            last_batch,
            tx_total,
            duplicates_total,
            generation,
            mut previous,
            mut current,
            rollup_section,
        } = self;
        let start = out.len();
        let position_count = previous.len() + current.len();
        let body_len = FIXED_BODY_BYTES
            + usize::from(last_batch.is_some()) * BATCH_RECORD_BYTES
            + position_count * POSITION_RECORD_BYTES
            + rollup_section.len();
        let mut header = [0u8; HEADER_BYTES];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        header[16..24].copy_from_slice(&(body_len as u64).to_le_bytes());
        // crc32 at 24..28 is written over once the body is out; 12..16 and 28..32 stay 0.
        out.put(&header)?;
        let mut body = Staged::new(out);
        let (index, term) = applied.unwrap_or((0, 0));
        for field in [
            u64::from(applied.is_some()),
            index,
            term,
            tx_total,
            duplicates_total,
            u64::from(last_batch.is_some()),
            position_count as u64,
            generation as u64,
            previous.len() as u64,
        ] {
            body.put(&field.to_le_bytes())?;
        }
        if let Some(b) = &last_batch {
            body.put(&b.index.to_le_bytes())?;
            body.put(&b.term.to_le_bytes())?;
            body.put(&b.header_digest)?;
            body.put(&b.tx_count.to_le_bytes())?;
            body.put(&u32::from(b.signed.is_some()).to_le_bytes())?;
            match &b.signed {
                Some(s) => body.put(&s.encode())?,
                None => body.put(&[0u8; SIGNED_HEADER_BYTES])?,
            }
        }
        sort_records(&mut previous);
        body.put(previous.as_flattened())?;
        drop(previous);
        sort_records(&mut current);
        body.put(current.as_flattened())?;
        drop(current);
        body.put(&rollup_section)?;
        let crc = body.finish()?;
        debug_assert_eq!(out.len() - start, (HEADER_BYTES + body_len) as u64);
        out.patch(start + 24, &crc.to_le_bytes())
    }
}

/// Where [`Sequencer::write_snapshot`] puts a snapshot: bytes appended in order, and a few
/// written over near the start once known. A `Vec<u8>` is one; a node's state machine streams
/// snapshots to their file through another, so no copy of a snapshot of millions of
/// transactions is ever held in memory.
pub trait SnapshotSink {
    /// Appends `bytes`.
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()>;

    /// Bytes appended so far.
    fn len(&self) -> u64;

    /// Whether nothing was appended yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes `bytes` over bytes appended earlier, from offset `at`. Writers patch only the
    /// first [`SNAPSHOT_PATCH_WITHIN`] bytes of what they put in a sink.
    fn patch(&mut self, at: u64, bytes: &[u8]) -> std::io::Result<()>;
}

/// How far from the start of a sink [`SnapshotSink::patch`] may be asked to write (a state
/// machine's blob header and the sequencer's header after it).
pub const SNAPSHOT_PATCH_WITHIN: u64 = 64 * 1024;

impl SnapshotSink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }

    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }

    fn patch(&mut self, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        let at = usize::try_from(at).map_err(std::io::Error::other)?;
        let Some(target) = self.get_mut(at..at + bytes.len()) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "patch past the end of the snapshot",
            ));
        };
        target.copy_from_slice(bytes);
        Ok(())
    }
}

/// Bytes on their way to a sink, gathered into pieces of `STAGED_BYTES` and checksummed a
/// piece at a time (crc32 of 44-byte records one by one runs at a fraction of its speed on
/// whole pieces).
struct Staged<'a, S> {
    sink: &'a mut S,
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
}

const STAGED_BYTES: usize = 64 * 1024;

impl<'a, S: SnapshotSink> Staged<'a, S> {
    fn new(sink: &'a mut S) -> Self {
        Self {
            sink,
            buf: Vec::with_capacity(STAGED_BYTES),
            crc: crc32fast::Hasher::new(),
        }
    }

    #[inline]
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.buf.len() + bytes.len() > STAGED_BYTES {
            self.flush()?;
            if bytes.len() > STAGED_BYTES {
                self.crc.update(bytes);
                return self.sink.put(bytes);
            }
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.crc.update(&self.buf);
        self.sink.put(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Puts what is left; returns the crc32 of everything put through it.
    fn finish(mut self) -> std::io::Result<u32> {
        self.flush()?;
        Ok(self.crc.finalize())
    }
}

/// Checks magic, version, length and checksum; returns the version and the body.
fn check_header(bytes: &[u8]) -> Result<(u32, &[u8]), SnapshotError> {
    if bytes.len() < HEADER_BYTES {
        return Err(SnapshotError::TooShort {
            len: bytes.len(),
            need: HEADER_BYTES,
        });
    }
    let (header, body) = bytes.split_at(HEADER_BYTES);
    let magic: [u8; 8] = header[0..8].try_into().expect("8 bytes");
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic { found: magic });
    }
    let version = le_u32(&header[8..12]);
    let known = version == SNAPSHOT_VERSION || version == SNAPSHOT_VERSION_ALL_BATCHES;
    if !known || le_u32(&header[12..16]) != 0 {
        return Err(SnapshotError::UnsupportedVersion {
            found: version,
            supported: SNAPSHOT_VERSION,
        });
    }
    let body_len = le_u64(&header[16..24]);
    if body_len != body.len() as u64 || body.len() < FIXED_BODY_BYTES {
        return Err(SnapshotError::LengthMismatch {
            header: body_len,
            actual: body.len(),
        });
    }
    let stored = le_u32(&header[24..28]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(SnapshotError::ChecksumMismatch { stored, computed });
    }
    if le_u32(&header[28..32]) != 0 {
        return Err(SnapshotError::UnsupportedVersion {
            found: version,
            supported: SNAPSHOT_VERSION,
        });
    }
    Ok((version, body))
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("caller passes 8 bytes"))
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("caller passes 4 bytes"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rkyv::util::AlignedVec;

    use super::*;
    use crate::batch::{encode_batch, Batch, BatchHeader};
    use crate::tx::Transaction;
    use crate::tx_kind::TxKind;

    fn tx(payload: &[u8]) -> Transaction {
        Transaction {
            rollup_id: 1,
            kind: TxKind::Raw,
            bytes: payload.to_vec(),
        }
    }

    fn encoded(index: u64, txs: Vec<Transaction>) -> AlignedVec {
        encode_batch(&Batch::new(txs, 1, index, 7)).unwrap()
    }

    #[test]
    fn known_hashes_are_used_only_when_they_match_the_batch() {
        let bytes = encoded(1, vec![tx(b"a"), tx(b"b")]);
        let hashes = vec![TxHash::of(b"a"), TxHash::of(b"b")];
        let tree = crate::merkle::MerkleTree::new(&hashes);
        let known = KnownHashes {
            tx_hashes: vec![TxHash::of(b"x"), TxHash::of(b"y")],
            leaves: tree.leaves().to_vec(),
            root: tree.root(),
        };
        // Wrong count or wrong root: ignored, the hashes come from the bytes.
        for bad in [
            KnownHashes {
                tx_hashes: vec![TxHash::of(b"x")],
                ..known.clone()
            },
            KnownHashes {
                root: [9; 32],
                ..known.clone()
            },
        ] {
            let mut s = Sequencer::new();
            s.apply_known_batch(1, 1, &bytes, None, Some(bad)).unwrap();
            assert!(s.lookup(&TxHash::of(b"a")).is_some());
            assert!(s.lookup(&TxHash::of(b"x")).is_none());
        }
        // Matching count and root: taken as given (the caller vouches for the bytes).
        let mut s = Sequencer::new();
        let applied = s
            .apply_known_batch(1, 1, &bytes, None, Some(known))
            .unwrap();
        assert_eq!(applied.tx_count, 2);
        assert!(s.lookup(&TxHash::of(b"x")).is_some());
        assert!(s.lookup(&TxHash::of(b"a")).is_none());
    }

    #[test]
    fn positions_and_duplicates() {
        let mut s = Sequencer::new();
        let a = s
            .apply_batch(3, 1, &encoded(3, vec![tx(b"a"), tx(b"b"), tx(b"a")]))
            .unwrap();
        assert_eq!(a.tx_count, 3);
        assert_eq!(
            a.duplicates,
            vec![Duplicate {
                offset: 2,
                original: Position {
                    index: 3,
                    offset: 0
                }
            }]
        );
        assert_eq!(a.sequenced(), 2);
        let b = s
            .apply_batch(5, 2, &encoded(5, vec![tx(b"c"), tx(b"b")]))
            .unwrap();
        assert_eq!(
            b.duplicates,
            vec![Duplicate {
                offset: 1,
                original: Position {
                    index: 3,
                    offset: 1
                }
            }]
        );
        assert_eq!(
            s.lookup(&TxHash::of(b"c")),
            Some(Position {
                index: 5,
                offset: 0
            })
        );
        assert_eq!(s.lookup(&TxHash::of(b"zz")), None);
        assert_eq!(s.applied_index(), Some(5));
        assert_eq!((s.tx_total(), s.duplicates_total()), (5, 2));
        assert_eq!(s.last_batch().map(|b| (b.index, b.term)), Some((5, 2)));
        assert_eq!(s.last_batch().map(|b| b.tx_count), Some(2));
    }

    #[test]
    fn rejections_leave_state_unchanged() {
        let mut s = Sequencer::new();
        s.apply_batch(2, 3, &encoded(2, vec![tx(b"a")])).unwrap();
        let before = s.snapshot_bytes();

        let err = s
            .apply_batch(2, 3, &encoded(2, vec![tx(b"x")]))
            .unwrap_err();
        assert!(matches!(
            err,
            SequencerError::IndexNotAfterApplied {
                index: 2,
                applied: 2
            }
        ));
        assert!(!err.is_content_rejection());
        let err = s
            .apply_batch(3, 2, &encoded(3, vec![tx(b"x")]))
            .unwrap_err();
        assert!(matches!(err, SequencerError::TermRegressed { term: 2, .. }));

        let mut garbage = AlignedVec::<16>::new();
        garbage.extend_from_slice(&[0xee; 64]);
        let err = s.apply_batch(4, 3, &garbage).unwrap_err();
        assert!(matches!(err, SequencerError::InvalidBatch { index: 4, .. }));
        assert!(err.is_content_rejection());

        let mut bad_root = Batch {
            header: BatchHeader {
                term: 3,
                index: 5,
                prev_batch_hash: [0; 32],
                tx_merkle_root: [9; 32],
                tx_count: 1,
                timestamp_us: 0,
            },
            txs: vec![tx(b"y")],
        };
        let err = s
            .apply_batch(5, 3, &encode_batch(&bad_root).unwrap())
            .unwrap_err();
        assert!(matches!(
            err,
            SequencerError::MerkleRootMismatch { index: 5, header, .. } if header == [9; 32]
        ));
        bad_root.header.tx_merkle_root = bad_root.compute_tx_merkle_root();
        assert_eq!(s.snapshot_bytes(), before, "failed applies change nothing");
        s.apply_batch(5, 3, &encode_batch(&bad_root).unwrap())
            .unwrap();
    }

    #[test]
    fn empty_snapshot_round_trips() {
        let s = Sequencer::new();
        let bytes = s.snapshot_bytes();
        assert_eq!(
            bytes.len(),
            HEADER_BYTES + FIXED_BODY_BYTES + 24,
            "plus the empty rollup section"
        );
        assert_eq!(Sequencer::from_snapshot(&bytes).unwrap(), s);
    }

    #[test]
    fn snapshot_refuses_bad_framing() {
        let mut s = Sequencer::new();
        s.apply_batch(1, 1, &encoded(1, vec![tx(b"a"), tx(b"b")]))
            .unwrap();
        let good = s.snapshot_bytes();
        assert!(matches!(
            Sequencer::from_snapshot(&good[..10]),
            Err(SnapshotError::TooShort { len: 10, .. })
        ));
        let mut bad = good.clone();
        bad[0] ^= 1;
        assert!(matches!(
            Sequencer::from_snapshot(&bad),
            Err(SnapshotError::BadMagic { .. })
        ));
        let mut bad = good.clone();
        bad[8] = 1;
        assert!(matches!(
            Sequencer::from_snapshot(&bad),
            Err(SnapshotError::UnsupportedVersion { found: 1, .. })
        ));
        let mut bad = good.clone();
        bad.push(0);
        assert!(matches!(
            Sequencer::from_snapshot(&bad),
            Err(SnapshotError::LengthMismatch { .. })
        ));
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(
            Sequencer::from_snapshot(&bad),
            Err(SnapshotError::ChecksumMismatch { .. })
        ));
    }

    /// Rewrites the body of `bytes` with `edit` and fixes the checksum, so only the consistency
    /// checks can object.
    fn with_body_edit(bytes: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut body = bytes[HEADER_BYTES..].to_vec();
        edit(&mut body);
        let mut out = bytes[..HEADER_BYTES].to_vec();
        out[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
        out[24..28].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn the_idempotency_window_forgets_old_hashes_deterministically_and_survives_snapshots() {
        let batches: Vec<Vec<Transaction>> = (0..10u8)
            .map(|b| (0..3u8).map(|i| tx(&[b, i])).collect())
            .collect();
        let mut s = Sequencer::with_idempotency_generation(4);
        let mut index = 0;
        let mut snapshots = Vec::new();
        for txs in &batches {
            index += 1;
            s.apply_batch(index, 1, &encoded(index, txs.clone()))
                .unwrap();
            let bytes = s.snapshot_bytes();
            let restored = Sequencer::from_snapshot(&bytes).expect("restores");
            assert_eq!(restored, s, "after batch {index}");
            snapshots.push(bytes);
        }
        // 30 transactions with generations of 4: at most 8 remembered, at least the last 4.
        assert!((4..=8).contains(&s.positions.len()));
        for i in 0..3u8 {
            assert!(s.lookup(&TxHash::of(&[9, i])).is_some());
        }
        assert_eq!(s.lookup(&TxHash::of(&[0, 0])), None, "forgotten");
        // A recent hash is a duplicate; a forgotten one is ordered again.
        index += 1;
        let again = s
            .apply_batch(index, 1, &encoded(index, vec![tx(&[9, 2]), tx(&[0, 0])]))
            .unwrap();
        assert_eq!(again.duplicates.len(), 1);
        assert_eq!(again.duplicates[0].offset, 0);
        assert_eq!(
            s.lookup(&TxHash::of(&[0, 0])),
            Some(Position { index, offset: 1 })
        );
        assert_eq!((s.tx_total(), s.duplicates_total()), (32, 1));
        // Continuing from any snapshot ends in the same state.
        for (at, bytes) in snapshots.iter().enumerate() {
            let mut r = Sequencer::from_snapshot(bytes).unwrap();
            for (i, txs) in batches.iter().enumerate().skip(at + 1) {
                let i = i as u64 + 1;
                r.apply_batch(i, 1, &encoded(i, txs.clone())).unwrap();
            }
            r.apply_batch(index, 1, &encoded(index, vec![tx(&[9, 2]), tx(&[0, 0])]))
                .unwrap();
            assert_eq!(r.snapshot_bytes(), s.snapshot_bytes(), "from snapshot {at}");
        }
    }

    #[test]
    fn only_the_last_batch_is_recorded_and_format_5_snapshots_load() {
        let batches: Vec<Vec<Transaction>> = (0..10u8)
            .map(|b| (0..3u8).map(|i| tx(&[b, i])).collect())
            .collect();
        let mut s = Sequencer::with_idempotency_generation(4);
        // Format 5 wrote a record of every batch: the same state with those records prepended.
        let mut records = Vec::new();
        for (i, txs) in batches.iter().enumerate() {
            let index = i as u64 + 1;
            s.apply_batch(index, 1, &encoded(index, txs.clone()))
                .unwrap();
            let bytes = s.snapshot_bytes();
            let start = HEADER_BYTES + FIXED_BODY_BYTES;
            assert_eq!(
                le_u64(&bytes[HEADER_BYTES + 40..][..8]),
                1,
                "one batch record"
            );
            records.extend_from_slice(&bytes[start..start + BATCH_RECORD_BYTES]);
            assert_eq!(
                s.last_batch().map(|b| (b.index, b.tx_count)),
                Some((index, 3))
            );
        }
        let v6 = s.snapshot_bytes();
        let with_records = |version: u32, records: &[u8], count: u64| {
            let mut out = with_body_edit(&v6, |body| {
                body[40..48].copy_from_slice(&count.to_le_bytes());
                body.splice(
                    FIXED_BODY_BYTES..FIXED_BODY_BYTES + BATCH_RECORD_BYTES,
                    records.iter().copied(),
                );
            });
            out[8..12].copy_from_slice(&version.to_le_bytes());
            out
        };
        let restored = Sequencer::from_snapshot(&with_records(5, &records, 10)).expect("format 5");
        assert_eq!(restored, s);
        assert_eq!(restored.snapshot_bytes(), v6);
        // Format 5 still had to account for every transaction.
        let short = &records[BATCH_RECORD_BYTES..];
        assert!(matches!(
            Sequencer::from_snapshot(&with_records(5, short, 9)),
            Err(SnapshotError::Inconsistent { .. })
        ));
        // Format 6 holds the last batch only.
        assert!(matches!(
            Sequencer::from_snapshot(&with_records(SNAPSHOT_VERSION, &records, 10)),
            Err(SnapshotError::Inconsistent { .. })
        ));
        // A position past the last batch is refused.
        let remembered = s.positions.current().len() + s.positions.previous().len();
        assert!(remembered > 0);
        let bad = with_body_edit(&v6, |body| {
            let at = FIXED_BODY_BYTES + BATCH_RECORD_BYTES + 32;
            body[at..at + 8].copy_from_slice(&11u64.to_le_bytes());
        });
        assert!(matches!(
            Sequencer::from_snapshot(&bad),
            Err(SnapshotError::Inconsistent { .. })
        ));
    }

    #[test]
    fn snapshot_refuses_a_hash_in_both_idempotency_generations() {
        let mut s = Sequencer::with_idempotency_generation(2);
        s.apply_batch(1, 1, &encoded(1, vec![tx(b"a"), tx(b"b"), tx(b"c")]))
            .unwrap();
        assert_eq!(
            (s.positions.previous().len(), s.positions.current().len()),
            (2, 1)
        );
        let good = s.snapshot_bytes();
        assert!(Sequencer::from_snapshot(&good).is_ok());
        let positions_at = FIXED_BODY_BYTES + BATCH_RECORD_BYTES;
        let bad = with_body_edit(&good, |b| {
            // The current generation's only record gets the previous generation's first hash.
            let first: Vec<u8> = b[positions_at..positions_at + 32].to_vec();
            let current_at = positions_at + 2 * POSITION_RECORD_BYTES;
            b[current_at..current_at + 32].copy_from_slice(&first);
        });
        assert!(
            matches!(
                Sequencer::from_snapshot(&bad),
                Err(SnapshotError::Inconsistent {
                    reason: "hash in both generations",
                    ..
                })
            ),
            "{:?}",
            Sequencer::from_snapshot(&bad)
        );
    }

    #[test]
    fn snapshot_refuses_inconsistent_state() {
        let mut s = Sequencer::new();
        s.apply_batch(1, 1, &encoded(1, vec![tx(b"a"), tx(b"b"), tx(b"a")]))
            .unwrap();
        let good = s.snapshot_bytes();
        let positions_at = FIXED_BODY_BYTES + BATCH_RECORD_BYTES;
        type BodyEdit = Box<dyn FnOnce(&mut Vec<u8>)>;
        let cases: Vec<(&str, BodyEdit)> = vec![
            ("applied flag", Box::new(|b| b[0] = 2)),
            ("applied index", Box::new(|b| b[8] = 9)),
            ("tx_total", Box::new(|b| b[24] = 4)),
            ("duplicates", Box::new(|b| b[32] = 0)),
            ("batch count", Box::new(|b| b[40] = 7)),
            (
                "offset past batch",
                Box::new(move |b| b[positions_at + 40] = 3),
            ),
            (
                "hash order",
                Box::new(move |b| {
                    let (first, second) = b[positions_at..].split_at_mut(POSITION_RECORD_BYTES);
                    first.swap_with_slice(&mut second[..POSITION_RECORD_BYTES]);
                }),
            ),
            ("reserved", Box::new(|b| b[FIXED_BODY_BYTES + 52] = 1)),
            ("generation zero", Box::new(|b| b[56..64].fill(0))),
            (
                "current generation full",
                Box::new(|b| b[56..64].copy_from_slice(&2u64.to_le_bytes())),
            ),
            ("previous generation not full", Box::new(|b| b[64] = 1)),
        ];
        for (name, edit) in cases {
            let bad = with_body_edit(&good, edit);
            assert!(
                matches!(
                    Sequencer::from_snapshot(&bad),
                    Err(SnapshotError::Inconsistent { .. })
                ),
                "{name}: {:?}",
                Sequencer::from_snapshot(&bad)
            );
        }
    }

    /// Batches over a small alphabet of payloads, so duplicates are common.
    fn arb_batches() -> impl Strategy<Value = Vec<(u64, Vec<Vec<u8>>)>> {
        prop::collection::vec(
            (
                1u64..4,
                prop::collection::vec(prop::collection::vec(0u8..6, 1..3), 0..12),
            ),
            0..20,
        )
        .prop_map(|steps| {
            let mut index = 0;
            steps
                .into_iter()
                .map(|(gap, payloads)| {
                    index += gap;
                    (index, payloads)
                })
                .collect()
        })
    }

    fn feed(s: &mut Sequencer, batches: &[(u64, Vec<Vec<u8>>)]) -> Vec<Applied> {
        batches
            .iter()
            .map(|(index, payloads)| {
                let txs = payloads.iter().map(|p| tx(p)).collect();
                s.apply_batch(*index, *index / 5 + 1, &encoded(*index, txs))
                    .unwrap()
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn same_batches_same_bytes(batches in arb_batches()) {
            let (mut a, mut b) = (Sequencer::new(), Sequencer::new());
            let ra = feed(&mut a, &batches);
            let rb = feed(&mut b, &batches);
            prop_assert_eq!(ra, rb);
            prop_assert_eq!(a.snapshot_bytes(), b.snapshot_bytes());
            // No secrets here, so the reservation hint is exact.
            prop_assert_eq!(a.snapshot_len_hint(), a.snapshot_bytes().len());
            let restored = Sequencer::from_snapshot(&a.snapshot_bytes()).unwrap();
            prop_assert_eq!(&restored, &a);
        }

        #[test]
        fn snapshot_then_continue_equals_never_snapshotted(
            batches in arb_batches(),
            cut in any::<prop::sample::Index>(),
            generation in prop_oneof![Just(IDEMPOTENCY_GENERATION_TXS), 1usize..8],
        ) {
            let at = if batches.is_empty() { 0 } else { cut.index(batches.len() + 1) };
            let (head, tail) = batches.split_at(at);
            // Small generations rotate (and forget) while the batches are applied.
            let mut straight = Sequencer::with_idempotency_generation(generation);
            let all = feed(&mut straight, &batches);
            let mut first = Sequencer::with_idempotency_generation(generation);
            let mut results = feed(&mut first, head);
            let mut restored = Sequencer::from_snapshot(&first.snapshot_bytes()).unwrap();
            results.extend(feed(&mut restored, tail));
            prop_assert_eq!(results, all);
            prop_assert_eq!(restored.snapshot_bytes(), straight.snapshot_bytes());
        }

        #[test]
        fn snapshot_decoding_never_panics(
            batches in arb_batches(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..), 0..4),
            fix_digest in any::<bool>(),
        ) {
            let mut s = Sequencer::new();
            feed(&mut s, &batches);
            let bytes = s.snapshot_bytes();
            let mut body = bytes[HEADER_BYTES..].to_vec();
            for (at, mask) in flips {
                let i = at.index(body.len());
                body[i] ^= mask;
            }
            let bad = if fix_digest {
                with_body_edit(&bytes, |b| *b = body)
            } else {
                let mut out = bytes[..HEADER_BYTES].to_vec();
                out.extend_from_slice(&body);
                out
            };
            if let Ok(restored) = Sequencer::from_snapshot(&bad) {
                // Whatever it accepts, it must re-encode to the same bytes.
                prop_assert_eq!(restored.snapshot_bytes(), bad);
            }
        }
    }
}
