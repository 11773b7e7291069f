//! The state machine's costs that grow with the log, for a sequencer that has ordered a million
//! transactions: encoding a snapshot (every `snapshot_every_entries`, on the blocking pool), the
//! copy of the state the Raft shard makes for it, and applying one batch.

use std::hint::black_box;
use std::time::Duration;

use baton_core::sequencer::Sequencer;
use baton_core::{encode_batch_into, Batch, BatchHeader, Transaction, TxKind};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rkyv::util::AlignedVec;

/// Transactions per applied batch.
const BATCH_TXS: usize = 4_096;
/// Transactions ordered before the snapshot is taken.
const ORDERED_TXS: usize = 1 << 20;

fn encoded_batch(index: u64) -> AlignedVec<16> {
    let txs: Vec<Transaction> = (0..BATCH_TXS)
        .map(|i| {
            let mut bytes = vec![0u8; 128];
            bytes[..8].copy_from_slice(&index.to_le_bytes());
            bytes[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            Transaction {
                rollup_id: 1,
                kind: TxKind::Raw,
                bytes,
            }
        })
        .collect();
    let mut batch = Batch {
        header: BatchHeader {
            term: 1,
            index,
            prev_batch_hash: [0; 32],
            tx_merkle_root: [0; 32],
            tx_count: BATCH_TXS as u32,
            timestamp_us: 0,
        },
        txs,
    };
    batch.header.tx_merkle_root = batch.compute_tx_merkle_root();
    let mut buf = AlignedVec::<16>::new();
    encode_batch_into(&batch, &mut buf).expect("within limits");
    buf
}

fn sequencer(c: &mut Criterion) {
    let mut seq = Sequencer::default();
    let batches = (ORDERED_TXS / BATCH_TXS) as u64;
    for index in 1..=batches {
        seq.apply_batch(index, 1, &encoded_batch(index))
            .expect("valid batch");
    }
    let mut group = c.benchmark_group("sequencer");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(ORDERED_TXS as u64));
    group.bench_function("snapshot_bytes_1M_txs", |b| {
        b.iter(|| black_box(seq.snapshot_bytes()).len())
    });
    // What the Raft shard itself pays for a snapshot: the copy handed to the encoding thread.
    group.bench_function("clone_1M_txs", |b| b.iter(|| black_box(seq.clone())));
    // What the encoding thread does before it drops to the idle class: the index copied out of
    // the parts it shares with the live state (at nice 5 on a node, three nodes at once).
    group.bench_function("snapshot_copy_1M_txs", |b| {
        b.iter_batched(
            || seq.clone(),
            |copy| black_box(copy.into_snapshot_writer()),
            criterion::BatchSize::LargeInput,
        )
    });
    // Fresh batches applied one after another to the same (growing) sequencer; encoding them is
    // not timed.
    group.throughput(Throughput::Elements(BATCH_TXS as u64));
    let mut index = batches;
    group.bench_function("apply_4096_txs_at_1M", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                index += 1;
                let batch = encoded_batch(index);
                let start = std::time::Instant::now();
                seq.apply_batch(index, 1, &batch).expect("valid batch");
                spent += start.elapsed();
            }
            spent
        })
    });
    // The first batch applied after the snapshot copy, while the copy is alive: it copies the
    // index parts it writes to (copy-on-write), the cost a snapshot spreads over later applies.
    group.bench_function("apply_4096_txs_at_1M_first_after_snapshot_copy", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                index += 1;
                let batch = encoded_batch(index);
                let copy = seq.clone();
                let start = std::time::Instant::now();
                seq.apply_batch(index, 1, &batch).expect("valid batch");
                spent += start.elapsed();
                drop(copy);
            }
            spent
        })
    });
    group.finish();
}

