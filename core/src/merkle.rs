//! Binary Merkle tree over transaction hashes, in the shape of RFC 6962 / RFC 9162 §2.1.
//!
//! Hashing (all `keccak256`, `‖` is concatenation):
//! - leaf: `keccak256(0x00 ‖ tx_hash)` (33 bytes in),
//! - node: `keccak256(0x01 ‖ left ‖ right)` (65 bytes in),
//! - root of the empty tree: `keccak256("")` (no input bytes).
//!
//! Shape: for `n > 1` leaves, the left subtree holds the first `k` leaves, where `k` is the
//! largest power of two strictly less than `n`, and the right subtree holds the rest. The
//! prefixes keep a leaf from being passed off as a node (second-preimage defence).
//!
//! A proof's `path` lists sibling hashes from the leaf up to the root, as in RFC 9162 §2.1.3;
//! a subtree that is promoted to the next level unpaired contributes no path element.

use rkyv::{Archive, Deserialize, Serialize};
use tiny_keccak::{Hasher, Keccak};

use crate::error::ModelError;
use crate::hash::{keccak256, TxHash};

/// Domain-separation prefix of a leaf hash.
pub(crate) const LEAF_PREFIX: u8 = 0x00;
/// Domain-separation prefix of an interior node hash.
pub(crate) const NODE_PREFIX: u8 = 0x01;
/// Depth bound of the accumulator stack: one slot per bit of a `u64` leaf count.
const ACCUMULATOR_DEPTH_MAX: usize = 64;

/// `keccak256(0x00 ‖ tx_hash)`.
pub fn leaf_hash(tx_hash: &TxHash) -> [u8; 32] {
    let mut hasher = Keccak::v256();
    hasher.update(&[LEAF_PREFIX]);
    hasher.update(tx_hash.as_bytes());
    let mut out = [0u8; 32];
    hasher.finalize(&mut out);
    out
}

/// `keccak256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Keccak::v256();
    hasher.update(&[NODE_PREFIX]);
    hasher.update(left);
    hasher.update(right);
    let mut out = [0u8; 32];
    hasher.finalize(&mut out);
    out
}

/// Root of the tree with no leaves: `keccak256("")`.
pub fn empty_root() -> [u8; 32] {
    keccak256(b"")
}

/// Streaming Merkle root: push leaves in order, read the root at any time; no heap allocation.
///
/// Keeps the roots of the perfect subtrees seen so far (sizes are the set bits of the leaf
/// count, largest first); folding them right to left gives exactly the RFC 6962 root.
#[derive(Clone, Debug)]
pub struct MerkleAccumulator {
    /// Roots of complete subtrees, largest (leftmost) first; `count.count_ones()` are in use.
    stack: [[u8; 32]; ACCUMULATOR_DEPTH_MAX],
    /// Number of leaves pushed.
    count: u64,
}

/// Equal when they hold the same leaves: slots past the ones in use are scratch (how a state was
/// reached, one leaf at a time or many, leaves different bytes there).
impl PartialEq for MerkleAccumulator {
    fn eq(&self, other: &Self) -> bool {
        let used = self.count.count_ones() as usize;
        self.count == other.count && self.stack[..used] == other.stack[..used]
    }
}

impl Eq for MerkleAccumulator {}

impl Default for MerkleAccumulator {
    fn default() -> Self {
        Self::new()
    }
}

impl MerkleAccumulator {
    /// An accumulator with no leaves.
    pub fn new() -> Self {
        Self {
            stack: [[0u8; 32]; ACCUMULATOR_DEPTH_MAX],
            count: 0,
        }
    }

    /// Number of leaves pushed so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Appends the leaf for `tx_hash`.
    pub fn push(&mut self, tx_hash: &TxHash) {
        self.push_leaf_hash(leaf_hash(tx_hash));
    }

    /// Appends an already computed leaf hash (`leaf_hash(tx_hash)`).
    pub fn push_leaf_hash(&mut self, leaf: [u8; 32]) {
        // Each trailing one bit of the count is a complete subtree of the new leaf's size class
        // waiting on the stack for a right sibling.
        let mut depth = self.count.count_ones() as usize;
        let mut node = leaf;
        for _ in 0..self.count.trailing_ones() {
            depth -= 1;
            node = node_hash(&self.stack[depth], &node);
        }
        self.stack[depth] = node;
        self.count += 1;
        debug_assert_eq!(depth + 1, self.count.count_ones() as usize);
    }

