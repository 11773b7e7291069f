//! Keccak-256 of many independent messages at once: eight per permutation with AVX-512.
//!
//! Hashing was the largest single cost of a node (a third of every cycle of a loaded 3-node
//! cluster): each transaction hash, Merkle leaf and Merkle node is one Keccak-f[1600]
//! permutation, and the permutation is a chain of dependent 64-bit operations that keeps a core
//! far from busy. The messages of a batch are independent, so eight of them go through one
//! permutation in the eight 64-bit lanes of AVX-512 registers: native 64-bit rotates
//! (`vprolq`) and a three-input logic instruction (`vpternlogq`) do θ and χ in fewer
//! instructions than the scalar code needs for one message.
//!
//! Only single-block messages (at most [`SINGLE_BLOCK_BYTES_MAX`] bytes: transactions up to
//! 135 bytes, every leaf and node hash) take the wide path; longer messages, lone leftovers and
//! CPUs without AVX-512F are hashed one at a time with `tiny-keccak`. Results are identical
//! either way (property-tested against `tiny-keccak`).

use crate::hash::keccak256;

/// Keccak-256's rate: bytes absorbed per permutation.
const RATE_BYTES: usize = 136;
/// 64-bit words per rate block.
const RATE_WORDS: usize = RATE_BYTES / 8;
/// Longest message that fits one padded block (the pad takes at least one byte).
pub const SINGLE_BLOCK_BYTES_MAX: usize = RATE_BYTES - 1;
/// Messages per wide permutation.
const LANES: usize = 8;
/// Below this many messages a wide permutation costs more than the scalar ones.
const WIDE_MIN: usize = 3;

/// Keccak-256 of each message, in order, appended to `out`.
pub fn keccak256_many<'a, I>(msgs: I, out: &mut Vec<[u8; 32]>)
where
    I: IntoIterator<Item = &'a [u8]>,
{
    hash_all(Group::new(wide_available()), msgs, out)
}

fn hash_all<'a, I>(mut group: Group, msgs: I, out: &mut Vec<[u8; 32]>)
where
    I: IntoIterator<Item = &'a [u8]>,
{
    for msg in msgs {
        if msg.len() <= SINGLE_BLOCK_BYTES_MAX && group.wide {
            out.push([0; 32]);
            group.push(out, msg.len(), |block| {
                block[..msg.len()].copy_from_slice(msg)
            });
        } else {
            out.push(keccak256(msg));
        }
    }
    group.finish(out);
}

/// Merkle leaf hashes `keccak256(0x00 ‖ tx_hash)` (see `merkle`), appended to `out`.
pub fn leaf_hashes(tx_hashes: &[crate::hash::TxHash], out: &mut Vec<[u8; 32]>) {
    let mut group = Group::new(wide_available());
    for h in tx_hashes {
        out.push([0; 32]);
        group.push(out, 33, |block| {
            block[0] = crate::merkle::LEAF_PREFIX;
            block[1..33].copy_from_slice(h.as_bytes());
        });
    }
    group.finish(out);
}

/// Merkle node hashes `keccak256(0x01 ‖ left ‖ right)` of consecutive pairs of `children`
/// (whose length must be even), appended to `out`.
pub fn node_hashes(children: &[[u8; 32]], out: &mut Vec<[u8; 32]>) {
    debug_assert!(
        children.len().is_multiple_of(2),
        "node_hashes takes whole pairs"
    );
    let mut group = Group::new(wide_available());
    for pair in children.chunks_exact(2) {
        out.push([0; 32]);
        group.push(out, 65, |block| {
            block[0] = crate::merkle::NODE_PREFIX;
            block[1..33].copy_from_slice(&pair[0]);
            block[33..65].copy_from_slice(&pair[1]);
        });
    }
    group.finish(out);
}

/// Up to eight padded single-block messages waiting for one wide permutation, stored word-major
/// (`words[j][k]` is word `j` of message `k`) so each state lane loads with one instruction.
struct Group {
    /// The wide path is available on this CPU.
    wide: bool,
    words: [[u64; LANES]; RATE_WORDS],
    /// Where in `out` each waiting message's hash goes.
    slots: [usize; LANES],
    /// Kept per message for the scalar fallback of a small last group.
    blocks: [[u8; RATE_BYTES]; LANES],
    lens: [usize; LANES],
    len: usize,
}

