//! A run against a real cluster: clients, the load shape, progress, node facts.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_core::node::SubmitError;
use baton_core::node::{NodeStatus, Role, StageReport};
use baton_net::{Client, ClientError, ClientOptions};
use serde::Deserialize;
use tokio::time::Instant;

use crate::driver;
use crate::gen::TxGen;
use crate::recorder::{Outcome, Recorder, Window};
use crate::report::{
    Errors, Machine, NodeFacts, NodeStages, RunConfig, RunResult, Spread, Throughput,
};

/// The cluster a run drives.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// Client addresses of the nodes.
    pub endpoints: Vec<SocketAddr>,
    /// The cluster CA certificate.
    pub ca_cert: PathBuf,
    /// Process ids of the nodes when they run on this machine (same order as `endpoints`),
    /// for RSS sampling.
    pub pids: Vec<Option<u32>>,
}

#[derive(Deserialize)]
struct ClusterFile {
    ca_cert: PathBuf,
    nodes: Vec<ClusterFileNode>,
}

#[derive(Deserialize)]
struct ClusterFileNode {
    addr: SocketAddr,
    pid: Option<u32>,
}

impl Cluster {
    /// The cluster described by `DIR/cluster.json` (written by `baton cluster up`).
    pub fn from_dir(dir: &Path) -> Result<Cluster, String> {
        let path = dir.join("cluster.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let f: ClusterFile =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Cluster {
            endpoints: f.nodes.iter().map(|n| n.addr).collect(),
            ca_cert: f.ca_cert,
            pids: f.nodes.iter().map(|n| n.pid).collect(),
        })
    }

    /// Nodes at `endpoints` trusting `ca_cert` (no local process ids).
    pub fn remote(endpoints: Vec<SocketAddr>, ca_cert: PathBuf) -> Cluster {
        let pids = vec![None; endpoints.len()];
        Cluster {
            endpoints,
            ca_cert,
            pids,
        }
    }
}

/// The error type name of a transaction that got no receipt.
fn submit_error_type(e: &SubmitError) -> &'static str {
    match e {
        SubmitError::NotLeader { .. } => "not leader",
        SubmitError::Overloaded { .. } => "overloaded",
        SubmitError::Invalid { .. } => "invalid",
        SubmitError::Rejected { .. } => "rejected",
        SubmitError::CommitTimeout { .. } => "commit timeout",
        SubmitError::ShuttingDown => "shutting down",
        SubmitError::ReceiptUnavailable { .. } => "receipt unavailable",
        SubmitError::UnknownRollup { .. } => "unknown rollup",
        SubmitError::MalformedCiphertext { .. } => "malformed ciphertext",
        SubmitError::Command(_) => "command refused",
        SubmitError::ReadTimeout { .. } => "read timeout",
        SubmitError::Membership(_) => "membership refused",
        SubmitError::Leadership(_) => "leadership transfer refused",
    }
}

/// The error type name of a request that failed as a whole.
fn client_error_type(e: &ClientError) -> String {
    match e {
        ClientError::Exhausted { .. } => "retries exhausted".into(),
        ClientError::Refused { code, .. } => format!("refused ({code:?})"),
        ClientError::NotSequenced(e) => submit_error_type(e).into(),
        ClientError::TooLarge(_) => "request too large".into(),
        ClientError::Undecodable(_) => "undecodable answer".into(),
        ClientError::Tls(_)
        | ClientError::Io(_)
        | ClientError::NoEndpoints
        | ClientError::BadOption { .. } => "client setup".into(),
    }
}

/// One status client per endpoint, each trying only its node, briefly.
fn status_clients(cluster: &Cluster) -> Result<Vec<Client>, String> {
    cluster
        .endpoints
        .iter()
        .map(|e| {
            let mut o = ClientOptions::new(vec![*e], &cluster.ca_cert);
            o.attempts_max = 2;
            o.call_budget_ms = 3_000;
            o.streams = 1;
            Client::new(o).map_err(|e| e.to_string())
        })
        .collect()
}

/// Each node's status, or why it did not answer.
pub async fn statuses(cluster: &Cluster) -> Result<Vec<Result<NodeStatus, String>>, String> {
    let clients = status_clients(cluster)?;
    let mut out = Vec::new();
    for c in &clients {
        out.push(c.status().await.map_err(|e| e.to_string()));
        c.close().await;
    }
    Ok(out)
}

