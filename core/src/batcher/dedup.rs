//! `DedupWindow`: the last `capacity` accepted transaction hashes and where each was placed.
//!
//! This is a fast, bounded first line against retries that reach the same shard; it forgets the
//! oldest hash once full. The sequencer state machine does the authoritative dedup over the
//! whole log (a retry routed to another shard or arriving after eviction is caught there).
//!
//! Layout: a ring of `capacity` (hash, slot) entries in acceptance order, and a hash table of
//! ring positions sized for twice the capacity. Everything is allocated, and the ring written,
//! when the window is made, so the hot path neither grows a table nor first-touches memory:
//! a window filled by random inserts into fresh memory cost every shard a 300-450 ms stall of
//! page zeroing at the start of a load. At a quarter of the table's room, removals almost never
//! leave tombstones, so the table never rehashes in place either.

use hashbrown::HashTable;

use crate::hash::TxHash;
use crate::tx_index::TxHasher;

use super::TxSlot;

/// Largest dedup window, in hashes (about 270 MiB of ring and table at the maximum).
pub const DEDUP_CAPACITY_MAX: usize = 1 << 22;

/// A ring entry that holds nothing (never returned: lookups go through the table).
const VACANT: (TxHash, TxSlot) = (
    TxHash([0; 32]),
    TxSlot {
        batch_seq: u64::MAX,
        offset_in_batch: u32::MAX,
    },
);

/// Bounded map from transaction hash to first slot, evicting first-in-first-out.
#[derive(Debug)]
pub(crate) struct DedupWindow {
    /// Accepted hashes with their slots; `next` is where the next one goes, and (once the ring
    /// is full) the oldest, evicted by that insert.
    ring: Box<[(TxHash, TxSlot)]>,
    next: usize,
    /// Ring positions of the hashes still remembered (a forgotten hash's entry is removed; its
    /// ring entry stays until overwritten).
    table: HashTable<u32>,
    hasher: TxHasher,
    /// Ring entries written so far, up to the capacity.
    filled: usize,
}

impl DedupWindow {
    /// A window of `capacity` hashes (0 disables dedup), allocated and touched up front.
    pub(crate) fn new(capacity: usize) -> Self {
        assert!(capacity <= DEDUP_CAPACITY_MAX, "checked by Batcher::new");
        Self {
            // `vec!` writes every entry (VACANT is not all zeros), so the pages are faulted in
            // here rather than by the first load.
            ring: vec![VACANT; capacity].into_boxed_slice(),
            next: 0,
            table: HashTable::with_capacity(capacity * 2),
            hasher: TxHasher::new(),
            filled: 0,
        }
    }

    /// Where `tx_hash` was first accepted, if it is still in the window.
    pub(crate) fn get(&self, tx_hash: &TxHash) -> Option<TxSlot> {
        let ring = &self.ring;
        self.table
            .find(self.hasher.hash(tx_hash), |&at| {
                ring[at as usize].0 == *tx_hash
            })
            .map(|&at| ring[at as usize].1)
    }

    /// Records a newly accepted hash (not already present), evicting the oldest when full.
    pub(crate) fn insert(&mut self, tx_hash: TxHash, slot: TxSlot) {
        if self.ring.is_empty() {
            return;
        }
        let at = self.next;
        if self.filled == self.ring.len() {
            self.remove_at(at);
        } else {
            self.filled += 1;
        }
        debug_assert!(self.get(&tx_hash).is_none(), "caller checks get() first");
        self.ring[at] = (tx_hash, slot);
        let (ring, hasher) = (&self.ring, self.hasher);
        self.table
            .insert_unique(hasher.hash(&tx_hash), at as u32, |&other| {
                hasher.hash(&ring[other as usize].0)
            });
        self.next = (at + 1) % self.ring.len();
        debug_assert!(self.table.len() <= self.filled);
    }

    /// Forgets `tx_hash` if it still points at `slot` (its batch failed: a retry must be
    /// accepted again, not answered as a duplicate of nothing).
    pub(crate) fn forget(&mut self, tx_hash: &TxHash, slot: TxSlot) {
        let ring = &self.ring;
        if let Ok(entry) = self.table.find_entry(self.hasher.hash(tx_hash), |&at| {
            ring[at as usize].0 == *tx_hash
        }) {
            if ring[*entry.get() as usize].1 == slot {
                entry.remove();
            }
        }
    }

    /// Number of hashes held.
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// Drops the table entry for ring position `at`, if the hash there is still remembered from
    /// that position (not forgotten, or forgotten and accepted again elsewhere in the ring).
    fn remove_at(&mut self, at: usize) {
        let ring = &self.ring;
        let oldest = ring[at].0;
        if let Ok(entry) = self
            .table
            .find_entry(self.hasher.hash(&oldest), |&other| other as usize == at)
        {
            entry.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> TxHash {
        TxHash::of(&i.to_le_bytes())
    }

    fn slot(i: u64) -> TxSlot {
        TxSlot {
            batch_seq: i / 7,
            offset_in_batch: (i % 7) as u32,
        }
    }

    /// Against a plain FIFO model: inserts of fresh and evicted hashes, forgets of current and
    /// stale slots, over several trips round the ring.
    #[test]
    fn behaves_as_a_fifo_of_the_last_capacity_acceptances() {
        for capacity in [1usize, 2, 5, 64] {
            let mut window = DedupWindow::new(capacity);
            let mut model: std::collections::VecDeque<(TxHash, TxSlot)> = Default::default();
            let mut forgotten: Vec<(TxHash, TxSlot)> = Vec::new();
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            for step in 0..(capacity as u64 * 40) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                // Hashes drawn from a pool a little larger than the window, so repeats of
                // remembered, evicted and forgotten hashes all happen.
                let hash = h(rng % (capacity as u64 * 2 + 3));
                let remembered = model
                    .iter()
                    .rev()
                    .find(|(k, s)| *k == hash && !forgotten.contains(&(*k, *s)))
                    .map(|(_, s)| *s);
                assert_eq!(
                    window.get(&hash),
                    remembered,
                    "capacity {capacity} step {step}"
                );
                match (remembered, rng % 5) {
                    (Some(at), 0) => {
                        window.forget(&hash, at);
                        forgotten.push((hash, at));
                    }
                    (Some(at), 1) => {
                        // A stale forget (another slot) changes nothing.
                        window.forget(&hash, slot(step + 1_000_000));
                        assert_eq!(window.get(&hash), Some(at));
                    }
                    (Some(_), _) => {}
                    (None, _) => {
                        window.insert(hash, slot(step));
                        model.push_back((hash, slot(step)));
                        if model.len() > capacity {
                            model.pop_front();
                        }
                    }
                }
                let live = model
                    .iter()
                    .filter(|entry| !forgotten.contains(entry))
                    .count();
                assert_eq!(window.len(), live);
            }
        }
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut window = DedupWindow::new(0);
        window.insert(h(1), slot(1));
        assert_eq!(window.get(&h(1)), None);
        assert_eq!(window.len(), 0);
    }
}
