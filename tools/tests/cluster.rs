//! Real clusters: `baton cluster up` starts 3 `baton node` processes on 127.0.0.1 that talk QUIC
//! (mutual TLS between peers), clients submit through every node, nodes are SIGKILLed and
//! restarted, and afterwards the nodes' WALs are read back and checked: identical logs, and every
//! receipt at its transaction's position, exactly once.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use baton_core::node::Receipt;
use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// Submits `total` transactions tagged `tag` through `client`, `per_request` per request,
/// `concurrency` requests in flight; every transaction must get a receipt.
async fn load(
    client: &baton_net::Client,
    tag: &str,
    from: u64,
    total: u64,
    per_request: u64,
    concurrency: usize,
) -> Vec<Receipt> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(from));
    let end = from + total;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, tag) = (client.clone(), next.clone(), tag.to_string());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let first = next.fetch_add(per_request, std::sync::atomic::Ordering::Relaxed);
                if first >= end {
                    return out;
                }
                let n = per_request.min(end - first);
                let results = client
                    .submit(txs(&tag, first, n))
                    .await
                    .expect("request answered");
                for r in results {
                    out.push(r.expect("transaction sequenced"));
                }
            }
        }));
    }
    let mut receipts = Vec::new();
    for t in tasks {
        receipts.extend(t.await.expect("load task"));
    }
    receipts
}

fn read_logs(nodes: &[NodeInfo]) -> HashMap<u64, Log> {
    nodes
        .iter()
        .map(|n| (n.id, Log::read(&n.data_dir)))
        .collect()
}

#[test]
fn three_nodes_sequence_100k_transactions_submitted_through_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterUp::start(dir.path(), 3, free_base_port(3));
    let rt = runtime();
    let receipts = rt.block_on(async {
        let mut tasks = Vec::new();
        for id in 1..=3u64 {
            let client = cluster.client_from(id);
            tasks.push(tokio::spawn(async move {
                let r = load(&client, &format!("n{id}"), 0, 33_334, 100, 8).await;
                client.close().await;
                r
            }));
        }
        let mut receipts = Vec::new();
        for t in tasks {
            receipts.extend(t.await.unwrap());
        }
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        for id in 1..=3 {
            wait_applied(&cluster.client_of(id), last, WAIT).await;
        }
        (receipts, last)
    });
    let (receipts, last) = receipts;
    assert_eq!(receipts.len(), 3 * 33_334);
    // Every node timed the requests it took and its WAL appends; the leader also every batch
    // it sequenced, its own and the followers' forwarded ones.
    let stdout = baton_ok(&[
        "status".as_ref(),
        "--stages".as_ref(),
        "--repeat".as_ref(),
        "5".as_ref(),
        "--json".as_ref(),
        "--cluster".as_ref(),
        cluster.dir.as_os_str(),
    ]);
    let all: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let count = |node: &serde_json::Value, stage: &str| {
        node["stages"]["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == stage)
            .map_or(0, |s| s["count"].as_u64().unwrap())
    };
    let (mut batches_sealed, mut commits) = (0, 0);
    for node in all.as_array().unwrap() {
        // Four timed status round trips (the first request is not timed).
        let rt = &node["round_trip"];
        assert_eq!(rt["count"], 4, "{node}");
        assert!(rt["p50_us"].as_u64().unwrap() <= rt["p99_us"].as_u64().unwrap());
        // 33,334 transactions in requests of 100: 334 requests, each reaching one or more shards.
        assert!(count(node, "queue") >= 334, "{node}");
        assert_eq!(count(node, "total"), count(node, "queue"), "{node}");
        assert!(count(node, "wal") > 0, "{node}");
        // Each request's answer was written back by the network thread (once per request,
        // where `queue` counts a request once per shard it reached).
        let respond = count(node, "respond");
        assert!((334..=count(node, "queue")).contains(&respond), "{node}");
        assert!(count(node, "apply") > 0, "{node}");
        // Replication rounds are timed by the leader, their appends by the followers (the
        // window began at the node's start: a first election that moved the lead once more
        // leaves a node some of both, so only what its role now implies is checked).
        if node["status"]["role"] == "leader" {
            assert!(count(node, "replicate") > 0, "{node}");
            // Both followers have answered the leader in this term.
            let replication = node["status"]["replication"].as_array().unwrap();
            assert_eq!(replication.len(), 2, "{node}");
            for p in replication {
                assert!(p["last_heard_ms"].as_u64().is_some(), "{node}");
            }
        } else {
            assert!(count(node, "append") > 0, "{node}");
        }
        batches_sealed += count(node, "batching");
        commits += count(node, "commit");
    }
    let leader = all
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["status"]["role"] == "leader")
        .expect("a leader");
    // Every sealed batch was committed by the node that led when it came (counted on that one:
    // summed, in case the lead moved during the load).
    assert!(commits >= batches_sealed, "{all}");
    // Every entry reaches both followers: at least one round each per batch (a round carries
    // one or more entries).
    assert!(count(leader, "apply") >= batches_sealed, "{leader}");
    assert!(count(leader, "replicate") >= 2, "{leader}");
    let nodes = cluster.stop();
    let logs = read_logs(&nodes);
    check_logs_agree(&logs);
    // Every node holds every entry a receipt names. Not necessarily the same last entry: the
    // leader seals blocks on its own after the load, and one it appended just before the stop
    // may have reached only a majority, or only itself.
    for (id, log) in &logs {
        assert!(
            log.last_index() >= last,
            "node {id} ends at {} before the last receipt's entry {last}",
            log.last_index()
        );
    }
    check_receipts(&logs, &receipts);
    let distinct: std::collections::HashSet<_> =
        receipts.iter().map(|r| (r.index(), r.offset)).collect();
    assert_eq!(
        distinct.len(),
        receipts.len(),
        "one position per transaction"
    );
}

#[test]
fn killing_the_leader_under_load_elects_another_and_loses_no_committed_receipt() {
    stop_the_leader_under_load(libc::SIGKILL, "SIGKILL");
}

/// SIGTERM to the leader under load: it hands leadership over before it stops, so the longest
/// stretch without a commit is about a round of the transfer instead of an election timeout.
#[test]
fn stopping_the_leader_under_load_hands_over_and_loses_no_committed_receipt() {
    stop_the_leader_under_load(libc::SIGTERM, "SIGTERM");
}

