//! Where a node's time goes, stage by stage.
//!
//! Each stage of the sequencing path records how long it took into a latency histogram of the
//! node's ([`Stages`]): per request, per batch, or per WAL append, as each [`Stage`] says. The
//! shards, the Raft shard and the log store record into the same histograms (a mutex taken once
//! per request or batch, never per transaction). A window runs until [`Stages::take`] ends it
//! and starts the next: [`crate::node::NodeHandle::stages`] does, and so does the node's
//! reporter, which logs the window every [`STAGE_REPORT_INTERVAL`] at `info` under the target
//! `baton_core::stages` when that target is enabled (`RUST_LOG=warn,baton_core::stages=info`).
//!
//! The stages nest rather than add up: a request's `total` spans its `queue`, its batch's
//! `batching`, `to_raft`, `commit` and `answer`; on the leader `commit` spans its own `wal` in
//! parallel with `replicate` (each follower's round: the network both ways and the follower's
//! `append`, which spans the follower's `wal`), then the commit and the leader's `apply`; the
//! network thread's `respond` follows `total`. docs/operations.md says how to read them.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How often a node logs its stage window (when `baton_core::stages` is enabled at `info`).
pub const STAGE_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Longest duration a histogram tells apart (longer ones are counted at this value).
const STAGE_MAX_US: u64 = 60_000_000;

/// One stage of the path a submission takes through a node. Its discriminant is its number
/// on the wire and its slot in a window; [`Stage::ALL`] lists the stages in the order of the
/// path instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Stage {
    /// Per request: from the network thread handing a request's transactions to a shard to the
    /// shard taking them (the shard's submission queue).
    Queue = 0,
    /// Per batch: from the first transaction the shard put in the batch to its seal (the
    /// linger, or filling up).
    Batching = 1,
    /// Per batch: from its seal to the Raft shard starting to sequence it (the proposal queue);
    /// for a batch a follower forwarded, from its arrival at the leader.
    ToRaft = 2,
    /// Per batch: from its seal to the leader's signed header reaching the shard (its
    /// preconfirmation).
    Preconfirm = 3,
    /// Per batch: from the Raft shard starting to sequence it to its outcome: on the leader the
    /// Raft write (WAL, replication, commit, apply); on a follower the forward to the leader and
    /// back.
    Commit = 4,
    /// Per batch: the shard building the receipts of its transactions once its outcome is in.
    Answer = 5,
    /// Per WAL append (any node): from the append to its records being durable (group commit).
    Wal = 6,
    /// Per request: from the network thread handing it to a shard to its last receipt.
    Total = 7,
    /// Per replication request carrying entries, on the leader (over QUIC): from the network
    /// thread starting to write it to a follower to that follower's answer (the network both
    /// ways and the follower's `append`).
    Replicate = 8,
    /// Per replication request carrying entries, on a follower: from its arrival on the Raft
    /// shard to its answer (Raft's checks, the WAL append and its durability).
    Append = 9,
    /// Per entry (any node): the state machine applying it (indexing its transactions, sealing
    /// blocks, answering the leader's waiting write).
    Apply = 10,
    /// Per request, on the network thread: from the request's last receipt to its answer
    /// written to the client's QUIC stream (encoding, flow control).
    Respond = 11,
}

/// How many stages there are.
const STAGE_COUNT: usize = 12;

impl Stage {
    /// Every stage, in the order of the path (not of their codes).
    pub const ALL: [Stage; STAGE_COUNT] = [
        Stage::Queue,
        Stage::Batching,
        Stage::ToRaft,
        Stage::Preconfirm,
        Stage::Commit,
        Stage::Wal,
        Stage::Replicate,
        Stage::Append,
        Stage::Apply,
        Stage::Answer,
        Stage::Total,
        Stage::Respond,
    ];

    /// The stage's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Batching => "batching",
            Stage::ToRaft => "to_raft",
            Stage::Preconfirm => "preconfirm",
            Stage::Commit => "commit",
            Stage::Answer => "answer",
            Stage::Wal => "wal",
            Stage::Total => "total",
            Stage::Replicate => "replicate",
            Stage::Append => "append",
            Stage::Apply => "apply",
            Stage::Respond => "respond",
        }
    }

    /// The stage's number on the wire.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The stage numbered `code`, if there is one.
    pub fn from_code(code: u8) -> Option<Stage> {
        Some(match code {
            0 => Stage::Queue,
            1 => Stage::Batching,
            2 => Stage::ToRaft,
            3 => Stage::Preconfirm,
            4 => Stage::Commit,
            5 => Stage::Answer,
            6 => Stage::Wal,
            7 => Stage::Total,
            8 => Stage::Replicate,
            9 => Stage::Append,
            10 => Stage::Apply,
            11 => Stage::Respond,
            _ => return None,
        })
    }

    fn slot(self) -> usize {
        usize::from(self.code())
    }
}

