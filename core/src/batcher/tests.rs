//! Unit and property tests of the batcher, driven with simulated time.

use proptest::prelude::*;

use super::*;
use crate::batch::{access_batch, encode_batch, patch_header, Batch};
use crate::limits::{BATCH_BYTES_MAX, BATCH_TXS_MAX};
use crate::tx::Transaction;

fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i.wrapping_mul(131) ^ j.wrapping_mul(7) ^ (i >> 8)) as u8)
        .collect()
}

fn kind(i: usize) -> TxKind {
    if i % 3 == 2 {
        TxKind::Encrypted {
            key_commitment: [i as u8; 32],
        }
    } else {
        TxKind::Raw
    }
}

fn incoming(i: usize, bytes: &[u8]) -> IncomingTx<'_> {
    IncomingTx {
        rollup_id: i as u64 % 4,
        kind: kind(i),
        bytes,
    }
}

fn policy(batch_bytes_max: usize, batch_txs_max: usize, linger_us: u64) -> BatchPolicy {
    BatchPolicy {
        batch_bytes_max,
        batch_txs_max,
        linger_us,
    }
}

fn accepted(outcome: Result<PushOutcome, SubmitRejection>) -> TxSlot {
    match outcome {
        Ok(PushOutcome::Accepted { slot, .. }) => slot,
        other => panic!("expected Accepted, got {other:?}"),
    }
}

fn slot(batch_seq: u64, offset_in_batch: u32) -> TxSlot {
    TxSlot {
        batch_seq,
        offset_in_batch,
    }
}

/// Checks everything a sealed batch promises and returns its transactions.
fn check_sealed(sealed: &SealedBatch, policy: &BatchPolicy) -> Vec<Transaction> {
    assert!(sealed.bytes.len() <= policy.batch_bytes_max);
    assert!(sealed.tx_count as usize <= policy.batch_txs_max);
    assert!(sealed.tx_count > 0);
    let archived = access_batch(&sealed.bytes).expect("sealed batch validates");
    let header = archived.header.to_native();
    assert_eq!(header.tx_count, sealed.tx_count);
    assert_eq!(header.tx_merkle_root, sealed.merkle_root);
    assert_eq!(archived.compute_tx_merkle_root(), sealed.merkle_root);
    assert_eq!((header.term, header.index, header.timestamp_us), (0, 0, 0));
    assert_eq!(header.prev_batch_hash, [0; 32]);
    let txs: Vec<Transaction> = archived
        .txs
        .iter()
        .map(|tx| rkyv::deserialize::<Transaction, rkyv::rancor::Error>(tx).unwrap())
        .collect();
    let hashes: Vec<TxHash> = txs.iter().map(Transaction::tx_hash).collect();
    assert_eq!(hashes, sealed.tx_hashes);
    // Byte for byte what the reference encoder writes for the same batch.
    let reference = Batch { header, txs };
    assert_eq!(
        encode_batch(&reference).unwrap().as_slice(),
        sealed.bytes.as_slice()
    );
    reference.txs
}

#[test]
fn default_policy_is_valid() {
    let default = BatchPolicy::default();
    default.validate().unwrap();
    assert_eq!(default.batch_bytes_max, 1024 * 1024);
    assert_eq!(default.linger_us, 500);
    assert!(Batcher::new(default, 1 << 16).is_ok());
}

#[test]
fn invalid_policies_rejected() {
    let min = BatchPolicy::batch_bytes_min();
    let cases = [
        (
            policy(BATCH_BYTES_MAX + 1, 10, 0),
            BatcherConfigError::BatchBytesTooLarge {
                value: BATCH_BYTES_MAX + 1,
                max: BATCH_BYTES_MAX,
            },
        ),
        (
            policy(min - 1, 10, 0),
            BatcherConfigError::BatchBytesTooSmall {
                value: min - 1,
                min,
            },
        ),
        (
            policy(min, 0, 0),
            BatcherConfigError::BatchTxsOutOfRange {
                value: 0,
                max: BATCH_TXS_MAX,
            },
        ),
        (
            policy(min, BATCH_TXS_MAX + 1, 0),
            BatcherConfigError::BatchTxsOutOfRange {
                value: BATCH_TXS_MAX + 1,
                max: BATCH_TXS_MAX,
            },
        ),
        (
            policy(min, 1, LINGER_US_MAX + 1),
            BatcherConfigError::LingerTooLong {
                value_us: LINGER_US_MAX + 1,
                max_us: LINGER_US_MAX,
            },
        ),
    ];
    for (policy, expected) in cases {
        assert_eq!(policy.validate(), Err(expected.clone()));
        assert_eq!(Batcher::new(policy, 0).err(), Some(expected));
    }
    policy(BATCH_BYTES_MAX, BATCH_TXS_MAX, LINGER_US_MAX)
        .validate()
        .unwrap();
    policy(min, 1, 0).validate().unwrap();
    assert_eq!(
        Batcher::new(BatchPolicy::default(), DEDUP_CAPACITY_MAX + 1).err(),
        Some(BatcherConfigError::DedupCapacityTooLarge {
            value: DEDUP_CAPACITY_MAX + 1,
            max: DEDUP_CAPACITY_MAX,
        })
    );
}

