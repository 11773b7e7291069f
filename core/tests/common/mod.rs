//! Test harness for in-process clusters.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_core::command::{CommandRejection, RollupPolicy};
use baton_core::node::{self, LocalRouter, NodeConfig, NodeHandle, Receipt, Role, SubmitError};
use baton_core::TxHash;

/// Runs `f` to completion on a glommio executor in this thread.
/// The rollup the tests' transactions belong to.
pub const TEST_ROLLUP: u64 = 1;
/// Its policy: blocks every 50 ms.
pub const TEST_POLICY: RollupPolicy = RollupPolicy {
    block_time_ms: 50,
    max_block_txs: 10_000,
    reveal_window_blocks: 8,
};

pub fn run<T>(f: impl Future<Output = T>) -> T {
    baton_core::node::run_local(f)
}

/// A cluster of in-process nodes with real WAL directories.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub router: LocalRouter,
    pub nodes: BTreeMap<u64, NodeHandle>,
    pub configs: BTreeMap<u64, NodeConfig>,
    /// Nodes already shut down and joined.
    pub stopped: Vec<u64>,
    /// Followers forward sealed batches to the leader.
    pub forwarding: bool,
    /// Nodes removed from the membership (and stopped): their receipts still verify, their logs
    /// are not compared (the others may have purged past their end).
    pub left: Vec<u64>,
}

impl Cluster {
    /// Starts `n` nodes (one shard each; `tweak` adjusts each config) and initializes them.
    pub fn start(n: u64, tweak: impl Fn(&mut NodeConfig)) -> Cluster {
        Cluster::start_with(n, false, tweak)
    }

    /// Like [`Cluster::start`], with followers forwarding submissions to the leader.
    pub fn start_forwarding(n: u64, tweak: impl Fn(&mut NodeConfig)) -> Cluster {
        Cluster::start_with(n, true, tweak)
    }

    fn network(router: &LocalRouter, forwarding: bool) -> node::Network {
        if forwarding {
            node::Network::LocalForwarding(router.clone())
        } else {
            node::Network::Local(router.clone())
        }
    }