/// A node's stage histograms (cheap to clone: all clones record into the same window).
#[derive(Clone)]
pub struct Stages(Arc<Inner>);

struct Inner {
    /// What was recorded since the last [`Stages::take`].
    window: Mutex<Window>,
    /// Every window [`Stages::take`] ended, added up (metrics: [`Stages::totals`]). Locked
    /// before `window` wherever both are.
    totals: Mutex<Window>,
}

struct Window {
    started: Instant,
    histograms: Vec<Histogram<u64>>,
    /// Exact sum of what each histogram holds, in microseconds.
    sums_us: [u64; STAGE_COUNT],
}

fn histogram() -> Histogram<u64> {
    // Two significant digits: 1% resolution from 1 µs to a minute, a few KiB each.
    Histogram::new_with_bounds(1, STAGE_MAX_US, 2).expect("valid histogram bounds")
}

impl Window {
    fn new() -> Window {
        Window {
            started: Instant::now(),
            histograms: (0..STAGE_COUNT).map(|_| histogram()).collect(),
            sums_us: [0; STAGE_COUNT],
        }
    }

    /// Adds what `other` holds to this window.
    fn add(&mut self, other: &Window) {
        for (mine, theirs) in self.histograms.iter_mut().zip(&other.histograms) {
            // Same bounds and precision: adding cannot fail.
            let _ = mine.add(theirs);
        }
        for (mine, theirs) in self.sums_us.iter_mut().zip(other.sums_us) {
            *mine = mine.saturating_add(theirs);
        }
    }
}

impl Default for Stages {
    fn default() -> Self {
        Stages(Arc::new(Inner {
            window: Mutex::new(Window::new()),
            totals: Mutex::new(Window::new()),
        }))
    }
}

impl fmt::Debug for Stages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Stages")
    }
}

impl Stages {
    /// Records that `stage` took `took`.
    pub fn record(&self, stage: Stage, took: Duration) {
        let us = u64::try_from(took.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, STAGE_MAX_US);
        let mut w = lock(&self.0.window);
        w.histograms[stage.slot()].saturating_record(us);
        w.sums_us[stage.slot()] = w.sums_us[stage.slot()].saturating_add(us);
    }

    /// Records that `stage` took from `since` until now.
    pub fn record_since(&self, stage: Stage, since: Instant) {
        self.record(stage, since.elapsed());
    }

    /// Ends the current window and returns its summary; the next window starts now.
    pub fn take(&self) -> StageReport {
        // The next window's histograms are allocated before the lock is taken.
        let next = Window::new();
        // The totals stay locked until the ended window is in them, so that no reader of
        // totals sees it in neither place (a count that went down would read as a restart).
        let mut totals = lock(&self.0.totals);
        let old = std::mem::replace(&mut *lock(&self.0.window), next);
        totals.add(&old);
        drop(totals);
        let window = old.started.elapsed();
        let stages = Stage::ALL
            .iter()
            .map(|&stage| (stage, &old.histograms[stage.slot()]))
            .map(|(stage, h)| StageSummary {
                stage,
                count: h.len(),
                p50_us: h.value_at_quantile(0.50),
                p90_us: h.value_at_quantile(0.90),
                p99_us: h.value_at_quantile(0.99),
                max_us: h.max(),
            })
            .collect();
        StageReport { window, stages }
    }

    /// Everything recorded since the node started, per stage, with the cumulative count at or
    /// below each of `bounds` (ascending): what a metrics scrape exports. Counts only grow.
    pub fn totals(&self, bounds: &[Duration]) -> Vec<StageTotal> {
        let mut all = {
            let totals = lock(&self.0.totals);
            let mut all = Window {
                started: totals.started,
                histograms: totals.histograms.clone(),
                sums_us: totals.sums_us,
            };
            all.add(&lock(&self.0.window));
            all
        };
        Stage::ALL
            .iter()
            .map(|&stage| {
                let h = &mut all.histograms[stage.slot()];
                let buckets = bounds
                    .iter()
                    .map(|&bound| {
                        let us = u64::try_from(bound.as_micros()).unwrap_or(u64::MAX);
                        let below = if us == 0 {
                            0
                        } else {
                            h.count_between(1, us.min(STAGE_MAX_US))
                        };
                        (bound, below)
                    })
                    .collect();
                StageTotal {
                    stage,
                    count: h.len(),
                    sum: Duration::from_micros(all.sums_us[stage.slot()]),
                    buckets,
                }
            })
            .collect()
    }
}

