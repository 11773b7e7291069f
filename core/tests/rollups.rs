//! Rollups, blocks, encrypted transactions and reads on in-process 3-node clusters (real WALs,
//! in-process network): rollup registration through the log, the leader sealing signed blocks
//! that every node builds identically, reveals recorded on every node, typed errors for bad
//! input, and reads on followers at `min_index` and linearizable consistency.

mod common;

use std::time::{Duration, Instant};

use baton_core::command::{CommandRejection, RollupPolicy};
use baton_core::encrypted::{encrypted_transaction, NONCE_BYTES};
use baton_core::node::{BlockTxs, Consistency, NodeHandle, SubmitError};
use baton_core::rollups::SecretState;
use baton_core::sequencer::CommandApplied;
use baton_core::{AckLevel, Address, Transaction, TxHash, TxKind};
use common::*;

const WAIT: Duration = Duration::from_secs(20);

fn raw(rollup_id: u64, i: u64) -> Transaction {
    Transaction {
        rollup_id,
        kind: TxKind::Raw,
        bytes: format!("rollup-{rollup_id}-tx-{i:06}").into_bytes(),
    }
}

/// Waits (on applied-index changes, bounded) until `node` has block `height` of `rollup`.
async fn wait_block(node: &NodeHandle, rollup: u64, height: u64) -> BlockTxs {
    let deadline = Instant::now() + WAIT;
    loop {
        let read = node
            .block(rollup, height, Consistency::Local, WAIT)
            .await
            .expect("block read");
        if let Some(b) = read.value {
            return b;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "node {} never got block {rollup}/{height}",
            node.id()
        );
        let seen = read.applied_index;
        let _ = node
            .wait_for(left, move |s| s.applied_index > Some(seen))
            .await;
    }
}

fn signers(cluster: &Cluster) -> Vec<Address> {
    cluster.nodes.values().map(|n| n.signer()).collect()
}

#[test]
fn the_leader_seals_signed_blocks_that_every_node_builds_identically() {
    let cluster = Cluster::start(3, |_| {});
    run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let node = &cluster.nodes[&leader];
        // A second rollup with small blocks: 25 transactions make at least 3 blocks.
        let policy = RollupPolicy {
            block_time_ms: 20,
            max_block_txs: 10,
            reveal_window_blocks: 2,
        };
        let reg = node.register_rollup(7, policy).await.expect("register");
        assert_eq!(reg.applied, CommandApplied::Registered { rollup_id: 7 });
        assert_eq!(
            node.register_rollup(7, policy).await,
            Err(SubmitError::Command(CommandRejection::RollupExists {
                rollup_id: 7
            }))
        );
        cluster.wait_all_applied(reg.index, WAIT).await;

        let txs: Vec<Transaction> = (0..25).map(|i| raw(7, i)).collect();
        let mut order = Vec::new();
        for chunk in txs.chunks(5) {
            for r in node.submit(chunk.to_vec()).await {
                order.push(r.expect("sequenced"));
            }
        }
        order.sort_by_key(|r| (r.index(), r.offset));
        let sequenced: Vec<TxHash> = order.iter().map(|r| r.tx_hash).collect();

        // Walk the leader's blocks until every transaction is in one.
        let mut in_blocks: Vec<TxHash> = Vec::new();
        let mut blocks = Vec::new();
        let mut height = 1;
        while in_blocks.len() < sequenced.len() {
            let b = wait_block(node, 7, height).await;
            let h = b.block.signed.header;
            assert_eq!((h.rollup_id, h.height), (7, height));
            assert!(h.tx_count as usize <= 10, "max_block_txs holds");
            b.block
                .signed
                .verify(&signers(&cluster))
                .expect("signed by a node");
            let txs = b.txs.clone().expect("the leader has the batches");
            assert_eq!(txs.len(), h.tx_count as usize);
            let hashes: Vec<TxHash> = txs.iter().map(|t| t.tx_hash).collect();
            assert_eq!(h.tx_merkle_root, baton_core::merkle_root(&hashes));
            if let Some(prev) = blocks.last() {
                let prev: &BlockTxs = prev;
                assert_eq!(h.parent_hash, prev.block.signed.header.digest());
            }
            in_blocks.extend(hashes);
            blocks.push(b);
            height += 1;
        }
        assert_eq!(
            in_blocks, sequenced,
            "blocks hold the rollup's transactions in log order"
        );
        assert!(blocks.len() >= 3);

        // Every node built the same blocks and serves the same transactions.
        for (id, n) in &cluster.nodes {
            for b in &blocks {
                let h = b.block.signed.header.height;
                let theirs = wait_block(n, 7, h).await;
                assert_eq!(&theirs, b, "node {id} block {h}");
            }
        }
        // The test rollup's empty history stays empty: no empty blocks are sealed.
        let read = node
            .read(Consistency::Local, WAIT, |s| {
                s.rollups().rollup(1).map(|r| r.height())
            })
            .await
            .unwrap();
        assert_eq!(read.value, Some(0));
    });
    cluster.stop_and_check(&[]);
}

