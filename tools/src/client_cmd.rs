//! `baton submit` and `baton status`: a QUIC client of a running cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use baton_core::node::{NodeStatus, Role};
use baton_core::{Transaction, TxKind};
use baton_net::{Client, ClientOptions};
use clap::Args;
use serde_json::json;

use crate::node_cmd::ClusterInfo;

/// Where the cluster is.
#[derive(Args, Clone)]
pub struct Target {
    /// A local cluster's directory (made by `baton cluster up`): endpoints and CA from its
    /// cluster.json.
    #[arg(long, conflicts_with_all = ["endpoints", "ca"])]
    cluster: Option<PathBuf>,
    /// Node addresses (`host:port`, comma-separated).
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<SocketAddr>,
    /// The cluster CA certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
}

impl Target {
    fn options(&self) -> Result<ClientOptions, String> {
        match &self.cluster {
            Some(dir) => {
                let path = dir.join("cluster.json");
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let info: ClusterInfo =
                    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                let endpoints = info.nodes.iter().map(|n| n.addr).collect();
                Ok(ClientOptions::new(endpoints, info.ca_cert))
            }
            None => {
                let ca = self.ca.clone().ok_or("--ca (or --cluster) is required")?;
                if self.endpoints.is_empty() {
                    return Err("--endpoints (or --cluster) is required".into());
                }
                Ok(ClientOptions::new(self.endpoints.clone(), ca))
            }
        }
    }
}

/// `baton submit`
#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    target: Target,
    /// Rollup id of the transactions.
    #[arg(long, default_value_t = 1)]
    rollup: u64,
    /// One transaction: these bytes, hex-encoded.
    #[arg(long, conflicts_with_all = ["text", "count"])]
    hex: Option<String>,
    /// One transaction: this text's UTF-8 bytes.
    #[arg(long, conflicts_with = "count")]
    text: Option<String>,
    /// Generate this many distinct transactions instead.
    #[arg(long)]
    count: Option<u64>,
    /// Size of generated transactions, in bytes.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Generated transactions per request.
    #[arg(long, default_value_t = 64)]
    per_request: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    if s.len() % 2 != 0 {
        return Err("hex must have an even number of digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("bad hex: {e}")))
        .collect()
}

/// Distinct generated transactions: a run-unique prefix, the sequence number, padding.
fn generated(rollup: u64, seed: u64, i: u64, size: usize) -> Transaction {
    let mut bytes = format!("{seed:016x}-{i:016x}-").into_bytes();
    bytes.resize(size.max(bytes.len()), b'.');
    Transaction {
        rollup_id: rollup,
        kind: TxKind::Raw,
        bytes,
    }
}

/// Runs `baton submit`.
pub fn run_submit(args: SubmitArgs) -> ExitCode {
    let options = match args.target.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("baton submit: {e}");
            return ExitCode::from(2);
        }
    };
    let single = match (&args.hex, &args.text) {
        (Some(h), _) => match parse_hex(h) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("baton submit: {e}");
                return ExitCode::from(2);
            }
        },
        (None, Some(t)) => Some(t.clone().into_bytes()),
        (None, None) => None,
    };
    runtime().block_on(async move {
        let client = match Client::new(options) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("baton submit: {e}");
                return ExitCode::from(1);
            }
        };
        let code = match single {
            Some(bytes) => submit_single(&client, args.rollup, bytes, args.json).await,
            None => submit_generated(&client, &args).await,
        };
        client.close().await;
        code
    })
}

