//! What a run measures: latency histograms, throughput per second, errors by type.
//!
//! Times are microseconds since the run started. A request's latency runs from its *intended*
//! send time to its answer: in closed loop that is when it was sent; in open loop it is its slot
//! in the fixed-rate schedule, so time a request spent waiting to be sent (because the cluster
//! or the client fell behind) counts, and coordinated omission cannot hide queueing.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency the histograms track: 10 minutes, in µs (longer ones are clamped to it).
pub const LATENCY_US_MAX: u64 = 600_000_000;

/// The measured part of a run.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Requests intended before this are warm-up: not measured.
    pub from_us: u64,
    /// Requests intended at or after this are not sent; throughput counts answers before it.
    pub until_us: u64,
}

impl Window {
    /// The window after `warmup_us` lasting `duration_us`.
    pub fn new(warmup_us: u64, duration_us: u64) -> Window {
        Window {
            from_us: warmup_us,
            until_us: warmup_us + duration_us,
        }
    }

    /// Its length in seconds.
    pub fn seconds(&self) -> f64 {
        (self.until_us - self.from_us) as f64 / 1e6
    }
}

/// How one request ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Transactions with a receipt.
    pub ok_tx: u64,
    /// Their bytes.
    pub ok_bytes: u64,
    /// Transactions without one, by error type.
    pub failed: Vec<(String, u64)>,
}

/// Latency percentiles of one ack level, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    /// Transactions measured.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Largest.
    pub max: f64,
    /// The percentile curve: `[percentile, latency ms]` points (for plots).
    pub curve: Vec<[f64; 2]>,
}

/// Latency of the requests intended in one second of the window, in milliseconds: where in a
/// run the tail comes from (a steady tail, or spikes in a few seconds).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SecondLatency {
    /// Transactions measured.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// Percentiles at which the curve is sampled.
const CURVE: &[f64] = &[
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999, 100.0,
];

/// Accumulates a run's outcomes.
pub struct Recorder {
    window: Window,
    latency: Histogram<u64>,
    ok_tx: u64,
    ok_bytes: u64,
    ok_requests: u64,
    failed_tx: u64,
    errors: BTreeMap<String, u64>,
    per_second: Vec<u64>,
    /// Latency by the second each request was intended in (2 significant digits, ~24 KiB per
    /// second of run: 85 MB for an hour).
    per_second_latency: Vec<Histogram<u64>>,
    /// Everything answered so far, warm-up included (for progress lines).
    live_ok_tx: u64,
    live_failed_tx: u64,
    /// Open loop: how late the client started each measured request against its schedule
    /// (its own queueing, part of every latency it reports), per request.
    send_lag: Histogram<u64>,
}

impl Recorder {
    /// A recorder measuring `window`.
    pub fn new(window: Window) -> Recorder {
        Recorder {
            window,
            latency: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid bounds"),
            ok_tx: 0,
            ok_bytes: 0,
            ok_requests: 0,
            failed_tx: 0,
            errors: BTreeMap::new(),
            per_second: Vec::new(),
            per_second_latency: Vec::new(),
            live_ok_tx: 0,
            live_failed_tx: 0,
            send_lag: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid bounds"),
        }
    }

    /// Records that the request intended at `intended_us` started at `started_us` (open loop;
    /// requests intended outside the window are not measured).
    pub fn record_start(&mut self, intended_us: u64, started_us: u64) {
        if intended_us < self.window.from_us || intended_us >= self.window.until_us {
            return;
        }
        let lag = started_us
            .saturating_sub(intended_us)
            .clamp(1, LATENCY_US_MAX);
        self.send_lag.record(lag).expect("clamped into range");
    }

    /// Open loop: how late the measured requests started (per request; empty in closed loop).
    pub fn send_lag(&self) -> Option<LatencySummary> {
        (!self.send_lag.is_empty()).then(|| summarize(&self.send_lag))
    }