#[test]
fn blocks_are_sealed_on_time_under_concurrent_load() {
    let cluster = Cluster::start(3, |_| {});
    run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let node = cluster.nodes[&leader].clone();
        // Only the block time can trigger a block here: batches keep arriving while each seal
        // marker commits, so each marker seals what the leader saw, not what is waiting then.
        let policy = RollupPolicy {
            block_time_ms: 10,
            max_block_txs: 100_000,
            reveal_window_blocks: 2,
        };
        let reg = node.register_rollup(8, policy).await.expect("register");
        cluster.wait_all_applied(reg.index, WAIT).await;
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let node = node.clone();
            tasks.push(glommio::spawn_local(async move {
                for r in 0..30u64 {
                    let txs = (0..10).map(|i| raw(8, 10_000 * t + 100 * r + i)).collect();
                    for res in node.submit(txs).await {
                        res.expect("sequenced");
                    }
                }
            }));
        }
        for t in tasks {
            t.await;
        }
        let mut in_blocks = 0u64;
        let mut height = 0;
        while in_blocks < 2_400 {
            height += 1;
            let b = wait_block(&node, 8, height).await;
            in_blocks += u64::from(b.block.signed.header.tx_count);
        }
        assert_eq!(in_blocks, 2_400);
        assert!(
            height >= 3,
            "time-triggered blocks during the load: {height}"
        );
    });
    cluster.stop_and_check(&[]);
}

#[test]
fn full_blocks_are_sealed_in_chains_without_waiting_for_each_commit_and_none_is_refused() {
    let mut cluster = Cluster::start(3, |_| {});
    const BLOCKS: u64 = 100;
    let (leader, registered) = run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let node = cluster.nodes[&leader].clone();
        // Only fullness triggers a block: every block holds exactly 10 transactions.
        let policy = RollupPolicy {
            block_time_ms: 3_600_000,
            max_block_txs: 10,
            reveal_window_blocks: 2,
        };
        let reg = node.register_rollup(9, policy).await.expect("register");
        cluster.wait_all_applied(reg.index, WAIT).await;
        let mut tasks = Vec::new();
        for t in 0..10u64 {
            let node = node.clone();
            tasks.push(glommio::spawn_local(async move {
                let txs = (0..BLOCKS).map(|i| raw(9, 1_000 * t + i)).collect();
                for res in node.submit(txs).await {
                    res.expect("sequenced");
                }
            }));
        }
        for t in tasks {
            t.await;
        }
        for n in cluster.nodes.values() {
            for height in 1..=BLOCKS {
                let b = wait_block(n, 9, height).await;
                assert_eq!(b.block.signed.header.tx_count, 10, "block {height} is full");
            }
        }
        (leader, reg.index)
    });
    for (id, n) in &cluster.nodes {
        run(n.shutdown());
        n.join();
        cluster.stopped.push(*id);
    }
    // Every entry after the registration is a batch or one of the 100 seal markers: a marker
    // built on a wrong chain would have been refused and proposed again, adding entries.
    let log = Log::read(&cluster.dir_of(leader));
    let after: Vec<_> = log.entries.range(registered + 1..).collect();
    let terms: std::collections::BTreeSet<u64> = after.iter().map(|(_, (t, _))| *t).collect();
    let markers = after.iter().filter(|(_, (_, b))| b.is_none()).count() as u64;
    if terms.len() == 1 {
        assert_eq!(markers, BLOCKS, "one marker per block, none refused");
    } else {
        // A leader change drops the chain; its refused markers are allowed then.
        assert!(markers >= BLOCKS);
    }
    cluster.stop_and_check(&[]);
}

#[test]
fn unknown_rollups_and_malformed_ciphertexts_are_refused_at_submission() {
    let cluster = Cluster::start(3, |_| {});
    run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let mut short = encrypted_transaction(1, &[1; 32], &[0; NONCE_BYTES], b"x");
        short.bytes.truncate(20);
        let results = cluster.nodes[&leader]
            .submit(vec![raw(1, 0), raw(99, 1), short])
            .await;
        assert!(results[0].is_ok());
        assert_eq!(
            results[1],
            Err(SubmitError::UnknownRollup {
                position: 1,
                rollup_id: 99
            })
        );
        assert_eq!(
            results[2],
            Err(SubmitError::MalformedCiphertext {
                position: 2,
                len: 20
            })
        );
        for n in cluster.nodes.values() {
            assert!(n.lookup(raw(99, 1).tx_hash()).await.unwrap().is_none());
        }
    });
    cluster.stop_and_check(&[]);
}

