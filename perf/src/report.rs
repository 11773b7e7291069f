//! The result of a run as JSON, the machine it ran on, and its Markdown summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::gen::TxShape;
use crate::recorder::{LatencySummary, SecondLatency};

/// Which receipt a request waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AckLevel {
    /// Durable on a majority of the cluster.
    Committed,
    /// Ordered and signed by the leader (before replication).
    Preconfirmed,
}

impl AckLevel {
    /// Its name in results.
    pub fn name(self) -> &'static str {
        self.level().name()
    }

    /// The node's ack level.
    pub fn level(self) -> baton_core::AckLevel {
        match self {
            AckLevel::Committed => baton_core::AckLevel::Committed,
            AckLevel::Preconfirmed => baton_core::AckLevel::Preconfirmed,
        }
    }
}

/// Which nodes the load goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Spread {
    /// Connections spread round-robin over every node (followers forward to the leader).
    All,
    /// Every connection to the leader.
    Leader,
}

/// What a run does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunConfig {
    /// Client connections (one QUIC connection each).
    pub connections: usize,
    /// Closed loop: requests in flight per connection.
    pub in_flight: usize,
    /// Open loop: offered load in transactions per second (closed loop when absent).
    pub rate_tx_per_s: Option<f64>,
    /// Open loop: bound on requests in flight over all connections.
    pub outstanding_max: usize,
    /// Transactions per request.
    pub batch: usize,
    /// The transactions.
    pub tx: TxShape,
    /// Receipt level waited for.
    pub ack: AckLevel,
    /// Seconds of load before measuring.
    pub warmup_s: f64,
    /// Seconds measured.
    pub duration_s: f64,
    /// Which nodes get the load.
    pub spread: Spread,
    /// Client runtime threads (1: a current-thread runtime).
    pub client_threads: usize,
}

impl RunConfig {
    /// Refuses settings a run cannot honour: a window that is not a positive, finite length,
    /// a warm-up that is negative, an offered rate that is not positive, zero connections,
    /// requests in flight or transactions per request, a transaction shape the generator
    /// refuses.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.duration_s.is_finite() && self.duration_s > 0.0) {
            return Err(format!(
                "the duration must be positive (got {} s)",
                self.duration_s
            ));
        }
        if !(self.warmup_s.is_finite() && self.warmup_s >= 0.0) {
            return Err(format!(
                "the warm-up must not be negative (got {} s)",
                self.warmup_s
            ));
        }
        if let Some(r) = self.rate_tx_per_s {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!("the offered rate must be positive (got {r} tx/s)"));
            }
        }
        if self.connections == 0
            || self.in_flight == 0
            || self.batch == 0
            || self.outstanding_max == 0
        {
            return Err(
                "connections, in-flight, batch and outstanding bounds must be at least 1".into(),
            );
        }
        // The transaction shape's own rules (size, encrypted share, rollups).
        crate::gen::TxGen::new(self.tx.clone(), 0).map(|_| ())
    }

    /// "closed" or "open".
    pub fn mode(&self) -> &'static str {
        if self.rate_tx_per_s.is_some() {
            "open"
        } else {
            "closed"
        }
    }
}

/// The machine the load generator ran on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    /// Logical CPUs available to the process.
    pub cores: usize,
    /// CPU model name.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// Host name.
    pub hostname: String,
}

impl Machine {
    /// Reads the facts of this machine (Linux `/proc`; "unknown" where unreadable).
    pub fn this() -> Machine {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into())
        };
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel: read("/proc/sys/kernel/osrelease"),
            hostname: read("/proc/sys/kernel/hostname"),
        }
    }
}

/// One node as seen at the end of the run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeFacts {
    /// Its client address.
    pub endpoint: String,
    /// Node id (absent when it did not answer).
    pub id: Option<u64>,
    /// Role name, or the error that kept it from answering.
    pub role: String,
    /// Term.
    pub term: Option<u64>,
    /// Highest applied log index.
    pub applied_index: Option<u64>,
    /// Highest committed log index.
    pub committed_index: Option<u64>,
    /// Largest resident set size seen during the run, bytes (local node processes only).
    pub rss_max_bytes: Option<u64>,
    /// The node's stage latencies from the end of the warm-up to the end of the run (absent
    /// when it did not answer, or in results of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<NodeStages>,
}

/// A node's stage latencies over the measured window (docs/operations.md, "Stage latencies").
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStages {
    /// How long the node's window ran, seconds.
    pub window_s: f64,
    /// Per stage, in the order of the path.
    pub stages: Vec<StageFacts>,
}

/// One stage's latencies, microseconds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageFacts {
    /// Stage name (`baton_core::node::Stage::name`: `queue`, `batching`, … `respond`).
    pub stage: String,
    /// How many were timed.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Longest.
    pub max_us: u64,
}

