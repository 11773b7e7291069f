//! The shard's batch builder: validates, hashes, deduplicates and packs incoming transactions
//! into sealed rkyv batch buffers on a size-or-linger policy.
//!
//! Pure and deterministic, like quinn-proto: no runtime, no I/O, no clock. The shard feeds it
//! transactions with the current time (`push`), asks for sealed batches (`poll_seal`, waking
//! at `next_deadline_us`), and forces a seal on shutdown or flush (`seal_now`).
//!
//! Each payload is copied exactly once, from the caller's buffer straight into the buffer that
//! becomes the sealed batch; at seal the rkyv transaction array and root are appended around it
//! (see `encode`), so sealing costs the Merkle root plus one pass over the per-tx metadata.

mod dedup;
mod encode;
mod error;
mod policy;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use rkyv::util::AlignedVec;

use crate::batch::BatchHeader;
use crate::hash::TxHash;
use crate::limits::TX_BYTES_MAX;
use crate::merkle::MerkleTree;
use crate::tx_kind::TxKind;

pub use dedup::DEDUP_CAPACITY_MAX;
pub use error::{BatcherConfigError, SubmitRejection};
pub use policy::{BatchPolicy, BATCH_BYTES_MAX_DEFAULT, LINGER_US_DEFAULT, LINGER_US_MAX};

use dedup::DedupWindow;
use encode::{encoded_len, finish_batch, PlacedTx};

/// Most sealed batches held for the caller; `push` refuses with `SealedQueueFull` beyond it.
pub const SEALED_QUEUE_MAX: usize = 16;

/// A transaction as it arrives, borrowing its payload from the network buffer.
#[derive(Debug, Clone)]
pub struct IncomingTx<'a> {
    /// Destination rollup.
    pub rollup_id: u64,
    /// Raw or encrypted.
    pub kind: TxKind,
    /// Payload; copied once into the batch being built.
    pub bytes: &'a [u8],
}

/// Where an accepted transaction sits: the shard-local batch sequence number and its offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TxSlot {
    /// `SealedBatch::seq` of the batch holding the transaction.
    pub batch_seq: u64,
    /// Position of the transaction within that batch.
    pub offset_in_batch: u32,
}

/// What `Batcher::push` did with a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Placed in the batch being built.
    Accepted {
        /// Where it was placed.
        slot: TxSlot,
        /// `keccak256` of the payload.
        tx_hash: TxHash,
    },
    /// The same hash was accepted earlier and is still in the dedup window; nothing was added.
    Duplicate {
        /// `keccak256` of the payload.
        tx_hash: TxHash,
        /// Where the first copy was placed.
        first_seen: TxSlot,
    },
}

/// A finished batch, ready for the leader to `patch_header` and append.
#[derive(Debug)]
pub struct SealedBatch {
    /// Shard-local sequence number, starting at 0 and increasing by one per batch.
    pub seq: u64,
    /// The encoded rkyv `Batch` (16-aligned, at most `batch_bytes_max`); header `term`, `index`,
    /// `prev_batch_hash` and `timestamp_us` are zero, `tx_merkle_root` and `tx_count` are set.
    pub bytes: AlignedVec,
    /// Number of transactions.
    pub tx_count: u32,
    /// Transaction hashes in batch order.
    pub tx_hashes: Vec<TxHash>,
    /// `merkle_root(&tx_hashes)`, as in the header.
    pub merkle_root: [u8; 32],
    /// The Merkle tree over `tx_hashes`, for receipts' inclusion paths.
    pub tree: MerkleTree,
    /// When its first transaction was pushed (the `now_us` of that push).
    pub opened_us: u64,
}

/// The batch under construction.
#[derive(Debug, Default)]
struct Building {
    /// Payloads back to back from offset 0: the head of the future archive. Reserved to
    /// `batch_bytes_max` on the first push so it never reallocates (and never copies again).
    bytes: AlignedVec,
    /// Per-transaction metadata; reused across batches.
    txs: Vec<PlacedTx>,
    tx_hashes: Vec<TxHash>,
    /// When the oldest transaction was pushed, in microseconds.
    first_push_us: u64,
}

/// Builds one shard's batches; see the module docs.
#[derive(Debug)]
pub struct Batcher {
    policy: BatchPolicy,
    dedup: DedupWindow,
    building: Building,
    /// Sealed batches not yet taken, oldest first.
    sealed: VecDeque<SealedBatch>,
    /// `seq` of the batch being built.
    next_seq: u64,
}

