//! Hash tables keyed by `TxHash` that never stall the shard that owns them.
//!
//! A std `HashMap` grows by doubling: the insert that crosses its load factor allocates a table
//! twice the size and moves every entry there. For the state machine's index of every sequenced
//! transaction that is one insert in millions, but it moves millions of entries and first-touches
//! hundreds of MiB (each fresh 2 MiB page zeroed by the kernel), all on the Raft shard and on
//! every node at the same log index: a 100-300 ms stall of the whole cluster at each doubling
//! (`perf`: `reserve_rehash` → `do_huge_pmd_anonymous_page` → `clear_page_erms`).
//!
//! [`TxIndex`] splits the index into [`PARTS`] (65,536) tables by hash. Each grows on its own,
//! so one growth moves a few dozen entries, and the growths are spread over many batches
//! instead of landing in one.
//!
//! Parts are shared on clone and copied when next written (`Arc::make_mut`): a snapshot takes a
//! copy of the whole state on the Raft shard, and a deep copy of millions of entries would be
//! the same kind of stall again. A clone costs one reference count per part; while it lives,
//! each applied batch copies only the parts its transactions land in (a batch of 3,000 touches
//! under 5 % of them), so the copying is spread over the batches applied while the snapshot is
//! encoded. With 1,024 parts every batch touched nearly all of them and the first batch after
//! the clone paid for a full copy, a 700 ms stall at 3 M transactions.
//!
//! A [`Window`] of two generations recycles: when the newer generation fills, the tables of
//! the one it drops are emptied (keeping their capacity) and take the next generation's
//! entries, so after the first rotation the index neither allocates nor grows tables. Emptying
//! is lazy: the index moves to a new epoch, a table stamped with an older one counts as empty,
//! and it is cleared when the next entry lands in it. Clearing all 65,536 tables at once (each
//! its own allocation, a cache miss or two apiece) took 10-15 ms on every node at the same log
//! index, every 2^20 transactions: a stall of the whole cluster. Each generation also has a
//! small Bloom filter in front of it, and the state machine prefetches the next hashes'
//! entries while it inserts (see [`Window::prefetch`]).
//!
//! [`TxHasher`] is the hash both use: keccak output is already uniform, so a keyed folded
//! multiply over its four words suffices (SipHash would cost more than the table). The key is
//! random per table, so clients cannot grind transactions whose hashes collide in it.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;

use crate::hash::TxHash;

/// Tables a [`TxIndex`] is split into (a power of two).
pub const PARTS: usize = 1 << 16;

/// Keyed 64-bit hash of a `TxHash`; see the module docs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TxHasher {
    key: [u64; 2],
}

impl TxHasher {
    /// A hasher with a fresh random key.
    pub(crate) fn new() -> Self {
        let random = RandomState::new();
        Self {
            key: [random.hash_one(0u64) | 1, random.hash_one(1u64)],
        }
    }

    pub(crate) fn hash(&self, tx_hash: &TxHash) -> u64 {
        let mut state = self.key[1];
        for word in tx_hash.0.chunks_exact(8) {
            let word = u64::from_le_bytes(word.try_into().expect("8-byte chunk"));
            state = folded_multiply(state ^ word, self.key[0]);
        }
        state
    }
}

/// High and low halves of the 128-bit product, xored.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

/// One of a [`TxIndex`]'s tables, shared between clones until written.
type Part<V> = Arc<Table<V>>;

/// A part's table: open addressing with linear probing. `tags[i]` is 0 for an empty slot, else
/// the top 7 bits of the entry's hash with the high bit set, so a probe past another key
/// usually stops at its tag. Entries are never removed, so a probe ends at the first empty slot
/// (the load stays at most 3/4). The first slot a hash probes is a plain function of the table
/// (`tags`, `slots`, `mask`), which [`Table::prefetch`] can ask the CPU to load ahead of the
/// insert or lookup that needs it; hashbrown's tables keep that behind private fields.
#[derive(Clone)]
struct Table<V> {
    tags: Box<[u8]>,
    slots: Box<[(TxHash, V)]>,
    len: usize,
    /// The [`TxIndex::epoch`] the entries belong to: in an index at a later epoch the table
    /// holds nothing (whatever its tags say) until it is cleared for its next entry.
    epoch: u64,
}

impl<V: Copy + Default + PartialEq> Table<V> {
    /// Fewest slots a non-empty table has.
    const SLOTS_MIN: usize = 8;

    /// A table with room for `entries` before it grows.
    fn with_capacity(entries: usize) -> Self {
        if entries == 0 {
            return Self {
                tags: Box::new([]),
                slots: Box::new([]),
                len: 0,
                epoch: 0,
            };
        }
        Self::with_slots(Self::slots_for(entries))
    }

    /// Slots a table needs to hold `entries` at its load bound (at least one).
    fn slots_for(entries: usize) -> usize {
        (entries * 4).div_ceil(3).next_power_of_two()
    }