#[test]
fn seals_when_full_by_count() {
    let policy = policy(BATCH_BYTES_MAX, 3, 1_000);
    let mut batcher = Batcher::new(policy, 64).unwrap();
    let payloads: Vec<Vec<u8>> = (0..7).map(|i| payload(i, 20)).collect();
    for (i, bytes) in payloads.iter().enumerate().take(3) {
        assert_eq!(
            accepted(batcher.push(incoming(i, bytes), 10)),
            slot(0, i as u32)
        );
    }
    // Full by count: sealed at once, before any linger.
    assert_eq!(batcher.sealed_pending(), 1);
    assert_eq!(batcher.building_tx_count(), 0);
    let first = batcher.poll_seal(10).expect("sealed on count");
    assert_eq!((first.seq, first.tx_count), (0, 3));
    let txs = check_sealed(&first, &policy);
    assert_eq!(txs[1].bytes, payloads[1]);
    for (i, bytes) in payloads.iter().enumerate().skip(3) {
        let expected = slot(1 + (i as u64 - 3) / 3, (i as u32 - 3) % 3);
        assert_eq!(accepted(batcher.push(incoming(i, bytes), 11)), expected);
    }
    assert_eq!(batcher.poll_seal(11).unwrap().seq, 1);
    assert!(batcher.poll_seal(11).is_none());
    let last = batcher.seal_now().unwrap();
    assert_eq!((last.seq, last.tx_count), (2, 1));
    check_sealed(&last, &policy);
}

#[test]
fn seals_before_a_tx_that_would_exceed_bytes() {
    let len = 100;
    let fit = 5;
    // Exactly five 100-byte transactions fit: the limit is their encoded length.
    let bytes_max = encode::encoded_len(fit * len, fit);
    assert!(encode::encoded_len((fit + 1) * len, fit + 1) > bytes_max);
    let policy = policy(bytes_max, BATCH_TXS_MAX, 1_000);
    let mut batcher = Batcher::new(policy, 64).unwrap();
    let payloads: Vec<Vec<u8>> = (0..fit + 1).map(|i| payload(i, len)).collect();
    for (i, bytes) in payloads.iter().enumerate() {
        let expected = if i < fit {
            slot(0, i as u32)
        } else {
            slot(1, 0)
        };
        assert_eq!(accepted(batcher.push(incoming(i, bytes), 0)), expected);
    }
    let first = batcher.poll_seal(0).expect("sealed on bytes");
    assert_eq!(first.tx_count as usize, fit);
    assert_eq!(first.bytes.len(), bytes_max, "filled to exactly the limit");
    check_sealed(&first, &policy);
    assert_eq!(batcher.building_tx_count(), 1);
}

#[test]
fn bytes_limit_holds_for_mixed_sizes() {
    let policy = policy(8 * 1024, BATCH_TXS_MAX, 1_000);
    let mut batcher = Batcher::new(policy, 0).unwrap();
    let mut sealed = Vec::new();
    for i in 0..500 {
        let bytes = payload(i, 1 + (i * 37) % 3000);
        accepted(batcher.push(incoming(i, &bytes), 0));
        sealed.extend(batcher.poll_seal(0));
    }
    sealed.extend(batcher.seal_now());
    assert!(sealed.len() > 10);
    let total: u32 = sealed.iter().map(|b| b.tx_count).sum();
    assert_eq!(total, 500);
    for batch in &sealed {
        check_sealed(batch, &policy);
    }
}