impl Batcher {
    /// A batcher with `policy` and a dedup window of the last `dedup_capacity` accepted hashes
    /// (0 disables it; at most `DEDUP_CAPACITY_MAX`), allocated up front.
    pub fn new(policy: BatchPolicy, dedup_capacity: usize) -> Result<Self, BatcherConfigError> {
        policy.validate()?;
        if dedup_capacity > DEDUP_CAPACITY_MAX {
            return Err(BatcherConfigError::DedupCapacityTooLarge {
                value: dedup_capacity,
                max: DEDUP_CAPACITY_MAX,
            });
        }
        Ok(Self {
            policy,
            dedup: DedupWindow::new(dedup_capacity),
            building: Building::default(),
            sealed: VecDeque::with_capacity(SEALED_QUEUE_MAX),
            next_seq: 0,
        })
    }

    /// The policy this batcher seals by.
    pub fn policy(&self) -> &BatchPolicy {
        &self.policy
    }

    /// Validates, hashes and deduplicates `tx`, then copies it into the batch being built,
    /// sealing that batch first if `tx` would push it past a limit, and right after if it is
    /// now full by count. `now_us` is the current time in microseconds (any monotonic origin).
    pub fn push(
        &mut self,
        tx: IncomingTx<'_>,
        now_us: u64,
    ) -> Result<PushOutcome, SubmitRejection> {
        self.check_len(tx.bytes.len())?;
        let tx_hash = TxHash::of(tx.bytes);
        self.push_hashed(tx, tx_hash, now_us)
    }

    /// [`Batcher::push`] for a transaction whose hash the caller computed (many at once, with
    /// `keccak_many`); `tx_hash` must be `TxHash::of(tx.bytes)` unless the length check
    /// refuses the transaction, in which case it is not used.
    pub fn push_hashed(
        &mut self,
        tx: IncomingTx<'_>,
        tx_hash: TxHash,
        now_us: u64,
    ) -> Result<PushOutcome, SubmitRejection> {
        let len = tx.bytes.len();
        self.check_len(len)?;
        debug_assert_eq!(
            tx_hash,
            TxHash::of(tx.bytes),
            "push_hashed with a wrong hash"
        );
        if let Some(first_seen) = self.dedup.get(&tx_hash) {
            return Ok(PushOutcome::Duplicate {
                tx_hash,
                first_seen,
            });
        }
        // Each push seals at most one batch; refusing here keeps the queue bounded.
        if self.sealed.len() >= SEALED_QUEUE_MAX {
            return Err(SubmitRejection::SealedQueueFull {
                max: SEALED_QUEUE_MAX,
            });
        }
        if !self.fits(len) {
            self.seal_building();
        }
        let slot = self.append(tx, tx_hash, now_us);
        self.dedup.insert(tx_hash, slot);
        if self.building.txs.len() == self.policy.batch_txs_max {
            self.seal_building();
        }
        Ok(PushOutcome::Accepted { slot, tx_hash })
    }

    /// The oldest sealed batch, sealing the batch being built first if its oldest transaction
    /// has waited at least `linger_us` by `now_us`. Call until `None`.
    pub fn poll_seal(&mut self, now_us: u64) -> Option<SealedBatch> {
        let lingered = self
            .next_deadline_us()
            .is_some_and(|deadline_us| deadline_us <= now_us);
        if self.sealed.is_empty() && lingered {
            self.seal_building();
        }
        self.sealed.pop_front()
    }

    /// The oldest sealed batch, sealing the batch being built (if it holds any transaction)
    /// regardless of linger. Call until `None` to flush everything.
    pub fn seal_now(&mut self) -> Option<SealedBatch> {
        if !self.building.txs.is_empty() {
            self.seal_building();
        }
        self.sealed.pop_front()
    }

    /// When the batch being built lingers out (`poll_seal` seals it from then on), in
    /// microseconds; `None` while it is empty. Sealed batches already waiting are returned by
    /// any `poll_seal` call regardless of time.
    pub fn next_deadline_us(&self) -> Option<u64> {
        if self.building.txs.is_empty() {
            return None;
        }
        Some(
            self.building
                .first_push_us
                .saturating_add(self.policy.linger_us),
        )
    }

    /// Number of transactions in the batch being built.
    pub fn building_tx_count(&self) -> usize {
        self.building.txs.len()
    }

    /// Number of sealed batches waiting to be taken.
    pub fn sealed_pending(&self) -> usize {
        self.sealed.len()
    }