    /// Records a request intended at `intended_us` and answered at `done_us`.
    pub fn record(&mut self, intended_us: u64, done_us: u64, outcome: &Outcome) {
        let failed: u64 = outcome.failed.iter().map(|(_, n)| n).sum();
        self.live_ok_tx += outcome.ok_tx;
        self.live_failed_tx += failed;
        if intended_us < self.window.from_us || intended_us >= self.window.until_us {
            return;
        }
        for (kind, n) in &outcome.failed {
            *self.errors.entry(kind.clone()).or_default() += n;
        }
        self.failed_tx += failed;
        if outcome.ok_tx == 0 {
            return;
        }
        let latency = done_us.saturating_sub(intended_us).clamp(1, LATENCY_US_MAX);
        self.latency
            .record_n(latency, outcome.ok_tx)
            .expect("clamped into range");
        self.ok_requests += 1;
        let intended_second = ((intended_us - self.window.from_us) / 1_000_000) as usize;
        while self.per_second_latency.len() <= intended_second {
            self.per_second_latency
                .push(Histogram::new_with_bounds(1, LATENCY_US_MAX, 2).expect("valid bounds"));
        }
        self.per_second_latency[intended_second]
            .record_n(latency, outcome.ok_tx)
            .expect("clamped into range");
        if done_us < self.window.until_us {
            self.ok_tx += outcome.ok_tx;
            self.ok_bytes += outcome.ok_bytes;
            let second = ((done_us - self.window.from_us) / 1_000_000) as usize;
            if self.per_second.len() <= second {
                self.per_second.resize(second + 1, 0);
            }
            self.per_second[second] += outcome.ok_tx;
        }
    }

    /// Counts `requests` requests of `tx_each` transactions that were scheduled in the window but
    /// never sent (the client could not keep up with its own schedule).
    pub fn record_unsent(&mut self, requests: u64, tx_each: u64) {
        if requests > 0 {
            *self
                .errors
                .entry("unsent (client backlog)".into())
                .or_default() += requests * tx_each;
            self.failed_tx += requests * tx_each;
        }
    }

    /// Transactions answered so far, warm-up included: (with a receipt, without).
    pub fn live(&self) -> (u64, u64) {
        (self.live_ok_tx, self.live_failed_tx)
    }

    /// The measured window.
    pub fn window(&self) -> Window {
        self.window
    }

    /// Transactions with a receipt answered inside the window, and their bytes.
    pub fn ok(&self) -> (u64, u64) {
        (self.ok_tx, self.ok_bytes)
    }

    /// Requests with at least one receipt, intended inside the window.
    pub fn ok_requests(&self) -> u64 {
        self.ok_requests
    }

    /// Measured transactions without a receipt.
    pub fn failed(&self) -> u64 {
        self.failed_tx
    }

    /// Failed transactions by error type.
    pub fn errors(&self) -> &BTreeMap<String, u64> {
        &self.errors
    }

    /// Transactions answered in each second of the window.
    pub fn per_second(&self) -> Vec<u64> {
        let mut v = self.per_second.clone();
        v.resize(self.window.seconds().ceil() as usize, 0);
        v
    }

    /// Latency of the requests intended in each second of the window (seconds without any
    /// answered request are all zeros).
    pub fn per_second_latency(&self) -> Vec<SecondLatency> {
        let mut v: Vec<SecondLatency> = self
            .per_second_latency
            .iter()
            .map(|h| {
                if h.is_empty() {
                    return SecondLatency::default();
                }
                SecondLatency {
                    count: h.len(),
                    p50: ms(h.value_at_quantile(0.5)),
                    p99: ms(h.value_at_quantile(0.99)),
                    max: ms(h.max()),
                }
            })
            .collect();
        v.resize(
            self.window.seconds().ceil() as usize,
            SecondLatency::default(),
        );
        v
    }

