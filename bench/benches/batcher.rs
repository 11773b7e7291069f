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

/// A node's dedup window at its default size (2^20), full: every push looks its hash up,
/// inserts it and evicts the oldest, each in a random place of a ~60 MiB ring and table, which
/// is what a shard pays per transaction under sustained load. Hashes are precomputed (a pool of
/// 2^22, so each is long evicted when it comes round again) and handed to `push_hashed` with a
/// fixed payload: the hashing is measured by the group above, this one is about the window.
/// With and without the prefetch `engine::accept` issues 8 transactions ahead.
fn full_window(c: &mut Criterion) {
    use baton_core::TxHash;
    const WINDOW: usize = 1 << 20;
    const STEP: usize = 1 << 16;
    const AHEAD: usize = 8;
    let pool: Vec<TxHash> = (0..4 * WINDOW as u64)
        .map(|i| TxHash::of(&i.to_le_bytes()))
        .collect();
    let payload = [7u8; BENCH_TX_BYTES];
    let policy = BatchPolicy::default();
    let mut batcher = Batcher::new(policy, WINDOW).expect("valid policy");
    let mut next = 0usize;
    let mut push = |batcher: &mut Batcher, prefetch: bool| {
        for _ in 0..STEP {
            if prefetch {
                batcher.prefetch(&pool[(next + AHEAD) % pool.len()], AHEAD);
            }
            let tx = IncomingTx {
                rollup_id: 1,
                kind: TxKind::Raw,
                bytes: &payload,
            };
            let outcome = batcher
                .push_hashed(tx, pool[next % pool.len()], 0)
                .expect("bench tx is valid");
            debug_assert!(matches!(outcome, PushOutcome::Accepted { .. }));
            next += 1;
            while let Some(sealed) = batcher.poll_seal(0) {
                black_box(&sealed.bytes);
            }
        }
    };
    // Fill the window before timing.
    for _ in 0..WINDOW / STEP {
        push(&mut batcher, true);
    }
    let mut group = c.benchmark_group("batcher_full_dedup_window_65536");
    group.throughput(Throughput::Elements(STEP as u64));
    group.bench_function("prefetched", |b| b.iter(|| push(&mut batcher, true)));
    group.bench_function("plain", |b| b.iter(|| push(&mut batcher, false)));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = batcher, full_window
}
criterion_main!(benches);
