//! Stepping the offered load up until latency or errors blow up: the sustainable peak.
//!
//! Each step is an open-loop run at a fixed offered rate (latency from the intended send time).
//! A step *holds* when its p99 stays under the bound, its error ratio under the allowed one, and
//! the cluster keeps up with the offer (achieved ≥ `achieved_min_ratio` × offered). The sweep
//! multiplies the rate by `factor` after every step that holds and stops at the first that does
//! not; the sustainable peak is the highest offered rate that held.

use serde::{Deserialize, Serialize};

use crate::load::{self, Cluster, Progress};
use crate::report::{Machine, RunConfig, RunResult};

/// How a sweep steps and what counts as holding.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepConfig {
    /// Offered rate of the first step, tx/s.
    pub start_tx_per_s: f64,
    /// Each next step offers this many times the previous one (> 1).
    pub factor: f64,
    /// At most this many steps.
    pub steps_max: usize,
    /// A step holds only while its p99 is at most this, ms.
    pub p99_max_ms: f64,
    /// A step holds only while at most this share of its transactions failed.
    pub error_ratio_max: f64,
    /// A step holds only while the cluster answered at least this share of the offered rate.
    pub achieved_min_ratio: f64,
}

/// One step's numbers and verdict.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SweepStep {
    /// Offered rate, tx/s.
    pub offered_tx_per_s: f64,
    /// Achieved rate, tx/s.
    pub achieved_tx_per_s: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p99_9_ms: f64,
    /// Failed share of the step's transactions.
    pub error_ratio: f64,
    /// Whether the step held.
    pub held: bool,
    /// Why not, when it did not.
    pub reason: Option<String>,
}

/// What `baton-perf sweep --out` writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepResult {
    /// `baton-perf <version>`.
    pub tool: String,
    /// The sweep's rules.
    pub sweep: SweepConfig,
    /// The load of every step (its rate aside).
    pub run: RunConfig,
    /// Where the load generator ran.
    pub machine: Machine,
    /// The steps, in order.
    pub steps: Vec<SweepStep>,
    /// Highest offered rate that held, tx/s.
    pub sustainable_peak_tx_per_s: Option<f64>,
    /// Why the sweep ended.
    pub stopped: String,
}

/// Judges one step by the sweep's rules.
pub fn judge(cfg: &SweepConfig, offered: f64, r: &RunResult) -> SweepStep {
    let l = r.ack_latency();
    let achieved = r.throughput.tx_per_s;
    let error_ratio = r.error_ratio();
    let reason = if l.count == 0 {
        Some("no transaction got a receipt".to_string())
    } else if error_ratio > cfg.error_ratio_max {
        Some(format!(
            "error ratio {error_ratio:.4} > {}",
            cfg.error_ratio_max
        ))
    } else if l.p99 > cfg.p99_max_ms {
        Some(format!("p99 {:.2} ms > {} ms", l.p99, cfg.p99_max_ms))
    } else if achieved < offered * cfg.achieved_min_ratio {
        Some(format!(
            "achieved {achieved:.0} tx/s < {:.0}% of offered",
            cfg.achieved_min_ratio * 100.0
        ))
    } else {
        None
    };
    SweepStep {
        offered_tx_per_s: offered,
        achieved_tx_per_s: achieved,
        p50_ms: l.p50,
        p99_ms: l.p99,
        p99_9_ms: l.p99_9,
        error_ratio,
        held: reason.is_none(),
        reason,
    }
}

/// The next rate to offer after `steps`, or why the sweep is over.
pub fn next_rate(cfg: &SweepConfig, steps: &[SweepStep]) -> Result<f64, String> {
    match steps.last() {
        None => Ok(cfg.start_tx_per_s),
        Some(s) if !s.held => Err(format!(
            "step at {:.0} tx/s did not hold: {}",
            s.offered_tx_per_s,
            s.reason.as_deref().unwrap_or("?")
        )),
        Some(_) if steps.len() >= cfg.steps_max => Err(format!(
            "{} steps, the most allowed, all held",
            cfg.steps_max
        )),
        Some(s) => Ok(s.offered_tx_per_s * cfg.factor),
    }
}

/// The highest offered rate that held.
pub fn peak(steps: &[SweepStep]) -> Option<f64> {
    steps
        .iter()
        .filter(|s| s.held)
        .map(|s| s.offered_tx_per_s)
        .reduce(f64::max)
}