    /// Appends many leaf hashes: the same state as pushing them one by one, but the node
    /// hashes of each level are computed together (several per permutation, `keccak_many`).
    pub fn push_leaf_hashes(&mut self, leaves: &[[u8; 32]]) {
        if leaves.len() < 4 {
            leaves.iter().for_each(|l| self.push_leaf_hash(*l));
            return;
        }
        let old = self.count;
        let new = old + leaves.len() as u64;
        // The subtree roots waiting at each level: old ones (by level), then what the run leaves.
        let mut waiting: [Option<[u8; 32]>; ACCUMULATOR_DEPTH_MAX] = [None; ACCUMULATOR_DEPTH_MAX];
        let depth = old.count_ones() as usize;
        for (k, level) in (0..ACCUMULATOR_DEPTH_MAX)
            .rev()
            .filter(|l| old >> l & 1 == 1)
            .enumerate()
        {
            waiting[level] = Some(self.stack[k]);
        }
        debug_assert_eq!(waiting.iter().flatten().count(), depth);
        // The run of nodes at `level` covers positions first.. of that level; a run starting at
        // an odd position begins with the right sibling of the waiting subtree of its level.
        let mut run = leaves.to_vec();
        let mut next = Vec::with_capacity(run.len() / 2 + 1);
        let mut first = old;
        let mut level = 0;
        while !run.is_empty() {
            next.clear();
            let mut rest = &run[..];
            if first & 1 == 1 {
                let left = waiting[level]
                    .take()
                    .expect("an odd start has a waiting left sibling");
                next.push(node_hash(&left, &rest[0]));
                rest = &rest[1..];
            }
            let pairs = rest.len() / 2 * 2;
            crate::keccak_many::node_hashes(&rest[..pairs], &mut next);
            if pairs < rest.len() {
                waiting[level] = Some(rest[pairs]);
            }
            std::mem::swap(&mut run, &mut next);
            first >>= 1;
            level += 1;
        }
        let mut k = 0;
        for level in (0..ACCUMULATOR_DEPTH_MAX).rev() {
            if let Some(node) = waiting[level] {
                debug_assert!(new >> level & 1 == 1, "a waiting subtree at every set bit");
                self.stack[k] = node;
                k += 1;
            }
        }
        self.count = new;
        debug_assert_eq!(k, new.count_ones() as usize);
    }

    /// The root of the leaves pushed so far.
    pub fn root(&self) -> [u8; 32] {
        let depth = self.count.count_ones() as usize;
        let Some((last, rest)) = self.stack[..depth].split_last() else {
            return empty_root();
        };
        rest.iter()
            .rev()
            .fold(*last, |right, left| node_hash(left, &right))
    }
}

/// Merkle root of `tx_hashes` (see module docs), without heap allocation.
pub fn merkle_root(tx_hashes: &[TxHash]) -> [u8; 32] {
    let mut acc = MerkleAccumulator::new();
    for tx_hash in tx_hashes {
        acc.push(tx_hash);
    }
    acc.root()
}

/// Inclusion proof of one leaf.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug), compare(PartialEq))]
pub struct MerkleProof {
    /// Index of the proven leaf.
    pub index: u32,
    /// Number of leaves in the tree.
    pub count: u32,
    /// Sibling hashes from the leaf level up to just below the root.
    pub path: Vec<[u8; 32]>,
}

/// Children copied out per call of `node_hashes` while a tree level is built (even).
const NODE_CHUNK: usize = 64;

/// Merkle root over precomputed leaf hashes (`leaf_hash(tx_hash)` each), level by level with
/// several hashes per permutation (`keccak_many`); `scratch` is reused between calls.
pub fn root_of_leaf_hashes(leaves: &[[u8; 32]], scratch: &mut Vec<[u8; 32]>) -> [u8; 32] {
    scratch.clear();
    scratch.reserve(leaves.len().saturating_mul(2));
    scratch.extend_from_slice(leaves);
    build_levels(scratch, |_| {});
    scratch.last().copied().unwrap_or_else(empty_root)
}