impl NodeStages {
    /// From a node's report.
    pub fn of(r: &baton_core::node::StageReport) -> NodeStages {
        NodeStages {
            window_s: r.window.as_secs_f64(),
            stages: r
                .stages
                .iter()
                .map(|s| StageFacts {
                    stage: s.stage.name().to_string(),
                    count: s.count,
                    p50_us: s.p50_us,
                    p90_us: s.p90_us,
                    p99_us: s.p99_us,
                    max_us: s.max_us,
                })
                .collect(),
        }
    }
}

/// Throughput of the measured window.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Throughput {
    /// Transactions with a receipt answered inside the window.
    pub tx: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Requests with receipts.
    pub requests: u64,
    /// Transactions per second.
    pub tx_per_s: f64,
    /// Payload megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Transactions answered in each second of the window.
    pub per_second_tx: Vec<u64>,
}

/// Errors of the measured window.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Errors {
    /// Transactions without a receipt.
    pub tx: u64,
    /// By error type.
    pub by_type: BTreeMap<String, u64>,
}

/// Everything a run produced: what `baton-perf run --out` writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    /// `baton-perf <version>`.
    pub tool: String,
    /// When the run started, Unix milliseconds.
    pub started_unix_ms: u64,
    /// What was run.
    pub config: RunConfig,
    /// Where the load generator ran.
    pub machine: Machine,
    /// The leader when the run started.
    pub leader: Option<u64>,
    /// The nodes at the end of the run.
    pub nodes: Vec<NodeFacts>,
    /// Seconds measured.
    pub measured_s: f64,
    /// Throughput.
    pub throughput: Throughput,
    /// Latency from (intended) submission to the receipt, per ack level (`committed`).
    pub latency_ms: BTreeMap<String, LatencySummary>,
    /// The same latency for the requests intended in each second of the window.
    #[serde(default)]
    pub latency_per_second_ms: Vec<SecondLatency>,
    /// Open loop: how late the client itself started the measured requests against their
    /// schedule, per request (its own queueing, included in every latency above); `None` in
    /// closed loop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_send_lag_ms: Option<LatencySummary>,
    /// Errors.
    pub errors: Errors,
}

impl RunResult {
    /// Ratio of failed transactions to all measured ones.
    pub fn error_ratio(&self) -> f64 {
        let all = self.throughput.tx + self.errors.tx;
        if all == 0 {
            0.0
        } else {
            self.errors.tx as f64 / all as f64
        }
    }

    /// The latency of the run's own ack level.
    pub fn ack_latency(&self) -> LatencySummary {
        self.latency_ms
            .get(self.config.ack.name())
            .cloned()
            .unwrap_or_default()
    }

    /// The Markdown summary.
    pub fn markdown(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let _ = writeln!(s, "# baton-perf result\n");
        let load = match c.rate_tx_per_s {
            Some(r) => format!(
                "open loop at {r:.0} tx/s offered ({} connections, at most {} requests in flight)",
                c.connections, c.outstanding_max
            ),
            None => format!(
                "closed loop: {} connections × {} requests in flight",
                c.connections, c.in_flight
            ),
        };
        let _ = writeln!(
            s,
            "{load}, {} tx of {} B per request, {}% encrypted, rollups {}, ack {}, \
             load to {} nodes; {:.0} s warm-up, {:.1} s measured.\n",
            c.batch,
            c.tx.tx_bytes,
            c.tx.encrypted_pct,
            c.tx.rollups
                .iter()
                .map(|r| format!("{}:{}", r.id, r.weight))
                .collect::<Vec<_>>()
                .join(","),
            c.ack.name(),
            match c.spread {
                Spread::All => "all",
                Spread::Leader => "the leader of the",
            },
            c.warmup_s,
            self.measured_s,
        );
        let m = &self.machine;
        let _ = writeln!(
            s,
            "Machine: {} cores, {}, Linux {}.\n",
            m.cores, m.cpu_model, m.kernel
        );
        let t = &self.throughput;
        let _ = writeln!(s, "| throughput | tx/s | MB/s | transactions | failed |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        let _ = writeln!(
            s,
            "| measured | {:.0} | {:.1} | {} | {} |\n",
            t.tx_per_s, t.mb_per_s, t.tx, self.errors.tx
        );
        let _ = writeln!(s, "| latency (ms) | p50 | p90 | p99 | p99.9 | max | mean |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for (level, l) in &self.latency_ms {
            let _ = writeln!(
                s,
                "| submit → {level} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                l.p50, l.p90, l.p99, l.p99_9, l.max, l.mean
            );
        }
        if let Some(l) = &self.client_send_lag_ms {
            let _ = writeln!(
                s,
                "| client's own send lag (per request) | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                l.p50, l.p90, l.p99, l.p99_9, l.max, l.mean
            );
        }
        let _ = writeln!(s);
        if !self.latency_per_second_ms.is_empty() {
            let _ = writeln!(
                s,
                "| second (intended) | tx intended in it, answered | p50 (ms) | p99 (ms) | max (ms) |"
            );
            let _ = writeln!(s, "|---|---|---|---|---|");
            for (i, l) in self.latency_per_second_ms.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.2} | {:.2} | {:.2} |",
                    i + 1,
                    l.count,
                    l.p50,
                    l.p99,
                    l.max
                );
            }
            let _ = writeln!(s);
        }
        if !self.errors.by_type.is_empty() {
            let _ = writeln!(s, "| error | transactions |\n|---|---|");
            for (k, n) in &self.errors.by_type {
                let _ = writeln!(s, "| {k} | {n} |");
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(
            s,
            "| node | endpoint | role | term | committed | applied | max RSS (MiB) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        for n in &self.nodes {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                opt(n.id),
                n.endpoint,
                n.role,
                opt(n.term),
                opt(n.committed_index),
                opt(n.applied_index),
                n.rss_max_bytes
                    .map_or("-".to_string(), |b| format!("{:.0}", b as f64 / 1048576.0)),
            );
        }
        let timed: Vec<_> = self
            .nodes
            .iter()
            .filter_map(|n| n.stages.as_ref().map(|st| (n, st)))
            .collect();
        if let Some((_, first)) = timed.first() {
            let _ = writeln!(
                s,
                "\nStage latencies in the nodes over the measured window, ms, p50 / p99 \
                 (count; docs/operations.md, \"Stage latencies\"):\n"
            );
            let names: Vec<&str> = first.stages.iter().map(|f| f.stage.as_str()).collect();
            let _ = writeln!(s, "| node | {} |", names.join(" | "));
            let _ = writeln!(s, "|---|{}", "---|".repeat(names.len()));
            for (n, st) in timed {
                let cells: Vec<String> = names
                    .iter()
                    .map(|name| match st.stages.iter().find(|f| f.stage == *name) {
                        Some(f) if f.count > 0 => format!(
                            "{:.2} / {:.2} ({})",
                            f.p50_us as f64 / 1e3,
                            f.p99_us as f64 / 1e3,
                            f.count
                        ),
                        _ => "-".to_string(),
                    })
                    .collect();
                let _ = writeln!(s, "| {} {} | {} |", opt(n.id), n.role, cells.join(" | "));
            }
        }
        s
    }
}

