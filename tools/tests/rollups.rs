//! Rollups, blocks, reveals and reads against real `baton cluster up` processes:
//!
//! - the `baton admin rollup add`, `baton reveal`, `baton tx` and `baton block` commands, and
//!   typed refusals over the wire (unknown rollup, wrong key, duplicate registration);
//! - a follower's block stream equals the leader's, every block signed by a cluster key;
//! - a preconfirmed batch the leader could not replicate before it was killed is lost, and the
//!   loss is provable: the receipt is signed by that leader for its term, and the committed log
//!   holds another term's entry at that index;
//! - committed receipts survive repeated leader kills: every node reports the same position and
//!   signed header for each.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use baton_core::command::CommandRejection;
use baton_core::encrypted::{encrypted_transaction, NONCE_BYTES};
use baton_core::node::{Consistency, Receipt, SubmitError};
use baton_core::sign::hex;
use baton_core::{AckLevel, Address, Transaction, TxKind};
use baton_net::rollup_msg::{Answer, Query};
use baton_net::ClientError;
use common::*;

const WAIT: Duration = Duration::from_secs(20);

fn baton(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BATON).args(args).output().expect("run baton");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn raw(rollup_id: u64, tag: &str, i: u64) -> Transaction {
    Transaction {
        rollup_id,
        kind: TxKind::Raw,
        bytes: format!("{tag}-{i:06}").into_bytes(),
    }
}

