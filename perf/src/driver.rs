//! The two load shapes, over any submit function: closed loop (a fixed number of requests in
//! flight) and open loop (requests at a fixed rate, whatever the answers do).
//!
//! Both use tokio's clock, so tests can run them on paused time.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::recorder::{Outcome, Recorder};

/// Microseconds from `start` to now.
pub fn us_since(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// Closed loop: `connections × in_flight` workers, each sending its next request as soon as the
/// previous one is answered, until the recorder's window ends. `submit(connection, request_no)`
/// sends request number `request_no` (numbers are unique across workers) on that connection.
pub async fn closed_loop<F, Fut>(
    start: Instant,
    connections: usize,
    in_flight: usize,
    submit: F,
    recorder: Arc<Mutex<Recorder>>,
) where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let until_us = recorder.lock().expect("recorder lock").window().until_us;
    let submit = Arc::new(submit);
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for w in 0..connections.max(1) * in_flight.max(1) {
        let (submit, next, recorder) = (submit.clone(), next.clone(), recorder.clone());
        let connection = w % connections.max(1);
        workers.spawn(async move {
            loop {
                let sent = us_since(start);
                if sent >= until_us {
                    break;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                let outcome = submit(connection, n).await;
                let done = us_since(start);
                recorder
                    .lock()
                    .expect("recorder lock")
                    .record(sent, done, &outcome);
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

/// What wakes the open loop at each request's intended time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pacer {
    /// tokio's timer: 1 ms resolution (a request may go out up to 1 ms late, and that lateness
    /// counts in its latency); follows paused time in tests.
    Tokio,
    /// A dedicated thread sleeping with `nanosleep` (tens of µs of lateness) that hands each
    /// slot to the runtime through a channel.
    Thread,
}

/// Sends slot numbers 0, 1, 2, … at `start_std + intended_us(i)` until the window ends or the
/// receiver is gone.
fn spawn_ticker(
    start: Instant,
    until_us: u64,
    intended_us: impl Fn(u64) -> u64 + Send + 'static,
) -> tokio::sync::mpsc::Receiver<u64> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let start = start.into_std();
    std::thread::Builder::new()
        .name("perf-pacer".into())
        .spawn(move || {
            for i in 0u64.. {
                let intended = intended_us(i);
                if intended >= until_us {
                    break;
                }
                let at = start + Duration::from_micros(intended);
                let now = std::time::Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                if tx.blocking_send(i).is_err() {
                    break;
                }
            }
        })
        .expect("spawn the pacer thread");
    rx
}

/// What an open-loop run sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenLoopStats {
    /// Requests sent (warm-up included).
    pub sent: u64,
    /// Requests scheduled inside the measured window that were never sent because the window
    /// ended first (the client was stuck at its in-flight bound).
    pub unsent: u64,
}

/// Open loop: request `i` is intended at `start + i / requests_per_s` and sent then (or as soon
/// as one of `outstanding_max` in-flight slots frees up), spread over `connections`; its latency
/// is measured from the intended time. Nothing is sent after the recorder's window ends; waits
/// for every sent request's answer before returning. `pacer` decides how the loop waits for a
/// slot.
#[allow(clippy::too_many_arguments)]
pub async fn open_loop<F, Fut>(
    start: Instant,
    pacer: Pacer,
    requests_per_s: f64,
    connections: usize,
    outstanding_max: usize,
    submit: F,
    recorder: Arc<Mutex<Recorder>>,
) -> OpenLoopStats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    assert!(requests_per_s > 0.0, "a positive rate");
    let window = recorder.lock().expect("recorder lock").window();
    let interval_ns = 1e9 / requests_per_s;
    let intended_us = move |i: u64| (i as f64 * interval_ns / 1_000.0) as u64;
    let end = start + Duration::from_micros(window.until_us);
    let slots = Arc::new(Semaphore::new(outstanding_max.max(1)));
    let submit = Arc::new(submit);
    let mut inflight = JoinSet::new();
    let mut ticks = match pacer {
        Pacer::Tokio => None,
        Pacer::Thread => Some(spawn_ticker(start, window.until_us, intended_us)),
    };
    let mut i = 0u64;
    loop {
        let intended = intended_us(i);
        if intended >= window.until_us {
            break;
        }
        match &mut ticks {
            None => tokio::time::sleep_until(start + Duration::from_micros(intended)).await,
            // The pacer sends the slots in order, one per request.
            Some(rx) => {
                if rx.recv().await.is_none() {
                    break;
                }
            }
        }
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            _ = tokio::time::sleep_until(end) => break,
        };
        if Instant::now() >= end {
            break;
        }
        let (submit, recorder) = (submit.clone(), recorder.clone());
        let connection = (i % connections.max(1) as u64) as usize;
        inflight.spawn(async move {
            recorder
                .lock()
                .expect("recorder lock")
                .record_start(intended, us_since(start));
            let outcome = submit(connection, i).await;
            let done = us_since(start);
            drop(permit);
            recorder
                .lock()
                .expect("recorder lock")
                .record(intended, done, &outcome);
        });
        i += 1;
        // Reap finished tasks as we go so the set stays as small as what is in flight.
        while inflight.try_join_next().is_some() {}
    }
    drop(ticks);
    let sent = i;
    let mut unsent = 0;
    while intended_us(i) < window.until_us {
        if intended_us(i) >= window.from_us {
            unsent += 1;
        }
        i += 1;
    }
    while inflight.join_next().await.is_some() {}
    OpenLoopStats { sent, unsent }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::Window;
    use std::sync::atomic::AtomicUsize;

    fn ok() -> Outcome {
        Outcome {
            ok_tx: 1,
            ok_bytes: 1,
            failed: vec![],
        }
    }

    fn recorder(warmup_ms: u64, duration_ms: u64) -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::new(Window::new(
            warmup_ms * 1_000,
            duration_ms * 1_000,
        ))))
    }

    /// One slow answer with a single in-flight slot: every request scheduled behind it waits,
    /// and that wait is in their latency (coordinated omission corrected). Measured from the
    /// send time instead, only the slow request itself would look slow.
    #[tokio::test(start_paused = true)]
    async fn open_loop_charges_the_wait_behind_a_stall_to_the_queued_requests() {
        let rec = recorder(0, 1_000);
        let stats = open_loop(
            Instant::now(),
            Pacer::Tokio,
            1_000.0,
            1,
            1,
            |_, i| async move {
                if i == 100 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                ok()
            },
            rec.clone(),
        )
        .await;
        assert_eq!(
            stats,
            OpenLoopStats {
                sent: 1_000,
                unsent: 0
            }
        );
        let l = rec.lock().unwrap().latency();
        assert_eq!(l.count, 1_000);
        // Requests 100..=300 waited 200, 199, …, 0 ms: a fifth of all requests, spread evenly.
        assert!((l.max - 200.0).abs() < 2.0, "max {}", l.max);
        assert!((l.p90 - 100.0).abs() < 3.0, "p90 {}", l.p90);
        assert!(l.p50 < 1.0, "p50 {}", l.p50);
    }

    /// A cluster that stops answering: the client sends up to its bound, then the rest of the
    /// window's schedule is reported unsent rather than silently dropped.
    #[tokio::test(start_paused = true)]
    async fn open_loop_reports_what_it_could_not_send() {
        let rec = recorder(100, 1_000);
        let stats = open_loop(
            Instant::now(),
            Pacer::Tokio,
            100.0,
            2,
            5,
            |_, _| async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                ok()
            },
            rec.clone(),
        )
        .await;
        // 110 requests are scheduled in [0, 1.1 s): 5 sent (warm-up); the 100 of the measured
        // second were never sent.
        assert_eq!(
            stats,
            OpenLoopStats {
                sent: 5,
                unsent: 100
            }
        );
        let r = rec.lock().unwrap();
        // The five sent ones were warm-up; the measured window got no answers.
        assert_eq!(r.latency().count, 0);
        assert_eq!(r.live(), (5, 0));
    }

    /// The ticker thread on the real clock: every slot of the window, in order, none before its
    /// intended time, then the channel closes.
    #[tokio::test]
    async fn ticker_hands_over_every_slot_in_order_and_none_early() {
        let start = Instant::now();
        let mut rx = spawn_ticker(start, 300_000, |i| i * 5_000);
        let mut seen = Vec::new();
        while let Some(i) = rx.recv().await {
            // Slot i is intended at i × 5 ms.
            assert!(us_since(start) >= i * 5_000, "slot {i} handed over early");
            seen.push(i);
        }
        assert_eq!(seen, (0..60).collect::<Vec<_>>());
    }

    /// The open loop behind the thread pacer on the real clock: no request goes out before its
    /// intended time, and every slot of the window is accounted for: sent, or reported unsent
    /// when the runtime got to it only after the window closed (a loaded machine may delay the
    /// last ticks past the end; nothing is sent after it, by design).
    #[tokio::test]
    async fn thread_pacer_sends_no_slot_early_and_accounts_for_every_one() {
        let rec = recorder(0, 300);
        let start = Instant::now();
        let early = Arc::new(AtomicUsize::new(0));
        let e2 = early.clone();
        let stats = open_loop(
            start,
            Pacer::Thread,
            200.0,
            1,
            100,
            move |_, i| {
                // Slot i is intended at i × 5 ms.
                if us_since(start) < i * 5_000 {
                    e2.fetch_add(1, Ordering::SeqCst);
                }
                async move { ok() }
            },
            rec.clone(),
        )
        .await;
        assert_eq!(stats.sent + stats.unsent, 60, "{stats:?}");
        assert!(stats.sent > 0, "{stats:?}");
        assert_eq!(early.load(Ordering::SeqCst), 0);
        assert_eq!(rec.lock().unwrap().latency().count, stats.sent);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_keeps_exactly_connections_times_in_flight_requests_outstanding() {
        let rec = recorder(0, 1_000);
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let connections_seen = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let (n2, p2, c2) = (now.clone(), peak.clone(), connections_seen.clone());
        closed_loop(
            Instant::now(),
            2,
            3,
            move |c, _| {
                let (now, peak) = (n2.clone(), p2.clone());
                c2.lock().unwrap().insert(c);
                async move {
                    let at = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(at, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    ok()
                }
            },
            rec.clone(),
        )
        .await;
        assert_eq!(peak.load(Ordering::SeqCst), 6);
        assert_eq!(*connections_seen.lock().unwrap(), [0, 1].into());
        let r = rec.lock().unwrap();
        // 6 workers × about 100 rounds of 10 ms (the timer rounds sleeps up to whole ms) in
        // the 1 s window, every worker the same number.
        let count = r.latency().count;
        assert_eq!(count % 6, 0);
        assert!((570..=600).contains(&count), "{count} requests");
        assert!(r.ok().0 <= count && r.ok().0 + 6 >= count);
        assert!((10.0..11.1).contains(&r.latency().p50));
    }
}
