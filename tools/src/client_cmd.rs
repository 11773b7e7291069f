//! `baton submit` and `baton status`: a QUIC client of a running cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use baton_core::node::{NodeStatus, StageReport};
use baton_core::{AckLevel, Transaction, TxKind};
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
    /// A client certificate to present (membership changes and leadership transfers need one;
    /// with `--cluster`, the cluster's client certificate is presented).
    #[arg(long, requires = "client_key", conflicts_with = "cluster")]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key.
    #[arg(long, requires = "client_cert", conflicts_with = "cluster")]
    client_key: Option<PathBuf>,
}

impl Target {
    /// Client options for the target.
    pub fn options(&self) -> Result<ClientOptions, String> {
        match &self.cluster {
            Some(dir) => {
                let path = dir.join("cluster.json");
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let info: ClusterInfo =
                    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                let endpoints = info.nodes.iter().map(|n| n.addr).collect();
                let mut options = ClientOptions::new(endpoints, info.ca_cert);
                options.identity = Some((info.client_cert, info.client_key));
                Ok(options)
            }
            None => {
                let ca = self.ca.clone().ok_or("--ca (or --cluster) is required")?;
                if self.endpoints.is_empty() {
                    return Err("--endpoints (or --cluster) is required".into());
                }
                let mut options = ClientOptions::new(self.endpoints.clone(), ca);
                options.identity = self.client_cert.clone().zip(self.client_key.clone());
                Ok(options)
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
    /// Seed of the generated transactions (default: the current time). The same seed, count
    /// and size make the same transactions, so a second run resubmits them: each comes back as
    /// a duplicate with its original receipt.
    #[arg(long, requires = "count")]
    seed: Option<u64>,
    /// Generated transactions per request.
    #[arg(long, default_value_t = 64)]
    per_request: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// When to answer: `committed` (durable on a majority) or `preconfirmed` (ordered and
    /// signed by the leader).
    #[arg(long, default_value = "committed", value_parser = parse_ack)]
    ack: AckLevel,
    /// Print JSON (a single transaction's full receipt, as `baton verify` reads it).
    #[arg(long)]
    json: bool,
}

/// `committed` or `preconfirmed`.
pub fn parse_ack(s: &str) -> Result<AckLevel, String> {
    match s {
        "committed" => Ok(AckLevel::Committed),
        "preconfirmed" => Ok(AckLevel::Preconfirmed),
        _ => Err(format!("{s:?}: expected committed or preconfirmed")),
    }
}

/// A current-thread tokio runtime for one command.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Bytes from hex (optional `0x`). Works on bytes, so non-ASCII input is an error, not a panic
/// at a char boundary.
fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    if !s.len().is_multiple_of(2) {
        return Err("hex must have an even number of digits".into());
    }
    let mut out = vec![0u8; s.len() / 2];
    baton_core::sign::decode_hex(s, &mut out).map_err(|e| format!("bad hex: {e}"))?;
    Ok(out)
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
            Some(bytes) => submit_single(&client, args.rollup, bytes, args.ack, args.json).await,
            None => submit_generated(&client, &args).await,
        };
        client.close().await;
        code
    })
}

