//! In-process multi-node clusters: 3 nodes, each with its own shard threads and real WAL
//! directory, connected by the in-process channel network. Election, replication of thousands of
//! batches, leader stop and re-election, follower restart from its WAL, and catch-up by snapshot
//! after the leader purged its log. After every scenario: all nodes' logs are identical where
//! they overlap, and every returned receipt points at its transaction's first position in the
//! log (later copies are duplicates the state machine does not order again).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use baton_core::node::{
    LeadershipRejection, MemberChange, MembershipRejection, NodeConfig, NodeHandle, Receipt, Role,
    SubmitError,
};
use baton_core::{Transaction, TxHash, TxKind};
use common::*;

const WAIT: Duration = Duration::from_secs(20);

fn txs(from: u64, n: u64) -> Vec<Transaction> {
    (from..from + n)
        .map(|i| Transaction {
            rollup_id: 1,
            kind: TxKind::Raw,
            bytes: format!("tx-{i:08}-{}", "x".repeat(100)).into_bytes(),
        })
        .collect()
}

/// Submits `requests` requests of `per_request` transactions each to `node`, `concurrency` at a
/// time; returns every receipt (all must succeed).
async fn load(
    node: &NodeHandle,
    first: u64,
    requests: u64,
    per_request: u64,
    concurrency: usize,
) -> Vec<Receipt> {
    let mut receipts = Vec::new();
    let mut next = 0;
    while next < requests {
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            if next == requests {
                break;
            }
            let node = node.clone();
            let batch = txs(first + next * per_request, per_request);
            tasks.push(glommio::spawn_local(
                async move { node.submit(batch).await },
            ));
            next += 1;
        }
        for t in tasks {
            for r in t.await {
                match r {
                    Ok(r) => receipts.push(r),
                    Err(e) => panic!(
                        "submission to node {} failed: {e:?}; its status: {:?}",
                        node.id(),
                        node.status().await
                    ),
                }
            }
        }
    }
    receipts
}

fn small_batches(c: &mut NodeConfig) {
    c.batch.batch_txs_max = 4;
    c.batch.linger_us = 200;
}

/// Election timeouts of 1-2 s instead of 200-400 ms, for tests that are not about how fast a
/// failure is noticed: a loaded CI machine (two in-process clusters on two cores) can hold a
/// node up for a few hundred milliseconds, and an unplanned election would change what they
/// check. The bounds of a leadership transfer scale with these.
fn steady(c: &mut NodeConfig) {
    c.raft.election_timeout_min_ms = 1_000;
    c.raft.election_timeout_max_ms = 2_000;
}

#[test]
fn three_nodes_elect_replicate_thousands_of_batches_and_agree() {
    let cluster = Cluster::start(3, small_batches);
    let receipts = run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let receipts = load(&cluster.nodes[&leader], 0, 250, 40, 8).await;
        assert_eq!(receipts.len(), 10_000);
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        assert!(last > 2_000, "10k transactions in batches of at most 4 make thousands of batches (last index {last})");
        cluster.wait_all_applied(last, WAIT).await;
        receipts
    });
    cluster.stop_and_check(&receipts);
}

#[test]
fn nodes_with_two_shards_route_batch_and_agree() {
    let cluster = Cluster::start(3, |c| {
        c.shards = 2;
        small_batches(c);
    });
    let receipts = run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let receipts = load(&cluster.nodes[&leader], 0, 60, 25, 6).await;
        assert_eq!(receipts.len(), 1500);
        // A request's transactions are split between shards and answered in request order.
        let mixed = txs(2_000_000, 16);
        let hashes: Vec<TxHash> = mixed.iter().map(|t| t.tx_hash()).collect();
        let answers = cluster.nodes[&leader].submit(mixed).await;
        let got: Vec<TxHash> = answers
            .iter()
            .map(|r| r.as_ref().unwrap().tx_hash)
            .collect();
        assert_eq!(got, hashes);
        let mut all = receipts;
        all.extend(answers.into_iter().map(Result::unwrap));
        all
    });
    cluster.stop_and_check(&receipts);
}

/// A leader asked to stop hands leadership to an up-to-date voter before it stops: by the time
/// its shutdown returns, another node already leads, the one that accepted the transfer.
#[test]
fn a_stopping_leader_hands_over_before_it_stops() {
    let mut cluster = Cluster::start(3, steady);
    let (old, receipts) = run(async {
        let old = cluster.wait_leader(WAIT).await;
        let mut receipts = load(&cluster.nodes[&old], 0, 20, 20, 4).await;
        let term = cluster.nodes[&old].status().await.unwrap().term;
        cluster.nodes[&old].shutdown().await;
        let mut leaders = Vec::new();
        for (&id, node) in &cluster.nodes {
            if id != old {
                let s = node.status().await.unwrap();
                if s.role == Role::Leader {
                    assert!(s.term > term, "{s:?}");
                    leaders.push(id);
                }
            }
        }
        assert_eq!(leaders.len(), 1, "another node leads as the old one stops");
        // By a transfer the new leader accepted, not an election after a timeout.
        assert_eq!(cluster.router.transfers(), leaders);
        receipts.extend(load(&cluster.nodes[&leaders[0]], 10_000, 20, 20, 4).await);
        (old, receipts)
    });
    cluster.nodes[&old].join();
    cluster.stopped.push(old);
    cluster.stop_and_check(&receipts);
}

/// An operator moves leadership to a named voter (a second transfer asked meanwhile is refused
/// as in progress), then to whichever voter is furthest along:
/// each time the named (or chosen) node took over by the transfer it accepted, not by an
/// election, and writes go on through it. Every receipt is in the logs afterwards.
#[test]
fn leadership_moves_where_it_is_asked_to_and_writes_go_on() {
    let cluster = Cluster::start(3, |c| {
        small_batches(c);
        steady(c);
    });
    let receipts = run(async {
        let first = cluster.wait_leader(WAIT).await;
        let mut receipts = load(&cluster.nodes[&first], 0, 20, 10, 4).await;
        let term = cluster.nodes[&first].status().await.unwrap().term;
        let to = *cluster.nodes.keys().find(|&&id| id != first).unwrap();
        // One transfer at a time: a second asked while the first runs is refused (retryable).
        let (moved, busy) = futures_util::future::join(
            cluster.nodes[&first].transfer_leader(Some(to)),
            cluster.nodes[&first].transfer_leader(None),
        )
        .await;
        assert_eq!(
            busy,
            Err(SubmitError::Leadership(LeadershipRejection::InProgress))
        );
        let moved = moved.expect("moved");
        assert_eq!((moved.from, moved.leader), (first, to), "{moved:?}");
        assert!(moved.term > term, "{moved:?}");
        assert_eq!(cluster.router.transfers(), vec![to]);
        let s = cluster.nodes[&to].status().await.unwrap();
        assert_eq!((s.role, s.term), (Role::Leader, moved.term));
        // The old leader no longer takes writes; the new one does.
        assert!(matches!(
            cluster.nodes[&first].submit(txs(900_000, 1)).await.pop(),
            Some(Err(SubmitError::NotLeader { .. }))
        ));
        receipts.extend(load(&cluster.nodes[&to], 10_000, 20, 10, 4).await);
        // Unnamed: the voter furthest along that answered lately, which is not `to` itself.
        cluster.nodes[&to]
            .wait_for(WAIT, |s| {
                s.replication.len() == 2 && s.replication.iter().all(|p| p.last_heard_ms.is_some())
            })
            .await
            .expect("the new leader hears from both followers");
        let again = cluster.nodes[&to]
            .transfer_leader(None)
            .await
            .expect("moved again");
        assert_eq!(again.from, to);
        assert_ne!(again.leader, to);
        assert!(again.term > moved.term, "{again:?}");
        assert_eq!(cluster.router.transfers(), vec![to, again.leader]);
        receipts.extend(load(&cluster.nodes[&again.leader], 20_000, 20, 10, 4).await);
        receipts
    });
    cluster.stop_and_check(&receipts);
}