    fn start_with(n: u64, forwarding: bool, tweak: impl Fn(&mut NodeConfig)) -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let router = LocalRouter::default();
        let mut nodes = BTreeMap::new();
        let mut configs = BTreeMap::new();
        for id in 1..=n {
            let mut c = NodeConfig::new(id, dir.path().join(format!("node{id}")));
            c.shards = 1;
            c.wal = baton_wal::WalOptions {
                segment_bytes: 8 << 20,
                ..baton_wal::WalOptions::default()
            };
            tweak(&mut c);
            nodes.insert(
                id,
                node::start(c.clone(), Cluster::network(&router, forwarding)).expect("node starts"),
            );
            configs.insert(id, c);
        }
        let members = (1..=n)
            .map(|id| (id, openraft::BasicNode::new(format!("node{id}"))))
            .collect();
        run(nodes[&1].initialize(members)).expect("initialize");
        Cluster {
            dir,
            router,
            nodes,
            configs,
            stopped: Vec::new(),
            forwarding,
            left: Vec::new(),
        }
    }

    pub fn dir_of(&self, id: u64) -> PathBuf {
        self.configs[&id].data_dir.clone()
    }

    /// Starts node `id` again from its directory (after `shutdown` + `join`).
    pub fn restart(&mut self, id: u64) {
        let handle = node::start(
            self.configs[&id].clone(),
            Cluster::network(&self.router, self.forwarding),
        )
        .expect("node restarts");
        self.nodes.insert(id, handle);
        self.stopped.retain(|&s| s != id);
    }

    /// Starts a new, uninitialized node `id` (a config made as `start` makes them, adjusted by
    /// `tweak`) in its own empty directory: it waits to be added to the membership.
    pub fn start_node(&mut self, id: u64, tweak: impl Fn(&mut NodeConfig)) {
        let mut c = NodeConfig::new(id, self.dir.path().join(format!("node{id}")));
        c.shards = 1;
        tweak(&mut c);
        let handle = node::start(c.clone(), Cluster::network(&self.router, self.forwarding))
            .expect("node starts");
        self.nodes.insert(id, handle);
        self.configs.insert(id, c);
    }

    /// Waits until some running node sees itself as leader, and the test rollup (id 1) is
    /// registered through the log and applied on every running node; returns the leader's id.
    pub async fn wait_leader(&self, timeout: Duration) -> u64 {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let leader = self.wait_raft_leader(timeout).await;
            let node = &self.nodes[&leader];
            if node.is_registered(TEST_ROLLUP) {
                return leader;
            }
            match node.register_rollup(TEST_ROLLUP, TEST_POLICY).await {
                Ok(receipt) => {
                    self.wait_all_applied(receipt.index, timeout).await;
                    return leader;
                }
                Err(SubmitError::Command(CommandRejection::RollupExists { .. })) => return leader,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("registering the test rollup on {leader}: {e}; again");
                }
                Err(e) => panic!("cannot register the test rollup: {e}"),
            }
        }
    }

    /// Waits until some running node sees itself as leader; returns its id.
    pub async fn wait_raft_leader(&self, timeout: Duration) -> u64 {
        let (&any, node) = self
            .nodes
            .iter()
            .find(|(id, _)| !self.stopped.contains(id))
            .expect("a running node");
        let s = node
            .wait_for(timeout, |s| s.leader.is_some())
            .await
            .unwrap_or_else(|s| panic!("no leader seen by {any}: {s:?}"));
        let leader = s.leader.unwrap();
        self.nodes[&leader]
            .wait_for(timeout, |s| s.role == Role::Leader)
            .await
            .expect("the leader knows it leads");
        leader
    }

    /// Waits until every running node has applied `index`.
    pub async fn wait_all_applied(&self, index: u64, timeout: Duration) {
        for (id, n) in &self.nodes {
            if self.stopped.contains(id) {
                continue;
            }
            n.wait_for(timeout, move |s| s.applied_index >= Some(index))
                .await
                .unwrap_or_else(|s| panic!("node {id} did not apply {index}: {s:?}"));
        }
    }

    /// Checks every receipt against every running node's state machine (its tx-hash index),
    /// then stops every node, reads their logs back and checks the invariants.
    pub fn stop_and_check(self, receipts: &[Receipt]) {
        run(async {
            let last = receipts.iter().map(|r| r.index()).max().unwrap_or(0);
            let signers: Vec<baton_core::Address> =
                self.nodes.values().map(|n| n.signer()).collect();
            for (id, n) in &self.nodes {
                if self.stopped.contains(id) {
                    continue;
                }
                n.wait_for(Duration::from_secs(20), move |s| {
                    s.applied_index >= Some(last)
                })
                .await
                .expect("node applies every receipt's batch");
                for (i, r) in receipts.iter().enumerate() {
                    let found = n.lookup(r.tx_hash).await.expect("lookup");
                    assert_eq!(
                        found,
                        Some((r.index(), r.offset)),
                        "node {id} places {} elsewhere than its receipt",
                        r.tx_hash
                    );
                    r.verify(&signers).expect("receipt verifies offline");
                    // Every node can prove it too (a sample: each proof reads a batch).
                    if i % 97 == 0 {
                        let own = n
                            .receipt(r.tx_hash)
                            .await
                            .expect("receipt")
                            .expect("sequenced");
                        let purged = n.status().await.expect("status").purged_index;
                        if purged >= Some(r.index()) {
                            // Its batch lives on only in the snapshot: no path to prove it.
                            assert_eq!(
                                own,
                                Err(SubmitError::ReceiptUnavailable { index: r.index() })
                            );
                            continue;
                        }
                        let own = own.expect("provable");
                        assert_eq!((own.index(), own.offset), (r.index(), r.offset));
                        assert_eq!(own.batch, r.batch, "same signed header on node {id}");
                        own.verify(&signers).expect("node's receipt verifies");
                    }
                }
            }
        });
        for (id, n) in &self.nodes {
            if !self.stopped.contains(id) {
                run(n.shutdown());
                n.join();
            }
        }
        let logs: HashMap<u64, Log> = self
            .nodes
            .keys()
            .filter(|id| !self.left.contains(id))
            .map(|&id| (id, Log::read(&self.configs[&id].data_dir)))
            .collect();
        check_prefixes(&logs);
        check_receipts(&logs, receipts);
    }
}

/// A node's log as read back from its WAL: index → (term, tx hashes of the batch).
pub struct Log {
    pub entries: BTreeMap<u64, (u64, Option<Vec<TxHash>>)>,
}

impl Log {
    pub fn read(dir: &Path) -> Log {
        let dir = dir.to_path_buf();
        let entries = run(async move {
            let (wal, _) = baton_wal::Wal::open(&dir, baton_wal::WalOptions::default())
                .await
                .expect("open WAL");
            let mut entries = BTreeMap::new();
            if let (Some(first), Some(last)) = (wal.first_index(), wal.last_index()) {
                for i in first..=last {
                    let r = wal.read(i).await.expect("read entry");
                    let hashes = baton_core::raft::log_store::entry_batch(r.payload())
                        .expect("entries decode")
                        .map(|b| {
                            baton_core::access_batch(b)
                                .expect("valid batch")
                                .txs
                                .iter()
                                .map(|t| t.tx_hash())
                                .collect()
                        });
                    let raft_index = baton_core::raft::log_store::raft_index(i)
                        .expect("WAL indexes are raft index + 1");
                    entries.insert(raft_index, (r.term, hashes));
                }
            }
            entries
        });
        Log { entries }
    }

