//! A batch: the Raft log entry. One leader-built header plus the transactions it orders, encoded
//! as a single zero-copy rkyv buffer that the WAL writes, replication sends and the state machine
//! reads in place.

use rkyv::munge::munge;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Archived, Deserialize, Serialize};

use crate::error::ModelError;
use crate::hash::keccak256;
use crate::limits::{BATCH_BYTES_MAX, BATCH_TXS_MAX};
use crate::merkle::MerkleAccumulator;
use crate::tx::{ArchivedTransaction, Transaction};

/// Length of the canonical header encoding hashed by `BatchHeader::digest`, in bytes.
pub const HEADER_DIGEST_INPUT_BYTES: usize = 8 + 8 + 32 + 32 + 4 + 8;

/// Leader-built batch header; its `digest()` is what the leader signs.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug), compare(PartialEq))]
pub struct BatchHeader {
    /// Raft term of the leader that appended the batch.
    pub term: u64,
    /// Raft log index of the batch.
    pub index: u64,
    /// `digest()` of the previous batch's header (all zero for the first batch).
    pub prev_batch_hash: [u8; 32],
    /// `merkle_root` of the batch's transaction hashes.
    pub tx_merkle_root: [u8; 32],
    /// Number of transactions in the batch.
    pub tx_count: u32,
    /// Leader wall-clock time when the batch was appended, microseconds since the Unix epoch.
    pub timestamp_us: u64,
}

/// One Raft log entry: a header and the transactions it orders.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug), compare(PartialEq))]
pub struct Batch {
    /// Leader-built header.
    pub header: BatchHeader,
    /// The ordered transactions; a transaction's offset here is its position within the batch.
    pub txs: Vec<Transaction>,
}

/// keccak256 of the canonical header layout (see `BatchHeader::digest`).
fn header_digest(
    term: u64,
    index: u64,
    prev_batch_hash: &[u8; 32],
    tx_merkle_root: &[u8; 32],
    tx_count: u32,
    timestamp_us: u64,
) -> [u8; 32] {
    keccak256(&header_digest_input(
        term,
        index,
        prev_batch_hash,
        tx_merkle_root,
        tx_count,
        timestamp_us,
    ))
}

/// The canonical header layout (see `BatchHeader::digest`).
fn header_digest_input(
    term: u64,
    index: u64,
    prev_batch_hash: &[u8; 32],
    tx_merkle_root: &[u8; 32],
    tx_count: u32,
    timestamp_us: u64,
) -> [u8; HEADER_DIGEST_INPUT_BYTES] {
    let mut input = [0u8; HEADER_DIGEST_INPUT_BYTES];
    input[0..8].copy_from_slice(&term.to_be_bytes());
    input[8..16].copy_from_slice(&index.to_be_bytes());
    input[16..48].copy_from_slice(prev_batch_hash);
    input[48..80].copy_from_slice(tx_merkle_root);
    input[80..84].copy_from_slice(&tx_count.to_be_bytes());
    input[84..92].copy_from_slice(&timestamp_us.to_be_bytes());
    input
}

impl BatchHeader {
    /// The canonical 92-byte big-endian encoding that `digest` hashes.
    pub fn digest_input(&self) -> [u8; HEADER_DIGEST_INPUT_BYTES] {
        header_digest_input(
            self.term,
            self.index,
            &self.prev_batch_hash,
            &self.tx_merkle_root,
            self.tx_count,
            self.timestamp_us,
        )
    }

    /// keccak256 of the canonical 92-byte big-endian header encoding, independent of rkyv:
    ///
    /// `term u64 ‖ index u64 ‖ prev_batch_hash [32] ‖ tx_merkle_root [32] ‖ tx_count u32 ‖
    /// timestamp_us u64`, i.e. Solidity's
    /// `keccak256(abi.encodePacked(uint64, uint64, bytes32, bytes32, uint32, uint64))`.
    pub fn digest(&self) -> [u8; 32] {
        header_digest(
            self.term,
            self.index,
            &self.prev_batch_hash,
            &self.tx_merkle_root,
            self.tx_count,
            self.timestamp_us,
        )
    }
}