/// What a leadership transfer refuses, typed, without moving anything: asked of a follower
/// (`NotLeader` with the hint), to a node that is not a member, to a learner, to a voter that
/// stopped answering; asked to keep the leader, it answers at once with nothing changed.
#[test]
fn leadership_transfer_refusals_are_typed_and_change_nothing() {
    let tweak = |c: &mut NodeConfig| {
        small_batches(c);
        steady(c);
    };
    let mut cluster = Cluster::start(3, tweak);
    let leader = run(cluster.wait_leader(WAIT));
    let mut followers = cluster.nodes.keys().copied().filter(|&id| id != leader);
    let (follower, silent) = (followers.next().unwrap(), followers.next().unwrap());
    cluster.start_node(4, tweak);
    let receipts = run(async {
        let l = &cluster.nodes[&leader];
        let receipts = load(l, 0, 10, 10, 2).await;
        let term = l.status().await.unwrap().term;
        assert_eq!(
            cluster.nodes[&follower]
                .transfer_leader(Some(follower))
                .await,
            Err(SubmitError::NotLeader {
                leader_hint: Some(leader)
            })
        );
        let refused = |r| Err(SubmitError::Leadership(r));
        assert_eq!(
            l.transfer_leader(Some(9)).await,
            refused(LeadershipRejection::NotAMember { id: 9 })
        );
        let add4 = MemberChange::Add {
            id: 4,
            addr: "127.0.0.1:1004".into(),
            voter: false,
        };
        l.change_members(add4, WAIT).await.expect("learner 4");
        assert_eq!(
            l.transfer_leader(Some(4)).await,
            refused(LeadershipRejection::NotAVoter { id: 4 })
        );
        let kept = l.transfer_leader(Some(leader)).await.expect("kept");
        assert_eq!((kept.from, kept.leader, kept.term), (leader, leader, term));
        // A voter cut off from the leader: once it has been silent for the longest election
        // timeout, it is not handed leadership (that would leave the cluster to an election).
        cluster.router.isolate(silent, &[leader, follower, 4]);
        let quiet_ms = cluster.configs[&leader].raft.election_timeout_max_ms;
        l.wait_for(WAIT, move |s| {
            s.replication
                .iter()
                .any(|p| p.id == silent && p.last_heard_ms.is_some_and(|ms| ms > quiet_ms))
        })
        .await
        .expect("the leader notices the silence");
        assert_eq!(
            l.transfer_leader(Some(silent)).await,
            refused(LeadershipRejection::Unreachable { id: silent })
        );
        let s = l.status().await.unwrap();
        assert_eq!((s.role, s.term), (Role::Leader, term), "nothing moved");
        assert!(cluster.router.transfers().is_empty());
        cluster.router.heal_all();
        receipts
    });
    cluster.stop_and_check(&receipts);
}

/// A transfer the named node never completes is not reported as done, and says what happened
/// instead. The target is cut off just after the leader last heard from it (so the transfer is
/// accepted and the old leader, as openraft does while it hands over, stops its heartbeats and
/// takes no writes): the third node's election timer fires and it wins (`TakenOverBy`); with the
/// third node also cut off from the old leader nobody can win within the wait (`NotTakenOver`).
/// Either way the named node never accepted the transfer, and writes go on once the network
/// heals.
#[test]
fn a_transfer_nobody_completes_is_refused_with_what_happened_instead() {
    for isolated_third in [false, true] {
        let cluster = Cluster::start(3, |c| {
            small_batches(c);
            steady(c);
        });
        let receipts = run(async {
            let leader = cluster.wait_leader(WAIT).await;
            let mut receipts = load(&cluster.nodes[&leader], 0, 10, 10, 2).await;
            let mut others = cluster.nodes.keys().copied().filter(|&id| id != leader);
            let (to, third) = (others.next().unwrap(), others.next().unwrap());
            cluster.router.isolate(to, &[leader, third]);
            if isolated_third {
                cluster.router.cut(leader, third);
            }
            let r = cluster.nodes[&leader].transfer_leader(Some(to)).await;
            if isolated_third {
                assert!(
                    matches!(
                        r,
                        Err(SubmitError::Leadership(
                            LeadershipRejection::NotTakenOver { .. }
                        ))
                    ),
                    "{r:?}"
                );
                for (&id, node) in &cluster.nodes {
                    let s = node.status().await.unwrap();
                    assert!(
                        id == leader || s.role != Role::Leader,
                        "node {id} leads: {s:?}"
                    );
                }
            } else {
                assert_eq!(
                    r,
                    Err(SubmitError::Leadership(LeadershipRejection::TakenOverBy {
                        leader: third
                    }))
                );
            }
            assert!(cluster.router.transfers().is_empty());
            cluster.router.heal_all();
            receipts.extend(submit_until_committed(&cluster, txs(700_000, 10), WAIT).await);
            receipts
        });
        cluster.stop_and_check(&receipts);
    }
}

/// Batches a stopping leader's own clients had in flight go to the new leader once the handoff
/// is done, not again at every change of the old leader's metrics while it runs: no batch is in
/// the log more than twice (a batch sent before and after a leader change may commit twice; the
/// second copy is a duplicate the state machine does not order again).
#[test]
fn batches_in_flight_during_a_handoff_are_not_sent_again_and_again() {
    let cluster = Cluster::start_forwarding(3, |c| {
        small_batches(c);
        c.commit_wait_ms = 10_000;
    });
    let (old, receipts) = run(async {
        let old = cluster.wait_leader(WAIT).await;
        let mut tasks = Vec::new();
        for k in 0..8u64 {
            let n = cluster.nodes[&old].clone();
            tasks.push(glommio::spawn_local(async move {
                let mut ok = Vec::new();
                for i in 0..50 {
                    match n.submit(txs(k * 100_000 + i * 10, 10)).await.pop() {
                        Some(Ok(r)) => ok.push(r),
                        _ => break,
                    }
                }
                ok
            }));
        }
        let start = cluster.nodes[&old].status().await.unwrap().applied_index;
        cluster.nodes[&old]
            .wait_for(WAIT, move |s| s.applied_index >= start.map(|i| i + 20))
            .await
            .expect("the load runs");
        cluster.nodes[&old].shutdown().await;
        let mut receipts = Vec::new();
        for t in tasks {
            receipts.extend(t.await);
        }
        (old, receipts)
    });
    cluster.nodes[&old].join();
    for (id, n) in &cluster.nodes {
        if *id != old {
            run(n.shutdown());
            n.join();
        }
    }
    let logs: HashMap<u64, Log> = cluster
        .configs
        .iter()
        .map(|(&id, c)| (id, Log::read(&c.data_dir)))
        .collect();
    check_prefixes(&logs);
    check_receipts(&logs, &receipts);
    let longest = logs.values().max_by_key(|l| l.last_index()).unwrap();
    let mut copies: HashMap<&Vec<TxHash>, usize> = HashMap::new();
    for (_, hashes) in longest.batches() {
        *copies.entry(hashes).or_default() += 1;
    }
    let most = copies.values().max().copied().unwrap_or(0);
    assert!(most <= 2, "a batch is in the log {most} times");
}