/// Each node's stage latencies since the last such request, which ends that window and starts
/// the next (`None` where the node did not answer: older nodes do not know the request).
pub async fn stage_reports(cluster: &Cluster) -> Vec<Option<StageReport>> {
    let Ok(clients) = status_clients(cluster) else {
        return vec![None; cluster.endpoints.len()];
    };
    let mut out = Vec::new();
    for c in &clients {
        out.push(c.stages().await.ok());
        c.close().await;
    }
    out
}

/// The resident set size of process `pid`, bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// How a run reports progress while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Nothing.
    Quiet,
    /// One line per second on stderr (redrawn in place on a terminal).
    Line,
}

/// Runs `config` against `cluster` on the current tokio runtime and returns the result.
pub async fn run(
    config: &RunConfig,
    cluster: &Cluster,
    progress: Progress,
) -> Result<RunResult, String> {
    config.validate()?;
    if cluster.endpoints.is_empty() {
        return Err("no endpoints".into());
    }
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let gen = Arc::new(TxGen::new(config.tx.clone(), started_unix_ms)?);

    // Where the load goes: every node in turn, or the leader.
    let before = statuses(cluster).await?;
    let leader = before
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .find(|s| s.role == Role::Leader)
        .map(|s| s.id);
    let leader_endpoint = before.iter().zip(&cluster.endpoints).find_map(|(s, e)| {
        s.as_ref()
            .ok()
            .filter(|s| s.role == Role::Leader)
            .map(|_| *e)
    });
    let mut clients = Vec::new();
    for c in 0..config.connections.max(1) {
        let mut endpoints = cluster.endpoints.clone();
        match config.spread {
            Spread::All => endpoints.rotate_left(c % cluster.endpoints.len()),
            Spread::Leader => {
                let l = leader_endpoint.ok_or("no node reports being the leader")?;
                endpoints.retain(|e| *e != l);
                endpoints.insert(0, l);
            }
        }
        let mut o = ClientOptions::new(endpoints, &cluster.ca_cert);
        o.streams = config.in_flight.clamp(1, 8);
        clients.push(Client::new(o).map_err(|e| e.to_string())?);
    }
    // Connect every client before the clock starts.
    for c in &clients {
        c.status().await.map_err(|e| format!("connect: {e}"))?;
    }

    let window = Window::new(
        (config.warmup_s * 1e6) as u64,
        (config.duration_s * 1e6) as u64,
    );
    let recorder = Arc::new(Mutex::new(Recorder::new(window)));
    let batch = config.batch.max(1);
    let ack = config.ack;
    let clients = Arc::new(clients);
    let submit = {
        let (clients, gen) = (clients.clone(), gen.clone());
        move |connection: usize, request: u64| {
            let client = clients[connection].clone();
            let ack = ack.level();
            let txs = gen.txs(request * batch as u64, batch);
            let bytes: u64 = txs.iter().map(|t| t.bytes.len() as u64).sum();
            async move {
                let n = txs.len() as u64;
                match client.submit_with(txs, ack).await {
                    Ok(results) => {
                        let mut o = Outcome::default();
                        let mut failed: BTreeMap<&'static str, u64> = BTreeMap::new();
                        for r in &results {
                            match r {
                                Ok(_) => o.ok_tx += 1,
                                Err(e) => *failed.entry(submit_error_type(e)).or_default() += 1,
                            }
                        }
                        o.ok_bytes = bytes * o.ok_tx / n.max(1);
                        o.failed = failed
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect();
                        o
                    }
                    Err(e) => Outcome {
                        ok_tx: 0,
                        ok_bytes: 0,
                        failed: vec![(client_error_type(&e), n)],
                    },
                }
            }
        }
    };

    let start = Instant::now();
    let rss: Arc<Mutex<Vec<Option<u64>>>> = Arc::new(Mutex::new(vec![None; cluster.pids.len()]));
    let watcher = tokio::spawn(watch(
        start,
        config.clone(),
        recorder.clone(),
        cluster.pids.clone(),
        rss.clone(),
        progress,
    ));
    // The nodes' stage windows start as the measured window does (after the warm-up).
    let window_opened = async {
        let warmup = Duration::from_secs_f64(config.warmup_s.max(0.0));
        tokio::time::sleep_until(start + warmup).await;
        stage_reports(cluster).await
    };
    let load = async {
        match config.rate_tx_per_s {
            None => {
                driver::closed_loop(
                    start,
                    config.connections,
                    config.in_flight,
                    submit,
                    recorder.clone(),
                )
                .await;
                0
            }
            Some(rate) => {
                let stats = driver::open_loop(
                    start,
                    driver::Pacer::Thread,
                    rate / batch as f64,
                    config.connections,
                    config.outstanding_max,
                    submit,
                    recorder.clone(),
                )
                .await;
                stats.unsent
            }
        }
    };
    let (unsent, _) = tokio::join!(load, window_opened);
    watcher.abort();
    let _ = watcher.await;
    if progress == Progress::Line {
        eprintln!();
    }
    for c in clients.iter() {
        c.close().await;
    }

    let after = statuses(cluster).await?;
    let stages = stage_reports(cluster).await;
    let mut rec = recorder.lock().expect("recorder lock");
    rec.record_unsent(unsent, batch as u64);
    let (tx, bytes) = rec.ok();
    let secs = window.seconds();
    let rss = rss.lock().expect("rss lock").clone();
    let nodes = after
        .iter()
        .zip(&cluster.endpoints)
        .zip(rss)
        .zip(stages)
        .map(|(((s, e), rss), stages)| match s {
            Ok(s) => NodeFacts {
                endpoint: e.to_string(),
                id: Some(s.id),
                role: s.role.name().into(),
                term: Some(s.term),
                applied_index: s.applied_index,
                committed_index: s.committed_index,
                rss_max_bytes: rss,
                stages: stages.as_ref().map(NodeStages::of),
            },
            Err(err) => NodeFacts {
                endpoint: e.to_string(),
                id: None,
                role: format!("unreachable: {err}"),
                term: None,
                applied_index: None,
                committed_index: None,
                rss_max_bytes: rss,
                stages: None,
            },
        })
        .collect();
    Ok(RunResult {
        tool: format!("baton-perf {}", env!("CARGO_PKG_VERSION")),
        started_unix_ms,
        config: config.clone(),
        machine: Machine::this(),
        leader,
        nodes,
        measured_s: secs,
        throughput: Throughput {
            tx,
            bytes,
            requests: rec.ok_requests(),
            tx_per_s: tx as f64 / secs,
            mb_per_s: bytes as f64 / secs / 1e6,
            per_second_tx: rec.per_second(),
        },
        latency_ms: [(config.ack.name().to_string(), rec.latency())].into(),
        latency_per_second_ms: rec.per_second_latency(),
        client_send_lag_ms: rec.send_lag(),
        errors: Errors {
            tx: rec.failed(),
            by_type: rec.errors().iter().map(|(k, v)| (k.clone(), *v)).collect(),
        },
    })
}