/// Clients submit through every node; `signal` goes to the leader; the write unavailability (the
/// longest stretch without any commit) is printed; the stopped node is restarted and catches
/// up; the logs agree and every receipt is in them once.
fn stop_the_leader_under_load(signal: libc::c_int, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterUp::start(dir.path(), 3, free_base_port(3));
    let rt = runtime();
    let old = cluster.leader;
    let (receipts, gap) = rt.block_on(async {
        // One client per node, each submitting small requests one after another, recording
        // when each commit came back.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Commits acknowledged so far, by all clients.
        let (acked_tx, acked) = tokio::sync::watch::channel(0u64);
        let acked_tx = std::sync::Arc::new(acked_tx);
        let mut tasks = Vec::new();
        for id in 1..=3u64 {
            let client = cluster.client_from(id);
            let stop = stop.clone();
            let acked_tx = acked_tx.clone();
            tasks.push(tokio::spawn(async move {
                let mut receipts = Vec::new();
                let mut acks = Vec::new();
                let mut i = 0;
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && Instant::now() < deadline
                    && i < 200_000
                {
                    let r = client
                        .submit(txs(&format!("f{id}"), i, 10))
                        .await
                        .expect("answered");
                    for x in r {
                        receipts.push(x.expect("sequenced (retried through the failover)"));
                    }
                    acks.push(Instant::now());
                    acked_tx.send_modify(|n| *n += 1);
                    i += 10;
                }
                (receipts, acks)
            }));
        }
        // Under load first, then kill the leader; write availability is back once commits land
        // after the kill: wait for plenty of them (about 20 requests per client).
        let wait_acked = |n: u64| {
            let mut acked = acked.clone();
            async move {
                tokio::time::timeout(WAIT, acked.wait_for(|a| *a >= n))
                    .await
                    .unwrap_or_else(|_| panic!("{n} commits within {WAIT:?}"))
                    .expect("clients running");
            }
        };
        wait_acked(150).await;
        let killed_at = Instant::now();
        // Only the signal: waiting here for a graceful stop would hold up this thread's
        // clients.
        cluster.signal(old, signal);
        let before = *acked.borrow();
        wait_acked(before + 60).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut receipts = Vec::new();
        let mut acks = Vec::new();
        for t in tasks {
            let (r, a) = t.await.unwrap();
            receipts.extend(r);
            acks.extend(a);
        }
        acks.sort();
        // The longest stretch without any commit, from the last commit before the kill on.
        let from = acks
            .iter()
            .rposition(|a| *a <= killed_at)
            .expect("commits before the kill");
        assert!(acks.last().unwrap() > &killed_at, "commits after the kill");
        let gap = acks[from..].windows(2).map(|w| w[1] - w[0]).max().unwrap();
        (receipts, gap)
    });
    println!(
        "write unavailability after {name} of leader {old}: {} ms (longest stretch without a commit)",
        gap.as_millis()
    );
    // The stopped node recovers from its WAL and catches up.
    cluster.wait_exit(old, Duration::from_secs(60));
    cluster.restart(old);
    rt.block_on(async {
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        wait_applied(&cluster.client_of(old), last, WAIT).await;
    });
    let nodes = cluster.stop();
    let logs = read_logs(&nodes);
    check_logs_agree(&logs);
    check_receipts(&logs, &receipts);
}

/// A rolling restart under load: each node in turn gets SIGTERM (the leader hands over first),
/// is restarted from its WAL and catches up, while three clients (their connections spread over
/// the three nodes) submit without pause. No request fails, commits go on after every restart,
/// and afterwards the logs agree and every receipt is in them once. Prints the longest stretch
/// without a commit during each node's restart.
#[test]
fn a_rolling_restart_under_load_loses_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterUp::start(dir.path(), 3, free_base_port(3));
    let stop = Arc::new(AtomicBool::new(false));
    let (acked_tx, acked) = tokio::sync::watch::channel(0u64);
    // The clients run on a thread of their own, so that waiting here for a node to exit does
    // not hold them up.
    let options: Vec<_> = (1..=3).map(|id| cluster.options_from(id)).collect();
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            runtime().block_on(async move {
                let acked_tx = Arc::new(acked_tx);
                let mut tasks = Vec::new();
                for (k, o) in options.into_iter().enumerate() {
                    let (stop, acked_tx) = (stop.clone(), acked_tx.clone());
                    tasks.push(tokio::spawn(async move {
                        let client = baton_net::Client::new(o).expect("client");
                        let (mut receipts, mut acks) = (Vec::new(), Vec::new());
                        let deadline = Instant::now() + Duration::from_secs(180);
                        let mut i = 0;
                        // Bounded: until told to stop, at most 3 minutes or 200,000 transactions.
                        while !stop.load(Ordering::Relaxed)
                            && Instant::now() < deadline
                            && i < 200_000
                        {
                            let r = client
                                .submit(txs(&format!("r{k}"), i, 10))
                                .await
                                .expect("answered");
                            for x in r {
                                receipts.push(x.expect("sequenced through every restart"));
                            }
                            acks.push(Instant::now());
                            acked_tx.send_modify(|n| *n += 1);
                            i += 10;
                        }
                        client.close().await;
                        (receipts, acks)
                    }));
                }
                let mut receipts = Vec::new();
                let mut acks = Vec::new();
                for t in tasks {
                    let (r, a) = t.await.expect("client task");
                    receipts.extend(r);
                    acks.extend(a);
                }
                acks.sort();
                (receipts, acks)
            })
        })
    };
    let rt = runtime();
    let wait_acked = |n: u64| {
        let mut acked = acked.clone();
        rt.block_on(async move {
            tokio::time::timeout(WAIT, acked.wait_for(|a| *a >= n))
                .await
                .unwrap_or_else(|_| panic!("{n} commits within {WAIT:?}"))
                .expect("clients running");
        })
    };
    wait_acked(100);
    let mut windows = Vec::new();
    for id in 1..=3u64 {
        let was_leader = rt.block_on(async {
            let c = cluster.client_of(id);
            let s = c.status().await.expect("status");
            c.close().await;
            s.role == baton_core::node::Role::Leader
        });
        let from = Instant::now();
        cluster.signal(id, libc::SIGTERM);
        cluster.wait_exit(id, Duration::from_secs(60));
        cluster.restart(id);
        rt.block_on(async {
            let c = cluster.client_of(id);
            // Back in the cluster: it knows a leader and has applied what was committed when it
            // came back.
            let s = wait_status(&c, WAIT, |s| s.leader.is_some()).await;
            let leader = s.leader.unwrap();
            let l = cluster.client_of(leader);
            let committed = wait_status(&l, WAIT, |_| true).await.committed_index;
            wait_status(&c, WAIT, move |s| s.applied_index >= committed).await;
            c.close().await;
            l.close().await;
        });
        let before = *acked.borrow();
        wait_acked(before + 60);
        windows.push((id, was_leader, from, Instant::now()));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (receipts, acks) = load.join().expect("load thread");
    for (id, was_leader, from, to) in windows {
        let inside: Vec<&Instant> = acks.iter().filter(|a| **a >= from && **a <= to).collect();
        let gap = inside
            .windows(2)
            .map(|w| *w[1] - *w[0])
            .max()
            .unwrap_or_default();
        let at = inside
            .windows(2)
            .max_by_key(|w| *w[1] - *w[0])
            .map(|w| *w[0]);
        let since = at.map_or(0, |a| a.duration_since(from).as_millis());
        println!(
            "restart of node {id}{}: longest stretch without a commit {} ms, from {since} ms after SIGTERM",
            if was_leader { " (leader)" } else { "" },
            gap.as_millis()
        );
    }
    let nodes = cluster.stop();
    let logs = read_logs(&nodes);
    check_logs_agree(&logs);
    check_receipts(&logs, &receipts);
}