#[test]
fn a_stopped_leader_is_replaced_and_the_cluster_continues() {
    let mut cluster = Cluster::start(3, |_| {});
    let mut receipts = run(async {
        let old = cluster.wait_leader(WAIT).await;
        let mut receipts = load(&cluster.nodes[&old], 0, 50, 20, 4).await;
        cluster.nodes[&old].shutdown().await;
        let survivor = *cluster.nodes.keys().find(|&&id| id != old).unwrap();
        let status = cluster.nodes[&survivor]
            .wait_for(WAIT, move |s| {
                s.leader.is_some_and(|l| l != old) && s.role != Role::Candidate
            })
            .await
            .expect("a new leader is elected");
        let new = status.leader.unwrap();
        receipts.extend(load(&cluster.nodes[&new], 10_000, 50, 20, 4).await);
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        for (&id, node) in &cluster.nodes {
            if id != old {
                node.wait_for(WAIT, move |s| s.applied_index >= Some(last))
                    .await
                    .expect("survivors apply everything");
            }
        }
        (old, receipts)
    });
    let old = receipts.0;
    cluster.nodes[&old].join();
    cluster.stopped.push(old);
    let receipts = std::mem::take(&mut receipts.1);
    cluster.stop_and_check(&receipts);
}

#[test]
fn a_restarted_follower_recovers_from_its_wal_and_catches_up() {
    let mut cluster = Cluster::start(3, |_| {});
    let (follower, mut receipts) = run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let receipts = load(&cluster.nodes[&leader], 0, 40, 25, 4).await;
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        cluster.wait_all_applied(last, WAIT).await;
        let follower = *cluster.nodes.keys().find(|&&id| id != leader).unwrap();
        cluster.nodes[&follower].shutdown().await;
        (follower, receipts)
    });
    cluster.nodes[&follower].join();
    let more = run(async {
        let leader = cluster.wait_leader(WAIT).await;
        load(&cluster.nodes[&leader], 100_000, 40, 25, 4).await
    });
    receipts.extend(more);
    cluster.restart(follower);
    run(async {
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        cluster.nodes[&follower]
            .wait_for(WAIT, move |s| s.applied_index >= Some(last))
            .await
            .expect("the restarted follower catches up");
    });
    cluster.stop_and_check(&receipts);
}

#[test]
fn a_follower_far_behind_catches_up_by_snapshot_after_the_leader_purged() {
    let tweak = |c: &mut NodeConfig| {
        small_batches(c);
        c.raft.snapshot_every_entries = 50;
        c.raft.log_entries_kept_after_snapshot = 10;
        // Small segments, so that purging behind the snapshot deletes files.
        c.wal = baton_wal::WalOptions::small_for_tests();
        c.batch.batch_bytes_max = 8 << 10;
    };
    let mut cluster = Cluster::start(3, tweak);
    let (follower, leader, mut receipts) = run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let follower = *cluster.nodes.keys().find(|&&id| id != leader).unwrap();
        let receipts = load(&cluster.nodes[&leader], 0, 10, 10, 2).await;
        cluster.nodes[&follower].shutdown().await;
        (follower, leader, receipts)
    });
    cluster.nodes[&follower].join();
    // Everything the follower holds is at or below this index.
    let follower_last = receipts.iter().map(|r| r.index()).max().unwrap() + 1;
    let leader_dir = cluster.dir_of(leader);
    let (more, purged_past) = run(async {
        let mut more = load(&cluster.nodes[&leader], 50_000, 200, 10, 4).await;
        // Purged past the follower's log: it can only catch up by snapshot.
        let mut s = cluster.nodes[&leader]
            .wait_for(WAIT, move |s| {
                s.purged_index.is_some_and(|i| i > follower_last + 10)
            })
            .await
            .expect("the leader snapshots and purges its log");
        // The WAL deletes whole segments only: a purge point inside the first segment (under
        // load the leader packs more per entry, so fewer entries and later boundaries) leaves
        // its file. Load more, each round awaiting the next purge, until the head is gone.
        for round in 0..20u64 {
            if wal_first_index(&leader_dir) > 1 {
                break;
            }
            let purged = s.purged_index;
            let from = 100_000 + round * 10_000;
            more.extend(load(&cluster.nodes[&leader], from, 100, 10, 4).await);
            s = cluster.nodes[&leader]
                .wait_for(WAIT, move |s| s.purged_index > purged)
                .await
                .expect("the leader purges again");
        }
        (more, s.purged_index.unwrap())
    });
    receipts.extend(more);
    assert!(
        wal_first_index(&leader_dir) > 1,
        "the leader deleted the head of its log (purged through {purged_past})"
    );
    cluster.restart(follower);
    run(async {
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        let s = cluster.nodes[&follower]
            .wait_for(WAIT, move |s| s.applied_index >= Some(last))
            .await
            .expect("the lagging follower catches up");
        assert!(
            s.snapshot_index.is_some(),
            "it caught up by installing a snapshot"
        );
    });
    cluster.stop_and_check(&receipts);
}

