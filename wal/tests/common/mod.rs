//! Helpers shared by the WAL integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;

use baton_wal::{Wal, WalOptions};

/// Runs `f` on a fresh glommio executor in this thread.
pub fn run<F, T>(f: impl FnOnce() -> F) -> T
where
    F: Future<Output = T>,
{
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor (needs >= 512 KiB of locked memory)")
        .run(f())
}

/// Deterministic payload of record `index`: sizes vary from 1 byte to a few KiB.
pub fn payload(index: u64, max: usize) -> Vec<u8> {
    let len = 1 + (index.wrapping_mul(2_654_435_761) % (max as u64).min(3000)) as usize;
    (0..len)
        .map(|k| (index as u8).wrapping_mul(31).wrapping_add(k as u8))
        .collect()
}

/// Deterministic term of record `index`.
pub fn term(index: u64) -> u64 {
    index / 50 + 1
}

/// Appends `from..=to` with the deterministic payloads and waits until durable.
pub async fn fill(wal: &Wal, from: u64, to: u64, max: usize) {
    for i in from..=to {
        wal.append(i, term(i), &payload(i, max)).await.unwrap();
    }
    wal.durable(to).await.unwrap();
}

/// Reads every index in `from..=to` and checks it is the deterministic record.
pub async fn check_all(wal: &Wal, from: u64, to: u64, max: usize) {
    for i in from..=to {
        let r = wal
            .read(i)
            .await
            .unwrap_or_else(|e| panic!("read {i}: {e}"));
        assert_eq!((r.index, r.term), (i, term(i)));
        assert_eq!(r.payload(), &payload(i, max)[..], "payload of {i}");
        assert_eq!(
            r.payload().as_ptr() as usize % 16,
            0,
            "payload of {i} is 16-byte aligned"
        );
    }
}

/// Small sizes so tests make many segments.
pub fn small() -> WalOptions {
    WalOptions::small_for_tests()
}

/// First index of every segment file in `dir`, in order.
pub fn segment_firsts(dir: &Path) -> Vec<u64> {
    baton_wal::segment::list_segments(dir)
        .unwrap()
        .iter()
        .map(|(f, _)| *f)
        .collect()
}

/// Number of segment files in `dir`.
pub fn segment_count(dir: &Path) -> usize {
    baton_wal::segment::list_segments(dir).unwrap().len()
}

/// Snapshot of every file in `dir` (name → bytes).
pub fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

/// Puts `dir` back to a snapshot (removing files that are not in it).
pub fn restore(dir: &Path, snap: &[(std::path::PathBuf, Vec<u8>)]) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() && !snap.iter().any(|(q, _)| *q == p) {
            std::fs::remove_file(&p).unwrap();
        }
    }
    for (p, b) in snap {
        std::fs::write(p, b).unwrap();
    }
}