#[test]
fn seals_on_linger() {
    let mut batcher = Batcher::new(policy(BATCH_BYTES_MAX, 100, 500), 64).unwrap();
    assert_eq!(batcher.next_deadline_us(), None);
    accepted(batcher.push(incoming(0, b"first"), 1_000));
    accepted(batcher.push(incoming(1, b"second"), 1_400));
    // The oldest transaction sets the deadline.
    assert_eq!(batcher.next_deadline_us(), Some(1_500));
    assert!(batcher.poll_seal(1_499).is_none());
    // A clock that went backwards is no reason to seal.
    assert!(batcher.poll_seal(0).is_none());
    let sealed = batcher.poll_seal(1_500).expect("lingered");
    assert_eq!(sealed.tx_count, 2);
    assert_eq!(batcher.next_deadline_us(), None);
    assert!(batcher.poll_seal(1_000_000).is_none());
    accepted(batcher.push(incoming(2, b"third"), 2_000));
    assert_eq!(batcher.next_deadline_us(), Some(2_500));
}

#[test]
fn zero_linger_seals_at_every_poll() {
    let mut batcher = Batcher::new(policy(BATCH_BYTES_MAX, 100, 0), 64).unwrap();
    accepted(batcher.push(incoming(0, b"a"), 7));
    assert_eq!(batcher.poll_seal(7).unwrap().tx_count, 1);
}

#[test]
fn forced_seal_and_empty_seals() {
    let mut batcher = Batcher::new(BatchPolicy::default(), 64).unwrap();
    assert!(batcher.seal_now().is_none());
    assert!(batcher.poll_seal(u64::MAX).is_none());
    accepted(batcher.push(incoming(0, b"x"), 5));
    let sealed = batcher.seal_now().expect("forced");
    assert_eq!((sealed.seq, sealed.tx_count), (0, 1));
    check_sealed(&sealed, batcher.policy());
    assert!(batcher.seal_now().is_none());
    assert!(batcher.poll_seal(u64::MAX).is_none());
    // Numbering continues after a forced seal.
    assert_eq!(accepted(batcher.push(incoming(1, b"y"), 6)), slot(1, 0));
}

#[test]
fn sealed_batches_come_out_in_order() {
    let mut batcher = Batcher::new(policy(BATCH_BYTES_MAX, 2, 100), 64).unwrap();
    for i in 0..9 {
        accepted(batcher.push(incoming(i, &payload(i, 8)), i as u64));
    }
    assert_eq!(batcher.sealed_pending(), 4);
    let mut seqs = Vec::new();
    while let Some(batch) = batcher.seal_now() {
        seqs.push(batch.seq);
    }
    assert_eq!(seqs, [0, 1, 2, 3, 4]);
}

#[test]
fn duplicates_within_and_across_batches() {
    let mut batcher = Batcher::new(policy(BATCH_BYTES_MAX, 3, 100), 64).unwrap();
    let a = payload(1, 40);
    let b = payload(2, 40);
    let first_a = accepted(batcher.push(incoming(1, &a), 0));
    assert_eq!(
        batcher.push(incoming(1, &a), 1),
        Ok(PushOutcome::Duplicate {
            tx_hash: TxHash::of(&a),
            first_seen: first_a,
        })
    );
    // Same bytes under another rollup or kind: still the same tx hash, still a duplicate.
    assert!(matches!(
        batcher.push(incoming(2, &a), 1),
        Ok(PushOutcome::Duplicate { first_seen, .. }) if first_seen == first_a
    ));
    accepted(batcher.push(incoming(2, &b), 2));
    let sealed = batcher.seal_now().unwrap();
    assert_eq!(sealed.tx_count, 2, "duplicates add nothing");
    assert_eq!(
        batcher.push(incoming(2, &b), 3),
        Ok(PushOutcome::Duplicate {
            tx_hash: TxHash::of(&b),
            first_seen: slot(0, 1),
        })
    );
    assert_eq!(batcher.building_tx_count(), 0);
}

#[test]
fn dedup_window_is_bounded_fifo() {
    let capacity = 4;
    let mut batcher = Batcher::new(BatchPolicy::default(), capacity).unwrap();
    let payloads: Vec<Vec<u8>> = (0..10).map(|i| payload(i, 16)).collect();
    for (i, bytes) in payloads.iter().enumerate() {
        accepted(batcher.push(incoming(i, bytes), 0));
        assert!(batcher.dedup_len() <= capacity);
    }
    assert_eq!(batcher.dedup_len(), capacity);
    // The newest four are remembered, the older ones evicted and accepted again.
    for (i, bytes) in payloads.iter().enumerate().skip(6) {
        assert!(matches!(
            batcher.push(incoming(i, bytes), 0),
            Ok(PushOutcome::Duplicate { first_seen, .. }) if first_seen == slot(0, i as u32)
        ));
    }
    assert_eq!(
        accepted(batcher.push(incoming(0, &payloads[0]), 0)),
        slot(0, 10)
    );
    assert_eq!(batcher.dedup_len(), capacity);
}