/// A node added while the cluster runs, after the leader purged the log it would need, is brought
/// up to date by snapshot and becomes a voter; the refusals are typed and change nothing; a
/// node that never answers stays a learner after the catch-up wait and can be removed; removing
/// the leader hands leadership to another voter, and the cluster goes on without it.
#[test]
fn members_are_added_and_removed_while_the_cluster_runs() {
    let tweak = |c: &mut NodeConfig| {
        small_batches(c);
        c.raft.snapshot_every_entries = 50;
        c.raft.log_entries_kept_after_snapshot = 10;
        c.wal = baton_wal::WalOptions::small_for_tests();
        c.batch.batch_bytes_max = 8 << 10;
    };
    let mut cluster = Cluster::start(3, tweak);
    let leader = run(cluster.wait_leader(WAIT));
    let mut receipts = run(async {
        let receipts = load(&cluster.nodes[&leader], 0, 100, 10, 4).await;
        cluster.nodes[&leader]
            .wait_for(WAIT, |s| s.purged_index.is_some_and(|i| i > 20))
            .await
            .expect("the leader snapshots and purges the head of its log");
        receipts
    });
    cluster.start_node(4, tweak);
    let (new_leader, more) = run(async {
        let l = &cluster.nodes[&leader];
        let follower = *cluster.nodes.keys().find(|&&id| id != leader).unwrap();
        let add4 = MemberChange::Add {
            id: 4,
            addr: "127.0.0.1:1004".into(),
            voter: true,
        };
        assert_eq!(
            cluster.nodes[&follower]
                .change_members(add4.clone(), WAIT)
                .await,
            Err(SubmitError::NotLeader {
                leader_hint: Some(leader)
            })
        );
        let refused = |r| Err(SubmitError::Membership(r));
        let bad = [
            (
                MemberChange::Add {
                    id: 0,
                    addr: "h:1".into(),
                    voter: true,
                },
                MembershipRejection::BadId,
            ),
            (
                MemberChange::Add {
                    id: 4,
                    addr: "127.0.0.1".into(),
                    voter: true,
                },
                MembershipRejection::BadAddress {
                    addr: "127.0.0.1".into(),
                },
            ),
            (
                MemberChange::Add {
                    id: 2,
                    addr: "127.0.0.1:1002".into(),
                    voter: true,
                },
                MembershipRejection::AddressMismatch {
                    id: 2,
                    addr: "node2".into(),
                },
            ),
            (
                MemberChange::Remove { id: 9 },
                MembershipRejection::NotAMember { id: 9 },
            ),
        ];
        for (change, why) in bad {
            assert_eq!(l.change_members(change, WAIT).await, refused(why));
        }
        let before = l.status().await.unwrap().members;
        assert_eq!(before.len(), 3);

        let added = l
            .change_members(add4.clone(), WAIT)
            .await
            .expect("node 4 added");
        assert!(added.index > 0);
        assert_eq!(added.members.len(), 4);
        assert!(added.members.iter().all(|m| m.voter), "{added:?}");
        let members = added.members.clone();
        let s4 = cluster.nodes[&4]
            .wait_for(WAIT, move |s| s.members == members)
            .await
            .expect("node 4 knows the membership");
        assert!(
            s4.snapshot_index.is_some(),
            "node 4 caught up by snapshot: {s4:?}"
        );
        // Asking again changes nothing; a voter is not made a learner.
        let again = l.change_members(add4, WAIT).await.expect("again");
        assert_eq!((again.index, again.members), (0, added.members.clone()));
        let demote = MemberChange::Add {
            id: 4,
            addr: "127.0.0.1:1004".into(),
            voter: false,
        };
        assert_eq!(
            l.change_members(demote, WAIT).await,
            refused(MembershipRejection::AlreadyVoter { id: 4 })
        );

        // Node 5 never runs: it stays a learner once the wait is over, and can be removed.
        let add5 = MemberChange::Add {
            id: 5,
            addr: "127.0.0.1:1005".into(),
            voter: true,
        };
        assert_eq!(
            l.change_members(add5, Duration::from_millis(300)).await,
            refused(MembershipRejection::CatchUpTimeout {
                id: 5,
                waited_ms: 300
            })
        );
        let members = l.status().await.unwrap().members;
        assert!(members.iter().any(|m| m.id == 5 && !m.voter), "{members:?}");
        let removed = l.change_members(MemberChange::Remove { id: 5 }, WAIT).await;
        assert_eq!(removed.expect("node 5 removed").members, added.members);

        // The new voter takes part: a quorum of 3 of 4 now includes it.
        let more = load(l, 10_000, 50, 10, 4).await;
        let last = more.iter().map(|r| r.index()).max().unwrap();
        cluster.nodes[&4]
            .wait_for(WAIT, move |s| s.applied_index >= Some(last))
            .await
            .expect("node 4 applies");

        // Remove the leader: it hands over to another voter and leaves.
        let gone = l
            .change_members(MemberChange::Remove { id: leader }, WAIT)
            .await
            .expect("leader removed");
        assert_eq!(gone.members.len(), 3);
        assert!(gone.members.iter().all(|m| m.id != leader && m.voter));
        l.wait_for(WAIT, |s| s.role != Role::Leader)
            .await
            .expect("the removed leader stops leading");
        let s = cluster.nodes[&4]
            .wait_for(WAIT, move |s| {
                s.leader.is_some_and(|l| l != leader) && s.members.len() == 3
            })
            .await
            .expect("a new leader among the remaining voters");
        let new_leader = s.leader.unwrap();
        cluster.nodes[&new_leader]
            .wait_for(WAIT, |s| s.role == Role::Leader)
            .await
            .expect("it leads");
        let more2 = load(&cluster.nodes[&new_leader], 20_000, 50, 10, 4).await;
        (new_leader, [more, more2].concat())
    });
    assert_ne!(new_leader, leader);
    receipts.extend(more);
    // The removed node gets nothing new, and the others have snapshotted and purged past its
    // log's end (no entry left in common to compare): it leaves the final checks.
    run(cluster.nodes[&leader].shutdown());
    cluster.nodes[&leader].join();
    cluster.stopped.push(leader);
    cluster.left.push(leader);
    cluster.stop_and_check(&receipts);
}

/// A follower that died for good is removed while it is down (the two others are a majority of
/// the old and the new membership), and a fresh node takes its place; the cluster goes on.
#[test]
fn a_dead_follower_is_removed_and_replaced() {
    let mut cluster = Cluster::start(3, small_batches);
    let leader = run(cluster.wait_leader(WAIT));
    let dead = *cluster.nodes.keys().find(|&&id| id != leader).unwrap();
    let mut receipts = run(load(&cluster.nodes[&leader], 0, 20, 10, 4));
    run(cluster.nodes[&dead].shutdown());
    cluster.nodes[&dead].join();
    cluster.stopped.push(dead);
    cluster.left.push(dead);
    cluster.start_node(4, small_batches);
    let more = run(async {
        let l = &cluster.nodes[&leader];
        let removed = l
            .change_members(MemberChange::Remove { id: dead }, WAIT)
            .await
            .expect("the dead follower is removed");
        assert_eq!(removed.members.len(), 2);
        // First as a learner, then promoted.
        let add4 = |voter| MemberChange::Add {
            id: 4,
            addr: "127.0.0.1:1004".into(),
            voter,
        };
        let learner = l.change_members(add4(false), WAIT).await.expect("learner");
        assert!(learner.index > removed.index, "{learner:?}");
        assert!(learner.members.iter().any(|m| m.id == 4 && !m.voter));
        let added = l
            .change_members(add4(true), WAIT)
            .await
            .expect("node 4 added");
        assert!(added.index > learner.index);
        assert!(added.members.iter().all(|m| m.voter), "{added:?}");
        let ids: Vec<u64> = added.members.iter().map(|m| m.id).collect();
        assert_eq!(ids.len(), 3);
        assert!(ids.contains(&4) && !ids.contains(&dead), "{ids:?}");
        load(l, 10_000, 20, 10, 4).await
    });
    receipts.extend(more);
    cluster.stop_and_check(&receipts);
}