impl Group {
    fn new(wide: bool) -> Group {
        Group {
            wide,
            words: [[0; LANES]; RATE_WORDS],
            slots: [0; LANES],
            blocks: [[0; RATE_BYTES]; LANES],
            lens: [0; LANES],
            len: 0,
        }
    }

    /// Adds the message that `write` puts at the start of a zeroed block, `msg_len` bytes
    /// long, whose hash goes to the last entry of `out` (already pushed).
    fn push(&mut self, out: &mut [[u8; 32]], msg_len: usize, write: impl FnOnce(&mut [u8])) {
        debug_assert!(msg_len <= SINGLE_BLOCK_BYTES_MAX);
        let slot = out.len() - 1;
        if !self.wide {
            let mut block = [0u8; RATE_BYTES];
            write(&mut block);
            out[slot] = keccak256(&block[..msg_len]);
            return;
        }
        let k = self.len;
        let block = &mut self.blocks[k];
        block.fill(0);
        write(block);
        self.lens[k] = msg_len;
        self.slots[k] = slot;
        self.len += 1;
        if self.len == LANES {
            self.run(out);
        }
    }

    /// Hashes the waiting messages (all of them, any count).
    fn finish(mut self, out: &mut [[u8; 32]]) {
        if self.len >= WIDE_MIN {
            self.run(out);
        } else {
            for k in 0..self.len {
                out[self.slots[k]] = keccak256(&self.blocks[k][..self.lens[k]]);
            }
            self.len = 0;
        }
    }

    fn run(&mut self, out: &mut [[u8; 32]]) {
        for k in 0..self.len {
            let block = &mut self.blocks[k];
            // Keccak (not SHA-3) padding: 0x01 after the message, 0x80 in the last byte.
            block[self.lens[k]] ^= 0x01;
            block[RATE_BYTES - 1] ^= 0x80;
            for (j, word) in block.chunks_exact(8).enumerate() {
                self.words[j][k] = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            }
        }
        // Unused lanes hash whatever is left there; their results are dropped.
        let digests = permute_x8(&self.words);
        for k in 0..self.len {
            let out = &mut out[self.slots[k]];
            for (j, chunk) in out.chunks_exact_mut(8).enumerate() {
                chunk.copy_from_slice(&digests[j][k].to_le_bytes());
            }
        }
        self.len = 0;
    }
}