#[test]
fn zero_dedup_capacity_disables_dedup() {
    let mut batcher = Batcher::new(BatchPolicy::default(), 0).unwrap();
    accepted(batcher.push(incoming(0, b"same"), 0));
    assert_eq!(accepted(batcher.push(incoming(0, b"same"), 0)), slot(0, 1));
    assert_eq!(batcher.dedup_len(), 0);
}

#[test]
fn rejections_are_typed_and_record_nothing() {
    let small = policy(BatchPolicy::batch_bytes_min() + 64, 10, 100);
    let mut batcher = Batcher::new(small, 64).unwrap();
    assert_eq!(
        batcher.push(incoming(0, b""), 0),
        Err(SubmitRejection::EmptyTx)
    );
    let huge = vec![1u8; TX_BYTES_MAX + 1];
    assert_eq!(
        batcher.push(incoming(0, &huge), 0),
        Err(SubmitRejection::TxTooLarge {
            len: TX_BYTES_MAX + 1,
            max: TX_BYTES_MAX,
        })
    );
    let big = vec![2u8; 80];
    assert_eq!(
        batcher.push(incoming(0, &big), 0),
        Err(SubmitRejection::TxExceedsBatch {
            encoded_len: encode::encoded_len(80, 1),
            max: small.batch_bytes_max,
        })
    );
    assert_eq!(batcher.building_tx_count(), 0);
    assert_eq!(batcher.dedup_len(), 0);
    // The largest transaction the model allows fits the default policy.
    let mut default = Batcher::new(BatchPolicy::default(), 64).unwrap();
    accepted(default.push(incoming(0, &vec![3u8; TX_BYTES_MAX]), 0));
}

#[test]
fn full_sealed_queue_pushes_back() {
    let mut batcher = Batcher::new(policy(BATCH_BYTES_MAX, 1, 100), 64).unwrap();
    for i in 0..SEALED_QUEUE_MAX {
        accepted(batcher.push(incoming(i, &payload(i, 8)), 0));
    }
    let next = payload(1_000, 8);
    assert_eq!(
        batcher.push(incoming(0, &next), 0),
        Err(SubmitRejection::SealedQueueFull {
            max: SEALED_QUEUE_MAX
        })
    );
    // Duplicates are still answered while the queue is full.
    assert!(matches!(
        batcher.push(incoming(0, &payload(0, 8)), 0),
        Ok(PushOutcome::Duplicate { .. })
    ));
    assert_eq!(batcher.poll_seal(0).unwrap().seq, 0);
    assert_eq!(
        accepted(batcher.push(incoming(0, &next), 0)),
        slot(SEALED_QUEUE_MAX as u64, 0)
    );
}

#[test]
fn leader_can_patch_a_sealed_batch() {
    let mut batcher = Batcher::new(BatchPolicy::default(), 64).unwrap();
    for i in 0..10 {
        accepted(batcher.push(incoming(i, &payload(i, 50)), 0));
    }
    let mut sealed = batcher.seal_now().unwrap();
    patch_header(&mut sealed.bytes, 3, 99, [7; 32], 1_234).unwrap();
    let header = access_batch(&sealed.bytes).unwrap().header.to_native();
    assert_eq!(
        (header.term, header.index, header.timestamp_us),
        (3, 99, 1_234)
    );
    assert_eq!(header.tx_merkle_root, sealed.merkle_root);
    assert_eq!(header.tx_count, 10);
}

#[derive(Debug, Clone)]
enum Op {
    /// Push a fresh payload of this length, on this rollup, raw or encrypted.
    Push {
        len: usize,
        rollup_id: u64,
        encrypted: bool,
    },
    /// Push again the payload of an earlier push (index modulo the pushes so far).
    Repeat(usize),
    /// Advance the clock and poll.
    Poll { advance_us: u64 },
    /// Force a seal.
    SealNow,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..700, 0u64..4, any::<bool>())
            .prop_map(|(len, rollup_id, encrypted)| Op::Push { len, rollup_id, encrypted }),
        1 => any::<usize>().prop_map(Op::Repeat),
        2 => (0u64..400).prop_map(|advance_us| Op::Poll { advance_us }),
        1 => Just(Op::SealNow),
    ]
}