impl ArchivedBatchHeader {
    /// Same value as `BatchHeader::digest` of the header this was archived from.
    pub fn digest(&self) -> [u8; 32] {
        header_digest(
            self.term.to_native(),
            self.index.to_native(),
            &self.prev_batch_hash,
            &self.tx_merkle_root,
            self.tx_count.to_native(),
            self.timestamp_us.to_native(),
        )
    }

    /// Copies the (fixed-size) header out of the archive.
    pub fn to_native(&self) -> BatchHeader {
        BatchHeader {
            term: self.term.to_native(),
            index: self.index.to_native(),
            prev_batch_hash: self.prev_batch_hash,
            tx_merkle_root: self.tx_merkle_root,
            tx_count: self.tx_count.to_native(),
            timestamp_us: self.timestamp_us.to_native(),
        }
    }
}

impl Batch {
    /// A batch of `txs` whose header counts them and commits to their Merkle root; the leader's
    /// fields (term, index, timestamp) as given, no previous-batch hash yet.
    pub fn new(txs: Vec<Transaction>, term: u64, index: u64, timestamp_us: u64) -> Batch {
        let header = BatchHeader {
            term,
            index,
            prev_batch_hash: [0; 32],
            tx_merkle_root: [0; 32],
            tx_count: txs.len() as u32,
            timestamp_us,
        };
        let mut batch = Batch { header, txs };
        batch.header.tx_merkle_root = batch.compute_tx_merkle_root();
        batch
    }

    /// `merkle_root` of the transactions' hashes, to fill `header.tx_merkle_root`.
    pub fn compute_tx_merkle_root(&self) -> [u8; 32] {
        let mut acc = MerkleAccumulator::new();
        for tx in &self.txs {
            acc.push(&tx.tx_hash());
        }
        acc.root()
    }
}

impl ArchivedBatch {
    /// `merkle_root` of the archived transactions' hashes, computed in place.
    pub fn compute_tx_merkle_root(&self) -> [u8; 32] {
        let mut acc = MerkleAccumulator::new();
        for tx in self.txs.iter() {
            acc.push(&tx.tx_hash());
        }
        acc.root()
    }
}

/// Checks the count limits shared by the owned and archived batch.
fn check_counts(header_tx_count: u32, actual: usize) -> Result<(), ModelError> {
    if actual > BATCH_TXS_MAX {
        return Err(ModelError::TooManyTxs {
            count: actual,
            max: BATCH_TXS_MAX,
        });
    }
    if header_tx_count as usize != actual {
        return Err(ModelError::CountMismatch {
            header: header_tx_count,
            actual,
        });
    }
    Ok(())
}

/// Checks an encoded length against `BATCH_BYTES_MAX`.
fn check_encoded_len(len: usize) -> Result<(), ModelError> {
    if len > BATCH_BYTES_MAX {
        return Err(ModelError::BatchTooLarge {
            len,
            max: BATCH_BYTES_MAX,
        });
    }
    Ok(())
}

/// Semantic checks on an archive that bytecheck already accepted.
fn check_archived(batch: &ArchivedBatch) -> Result<(), ModelError> {
    check_counts(batch.header.tx_count.to_native(), batch.txs.len())?;
    batch.txs.iter().try_for_each(ArchivedTransaction::validate)
}

/// Encodes `batch` into a fresh buffer; see `encode_batch_into`.
pub fn encode_batch(batch: &Batch) -> Result<AlignedVec, ModelError> {
    let mut buf = AlignedVec::new();
    encode_batch_into(batch, &mut buf)?;
    Ok(buf)
}

