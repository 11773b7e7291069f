//! Raft throughput and commit latency of 3 in-process nodes (one shard each, in-process channel
//! network), with real WALs on disk and, in the same run, with the WALs on tmpfs (no disk I/O),
//! to show what durability costs.
//!
//! `cargo run --release -p baton-bench --bin raft_bench -- [SECONDS_PER_CASE] [DISK_DIR]`
//!
//! Each case submits requests of B transactions of 128 bytes (batch size B, so one request is
//! one batch and one Raft entry) from 16 concurrent submitters to the leader, and reports
//! committed batches/s, tx/s and submit→commit latency p50/p99 (median of the per-request
//! latencies; the run is closed-loop).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_core::node::{self, LocalRouter, NodeConfig, NodeHandle, Role};
use baton_core::{Transaction, TxKind};

const CONCURRENCY: usize = 16;
const TX_BYTES: usize = 128;

struct Result {
    batches_per_s: f64,
    tx_per_s: f64,
    p50: Duration,
    p99: Duration,
}

fn start_cluster(root: &Path, batch_txs: usize) -> (Vec<NodeHandle>, u64) {
    let router = LocalRouter::default();
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let mut c = NodeConfig::new(id, root.join(format!("node{id}")));
        c.shards = 1;
        c.batch.batch_txs_max = batch_txs;
        c.batch.linger_us = 100;
        c.raft.snapshot_every_entries = 1_000_000;
        nodes.push(node::start(c, node::Network::Local(router.clone())).expect("node starts"));
    }
    let members: BTreeMap<u64, openraft::BasicNode> = (1..=3)
        .map(|id| (id, openraft::BasicNode::new(format!("n{id}"))))
        .collect();
    let ex = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor");
    let leader = ex.run(async {
        nodes[0].initialize(members).await.expect("initialize");
        let s = nodes[0]
            .wait_for(Duration::from_secs(20), |s| s.leader.is_some())
            .await
            .expect("leader");
        let leader = s.leader.unwrap();
        nodes[(leader - 1) as usize]
            .wait_for(Duration::from_secs(20), |s| s.role == Role::Leader)
            .await
            .expect("leader");
        leader
    });
    (nodes, leader)
}

fn run_case(root: &Path, batch_txs: usize, seconds: u64) -> Result {
    let _ = std::fs::remove_dir_all(root);
    let (nodes, leader) = start_cluster(root, batch_txs);
    let leader_handle = nodes[(leader - 1) as usize].clone();
    let ex = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor");
    let (count, latencies, secs) = ex.run(async move {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for worker in 0..CONCURRENCY {
            let node = leader_handle.clone();
            tasks.push(glommio::spawn_local(async move {
                let mut lat = Vec::new();
                let mut seq = 0u64;
                // Bounded by time.
                while Instant::now() < deadline {
                    let txs: Vec<Transaction> = (0..batch_txs)
                        .map(|i| {
                            let mut bytes = vec![0u8; TX_BYTES];
                            bytes[..24].copy_from_slice(
                                &[worker as u64, seq, i as u64]
                                    .map(u64::to_le_bytes)
                                    .concat(),
                            );
                            Transaction {
                                rollup_id: 1,
                                kind: TxKind::Raw,
                                bytes,
                            }
                        })
                        .collect();
                    seq += 1;
                    let t = Instant::now();
                    let r = node.submit(txs).await;
                    assert!(
                        r.iter().all(|x| x.is_ok()),
                        "submission failed: {:?}",
                        r.iter().find(|x| x.is_err())
                    );
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await);
        }
        let secs = start.elapsed().as_secs_f64();
        (all.len(), all, secs)
    });
    let ex = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor");
    ex.run(async {
        for n in &nodes {
            n.shutdown().await;
        }
    });
    for n in &nodes {
        n.join();
    }
    let mut latencies = latencies;
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    Result {
        batches_per_s: count as f64 / secs,
        tx_per_s: (count * batch_txs) as f64 / secs,
        p50: pct(0.5),
        p99: pct(0.99),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let disk_root: PathBuf = args
        .get(2)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("./raft-bench.tmp"));
    let tmpfs_root = PathBuf::from("/dev/shm/baton-raft-bench");
    println!("3 in-process nodes, 1 shard each, {CONCURRENCY} concurrent submitters, {TX_BYTES}-byte transactions, {seconds} s per case");
    println!(
        "{:<26} {:>12} {:>12} {:>12} {:>12}",
        "case", "batches/s", "tx/s", "p50", "p99"
    );
    for batch_txs in [1usize, 64, 1024] {
        for (label, root) in [
            ("WAL on disk", &disk_root),
            ("WAL on tmpfs (no disk)", &tmpfs_root),
        ] {
            let r = run_case(root, batch_txs, seconds);
            println!(
                "{:<26} {:>12.0} {:>12.0} {:>12.2?} {:>12.2?}",
                format!("{batch_txs:>4} tx/batch, {label}"),
                r.batches_per_s,
                r.tx_per_s,
                r.p50,
                r.p99
            );
            let _ = std::fs::remove_dir_all(root);
        }
    }
}
