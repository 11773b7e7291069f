//! Crash consistency with real processes: a child process appends in a loop and reports each
//! durable completion; the parent SIGKILLs it at a random moment, reopens the log and checks that
//! it holds a valid prefix containing every record reported durable. Each round continues the
//! log the previous round left (so recovery of repaired logs is exercised too).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_wal::{Verdict, Wal};
use common::*;

const DIR_ENV: &str = "BATON_WAL_CRASH_DIR";
const SEED_ENV: &str = "BATON_WAL_CRASH_SEED";

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The child: not a test on its own (ignored, and a no-op without the environment variable).
#[test]
#[ignore = "child process of sigkill_during_appends_keeps_every_durable_record"]
fn crash_child() {
    let Ok(dir) = std::env::var(DIR_ENV) else {
        return;
    };
    let mut rng: u64 = std::env::var(SEED_ENV).unwrap().parse().unwrap();
    let max = small().payload_bytes_max;
    run(|| async move {
        let (wal, _) = Wal::open(std::path::Path::new(&dir), small())
            .await
            .unwrap();
        let mut next = wal.last_index().map_or(1, |l| l + 1);
        println!("READY {next}");
        // Bounded: the parent kills us long before this ends.
        for _ in 0..100_000 {
            let burst = 1 + xorshift(&mut rng) % 40;
            for _ in 0..burst {
                wal.append(next, term(next), &payload(next, max))
                    .await
                    .unwrap();
                next += 1;
            }
            wal.durable(next - 1).await.unwrap();
            // Purge behind, as a node does after snapshots: rotations then take recycled files,
            // whose old records lie past the new ones when the kill comes.
            if next > 400 && xorshift(&mut rng).is_multiple_of(4) {
                wal.purge_through(next - 300).await.unwrap();
            }
            println!("DURABLE {} {}", next - 1, wal.stats().spares_recycled);
        }
    });
}

#[test]
fn sigkill_during_appends_keeps_every_durable_record() {
    let dir = tempfile::tempdir().unwrap();
    let max = small().payload_bytes_max;
    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {rng}");
    let started = Instant::now();
    let mut rounds = 0;
    let mut torn = 0;
    let mut recycled_total = 0;
    while rounds < 25 && started.elapsed() < Duration::from_secs(40) {
        rounds += 1;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_ENV, dir.path())
            .env(SEED_ENV, xorshift(&mut rng).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Wait for the child to have opened (and recovered) the log.
        loop {
            let line = lines.next().expect("child exited before READY").unwrap();
            if line.contains("READY ") {
                break;
            }
        }
        let kill_after = Duration::from_micros(2_000 + xorshift(&mut rng) % 150_000);
        let reader = std::thread::spawn(move || {
            let (mut durable, mut recycled) = (0u64, 0u64);
            for line in lines.map_while(Result::ok) {
                if let Some(at) = line.find("DURABLE ") {
                    let mut words = line[at + 8..].split_whitespace();
                    durable = words.next().unwrap().parse().unwrap();
                    recycled = words.next().unwrap().parse().unwrap();
                }
            }
            (durable, recycled)
        });
        std::thread::sleep(kill_after); // the fault: a kill at a random moment, not a wait for an event
        child.kill().unwrap();
        child.wait().unwrap();
        let (durable, recycled) = reader.join().unwrap();
        recycled_total += recycled;

        let (verdict, last) = run(|| async {
            let (wal, report) = Wal::open(dir.path(), small())
                .await
                .unwrap_or_else(|e| panic!("round {rounds}: recovery failed: {e}"));
            let last = wal.last_index().unwrap_or(0);
            assert!(
                last >= durable,
                "round {rounds}: log ends at {last} but {durable} was reported durable"
            );
            if last > 0 {
                let first = wal.first_index().unwrap();
                check_all(&wal, first, last, max).await;
            }
            (report.verdict, last)
        });
        if verdict != Verdict::Clean {
            torn += 1;
        }
        eprintln!("round {rounds}: killed after {kill_after:?}, durable {durable}, recovered {last}, {verdict:?}");
    }
    assert!(rounds >= 5, "at least five kill rounds ran");
    assert!(
        recycled_total > 0,
        "no segment was recycled: the purges did not run"
    );
    eprintln!(
        "{rounds} rounds, {torn} with a torn tail repaired, {recycled_total} segments recycled"
    );
}