/// Encodes `batch` into `buf` (cleared first, capacity kept), after checking every limit.
///
/// Rejects a batch whose header `tx_count` differs from `txs.len()`, with more than
/// `BATCH_TXS_MAX` transactions, with an invalid transaction, or whose encoding exceeds
/// `BATCH_BYTES_MAX`. On error `buf` is left cleared or holds a partial encoding; reuse it freely.
pub fn encode_batch_into<const ALIGNMENT: usize>(
    batch: &Batch,
    buf: &mut AlignedVec<ALIGNMENT>,
) -> Result<(), ModelError> {
    // Readers access the archive in place, so the buffer must be aligned for its root.
    const { assert!(ALIGNMENT >= core::mem::align_of::<ArchivedBatch>()) };
    buf.clear();
    check_counts(batch.header.tx_count, batch.txs.len())?;
    let mut payload_bytes = 0usize;
    for tx in &batch.txs {
        tx.validate()?;
        payload_bytes = payload_bytes.saturating_add(tx.bytes.len());
    }
    // The payloads alone are a lower bound on the encoding: refuse before serializing.
    check_encoded_len(payload_bytes)?;
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(batch, &mut *buf)
        .map_err(|source| ModelError::Encode { source })?;
    check_encoded_len(buf.len())?;
    debug_assert!(
        access_batch(buf).is_ok(),
        "encoder output must pass validation"
    );
    Ok(())
}

/// Validated zero-copy access to an encoded batch from an untrusted source (disk, network).
///
/// Runs bytecheck over the whole buffer, then the semantic checks: length at most
/// `BATCH_BYTES_MAX`, at most `BATCH_TXS_MAX` transactions, header `tx_count` equal to the
/// number of transactions, every transaction within its limits. `bytes` must be aligned like the
/// encoder's `AlignedVec` (at least `align_of::<ArchivedBatch>()`); misaligned input is rejected
/// as `Malformed`. The Merkle root is not recomputed here; see `compute_tx_merkle_root`.
pub fn access_batch(bytes: &[u8]) -> Result<&ArchivedBatch, ModelError> {
    check_encoded_len(bytes.len())?;
    let batch = rkyv::access::<ArchivedBatch, rancor::Error>(bytes)
        .map_err(|source| ModelError::Malformed { source })?;
    check_archived(batch)?;
    Ok(batch)
}

/// Zero-copy access without any check.
///
/// # Safety
///
/// `bytes` must be exactly a buffer produced by `encode_batch`/`encode_batch_into` (and possibly
/// `patch_header`) in this process, unchanged since, for example just written and checksummed.
/// Bytes from disk or the network must go through `access_batch` instead.
pub unsafe fn access_batch_unchecked(bytes: &[u8]) -> &ArchivedBatch {
    // SAFETY: the caller guarantees `bytes` is a valid, aligned archive of `Batch`.
    unsafe { rkyv::access_unchecked::<ArchivedBatch>(bytes) }
}