fn lock(m: &Mutex<Window>) -> std::sync::MutexGuard<'_, Window> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One stage's latencies since the node started ([`Stages::totals`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageTotal {
    /// The stage.
    pub stage: Stage,
    /// How many were recorded.
    pub count: u64,
    /// Their sum (durations are recorded in whole microseconds, at least 1).
    pub sum: Duration,
    /// `(bound, how many took at most about bound)`, in the order of the bounds asked for; a
    /// histogram bucket holds values within 1% of each other, so a value up to 1% above a
    /// bound may count under it.
    pub buckets: Vec<(Duration, u64)>,
}

/// One stage's latencies over a window, in microseconds (0 when nothing was recorded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageSummary {
    /// The stage.
    pub stage: Stage,
    /// How many were recorded (requests, batches or appends: see [`Stage`]).
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

/// Every stage's latencies over one window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageReport {
    /// How long the window ran.
    pub window: Duration,
    /// One summary per stage, in [`Stage::ALL`]'s order.
    pub stages: Vec<StageSummary>,
}

impl StageReport {
    /// The summary of `stage` (all zero if the report has none).
    pub fn get(&self, stage: Stage) -> StageSummary {
        let none = StageSummary {
            stage,
            count: 0,
            p50_us: 0,
            p90_us: 0,
            p99_us: 0,
            max_us: 0,
        };
        self.stages
            .iter()
            .find(|s| s.stage == stage)
            .copied()
            .unwrap_or(none)
    }

    /// Whether anything was recorded.
    pub fn is_empty(&self) -> bool {
        self.stages.iter().all(|s| s.count == 0)
    }
}

/// `window 10.0 s; queue n=1200 p50=12 p90=30 p99=80 max=310 us; ...` (stages recorded only).
impl fmt::Display for StageReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "window {:.1} s", self.window.as_secs_f64())?;
        for s in self.stages.iter().filter(|s| s.count > 0) {
            write!(
                f,
                "; {} n={} p50={} p90={} p99={} max={} us",
                s.stage.name(),
                s.count,
                s.p50_us,
                s.p90_us,
                s.p99_us,
                s.max_us
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_summarizes_what_was_recorded_and_the_next_starts_empty() {
        let stages = Stages::default();
        for us in 1..=100 {
            stages.record(Stage::Commit, Duration::from_micros(us * 10));
        }
        stages.record(Stage::Wal, Duration::from_millis(3));
        let other = stages.clone();
        other.record(Stage::Wal, Duration::from_millis(5));

        let report = stages.take();
        let commit = report.get(Stage::Commit);
        assert_eq!(commit.count, 100);
        // Two significant digits: within 1% of the exact percentiles.
        assert!((495..=505).contains(&commit.p50_us), "{commit:?}");
        assert!((980..=1000).contains(&commit.p99_us), "{commit:?}");
        assert!((995..=1005).contains(&commit.max_us), "{commit:?}");
        let wal = report.get(Stage::Wal);
        assert_eq!(wal.count, 2);
        assert!((4950..=5050).contains(&wal.max_us), "{wal:?}");
        assert_eq!(report.get(Stage::Queue).count, 0);
        let line = report.to_string();
        assert!(line.contains("; commit n=100 p50="), "{line}");
        assert!(!line.contains("queue"), "{line}");

        let next = stages.take();
        assert!(next.is_empty(), "{next:?}");
    }

    #[test]
    fn totals_add_up_every_window_and_the_open_one() {
        let stages = Stages::default();
        let bounds = [
            Duration::from_micros(100),
            Duration::from_millis(1),
            Duration::from_secs(1),
        ];
        let empty = stages.totals(&bounds);
        assert!(empty.iter().all(|t| t.count == 0 && t.sum.is_zero()));
        assert!(empty[0].buckets.iter().all(|&(_, n)| n == 0));

        for us in [50, 80, 500, 900] {
            stages.record(Stage::Wal, Duration::from_micros(us));
        }
        let taken = stages.take();
        assert_eq!(taken.get(Stage::Wal).count, 4);
        // Recorded after the window ended: in the open window, counted all the same.
        stages.record(Stage::Wal, Duration::from_millis(20));
        stages.record(Stage::Commit, Duration::from_secs(90));

        let totals = stages.totals(&bounds);
        let wal = totals.iter().find(|t| t.stage == Stage::Wal).unwrap();
        assert_eq!(wal.count, 5);
        assert_eq!(wal.sum, Duration::from_micros(50 + 80 + 500 + 900 + 20_000));
        let counts: Vec<u64> = wal.buckets.iter().map(|&(_, n)| n).collect();
        assert_eq!(counts, [2, 4, 5]);
        assert_eq!(wal.buckets[1].0, Duration::from_millis(1));
        // Longer than the histograms reach: counted at their limit, above every bound here.
        let commit = totals.iter().find(|t| t.stage == Stage::Commit).unwrap();
        assert_eq!(commit.count, 1);
        assert_eq!(commit.sum, Duration::from_micros(STAGE_MAX_US));
        assert!(commit.buckets.iter().all(|&(_, n)| n == 0));
        assert_eq!(totals.len(), STAGE_COUNT);

        // Taking windows moves nothing out of the totals.
        stages.take();
        stages.take();
        assert_eq!(stages.totals(&bounds), totals);
    }

    /// Windows ending while other threads record and read totals: no reader ever sees a count
    /// go down (a metrics scraper would take that for a restart), and nothing is lost.
    #[test]
    fn totals_never_go_down_while_windows_end() {
        let stages = Stages::default();
        let bounds = [Duration::from_micros(100), Duration::from_millis(10)];
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let recorders: Vec<_> = (0..2)
            .map(|_| {
                let stages = stages.clone();
                std::thread::spawn(move || {
                    for i in 0..50_000u64 {
                        stages.record(Stage::Wal, Duration::from_micros(1 + i % 500));
                    }
                })
            })
            .collect();
        let taker = {
            let (stages, stop) = (stages.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    stages.take();
                }
            })
        };
        let mut seen = (0u64, Duration::ZERO, vec![0u64; bounds.len()]);
        let mut reads = 0;
        while recorders.iter().any(|r| !r.is_finished()) || reads == 0 {
            let wal = stages.totals(&bounds)
                [Stage::ALL.iter().position(|&s| s == Stage::Wal).unwrap()]
            .clone();
            let buckets: Vec<u64> = wal.buckets.iter().map(|&(_, n)| n).collect();
            assert!(wal.count >= seen.0, "{} after {}", wal.count, seen.0);
            assert!(wal.sum >= seen.1);
            assert!(buckets
                .iter()
                .zip(&seen.2)
                .all(|(now, before)| now >= before));
            seen = (wal.count, wal.sum, buckets);
            reads += 1;
        }
        for r in recorders {
            r.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        taker.join().unwrap();
        let wal = stages.totals(&bounds)[Stage::ALL.iter().position(|&s| s == Stage::Wal).unwrap()]
            .clone();
        assert_eq!(wal.count, 100_000);
        let per_thread: u64 = (0..50_000u64).map(|i| 1 + i % 500).sum();
        assert_eq!(wal.sum, Duration::from_micros(2 * per_thread));
    }

    #[test]
    fn every_stage_has_a_distinct_code_and_back() {
        let mut codes: Vec<u8> = Stage::ALL.iter().map(|s| s.code()).collect();
        for &s in &Stage::ALL {
            assert_eq!(Stage::from_code(s.code()), Some(s));
        }
        codes.sort_unstable();
        // Every code from 0 on is a stage, each once: a window has a slot for each.
        assert_eq!(codes, (0..STAGE_COUNT as u8).collect::<Vec<_>>());
        assert_eq!(Stage::from_code(STAGE_COUNT as u8), None);
        let mut names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), STAGE_COUNT);
    }

    #[test]
    fn a_report_lists_the_stages_in_path_order_whatever_their_codes() {
        let stages = Stages::default();
        stages.record(Stage::Respond, Duration::from_micros(40));
        stages.record(Stage::Apply, Duration::from_micros(70));
        let report = stages.take();
        let order: Vec<Stage> = report.stages.iter().map(|s| s.stage).collect();
        assert_eq!(order, Stage::ALL);
        assert_eq!(report.get(Stage::Respond).count, 1);
        assert!((69..=71).contains(&report.get(Stage::Apply).max_us));
        assert_eq!(report.get(Stage::Replicate).count, 0);
    }

    #[test]
    fn durations_past_the_range_are_counted_at_its_end() {
        let stages = Stages::default();
        stages.record(Stage::Total, Duration::from_secs(3600));
        stages.record(Stage::Total, Duration::ZERO);
        let total = stages.take().get(Stage::Total);
        assert_eq!(total.count, 2);
        assert!(total.max_us >= STAGE_MAX_US * 99 / 100, "{total:?}");
    }
}