    /// The latency percentiles so far.
    pub fn latency(&self) -> LatencySummary {
        summarize(&self.latency)
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1_000.0
}

/// Percentiles of a µs histogram, in ms.
pub fn summarize(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
    }
    LatencySummary {
        count: h.len(),
        mean: h.mean() / 1_000.0,
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        p99_9: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
        curve: CURVE
            .iter()
            .map(|p| [*p, ms(h.value_at_quantile(p / 100.0))])
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(n: u64) -> Outcome {
        Outcome {
            ok_tx: n,
            ok_bytes: n * 128,
            failed: vec![],
        }
    }

    #[test]
    fn warm_up_and_late_intentions_are_not_measured() {
        let mut r = Recorder::new(Window::new(1_000_000, 2_000_000));
        r.record(500_000, 600_000, &ok(10)); // warm-up
        r.record(1_000_000, 1_001_000, &ok(10)); // first measured
        r.record(2_999_999, 3_500_000, &ok(10)); // intended inside, answered after the end
        r.record(3_000_000, 3_000_100, &ok(10)); // intended after the end
        assert_eq!(r.live(), (40, 0));
        let l = r.latency();
        assert_eq!(l.count, 20, "two requests of 10 measured");
        // Throughput counts only answers inside the window.
        assert_eq!(r.ok(), (10, 1_280));
        assert_eq!(r.per_second(), vec![10, 0]);
        assert!((l.max - 500.0).abs() < 1.0, "max {}", l.max);
        // By intended second: the late answer belongs to the second it was meant for.
        let by_second = r.per_second_latency();
        assert_eq!(by_second.len(), 2);
        assert_eq!((by_second[0].count, by_second[1].count), (10, 10));
        assert!((by_second[0].max - 1.0).abs() < 0.1, "{:?}", by_second[0]);
        assert!((by_second[1].max - 500.0).abs() < 5.0, "{:?}", by_second[1]);
    }

    #[test]
    fn latency_runs_from_the_intended_time_and_is_weighted_per_transaction() {
        let mut r = Recorder::new(Window::new(0, 10_000_000));
        // 99 fast requests of 1 tx, one slow request of 98 tx: half the transactions are slow.
        for i in 0..99 {
            r.record(i * 1_000, i * 1_000 + 500, &ok(1));
        }
        r.record(200_000, 1_200_000, &ok(98));
        let l = r.latency();
        assert_eq!(l.count, 197);
        assert!((l.p50 - 0.5).abs() < 0.01, "p50 {}", l.p50);
        assert!((l.p90 - 1_000.0).abs() < 1.0, "p90 {}", l.p90);
        assert_eq!(l.curve.first().unwrap()[0], 0.0);
        assert_eq!(l.curve.last().unwrap()[0], 100.0);
        assert!(l.curve.windows(2).all(|w| w[0][1] <= w[1][1]));
    }

    #[test]
    fn send_lag_is_measured_per_request_inside_the_window_only() {
        let mut r = Recorder::new(Window::new(1_000_000, 1_000_000));
        assert_eq!(r.send_lag(), None, "nothing started: no lag reported");
        r.record_start(500_000, 900_000); // warm-up
        r.record_start(1_000_000, 1_000_000); // on time
        r.record_start(1_500_000, 1_503_000); // 3 ms late
        r.record_start(2_000_000, 2_100_000); // after the window
        let lag = r.send_lag().expect("two measured");
        assert_eq!(lag.count, 2);
        assert!((lag.max - 3.0).abs() < 0.01, "{lag:?}");
        assert!(lag.p50 <= 0.002, "{lag:?}");
    }

    #[test]
    fn errors_are_counted_by_type_and_unsent_requests_are_errors() {
        let mut r = Recorder::new(Window::new(0, 1_000_000));
        r.record(
            10,
            20,
            &Outcome {
                ok_tx: 3,
                ok_bytes: 3,
                failed: vec![("overloaded".into(), 2), ("exhausted".into(), 1)],
            },
        );
        r.record(
            30,
            40,
            &Outcome {
                ok_tx: 0,
                ok_bytes: 0,
                failed: vec![("overloaded".into(), 4)],
            },
        );
        r.record_unsent(2, 10);
        assert_eq!(r.failed(), 27);
        assert_eq!(r.errors()["overloaded"], 6);
        assert_eq!(r.errors()["exhausted"], 1);
        assert_eq!(r.errors()["unsent (client backlog)"], 20);
        assert_eq!(r.ok_requests(), 1);
        assert_eq!(r.latency().count, 3);
    }
}