#[test]
fn blocks_reveals_and_reads_on_a_real_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterUp::start(dir.path(), 3, free_base_port(3));
    let d = dir.path().to_str().unwrap();
    let keys: Vec<Address> = signers(dir.path()).into_iter().map(|(_, a)| a).collect();

    // Register rollup 9 with the CLI; twice is a typed refusal.
    let add = [
        "admin",
        "rollup",
        "add",
        "--cluster",
        d,
        "--id",
        "9",
        "--block-time-ms",
        "50",
        "--max-block-txs",
        "20",
        "--reveal-window-blocks",
        "1000",
        "--json",
    ];
    let (code, out, err) = baton(&add);
    assert_eq!(code, 0, "{out}{err}");
    let registered: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let reg_index = registered["index"].as_u64().unwrap();
    let (code, _, err) = baton(&add);
    assert_eq!(code, 1);
    assert!(err.contains("already registered"), "{err}");

    let rt = runtime();
    let leader =
        rt.block_on(async { leader_seen_by(&cluster.client_of(cluster.leader), WAIT).await });
    let follower = cluster.nodes.iter().find(|n| n.id != leader).unwrap().id;
    let key = [7u8; 32];
    let secret = encrypted_transaction(9, &key, &[1; NONCE_BYTES], b"bid 42");
    let h = secret.tx_hash();
    let reveal_index = rt.block_on(async {
        let client = cluster.client_from(follower);
        // Unknown rollups are refused per transaction, through the wire.
        let r = client.submit(vec![raw(77, "x", 0)]).await.unwrap();
        assert_eq!(
            r[0],
            Err(SubmitError::UnknownRollup {
                position: 0,
                rollup_id: 77
            })
        );
        // The follower must know rollup 9 before it accepts its transactions.
        client
            .read(Query::Rollups, Consistency::MinIndex(reg_index), WAIT)
            .await
            .unwrap();
        let mut txs: Vec<Transaction> = (0..60).map(|i| raw(9, "blk", i)).collect();
        txs.insert(17, secret.clone());
        for chunk in txs.chunks(10) {
            for r in client.submit(chunk.to_vec()).await.unwrap() {
                r.expect("sequenced");
            }
        }
        client.close().await;

        // A wrong key through the CLI is refused with the typed reason.
        let bad_key = hex(&[8u8; 32]);
        let tx = h.to_string();
        let (code, _, err) = baton(&["reveal", "--cluster", d, "--tx", &tx, "--key", &bad_key]);
        assert_eq!(code, 1);
        assert!(err.contains("does not match"), "{err}");
        let (code, out, err) = baton(&[
            "reveal",
            "--cluster",
            d,
            "--tx",
            &tx,
            "--key",
            &hex(&key),
            "--json",
        ]);
        assert_eq!(code, 0, "{out}{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["revealed_at"].as_u64().unwrap()
    });

    // The follower reads the plaintext once it has applied the reveal (read-your-writes).
    let follower_addr = cluster.node(follower).addr.to_string();
    let (code, out, err) = baton(&[
        "tx",
        &h.to_string(),
        "--cluster",
        d,
        "--node",
        &follower_addr,
        "--min-index",
        &reveal_index.to_string(),
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["tx"]["reveal"]["status"], "revealed");
    assert_eq!(
        v["tx"]["reveal"]["plaintext"],
        format!("0x{}", hex(b"bid 42"))
    );
    assert_eq!(v["tx"]["rollup_id"], 9);

    // Block streams from the leader and from a follower: the same blocks, all signed by a
    // cluster key, together holding every transaction once.
    let streams = rt.block_on(async {
        let mut out = HashMap::new();
        for via in [leader, follower] {
            let client = cluster.client_of(via);
            // Both nodes have applied the reveal, so block metadata is final for the test.
            client
                .read(Query::Rollups, Consistency::MinIndex(reveal_index), WAIT)
                .await
                .unwrap();
            let mut stream = client.subscribe_blocks(9, 1);
            let mut blocks = Vec::new();
            let mut txs = 0;
            while txs < 61 {
                let e = tokio::time::timeout(WAIT, stream.next())
                    .await
                    .expect("blocks keep coming")
                    .expect("block");
                txs += e.block.block.signed.header.tx_count;
                blocks.push(e.block);
            }
            assert_eq!(txs, 61, "no transaction twice");
            out.insert(via, blocks);
        }
        out
    });
    assert_eq!(
        streams[&leader], streams[&follower],
        "the follower's blocks equal the leader's"
    );
    let blocks = &streams[&leader];
    assert!(blocks.len() >= 4, "blocks of at most 20: {}", blocks.len());
    for b in blocks {
        b.block
            .signed
            .verify(&keys)
            .expect("block signed by a cluster key");
        assert!(b.block.signed.header.tx_count <= 20);
    }
    let with_secret = blocks
        .iter()
        .find(|b| b.txs.as_ref().unwrap().iter().any(|t| t.tx_hash == h))
        .unwrap();
    assert_eq!(
        (
            with_secret.block.meta.encrypted,
            with_secret.block.meta.revealed
        ),
        (1, 1)
    );

    // `baton block` prints the same block.
    let height = with_secret.block.signed.header.height.to_string();
    let (code, out, err) = baton(&[
        "block",
        "--cluster",
        d,
        "--rollup",
        "9",
        "--height",
        &height,
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v["block"]["header"]["digest"],
        format!("0x{}", hex(&with_secret.block.signed.header.digest()))
    );
    assert_eq!(v["block"]["meta"]["revealed"], 1);
    // A reveal of a raw transaction is refused.
    rt.block_on(async {
        let client = cluster.client_from(leader);
        let e = client.reveal(raw(9, "blk", 3).tx_hash(), key).await;
        assert!(
            matches!(
                e,
                Err(ClientError::NotSequenced(SubmitError::Command(
                    CommandRejection::NotEncrypted { .. }
                )))
            ),
            "{e:?}"
        );
        client.close().await;
    });
    // A subscription whose node dies resumes on another node from the next height.
    rt.block_on(async {
        let client = cluster.client_from(follower);
        let mut stream = client.subscribe_blocks(9, 1);
        let first = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.block, blocks[0]);
        cluster.kill(follower);
        for b in &blocks[1..] {
            let e = tokio::time::timeout(WAIT, stream.next())
                .await
                .expect("the stream resumes within the budget")
                .expect("block after failover");
            assert_eq!(
                &e.block, b,
                "same blocks, in order, none skipped or repeated"
            );
        }
        // Those blocks may all have been on their way before the kill (the node streams what
        // is sealed as fast as it can); a block sealed after it can only come from another node.
        let submitter = cluster.client_of(leader);
        let more: Vec<Transaction> = (60..65).map(|i| raw(9, "blk", i)).collect();
        for r in submitter.submit(more).await.unwrap() {
            r.expect("sequenced");
        }
        submitter.close().await;
        let after = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("a block sealed after the kill arrives within the budget")
            .expect("block sealed after the kill");
        let last = blocks.last().unwrap().block.signed.header.height;
        assert_eq!(after.block.block.signed.header.height, last + 1);
        assert!(after.block.block.signed.header.tx_count >= 1);
        assert_ne!(
            client.connected_to().await,
            Some(cluster.node(follower).addr)
        );
    });
    cluster.stop();
}

#[test]
fn a_lost_preconfirmation_is_attributable_to_the_old_leaders_term() {
    let dir = tempfile::tempdir().unwrap();
    // Long election timeouts: the leader keeps its lease for a while after its followers die.
    let mut cluster = ClusterUp::start_with(
        dir.path(),
        3,
        free_base_port(3),
        &["--election-timeout-min-ms", "2000"],
    );
    let keys = signers(dir.path());
    let all: Vec<Address> = keys.iter().map(|(_, a)| *a).collect();
    let rt = runtime();
    let old = rt.block_on(async { leader_seen_by(&cluster.client_of(cluster.leader), WAIT).await });
    let followers: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|&id| id != old)
        .collect();
    let lost: Receipt = rt.block_on(async {
        let client = cluster.client_of(old);
        // A commit right before the freeze refreshes the leader's lease.
        client.submit(txs("before", 0, 1)).await.unwrap()[0]
            .clone()
            .unwrap();
        // The followers die (with whatever their sockets had buffered): nobody else can get
        // the next batch.
        for &f in &followers {
            cluster.kill(f);
        }
        let r = client
            .submit_with(txs("lost", 0, 1), AckLevel::Preconfirmed)
            .await
            .unwrap();
        r[0].clone().expect("the isolated leader preconfirms")
    });
    assert_eq!(lost.level, AckLevel::Preconfirmed);
    let old_key = keys.iter().find(|(id, _)| *id == old).unwrap().1;
    assert_eq!(
        lost.verify(&all).unwrap(),
        old_key,
        "signed by the old leader"
    );
    let (lost_term, lost_index) = (lost.term(), lost.index());

    // The old leader dies too, before anyone has the batch; the others come back from their
    // WALs and elect a new leader.
    cluster.kill(old);
    for &f in &followers {
        cluster.restart(f);
    }
    let committed = rt.block_on(async {
        let client = cluster.client_from(followers[0]);
        let mut receipts = Vec::new();
        // Write until the new leader's log is past the lost index (bounded).
        for round in 0..50 {
            let r = client.submit(txs("after", round * 10, 10)).await.unwrap();
            receipts.extend(r.into_iter().map(|r| r.expect("committed after failover")));
            if receipts.iter().any(|r: &Receipt| r.index() > lost_index) {
                break;
            }
        }
        assert!(receipts.iter().any(|r| r.index() > lost_index));
        for r in &receipts {
            assert!(
                r.term() > lost_term,
                "the new leader's receipts carry a later term"
            );
        }
        // No node has the lost transaction.
        for &f in &followers {
            let read = cluster
                .client_of(f)
                .read(Query::Tx(lost.tx_hash), Consistency::Linearizable, WAIT)
                .await
                .unwrap();
            assert_eq!(read.value, Answer::Tx(None));
        }
        client.close().await;
        receipts
    });
    // The old leader comes back, drops its unreplicated entry and follows.
    cluster.restart(old);
    let last = committed.iter().map(|r| r.index()).max().unwrap();
    rt.block_on(async { wait_applied(&cluster.client_of(old), last, WAIT).await });
    let nodes = cluster.stop();
    let logs: HashMap<u64, Log> = nodes
        .iter()
        .map(|n| (n.id, Log::read(&n.data_dir)))
        .collect();
    let log = check_logs_agree(&logs);
    // The proof: the receipt is the old leader's signature over (term, index), and the
    // committed log holds an entry of a later term at that index, without the transaction.
    let (term_at, hashes) = &log.entries[&lost_index];
    assert!(
        *term_at > lost_term,
        "index {lost_index} holds term {term_at}"
    );
    assert!(!hashes.iter().flatten().any(|h| *h == lost.tx_hash));
    for log in logs.values() {
        assert!(log
            .entries
            .values()
            .all(|(_, h)| !h.iter().flatten().any(|h| *h == lost.tx_hash)));
    }
    check_receipts(&logs, &committed);
}