    /// An empty table of `slots` slots (a power of two, at least [`Self::SLOTS_MIN`]).
    fn with_slots(slots: usize) -> Self {
        let slots = slots.max(Self::SLOTS_MIN);
        debug_assert!(slots.is_power_of_two());
        Self {
            tags: vec![0; slots].into_boxed_slice(),
            slots: vec![(TxHash([0; 32]), V::default()); slots].into_boxed_slice(),
            len: 0,
            epoch: 0,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn tag(hash: u64) -> u8 {
        (hash >> 57) as u8 | 0x80
    }

    /// Where `key` is (`Ok`), or the empty slot its probe ended at (`Err`). The table must
    /// have slots (its load stays under 1, so a probe always reaches an empty one).
    #[inline]
    fn probe(&self, hash: u64, key: &TxHash) -> Result<usize, usize> {
        let mask = self.tags.len() - 1;
        let tag = Self::tag(hash);
        let mut i = hash as usize & mask;
        loop {
            let t = self.tags[i];
            if t == 0 {
                return Err(i);
            }
            if t == tag && self.slots[i].0 == *key {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    fn get(&self, hash: u64, key: &TxHash) -> Option<V> {
        if self.tags.is_empty() {
            return None;
        }
        self.probe(hash, key).ok().map(|i| self.slots[i].1)
    }

    /// Inserts unless `key` is present (then `Err` with its value, left as it was).
    #[inline]
    fn insert_new(&mut self, hash: u64, key: TxHash, value: V, hasher: &TxHasher) -> Result<(), V> {
        if (self.len + 1) * 4 > self.tags.len() * 3 {
            if let Some(recorded) = self.get(hash, &key) {
                return Err(recorded);
            }
            self.grow(hasher);
        }
        match self.probe(hash, &key) {
            Ok(i) => Err(self.slots[i].1),
            Err(i) => {
                self.place(i, hash, key, value);
                self.len += 1;
                Ok(())
            }
        }
    }

    #[inline]
    fn place(&mut self, i: usize, hash: u64, key: TxHash, value: V) {
        self.tags[i] = Self::tag(hash);
        self.slots[i] = (key, value);
    }

    /// Doubles the table (or makes the first one), re-placing every entry.
    fn grow(&mut self, hasher: &TxHasher) {
        self.grow_to(self.tags.len() * 2, hasher);
    }

    /// Moves the entries to a table of `slots` slots (a power of two, more than it has now).
    fn grow_to(&mut self, slots: usize, hasher: &TxHasher) {
        let mut bigger = Self::with_slots(slots);
        for (key, value) in self.iter() {
            let hash = hasher.hash(key);
            let i = bigger
                .probe(hash, key)
                .expect_err("a table's keys are distinct");
            bigger.place(i, hash, *key, *value);
        }
        bigger.len = self.len;
        bigger.epoch = self.epoch;
        *self = bigger;
    }

    /// Writes every tag and slot (keeping their values), so that the pages behind them are
    /// faulted in now rather than by the inserts that first land on them.
    fn touch(&mut self) {
        for tag in self.tags.iter_mut() {
            // SAFETY: `tag` is a valid, exclusive reference.
            unsafe { std::ptr::write_volatile(tag, *tag) };
        }
        for slot in self.slots.iter_mut() {
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(&mut slot.1, slot.1) };
        }
    }

    /// Empties the table, keeping its slots.
    fn clear(&mut self) {
        self.tags.fill(0);
        self.len = 0;
    }

    fn iter(&self) -> impl Iterator<Item = (&TxHash, &V)> {
        self.tags
            .iter()
            .zip(self.slots.iter())
            .filter(|(t, _)| **t != 0)
            .map(|(_, (key, value))| (key, value))
    }

    /// Asks the CPU to load what inserting `hash` reads and writes (a hint): the tag of its
    /// first slot and the lines of that slot and the two after it, where a probe at the
    /// table's usual load ends (48-byte slots; loading more than the first slot's line took the
    /// `tx_window` benchmark from 182 to 126 ns per insert).
    #[inline]
    fn prefetch(&self, hash: u64) {
        if !self.tags.is_empty() {
            let mask = self.tags.len() - 1;
            let i = hash as usize & mask;
            prefetch(std::ptr::from_ref(&self.tags[i]).cast());
            // Slots `i..=i + 2` span three lines from the first slot's: the address past the
            // end of the table (a probe there wraps) is only a hint, never read.
            let first: *const u8 = std::ptr::from_ref(&self.slots[i]).cast();
            prefetch(first);
            prefetch(first.wrapping_add(64));
            prefetch(first.wrapping_add(128));
        }
    }
}

/// Map from `TxHash` to a small `Copy` value, split into [`PARTS`] tables so that growing it
/// never moves more than a sliver of it at once, and cloning it is cheap (module docs). Entries
/// are never removed.
#[derive(Clone)]
pub struct TxIndex<V> {
    /// `None` until the first entry lands in it (an empty index allocates one slice). A part
    /// whose table is stamped with an epoch other than `epoch` is empty.
    parts: Box<[Option<Part<V>>]>,
    hasher: TxHasher,
    len: usize,
    /// Moved on by [`TxIndex::recycle`] (never wraps: one per generation of entries).
    epoch: u64,
}

impl<V: Copy + Default + PartialEq + Send + Sync> TxIndex<V> {
    /// An empty index.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An empty index with room for about `capacity` entries before any part grows.
    pub fn with_capacity(capacity: usize) -> Self {
        let per_part = capacity.div_ceil(PARTS);
        let part = || (per_part > 0).then(|| Arc::new(Table::with_capacity(per_part)));
        Self {
            parts: (0..PARTS).map(|_| part()).collect(),
            hasher: TxHasher::new(),
            len: 0,
            epoch: 0,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value recorded for `tx_hash`.
    pub fn get(&self, tx_hash: &TxHash) -> Option<V> {
        let hash = self.hasher.hash(tx_hash);
        self.part(part_of(hash))?.get(hash, tx_hash)
    }

    /// Part `i`'s table, if it has one of this epoch.
    #[inline]
    fn part(&self, i: usize) -> Option<&Table<V>> {
        self.parts[i]
            .as_deref()
            .filter(|table| table.epoch == self.epoch)
    }

    /// Whether `tx_hash` is recorded.
    pub fn contains_key(&self, tx_hash: &TxHash) -> bool {
        self.get(tx_hash).is_some()
    }

    /// Records `value` for `tx_hash` unless it is already recorded; `Err` with the recorded
    /// value if it is (which is left as it was).
    pub fn insert_new(&mut self, tx_hash: TxHash, value: V) -> Result<(), V> {
        let hash = self.hasher.hash(&tx_hash);
        let hasher = self.hasher;
        let slot = &mut self.parts[part_of(hash)];
        if slot.as_ref().is_none_or(|part| part.epoch != self.epoch) {
            Self::renew(slot, self.epoch);
        }
        let part = Arc::make_mut(slot.as_mut().expect("renewed"));
        part.insert_new(hash, tx_hash, value, &hasher)?;
        self.len += 1;
        Ok(())
    }

    /// Gives a part with no table, or a table of an earlier epoch, an empty one of `epoch`: the
    /// stale table cleared in place if no clone shares it (a clone keeps what it had), else a
    /// new one of the same size.
    #[cold]
    #[inline(never)]
    fn renew(slot: &mut Option<Part<V>>, epoch: u64) {
        match slot {
            None => {
                let mut table = Table::with_capacity(0);
                table.epoch = epoch;
                *slot = Some(Arc::new(table));
            }
            Some(part) => match Arc::get_mut(part) {
                Some(table) => {
                    table.clear();
                    table.epoch = epoch;
                }
                None => {
                    let mut table = Table::with_slots(part.tags.len());
                    table.epoch = epoch;
                    *part = Arc::new(table);
                }
            },
        }
    }

    /// Asks the CPU to start loading the part slot `tx_hash` maps to: the first of the
    /// dependent loads a lookup or insert makes (see [`Window::prefetch`]). Only a hint.
    #[inline]
    fn prefetch_slot(&self, tx_hash: &TxHash) {
        let slot = &self.parts[part_of(self.hasher.hash(tx_hash))];
        prefetch(std::ptr::from_ref(slot).cast());
    }

    /// Asks the CPU to start loading the table header of the part `tx_hash` maps to: the second
    /// dependent load. Reads the part slot, so it pays off once [`Self::prefetch_slot`] ran for
    /// the same hash a while before.
    #[inline]
    fn prefetch_part(&self, tx_hash: &TxHash) {
        if let Some(part) = &self.parts[part_of(self.hasher.hash(tx_hash))] {
            prefetch(Arc::as_ptr(part).cast());
        }
    }

    /// Asks the CPU to load the first tag and slot `tx_hash` probes in its part: the third
    /// dependent load. Reads the part's header, so it pays off once [`Self::prefetch_part`]
    /// ran for the same hash a while before.
    #[inline]
    fn prefetch_entry(&self, tx_hash: &TxHash) {
        let hash = self.hasher.hash(tx_hash);
        // A table of an earlier epoch too: the insert that clears it reads the same lines.
        if let Some(part) = &self.parts[part_of(hash)] {
            part.prefetch(hash);
        }
    }

    /// Gives every part a table with room for its share of `capacity` entries, and faults its
    /// memory in (see [`Window::reserve`]): a part without a table gets one, a smaller table no
    /// clone shares is grown, a shared one is left alone.
    fn reserve(&mut self, capacity: usize) {
        let per_part = capacity.div_ceil(PARTS);
        if per_part == 0 {
            return;
        }
        let slots = Table::<V>::slots_for(per_part).max(Table::<V>::SLOTS_MIN);
        let (hasher, epoch) = (self.hasher, self.epoch);
        for slot in self.parts.iter_mut() {
            // A table of an earlier epoch holds nothing: one no clone shares is emptied and
            // kept, a shared one let go.
            if let Some(part) = slot.as_mut().filter(|p| p.epoch != epoch) {
                match Arc::get_mut(part) {
                    Some(table) => {
                        table.clear();
                        table.epoch = epoch;
                    }
                    None => *slot = None,
                }
            }
            match slot {
                None => {
                    let mut table = Table::with_slots(slots);
                    table.epoch = epoch;
                    table.touch();
                    *slot = Some(Arc::new(table));
                }
                Some(part) => {
                    // A part a clone shares is left alone (it is copied when next written).
                    if let Some(table) = Arc::get_mut(part).filter(|t| t.tags.len() < slots) {
                        table.grow_to(slots, &hasher);
                        table.touch();
                    }
                }
            }
        }
    }

    /// Empties this index, keeping the tables it can (those no clone shares) with their
    /// capacity, so that refilling it to the same size allocates and grows (almost) nothing.
    ///
    /// Constant time: the index moves to a new epoch, and each table is cleared (or, if a clone
    /// shares it, replaced) when the next entry lands in it.
    fn recycle(&mut self) {
        self.epoch += 1;
        self.len = 0;
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&TxHash, &V)> {
        let epoch = self.epoch;
        self.parts
            .iter()
            .flatten()
            .filter(move |part| part.epoch == epoch)
            .flat_map(|part| part.iter())
    }

    /// Every entry by value, in no particular order, letting go of each part as soon as its
    /// entries are out: a clone that shares parts with a live index stops costing it a copy of
    /// a part once it has moved past that part.
    pub fn into_entries(self) -> IntoEntries<V> {
        IntoEntries {
            epoch: self.epoch,
            parts: self.parts.into_vec().into_iter(),
            part: None,
            at: 0,
        }
    }
}

/// [`TxIndex::into_entries`].
pub struct IntoEntries<V> {
    /// The index's epoch: parts of another hold nothing.
    epoch: u64,
    parts: std::vec::IntoIter<Option<Part<V>>>,
    /// The part being read, and the next slot of it to look at.
    part: Option<Part<V>>,
    at: usize,
}

impl<V: Copy> Iterator for IntoEntries<V> {
    type Item = (TxHash, V);

    fn next(&mut self) -> Option<(TxHash, V)> {
        loop {
            if let Some(part) = &self.part {
                while let Some(tag) = part.tags.get(self.at) {
                    let i = self.at;
                    self.at += 1;
                    if *tag != 0 {
                        return Some(part.slots[i]);
                    }
                }
            }
            // Done with this part: let it go before the next.
            self.part = None;
            self.prefetch_ahead();
            self.part = self.parts.next()?.filter(|p| p.epoch == self.epoch);
            self.at = 0;
        }
    }
}

/// How many parts ahead of the one being read [`IntoEntries`] starts loading a part's table
/// header, and (half as far) its tags and first slots.
const COPY_PREFETCH_PARTS: usize = 16;

impl<V> IntoEntries<V> {
    /// Starts the loads the parts a little further on will need: each part is a separate
    /// allocation, so reading one is a chain of misses (its header, then its tags and slots)
    /// that a plain walk pays one after the other, part after part (most of a snapshot's copy
    /// time in `perf annotate`). A hint only: it changes no result.
    #[inline]
    fn prefetch_ahead(&self) {
        let ahead = self.parts.as_slice();
        if let Some(Some(far)) = ahead.get(COPY_PREFETCH_PARTS) {
            prefetch(Arc::as_ptr(far).cast());
        }
        if let Some(Some(near)) = ahead.get(COPY_PREFETCH_PARTS / 2) {
            // Its header was asked for a few parts ago.
            prefetch(near.tags.as_ptr());
            let slots = near.slots.as_ptr().cast::<u8>();
            for line in (0..std::mem::size_of_val(&*near.slots)).step_by(64) {
                prefetch(slots.wrapping_add(line));
            }
        }
    }
}

impl<V: Copy + Default + PartialEq + Send + Sync> Default for TxIndex<V> {
    fn default() -> Self {
        Self::new()
    }
}

/// Equal when both hold the same entries (their keys and layouts may differ).
impl<V: Copy + Default + PartialEq + Send + Sync> PartialEq for TxIndex<V> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self
                .iter()
                .all(|(key, value)| other.get(key) == Some(*value))
    }
}

impl<V: Copy + Default + PartialEq + Send + Sync> Eq for TxIndex<V> {}

impl<V> std::fmt::Debug for TxIndex<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxIndex").field("len", &self.len).finish()
    }
}

/// A [`TxIndex`] that remembers only recent entries: two generations, the current one and the
/// previous one. When the current generation reaches `generation` entries it becomes the
/// previous one and the old previous one is dropped. So an entry is remembered for at least
/// `generation` later insertions (up to twice that), and the index never holds more than
/// `2 × generation` entries, however long it lives. Which entries are forgotten depends only on
/// the order of insertions: two windows fed the same sequence hold the same entries.
///
/// Each generation has a [`Filter`] next to it: a small bit array that answers "certainly not
/// here" for most absent hashes with one cache line, instead of the index's chain of misses.
/// Nearly every insert is of a hash seen in neither generation, so the lookup in the previous
/// generation that every insert makes is, most of the time, one probe of a 2 MiB array.
#[derive(Clone, Debug)]
pub struct Window<V> {
    current: TxIndex<V>,
    previous: TxIndex<V>,
    /// Filters of `current` and `previous`; shared on clone (a snapshot's copy), copied when
    /// next written (the previous one never is).
    current_filter: Arc<Filter>,
    previous_filter: Arc<Filter>,
    generation: usize,
}

/// A one-sided set of hashes for a [`Window`] generation (a blocked Bloom filter): `may_hold`
/// is true for every inserted hash and, with about 16 bits per entry and two bits set in one
/// 64-bit word per hash, for 1-2% of the others. Keyed like the index, so clients cannot grind
/// hashes that collide in it (and if they did, lookups would only be as slow as without it).
#[derive(Clone)]
struct Filter {
    words: Box<[u64]>,
    hasher: TxHasher,
}

impl Filter {
    /// Bits per entry of a full generation.
    const BITS_PER_ENTRY: usize = 16;
    /// Most words a filter has (32 MiB): 16 bits per entry up to generations of 2^22. A larger
    /// generation (a cluster constant that snapshots carry, up to 2^32) gets this much and more
    /// false positives, which only cost lookups; it must not cost gigabytes up front.
    const WORDS_MAX: usize = 1 << 22;

    /// A filter sized for `entries`; its words are zeroed by the allocator (fresh pages are
    /// zero-filled lazily, as they are first written).
    fn new(entries: usize) -> Filter {
        let words = (entries.saturating_mul(Self::BITS_PER_ENTRY) / 64)
            .clamp(1, Self::WORDS_MAX)
            .next_power_of_two();
        Filter {
            words: vec![0u64; words].into_boxed_slice(),
            hasher: TxHasher::new(),
        }
    }

    /// The word and the two bits of `tx_hash`: the word from the low bits of the keyed hash,
    /// the bits from two 6-bit fields of its top half.
    #[inline]
    fn locate(&self, tx_hash: &TxHash) -> (usize, u64) {
        let hash = self.hasher.hash(tx_hash);
        let word = hash as usize & (self.words.len() - 1);
        let bits = (1u64 << ((hash >> 40) & 63)) | (1u64 << ((hash >> 46) & 63));
        (word, bits)
    }

    #[inline]
    fn may_hold(&self, tx_hash: &TxHash) -> bool {
        let (word, bits) = self.locate(tx_hash);
        self.words[word] & bits == bits
    }

    #[inline]
    fn insert(&mut self, tx_hash: &TxHash) {
        let (word, bits) = self.locate(tx_hash);
        self.words[word] |= bits;
    }

    #[inline]
    fn prefetch(&self, tx_hash: &TxHash) {
        let (word, _) = self.locate(tx_hash);
        prefetch(std::ptr::from_ref(&self.words[word]).cast());
    }

    /// Empties the filter, keeping its memory.
    fn clear(&mut self) {
        self.words.fill(0);
    }

    /// A filter of `entries` that holds every key of `index`.
    fn of<V: Copy + Default + PartialEq + Send + Sync>(
        index: &TxIndex<V>,
        entries: usize,
    ) -> Filter {
        let mut filter = Filter::new(entries);
        for (key, _) in index.iter() {
            filter.insert(key);
        }
        filter
    }
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("words", &self.words.len())
            .finish()
    }
}

impl<V: Copy + Default + PartialEq + Send + Sync> Window<V> {
    /// An empty window whose generations hold `generation` entries (at least 1).
    pub fn new(generation: usize) -> Self {
        Self::from_generations(TxIndex::new(), TxIndex::new(), generation)
    }