    /// Asks the CPU to start loading the dedup window's entries that pushing `tx_hash` will
    /// touch, for a push `ahead` pushes from now. Only a hint: it changes no result.
    #[inline]
    pub fn prefetch(&self, tx_hash: &TxHash, ahead: usize) {
        self.dedup.prefetch(tx_hash, ahead);
    }

    /// Number of hashes in the dedup window (at most its capacity).
    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }

    /// Forgets a transaction accepted into the batch at `slot` whose proposal failed (e.g. the
    /// node lost leadership), so a retry of it is accepted again instead of being answered as a
    /// duplicate. Does nothing if the hash was since accepted elsewhere or evicted.
    pub fn forget(&mut self, tx_hash: &TxHash, slot: TxSlot) {
        self.dedup.forget(tx_hash, slot);
    }

    /// Rejects payloads that no batch under this policy can hold.
    fn check_len(&self, len: usize) -> Result<(), SubmitRejection> {
        if len == 0 {
            return Err(SubmitRejection::EmptyTx);
        }
        if len > TX_BYTES_MAX {
            return Err(SubmitRejection::TxTooLarge {
                len,
                max: TX_BYTES_MAX,
            });
        }
        let alone = encoded_len(len, 1);
        if alone > self.policy.batch_bytes_max {
            return Err(SubmitRejection::TxExceedsBatch {
                encoded_len: alone,
                max: self.policy.batch_bytes_max,
            });
        }
        Ok(())
    }

    /// Whether a `len`-byte payload fits the batch being built without breaking a limit.
    fn fits(&self, len: usize) -> bool {
        let count = self.building.txs.len() + 1;
        let bytes = encoded_len(self.building.bytes.len() + len, count);
        count <= self.policy.batch_txs_max && bytes <= self.policy.batch_bytes_max
    }

    /// Copies `tx` into the batch being built; the caller checked that it fits.
    fn append(&mut self, tx: IncomingTx<'_>, tx_hash: TxHash, now_us: u64) -> TxSlot {
        let building = &mut self.building;
        if building.txs.is_empty() {
            building.first_push_us = now_us;
            if building.bytes.capacity() == 0 {
                building.bytes.reserve(self.policy.batch_bytes_max);
            }
        }
        let offset_in_batch = building.txs.len() as u32;
        building.txs.push(PlacedTx {
            rollup_id: tx.rollup_id,
            kind: tx.kind,
            bytes_pos: building.bytes.len(),
            bytes_len: tx.bytes.len(),
        });
        building.bytes.extend_from_slice(tx.bytes);
        building.tx_hashes.push(tx_hash);
        debug_assert!(
            encoded_len(building.bytes.len(), building.txs.len()) <= self.policy.batch_bytes_max
        );
        TxSlot {
            batch_seq: self.next_seq,
            offset_in_batch,
        }
    }

    /// Seals the batch being built (which holds at least one transaction) onto the queue.
    fn seal_building(&mut self) {
        let building = &mut self.building;
        assert!(!building.txs.is_empty(), "sealing an empty batch");
        let tx_count = u32::try_from(building.txs.len()).expect("bounded by BATCH_TXS_MAX");
        let tx_hashes = std::mem::take(&mut building.tx_hashes);
        // The whole tree, not just the root: receipts carry Merkle paths.
        let tree = MerkleTree::new(&tx_hashes);
        let root = tree.root();
        let header = BatchHeader {
            term: 0,
            index: 0,
            prev_batch_hash: [0; 32],
            tx_merkle_root: root,
            tx_count,
            timestamp_us: 0,
        };
        let payloads = std::mem::take(&mut building.bytes);
        let expected_len = encoded_len(payloads.len(), building.txs.len());
        let capacity = payloads.capacity();
        let bytes = finish_batch(payloads, header, &building.txs);
        building.txs.clear();
        assert_eq!(bytes.len(), expected_len, "size prediction matches rkyv");
        assert!(bytes.len() <= self.policy.batch_bytes_max);
        debug_assert_eq!(
            bytes.capacity(),
            capacity,
            "no reallocation: payloads copied once"
        );
        debug_assert!(crate::batch::access_batch(&bytes).is_ok());
        self.sealed.push_back(SealedBatch {
            seq: self.next_seq,
            bytes,
            tx_count,
            tx_hashes,
            merkle_root: root,
            tree,
            opened_us: building.first_push_us,
        });
        self.next_seq += 1;
    }
}