#[test]
fn a_whole_cluster_restart_keeps_every_committed_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_base_port(3);
    let rt = runtime();
    let cluster = ClusterUp::start(dir.path(), 3, port);
    let receipts = rt.block_on(async {
        let client = cluster.client_from(1);
        let r = load(&client, "r", 0, 5_000, 50, 4).await;
        client.close().await;
        r
    });
    cluster.stop();
    // Same directory: certificates, configurations and WALs are reused.
    let cluster = ClusterUp::start(dir.path(), 3, port);
    rt.block_on(async {
        let client = cluster.client_from(2);
        // Resubmitting every transaction returns the original receipts (the tx-hash index is
        // rebuilt from the WAL and snapshot).
        let again = load(&client, "r", 0, 5_000, 50, 4).await;
        let mut by_hash: HashMap<_, _> = receipts
            .iter()
            .map(|r| (r.tx_hash, (r.index(), r.offset)))
            .collect();
        for r in &again {
            assert!(r.duplicate, "{r:?} was sequenced again");
            assert_eq!(by_hash.remove(&r.tx_hash), Some((r.index(), r.offset)));
        }
        assert!(by_hash.is_empty());
        client.close().await;
    });
    let nodes = cluster.stop();
    let logs = read_logs(&nodes);
    check_logs_agree(&logs);
    check_receipts(&logs, &receipts);
}

/// Every node process is paused (SIGSTOP) for longer than the leader's lease (its longest
/// election timeout, 400 ms by default) while clients submit, and the leader resumes first, so
/// it is still leader but its lease has lapsed: its writes are refused until a quorum
/// acknowledges it again. Writes must commit again soon after. Before the fix they did not: a
/// proposer retried the refused write in a loop that kept the leader's shard from ever handling
/// the heartbeat answers that would renew the lease, and the cluster sequenced nothing for good
/// (docs/performance.md, the wedge).
#[test]
fn a_cluster_paused_longer_than_the_leader_lease_commits_again() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterUp::start(dir.path(), 3, free_base_port(3));
    let rt = runtime();
    let receipts = rt.block_on(async {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (acked_tx, acked) = tokio::sync::watch::channel(0u64);
        let acked_tx = std::sync::Arc::new(acked_tx);
        let mut tasks = Vec::new();
        for id in 1..=3u64 {
            for lane in 0..4u64 {
                let client = cluster.client_from(id);
                let (stop, acked_tx) = (stop.clone(), acked_tx.clone());
                tasks.push(tokio::spawn(async move {
                    let mut receipts = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(90);
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && Instant::now() < deadline
                        && i < 100_000
                    {
                        // Refusals and timeouts around a pause are expected; what committed
                        // must be in the log, checked below.
                        if let Ok(r) = client.submit(txs(&format!("p{id}-{lane}"), i, 20)).await {
                            receipts.extend(r.into_iter().filter_map(Result::ok));
                            acked_tx.send_modify(|n| *n += 1);
                        }
                        i += 20;
                    }
                    receipts
                }));
            }
        }
        let wait_acked = |n: u64, what: String| {
            let mut acked = acked.clone();
            async move {
                tokio::time::timeout(WAIT, acked.wait_for(|a| *a >= n))
                    .await
                    .unwrap_or_else(|_| panic!("{what}: {n} commits within {WAIT:?}"))
                    .expect("clients running");
            }
        };
        wait_acked(100, "before the pauses".into()).await;
        for round in 0..3 {
            let leader = leader_seen_by(&cluster.client_of(1), WAIT).await;
            let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
            for id in 1..=3 {
                cluster.signal(id, libc::SIGSTOP);
            }
            // The fault: the whole cluster stands still for 1.5 leases while the clients go on
            // sending (their requests wait in the paused nodes' sockets).
            tokio::time::sleep(Duration::from_millis(600)).await;
            cluster.signal(leader, libc::SIGCONT);
            tokio::time::sleep(Duration::from_millis(100)).await;
            for &id in &followers {
                cluster.signal(id, libc::SIGCONT);
            }
            let before = *acked.borrow();
            wait_acked(
                before + 100,
                format!("after pause {round} (leader {leader})"),
            )
            .await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut receipts = Vec::new();
        for t in tasks {
            receipts.extend(t.await.unwrap());
        }
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        for id in 1..=3 {
            wait_applied(&cluster.client_of(id), last, WAIT).await;
        }
        receipts
    });
    let nodes = cluster.stop();
    let logs = read_logs(&nodes);
    check_logs_agree(&logs);
    check_receipts(&logs, &receipts);
}