    /// A window made of generations as [`Window::previous`] and [`Window::current`] returned
    /// them (snapshot restore). The caller checks they are disjoint and within `generation`.
    pub fn from_generations(previous: TxIndex<V>, current: TxIndex<V>, generation: usize) -> Self {
        let generation = generation.max(1);
        Self {
            current_filter: Arc::new(Filter::of(&current, generation)),
            previous_filter: Arc::new(Filter::of(&previous, generation)),
            current,
            previous,
            generation,
        }
    }

    /// Allocates now what the window will hold once both generations are full, and faults it
    /// in: every part of both generations gets a table with room for its share of a generation
    /// (a smaller one is grown; entries are kept), and both filters are written. A node calls this
    /// once at start, so that the first two million transactions it sequences neither grow
    /// 131,072 tables one doubling at a time nor fault in fresh pages on the Raft shard, in the
    /// middle of the apply path (about 4% of all cycles of a fresh cluster's first seconds).
    pub fn reserve(&mut self) {
        self.current.reserve(self.generation);
        self.previous.reserve(self.generation);
        for filter in [&mut self.current_filter, &mut self.previous_filter] {
            for word in Arc::make_mut(filter).words.iter_mut() {
                // SAFETY: `word` is a valid, exclusive reference.
                unsafe { std::ptr::write_volatile(word, *word) };
            }
        }
    }