/// The sequencer's index of recent transactions (`tx_index::Window`, 2^20 per generation) under
/// a stream of new hashes: what every node pays per ordered transaction when it applies a batch.
/// Median 34.6 ms per 65,536 (528 ns per insert) on the development VM. Creating each part with
/// room for its share (no growth) measured 19.9 ms (-48%), but moved neither the closed loop
/// (+2%, within noise) nor sequential 100-transaction requests, and cost 90 MiB more RSS per
/// node early in a generation: not kept then. Nodes now reserve the tables at start and fault
/// them in (`Window::reserve`; bench/README.md).
fn window(c: &mut Criterion) {
    use baton_core::tx_index::{Window, PREFETCH_AHEAD};
    use baton_core::TxHash;
    const GENERATION: usize = 1 << 20;
    const STEP: u64 = 1 << 16;
    let hashes: Vec<TxHash> = (0..4 * GENERATION as u64)
        .map(|i| TxHash::of(&i.to_le_bytes()))
        .collect();
    let mut group = c.benchmark_group("tx_window");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    // A new node's index: the first generation filled from empty, tables growing as it goes
    // (what a benchmark of a few seconds sees), prefetching as the state machine does.
    group.bench_function("fill_first_generation_prefetched", |b| {
        b.iter(|| {
            let mut w = Window::new(GENERATION);
            let at = |k: usize| &hashes[k.min(hashes.len() - 1)];
            for (k, h) in hashes[..GENERATION].iter().enumerate() {
                w.prefetch(
                    at(k + PREFETCH_AHEAD),
                    at(k + PREFETCH_AHEAD / 2),
                    at(k + PREFETCH_AHEAD / 4),
                );
                let _ = black_box(w.insert_new(*h, k as u64));
            }
            w
        })
    });
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(STEP));
    // Inserts the next `n` hashes (numbered from `next`) without prefetching. Past the end the
    // hashes repeat, long after the window forgot them.
    let insert_next = |w: &mut Window<u64>, next: &mut u64, n: u64| {
        for _ in 0..n {
            let h = hashes[(*next % hashes.len() as u64) as usize];
            let _ = black_box(w.insert_new(h, *next));
            *next += 1;
        }
    };
    // Steady state: the window has rolled over before timing starts; each iteration inserts
    // the next 65,536 new hashes (generations keep rolling over as it goes).
    let mut w = Window::new(GENERATION);
    let mut next = 0u64;
    insert_next(&mut w, &mut next, 2 * GENERATION as u64);
    group.bench_function("insert_new_65536_at_2_generations", |b| {
        b.iter(|| insert_next(&mut w, &mut next, STEP))
    });
    // The same, the way the state machine inserts a batch's hashes: each insert prefetches
    // the index entries of the hashes PREFETCH_AHEAD, half and a quarter that many ahead.
    group.bench_function("insert_new_65536_at_2_generations_prefetched", |b| {
        b.iter(|| {
            let at = |k: u64| &hashes[(k % hashes.len() as u64) as usize];
            for _ in 0..STEP {
                w.prefetch(
                    at(next + PREFETCH_AHEAD as u64),
                    at(next + PREFETCH_AHEAD as u64 / 2),
                    at(next + PREFETCH_AHEAD as u64 / 4),
                );
                let _ = black_box(w.insert_new(*at(next), next));
                next += 1;
            }
        })
    });
    // The worst case of the lazy emptying of a dropped generation's tables (each is cleared
    // when its next entry lands in it): a window of 2^17 per generation, two entries per part,
    // so every other insert is the first into its part since the rollover. Each iteration
    // inserts one generation of new hashes. Interleaved runs on the development VM
    // (2026-12-08): emptying all 65,536 tables at the rollover 33.0 / 33.5 ms, lazily 36.9 /
    // 42.2 / 41.8 ms; at the nodes' 2^20 (the prefetched bench above) 12.0 / 11.7 / 13.3 against
    // 11.3 / 12.8 / 13.1 ms, no difference. What the lazy way removes is the 10-15 ms the
    // rolling-over insert took on every node at once (docs/performance.md).
    const SMALL: usize = 2 * baton_core::tx_index::PARTS;
    group.throughput(Throughput::Elements(SMALL as u64));
    let mut w = Window::new(SMALL);
    w.reserve();
    let mut next = 0u64;
    insert_next(&mut w, &mut next, 2 * SMALL as u64);
    group.bench_function("insert_new_one_generation_of_2^17_with_its_rollover", |b| {
        b.iter(|| insert_next(&mut w, &mut next, SMALL as u64))
    });
    group.finish();
}

criterion_group!(benches, sequencer, window);
criterion_main!(benches);