/// A follower removed while it runs never learns it was removed (the leader stops replicating to
/// it first), so it keeps calling elections; the members refuse its votes while they hear from
/// their leader: the leader and its term stay, and writes go on.
#[test]
fn a_removed_follower_left_running_does_not_disturb_the_cluster() {
    let mut cluster = Cluster::start(3, |c| {
        small_batches(c);
        steady(c);
    });
    let leader = run(cluster.wait_leader(WAIT));
    let removed = *cluster.nodes.keys().find(|&&id| id != leader).unwrap();
    let receipts = run(async {
        let l = &cluster.nodes[&leader];
        let mut receipts = load(l, 0, 20, 10, 4).await;
        let gone = l
            .change_members(MemberChange::Remove { id: removed }, WAIT)
            .await
            .expect("follower removed");
        assert_eq!(gone.members.len(), 2);
        let term = l.status().await.unwrap().term;
        // Well past its election timeouts (1-2 s), it calls elections the whole time; writes
        // go on meanwhile, paced (each receipt is checked on every node at the end).
        let until = std::time::Instant::now() + Duration::from_secs(5);
        let mut from = 10_000;
        while std::time::Instant::now() < until {
            receipts.extend(load(l, from, 1, 10, 1).await);
            from += 10;
            glommio::timer::sleep(Duration::from_millis(50)).await;
        }
        let s = l.status().await.unwrap();
        assert_eq!((s.role, s.term), (Role::Leader, term), "{s:?}");
        let other = cluster
            .nodes
            .keys()
            .find(|&&id| id != leader && id != removed);
        let s = cluster.nodes[other.unwrap()].status().await.unwrap();
        assert_eq!((s.leader, s.term), (Some(leader), term), "{s:?}");
        // It did campaign meanwhile (what this test is about), and was ignored.
        let r = cluster.nodes[&removed].status().await.unwrap();
        assert!(r.term > term && r.role != Role::Leader, "{r:?}");
        receipts
    });
    run(cluster.nodes[&removed].shutdown());
    cluster.nodes[&removed].join();
    cluster.stopped.push(removed);
    cluster.left.push(removed);
    cluster.stop_and_check(&receipts);
}

/// The last voter cannot be removed.
#[test]
fn the_last_voter_stays() {
    let cluster = Cluster::start(1, |_| {});
    run(async {
        let leader = cluster.wait_leader(WAIT).await;
        assert_eq!(
            cluster.nodes[&leader]
                .change_members(MemberChange::Remove { id: leader }, WAIT)
                .await,
            Err(SubmitError::Membership(MembershipRejection::LastVoter {
                id: leader
            }))
        );
    });
    cluster.stop_and_check(&[]);
}

#[test]
fn a_whole_cluster_restart_after_purging_keeps_every_receipt() {
    let tweak = |c: &mut NodeConfig| {
        small_batches(c);
        c.raft.snapshot_every_entries = 40;
        c.raft.log_entries_kept_after_snapshot = 5;
        c.wal = baton_wal::WalOptions::small_for_tests();
        c.batch.batch_bytes_max = 8 << 10;
    };
    let mut cluster = Cluster::start(3, tweak);
    let receipts = run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let receipts = load(&cluster.nodes[&leader], 0, 100, 10, 4).await;
        // Every node has snapshotted and purged the head of its log.
        for node in cluster.nodes.values() {
            node.wait_for(WAIT, |s| s.purged_index.is_some_and(|i| i > 50))
                .await
                .expect("each node purges behind a snapshot");
        }
        for node in cluster.nodes.values() {
            node.shutdown().await;
        }
        receipts
    });
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    for id in &ids {
        cluster.nodes[id].join();
    }
    // Restart everything: state comes back from each node's snapshot file plus its log.
    for id in ids {
        cluster.restart(id);
    }
    run(async {
        let leader = cluster.wait_leader(WAIT).await;
        // The cluster still sequences after the restart.
        let more = load(&cluster.nodes[&leader], 900_000, 5, 4, 1).await;
        assert_eq!(more.len(), 20);
    });
    cluster.stop_and_check(&receipts);
}

/// Small batches, and snapshots by the log's size only, every 32 KiB of it.
fn snapshots_by_size_only(c: &mut NodeConfig) {
    small_batches(c);
    c.raft.snapshot_every_entries = 0;
    c.raft.snapshot_log_bytes_min = 32 << 10;
    c.raft.snapshot_log_ratio = 0;
}

/// With openraft's entry count off, every node still snapshots (and purges behind it) once its
/// log has grown by `snapshot_log_bytes_min`: the node's own size rule asks through
/// `Raft::trigger`.
#[test]
fn every_node_snapshots_by_log_size_with_the_entry_count_off() {
    let tweak = |c: &mut NodeConfig| {
        snapshots_by_size_only(c);
        c.raft.log_entries_kept_after_snapshot = 5;
    };
    let cluster = Cluster::start(3, tweak);
    let receipts = run(async {
        let leader = cluster.wait_leader(WAIT).await;
        // ~113 KB of transactions: several times the threshold.
        let receipts = load(&cluster.nodes[&leader], 0, 100, 10, 4).await;
        for node in cluster.nodes.values() {
            let s = node
                .wait_for(WAIT, |s| {
                    s.snapshot_index.is_some() && s.purged_index.is_some()
                })
                .await
                .expect("each node snapshots by size and purges behind it");
            assert!(s.snapshot_index <= s.applied_index, "{s:?}");
        }
        receipts
    });
    cluster.stop_and_check(&receipts);
}

/// `f`'s output, or `None` if it takes longer than `limit`.
async fn within<T>(limit: Duration, f: impl std::future::Future<Output = T>) -> Option<T> {
    use futures_util::future::{select, Either};
    let (f, sleep) = (
        std::pin::pin!(f),
        std::pin::pin!(glommio::timer::sleep(limit)),
    );
    match select(f, sleep).await {
        Either::Left((v, _)) => Some(v),
        Either::Right(_) => None,
    }
}

/// A storage error stops openraft's core for good. The node says so (`failed`) instead of
/// running on as a member that takes no part; the others go on; stopped and started again, it
/// recovers from its log and catches up, and no receipt is lost. The fault is real: a
/// directory where the follower's snapshot file would be created.
#[test]
fn a_node_whose_storage_fails_says_so_and_recovers_when_restarted() {
    let mut cluster = Cluster::start(3, snapshots_by_size_only);
    let (leader, broken) = run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let follower = *cluster.nodes.keys().find(|&&id| id != leader).unwrap();
        (leader, follower)
    });
    // The snapshot file's temporary name is SNAPSHOT.tmp.<pid>.<n>, n counting the process's
    // snapshots; all of this follower's first ones fail.
    let blockers: Vec<_> = (0..256)
        .map(|n| {
            let path = cluster
                .dir_of(broken)
                .join(format!("SNAPSHOT.tmp.{}.{n}", std::process::id()));
            std::fs::create_dir(&path).unwrap();
            path
        })
        .collect();
    let mut receipts = run(async {
        let mut receipts = load(&cluster.nodes[&leader], 0, 100, 10, 4).await;
        let reason = within(WAIT, cluster.nodes[&broken].failed())
            .await
            .expect("the broken follower reports its failure")
            .expect("a failure, not a normal shutdown");
        assert!(reason.contains("napshot"), "{reason}");
        let status = cluster.nodes[&broken]
            .status()
            .await
            .expect("still answers");
        assert_eq!(status.role, Role::Shutdown, "{status:?}");
        // The leader and the other follower are a majority: commits go on.
        let more = load(&cluster.nodes[&leader], 10_000, 50, 10, 4).await;
        receipts.extend(more);
        receipts
    });
    run(cluster.nodes[&broken].shutdown());
    cluster.nodes[&broken].join();
    cluster.stopped.push(broken);
    for path in blockers {
        std::fs::remove_dir(path).unwrap();
    }
    cluster.restart(broken);
    run(async {
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        let s = cluster.nodes[&broken]
            .wait_for(WAIT, move |s| {
                s.applied_index >= Some(last) && s.snapshot_index.is_some()
            })
            .await
            .expect("the restarted node catches up and snapshots");
        assert_eq!(s.role, Role::Follower);
        receipts.extend(load(&cluster.nodes[&leader], 20_000, 20, 10, 4).await);
    });
    cluster.stop_and_check(&receipts);
}