/// Runs a sweep of `run` (its rate replaced step by step) against `cluster`.
pub async fn sweep(
    cfg: &SweepConfig,
    run: &RunConfig,
    cluster: &Cluster,
    progress: Progress,
) -> Result<SweepResult, String> {
    if cfg.factor <= 1.0 || cfg.start_tx_per_s <= 0.0 {
        return Err("a sweep needs a positive start rate and a factor above 1".into());
    }
    let mut steps = Vec::new();
    let stopped = loop {
        let rate = match next_rate(cfg, &steps) {
            Ok(r) => r,
            Err(why) => break why,
        };
        let mut step = run.clone();
        step.rate_tx_per_s = Some(rate);
        let result = load::run(&step, cluster, progress).await?;
        let s = judge(cfg, rate, &result);
        eprintln!(
            "sweep: offered {:.0} tx/s, achieved {:.0} tx/s, p50 {:.2} ms, p99 {:.2} ms, errors {:.4}: {}",
            s.offered_tx_per_s,
            s.achieved_tx_per_s,
            s.p50_ms,
            s.p99_ms,
            s.error_ratio,
            s.reason.as_deref().unwrap_or("holds")
        );
        steps.push(s);
    };
    Ok(SweepResult {
        tool: format!("baton-perf {}", env!("CARGO_PKG_VERSION")),
        sweep: cfg.clone(),
        run: run.clone(),
        machine: Machine::this(),
        sustainable_peak_tx_per_s: peak(&steps),
        steps,
        stopped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SweepConfig {
        SweepConfig {
            start_tx_per_s: 1_000.0,
            factor: 2.0,
            steps_max: 5,
            p99_max_ms: 5.0,
            error_ratio_max: 0.0,
            achieved_min_ratio: 0.95,
        }
    }

    fn result(achieved: f64, p99: f64, failed: u64) -> RunResult {
        crate::report::sample_result(achieved, p99, failed)
    }

    #[test]
    fn a_step_holds_only_under_every_bound() {
        let c = cfg();
        assert!(judge(&c, 1_000.0, &result(990.0, 4.9, 0)).held);
        let slow = judge(&c, 1_000.0, &result(990.0, 5.1, 0));
        assert!(!slow.held && slow.reason.unwrap().starts_with("p99"));
        let failing = judge(&c, 1_000.0, &result(990.0, 1.0, 1));
        assert!(!failing.held && failing.reason.unwrap().starts_with("error ratio"));
        let behind = judge(&c, 1_000.0, &result(900.0, 1.0, 0));
        assert!(!behind.held && behind.reason.unwrap().starts_with("achieved"));
        let nothing = judge(&c, 1_000.0, &result(0.0, 0.0, 0));
        assert!(!nothing.held);
    }

    #[test]
    fn sweep_steps_up_until_the_first_step_that_does_not_hold() {
        let c = cfg();
        let mut steps = vec![];
        // The "cluster" keeps up to 5,000 tx/s with p99 under 5 ms, then falls behind.
        let mut rates = vec![];
        while let Ok(rate) = next_rate(&c, &steps) {
            rates.push(rate);
            let r = if rate <= 5_000.0 {
                result(rate, 2.0, 0)
            } else {
                result(5_000.0, 40.0, 0)
            };
            steps.push(judge(&c, rate, &r));
        }
        assert_eq!(rates, vec![1_000.0, 2_000.0, 4_000.0, 8_000.0]);
        assert_eq!(peak(&steps), Some(4_000.0));
        assert!(next_rate(&c, &steps).unwrap_err().contains("8000"));
    }

    #[test]
    fn sweep_ends_at_its_step_bound_and_may_have_no_peak() {
        let c = cfg();
        let steps: Vec<_> = (0..5)
            .map(|i| judge(&c, 1_000.0 * 2f64.powi(i), &result(1e9, 1.0, 0)))
            .collect();
        assert!(next_rate(&c, &steps).unwrap_err().contains("5 steps"));
        assert_eq!(peak(&steps), Some(16_000.0));
        let first_fails = vec![judge(&c, 1_000.0, &result(10.0, 1.0, 0))];
        assert_eq!(peak(&first_fails), None);
    }
}
