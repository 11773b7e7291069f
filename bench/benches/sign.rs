//! Micro-benchmark of leader signatures and receipts: signing a batch header (what the leader's
//! log store does once per batch on shard 0; with a nonce made ahead, and making one), recovering the signer, and verifying a whole
//! receipt (Merkle path of a 4096-transaction batch plus signature) as a client does offline.

use std::hint::black_box;

use baton_core::sign::Nonce;
use baton_core::{AckLevel, BatchHeader, MerkleTree, Receipt, SignedHeader, Signer, TxHash};
use criterion::{criterion_group, criterion_main, Criterion};

fn header(root: [u8; 32], count: u32) -> BatchHeader {
    BatchHeader {
        term: 7,
        index: 123_456,
        prev_batch_hash: [5; 32],
        tx_merkle_root: root,
        tx_count: count,
        timestamp_us: 1_764_000_000_000_000,
    }
}

fn bench(c: &mut Criterion) {
    let signer = Signer::from_secret(&[42; 32]).unwrap();
    let h = header([9; 32], 4096);
    c.bench_function("sign batch header", |b| {
        b.iter(|| SignedHeader::sign(black_box(h), &signer))
    });
    // What the log store does with a nonce the pool thread made ahead, and what making one
    // costs that thread.
    c.bench_function("sign batch header with a ready nonce", |b| {
        b.iter_batched(
            Nonce::generate,
            |n| SignedHeader::sign_with(black_box(h), &signer, n),
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("make a signing nonce", |b| b.iter(Nonce::generate));
    let signed = SignedHeader::sign(h, &signer);
    c.bench_function("recover batch signer", |b| {
        b.iter(|| black_box(&signed).signer().unwrap())
    });

    let hashes: Vec<TxHash> = (0..4096u32).map(|i| TxHash::of(&i.to_le_bytes())).collect();
    let tree = MerkleTree::new(&hashes);
    let batch = SignedHeader::sign(header(tree.root(), 4096), &signer);
    let receipt = Receipt {
        tx_hash: hashes[1234],
        level: AckLevel::Committed,
        batch,
        offset: 1234,
        path: tree.proof(1234).unwrap().path,
        duplicate: false,
    };
    let signers = [signer.address()];
    c.bench_function("verify receipt (4096-tx batch)", |b| {
        b.iter(|| black_box(&receipt).verify(&signers).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