/// The node processes of `baton cluster up` whose configs live in `dir`, from /proc.
fn node_pids_in(dir: &std::path::Path) -> Vec<i32> {
    let needle = format!("{}/node-", dir.display());
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(" node ") && cmdline.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

/// SIGTERM to `baton cluster up` while it is still starting (its nodes spawned, no leader yet)
/// stops its node processes too. It used to die by the signal's default action and leave them
/// running.
#[test]
fn cluster_up_stopped_while_starting_leaves_no_node_running() {
    let dir = tempfile::tempdir().unwrap();
    // Elections take seconds: the signal lands while cluster up waits for a leader.
    let mut up = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args([
            "cluster",
            "up",
            "--nodes",
            "3",
            "--election-timeout-min-ms",
            "5000",
        ])
        .arg("--dir")
        .arg(dir.path())
        .arg("--base-port")
        .arg(free_base_port(3).to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start cluster up");
    let deadline = Instant::now() + WAIT;
    let pids = loop {
        let pids = node_pids_in(dir.path());
        if pids.len() == 3 {
            break pids;
        }
        assert!(
            Instant::now() < deadline,
            "3 node processes within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !dir.path().join("cluster.json").exists(),
        "still starting when signalled"
    );
    // SAFETY: kill(2) on the cluster up process this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(up.id() as i32, libc::SIGTERM) }, 0);
    let status = up.wait().expect("cluster up exits");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut up.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "startup was interrupted: {stderr}");
    assert!(stderr.contains("SIGTERM while starting"), "{stderr}");
    for pid in pids {
        // SAFETY: signal 0 only checks whether the process still exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "node process {pid} outlived cluster up: {stderr}");
    }
}

/// A node that cannot start (its port is taken) ends `cluster up` with that node's own error
/// and the end of its log, instead of a wait for a leader that cannot come (the node's QUIC
/// port simply never answers), and the other nodes are stopped.
#[test]
fn cluster_up_reports_a_node_that_cannot_bind_its_port() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(3);
    let _taken = std::net::UdpSocket::bind(("127.0.0.1", base + 1)).expect("port of node 2");
    let up = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args([
            "cluster",
            "up",
            "--nodes",
            "3",
            "--leader-timeout-ms",
            "300000",
        ])
        .arg("--dir")
        .arg(dir.path())
        .arg("--base-port")
        .arg(base.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start cluster up");
    let pid = up.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(up.wait_with_output());
    });
    // Bounded: a regression to waiting out the 300 s leader timeout fails here.
    let out = match rx.recv_timeout(WAIT) {
        Ok(out) => out.expect("cluster up output"),
        Err(_) => {
            // SAFETY: kill(2) on the cluster up process this test spawned (its waiter thread
            // has not reaped it: it is still running).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("cluster up still waiting {WAIT:?} after node 2 failed to start");
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("node 2 exited while starting"), "{stderr}");
    assert!(stderr.contains("Address already in use"), "{stderr}");
    assert!(
        node_pids_in(dir.path()).is_empty(),
        "nodes left running: {stderr}"
    );
}

/// A node that goes silent (its process stopped: no answer, no keep-alive, no close) holds up a
/// client's request only for the client's idle timeout: then the client gives the connection up
/// and retries on the next node. With a 3 s idle timeout (the node's own, the most a connection
/// to it can have) the same request outlives a 2.5 s call budget.
#[test]
fn a_client_leaves_a_silent_node_after_its_idle_timeout_and_retries_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterUp::start(dir.path(), 3, free_base_port(3));
    let rt = runtime();
    let receipts = rt.block_on(async {
        let leader = leader_seen_by(&cluster.client_of(1), WAIT).await;
        let client = |idle_timeout_ms: u64, call_budget_ms: u64| {
            let mut o = cluster.options_from(leader);
            o.idle_timeout_ms = idle_timeout_ms;
            o.call_budget_ms = call_budget_ms;
            baton_net::Client::new(o).expect("client")
        };
        // The quick one's budget leaves room for an election and a new connection on a loaded
        // machine.
        let (quick, slow) = (client(1_000, 15_000), client(3_000, 2_500));
        let mut receipts = Vec::new();
        // Both connect to the leader and are served by it.
        for (c, tag) in [(&quick, "idle-quick"), (&slow, "idle-slow")] {
            let r = c.submit(txs(tag, 0, 1)).await.expect("answered");
            receipts.push(r.into_iter().next().unwrap().expect("sequenced"));
        }
        cluster.signal(leader, libc::SIGSTOP);
        let (q, s) = tokio::join!(
            quick.submit(txs("idle-quick", 1, 5)),
            slow.submit(txs("idle-slow", 1, 5))
        );
        cluster.signal(leader, libc::SIGCONT);
        let q = q.expect("retried on another node within the budget");
        for r in q {
            receipts.push(r.expect("sequenced through the new leader"));
        }
        assert!(
            matches!(s, Err(baton_net::ClientError::Exhausted { .. })),
            "a 3 s idle timeout outlives the 2.5 s budget: {s:?}"
        );
        // Every node, the resumed one included, applies every receipt's batch.
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        for id in 1..=3 {
            wait_applied(&cluster.client_of(id), last, WAIT).await;
        }
        (receipts, last)
    });
    let (receipts, last) = receipts;
    let nodes = cluster.stop();
    let logs = read_logs(&nodes);
    // The resumed leader may append the slow client's request in its old term before it hears
    // of the new one; that entry is never committed and may outlive the test's end.
    check_logs_agree_through(&logs, last);
    check_receipts(&logs, &receipts);
}