    /// Slots of every table of both generations (tests: what [`Window::reserve`] allocated).
    #[cfg(test)]
    pub(crate) fn slots(&self) -> usize {
        [&self.current, &self.previous]
            .iter()
            .flat_map(|index| index.parts.iter().flatten())
            .map(|part| part.tags.len())
            .sum()
    }

    /// Entries a generation holds before the next one starts.
    pub fn generation(&self) -> usize {
        self.generation
    }

    /// Entries remembered now (both generations).
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value recorded for `tx_hash`, if it is still remembered.
    pub fn get(&self, tx_hash: &TxHash) -> Option<V> {
        if self.current_filter.may_hold(tx_hash) {
            if let Some(value) = self.current.get(tx_hash) {
                return Some(value);
            }
        }
        self.previous_get(tx_hash)
    }

    /// The value `previous` holds for `tx_hash`, asking its filter first.
    #[inline]
    fn previous_get(&self, tx_hash: &TxHash) -> Option<V> {
        if self.previous_filter.may_hold(tx_hash) {
            self.previous.get(tx_hash)
        } else {
            None
        }
    }

    /// Whether `tx_hash` is remembered.
    pub fn contains_key(&self, tx_hash: &TxHash) -> bool {
        self.get(tx_hash).is_some()
    }

