//! `DedupWindow`: the last `capacity` accepted transaction hashes and where each was placed.
//!
//! This is a fast, bounded first line against retries that reach the same shard; it forgets the
//! oldest hash once full. The sequencer state machine does the authoritative dedup over the
//! whole log (a retry routed to another shard or arriving after eviction is caught there).
//!
//! Layout: a ring of `capacity` (hash, slot) entries in acceptance order, and an open-addressing
//! table of ring positions with room for twice the capacity (linear probing, deletion by
//! backward shift, so no tombstones and no rehash ever). Each table entry is 8 bytes: the ring
//! position and 32 bits of the keyed hash, which give the entry's home slot (for the shift) and
//! tell almost every other hash apart without reading the ring. Everything is allocated, and
//! written, when the window is made, so the hot path neither grows a table nor first-touches
//! memory: a window filled by random inserts into fresh memory cost every shard a 300-450 ms
//! stall of page zeroing at the start of a load.
//!
//! Each accepted transaction costs a lookup, an insert and (once full) the removal of the
//! oldest hash, each in a random place of a table of tens of MiB: cache misses, which
//! [`DedupWindow::prefetch`] lets the caller start a few transactions ahead (a table of our own
//! for that reason: hashbrown keeps its probe position private).

use crate::hash::TxHash;
use crate::tx_index::{prefetch, TxHasher};

use super::TxSlot;

/// Largest dedup window, in hashes (256 MiB of ring and table at the maximum).
pub const DEDUP_CAPACITY_MAX: usize = 1 << 22;

/// A ring entry that holds nothing (never returned: lookups go through the table).
const VACANT: (TxHash, TxSlot) = (
    TxHash([0; 32]),
    TxSlot {
        batch_seq: u64::MAX,
        offset_in_batch: u32::MAX,
    },
);

/// A table entry: ring position `at` of a hash whose keyed hash has low 32 bits `hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    hash: u32,
    at: u32,
}

/// `Entry::at` of an empty table slot (ring positions are below `DEDUP_CAPACITY_MAX`).
const EMPTY: Entry = Entry {
    hash: 0,
    at: u32::MAX,
};

/// Bounded map from transaction hash to first slot, evicting first-in-first-out.
#[derive(Debug)]
pub(crate) struct DedupWindow {
    /// Accepted hashes with their slots; `next` is where the next one goes, and (once the ring
    /// is full) the oldest, evicted by that insert.
    ring: Box<[(TxHash, TxSlot)]>,
    next: usize,
    /// Ring positions of the hashes still remembered (a forgotten hash's entry is removed; its
    /// ring entry stays until overwritten). A power of two of slots, at most half of them used.
    table: Box<[Entry]>,
    hasher: TxHasher,
    /// Ring entries written so far, up to the capacity.
    filled: usize,
    /// Table entries in use.
    len: usize,
}

impl DedupWindow {
    /// A window of `capacity` hashes (0 disables dedup), allocated and touched up front.
    pub(crate) fn new(capacity: usize) -> Self {
        assert!(capacity <= DEDUP_CAPACITY_MAX, "checked by Batcher::new");
        let slots = if capacity == 0 {
            0
        } else {
            (capacity * 2).next_power_of_two()
        };
        Self {
            // `vec!` writes every entry (neither is all zeros), so the pages are faulted in
            // here rather than by the first load.
            ring: vec![VACANT; capacity].into_boxed_slice(),
            next: 0,
            table: vec![EMPTY; slots].into_boxed_slice(),
            hasher: TxHasher::new(),
            filled: 0,
            len: 0,
        }
    }

    #[inline]
    fn mask(&self) -> usize {
        self.table.len() - 1
    }

    /// The low 32 bits of `tx_hash`'s keyed hash (home slot and tag).
    #[inline]
    fn hash32(&self, tx_hash: &TxHash) -> u32 {
        self.hasher.hash(tx_hash) as u32
    }

    /// Table slot of `tx_hash`'s entry, if it is remembered.
    #[inline]
    fn find(&self, tx_hash: &TxHash) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let hash = self.hash32(tx_hash);
        let mask = self.mask();
        let mut i = hash as usize & mask;
        loop {
            let e = self.table[i];
            if e.at == EMPTY.at {
                return None;
            }
            if e.hash == hash && self.ring[e.at as usize].0 == *tx_hash {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Where `tx_hash` was first accepted, if it is still in the window.
    pub(crate) fn get(&self, tx_hash: &TxHash) -> Option<TxSlot> {
        self.find(tx_hash)
            .map(|i| self.ring[self.table[i].at as usize].1)
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
        let hash = self.hash32(&tx_hash);
        let mask = self.mask();
        let mut i = hash as usize & mask;
        while self.table[i].at != EMPTY.at {
            i = (i + 1) & mask;
        }
        self.table[i] = Entry {
            hash,
            at: at as u32,
        };
        self.len += 1;
        self.next = (at + 1) % self.ring.len();
        debug_assert!(self.len <= self.filled);
    }

    /// Forgets `tx_hash` if it still points at `slot` (its batch failed: a retry must be
    /// accepted again, not answered as a duplicate of nothing).
    pub(crate) fn forget(&mut self, tx_hash: &TxHash, slot: TxSlot) {
        if let Some(i) = self.find(tx_hash) {
            if self.ring[self.table[i].at as usize].1 == slot {
                self.delete(i);
            }
        }
    }

    /// Number of hashes held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Asks the CPU to start loading what accepting `tx_hash` will touch: its home slot in the
    /// table, and (once the window is full) the home slot of the hash that will be evicted
    /// `ahead` acceptances from now. Call it a few transactions before `get`/`insert` of
    /// `tx_hash`, with `ahead` that distance. Only a hint: it changes no result.
    #[inline]
    pub(crate) fn prefetch(&self, tx_hash: &TxHash, ahead: usize) {
        if self.table.is_empty() {
            return;
        }
        let mask = self.mask();
        prefetch(std::ptr::from_ref(&self.table[self.hash32(tx_hash) as usize & mask]).cast());
        if self.filled == self.ring.len() {
            let oldest = &self.ring[(self.next + ahead) % self.ring.len()].0;
            prefetch(std::ptr::from_ref(&self.table[self.hash32(oldest) as usize & mask]).cast());
        }
    }

    /// Drops the table entry for ring position `at`, if the hash there is still remembered from
    /// that position (not forgotten, or forgotten and accepted again elsewhere in the ring).
    fn remove_at(&mut self, at: usize) {
        let hash = self.hash32(&self.ring[at].0);
        let mask = self.mask();
        let mut i = hash as usize & mask;
        loop {
            let e = self.table[i];
            if e.at == EMPTY.at {
                return;
            }
            if e.at as usize == at {
                self.delete(i);
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Empties table slot `i`, moving later entries of its probe run back so that every entry
    /// stays reachable from its home slot without crossing an empty one.
    fn delete(&mut self, i: usize) {
        let mask = self.mask();
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let e = self.table[j];
            if e.at == EMPTY.at {
                break;
            }
            // `e` may fill the hole unless its home lies after the hole (cyclically) on the
            // way to `j`: then it would sit before its home.
            let home = e.hash as usize & mask;
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.table[hole] = e;
                hole = j;
            }
        }
        self.table[hole] = EMPTY;
        self.len -= 1;
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
        for capacity in [1usize, 2, 5, 64, 300] {
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