/// A field of a `/proc` file made of `Name: value` lines, as its first number.
fn proc_field(path: &str, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `/proc/vmstat`'s count of huge page faults that fell back to small pages.
fn thp_fallbacks() -> u64 {
    let text = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("thp_fault_fallback "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A started node no longer lets new memory use transparent huge pages (`THP_enabled: 0` in its
/// status, what `prctl(PR_SET_THP_DISABLE)` sets), while the tables it wrote at start (index,
/// dedup window) sit on huge pages where the system offers them (`madvise` or `always`) and
/// none of the start's huge page faults fell back to small pages.
#[cfg(target_os = "linux")]
#[test]
fn nodes_keep_their_start_time_huge_pages_and_map_no_more() {
    let system =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let offered = system.contains("[always]") || system.contains("[madvise]");
    let dir = tempfile::tempdir().unwrap();
    let fallbacks = thp_fallbacks();
    let cluster = ClusterUp::start(dir.path(), 3, free_base_port(3));
    let no_fallback = thp_fallbacks() == fallbacks;
    for id in 1..=3 {
        let pid = cluster.node(id).pid;
        let enabled = proc_field(&format!("/proc/{pid}/status"), "THP_enabled");
        assert_eq!(enabled, Some(0), "node {id}: huge pages still allowed");
        let huge_kib = proc_field(&format!("/proc/{pid}/smaps_rollup"), "AnonHugePages")
            .expect("smaps_rollup");
        if offered && no_fallback {
            // Index (~240 MiB) and dedup window (64 MiB): most of it in 2 MiB pages.
            assert!(
                huge_kib >= 128 * 1024,
                "node {id}: {huge_kib} KiB on huge pages"
            );
        }
    }
    cluster.stop();
}

/// `cluster up` says when a node process exits, each as it happens, and ends by itself (status
/// 0) once every one has.
#[test]
fn cluster_up_reports_each_node_that_exits_and_ends_after_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterUp::start_to(
        dir.path(),
        3,
        free_base_port(3),
        &[],
        std::process::Stdio::piped(),
    );
    // cluster up's stderr, line by line; the channel closes when it exits.
    let stderr = cluster.process.stderr.take().expect("piped");
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let wait_for = |what: &str, seen: &mut Vec<String>| {
        while !seen.iter().any(|l| l.contains(what)) {
            let line = lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("cluster up never said {what:?} ({e}): {seen:?}"));
            seen.push(line);
        }
        // And whatever else it has said by now.
        seen.extend(lines.try_iter());
    };
    let said = |what: &str, seen: &[String]| seen.iter().any(|l| l.contains(what));
    cluster.kill(1);
    wait_for("node 1 exited (signal: 9 (SIGKILL))", &mut seen);
    assert!(!said("node 2 exited", &seen) && !said("every node exited", &seen));
    cluster.kill(2);
    cluster.kill(3);
    wait_for("every node exited", &mut seen);
    assert!(said("node 2 exited", &seen) && said("node 3 exited", &seen));
    // Its stderr closes when it exits.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match lines.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(line) => seen.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("cluster up did not end ({e}): {seen:?}"),
        }
    }
    let status = cluster.process.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// Rewrites the node.toml at `path` with `shard_cpus` and `net_cpus` set.
fn place(path: &std::path::Path, shard_cpus: &[usize], net_cpus: &[usize]) {
    let mut file: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
    let list = |c: &[usize]| toml::Value::Array(c.iter().map(|&c| (c as i64).into()).collect());
    file.insert("shard_cpus".into(), list(shard_cpus));
    file.insert("net_cpus".into(), list(net_cpus));
    file.remove("shards");
    std::fs::write(path, toml::to_string(&file).unwrap()).unwrap();
}

/// `shard_cpus` and `net_cpus` in node.toml pin a real node's shard and QUIC threads; a CPU
/// the process may not run on stops the node at start with the reason.
#[test]
fn a_node_runs_its_threads_on_the_cpus_its_config_names() {
    let allowed = baton_core::cpus::allowed().expect("affinity mask");
    let (shard_cpu, net_cpu) = (*allowed.last().unwrap(), allowed[0]);
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterUp::start(dir.path(), 1, free_base_port(1));
    let config = cluster.node(1).config.clone();
    cluster.kill(1);
    place(&config, &[shard_cpu], &[net_cpu]);
    cluster.restart(1);
    let rt = runtime();
    rt.block_on(async {
        let client = cluster.client_of(1);
        leader_seen_by(&client, WAIT).await;
    });
    let pid = cluster.node(1).pid;
    let list = baton_core::cpus::list;
    // Threads a pinned one starts (glommio's blocking pool) carry its name and its mask; the
    // nonce pool's, started by the Raft shard to keep work off it, has the process's mask.
    for (name, cpus) in [
        ("baton-1-s0", vec![shard_cpu]),
        ("baton-1-net", vec![net_cpu]),
        ("baton-1-nonce", allowed.clone()),
    ] {
        let seen = baton_core::cpus::thread_cpu_lists(pid, name).unwrap();
        assert!(
            !seen.is_empty() && seen.iter().all(|c| *c == list(&cpus)),
            "{name}: {seen:?}, want {cpus:?}"
        );
    }
    cluster.kill(1);

    let outside = allowed.last().unwrap() + 1;
    place(&config, &[outside], &[net_cpu]);
    let mut node = std::process::Command::new(BATON)
        .arg("node")
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn baton node");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = node.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "a node with a bad CPU did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut node.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "shard_cpus: CPU {outside} is not one this process may run on"
        )),
        "{err}"
    );
    cluster.stop();
}

/// [`baton_ok`] with string arguments.
fn baton_ok_str<S: AsRef<str>>(args: &[S]) -> Vec<u8> {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref().as_ref()).collect();
    baton_ok(&args)
}

/// Runs `baton ARGS…`, which must exit 1; its stderr.
fn baton_fails<S: AsRef<str>>(args: &[S]) -> String {
    let args: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
    let out = std::process::Command::new(BATON)
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "baton {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `baton admin leader transfer` moves leadership while three clients submit, one through each
/// node process: first to a named follower, then on to whichever voter is furthest along. Each
/// transfer answers once the new leader leads, in a later term; no client request fails (they
/// follow the leader), and every receipt is in every node's log afterwards. Refusals are typed
/// and exit 1: no client certificate, a node that is not a member.
#[test]
fn leadership_moves_on_request_under_load() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let port = free_base_port(3);
    let rt = runtime();
    // Longer election timeouts than the defaults: a transfer's bounds scale with them (the
    // target must have answered the leader lately, and must lead soon), and the load of three
    // processes and three clients on two cores must not make a refusal of either.
    let cluster =
        ClusterUp::start_with(dir.path(), 3, port, &["--election-timeout-min-ms", "1000"]);
    let cluster_dir = cluster.dir.to_str().unwrap().to_string();
    let ca = cluster.ca.to_str().unwrap().to_string();
    let endpoints: Vec<String> = cluster.endpoints().iter().map(|e| e.to_string()).collect();
    let status = rt.block_on(async {
        let client = cluster.client_from(1);
        let s = wait_status(&client, WAIT, |s| s.leader.is_some()).await;
        client.close().await;
        s
    });
    let (first, term) = (status.leader.unwrap(), status.term);
    let to = [1, 2, 3].into_iter().find(|&id| id != first).unwrap();

    let unauthenticated = baton_fails(&[
        "admin",
        "leader",
        "transfer",
        "--to",
        &to.to_string(),
        "--endpoints",
        &endpoints.join(","),
        "--ca",
        &ca,
    ]);
    assert!(
        unauthenticated.contains("needs the cluster's client certificate"),
        "{unauthenticated}"
    );
    let stranger = baton_fails(&[
        "admin",
        "leader",
        "transfer",
        "--to",
        "99",
        "--cluster",
        &cluster_dir,
    ]);
    assert!(stranger.contains("node 99 is not a member"), "{stranger}");

    let transfer = move |to: Option<u64>| {
        let mut args = vec![
            "admin".to_string(),
            "leader".into(),
            "transfer".into(),
            "--json".into(),
            "--cluster".into(),
            cluster_dir.clone(),
        ];
        if let Some(to) = to {
            args.extend(["--to".to_string(), to.to_string()]);
        }
        let out = baton_ok_str(&args);
        serde_json::from_slice::<serde_json::Value>(&out).unwrap()
    };
    let receipts = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for id in 1..=3u64 {
            let (client, stop) = (cluster.client_from(id), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                // Bounded: until told to stop, at most 20,000 requests.
                for i in 0..20_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let results = client
                        .submit(txs(&format!("n{id}"), i * 10, 10))
                        .await
                        .expect("request answered");
                    out.extend(results.into_iter().map(|r| r.expect("sequenced")));
                }
                client.close().await;
                out
            }));
        }
        let observer = cluster.client_from(1);
        let applied = |s: &baton_core::node::NodeStatus| s.applied_index.unwrap_or(0);
        let at = applied(&wait_status(&observer, WAIT, |_| true).await);
        wait_status(&observer, WAIT, |s| applied(s) > at + 20).await;

        let t = transfer.clone();
        let moved = tokio::task::spawn_blocking(move || t(Some(to)))
            .await
            .unwrap();
        assert_ne!(moved["from"], to, "{moved}");
        assert_eq!(moved["leader"], to, "{moved}");
        assert!(moved["term"].as_u64().unwrap() > term, "{moved}");
        let after = wait_status(&observer, WAIT, |s| s.leader == Some(to)).await;
        wait_status(&observer, WAIT, |s| applied(s) > applied(&after) + 20).await;

        let t = transfer.clone();
        let again = tokio::task::spawn_blocking(move || t(None)).await.unwrap();
        assert_eq!(again["from"], to, "{again}");
        assert_ne!(again["leader"], to, "{again}");
        assert!(again["term"].as_u64() > moved["term"].as_u64(), "{again}");
        let after = wait_status(&observer, WAIT, |s| s.leader != Some(to)).await;
        wait_status(&observer, WAIT, |s| applied(s) > applied(&after) + 20).await;

        stop.store(true, Ordering::Relaxed);
        let mut receipts = Vec::new();
        for t in tasks {
            receipts.extend(t.await.expect("client task"));
        }
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        for id in 1..=3 {
            wait_applied(&cluster.client_of(id), last, WAIT).await;
        }
        observer.close().await;
        receipts
    });
    let nodes = cluster.stop();
    let logs = read_logs(&nodes);
    check_logs_agree(&logs);
    check_receipts(&logs, &receipts);
}

