//! `DedupWindow`: the last `capacity` accepted transaction hashes and where each was placed.
//!
//! This is a fast, bounded first line against retries that reach the same shard; it forgets the
//! oldest hash once full. The sequencer state machine does the authoritative dedup over the
//! whole log (a retry routed to another shard or arriving after eviction is caught there).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};

use crate::hash::TxHash;

use super::TxSlot;

/// Largest dedup window, in hashes (about 200 MiB of map and queue at the maximum).
pub const DEDUP_CAPACITY_MAX: usize = 1 << 22;

/// Bounded map from transaction hash to first slot, evicting first-in-first-out.
#[derive(Debug)]
pub(crate) struct DedupWindow {
    slots: HashMap<TxHash, TxSlot, TxHashBuildHasher>,
    /// Hashes in insertion order with the slot they were inserted for; the front is evicted
    /// next. An entry whose hash was forgotten (or re-inserted since) is stale: evicting it
    /// leaves the map alone.
    order: VecDeque<(TxHash, TxSlot)>,
    capacity: usize,
}

impl DedupWindow {
    /// A window of `capacity` hashes (0 disables dedup), allocated up front so the hot path
    /// never rehashes.
    pub(crate) fn new(capacity: usize) -> Self {
        assert!(capacity <= DEDUP_CAPACITY_MAX, "checked by Batcher::new");
        Self {
            slots: HashMap::with_capacity_and_hasher(capacity, TxHashBuildHasher::new()),
            order: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Where `tx_hash` was first accepted, if it is still in the window.
    pub(crate) fn get(&self, tx_hash: &TxHash) -> Option<TxSlot> {
        self.slots.get(tx_hash).copied()
    }

    /// Records a newly accepted hash (not already present), evicting the oldest when full.
    pub(crate) fn insert(&mut self, tx_hash: TxHash, slot: TxSlot) {
        if self.capacity == 0 {
            return;
        }
        if self.order.len() == self.capacity {
            let (oldest, at) = self.order.pop_front().expect("window is full");
            if self.slots.get(&oldest) == Some(&at) {
                self.slots.remove(&oldest);
            }
        }
        let previous = self.slots.insert(tx_hash, slot);
        debug_assert!(previous.is_none(), "caller checks get() first");
        self.order.push_back((tx_hash, slot));
        debug_assert!(self.slots.len() <= self.order.len());
        debug_assert!(self.order.len() <= self.capacity);
    }

    /// Forgets `tx_hash` if it still points at `slot` (its batch failed: a retry must be
    /// accepted again, not answered as a duplicate of nothing).
    pub(crate) fn forget(&mut self, tx_hash: &TxHash, slot: TxSlot) {
        if self.slots.get(tx_hash) == Some(&slot) {
            self.slots.remove(tx_hash);
        }
    }

    /// Number of hashes held.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

/// Hasher for `TxHash` keys: keccak output is already uniform, so a keyed folded multiply over
/// its words suffices (SipHash would cost more than the map). The per-process random key keeps
/// clients from grinding hashes that collide in the table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TxHashBuildHasher {
    key: [u64; 2],
}

impl TxHashBuildHasher {
    fn new() -> Self {
        let random = RandomState::new();
        Self {
            key: [random.hash_one(0u64) | 1, random.hash_one(1u64)],
        }
    }
}

impl BuildHasher for TxHashBuildHasher {
    type Hasher = TxHashHasher;

    fn build_hasher(&self) -> TxHashHasher {
        TxHashHasher {
            state: self.key[1],
            key: self.key[0],
        }
    }
}

/// See `TxHashBuildHasher`.
pub(crate) struct TxHashHasher {
    state: u64,
    key: u64,
}

/// High and low halves of the 128-bit product, xored.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl Hasher for TxHashHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.state = folded_multiply(self.state ^ u64::from_le_bytes(word), self.key);
        }
    }

    fn write_usize(&mut self, value: usize) {
        self.state = folded_multiply(self.state ^ value as u64, self.key);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}