/// Fills the header fields the leader learns on Raft append, in place, without re-encoding.
///
/// The buffer is validated exactly as by `access_batch` first; the transactions and the other
/// header fields (`tx_merkle_root`, `tx_count`) are not touched.
pub fn patch_header(
    bytes: &mut [u8],
    term: u64,
    index: u64,
    prev_batch_hash: [u8; 32],
    timestamp_us: u64,
) -> Result<(), ModelError> {
    check_encoded_len(bytes.len())?;
    let batch = rkyv::access_mut::<ArchivedBatch, rancor::Error>(bytes)
        .map_err(|source| ModelError::Malformed { source })?;
    check_archived(&batch)?;
    munge!(let ArchivedBatch { header, .. } = batch);
    munge!(let ArchivedBatchHeader {
        term: mut term_slot,
        index: mut index_slot,
        prev_batch_hash: mut prev_slot,
        timestamp_us: mut timestamp_slot,
        ..
    } = header);
    *term_slot = Archived::<u64>::from_native(term);
    *index_slot = Archived::<u64>::from_native(index);
    *prev_slot = prev_batch_hash;
    *timestamp_slot = Archived::<u64>::from_native(timestamp_us);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::TX_BYTES_MAX;
    use crate::tx_kind::TxKind;
    use proptest::prelude::*;

    fn tx(i: usize, len: usize) -> Transaction {
        Transaction {
            rollup_id: i as u64 % 3,
            kind: if i.is_multiple_of(2) {
                TxKind::Raw
            } else {
                TxKind::Encrypted {
                    key_commitment: [i as u8; 32],
                }
            },
            bytes: vec![i as u8; len],
        }
    }

    fn batch_of(txs: Vec<Transaction>) -> Batch {
        let mut batch = Batch {
            header: BatchHeader {
                term: 3,
                index: 17,
                prev_batch_hash: [0xaa; 32],
                tx_merkle_root: [0; 32],
                tx_count: txs.len() as u32,
                timestamp_us: 1_700_000_000_000_000,
            },
            txs,
        };
        batch.header.tx_merkle_root = batch.compute_tx_merkle_root();
        batch
    }

    fn small_batch() -> Batch {
        batch_of((0..5).map(|i| tx(i, 10 + i)).collect())
    }

    #[test]
    fn header_digest_is_keccak_of_documented_layout() {
        let header = BatchHeader {
            term: 0x0102_0304_0506_0708,
            index: 0x1112_1314_1516_1718,
            prev_batch_hash: [0x21; 32],
            tx_merkle_root: [0x31; 32],
            tx_count: 0x4142_4344,
            timestamp_us: 0x5152_5354_5556_5758,
        };
        let mut expected = Vec::new();
        expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        expected.extend_from_slice(&[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]);
        expected.extend_from_slice(&[0x21; 32]);
        expected.extend_from_slice(&[0x31; 32]);
        expected.extend_from_slice(&[0x41, 0x42, 0x43, 0x44]);
        expected.extend_from_slice(&[0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58]);
        assert_eq!(expected.len(), HEADER_DIGEST_INPUT_BYTES);
        assert_eq!(header.digest(), keccak256(&expected));
    }

    #[test]
    fn archived_header_digest_and_root_match_owned() {
        let batch = small_batch();
        let bytes = encode_batch(&batch).unwrap();
        let archived = access_batch(&bytes).unwrap();
        assert_eq!(archived.header.digest(), batch.header.digest());
        assert_eq!(archived.header.to_native(), batch.header);
        assert_eq!(
            archived.compute_tx_merkle_root(),
            batch.header.tx_merkle_root
        );
        // SAFETY: `bytes` was just produced by `encode_batch` and not modified.
        let unchecked = unsafe { access_batch_unchecked(&bytes) };
        assert_eq!(unchecked, &batch);
    }

    #[test]
    fn encode_into_reuses_buffer() {
        let big = batch_of((0..100).map(|i| tx(i, 100)).collect());
        let mut buf = AlignedVec::<4096>::new();
        encode_batch_into(&big, &mut buf).unwrap();
        let capacity = buf.capacity();
        let small = small_batch();
        encode_batch_into(&small, &mut buf).unwrap();
        assert_eq!(buf.capacity(), capacity);
        assert_eq!(access_batch(&buf).unwrap(), &small);
        assert_eq!(buf.as_slice(), encode_batch(&small).unwrap().as_slice());
    }

    #[test]
    fn patch_header_sets_fields_and_leaves_the_rest() {
        let batch = small_batch();
        let original = encode_batch(&batch).unwrap();
        let mut bytes = original.clone();
        patch_header(&mut bytes, 9, 12345, [0x55; 32], 42).unwrap();

        let archived = access_batch(&bytes).unwrap();
        let header = archived.header.to_native();
        let expected = BatchHeader {
            term: 9,
            index: 12345,
            prev_batch_hash: [0x55; 32],
            timestamp_us: 42,
            ..batch.header
        };
        assert_eq!(header, expected);
        assert_eq!(archived.header.digest(), expected.digest());
        assert_eq!(archived.txs, batch.txs);

        // Every changed byte lies inside the archived header.
        let header_start =
            (&archived.header as *const ArchivedBatchHeader as usize) - (bytes.as_ptr() as usize);
        let header_end = header_start + core::mem::size_of::<ArchivedBatchHeader>();
        for (at, (before, after)) in original.iter().zip(bytes.iter()).enumerate() {
            if before != after {
                assert!(
                    (header_start..header_end).contains(&at),
                    "byte {at} changed"
                );
            }
        }
    }

    #[test]
    fn patch_header_rejects_garbage() {
        let mut garbage = AlignedVec::<16>::new();
        garbage.extend_from_slice(&[0xff; 64]);
        assert!(patch_header(&mut garbage, 1, 1, [0; 32], 1).is_err());
    }

    #[test]
    fn empty_batch_round_trips() {
        let batch = batch_of(vec![]);
        assert_eq!(batch.header.tx_merkle_root, keccak256(b""));
        let bytes = encode_batch(&batch).unwrap();
        assert_eq!(access_batch(&bytes).unwrap(), &batch);
    }

    #[test]
    fn count_mismatch_rejected_on_encode_and_access() {
        let mut batch = small_batch();
        batch.header.tx_count = 4;
        assert!(matches!(
            encode_batch(&batch),
            Err(ModelError::CountMismatch {
                header: 4,
                actual: 5
            })
        ));
        // Forge the same mismatch in an encoded buffer.
        batch.header.tx_count = 5;
        let mut bytes = encode_batch(&batch).unwrap();
        let seal = rkyv::access_mut::<ArchivedBatch, rancor::Error>(&mut bytes).unwrap();
        munge!(let ArchivedBatch { header, .. } = seal);
        munge!(let ArchivedBatchHeader { mut tx_count, .. } = header);
        *tx_count = Archived::<u32>::from_native(6);
        assert!(matches!(
            access_batch(&bytes),
            Err(ModelError::CountMismatch {
                header: 6,
                actual: 5
            })
        ));
    }

    #[test]
    fn invalid_txs_rejected() {
        let empty = batch_of(vec![tx(0, 1), tx(1, 0)]);
        assert!(matches!(encode_batch(&empty), Err(ModelError::EmptyTx)));
        let oversized = batch_of(vec![tx(0, TX_BYTES_MAX + 1)]);
        assert!(matches!(
            encode_batch(&oversized),
            Err(ModelError::TxTooLarge { .. })
        ));
    }

    #[test]
    fn too_many_txs_rejected() {
        let batch = batch_of((0..=BATCH_TXS_MAX).map(|i| tx(i, 1)).collect());
        assert!(matches!(
            encode_batch(&batch),
            Err(ModelError::TooManyTxs { count, max })
                if count == BATCH_TXS_MAX + 1 && max == BATCH_TXS_MAX
        ));
    }

    #[test]
    fn oversized_batch_rejected() {
        let per_tx = TX_BYTES_MAX;
        let n = BATCH_BYTES_MAX / per_tx + 1;
        let batch = batch_of((0..n).map(|i| tx(i, per_tx)).collect());
        assert!(matches!(
            encode_batch(&batch),
            Err(ModelError::BatchTooLarge { max, .. }) if max == BATCH_BYTES_MAX
        ));
        let mut huge = AlignedVec::<16>::new();
        huge.resize(BATCH_BYTES_MAX + 1, 0);
        assert!(matches!(
            access_batch(&huge),
            Err(ModelError::BatchTooLarge { .. })
        ));
    }

    #[test]
    fn batch_of_max_payload_fits_after_overhead_check() {
        // Payloads exactly at the limit leave no room for rkyv overhead: rejected after encoding.
        let per_tx = TX_BYTES_MAX;
        let n = BATCH_BYTES_MAX / per_tx;
        let batch = batch_of((0..n).map(|i| tx(i, per_tx)).collect());
        assert!(matches!(
            encode_batch(&batch),
            Err(ModelError::BatchTooLarge { len, .. }) if len > BATCH_BYTES_MAX
        ));
    }

    fn arb_tx() -> impl Strategy<Value = Transaction> {
        let kind = prop_oneof![
            Just(TxKind::Raw),
            any::<[u8; 32]>().prop_map(|key_commitment| TxKind::Encrypted { key_commitment }),
        ];
        (
            any::<u64>(),
            kind,
            prop::collection::vec(any::<u8>(), 1..300),
        )
            .prop_map(|(rollup_id, kind, bytes)| Transaction {
                rollup_id,
                kind,
                bytes,
            })
    }

    fn arb_batch(txs_max: usize) -> impl Strategy<Value = Batch> {
        (
            any::<(u64, u64, [u8; 32], u64)>(),
            prop::collection::vec(arb_tx(), 0..txs_max),
        )
            .prop_map(|((term, index, prev_batch_hash, timestamp_us), txs)| {
                let mut batch = Batch {
                    header: BatchHeader {
                        term,
                        index,
                        prev_batch_hash,
                        tx_merkle_root: [0; 32],
                        tx_count: txs.len() as u32,
                        timestamp_us,
                    },
                    txs,
                };
                batch.header.tx_merkle_root = batch.compute_tx_merkle_root();
                batch
            })
    }

    /// Exercises every read path of an accepted archive; must not panic whatever the bytes.
    fn touch(bytes: &[u8]) {
        if let Ok(batch) = access_batch(bytes) {
            let _ = batch.header.digest();
            let _ = batch.compute_tx_merkle_root();
            for tx in batch.txs.iter() {
                let _ = (tx.tx_hash(), tx.rollup_id(), tx.kind.key_commitment());
            }
        }
    }

    fn aligned(bytes: &[u8]) -> AlignedVec {
        let mut buf = AlignedVec::with_capacity(bytes.len());
        buf.extend_from_slice(bytes);
        buf
    }

    #[derive(Debug, Clone)]
    enum Corruption {
        Flip(Vec<(usize, u8)>),
        Truncate(usize),
        Extend(Vec<u8>),
    }

    fn arb_corruption() -> impl Strategy<Value = Corruption> {
        prop_oneof![
            prop::collection::vec((any::<usize>(), 1u8..), 1..8).prop_map(Corruption::Flip),
            any::<usize>().prop_map(Corruption::Truncate),
            prop::collection::vec(any::<u8>(), 1..64).prop_map(Corruption::Extend),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn round_trip(batch in arb_batch(200)) {
            let bytes = encode_batch(&batch).unwrap();
            let archived = access_batch(&bytes).unwrap();
            prop_assert_eq!(archived, &batch);
            prop_assert_eq!(archived.header.to_native(), batch.header);
            prop_assert_eq!(archived.header.digest(), batch.header.digest());
            prop_assert_eq!(archived.compute_tx_merkle_root(), batch.header.tx_merkle_root);
            for (a, t) in archived.txs.iter().zip(&batch.txs) {
                prop_assert_eq!(a.tx_hash(), t.tx_hash());
            }
        }

        #[test]
        fn patch_then_access(
            batch in arb_batch(20),
            fields in any::<(u64, u64, [u8; 32], u64)>(),
        ) {
            let (term, index, prev, ts) = fields;
            let mut bytes = encode_batch(&batch).unwrap();
            patch_header(&mut bytes, term, index, prev, ts).unwrap();
            let archived = access_batch(&bytes).unwrap();
            let expected = BatchHeader {
                term,
                index,
                prev_batch_hash: prev,
                timestamp_us: ts,
                ..batch.header
            };
            prop_assert_eq!(archived.header.to_native(), expected);
            prop_assert_eq!(&archived.txs, &batch.txs);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn corrupted_batch_never_panics(batch in arb_batch(20), corruption in arb_corruption()) {
            let encoded = encode_batch(&batch).unwrap();
            let mut bytes = encoded.as_slice().to_vec();
            match corruption {
                Corruption::Flip(flips) => {
                    for (at, mask) in flips {
                        let len = bytes.len();
                        bytes[at % len] ^= mask;
                    }
                }
                Corruption::Truncate(at) => bytes.truncate(at % bytes.len()),
                Corruption::Extend(tail) => bytes.extend_from_slice(&tail),
            }
            let buf = aligned(&bytes);
            touch(&buf);
            let mut patched = buf.clone();
            let _ = patch_header(&mut patched, 1, 2, [3; 32], 4);
            // Misaligned views of the same bytes must be rejected or read safely too.
            if buf.len() > 1 {
                touch(&buf[1..]);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            touch(&aligned(&bytes));
            touch(&bytes);
        }
    }
}