    pub fn last_index(&self) -> u64 {
        self.entries.keys().next_back().copied().unwrap_or(0)
    }

    pub fn tx_at(&self, index: u64, offset: u32) -> Option<TxHash> {
        self.entries
            .get(&index)?
            .1
            .as_ref()?
            .get(offset as usize)
            .copied()
    }

    pub fn batches(&self) -> impl Iterator<Item = (u64, &Vec<TxHash>)> {
        self.entries
            .iter()
            .filter_map(|(i, (_, h))| h.as_ref().map(|h| (*i, h)))
    }
}

/// Where two logs both hold an index, they hold the same entry (same term, same transactions),
/// and some two logs do overlap (the comparison is not vacuous). Two logs may share no entry: a
/// node that caught up by installing a snapshot holds only what came after it, which can all be
/// past the end of a node stopped earlier (e.g. the blank entry of a leader elected as the
/// cluster stops).
pub fn check_prefixes(logs: &HashMap<u64, Log>) {
    let ids: Vec<u64> = logs.keys().copied().collect();
    let mut ranges = Vec::new();
    let mut overlapping = 0;
    for (k, a) in ids.iter().enumerate() {
        let l = &logs[a];
        let first = l.entries.keys().next().copied().unwrap_or(0);
        ranges.push(format!("node {a}: {first}..={}", l.last_index()));
        for b in &ids[k + 1..] {
            let (la, lb) = (&logs[a], &logs[b]);
            let mut common = 0;
            for (i, ea) in &la.entries {
                if let Some(eb) = lb.entries.get(i) {
                    assert_eq!(ea, eb, "nodes {a} and {b} disagree at index {i}");
                    common += 1;
                }
            }
            overlapping += usize::from(common > 0);
        }
    }
    let non_empty = logs.values().filter(|l| !l.entries.is_empty()).count();
    assert!(
        overlapping > 0 || non_empty < 2,
        "no two logs share an entry: {ranges:?}"
    );
}

/// First index held in a node's WAL directory, from its segment files' names (0: none). Only
/// the names: the node may be running, and a purge moves segment files away (to `*.trash`)
/// while a reader of their contents would be between listing and opening them.
pub fn wal_first_index(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("the WAL directory")
        .filter_map(|e| baton_wal::segment::parse_segment_name(e.ok()?.file_name().to_str()?))
        .min()
        .unwrap_or(0)
}

/// Checks the receipts against the logs read back from the nodes' WAL directories.
pub fn check_receipts(logs: &HashMap<u64, Log>, receipts: &[Receipt]) {
    let mut seen: HashMap<TxHash, (u64, u32)> = HashMap::new();
    let first_held = logs
        .values()
        .filter_map(|l| l.entries.keys().next().copied())
        .min()
        .unwrap_or(u64::MAX);
    for r in receipts {
        // Entries purged everywhere live on in snapshots; `stop_and_check` verified those
        // receipts against every node's state machine.
        if r.index() < first_held {
            continue;
        }
        let found = logs.values().find_map(|log| log.tx_at(r.index(), r.offset));
        let hash = found.unwrap_or_else(|| panic!("receipt {r:?} points at nothing"));
        assert_eq!(
            hash, r.tx_hash,
            "receipt {r:?} points at another transaction"
        );
        if let Some(prev) = seen.insert(r.tx_hash, (r.index(), r.offset)) {
            assert_eq!(
                prev,
                (r.index(), r.offset),
                "one transaction, two positions"
            );
        }
    }
    // Exactly once: a receipt names the first position of its transaction in the log. A later
    // copy (a retry or a resubmission through another node that reached the log) is a duplicate
    // the state machine does not order again.
    // The union of the logs (they agree where they overlap; each may have purged a different
    // prefix), in index order.
    let mut union = std::collections::BTreeMap::new();
    for log in logs.values() {
        for (index, hashes) in log.batches() {
            union.entry(index).or_insert(hashes);
        }
    }
    let mut first: HashMap<TxHash, (u64, u32)> = HashMap::new();
    for (index, hashes) in union {
        for (offset, h) in hashes.iter().enumerate() {
            first.entry(*h).or_insert((index, offset as u32));
        }
    }
    for r in receipts.iter().filter(|r| r.index() >= first_held) {
        assert_eq!(
            first.get(&r.tx_hash),
            Some(&(r.index(), r.offset)),
            "receipt {r:?} is not the first position of its transaction"
        );
    }
}