async fn submit_single(
    client: &Client,
    rollup: u64,
    bytes: Vec<u8>,
    ack: AckLevel,
    json_out: bool,
) -> ExitCode {
    let tx = Transaction {
        rollup_id: rollup,
        kind: TxKind::Raw,
        bytes,
    };
    match client.submit_with(vec![tx], ack).await {
        Ok(mut r) => match r.pop().expect("one result") {
            Ok(receipt) => {
                if json_out {
                    println!("{}", crate::keys_cmd::receipt_json(&receipt));
                } else {
                    println!(
                        "sequenced {} at index {} offset {}, term {}, {}{}",
                        receipt.tx_hash,
                        receipt.index(),
                        receipt.offset,
                        receipt.term(),
                        receipt.level.name(),
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
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let client = client.clone();
        let next = next.clone();
        let (rollup, size, ack) = (args.rollup, args.size, args.ack);
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut duplicates) = (0u64, 0u64, 0u64);
            let mut latencies_us = Vec::new();
            loop {
                let first = next.fetch_add(per, std::sync::atomic::Ordering::Relaxed);
                if first >= count {
                    break;
                }
                let txs = (first..(first + per).min(count))
                    .map(|i| generated(rollup, seed, i, size))
                    .collect::<Vec<_>>();
                let n = txs.len() as u64;
                let sent = Instant::now();
                let answer = client.submit_with(txs, ack).await;
                latencies_us.push(sent.elapsed().as_micros() as u64);
                match answer {
                    Ok(results) => {
                        for r in results {
                            match r {
                                Ok(r) => {
                                    ok += 1;
                                    duplicates += u64::from(r.duplicate);
                                }
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
            (ok, failed, duplicates, latencies_us)
        }));
    }
    let (mut ok, mut failed, mut duplicates) = (0, 0, 0);
    let mut latencies_us = Vec::new();
    for t in tasks {
        let (o, f, d, l) = t.await.unwrap_or((0, 0, 0, Vec::new()));
        ok += o;
        failed += f;
        duplicates += d;
        latencies_us.extend(l);
    }
    let secs = started.elapsed().as_secs_f64();
    let [p50, p90, p99] = percentiles_us(&mut latencies_us, [0.5, 0.9, 0.99]);
    if args.json {
        println!(
            "{}",
            json!({"sequenced": ok, "duplicates": duplicates, "failed": failed, "seconds": secs, "tx_per_s": ok as f64 / secs,
                   "request_latency_us": {"p50": p50, "p90": p90, "p99": p99}})
        );
    } else {
        println!(
            "sequenced {ok} transactions ({duplicates} of them duplicates, {failed} failed) in \
             {secs:.2} s: {:.0} tx/s; \
             request latency (submit to committed) p50 {p50} us, p90 {p90} us, p99 {p99} us",
            ok as f64 / secs
        );
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The given quantiles (0..=1) of `samples`, in their unit; 0 when empty.
fn percentiles_us<const N: usize>(samples: &mut [u64], quantiles: [f64; N]) -> [u64; N] {
    samples.sort_unstable();
    quantiles.map(|q| {
        if samples.is_empty() {
            return 0;
        }
        let at = ((samples.len() - 1) as f64 * q).round() as usize;
        samples[at]
    })
}

/// `baton status`
#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Ask each node this many times and print the round-trip percentiles (a loopback QUIC
    /// request/response that involves no consensus).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Also print each node's stage latencies since the last such request (or its start), and
    /// start a new window (docs/operations.md, "Stage latencies").
    #[arg(long)]
    stages: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// A stage report as JSON, in the shape `baton-perf` writes for each node: the window and, per
/// stage, its count and percentiles in µs.
pub fn stages_json(r: &StageReport) -> serde_json::Value {
    serde_json::to_value(baton_perf::report::NodeStages::of(r)).expect("plain numbers and names")
}

/// The status as JSON.
pub fn status_json(s: &NodeStatus) -> serde_json::Value {
    json!({
        "id": s.id,
        "role": s.role.name(),
        "term": s.term,
        "signer": s.signer.to_string(),
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
            "last_heard_ms": p.last_heard_ms,
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
            let mut rtts_us = Vec::new();
            let mut stages = None;
            let status = match Client::new(o) {
                Ok(c) => {
                    let mut last = c.status().await.map_err(|e| e.to_string());
                    for _ in 1..args.repeat.max(1) {
                        let sent = Instant::now();
                        last = c.status().await.map_err(|e| e.to_string());
                        rtts_us.push(sent.elapsed().as_micros() as u64);
                    }
                    if args.stages && last.is_ok() {
                        stages = Some(c.stages().await.map_err(|e| e.to_string()));
                    }
                    last
                }
                Err(e) => Err(e.to_string()),
            };
            let round_trip = (!rtts_us.is_empty()).then(|| {
                let [p50, p99] = percentiles_us(&mut rtts_us, [0.5, 0.99]);
                eprintln!(
                    "{e}: status round trip p50 {p50} us, p99 {p99} us ({} requests)",
                    rtts_us.len()
                );
                json!({"count": rtts_us.len(), "p50_us": p50, "p99_us": p99})
            });
            match (status, stages) {
                (Ok(_), Some(Err(err))) => {
                    failed = true;
                    if !args.json {
                        println!("{e}: stages unavailable: {err}");
                    }
                    all.push(json!({"endpoint": e.to_string(), "error": err}));
                }
                (Ok(s), stages) => {
                    let stages = stages.and_then(Result::ok);
                    if !args.json {
                        print_status(*e, &s);
                        if let Some(r) = &stages {
                            println!("    stages: {r}");
                        }
                    }
                    let mut node = json!({"endpoint": e.to_string(), "status": status_json(&s)});
                    if let Some(r) = &stages {
                        node["stages"] = stages_json(r);
                    }
                    if let Some(rt) = &round_trip {
                        node["round_trip"] = rt.clone();
                    }
                    all.push(node);
                }
                (Err(err), _) => {
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
        "{endpoint}: node {} {} term {} leader {} last {} committed {} applied {} signer {}",
        s.id,
        s.role.name(),
        s.term,
        opt(s.leader),
        opt(s.last_log_index),
        opt(s.committed_index),
        opt(s.applied_index),
        s.signer
    );
    for p in &s.replication {
        let lag = s
            .last_log_index
            .unwrap_or(0)
            .saturating_sub(p.matched_index.unwrap_or(0));
        let learner = s.members.iter().any(|m| m.id == p.id && !m.voter);
        let heard = p
            .last_heard_ms
            .map_or("never".to_string(), |ms| format!("{ms} ms ago"));
        println!(
            "    peer {}{} matched {} lag {lag} heard {heard}",
            p.id,
            if learner { " (learner)" } else { "" },
            opt(p.matched_index)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::parse_hex;

    #[test]
    fn hex_arguments_parse_or_fail_cleanly() {
        assert_eq!(parse_hex("0x00ff10").unwrap(), vec![0, 255, 16]);
        assert_eq!(parse_hex("").unwrap(), Vec::<u8>::new());
        assert!(parse_hex("abc").is_err());
        assert!(parse_hex("zz").is_err());
        // A multi-byte character straddling a digit pair: an error, not a panic.
        assert!(parse_hex("a\u{e9}b").is_err());
    }
}