/// A fourth node joins a running cluster of node processes: its certificate comes from the
/// cluster's CA (`baton certs --add-node`), it starts with `bootstrap = false` and no peers, and
/// `baton admin member add` makes it a voter once it has caught up. A client without a
/// certificate may not change the membership. `baton admin member remove` of the leader hands
/// leadership to another voter, and clients go on through the nodes left. The logs agree and
/// every receipt is in them once.
#[test]
fn a_node_joins_a_running_cluster_and_the_leader_is_removed() {
    use baton_core::node::{MemberChange, MembershipRejection, SubmitError};

    let dir = tempfile::tempdir().unwrap();
    let port = free_base_port(4);
    let rt = runtime();
    let mut cluster = ClusterUp::start(dir.path(), 3, port);
    let mut receipts = rt.block_on(async {
        let client = cluster.client_from(1);
        let r = load(&client, "a", 0, 3_000, 50, 4).await;
        client.close().await;
        r
    });

    // Node 4: a certificate from the cluster's CA, a signing key, a config with no peers.
    let d = cluster.dir.clone();
    let certs = d.join("certs");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    baton_ok_str(&["certs", "--out", &s(&certs), "--add-node", "4"]);
    let key = d.join("node-4.key");
    baton_ok_str(&["keygen", "--out", &s(&key)]);
    let addr4: std::net::SocketAddr = format!("127.0.0.1:{}", port + 3).parse().unwrap();
    let config = d.join("node-4.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = 4\ncluster_id = \"baton-local\"\nlisten_addr = \"{addr4}\"\n\
             data_dir = \"{}\"\nshards = 1\nsigning_key_file = \"{}\"\n\
             [tls]\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            s(&d.join("node-4")),
            s(&key),
            s(&certs.join("ca.pem")),
            s(&certs.join("node-4.pem")),
            s(&certs.join("node-4.key")),
        ),
    )
    .unwrap();
    cluster.nodes.push(NodeInfo {
        id: 4,
        addr: addr4,
        pid: 0,
        config,
        data_dir: d.join("node-4"),
        log: d.join("node-4.log"),
        metrics: None,
    });
    cluster.restart(4);

    let add4 = MemberChange::Add {
        id: 4,
        addr: addr4.to_string(),
        voter: true,
    };
    let leader = rt.block_on(async {
        // No client certificate, or a node's (not an operator's): refused, typed, nothing
        // changed.
        let node_cert = (certs.join("node-1.pem"), certs.join("node-1.key"));
        let mut leader = None;
        for identity in [None, Some(node_cert)] {
            let mut options = cluster.options_from(1);
            options.identity = identity;
            let client = baton_net::Client::new(options).unwrap();
            let refused = client
                .change_members(add4.clone(), Duration::from_secs(60))
                .await;
            assert!(
                matches!(
                    refused,
                    Err(baton_net::ClientError::NotSequenced(
                        SubmitError::Membership(MembershipRejection::Unauthenticated)
                    ))
                ),
                "{refused:?}"
            );
            let s = client.status().await.unwrap();
            assert_eq!(s.members.len(), 3, "nothing changed: {s:?}");
            leader = s.leader;
            client.close().await;
        }
        leader.unwrap()
    });
    let cluster_dir = s(&d);
    let added = baton_ok_str(&[
        "admin",
        "member",
        "add",
        "--cluster",
        &cluster_dir,
        "--id",
        "4",
        "--addr",
        &addr4.to_string(),
        "--json",
    ]);
    let added: serde_json::Value = serde_json::from_slice(&added).unwrap();
    assert!(added["index"].as_u64().unwrap() > 0, "{added}");
    let members = added["members"].as_array().unwrap();
    assert_eq!(members.len(), 4, "{added}");
    assert!(members.iter().all(|m| m["voter"] == true), "{added}");

    // Node 4 has the log and serves; submissions through it commit.
    let more = rt.block_on(async {
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        let s = wait_applied(&cluster.client_of(4), last, WAIT).await;
        assert_eq!(s.members.len(), 4);
        let client = cluster.client_from(4);
        let r = load(&client, "b", 0, 2_000, 50, 4).await;
        client.close().await;
        r
    });
    receipts.extend(more);
    // A client that knows node 4 alone reaches the leader for a command only the leader runs:
    // it learns the leader's address from node 4's membership.
    let ca = s(&certs.join("ca.pem"));
    let registered = baton_ok_str(&[
        "admin",
        "rollup",
        "add",
        "--id",
        "7",
        "--endpoints",
        &addr4.to_string(),
        "--ca",
        &ca,
    ]);
    let registered = String::from_utf8_lossy(&registered);
    assert!(registered.contains("rollup 7 registered"), "{registered}");

    // Remove the leader, through every endpoint the operator knows (node 4 included).
    let endpoints: Vec<String> = cluster.nodes.iter().map(|n| n.addr.to_string()).collect();
    let target = [
        "--endpoints".to_string(),
        endpoints.join(","),
        "--ca".into(),
        s(&certs.join("ca.pem")),
        "--client-cert".into(),
        s(&certs.join("client.pem")),
        "--client-key".into(),
        s(&certs.join("client.key")),
    ];
    let mut remove: Vec<String> = ["admin", "member", "remove", "--json", "--id"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    remove.push(leader.to_string());
    remove.extend(target.iter().cloned());
    let removed = baton_ok_str(&remove);
    let removed: serde_json::Value = serde_json::from_slice(&removed).unwrap();
    let members = removed["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{removed}");
    assert!(members.iter().all(|m| m["id"] != leader), "{removed}");
    // A node that is not a member: a typed refusal, exit 1.
    let mut bad: Vec<String> = ["admin", "member", "remove", "--id", "99"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    bad.extend(target.iter().cloned());
    let err = baton_fails(&bad);
    assert!(err.contains("node 99 is not a member"), "{err}");

    let stayed: Vec<u64> = [1, 2, 3, 4]
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    let more = rt.block_on(async {
        let s = wait_status(&cluster.client_of(4), WAIT, |s| {
            s.leader.is_some_and(|l| l != leader) && s.members.len() == 3
        })
        .await;
        assert!(stayed.contains(&s.leader.unwrap()), "{s:?}");
        let client = cluster.client_from(stayed[0]);
        let r = load(&client, "c", 0, 2_000, 50, 4).await;
        let last = r.iter().map(|r| r.index()).max().unwrap();
        for &id in &stayed {
            wait_applied(&cluster.client_of(id), last, WAIT).await;
        }
        client.close().await;
        r
    });
    receipts.extend(more);
    let listed = baton_ok_str(&[
        "admin",
        "member",
        "list",
        "--json",
        "--endpoints",
        &addr4.to_string(),
        "--ca",
        &s(&certs.join("ca.pem")),
    ]);
    let listed: serde_json::Value = serde_json::from_slice(&listed).unwrap();
    let ids: Vec<u64> = listed["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, stayed, "{listed}");

    let nodes = cluster.stop();
    let logs = read_logs(&nodes);
    check_logs_agree(&logs);
    check_receipts(&logs, &receipts);
}

/// One HTTP/1.1 exchange over a fresh TCP connection: `(status code, head, body)`.
fn http(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the metrics port");
    conn.set_read_timeout(Some(WAIT)).unwrap();
    conn.write_all(request).unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("a whole answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    (code, head.to_string(), body.to_string())
}

/// The value of the sample `series` (name with its labels) in a metrics text, if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// `cluster up --metrics`: each node serves Prometheus metrics over HTTP on 127.0.0.1 (its QUIC
/// port's number, over TCP), and they follow the cluster: one leader, every node's applied
/// index at least the last receipt's, the transactions answered counted by result, the stage
/// histograms filled; bad requests get a 4xx status and leave the endpoint serving.
#[test]
fn every_node_serves_metrics_that_follow_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterUp::start_with(dir.path(), 3, free_base_port(3), &["--metrics"]);
    for n in &cluster.nodes {
        assert_eq!(
            n.metrics.map(|a| (a.ip(), a.port())),
            Some((n.addr.ip(), n.addr.port())),
            "cluster.json lists node {}'s metrics address",
            n.id
        );
    }
    let rt = runtime();
    let receipts = rt.block_on(async {
        let client = cluster.client_from(1);
        let receipts = load(&client, "metrics", 0, 400, 50, 2).await;
        let last = receipts.iter().map(|r| r.index()).max().unwrap();
        for n in &cluster.nodes {
            wait_applied(&cluster.client_of(n.id), last, WAIT).await;
        }
        receipts
    });
    let last = receipts.iter().map(|r| r.index()).max().unwrap() as f64;

    // The nodes are scraped one after another: an election in between (a loaded machine)
    // would show two leaders or none, so scrape again (each node renders at most once a
    // second) until one round agrees.
    let deadline = Instant::now() + WAIT;
    let (scrapes, leader) = loop {
        let scrapes: Vec<(u64, String)> = cluster
            .nodes
            .iter()
            .map(|n| {
                let (code, head, body) = http(
                    n.metrics.unwrap(),
                    b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                );
                assert_eq!(code, 200, "{head}");
                assert!(
                    head.contains("Content-Type: application/openmetrics-text"),
                    "{head}"
                );
                assert!(body.ends_with("# EOF\n"), "{body}");
                (n.id, body)
            })
            .collect();
        let leaders: Vec<u64> = scrapes
            .iter()
            .filter(|(_, t)| sample(t, "baton_raft_role{role=\"leader\"}") == Some(1.0))
            .map(|(id, _)| *id)
            .collect();
        let agreed = leaders.len() == 1
            && scrapes
                .iter()
                .all(|(_, t)| sample(t, "baton_raft_leader_id") == Some(leaders[0] as f64));
        if agreed {
            break (scrapes, leaders[0]);
        }
        assert!(
            Instant::now() < deadline,
            "no round of scrapes agreed on one leader: {leaders:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (mut answered, mut requests, mut totals) = (0.0, 0.0, 0.0);
    for (id, text) in &scrapes {
        assert_eq!(sample(text, "baton_raft_status_ok"), Some(1.0), "{text}");
        assert!(
            text.contains(&format!(
                "baton_node_info{{node_id=\"{id}\",cluster_id=\"baton-local\""
            )),
            "{text}"
        );
        let applied = sample(text, "baton_raft_applied_index").unwrap();
        assert!(applied >= last, "node {id}: applied {applied} < {last}");
        if *id == leader {
            // It replicates to both followers over connections it dialed.
            for peer in cluster.nodes.iter().filter(|n| n.id != *id) {
                let p = peer.id;
                let series = format!("baton_raft_peer_lag_entries{{peer=\"{p}\"}}");
                assert!(sample(text, &series).is_some(), "{series}: {text}");
                let connected = format!("baton_peer_connected{{peer=\"{p}\"}}");
                assert_eq!(sample(text, &connected), Some(1.0), "{text}");
                let sent = format!("baton_peer_sent_bytes_total{{peer=\"{p}\"}}");
                assert!(sample(text, &sent).unwrap() > 400.0 * 128.0, "{text}");
                let rtt = format!("baton_peer_rtt_seconds{{peer=\"{p}\"}}");
                assert!(sample(text, &rtt).unwrap() > 0.0, "{text}");
            }
        }
        answered += sample(text, "baton_client_transactions_total{result=\"receipt\"}").unwrap();
        requests += sample(text, "baton_client_submit_requests_total").unwrap();
        assert_eq!(
            sample(text, "baton_client_requests_total{kind=\"submit\"}"),
            sample(text, "baton_client_submit_requests_total"),
            "{text}"
        );
        // Each node was asked for its status (waiting for it to apply the last receipt).
        assert!(sample(text, "baton_client_requests_total{kind=\"status\"}").unwrap() >= 1.0);
        totals += sample(text, "baton_stage_seconds_count{stage=\"total\"}").unwrap();
        assert!(sample(text, "process_resident_memory_bytes").unwrap() > 0.0);
    }
    // Every transaction was answered with a receipt, counted by the node its request went to
    // (a follower forwards it to the leader and answers it); a request retried after a lost
    // answer is answered (and counted) again.
    assert!(answered >= 400.0, "{answered}");
    assert!(requests >= 8.0, "{requests}");
    assert!(totals >= 8.0, "{totals}");

    let addr = cluster.nodes[0].metrics.unwrap();
    for (request, want) in [
        (&b"GET /nothing-here HTTP/1.1\r\n\r\n"[..], 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"\x16\x03\x01 not http at all\r\n\r\n", 400),
        (&[b'a'; 9 * 1024][..], 431),
    ] {
        let (code, head, _) = http(addr, request);
        assert_eq!(code, want, "{head}");
    }
    // A HEAD has the headers only; the endpoint still serves after the refusals.
    let (code, head, body) = http(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n");
    assert_eq!((code, body.as_str()), (200, ""), "{head}");
    let (code, _, body) = http(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(code, 200);
    assert_eq!(sample(&body, "baton_raft_status_ok"), Some(1.0));

    // A node whose metrics address is taken does not start, and says which address.
    let config = dir.path().join("taken.toml");
    let mut file: toml::Table = std::fs::read_to_string(&cluster.nodes[0].config)
        .unwrap()
        .parse()
        .unwrap();
    let spare = free_base_port(1);
    file.insert("listen_addr".into(), format!("127.0.0.1:{spare}").into());
    file.insert("metrics_addr".into(), addr.to_string().into());
    file.insert("bootstrap".into(), false.into());
    file.insert(
        "data_dir".into(),
        dir.path().join("taken").display().to_string().into(),
    );
    std::fs::write(&config, toml::to_string(&file).unwrap()).unwrap();
    let out = std::process::Command::new(BATON)
        .arg("node")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("metrics address {addr}")), "{err}");
    assert!(!dir.path().join("taken").exists(), "nothing was started");
    cluster.stop();
}

/// Scrapes `addr` until `condition` holds for the metrics text (bounded by [`WAIT`]; metrics
/// have no push form, so this polls every 200 ms). The text that met it.
fn scrape_until(
    addr: std::net::SocketAddr,
    what: &str,
    condition: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, _, body) = http(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        if code == 200 && condition(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what} not seen in time: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGKILL of the leader, as the survivors' metrics tell it: a new leader (one of them says it
/// leads, the other names it), whose link to the dead node is down with failed dials, and whose
/// lag for it grows while writes go on; the restarted node's link comes back.
#[test]
fn metrics_show_a_killed_leader_gone_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterUp::start_with(
        dir.path(),
        3,
        free_base_port(3),
        &["--metrics", "--election-timeout-min-ms", "1000"],
    );
    let rt = runtime();
    let old = rt.block_on(async { leader_seen_by(&cluster.client_of(1), WAIT).await });
    cluster.kill(old);
    let survivors: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|&id| id != old)
        .collect();
    let leads = |t: &str| sample(t, "baton_raft_role{role=\"leader\"}") == Some(1.0);
    // Either survivor may win; wait on both until one leads.
    let deadline = Instant::now() + WAIT;
    let new = loop {
        let leader = survivors.iter().copied().find(|&id| {
            let (_, _, body) = http(
                cluster.node(id).metrics.unwrap(),
                b"GET /metrics HTTP/1.1\r\n\r\n",
            );
            leads(&body)
        });
        if let Some(id) = leader {
            break id;
        }
        assert!(Instant::now() < deadline, "no survivor took over");
        std::thread::sleep(Duration::from_millis(200));
    };
    let other = *survivors.iter().find(|&&id| id != new).unwrap();
    scrape_until(
        cluster.node(other).metrics.unwrap(),
        "the follower naming the new leader",
        |t| sample(t, "baton_raft_leader_id") == Some(new as f64),
    );
    // Writes go on through the survivors.
    rt.block_on(async {
        let client = cluster.client_of(new);
        let receipts = load(&client, "gone", 0, 200, 50, 1).await;
        assert_eq!(receipts.len(), 200);
    });
    let gone = |p: u64| format!("{{peer=\"{p}\"}}");
    let text = scrape_until(
        cluster.node(new).metrics.unwrap(),
        "the dead node's link down with failed dials",
        |t| {
            sample(t, &format!("baton_peer_connected{}", gone(old))) != Some(1.0)
                && sample(t, &format!("baton_peer_dial_failures{}", gone(old))) >= Some(1.0)
        },
    );
    assert_eq!(
        sample(&text, &format!("baton_peer_connected{}", gone(other))),
        Some(1.0),
        "{text}"
    );
    let lag = sample(&text, &format!("baton_raft_peer_lag_entries{}", gone(old))).unwrap();
    assert!(
        lag >= 4.0,
        "the dead node misses the 4 requests' entries: {lag}"
    );

    cluster.restart(old);
    scrape_until(
        cluster.node(new).metrics.unwrap(),
        "the restarted node's link up and caught up",
        |t| {
            sample(t, &format!("baton_peer_connected{}", gone(old))) == Some(1.0)
                && sample(t, &format!("baton_peer_dial_failures{}", gone(old))) == Some(0.0)
                && sample(t, &format!("baton_raft_peer_lag_entries{}", gone(old))) == Some(0.0)
        },
    );
    cluster.stop();
}