#[test]
fn reveals_reach_every_node_and_bad_reveals_are_typed_errors() {
    let cluster = Cluster::start_forwarding(3, |_| {});
    run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let follower = cluster
            .nodes
            .iter()
            .find(|(id, _)| **id != leader)
            .map(|(_, n)| n.clone())
            .unwrap();
        let node = &cluster.nodes[&leader];
        let key = [42u8; 32];
        let secret = encrypted_transaction(1, &key, &[3; NONCE_BYTES], b"swap 1 ETH for 3000 USDC");
        let h = secret.tx_hash();
        let receipt = follower
            .submit_with(vec![secret], AckLevel::Committed)
            .await
            .remove(0)
            .expect("an encrypted transaction is ordered blind");

        // Bad reveals change nothing.
        let cases = [
            (h, [1u8; 32], CommandRejection::WrongKey { tx_hash: h }),
            (
                TxHash([9; 32]),
                key,
                CommandRejection::UnknownTx {
                    tx_hash: TxHash([9; 32]),
                },
            ),
            (
                raw(1, 5).tx_hash(),
                key,
                CommandRejection::UnknownTx {
                    tx_hash: raw(1, 5).tx_hash(),
                },
            ),
        ];
        // The leader must have applied the batch to judge the reveal.
        node.wait_for(WAIT, move |s| s.applied_index >= Some(receipt.index()))
            .await
            .unwrap();
        for (tx_hash, key, want) in cases {
            assert_eq!(
                node.reveal(tx_hash, key).await,
                Err(SubmitError::Command(want))
            );
        }
        // A follower refuses writes with a hint to the leader.
        assert!(matches!(
            follower.reveal(h, key).await,
            Err(SubmitError::NotLeader { leader_hint: Some(l) }) if l == leader
        ));

        let revealed = node.reveal(h, key).await.expect("reveal");
        assert_eq!(revealed.applied, CommandApplied::Revealed { tx_hash: h });
        assert_eq!(
            node.reveal(h, key).await,
            Err(SubmitError::Command(CommandRejection::AlreadyRevealed {
                tx_hash: h
            }))
        );
        // Read-your-writes on the follower: it waits until it applied the reveal.
        let read = follower
            .read(Consistency::MinIndex(revealed.index), WAIT, move |s| {
                s.rollups().secret(&h).map(|s| s.state.clone())
            })
            .await
            .expect("read");
        assert!(read.applied_index >= revealed.index);
        let Some(SecretState::Revealed {
            plaintext, key: k, ..
        }) = read.value
        else {
            panic!("revealed on the follower: {:?}", read.value)
        };
        assert_eq!(
            (plaintext.as_slice(), k),
            (&b"swap 1 ETH for 3000 USDC"[..], key)
        );

        // The block holding it counts it revealed, on every node.
        let b = wait_block(&follower, 1, 1).await;
        let tx = b
            .txs
            .as_ref()
            .unwrap()
            .iter()
            .find(|t| t.tx_hash == h)
            .unwrap();
        assert_eq!(
            tx.plaintext.as_deref(),
            Some(&b"swap 1 ETH for 3000 USDC"[..])
        );
        assert_eq!((b.block.meta.encrypted, b.block.meta.revealed), (1, 1));
    });
    cluster.stop_and_check(&[]);
}

#[test]
fn linearizable_and_min_index_reads_on_followers() {
    let cluster = Cluster::start_forwarding(3, |_| {});
    run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let followers: Vec<NodeHandle> = cluster
            .nodes
            .iter()
            .filter(|(id, _)| **id != leader)
            .map(|(_, n)| n.clone())
            .collect();
        for i in 0..5 {
            let r = cluster.nodes[&leader].submit(vec![raw(1, 100 + i)]).await;
            let r = r[0].clone().expect("sequenced");
            // Linearizable: whatever was acknowledged before the read is visible on any node.
            for f in &followers {
                let h = r.tx_hash;
                let read = f
                    .read(Consistency::Linearizable, WAIT, move |s| s.lookup(&h))
                    .await
                    .expect("linearizable read");
                assert!(read.applied_index >= r.index());
                assert_eq!(read.value.map(|p| p.index), Some(r.index()));
            }
        }
        // A min_index beyond the log times out with a typed error, not a stale answer.
        let f = &followers[0];
        let err = f
            .read(
                Consistency::MinIndex(1_000_000),
                Duration::from_millis(200),
                |_| (),
            )
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            SubmitError::ReadTimeout {
                min_index: 1_000_000,
                ..
            }
        ));
        // The leader serves a read index.
        assert!(cluster.nodes[&leader].read_index().await.unwrap() > 0);
        assert!(matches!(
            f.read_index().await,
            Err(SubmitError::NotLeader { .. })
        ));
    });
    cluster.stop_and_check(&[]);
}