/// Samples node RSS twice a second and prints the progress line every second.
async fn watch(
    start: Instant,
    config: RunConfig,
    recorder: Arc<Mutex<Recorder>>,
    pids: Vec<Option<u32>>,
    rss: Arc<Mutex<Vec<Option<u64>>>>,
    progress: Progress,
) {
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_ok = 0;
    let mut last_at = start;
    let total = config.warmup_s + config.duration_s;
    for n in 0u64.. {
        tick.tick().await;
        {
            let mut rss = rss.lock().expect("rss lock");
            for (slot, pid) in rss.iter_mut().zip(&pids) {
                if let Some(b) = pid.and_then(rss_bytes) {
                    *slot = Some(slot.unwrap_or(0).max(b));
                }
            }
        }
        if progress == Progress::Quiet || n % 2 == 1 || n == 0 {
            continue;
        }
        let (ok, failed, p99) = {
            let r = recorder.lock().expect("recorder lock");
            let (ok, failed) = r.live();
            (ok, failed, r.latency().p99)
        };
        let now = Instant::now();
        let rate = (ok - last_ok) as f64 / (now - last_at).as_secs_f64();
        (last_ok, last_at) = (ok, now);
        let elapsed = start.elapsed().as_secs_f64();
        let phase = if elapsed < config.warmup_s {
            "warm-up"
        } else {
            "measure"
        };
        let line = format!(
            "[{elapsed:>4.0}/{total:.0} s {phase}] {rate:>9.0} tx/s  {ok:>10} ok  {failed} failed  p99 {p99:.2} ms"
        );
        let mut err = std::io::stderr().lock();
        if tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }
}
