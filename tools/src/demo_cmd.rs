//! `baton demo`: a local cluster of real node processes under load, a results table, cleanup.

use std::path::PathBuf;
use std::process::{Child, ExitCode};
use std::time::{Duration, Instant};

use baton_perf::gen::{parse_rollups, TxShape};
use baton_perf::load::{self, Cluster, Progress};
use baton_perf::report::{AckLevel, RunConfig, RunResult, Spread};
use clap::Args;

use crate::node_cmd::{
    exited_node, log_tails, prepare_cluster, raise_memlock, running_threads, spawn_node,
    stop_children, wait_for_leader,
};

/// `baton demo`
#[derive(Args)]
pub struct DemoArgs {
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Seconds of a second, preconfirmed-ack run after the committed one (0 skips it).
    #[arg(long, default_value_t = 4.0)]
    preconfirmed_s: f64,
    /// Client connections, spread over all nodes.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Transactions per request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Bytes per transaction.
    #[arg(long, default_value_t = 128)]
    tx_bytes: usize,
    /// Shards per node.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Keep the cluster's directory (certificates, configurations, logs, WALs) here instead of
    /// a temporary directory that is removed at the end.
    #[arg(long)]
    keep_dir: Option<PathBuf>,
    /// Also write the load generator's JSON result here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The running demo cluster; its processes are stopped when dropped.
struct Running {
    children: Vec<Child>,
}

impl Drop for Running {
    fn drop(&mut self) {
        stop_children(&mut self.children, Duration::from_secs(10));
    }
}

/// Runs `baton demo`.
pub fn run(args: DemoArgs) -> ExitCode {
    match demo(args) {
        Ok(problems) if problems.is_empty() => {
            println!("demo: OK");
            ExitCode::SUCCESS
        }
        Ok(problems) => {
            for p in problems {
                eprintln!("demo: FAILED: {p}");
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("demo: FAILED: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs the demo; the problems found (none when it went well).
fn demo(args: DemoArgs) -> Result<Vec<String>, String> {
    if !(1..=7).contains(&args.nodes) {
        return Err("--nodes must be 1 to 7".into());
    }
    let config = RunConfig {
        connections: args.connections.max(1),
        in_flight: args.in_flight.max(1),
        rate_tx_per_s: None,
        outstanding_max: 4096,
        batch: args.batch.max(1),
        tx: TxShape {
            tx_bytes: args.tx_bytes,
            rollups: parse_rollups("1")?,
            encrypted_pct: 0,
        },
        ack: AckLevel::Committed,
        warmup_s: args.warmup_s,
        duration_s: args.duration_s,
        spread: Spread::All,
        client_threads: 1,
    };
    config.validate()?;
    let started = Instant::now();
    let temp;
    let dir = match &args.keep_dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("baton-demo-")
                .tempdir()
                .map_err(|e| format!("temporary directory: {e}"))?;
            temp.path().to_path_buf()
        }
    };
    let base_port =
        baton_net::ports::free_loopback_udp_ports(args.nodes as u16, std::process::id())
            .ok_or("no free UDP port range")?;
    let prepared = prepare_cluster(
        &dir,
        args.nodes,
        base_port,
        args.shards,
        &Default::default(),
        false,
    )?;
    let dir = dir.canonicalize().map_err(|e| e.to_string())?;
    println!(
        "demo: starting {} nodes on 127.0.0.1:{base_port}.. in {}",
        args.nodes,
        dir.display()
    );
    if raise_memlock() < 512 << 10 {
        return Err(
            "locked memory is limited below the 512 KiB glommio needs per node, and \
                    this user cannot raise it: raise `ulimit -l` (see README, Requirements)"
                .into(),
        );
    }
    let mut running = Running {
        children: Vec::new(),
    };
    let mut endpoints = Vec::new();
    let mut pids = Vec::new();
    let mut logs = Vec::new();
    for n in &prepared {
        let log = dir.join(format!("node-{}.log", n.id));
        logs.push((n.id, log.clone()));
        let child = spawn_node(&n.config, &log).map_err(|e| format!("start node {}: {e}", n.id))?;
        pids.push(Some(child.id()));
        running.children.push(child);
        endpoints.push(n.addr);
    }
    let ca = dir.join("certs").join("ca.pem");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let leader = rt
        .block_on(wait_for_leader(
            &endpoints,
            &ca,
            Duration::from_secs(20),
            || exited_node(&mut running.children, &logs),
        ))
        .map_err(|e| {
            format!(
                "{e}\nnode logs are in {}; their last lines:\n{}\n{}",
                dir.display(),
                log_tails(&logs, 8),
                running_threads(&mut running.children, &logs)
            )
        })?;
    rt.block_on(crate::rollup_cmd::register_rollups(
        &endpoints,
        &ca,
        &[1],
        crate::rollup_cmd::DEFAULT_POLICY,
    ))?;
    println!(
        "demo: leader is node {leader} ({:.1} s); {:.0} s of closed-loop load through all nodes \
         ({} connections × {} requests × {} tx of {} B), {:.0} s warm-up first",
        started.elapsed().as_secs_f64(),
        args.duration_s,
        args.connections,
        args.in_flight,
        args.batch,
        args.tx_bytes,
        args.warmup_s
    );
    let cluster = Cluster {
        endpoints: endpoints.clone(),
        ca_cert: ca.clone(),
        pids,
    };
    let result = rt.block_on(load::run(&config, &cluster, Progress::Line))?;
    // The same load, answered at the leader's signature instead of the commit.
    let preconfirmed = if args.preconfirmed_s > 0.0 {
        let mut c = config.clone();
        c.ack = AckLevel::Preconfirmed;
        c.duration_s = args.preconfirmed_s;
        c.warmup_s = c.warmup_s.min(0.5);
        c.validate()?;
        println!(
            "demo: {:.0} s more with --ack preconfirmed (receipts at the leader's signature)",
            c.duration_s
        );
        Some(rt.block_on(load::run(&c, &cluster, Progress::Line))?)
    } else {
        None
    };
    let mut problems = Vec::new();
    // Every node must apply the same log to its end.
    let converged = rt.block_on(wait_converged(&cluster, Duration::from_secs(10)));
    if let Err(e) = &converged {
        problems.push(e.clone());
    }
    print_table(&result, preconfirmed.as_ref(), converged.as_ref().ok());
    // Rollup 1's blocks: everything sealed, the same latest block on every node, signed by a
    // node of the cluster.
    let signers: Vec<baton_core::Address> = prepared.iter().map(|n| n.signer).collect();
    match rt.block_on(check_blocks(
        &endpoints,
        &ca,
        &signers,
        Duration::from_secs(10),
    )) {
        Ok(line) => println!("{line}"),
        Err(e) => problems.push(e),
    }
    if let Some(p) = &args.out {
        std::fs::write(
            p,
            serde_json::to_string_pretty(&result).expect("serializable"),
        )
        .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    for r in std::iter::once(&result).chain(preconfirmed.as_ref()) {
        if r.errors.tx > 0 {
            problems.push(format!(
                "{} transactions got no {} receipt: {:?}",
                r.errors.tx,
                r.config.ack.name(),
                r.errors.by_type
            ));
        }
    }
    if result.throughput.tx == 0 {
        problems.push("no transaction was sequenced".into());
    }
    // A clean stop: every node exits 0 on SIGTERM.
    let mut children = std::mem::take(&mut running.children);
    stop_children(&mut children, Duration::from_secs(10));
    for (c, id) in children.iter_mut().zip(prepared.iter().map(|n| n.id)) {
        match c.try_wait() {
            Ok(Some(s)) if s.success() => {}
            other => problems.push(format!(
                "node {id} did not stop cleanly ({other:?}); its log: {}",
                dir.join(format!("node-{id}.log")).display()
            )),
        }
    }
    if !problems.is_empty() && args.keep_dir.is_none() {
        // The temporary directory goes away with the logs in it: show their ends first.
        for id in prepared.iter().map(|n| n.id) {
            let log =
                std::fs::read_to_string(dir.join(format!("node-{id}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            eprintln!("--- node {id} log (last lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
    println!(
        "demo: done in {:.1} s{}",
        started.elapsed().as_secs_f64(),
        match &args.keep_dir {
            Some(d) => format!("; the cluster's files are in {}", d.display()),
            None => "; temporary files removed".into(),
        }
    );
    Ok(problems)
}

/// Waits until rollup 1 has nothing waiting for a block and every node reports the same
/// latest block, checks its signature; returns the line to print.
async fn check_blocks(
    endpoints: &[std::net::SocketAddr],
    ca: &std::path::Path,
    signers: &[baton_core::Address],
    timeout: Duration,
) -> Result<String, String> {
    use baton_core::node::Consistency;
    use baton_net::rollup_msg::{Answer, Query};
    let deadline = Instant::now() + timeout;
    let clients: Vec<baton_net::Client> = endpoints
        .iter()
        .map(|e| baton_net::Client::new(baton_net::ClientOptions::new(vec![*e], ca)))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let wait = Duration::from_secs(2);
    let mut last = String::new();
    while Instant::now() < deadline {
        let mut seen = Vec::new();
        let mut errors = Vec::new();
        for c in &clients {
            match c.read(Query::Rollup(1), Consistency::Local, wait).await {
                Ok(r) => match r.value {
                    Answer::Rollup(Some(info)) => seen.push(info),
                    other => return Err(format!("rollup 1 read: {other:?}")),
                },
                Err(e) => errors.push(e.to_string()),
            }
        }
        let settled = seen.len() == clients.len()
            && seen
                .iter()
                .all(|i| i.pending_txs == 0 && i.height == seen[0].height);
        if !settled {
            last = format!("{seen:?} {errors:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let height = seen[0].height;
        let mut digests = Vec::new();
        for c in &clients {
            let query = Query::Block {
                rollup_id: 1,
                height,
            };
            match c
                .read(query, Consistency::Local, wait)
                .await
                .map(|r| r.value)
            {
                Ok(Answer::Block(Some(b))) => {
                    b.block
                        .signed
                        .verify(signers)
                        .map_err(|e| format!("block {height} of rollup 1: {e}"))?;
                    digests.push(b.block.signed.header.digest());
                }
                other => return Err(format!("block {height} of rollup 1: {other:?}")),
            }
        }
        if digests.iter().any(|d| *d != digests[0]) {
            return Err(format!("nodes disagree on block {height} of rollup 1"));
        }
        return Ok(format!(
            "  blocks       rollup 1: {height} blocks, {} tx in blocks, block {height} the same on every node (0x{}…), signed by a cluster key",
            seen[0].sealed_txs,
            &baton_core::sign::hex(&digests[0])[..16]
        ));
    }
    Err(format!(
        "rollup 1's blocks did not settle within {} s: {last}",
        timeout.as_secs()
    ))
}

/// Waits until every node has applied the same, final index; returns it per node.
async fn wait_converged(cluster: &Cluster, timeout: Duration) -> Result<Vec<(u64, u64)>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let statuses = load::statuses(cluster).await?;
        let applied: Vec<_> = statuses
            .iter()
            .map(|s| {
                s.as_ref()
                    .map(|s| (s.id, s.applied_index, s.committed_index))
            })
            .collect();
        let last = match applied.iter().cloned().collect::<Result<Vec<_>, _>>() {
            Ok(v) => {
                let first = v[0].1;
                if first.is_some() && v.iter().all(|(_, a, c)| *a == first && *c == first) {
                    return Ok(v.iter().map(|(id, a, _)| (*id, a.unwrap_or(0))).collect());
                }
                format!("(id, applied, committed) per node: {v:?}")
            }
            Err(e) => e.clone(),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "the nodes did not converge on one applied index within {} s: {last}",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_table(r: &RunResult, pre: Option<&RunResult>, applied: Option<&Vec<(u64, u64)>>) {
    let t = &r.throughput;
    println!();
    println!(
        "  throughput   {:>10.0} tx/s   {:>7.1} MB/s   ({} tx in {:.1} s, {} failed)",
        t.tx_per_s, t.mb_per_s, t.tx, r.measured_s, r.errors.tx
    );
    println!("  latency (ms)           p50      p90      p99    p99.9      max");
    let runs = std::iter::once(r).chain(pre);
    for (level, l, run) in runs.flat_map(|run| run.latency_ms.iter().map(move |(k, l)| (k, l, run)))
    {
        let note = if std::ptr::eq(run, r) {
            String::new()
        } else {
            format!(
                "   (separate {:.0} s run: {:.0} tx/s, {} failed)",
                run.measured_s, run.throughput.tx_per_s, run.errors.tx
            )
        };
        println!(
            "  submit → {level:<12} {:>7.2}  {:>7.2}  {:>7.2}  {:>7.2}  {:>7.2}{note}",
            l.p50, l.p90, l.p99, l.p99_9, l.max
        );
    }
    let leader = r
        .nodes
        .iter()
        .find(|n| n.role == "leader")
        .and_then(|n| n.id);
    println!(
        "  leader       node {}",
        leader.map_or("?".into(), |l| l.to_string())
    );
    for n in &r.nodes {
        let applied = applied
            .and_then(|a| a.iter().find(|(id, _)| Some(*id) == n.id))
            .map(|(_, a)| *a)
            .or(n.applied_index);
        println!(
            "  node {:<3} {:<22} {:<9} applied index {:>8}   max RSS {:>5} MiB",
            n.id.map_or("?".into(), |i| i.to_string()),
            n.endpoint,
            n.role,
            applied.map_or("-".into(), |a| a.to_string()),
            n.rss_max_bytes
                .map_or("-".into(), |b| format!("{:.0}", b as f64 / 1048576.0)),
        );
    }
    println!();
}