#[test]
fn submissions_to_a_follower_are_refused_with_a_leader_hint() {
    let cluster = Cluster::start(3, |_| {});
    run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let follower = cluster
            .nodes
            .keys()
            .copied()
            .find(|&id| id != leader)
            .unwrap();
        cluster.nodes[&follower]
            .wait_for(WAIT, move |s| s.leader == Some(leader))
            .await
            .unwrap();
        // Twice: the failed attempt must not leave the transactions stuck in the follower's
        // dedup window.
        for _ in 0..2 {
            let r = cluster.nodes[&follower].submit(txs(0, 3)).await;
            for x in r {
                assert_eq!(
                    x,
                    Err(baton_core::node::SubmitError::NotLeader {
                        leader_hint: Some(leader)
                    })
                );
            }
        }
        // Invalid input is refused before it reaches the log.
        let bad = vec![Transaction {
            rollup_id: 1,
            kind: TxKind::Raw,
            bytes: Vec::new(),
        }];
        let r = cluster.nodes[&leader].submit(bad).await;
        assert!(
            matches!(
                r[0],
                Err(baton_core::node::SubmitError::Invalid { position: 0, .. })
            ),
            "{r:?}"
        );
        // A duplicate gets the original receipt.
        let first = cluster.nodes[&leader]
            .submit(txs(7, 1))
            .await
            .remove(0)
            .unwrap();
        let again = cluster.nodes[&leader]
            .submit(txs(7, 1))
            .await
            .remove(0)
            .unwrap();
        assert_eq!(
            (again.index(), again.offset, again.tx_hash),
            (first.index(), first.offset, first.tx_hash)
        );
        assert!(again.duplicate);
    });
    let receipts: Vec<Receipt> = Vec::new();
    cluster.stop_and_check(&receipts);
}

/// Keeps the helper referenced from this file (see common/mod.rs).
#[allow(dead_code)]
fn _uses(c: &Cluster) -> usize {
    c.nodes.len()
}

#[test]
fn bad_configurations_are_refused_at_start_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let router = baton_core::node::LocalRouter::default();
    // Batches larger than a WAL record can hold.
    let mut c = NodeConfig::new(1, dir.path().join("a"));
    c.shards = 1;
    c.wal = baton_wal::WalOptions::small_for_tests();
    let r = baton_core::node::start(c, baton_core::node::Network::Local(router.clone()));
    assert!(
        matches!(r, Err(baton_core::node::NodeError::Config { .. })),
        "{:?}",
        r.err()
    );
    // A WAL I/O arena outside its bounds (too large to allocate, or below glommio's floor).
    for bytes in [0, baton_wal::IO_MEMORY_BYTES_MAX + 1] {
        let mut c = NodeConfig::new(1, dir.path().join("io"));
        c.shards = 1;
        c.wal_io_memory_bytes = bytes;
        let r = baton_core::node::start(c, baton_core::node::Network::Local(router.clone()));
        assert!(
            matches!(&r, Err(baton_core::node::NodeError::Config { reason }) if reason.contains("wal_io_memory_bytes")),
            "{:?}",
            r.err()
        );
    }
    // Shards pinned to CPUs the process may not run on, to too few CPUs, or two to one CPU:
    // refused before any thread starts, with the reason.
    let allowed = baton_core::cpus::allowed().expect("affinity mask");
    let outside = allowed.last().unwrap() + 1;
    for (shards, cpus, says) in [
        (
            1,
            vec![outside],
            format!("CPU {outside} is not one this process may run on"),
        ),
        (2, vec![allowed[0]], "names 1 CPUs for 2 shards".to_string()),
        (
            2,
            vec![allowed[0], allowed[0]],
            format!("CPU {} twice", allowed[0]),
        ),
    ] {
        let mut c = NodeConfig::new(2, dir.path().join("b"));
        c.shards = shards;
        c.shard_cpus = Some(cpus);
        let r = baton_core::node::start(c, baton_core::node::Network::Local(router.clone()));
        assert!(
            matches!(&r, Err(baton_core::node::NodeError::Config { reason }) if reason.contains(&says)),
            "{:?}",
            r.err()
        );
    }
    // A shard pinned to an allowed CPU runs there.
    // An id no other test's node has: under `cargo test` the tests share this process.
    let mut c = NodeConfig::new(93, dir.path().join("c"));
    c.shards = 1;
    c.shard_cpus = Some(vec![*allowed.last().unwrap()]);
    let node = baton_core::node::start(c, baton_core::node::Network::Local(router))
        .expect("a node pinned to an allowed CPU starts");
    // Threads the shard starts (glommio's blocking pool) carry its name and its mask.
    let thread_cpus = |name| baton_core::cpus::thread_cpu_lists(std::process::id(), name).unwrap();
    let seen = thread_cpus("baton-93-s0");
    let want = baton_core::cpus::list(&[*allowed.last().unwrap()]);
    assert!(
        !seen.is_empty() && seen.iter().all(|c| *c == want),
        "{seen:?}, want {want}"
    );
    // The nonce pool's thread, started by the pinned shard, is back on the whole mask. It
    // names itself and leaves the shard's CPU once it runs, which may be after the start
    // returned: poll (bounded: 10 s).
    let whole = vec![baton_core::cpus::list(&allowed)];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while thread_cpus("baton-93-nonce") != whole && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(thread_cpus("baton-93-nonce"), whole);
    run(node.shutdown());
    node.join();
}

#[test]
fn an_isolated_leader_answers_instead_of_hanging_and_the_majority_continues() {
    let cluster = Cluster::start(3, |c| c.commit_wait_ms = 1_000);
    let receipts = run(async {
        let old = cluster.wait_leader(WAIT).await;
        let mut receipts = load(&cluster.nodes[&old], 0, 10, 10, 2).await;
        let others: Vec<u64> = cluster
            .nodes
            .keys()
            .copied()
            .filter(|&id| id != old)
            .collect();
        cluster.router.isolate(old, &others);
        // The cut-off leader cannot commit: its submitters get an answer, not a hang.
        let r = cluster.nodes[&old].submit(txs(500_000, 3)).await;
        for x in &r {
            assert!(
                matches!(
                    x,
                    Err(baton_core::node::SubmitError::CommitTimeout { .. })
                        | Err(baton_core::node::SubmitError::NotLeader { .. })
                ),
                "{x:?}"
            );
        }
        // The majority elects a new leader and goes on.
        let s = cluster.nodes[&others[0]]
            .wait_for(WAIT, move |s| {
                s.leader.is_some_and(|l| l != old) && s.role != Role::Candidate
            })
            .await
            .expect("the majority elects a new leader");
        let new = s.leader.unwrap();
        receipts.extend(load(&cluster.nodes[&new], 600_000, 10, 10, 2).await);
        cluster.router.heal_all();
        receipts
    });
    cluster.stop_and_check(&receipts);
}