    /// Records `value` for `tx_hash` unless it is remembered; `Err` with the remembered value
    /// if it is. May start a new generation (forgetting the oldest entries).
    pub fn insert_new(&mut self, tx_hash: TxHash, value: V) -> Result<(), V> {
        if let Some(old) = self.previous_get(&tx_hash) {
            return Err(old);
        }
        self.current.insert_new(tx_hash, value)?;
        Arc::make_mut(&mut self.current_filter).insert(&tx_hash);
        if self.current.len() >= self.generation {
            // The dropped generation's tables, emptied, take the new one's entries: they have
            // about the room a generation needs, so the next one neither allocates nor grows
            // its 65,536 tables (each growth a rehash into fresh memory) all over again.
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.recycle();
            // The dropped generation's filter becomes the new current one, emptied (unless a
            // snapshot's copy still shares it).
            std::mem::swap(&mut self.previous_filter, &mut self.current_filter);
            match Arc::get_mut(&mut self.current_filter) {
                Some(filter) => filter.clear(),
                None => self.current_filter = Arc::new(Filter::new(self.generation)),
            }
        }
        Ok(())
    }

    /// Prepares for inserting or looking up hashes `insert_new` will see soon: for a batch of
    /// hashes, call `prefetch(&hashes[i + PREFETCH_AHEAD], &hashes[i + PREFETCH_AHEAD / 2],
    /// &hashes[i + PREFETCH_AHEAD / 4])` before handling `hashes[i]`.
    ///
    /// An index lookup is a chain of dependent cache misses (part slot, table header, then the
    /// tag and slots it probes), each one a trip to memory for an index of this size. This
    /// starts the filters' words and the first link of the current generation's chain for
    /// `far`, the second link for `near` (whose first was started earlier), and the last for
    /// `nearest`, so by the time a hash is inserted its loads have arrived, overlapped with the
    /// work in between. Only a hint: what it loads does not change any result.
    #[inline]
    pub fn prefetch(&self, far: &TxHash, near: &TxHash, nearest: &TxHash) {
        self.previous_filter.prefetch(far);
        self.current_filter.prefetch(far);
        self.current.prefetch_slot(far);
        self.current.prefetch_part(near);
        self.current.prefetch_entry(nearest);
    }

    /// The previous and the current generation, taken apart.
    pub fn into_generations(self) -> (TxIndex<V>, TxIndex<V>) {
        (self.previous, self.current)
    }

    /// The current (newer) generation.
    pub fn current(&self) -> &TxIndex<V> {
        &self.current
    }

