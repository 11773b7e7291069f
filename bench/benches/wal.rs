//! Micro-benchmarks of the write-ahead log on the real filesystem (the current directory):
//! append + group commit throughput for 4 KiB, 64 KiB and 1 MiB records, single append + sync
//! latency, and the per-batch record pipeline (rkyv encode, record framing with crc32, read-side
//! crc check and validated rkyv access).
//!
//! The disk comparison with fio lives in `bench/fio-compare.sh` (see bench/README.md).

use std::hint::black_box;
use std::time::{Duration, Instant};

use baton_core::{access_batch, encode_batch_into, Batch, BatchHeader, Transaction, TxKind};
use baton_wal::record::{self, RecordCheck};
use baton_wal::{Wal, WalOptions};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::LocalExecutor;
use rkyv::util::AlignedVec;

/// Runs `rounds` rounds of `in_flight` appends followed by one wait for durability, in a fresh
/// log, and returns the time the rounds took (open and cleanup excluded).
fn timed_rounds(ex: &LocalExecutor, record_bytes: usize, in_flight: u64, rounds: u64) -> Duration {
    let dir = tempfile::Builder::new()
        .prefix("baton-bench-wal")
        .tempdir_in(".")
        .expect("tempdir");
    ex.run(async {
        let (wal, _) = Wal::open(dir.path(), WalOptions::default())
            .await
            .expect("open");
        let payload = vec![0x5au8; record_bytes];
        let mut index = 1;
        let start = Instant::now();
        for _ in 0..rounds {
            for _ in 0..in_flight {
                wal.append(index, 1, &payload).await.expect("append");
                index += 1;
            }
            wal.durable(index - 1).await.expect("durable");
        }
        let took = start.elapsed();
        wal.close().await.expect("close");
        took
    })
}

fn group_commit(c: &mut Criterion) {
    // The arena a node gives its WAL shard: large rounds' buffers come from it, not the heap.
    let ex = glommio::LocalExecutorBuilder::default()
        .io_memory(baton_wal::IO_MEMORY_BYTES)
        .make()
        .expect("glommio executor");
    let mut g = c.benchmark_group("wal_group_commit");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    // (record bytes, records in flight per sync round): ~256 KiB to 8 MiB per round.
    for (record_bytes, in_flight) in [(4096usize, 64u64), (65536, 64), (1 << 20, 8)] {
        g.throughput(Throughput::Bytes(record_bytes as u64 * in_flight));
        g.bench_with_input(
            BenchmarkId::new(
                "append_durable_round",
                format!("{record_bytes}B_x{in_flight}"),
            ),
            &record_bytes,
            |b, &rb| b.iter_custom(|iters| timed_rounds(&ex, rb, in_flight, iters)),
        );
    }
    g.finish();
    let mut g = c.benchmark_group("wal_single_append_sync");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for record_bytes in [128usize, 4096] {
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{record_bytes}B")),
            &record_bytes,
            |b, &rb| b.iter_custom(|iters| timed_rounds(&ex, rb, 1, iters)),
        );
    }
    g.finish();
}

fn batch_of(txs: usize, tx_bytes: usize) -> Batch {
    let txs = (0..txs)
        .map(|i| Transaction {
            rollup_id: 1,
            kind: TxKind::Raw,
            bytes: (0..tx_bytes).map(|j| (i + j) as u8).collect(),
        })
        .collect::<Vec<_>>();
    let header = BatchHeader {
        term: 1,
        index: 1,
        prev_batch_hash: [0; 32],
        tx_merkle_root: [0; 32],
        tx_count: txs.len() as u32,
        timestamp_us: 0,
    };
    Batch { header, txs }
}

fn record_pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("record_pipeline");
    g.sample_size(30)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for txs in [1usize, 64, 1024] {
        let batch = batch_of(txs, 128);
        let mut encoded = AlignedVec::<16>::new();
        encode_batch_into(&batch, &mut encoded).expect("within limits");
        let mut frame = vec![0u8; record::record_bytes(encoded.len()) + 16];
        let align = frame.as_ptr().align_offset(16);
        g.throughput(Throughput::Elements(txs as u64));
        g.bench_function(
            BenchmarkId::new("encode_frame_check_access", format!("{txs}tx")),
            |b| {
                b.iter(|| {
                    encoded.clear();
                    encode_batch_into(black_box(&batch), &mut encoded).expect("within limits");
                    let n = record::encode(&mut frame[align..], 7, 1, &encoded);
                    let RecordCheck::Record(h) = record::check(&frame[align..align + n], 0) else {
                        panic!("own record invalid")
                    };
                    let payload = &frame[align + record::HEADER_BYTES
                        ..align + record::HEADER_BYTES + h.payload_len as usize];
                    black_box(access_batch(payload).expect("valid").txs.len())
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, record_pipeline, group_commit);
criterion_main!(benches);