#[test]
fn followers_forward_to_the_leader_and_follow_it_through_a_failover() {
    let mut cluster = Cluster::start_forwarding(3, |c| c.commit_wait_ms = 10_000);
    let (old, receipts) = run(async {
        let old = cluster.wait_leader(WAIT).await;
        for n in cluster.nodes.values() {
            n.wait_for(WAIT, move |s| s.leader == Some(old))
                .await
                .expect("every node knows the leader");
        }
        // Every node takes submissions; followers' batches commit through the leader.
        let mut receipts = Vec::new();
        let mut tasks = Vec::new();
        for (k, n) in cluster.nodes.values().enumerate() {
            let n = n.clone();
            let first = k as u64 * 100_000;
            tasks.push(glommio::spawn_local(async move {
                load(&n, first, 20, 10, 2).await
            }));
        }
        for t in tasks {
            receipts.extend(t.await);
        }
        assert_eq!(receipts.len(), 3 * 20 * 10);
        // Resubmitting through a follower that did not take them first (its shards never saw
        // them, so its Raft shard proves them from the log, one proof per batch for all of that
        // batch's duplicates) answers with the original receipts: same position, signed header
        // and Merkle path.
        let first_node = *cluster.nodes.keys().next().unwrap();
        let follower = *cluster
            .nodes
            .keys()
            .find(|&&id| id != old && id != first_node)
            .unwrap();
        let again = cluster.nodes[&follower].submit(txs(0, 200)).await;
        assert_eq!(again.len(), 200);
        for (r, first) in again.iter().zip(&receipts) {
            let r = r.as_ref().expect("a duplicate gets a receipt");
            assert!(r.duplicate);
            assert_eq!(
                &Receipt {
                    duplicate: false,
                    ..r.clone()
                },
                first
            );
        }
        // The leader stops; submissions already sent to the followers wait out the election and
        // commit through the new leader.
        cluster.nodes[&old].shutdown().await;
        let mut tasks = Vec::new();
        for (k, n) in cluster.nodes.iter().filter(|(&id, _)| id != old) {
            let n = n.clone();
            let first = 1_000_000 + k * 100_000;
            tasks.push(glommio::spawn_local(async move {
                load(&n, first, 10, 10, 2).await
            }));
        }
        for t in tasks {
            receipts.extend(t.await);
        }
        (old, receipts)
    });
    cluster.nodes[&old].join();
    cluster.stopped.push(old);
    cluster.stop_and_check(&receipts);
}

/// Every stage of the sequencing path is timed: on the leader for what clients hand it and
/// what a follower forwards, on the forwarding follower for its own requests and its WAL
/// appends of the replicated log. A request's `total` spans its `queue`.
#[test]
fn every_stage_of_the_path_is_timed_on_the_leader_and_a_forwarding_follower() {
    use baton_core::node::Stage;
    let cluster = Cluster::start_forwarding(3, |_| {});
    let receipts = run(async {
        // A leader every node knows (a contested first election on a busy machine can move
        // the lead once more).
        let mut leader = None;
        for _ in 0..5 {
            let candidate = cluster.wait_leader(WAIT).await;
            let mut agreed = true;
            for n in cluster.nodes.values() {
                let known = move |s: &baton_core::node::NodeStatus| s.leader == Some(candidate);
                agreed &= n.wait_for(Duration::from_secs(5), known).await.is_ok();
            }
            if agreed {
                leader = Some(candidate);
                break;
            }
        }
        let leader = leader.expect("every node knows the leader");
        for n in cluster.nodes.values() {
            // A window of its own, from here.
            n.stages();
        }
        let follower = *cluster.nodes.keys().find(|&&id| id != leader).unwrap();
        let mut receipts = load(&cluster.nodes[&leader], 0, 20, 10, 2).await;
        receipts.extend(load(&cluster.nodes[&follower], 100_000, 20, 10, 2).await);
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        cluster.wait_all_applied(last, WAIT).await;

        let shards = NodeConfig::new(1, "unused").shards as u64;
        let reports: Vec<_> = [leader, follower]
            .iter()
            .map(|id| cluster.nodes[id].stages())
            .collect();
        // Every entry the leader sequenced in the window was applied on both nodes.
        let sequenced = reports[0].get(Stage::Commit).count;
        for ((report, what), appends) in reports
            .iter()
            .zip(["leader", "follower"])
            .zip([false, true])
        {
            assert!(
                report.get(Stage::Apply).count >= sequenced,
                "{what}: {report}"
            );
            // A follower answers replication requests (a leader only would after losing the
            // lead, which this test does not assert against).
            if appends {
                assert!(report.get(Stage::Append).count > 0, "{what}: {report}");
            }
            // The network layer's stages: none without it.
            for s in [Stage::Replicate, Stage::Respond] {
                assert_eq!(report.get(s).count, 0, "{what}: {report}");
            }
        }
        for (report, what) in reports.iter().zip(["leader", "follower"]) {
            let stage = |s: Stage| report.get(s);
            // Each request reaches each shard its transactions map to once.
            let (queue, total) = (stage(Stage::Queue), stage(Stage::Total));
            assert!(
                (20..=20 * shards).contains(&queue.count),
                "{what}: {report}"
            );
            assert_eq!(total.count, queue.count, "{what}: {report}");
            // No request is answered before it left the queue (1% histogram resolution).
            assert!(total.max_us * 101 / 100 >= queue.max_us, "{what}: {report}");
            for s in Stage::ALL.into_iter().filter(|s| {
                ![
                    Stage::Queue,
                    Stage::Total,
                    Stage::Append,
                    Stage::Replicate,
                    Stage::Respond,
                ]
                .contains(s)
            }) {
                assert!(stage(s).count > 0, "{what}: no {}: {report}", s.name());
            }
            // A batch is answered only after it was sealed (an answer may still be finishing
            // as its last receipt wakes the client: at most the 2 requests in flight, on each
            // shard).
            let (sealed, answered) = (stage(Stage::Batching).count, stage(Stage::Answer).count);
            assert!(
                answered <= sealed && sealed <= answered + 2 * shards,
                "{what}: {report}"
            );
        }
        receipts
    });
    cluster.stop_and_check(&receipts);
}