    /// The previous (older) generation: empty, or exactly `generation` entries.
    pub fn previous(&self) -> &TxIndex<V> {
        &self.previous
    }
}

impl<V: Copy + Default + PartialEq + Send + Sync> PartialEq for Window<V> {
    fn eq(&self, other: &Self) -> bool {
        self.generation == other.generation
            && self.current == other.current
            && self.previous == other.previous
    }
}

impl<V: Copy + Default + PartialEq + Send + Sync> Eq for Window<V> {}

/// How many hashes ahead of the one being inserted [`Window::prefetch`] should start loading.
pub const PREFETCH_AHEAD: usize = 16;

/// Brings the cache line at `at` towards the core (a hint; never faults).
#[inline(always)]
pub(crate) fn prefetch(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults, whatever the address.
    #[allow(unused_unsafe)]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// The part an entry with 64-bit hash `hash` lives in. A [`Table`] picks the first slot from the
/// hash's low bits and the tag from the top 7, so the part comes from bits 32..48 to stay
/// independent of both (a part with 2^32 slots is far beyond any index here).
fn part_of(hash: u64) -> usize {
    (hash >> 32) as usize & (PARTS - 1)
}

#[cfg(test)]
mod table_tests {
    use std::collections::HashMap;

    use super::tests::h as key;
    use super::*;

    #[test]
    fn a_table_agrees_with_a_map_through_growth_and_clearing() {
        let hasher = TxHasher::new();
        let mut table: Table<u64> = Table::with_capacity(0);
        let mut model = HashMap::new();
        for round in 0..2 {
            for i in 0..5_000u64 {
                // Most steps with i % 3 == 2 repeat an earlier key (refused, the first value
                // kept); the model says which.
                let k = key(if i % 3 == 2 { i / 3 } else { i });
                let got = table.insert_new(hasher.hash(&k), k, i + round, &hasher);
                match model.get(&k) {
                    Some(&first) => assert_eq!(got, Err(first)),
                    None => {
                        assert_eq!(got, Ok(()));
                        model.insert(k, i + round);
                    }
                }
                assert!(table.len() * 4 <= table.tags.len() * 3, "load over 3/4");
            }
            assert_eq!(table.len(), model.len());
            for (k, v) in &model {
                assert_eq!(table.get(hasher.hash(k), k), Some(*v));
            }
            for i in 5_000..6_000u64 {
                let k = key(i);
                assert_eq!(table.get(hasher.hash(&k), &k), None);
            }
            let seen: HashMap<TxHash, u64> = table.iter().map(|(k, v)| (*k, *v)).collect();
            assert_eq!(seen, model);
            let slots = table.tags.len();
            table.clear();
            assert!(table.is_empty());
            assert_eq!(table.iter().count(), 0);
            assert_eq!(table.tags.len(), slots, "clearing keeps the slots");
            model.clear();
        }
    }

    #[test]
    fn prefetching_empty_and_unwritten_parts_is_harmless() {
        let mut w: Window<u64> = Window::new(4);
        let (a, b, c) = (key(1), key(2), key(3));
        w.prefetch(&a, &b, &c);
        w.insert_new(a, 1).unwrap();
        w.prefetch(&a, &b, &c);
        assert_eq!(w.get(&a), Some(1));
        assert_eq!(w.get(&b), None);
    }

    #[test]
    fn keys_that_probe_the_same_slots_are_told_apart() {
        // Eight slots hold six keys (load 3/4) without growing; under one hash (same start
        // slot, same tag) only the keys themselves tell the entries apart.
        let hasher = TxHasher::new();
        let mut table: Table<u64> = Table::with_slots(8);
        let keys: Vec<TxHash> = (0..7).map(key).collect();
        let same = 0x8000_0000_0000_0003u64;
        for (i, k) in keys[..6].iter().enumerate() {
            assert_eq!(table.insert_new(same, *k, i as u64, &hasher), Ok(()));
        }
        assert_eq!(table.tags.len(), 8, "no growth at 6 of 8");
        for (i, k) in keys[..6].iter().enumerate() {
            assert_eq!(table.get(same, k), Some(i as u64));
            assert_eq!(table.insert_new(same, *k, 99, &hasher), Err(i as u64));
        }
        assert_eq!(
            table.tags.len(),
            8,
            "a refused duplicate at full load does not grow"
        );
        assert_eq!(table.get(same, &keys[6]), None);
        // The seventh grows the table (re-placed under their real hashes) and keeps them all.
        assert_eq!(table.insert_new(same, keys[6], 6, &hasher), Ok(()));
        assert_eq!(table.tags.len(), 16);
        assert_eq!(table.len(), 7);
        assert_eq!(table.get(same, &keys[6]), Some(6));
        for (i, k) in keys[..6].iter().enumerate() {
            assert_eq!(table.get(hasher.hash(k), k), Some(i as u64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn h(i: u64) -> TxHash {
        TxHash::of(&i.to_le_bytes())
    }

    /// An index of keys `h(0..1_500)` (value `i`), and a clone of it taken after the first
    /// 1,000: the parts written since are no longer shared with the clone.
    fn index_and_earlier_clone() -> (TxIndex<u64>, TxIndex<u64>) {
        let mut index = TxIndex::new();
        for i in 0..1_000u64 {
            index.insert_new(h(i), i).unwrap();
        }
        let copy = index.clone();
        for i in 1_000..1_500u64 {
            index.insert_new(h(i), i).unwrap();
        }
        (index, copy)
    }

    #[test]
    fn a_recycled_index_is_empty_and_leaves_its_clones_alone() {
        // Half the parts written after the clone: those are no longer shared and get reused.
        let (index, copy) = index_and_earlier_clone();
        let tables = |index: &TxIndex<u64>| -> Vec<*const Table<u64>> {
            index
                .parts
                .iter()
                .map(|p| p.as_ref().map_or(std::ptr::null(), Arc::as_ptr))
                .collect()
        };
        let before = tables(&index);
        let mut recycled = index;
        recycled.recycle();
        // Nothing is touched up front; everything reads as empty.
        assert_eq!(tables(&recycled), before);
        assert_eq!((recycled.len(), recycled.iter().count()), (0, 0));
        assert!((0..1_500u64).all(|i| recycled.get(&h(i)).is_none()));
        assert_eq!(recycled.clone().into_entries().count(), 0);
        assert_eq!(recycled, TxIndex::new());
        // The clone still holds what it held.
        assert_eq!(copy.len(), 1_000);
        assert!((0..1_000u64).all(|i| copy.get(&h(i)) == Some(i)));
        // The recycled index takes entries again, in the tables it had where no clone shares
        // them (no copy of a stale table), in fresh ones where the clone does.
        let mut reused = 0;
        let mut replaced = 0;
        for i in 2_000..2_500u64 {
            assert_eq!(recycled.insert_new(h(i), i), Ok(()));
            let p = part_of(recycled.hasher.hash(&h(i)));
            let now = Arc::as_ptr(recycled.parts[p].as_ref().unwrap());
            if now == before[p] {
                reused += 1;
            } else {
                replaced += 1;
                let shared = copy.parts[p]
                    .as_ref()
                    .is_some_and(|c| Arc::as_ptr(c) == before[p]);
                assert!(
                    before[p].is_null() || shared,
                    "part {p}: only a shared table is replaced"
                );
            }
        }
        assert!(
            reused > 0 && replaced > 0,
            "{reused} reused, {replaced} replaced"
        );
        assert_eq!(recycled.insert_new(h(2_007), 70), Err(2_007));
        assert_eq!(recycled.len(), 500);
        let mut entries: Vec<(TxHash, u64)> = recycled.iter().map(|(k, v)| (*k, *v)).collect();
        let mut from_entries: Vec<(TxHash, u64)> = recycled.clone().into_entries().collect();
        entries.sort_by_key(|e| e.1);
        from_entries.sort_by_key(|e| e.1);
        assert_eq!(
            entries,
            (2_000..2_500u64).map(|i| (h(i), i)).collect::<Vec<_>>()
        );
        assert_eq!(from_entries, entries);
        assert!((0..1_500u64).all(|i| recycled.get(&h(i)).is_none()));
        assert!((0..1_000u64).all(|i| copy.get(&h(i)) == Some(i)));
        // Reserving after a recycle empties what it keeps and loses no current entry.
        recycled.recycle();
        recycled.insert_new(h(9), 9).unwrap();
        recycled.reserve(PARTS * 7);
        assert_eq!(recycled.len(), 1);
        assert_eq!(recycled.iter().count(), 1);
        assert_eq!(recycled.get(&h(9)), Some(9));
        assert!((2_000..2_500u64).all(|i| recycled.get(&h(i)).is_none()));
    }

    #[test]
    fn reserving_gives_every_unshared_part_its_room_and_keeps_every_entry() {
        let (mut index, copy) = index_and_earlier_clone();
        // Seven entries per part need 16 slots at the load bound of 3/4 (more than the 8 of a
        // part's first table).
        index.reserve(PARTS * 7);
        let mut shared = 0;
        for part in index.parts.iter() {
            let part = part.as_ref().expect("every part has a table");
            if Arc::strong_count(part) > 1 {
                shared += 1;
                assert!(part.tags.len() < 16, "a shared part is left as it was");
            } else {
                assert_eq!(part.tags.len(), 16);
            }
        }
        assert!(shared > 0 && shared < 1_000, "{shared} shared parts");
        assert_eq!(index.len(), 1_500);
        assert!((0..1_500u64).all(|i| index.get(&h(i)) == Some(i)));
        assert_eq!(copy.len(), 1_000);
        assert!((0..1_000u64).all(|i| copy.get(&h(i)) == Some(i)));
        // Filling towards the reserved size grows no reserved table (a quarter entry per part
        // more: no part comes near the 12 that 16 slots hold). A shared part, copied when first
        // written, keeps its 8 slots and may grow (6 entries fill it): not counted here.
        let reserved: Vec<usize> = (0..PARTS)
            .filter(|&i| {
                index.parts[i]
                    .as_ref()
                    .is_some_and(|p| Arc::strong_count(p) == 1)
            })
            .collect();
        assert_eq!(reserved.len(), PARTS - shared);
        for i in 1_500..1_500 + PARTS as u64 / 4 {
            index.insert_new(h(i), i).unwrap();
        }
        assert!(reserved
            .iter()
            .all(|&i| index.parts[i].as_ref().unwrap().tags.len() == 16));
        // Reserving again grows only the parts that were shared and have been copied since;
        // then every part has its room, and reserving again, or less, changes nothing.
        index.reserve(PARTS * 7);
        let unshared = |index: &TxIndex<u64>| {
            index
                .parts
                .iter()
                .flatten()
                .filter(|p| Arc::strong_count(p) == 1)
                .all(|p| p.tags.len() == 16)
        };
        assert!(unshared(&index));
        let slots = |index: &TxIndex<u64>| -> usize {
            index.parts.iter().flatten().map(|p| p.tags.len()).sum()
        };
        let reserved = slots(&index);
        index.reserve(PARTS * 7);
        index.reserve(PARTS);
        assert_eq!(slots(&index), reserved);
        assert!((0..1_500 + PARTS as u64 / 4).all(|i| index.get(&h(i)) == Some(i)));
    }

    /// `into_entries` yields every entry once, and lets go of each part of a clone once past
    /// it, so the live index it was cloned from owns its parts alone again as the clone is
    /// read, not only once it is dropped.
    #[test]
    fn into_entries_yields_every_entry_and_lets_go_of_each_part_once_read() {
        let mut live = TxIndex::new();
        for i in 0..5_000u64 {
            live.insert_new(h(i), i).unwrap();
        }
        let shared = |index: &TxIndex<u64>| {
            index
                .parts
                .iter()
                .flatten()
                .filter(|p| Arc::strong_count(p) > 1)
                .count()
        };
        let parts = live.parts.iter().flatten().count();
        let mut entries = live.clone().into_entries();
        assert_eq!(shared(&live), parts);
        let mut seen: Vec<(TxHash, u64)> = entries.by_ref().take(2_500).collect();
        let halfway = shared(&live);
        assert!(halfway > 0 && halfway < parts, "{halfway} of {parts}");
        seen.extend(entries.by_ref());
        assert_eq!(shared(&live), 0);
        seen.sort_unstable();
        let mut expected: Vec<(TxHash, u64)> = (0..5_000u64).map(|i| (h(i), i)).collect();
        expected.sort_unstable();
        assert_eq!(seen, expected);
        assert_eq!(TxIndex::<u64>::new().into_entries().count(), 0);
    }

    #[test]
    fn a_reserved_window_keeps_its_entries_and_rolls_over_as_before() {
        let mut reserved: Window<u64> = Window::new(50);
        let mut plain: Window<u64> = Window::new(50);
        for i in 0..30u64 {
            reserved.insert_new(h(i), i).unwrap();
            plain.insert_new(h(i), i).unwrap();
        }
        reserved.reserve();
        assert!(reserved.current.parts.iter().all(Option::is_some));
        assert!(reserved.previous.parts.iter().all(Option::is_some));
        assert_eq!(reserved, plain);
        for i in (0..200u64).chain(0..200) {
            assert_eq!(
                reserved.insert_new(h(i), i),
                plain.insert_new(h(i), i),
                "{i}"
            );
            assert_eq!(reserved, plain);
        }
    }

    #[test]
    fn a_filter_holds_every_inserted_hash_and_few_others() {
        let mut f = Filter::new(10_000);
        for i in 0..10_000u64 {
            f.insert(&h(i));
        }
        assert!(
            (0..10_000u64).all(|i| f.may_hold(&h(i))),
            "no false negative"
        );
        // 16 bits per entry, two bits per hash in one word: about 1.4% expected. Independent
        // of the random key up to noise far below this bound.
        let false_positives = (10_000..110_000u64).filter(|&i| f.may_hold(&h(i))).count();
        assert!(false_positives < 4_000, "{false_positives} of 100,000");
        f.clear();
        assert!((0..10_000u64).filter(|&i| f.may_hold(&h(i))).count() == 0);
    }

    #[test]
    fn a_filter_is_bounded_however_large_the_generation() {
        let f = Filter::new(u32::MAX as usize);
        assert_eq!(f.words.len(), Filter::WORDS_MAX);
        assert_eq!(Filter::new(0).words.len(), 1);
        assert_eq!(Filter::new(1 << 20).words.len(), 1 << 18);
    }

    #[test]
    fn a_clone_keeps_its_entries_while_the_original_rolls_over() {
        let mut w = Window::new(10);
        for i in 0..15u64 {
            w.insert_new(h(i), i).unwrap();
        }
        let copy = w.clone();
        // Two rollovers of the original: its filters are emptied and reused, the copy's are not.
        for i in 15..40u64 {
            w.insert_new(h(i), i).unwrap();
        }
        for i in 0..15u64 {
            assert_eq!(copy.get(&h(i)), Some(i), "{i}");
        }
        assert_eq!(copy.get(&h(20)), None);
        assert_eq!(w.get(&h(5)), None, "forgotten by the original");
        assert_eq!(w.get(&h(35)), Some(35));
        // A window rebuilt from the copy's generations answers as the copy does.
        let rebuilt = Window::from_generations(copy.previous().clone(), copy.current().clone(), 10);
        assert_eq!(rebuilt, copy);
        for i in 0..15u64 {
            assert_eq!(rebuilt.get(&h(i)), Some(i));
            assert_eq!(rebuilt.clone().insert_new(h(i), 99), Err(i));
        }
    }

    #[test]
    fn a_window_remembers_each_entry_for_at_least_a_generation_and_holds_at_most_two() {
        let mut w = Window::new(100);
        for i in 0..1_000u64 {
            assert_eq!(w.insert_new(h(i), i), Ok(()));
            assert!(w.len() <= 200);
            // Everything of the last `generation` insertions is remembered, with its value.
            for j in i.saturating_sub(99)..=i {
                assert_eq!(w.insert_new(h(j), j + 1), Err(j), "{j} after {i}");
            }
            assert!(w.previous().is_empty() || w.previous().len() == 100);
        }
        // After 1,000 insertions: [900, 1000) is the previous generation, [800, 900) is gone.
        assert_eq!((w.previous().len(), w.current().len()), (100, 0));
        assert_eq!(w.get(&h(900)), Some(900));
        assert_eq!(w.get(&h(899)), None, "forgotten after two generations");
        // A forgotten hash is new again.
        assert_eq!(w.insert_new(h(5), 77), Ok(()));
        // Same insertions, same window.
        let mut again = Window::new(100);
        for i in 0..1_000u64 {
            again.insert_new(h(i), i).unwrap();
        }
        again.insert_new(h(5), 77).unwrap();
        assert_eq!(again, w);
    }

    #[test]
    fn records_each_hash_once_and_keeps_the_first_value() {
        let mut index = TxIndex::new();
        for i in 0..10_000u64 {
            assert_eq!(index.insert_new(h(i), i), Ok(()));
        }
        assert_eq!(index.len(), 10_000);
        for i in 0..10_000u64 {
            assert_eq!(index.get(&h(i)), Some(i));
            assert_eq!(index.insert_new(h(i), i + 1), Err(i));
        }
        assert_eq!(index.len(), 10_000);
        assert_eq!(index.get(&h(10_000)), None);
        assert!(!index.contains_key(&h(10_001)));
        let mut seen: Vec<u64> = index.iter().map(|(_, v)| *v).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..10_000).collect::<Vec<_>>());
    }

    #[test]
    fn equality_is_by_content_whatever_the_keys() {
        let mut a = TxIndex::with_capacity(100);
        let mut b = TxIndex::new();
        for i in 0..500u64 {
            a.insert_new(h(i), i).unwrap();
            b.insert_new(h(499 - i), 499 - i).unwrap();
        }
        assert_eq!(a, b);
        b.insert_new(h(1_000), 0).unwrap();
        assert_ne!(a, b);
        a.insert_new(h(1_000), 1).unwrap();
        assert_ne!(a, b, "same keys, one value differs");
    }

    #[test]
    fn a_clone_is_unaffected_by_later_inserts_and_shares_until_written() {
        let mut index = TxIndex::new();
        for i in 0..5_000u64 {
            index.insert_new(h(i), i).unwrap();
        }
        let snapshot = index.clone();
        let shared = |a: &TxIndex<u64>, b: &TxIndex<u64>| {
            a.parts
                .iter()
                .zip(b.parts.iter())
                .filter(|(x, y)| match (x, y) {
                    (Some(x), Some(y)) => Arc::ptr_eq(x, y),
                    _ => false,
                })
                .count()
        };
        let used = index.parts.iter().flatten().count();
        assert_eq!(shared(&index, &snapshot), used);
        for i in 5_000..5_010u64 {
            index.insert_new(h(i), i).unwrap();
        }
        // Only the parts written since were copied.
        assert!(shared(&index, &snapshot) >= used - 10);
        assert_eq!(snapshot.len(), 5_000);
        assert_eq!(snapshot.get(&h(5_001)), None);
        assert_eq!(index.get(&h(5_001)), Some(5_001));
        for i in 0..5_000u64 {
            assert_eq!(snapshot.get(&h(i)), Some(i));
        }
    }

    #[test]
    fn entries_spread_over_the_parts() {
        let mut index = TxIndex::new();
        let n = PARTS as u64 * 16;
        for i in 0..n {
            index.insert_new(h(i), ()).unwrap();
        }
        let largest = index.parts.iter().flatten().map(|p| p.len()).max().unwrap();
        // 16 per part on average; a part with 4× that means the split is not doing its job.
        assert!(largest < 64, "largest part {largest}");
    }
}
