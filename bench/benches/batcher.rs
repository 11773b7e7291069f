//! Micro-benchmark of the shard's batch builder: push 10k × 128-byte transactions (validate,
//! keccak256, dedup, copy into the batch buffer) and seal them (rkyv array + root, Merkle root),
//! reported per transaction (elements) and per payload byte.

use std::hint::black_box;
use std::time::Duration;

use baton_core::{BatchPolicy, Batcher, IncomingTx, PushOutcome, TxKind};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Transactions pushed per iteration.
const BENCH_TXS: usize = 10_000;
/// Payload size of each transaction, in bytes.
const BENCH_TX_BYTES: usize = 128;
/// Dedup window: larger than one iteration, so every push probes and inserts.
const BENCH_DEDUP_CAPACITY: usize = 1 << 16;

/// Distinct payloads, so that no push is a duplicate within an iteration.
fn payloads() -> Vec<u8> {
    (0..BENCH_TXS * BENCH_TX_BYTES)
        .map(|i| (i / BENCH_TX_BYTES * 31 + i * 7) as u8)
        .collect()
}

/// Pushes every payload and drains all sealed batches; returns the number of batches.
fn push_and_seal(batcher: &mut Batcher, payloads: &[u8]) -> usize {
    let mut batches = 0;
    for (i, bytes) in payloads.chunks_exact(BENCH_TX_BYTES).enumerate() {
        let tx = IncomingTx {
            rollup_id: (i % 4) as u64,
            kind: TxKind::Raw,
            bytes,
        };
        let outcome = batcher.push(tx, 0).expect("bench tx is valid");
        debug_assert!(matches!(outcome, PushOutcome::Accepted { .. }));
        while let Some(sealed) = batcher.poll_seal(0) {
            black_box(&sealed.bytes);
            batches += 1;
        }
    }
    while let Some(sealed) = batcher.seal_now() {
        black_box(&sealed.bytes);
        batches += 1;
    }
    batches
}

fn batcher(c: &mut Criterion) {
    let payloads = payloads();
    let policy = BatchPolicy::default();
    let mut group = c.benchmark_group("batcher_push_seal_10k_x128");
    group.throughput(Throughput::Elements(BENCH_TXS as u64));
    group.bench_function("txs", |b| {
        b.iter_batched_ref(
            // A fresh batcher each iteration: every payload is new to the dedup window.
            || Batcher::new(policy, BENCH_DEDUP_CAPACITY).expect("valid policy"),
            |batcher| black_box(push_and_seal(batcher, black_box(&payloads))),
            criterion::BatchSize::LargeInput,
        )
    });
    group.throughput(Throughput::Bytes(payloads.len() as u64));
    group.bench_function("bytes", |b| {
        b.iter_batched_ref(
            || Batcher::new(policy, BENCH_DEDUP_CAPACITY).expect("valid policy"),
            |batcher| black_box(push_and_seal(batcher, black_box(&payloads))),
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = batcher
}
criterion_main!(benches);