fn arb_policy() -> impl Strategy<Value = BatchPolicy> {
    (BatchPolicy::batch_bytes_min()..6_000, 1usize..24, 0u64..600).prop_map(
        |(batch_bytes_max, batch_txs_max, linger_us)| {
            policy(batch_bytes_max, batch_txs_max, linger_us)
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn any_pushes_and_seals_yield_valid_ordered_batches(
        policy in arb_policy(),
        dedup_capacity in 0usize..40,
        ops in prop::collection::vec(arb_op(), 0..120),
    ) {
        let mut batcher = Batcher::new(policy, dedup_capacity).unwrap();
        let mut now_us = 0u64;
        let mut pushed: Vec<Transaction> = Vec::new();
        // Accepted transactions in push order, with their slots.
        let mut expected: Vec<(Transaction, TxSlot)> = Vec::new();
        let mut sealed: Vec<SealedBatch> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            let tx = match op {
                Op::Push { len, rollup_id, encrypted } => {
                    let kind = if encrypted {
                        TxKind::Encrypted { key_commitment: [step as u8; 32] }
                    } else {
                        TxKind::Raw
                    };
                    Transaction { rollup_id, kind, bytes: payload(step, len) }
                }
                Op::Repeat(_) if pushed.is_empty() => continue,
                Op::Repeat(at) => pushed[at % pushed.len()].clone(),
                Op::Poll { advance_us } => {
                    now_us += advance_us;
                    while let Some(batch) = batcher.poll_seal(now_us) {
                        sealed.push(batch);
                    }
                    continue;
                }
                Op::SealNow => {
                    sealed.extend(batcher.seal_now());
                    continue;
                }
            };
            let incoming = IncomingTx { rollup_id: tx.rollup_id, kind: tx.kind.clone(), bytes: &tx.bytes };
            match batcher.push(incoming, now_us) {
                Ok(PushOutcome::Accepted { slot, tx_hash }) => {
                    prop_assert_eq!(tx_hash, tx.tx_hash());
                    expected.push((tx.clone(), slot));
                }
                Ok(PushOutcome::Duplicate { tx_hash, first_seen }) => {
                    prop_assert!(dedup_capacity > 0);
                    let first = expected.iter().find(|(_, s)| *s == first_seen);
                    prop_assert_eq!(first.map(|(t, _)| t.tx_hash()), Some(tx_hash));
                }
                Err(SubmitRejection::TxExceedsBatch { encoded_len, max }) => {
                    prop_assert!(encoded_len > max);
                }
                Err(SubmitRejection::SealedQueueFull { .. }) => {
                    prop_assert_eq!(batcher.sealed_pending(), SEALED_QUEUE_MAX);
                }
                Err(other) => prop_assert!(false, "unexpected rejection {:?}", other),
            }
            pushed.push(tx);
            prop_assert!(batcher.dedup_len() <= dedup_capacity);
            prop_assert!(batcher.sealed_pending() <= SEALED_QUEUE_MAX);
        }
        while let Some(batch) = batcher.seal_now() {
            sealed.push(batch);
        }

        let mut got: Vec<(Transaction, TxSlot)> = Vec::new();
        for (seq, batch) in sealed.iter().enumerate() {
            prop_assert_eq!(batch.seq, seq as u64);
            for (offset, tx) in check_sealed(batch, &policy).into_iter().enumerate() {
                got.push((tx, slot(batch.seq, offset as u32)));
            }
        }
        prop_assert_eq!(got, expected);
    }
}

#[test]
fn a_forgotten_transaction_is_accepted_again_and_a_stale_forget_is_ignored() {
    let mut b = Batcher::new(policy(1 << 20, 100, 500), 4).unwrap();
    let bytes = payload(1, 64);
    let first = accepted(b.push(incoming(1, &bytes), 0));
    assert!(matches!(
        b.push(incoming(1, &bytes), 1),
        Ok(PushOutcome::Duplicate { .. })
    ));
    let tx_hash = crate::hash::TxHash::of(&bytes);
    // Forgetting another slot than the one recorded changes nothing.
    b.forget(&tx_hash, slot(first.batch_seq + 7, 0));
    assert!(matches!(
        b.push(incoming(1, &bytes), 2),
        Ok(PushOutcome::Duplicate { .. })
    ));
    // Its batch failed: the retry is accepted, into a new slot.
    b.forget(&tx_hash, first);
    let again = accepted(b.push(incoming(1, &bytes), 3));
    assert_ne!(again, first);
    assert_eq!(b.dedup_len(), 1);
    // The stale queue entry of the first acceptance must not evict the re-accepted hash: fill
    // the window (capacity 4) until that entry is evicted.
    for i in 2..5 {
        accepted(b.push(incoming(i, &payload(i, 64)), 4));
    }
    assert!(
        matches!(b.push(incoming(1, &bytes), 5), Ok(PushOutcome::Duplicate { first_seen, .. }) if first_seen == again)
    );
}