/// A result with the given throughput, p99 and failures (tests).
#[cfg(test)]
pub(crate) fn sample_result(achieved: f64, p99: f64, failed: u64) -> RunResult {
    use crate::gen::RollupShare;
    use crate::recorder::LatencySummary;
    RunResult {
        tool: String::new(),
        started_unix_ms: 0,
        config: RunConfig {
            connections: 1,
            in_flight: 1,
            rate_tx_per_s: Some(1.0),
            outstanding_max: 1,
            batch: 1,
            tx: TxShape {
                tx_bytes: 128,
                rollups: vec![RollupShare { id: 1, weight: 1 }],
                encrypted_pct: 0,
            },
            ack: AckLevel::Committed,
            warmup_s: 0.0,
            duration_s: 1.0,
            spread: Spread::All,
            client_threads: 1,
        },
        machine: Machine::this(),
        leader: None,
        nodes: vec![],
        measured_s: 1.0,
        throughput: Throughput {
            tx: achieved as u64,
            tx_per_s: achieved,
            per_second_tx: vec![achieved as u64; 3],
            ..Default::default()
        },
        latency_per_second_ms: vec![],
        client_send_lag_ms: None,
        latency_ms: [(
            "committed".to_string(),
            LatencySummary {
                count: achieved as u64,
                p50: p99 / 2.0,
                p99,
                max: p99 * 2.0,
                curve: vec![
                    [0.0, 0.1],
                    [50.0, p99 / 2.0],
                    [99.0, p99],
                    [100.0, p99 * 2.0],
                ],
                ..Default::default()
            },
        )]
        .into(),
        errors: Errors {
            tx: failed,
            by_type: Default::default(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_round_trips_through_json_and_summarizes() {
        let r = sample_result(1_000.0, 4.0, 10);
        let text = serde_json::to_string(&r).unwrap();
        let back: RunResult = serde_json::from_str(&text).unwrap();
        assert_eq!(back.latency_ms, r.latency_ms);
        assert!((back.error_ratio() - 10.0 / 1_010.0).abs() < 1e-12);
        assert_eq!(r.config.validate(), Ok(()));
        for bad in [
            |c: &mut RunConfig| c.duration_s = 0.0,
            |c: &mut RunConfig| c.duration_s = f64::NAN,
            |c: &mut RunConfig| c.warmup_s = -1.0,
            |c: &mut RunConfig| c.rate_tx_per_s = Some(0.0),
            |c: &mut RunConfig| c.rate_tx_per_s = Some(f64::INFINITY),
            |c: &mut RunConfig| c.batch = 0,
            |c: &mut RunConfig| c.tx.tx_bytes = 8,
        ] {
            let mut c = r.config.clone();
            bad(&mut c);
            assert!(c.validate().is_err(), "{c:?}");
        }
        let md = r.markdown();
        assert!(
            md.contains("| submit → committed | 2.00 | 0.00 | 4.00 |"),
            "{md}"
        );
        assert!(md.contains("| measured | 1000 |"), "{md}");
        let m = Machine::this();
        assert!(m.cores >= 1);
    }
}
