//! Micro-benchmarks of baton-core's domain model: batch encode, validated access, Merkle root and
//! transaction hashing, each reported per transaction (elements) and per byte.

use std::hint::black_box;
use std::time::Duration;

use baton_core::keccak_many::keccak256_many;
use baton_core::MerkleTree;
use baton_core::{
    access_batch, encode_batch_into, keccak256, merkle_root, Batch, BatchHeader, Transaction,
    TxHash, TxKind,
};
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use rkyv::util::AlignedVec;

/// Transactions per benchmarked batch.
const BENCH_TXS: usize = 1_024;
/// Payload size of each benchmarked transaction, in bytes.
const BENCH_TX_BYTES: usize = 128;

fn bench_batch() -> Batch {
    let txs: Vec<Transaction> = (0..BENCH_TXS)
        .map(|i| Transaction {
            rollup_id: (i % 4) as u64,
            kind: TxKind::Raw,
            bytes: (0..BENCH_TX_BYTES).map(|j| (i * 31 + j) as u8).collect(),
        })
        .collect();
    let mut batch = Batch {
        header: BatchHeader {
            term: 1,
            index: 1,
            prev_batch_hash: [0; 32],
            tx_merkle_root: [0; 32],
            tx_count: BENCH_TXS as u32,
            timestamp_us: 0,
        },
        txs,
    };
    batch.header.tx_merkle_root = batch.compute_tx_merkle_root();
    batch
}

/// Runs `routine` twice in `group`: once reported per transaction, once per byte.
fn bench_both<M, F>(group: &mut BenchmarkGroup<'_, M>, bytes: usize, mut routine: F)
where
    M: criterion::measurement::Measurement,
    F: FnMut(),
{
    group.throughput(Throughput::Elements(BENCH_TXS as u64));
    group.bench_function("txs", |b| b.iter(&mut routine));
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("bytes", |b| b.iter(&mut routine));
}

fn model(c: &mut Criterion) {
    let batch = bench_batch();
    let mut buf = AlignedVec::<16>::new();
    encode_batch_into(&batch, &mut buf).expect("bench batch is within limits");
    let encoded_bytes = buf.len();
    let payload_bytes = BENCH_TXS * BENCH_TX_BYTES;

    let mut group = c.benchmark_group("batch_encode_1024x128");
    let mut out = AlignedVec::<16>::with_capacity(encoded_bytes);
    bench_both(&mut group, encoded_bytes, || {
        encode_batch_into(black_box(&batch), &mut out).expect("encode");
        black_box(out.len());
    });
    group.finish();

    let mut group = c.benchmark_group("batch_access_validated_1024x128");
    bench_both(&mut group, encoded_bytes, || {
        let archived = access_batch(black_box(buf.as_slice())).expect("access");
        black_box(archived.txs.len());
    });
    group.finish();

    let tx_hashes: Vec<TxHash> = batch.txs.iter().map(Transaction::tx_hash).collect();
    let mut group = c.benchmark_group("merkle_root_1024");
    bench_both(&mut group, tx_hashes.len() * 32, || {
        black_box(merkle_root(black_box(&tx_hashes)));
    });
    group.finish();

    let mut group = c.benchmark_group("keccak256_1024x128");
    bench_both(&mut group, payload_bytes, || {
        for tx in &batch.txs {
            black_box(keccak256(black_box(&tx.bytes)));
        }
    });
    group.finish();

    // The same hashing several messages per permutation (AVX-512 where the CPU has it).
    let mut group = c.benchmark_group("keccak256_many_1024x128");
    let mut out = Vec::with_capacity(BENCH_TXS);
    bench_both(&mut group, payload_bytes, || {
        out.clear();
        keccak256_many(
            batch.txs.iter().map(|tx| black_box(tx.bytes.as_slice())),
            &mut out,
        );
        black_box(out.len());
    });
    group.finish();

    // A whole tree (leaves and levels hashed several per permutation) against the one-at-a-time
    // accumulator of merkle_root_1024 above.
    let mut group = c.benchmark_group("merkle_tree_1024");
    group.throughput(Throughput::Elements(BENCH_TXS as u64));
    group.bench_function("txs", |b| {
        b.iter(|| black_box(MerkleTree::new(black_box(&tx_hashes)).root()))
    });
    group.finish();

    // A size that is not a power of two, as most sealed batches are (their levels hold more
    // than 2n - 1 nodes: promoted unpaired nodes).
    let some = &tx_hashes[..1000];
    let mut group = c.benchmark_group("merkle_tree_1000");
    group.throughput(Throughput::Elements(some.len() as u64));
    group.bench_function("txs", |b| {
        b.iter(|| black_box(MerkleTree::new(black_box(some)).root()))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = model
}
criterion_main!(benches);