/// Appends to `nodes`, which holds one tree level, every level above it up to the root; calls
/// `level_end` with the end offset of each level added. Adjacent pairs are hashed, an unpaired
/// last node is promoted as is.
fn build_levels(nodes: &mut Vec<[u8; 32]>, mut level_end: impl FnMut(usize)) {
    let mut start = 0;
    while nodes.len() - start > 1 {
        let end = nodes.len();
        let pairs_end = start + (end - start) / 2 * 2;
        // `nodes` grows while the level is read, so its pairs are copied out in chunks; each
        // chunk's hashes are computed together (several per permutation).
        let mut i = start;
        while i < pairs_end {
            let chunk_end = (i + NODE_CHUNK).min(pairs_end);
            let mut pairs = [[0u8; 32]; NODE_CHUNK];
            let n = chunk_end - i;
            pairs[..n].copy_from_slice(&nodes[i..chunk_end]);
            crate::keccak_many::node_hashes(&pairs[..n], nodes);
            i = chunk_end;
        }
        if pairs_end < end {
            let promoted = nodes[pairs_end];
            nodes.push(promoted);
        }
        start = end;
        level_end(nodes.len());
    }
}

/// Nodes of the tree over `n` leaves, every level's: a level of `m` nodes has `⌈m/2⌉` above it
/// (an unpaired last node is promoted), so up to `2n - 1 + log2(n)`. A tree reserving only `2n`
/// (as it did) grew, copying itself, whenever promotions pushed it past that: 1,000 leaves make
/// 2,001 nodes.
fn tree_len(n: usize) -> usize {
    let (mut total, mut level) = (n, n);
    while level > 1 {
        level = level.div_ceil(2);
        total += level;
    }
    total
}