async fn submit_single(client: &Client, rollup: u64, bytes: Vec<u8>, json_out: bool) -> ExitCode {
    let tx = Transaction {
        rollup_id: rollup,
        kind: TxKind::Raw,
        bytes,
    };
    match client.submit(vec![tx]).await {
        Ok(mut r) => match r.pop().expect("one result") {
            Ok(receipt) => {
                if json_out {
                    println!(
                        "{}",
                        json!({
                            "tx_hash": receipt.tx_hash.to_string(),
                            "index": receipt.index,
                            "offset": receipt.offset,
                            "duplicate": receipt.duplicate,
                        })
                    );
                } else {
                    println!(
                        "sequenced {} at index {} offset {}{}",
                        receipt.tx_hash,
                        receipt.index,
                        receipt.offset,
                        if receipt.duplicate {
                            " (duplicate: original position)"
                        } else {
                            ""
                        }
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("baton submit: not sequenced: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("baton submit: {e}");
            ExitCode::from(1)
        }
    }
}

async fn submit_generated(client: &Client, args: &SubmitArgs) -> ExitCode {
    let count = args.count.unwrap_or(1);
    let per = args.per_request.max(1) as u64;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let client = client.clone();
        let next = next.clone();
        let (rollup, size) = (args.rollup, args.size);
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            loop {
                let first = next.fetch_add(per, std::sync::atomic::Ordering::Relaxed);
                if first >= count {
                    break;
                }
                let txs = (first..(first + per).min(count))
                    .map(|i| generated(rollup, seed, i, size))
                    .collect::<Vec<_>>();
                let n = txs.len() as u64;
                match client.submit(txs).await {
                    Ok(results) => {
                        for r in results {
                            match r {
                                Ok(_) => ok += 1,
                                Err(e) => {
                                    failed += 1;
                                    tracing::warn!(error = %e, "transaction not sequenced");
                                }
                            }
                        }
                    }
                    Err(e) => {
                        failed += n;
                        tracing::warn!(error = %e, "request failed");
                    }
                }
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        let (o, f) = t.await.unwrap_or((0, 0));
        ok += o;
        failed += f;
    }
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            json!({"sequenced": ok, "failed": failed, "seconds": secs, "tx_per_s": ok as f64 / secs})
        );
    } else {
        println!(
            "sequenced {ok} transactions ({failed} failed) in {secs:.2} s: {:.0} tx/s",
            ok as f64 / secs
        );
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `baton status`
#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::Learner => "learner",
        Role::Shutdown => "shutdown",
    }
}

/// The status as JSON.
pub fn status_json(s: &NodeStatus) -> serde_json::Value {
    json!({
        "id": s.id,
        "role": role_name(s.role),
        "term": s.term,
        "leader": s.leader,
        "last_log_index": s.last_log_index,
        "committed_index": s.committed_index,
        "applied_index": s.applied_index,
        "snapshot_index": s.snapshot_index,
        "purged_index": s.purged_index,
        "members": s.members.iter().map(|m| json!({"id": m.id, "addr": m.addr, "voter": m.voter})).collect::<Vec<_>>(),
        "replication": s.replication.iter().map(|p| json!({
            "id": p.id,
            "matched_index": p.matched_index,
            "lag": s.last_log_index.unwrap_or(0).saturating_sub(p.matched_index.unwrap_or(0)),
        })).collect::<Vec<_>>(),
    })
}

/// Runs `baton status`: the status of every given node.
pub fn run_status(args: StatusArgs) -> ExitCode {
    let options = match args.target.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("baton status: {e}");
            return ExitCode::from(2);
        }
    };
    runtime().block_on(async move {
        let mut all = Vec::new();
        let mut failed = false;
        for e in &options.endpoints {
            let mut o = options.clone();
            o.endpoints = vec![*e];
            o.attempts_max = 2;
            o.call_budget_ms = 3_000;
            let status = match Client::new(o) {
                Ok(c) => c.status().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match status {
                Ok(s) => {
                    if !args.json {
                        print_status(*e, &s);
                    }
                    all.push(json!({"endpoint": e.to_string(), "status": status_json(&s)}));
                }
                Err(err) => {
                    failed = true;
                    if !args.json {
                        println!("{e}: unreachable: {err}");
                    }
                    all.push(json!({"endpoint": e.to_string(), "error": err}));
                }
            }
        }
        if args.json {
            println!("{}", serde_json::Value::Array(all));
        }
        if failed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    })
}

fn print_status(endpoint: SocketAddr, s: &NodeStatus) {
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    println!(
        "{endpoint}: node {} {} term {} leader {} last {} committed {} applied {}",
        s.id,
        role_name(s.role),
        s.term,
        opt(s.leader),
        opt(s.last_log_index),
        opt(s.committed_index),
        opt(s.applied_index)
    );
    for p in &s.replication {
        let lag = s
            .last_log_index
            .unwrap_or(0)
            .saturating_sub(p.matched_index.unwrap_or(0));
        println!(
            "    peer {} matched {} lag {lag}",
            p.id,
            opt(p.matched_index)
        );
    }
}