/// Whether this CPU runs the wide permutation.
fn wide_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Absorbs one block per lane into the zero state, permutes, and returns the first four state
/// words of each lane (the 32-byte digests, word-major).
fn permute_x8(words: &[[u64; LANES]; RATE_WORDS]) -> [[u64; LANES]; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        debug_assert!(wide_available());
        // SAFETY: only reached when `wide_available()` said the CPU has AVX-512F (`Group`
        // takes the scalar path otherwise).
        unsafe { x86::permute_x8(words) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = words;
        unreachable!("the wide path is x86-64 only")
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{LANES, RATE_WORDS};

    const ROUND_CONSTANTS: [u64; 24] = [
        0x0000_0000_0000_0001,
        0x0000_0000_0000_8082,
        0x8000_0000_0000_808A,
        0x8000_0000_8000_8000,
        0x0000_0000_0000_808B,
        0x0000_0000_8000_0001,
        0x8000_0000_8000_8081,
        0x8000_0000_0000_8009,
        0x0000_0000_0000_008A,
        0x0000_0000_0000_0088,
        0x0000_0000_8000_8009,
        0x0000_0000_8000_000A,
        0x0000_0000_8000_808B,
        0x8000_0000_0000_008B,
        0x8000_0000_0000_8089,
        0x8000_0000_0000_8003,
        0x8000_0000_0000_8002,
        0x8000_0000_0000_0080,
        0x0000_0000_0000_800A,
        0x8000_0000_8000_000A,
        0x8000_0000_8000_8081,
        0x8000_0000_0000_8080,
        0x0000_0000_8000_0001,
        0x8000_0000_8000_8008,
    ];

    /// `a ^ b ^ c`.
    const XOR3: i32 = 0x96;
    /// `a ^ (!b & c)`: Keccak's χ.
    const CHI: i32 = 0xD2;

    /// See `super::permute_x8`. State lane `x + 5y` of all eight messages is `a[x + 5y]`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn permute_x8(words: &[[u64; LANES]; RATE_WORDS]) -> [[u64; LANES]; 4] {
        let mut a = [_mm512_setzero_si512(); 25];
        for (lane, w) in a.iter_mut().zip(words) {
            // SAFETY: `w` is 8 u64s, exactly one unaligned 512-bit load.
            *lane = unsafe { _mm512_loadu_si512(w.as_ptr().cast()) };
        }
        for rc in ROUND_CONSTANTS {
            round(&mut a, rc);
        }
        let mut out = [[0u64; LANES]; 4];
        for (w, lane) in out.iter_mut().zip(&a) {
            // SAFETY: `w` is 8 u64s, exactly one unaligned 512-bit store.
            unsafe { _mm512_storeu_si512(w.as_mut_ptr().cast(), *lane) };
        }
        out
    }

    /// One round on the state `a`. Every index is a constant (the loops are written out by
    /// macros), so the state stays in registers: a first version that applied θ in a loop over
    /// `a` with `i % 5` kept the state on the stack, with a load, a store and two multiplies
    /// per lane and round.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn round(a: &mut [__m512i; 25], rc: u64) {
        // θ: column parities, and what each column takes in from its neighbours'.
        let c: [__m512i; 5] = [0, 1, 2, 3, 4].map(|x| {
            let t = _mm512_ternarylogic_epi64::<XOR3>(a[x], a[x + 5], a[x + 10]);
            _mm512_ternarylogic_epi64::<XOR3>(t, a[x + 15], a[x + 20])
        });
        let d = [
            _mm512_xor_si512(c[4], _mm512_rol_epi64::<1>(c[1])),
            _mm512_xor_si512(c[0], _mm512_rol_epi64::<1>(c[2])),
            _mm512_xor_si512(c[1], _mm512_rol_epi64::<1>(c[3])),
            _mm512_xor_si512(c[2], _mm512_rol_epi64::<1>(c[4])),
            _mm512_xor_si512(c[3], _mm512_rol_epi64::<1>(c[0])),
        ];
        // θ's sum, ρ and π: lane (x, y) takes in d[x], is rotated by its offset and moves to
        // (y, 2x + 3y).
        let mut b = [_mm512_setzero_si512(); 25];
        macro_rules! theta_rho_pi {
            ($($x:literal $y:literal $r:literal),* $(,)?) => {$(
                b[$y + 5 * ((2 * $x + 3 * $y) % 5)] =
                    _mm512_rol_epi64::<$r>(_mm512_xor_si512(a[$x + 5 * $y], d[$x]));
            )*};
        }
        b[0] = _mm512_xor_si512(a[0], d[0]);
        theta_rho_pi!(
                    1 0 1,  2 0 62, 3 0 28, 4 0 27,
            0 1 36, 1 1 44, 2 1 6,  3 1 55, 4 1 20,
            0 2 3,  1 2 10, 2 2 43, 3 2 25, 4 2 39,
            0 3 41, 1 3 45, 2 3 15, 3 3 21, 4 3 8,
            0 4 18, 1 4 2,  2 4 61, 3 4 56, 4 4 14,
        );
        // χ along each row, then ι.
        macro_rules! chi {
            ($($x:literal $y:literal),* $(,)?) => {$(
                a[$x + 5 * $y] = _mm512_ternarylogic_epi64::<CHI>(
                    b[$x + 5 * $y],
                    b[($x + 1) % 5 + 5 * $y],
                    b[($x + 2) % 5 + 5 * $y],
                );
            )*};
        }
        chi!(
            0 0, 1 0, 2 0, 3 0, 4 0,
            0 1, 1 1, 2 1, 3 1, 4 1,
            0 2, 1 2, 2 2, 3 2, 4 2,
            0 3, 1 3, 2 3, 3 3, 4 3,
            0 4, 1 4, 2 4, 3 4, 4 4,
        );
        a[0] = _mm512_xor_si512(a[0], _mm512_set1_epi64(rc as i64));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::hash::TxHash;
    use crate::merkle::{leaf_hash, node_hash};

    fn scalar_all(msgs: &[Vec<u8>]) -> Vec<[u8; 32]> {
        msgs.iter().map(|m| keccak256(m)).collect()
    }

    #[test]
    fn known_vectors_through_the_wide_path() {
        // Eight copies fill one wide group; the same answer as the scalar known vectors.
        let msgs: Vec<&[u8]> = vec![b"abc"; 8];
        let mut out = Vec::new();
        keccak256_many(msgs, &mut out);
        let abc = "0x4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45";
        for h in &out {
            assert_eq!(TxHash(*h).to_string(), abc);
        }
        let mut out = Vec::new();
        keccak256_many(vec![&b""[..]; 5], &mut out);
        assert!(out.iter().all(|h| *h == keccak256(b"")));
    }

    #[test]
    fn every_single_block_length_matches_scalar() {
        // 0..=135 covers the pad landing in every byte, including 0x81 in the last one, and
        // 136 is the first two-block message (scalar fallback inside a group).
        let msgs: Vec<Vec<u8>> = (0..=137usize)
            .map(|n| (0..n).map(|i| (i * 7 + n) as u8).collect())
            .collect();
        let mut out = Vec::new();
        keccak256_many(msgs.iter().map(Vec::as_slice), &mut out);
        assert_eq!(out, scalar_all(&msgs));
    }

    #[test]
    fn appends_after_what_out_already_holds() {
        let mut out = vec![[7u8; 32]];
        keccak256_many(vec![&b"x"[..]; 9], &mut out);
        assert_eq!(out[0], [7u8; 32]);
        assert_eq!(out.len(), 10);
        assert!(out[1..].iter().all(|h| *h == keccak256(b"x")));
    }

    #[test]
    fn the_scalar_fallback_gives_the_same_hashes() {
        // What a CPU without AVX-512F runs, checked on any CPU.
        let msgs: Vec<Vec<u8>> = (0..=140usize).map(|n| vec![n as u8; n]).collect();
        let mut out = Vec::new();
        hash_all(Group::new(false), msgs.iter().map(Vec::as_slice), &mut out);
        assert_eq!(out, scalar_all(&msgs));
    }

    #[test]
    fn trees_over_precomputed_leaves_match_the_accumulator() {
        let txs: Vec<TxHash> = (0..70u32).map(|i| TxHash::of(&i.to_le_bytes())).collect();
        let mut scratch = Vec::new();
        for n in 0..txs.len() {
            let leaves: Vec<[u8; 32]> = txs[..n].iter().map(leaf_hash).collect();
            let expected = crate::merkle::merkle_root(&txs[..n]);
            assert_eq!(
                crate::merkle::root_of_leaf_hashes(&leaves, &mut scratch),
                expected
            );
            assert_eq!(crate::merkle::MerkleTree::new(&txs[..n]).root(), expected);
        }
    }

    proptest! {
        #[test]
        fn any_messages_match_scalar(msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..40)) {
            let mut out = Vec::new();
            keccak256_many(msgs.iter().map(Vec::as_slice), &mut out);
            prop_assert_eq!(out, scalar_all(&msgs));
        }

        #[test]
        fn leaf_and_node_hashes_match_scalar(raw in prop::collection::vec(any::<[u8; 32]>(), 0..40)) {
            let txs: Vec<TxHash> = raw.iter().copied().map(TxHash).collect();
            let mut leaves = Vec::new();
            leaf_hashes(&txs, &mut leaves);
            let expected: Vec<[u8; 32]> = txs.iter().map(leaf_hash).collect();
            prop_assert_eq!(&leaves, &expected);
            let even = &raw[..raw.len() / 2 * 2];
            let mut nodes = Vec::new();
            node_hashes(even, &mut nodes);
            let expected: Vec<[u8; 32]> =
                even.chunks_exact(2).map(|p| node_hash(&p[0], &p[1])).collect();
            prop_assert_eq!(nodes, expected);
        }
    }
}