/// Largest power of two strictly less than `n`; `n` must be at least 2.
fn split_point(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// Checks `index < count` and that `count` fits the proof's `u32` fields.
fn proof_bounds(index: usize, count: usize) -> Result<(u32, u32), ModelError> {
    if index >= count {
        return Err(ModelError::ProofIndexOutOfRange { index, count });
    }
    let count_u32 = u32::try_from(count).map_err(|_| ModelError::TooManyTxs {
        count,
        max: u32::MAX as usize,
    })?;
    // index < count <= u32::MAX, so this cannot truncate.
    Ok((index as u32, count_u32))
}

/// Inclusion proof for `tx_hashes[index]`; O(n) hashing, one allocation for the path.
pub fn merkle_proof(tx_hashes: &[TxHash], index: usize) -> Result<MerkleProof, ModelError> {
    let (index_u32, count_u32) = proof_bounds(index, tx_hashes.len())?;
    let mut path = Vec::with_capacity(usize::BITS as usize);
    let (mut lo, mut hi) = (0usize, tx_hashes.len());
    // Descend from the root; siblings are found top-down, the proof lists them bottom-up.
    while hi - lo > 1 {
        let mid = lo + split_point(hi - lo);
        if index < mid {
            path.push(merkle_root(&tx_hashes[mid..hi]));
            hi = mid;
        } else {
            path.push(merkle_root(&tx_hashes[lo..mid]));
            lo = mid;
        }
    }
    path.reverse();
    Ok(MerkleProof {
        index: index_u32,
        count: count_u32,
        path,
    })
}

/// Whether `proof` shows that `tx_hash` is leaf `proof.index` of the tree with root `root`.
///
/// This is the RFC 9162 §2.1.3.2 verification algorithm with this module's hashing.
pub fn verify_proof(root: &[u8; 32], tx_hash: &TxHash, proof: &MerkleProof) -> bool {
    if proof.index >= proof.count {
        return false;
    }
    let mut fnode = proof.index;
    let mut snode = proof.count - 1;
    let mut hash = leaf_hash(tx_hash);
    for sibling in &proof.path {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            hash = node_hash(sibling, &hash);
            // Skip the levels where this subtree is promoted unpaired (it is a right edge).
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            hash = node_hash(&hash, sibling);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && hash == *root
}

/// A whole tree kept in memory, for handing out many proofs in O(log n) each.
///
/// Level by level: adjacent pairs are hashed, an unpaired last node is promoted as is. This
/// gives the same root and proofs as the recursive RFC 6962 definition.
#[derive(Clone, Debug)]
pub struct MerkleTree {
    /// All levels concatenated, leaves first, root last.
    nodes: Vec<[u8; 32]>,
    /// Start offset of each level in `nodes`, plus one final end offset.
    level_starts: Vec<usize>,
}

impl MerkleTree {
    /// Builds the tree over `tx_hashes` (about `2n` hashes of memory, allocated once).
    pub fn new(tx_hashes: &[TxHash]) -> Self {
        let count = tx_hashes.len();
        let mut nodes = Vec::with_capacity(tree_len(count));
        crate::keccak_many::leaf_hashes(tx_hashes, &mut nodes);
        let mut level_starts = vec![0, count];
        build_levels(&mut nodes, |end| level_starts.push(end));
        Self {
            nodes,
            level_starts,
        }
    }

    /// Number of leaves.
    pub fn count(&self) -> usize {
        self.level_starts[1]
    }

    /// Root hash; `empty_root()` for no leaves.
    pub fn root(&self) -> [u8; 32] {
        self.nodes.last().copied().unwrap_or_else(empty_root)
    }

    /// The leaf hashes, in order.
    pub fn leaves(&self) -> &[[u8; 32]] {
        &self.nodes[..self.count()]
    }

    /// Inclusion proof of leaf `index`.
    pub fn proof(&self, index: usize) -> Result<MerkleProof, ModelError> {
        let (index_u32, count_u32) = proof_bounds(index, self.count())?;
        let mut path = Vec::with_capacity(self.level_starts.len());
        let mut pos = index;
        for level in self.level_starts.windows(2) {
            let (start, end) = (level[0], level[1]);
            let sibling = pos ^ 1;
            if start + sibling < end {
                path.push(self.nodes[start + sibling]);
            }
            pos >>= 1;
        }
        Ok(MerkleProof {
            index: index_u32,
            count: count_u32,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hashes(n: usize) -> Vec<TxHash> {
        (0..n as u64)
            .map(|i| TxHash::of(&i.to_be_bytes()))
            .collect()
    }

    fn leaves(tx_hashes: &[TxHash]) -> Vec<[u8; 32]> {
        tx_hashes.iter().map(leaf_hash).collect()
    }

    #[test]
    fn a_tree_is_allocated_once_at_its_exact_size() {
        for n in [0, 1, 2, 3, 5, 7, 1000, 1023, 1024, 1025, 4097] {
            let tree = MerkleTree::new(&hashes(n));
            assert_eq!(tree.nodes.len(), tree_len(n), "{n} leaves");
            // `Vec::with_capacity` allocates exactly what it is asked for: a tree that had
            // outgrown its reservation would have doubled it.
            assert_eq!(tree.nodes.capacity(), tree.nodes.len(), "{n} leaves");
        }
        assert_eq!(tree_len(1000), 2001);
        assert_eq!(tree_len(1024), 2047);
    }

    #[test]
    fn leaf_and_node_hash_layout() {
        let h = TxHash([7; 32]);
        let mut leaf_input = vec![0x00];
        leaf_input.extend_from_slice(&[7; 32]);
        assert_eq!(leaf_hash(&h), keccak256(&leaf_input));

        let mut node_input = vec![0x01];
        node_input.extend_from_slice(&[1; 32]);
        node_input.extend_from_slice(&[2; 32]);
        assert_eq!(node_hash(&[1; 32], &[2; 32]), keccak256(&node_input));
    }

    #[test]
    fn small_trees_match_hand_derived_roots() {
        assert_eq!(merkle_root(&[]), keccak256(b""));
        let h = hashes(7);
        let l = leaves(&h);
        let n01 = node_hash(&l[0], &l[1]);
        let n23 = node_hash(&l[2], &l[3]);
        let n45 = node_hash(&l[4], &l[5]);
        let n0123 = node_hash(&n01, &n23);
        assert_eq!(merkle_root(&h[..1]), l[0]);
        assert_eq!(merkle_root(&h[..2]), n01);
        assert_eq!(merkle_root(&h[..3]), node_hash(&n01, &l[2]));
        assert_eq!(merkle_root(&h[..4]), n0123);
        assert_eq!(merkle_root(&h[..5]), node_hash(&n0123, &l[4]));
        assert_eq!(merkle_root(&h[..6]), node_hash(&n0123, &n45));
        assert_eq!(
            merkle_root(&h[..7]),
            node_hash(&n0123, &node_hash(&n45, &l[6]))
        );
    }

    #[test]
    fn small_proofs_match_hand_derived_paths() {
        let h = hashes(3);
        let l = leaves(&h);
        let n01 = node_hash(&l[0], &l[1]);
        assert_eq!(merkle_proof(&h, 0).unwrap().path, vec![l[1], l[2]]);
        assert_eq!(merkle_proof(&h, 1).unwrap().path, vec![l[0], l[2]]);
        assert_eq!(merkle_proof(&h, 2).unwrap().path, vec![n01]);
        assert!(merkle_proof(&h[..1], 0).unwrap().path.is_empty());
    }

    #[test]
    fn proof_index_out_of_range_rejected() {
        let h = hashes(3);
        assert!(matches!(
            merkle_proof(&h, 3),
            Err(ModelError::ProofIndexOutOfRange { index: 3, count: 3 })
        ));
        assert!(matches!(
            merkle_proof(&[], 0),
            Err(ModelError::ProofIndexOutOfRange { index: 0, count: 0 })
        ));
        assert!(MerkleTree::new(&h).proof(3).is_err());
    }

    #[test]
    fn empty_tree_root() {
        assert_eq!(MerkleTree::new(&[]).root(), empty_root());
        assert_eq!(MerkleAccumulator::new().root(), empty_root());
    }

    #[test]
    fn proof_with_extra_or_missing_path_elements_fails() {
        let h = hashes(5);
        let root = merkle_root(&h);
        let mut proof = merkle_proof(&h, 2).unwrap();
        assert!(verify_proof(&root, &h[2], &proof));
        proof.path.push([0; 32]);
        assert!(!verify_proof(&root, &h[2], &proof));
        proof.path.truncate(proof.path.len() - 2);
        assert!(!verify_proof(&root, &h[2], &proof));
    }

    #[test]
    fn pushing_many_leaves_equals_pushing_them_one_by_one() {
        // Every start count up to 70 and run length up to 70: odd and even starts, runs that
        // carry through several levels, runs that leave subtrees waiting.
        let leaves: Vec<[u8; 32]> = (0..140u32)
            .map(|i| leaf_hash(&TxHash::of(&i.to_le_bytes())))
            .collect();
        for start in 0..70 {
            for len in 0..70 {
                let mut one = MerkleAccumulator::new();
                leaves[..start].iter().for_each(|l| one.push_leaf_hash(*l));
                let mut many = one.clone();
                leaves[start..start + len]
                    .iter()
                    .for_each(|l| one.push_leaf_hash(*l));
                many.push_leaf_hashes(&leaves[start..start + len]);
                assert_eq!(many, one, "start {start}, len {len}");
                assert_eq!(many.root(), one.root());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn runs_of_any_size_equal_single_pushes(runs in prop::collection::vec(0usize..600, 1..6)) {
            let mut one = MerkleAccumulator::new();
            let mut many = MerkleAccumulator::new();
            let mut i = 0u32;
            for len in runs {
                let run: Vec<[u8; 32]> = (i..i + len as u32).map(|j| leaf_hash(&TxHash::of(&j.to_le_bytes()))).collect();
                i += len as u32;
                run.iter().for_each(|l| one.push_leaf_hash(*l));
                many.push_leaf_hashes(&run);
                prop_assert_eq!(&many, &one);
            }
        }

        #[test]
        fn every_proof_verifies_and_tampering_fails(n in 1usize..300, pick in any::<u64>()) {
            let h = hashes(n);
            let root = merkle_root(&h);
            let tree = MerkleTree::new(&h);
            prop_assert_eq!(tree.root(), root);
            for (i, tx_hash) in h.iter().enumerate() {
                let proof = merkle_proof(&h, i).unwrap();
                prop_assert_eq!(&tree.proof(i).unwrap(), &proof);
                prop_assert!(verify_proof(&root, tx_hash, &proof));
            }

            let i = (pick % n as u64) as usize;
            let proof = merkle_proof(&h, i).unwrap();
            let wrong_hash = TxHash::of(b"not in the tree");
            prop_assert!(!verify_proof(&root, &wrong_hash, &proof));
            if n > 1 {
                let mut wrong_index = proof.clone();
                wrong_index.index = ((i + 1) % n) as u32;
                prop_assert!(!verify_proof(&root, &h[i], &wrong_index));
                let mut tampered = proof.clone();
                let at = (pick >> 32) as usize % tampered.path.len();
                tampered.path[at][0] ^= 1;
                prop_assert!(!verify_proof(&root, &h[i], &tampered));
            }
        }
    }
}