/// Preconfirmed receipts come from the leader's signature before the commit, through the
/// leader and through a forwarding follower; they verify offline, and the committed receipt of
/// the same transaction names the same position and signed header.
#[test]
fn preconfirmed_receipts_are_signed_and_kept_by_the_commit() {
    use baton_core::AckLevel;
    let cluster = Cluster::start_forwarding(3, small_batches);
    let receipts = run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
        let signers: Vec<baton_core::Address> =
            cluster.nodes.values().map(|n| n.signer()).collect();
        let leader_key = cluster.nodes[&leader].signer();
        let mut committed = Vec::new();
        for (round, via) in [leader, follower].into_iter().enumerate() {
            let batch = txs(7_000_000 + round as u64 * 100, 20);
            let pre = cluster.nodes[&via]
                .submit_with(batch.clone(), AckLevel::Preconfirmed)
                .await;
            for r in &pre {
                let r = r.as_ref().expect("preconfirmed");
                assert_eq!(r.level, AckLevel::Preconfirmed);
                assert_eq!(r.verify(&signers).unwrap(), leader_key, "the leader signs");
                assert!(r.term() >= 1);
            }
            // Submitting again asks for the committed level: same positions (idempotent).
            let again = cluster.nodes[&via].submit(batch).await;
            for (p, c) in pre.iter().zip(&again) {
                let (p, c) = (p.as_ref().unwrap(), c.as_ref().unwrap());
                assert_eq!(c.level, AckLevel::Committed);
                assert_eq!(
                    (c.index(), c.offset, c.batch),
                    (p.index(), p.offset, p.batch)
                );
                c.verify(&signers).unwrap();
                committed.push(c.clone());
            }
        }
        committed
    });
    cluster.stop_and_check(&receipts);
}

/// A leader cut off from its followers still signs and preconfirms: each preconfirmed request
/// is answered from the leader's signature while the earlier signed batches wait for commits
/// that cannot come. The receipts carry the leader's term, which makes the broken promise
/// attributable once a new leader overwrites those entries. (The shard seals a preconfirmed
/// request's batch at once when no batch of its waits for a signature; the latency this saves is
/// measured by `baton-perf --ack preconfirmed`, docs/performance.md, not asserted here.)
#[test]
fn an_isolated_leader_still_preconfirms_under_its_term() {
    use baton_core::AckLevel;
    let cluster = Cluster::start(3, |c| {
        c.commit_wait_ms = 60_000;
        c.batch.linger_us = 1_000_000;
        c.batch.batch_txs_max = 1000;
        // A cut-off leader accepts writes while its lease (the longest election timeout since
        // a quorum last answered) lasts: make it long enough for a loaded test machine.
        c.raft.heartbeat_interval_ms = 100;
        c.raft.election_timeout_min_ms = 1_500;
        c.raft.election_timeout_max_ms = 3_000;
    });
    let kept = run(async {
        let old = cluster.wait_leader(WAIT).await;
        let others: Vec<u64> = cluster
            .nodes
            .keys()
            .copied()
            .filter(|&id| id != old)
            .collect();
        let node = cluster.nodes[&old].clone();
        let signer = node.signer();
        // A commit just before the cut: the leader's lease is fresh.
        let committed = node.submit(txs(7_900_000, 1)).await;
        assert!(committed[0].is_ok(), "{committed:?}");
        let term = committed[0].as_ref().unwrap().term();
        cluster.router.isolate(old, &others);
        for round in 0..3u64 {
            let r = node
                .submit_with(txs(8_000_000 + round * 10, 5), AckLevel::Preconfirmed)
                .await;
            for x in &r {
                let x = x.as_ref().expect("preconfirmed while cut off");
                assert_eq!(x.level, AckLevel::Preconfirmed);
                assert_eq!(x.term(), term);
                assert_eq!(x.verify(&[signer]).unwrap(), signer);
            }
        }
        cluster.router.heal_all();
        committed
            .into_iter()
            .map(|r| r.unwrap())
            .collect::<Vec<_>>()
    });
    cluster.stop_and_check(&kept);
}

/// A stall of every node longer than the leader's lease (openraft: the longest election
/// timeout), with writes in flight, the leader resuming first: the leader's lease has lapsed and
/// its writes are refused until a quorum acknowledges it again. The cluster must get back to
/// committing. It did not: proposals retried the refused write in a loop of tasks waking each
/// other that never let the shard return to its reactor, so the heartbeat answers that renew the
/// lease were handled 100 ms late (glommio's preemption period), after their 50 ms deadline, and
/// the leader stayed leader without a lease for good (docs/performance.md, the wedge).
#[test]
fn writes_resume_after_a_stall_longer_than_the_leader_lease() {
    let cluster = Cluster::start(3, |c| c.commit_wait_ms = 2_000);
    let receipts = run(async {
        let leader = cluster.wait_leader(WAIT).await;
        let mut receipts = load(&cluster.nodes[&leader], 0, 10, 10, 2).await;
        let lease = Duration::from_millis(cluster.configs[&leader].raft.election_timeout_max_ms);
        for round in 0..4u64 {
            let leader = cluster.wait_raft_leader(WAIT).await;
            // Writes in flight through the stall (their outcome does not matter: a refused or
            // timed-out write is not sequenced, and whatever committed is checked below).
            let writers: Vec<_> = (0..4u64)
                .map(|w| {
                    let node = cluster.nodes[&leader].clone();
                    glommio::spawn_local(async move {
                        let mut out = Vec::new();
                        for i in 0..4u64 {
                            let first = 1_000_000 * (round + 1) + w * 10_000 + i * 100;
                            out.extend(node.submit(txs(first, 20)).await);
                        }
                        out
                    })
                })
                .collect();
            // Every node stops; the leader resumes first (its followers 100 ms later, so that
            // its heartbeats reach them before their own election timers fire).
            let stalls: Vec<_> = cluster
                .nodes
                .iter()
                .map(|(&id, n)| {
                    let n = n.clone();
                    let mut pause = lease * 3 / 2;
                    if id != leader {
                        pause += Duration::from_millis(100);
                    }
                    glommio::spawn_local(async move { n.stall_for_testing(pause).await })
                })
                .collect();
            for s in stalls {
                s.await.expect("stall");
            }
            for w in writers {
                receipts.extend(w.await.into_iter().filter_map(Result::ok));
            }
            // Writes commit again within a few leases, through whichever node leads.
            let first = 5_000_000 + round * 100;
            receipts.extend(submit_until_committed(&cluster, txs(first, 10), WAIT).await);
        }
        receipts
    });
    cluster.stop_and_check(&receipts);
}

/// Submits `batch` to the node that leads, again after a refusal (no leader yet, an election,
/// a write that timed out), until every transaction has its receipt or `timeout` has passed.
async fn submit_until_committed(
    cluster: &Cluster,
    batch: Vec<Transaction>,
    timeout: Duration,
) -> Vec<Receipt> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = Vec::new();
    while std::time::Instant::now() < deadline {
        let leader = cluster.wait_raft_leader(timeout).await;
        let r = cluster.nodes[&leader].submit(batch.clone()).await;
        if r.iter().all(Result::is_ok) {
            return r.into_iter().map(Result::unwrap).collect();
        }
        last = r;
        // Back off a heartbeat before asking again.
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    let mut statuses = Vec::new();
    for n in cluster.nodes.values() {
        statuses.push(n.status().await);
    }
    panic!("writes did not resume within {timeout:?}: {last:?}; nodes {statuses:?}");
}