#[test]
fn committed_receipts_survive_repeated_leader_kills() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterUp::start(dir.path(), 3, free_base_port(3));
    let all: Vec<Address> = signers(dir.path()).into_iter().map(|(_, a)| a).collect();
    let rt = runtime();
    let mut receipts: Vec<Receipt> = Vec::new();
    for round in 0..3u64 {
        let leader = rt.block_on(async {
            let any = cluster.nodes.iter().map(|n| n.id).find(|_| true).unwrap();
            let client = cluster.client_from(any);
            for i in 0..10 {
                let r = client
                    .submit(txs(&format!("kill{round}"), i * 20, 20))
                    .await
                    .unwrap();
                receipts.extend(r.into_iter().map(|r| r.expect("committed")));
            }
            client.close().await;
            let mut leader = None;
            for n in &cluster.nodes {
                if let Ok(s) = cluster.client_of(n.id).status().await {
                    if s.role == baton_core::node::Role::Leader {
                        leader = Some(n.id);
                    }
                }
            }
            leader.expect("a leader")
        });
        cluster.kill(leader);
        cluster.restart(leader);
    }
    // Every node, after applying everything, places every receipt where it said and proves it
    // with the same signed header.
    let last = receipts.iter().map(|r| r.index()).max().unwrap();
    rt.block_on(async {
        for n in &cluster.nodes {
            let client = cluster.client_of(n.id);
            wait_applied(&client, last, WAIT).await;
            for r in receipts.iter().step_by(7) {
                r.verify(&all).expect("receipt verifies offline");
                let read = client
                    .read(Query::Tx(r.tx_hash), Consistency::Local, WAIT)
                    .await
                    .unwrap();
                let Answer::Tx(Some(info)) = read.value else {
                    panic!("node {} lost {}", n.id, r.tx_hash)
                };
                assert_eq!((info.index, info.offset), (r.index(), r.offset));
                let own = info.receipt.expect("provable from the log");
                assert_eq!(own.batch, r.batch, "same signed header on node {}", n.id);
                assert_eq!(info.rollup_id, Some(1));
                assert!(info.reveal.is_none());
            }
            client.close().await;
        }
    });
    let nodes = cluster.stop();
    let logs: HashMap<u64, Log> = nodes
        .iter()
        .map(|n| (n.id, Log::read(&n.data_dir)))
        .collect();
    check_logs_agree(&logs);
    check_receipts(&logs, &receipts);
}
