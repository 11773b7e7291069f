//! `baton-perf` against a real 3-node cluster (`baton cluster up`, real processes on 127.0.0.1):
//! closed and open loop for a few seconds each, the JSON results checked, charts rendered.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PERF: &str = env!("CARGO_BIN_EXE_baton-perf");

/// The `baton` binary built next to `baton-perf` (the workspace test run builds both).
fn baton() -> PathBuf {
    let p = Path::new(PERF).with_file_name("baton");
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build -p baton`, or run the workspace tests)",
        p.display()
    );
    p
}

fn free_base_port(n: u16) -> u16 {
    baton_net::ports::free_loopback_udp_ports(n, std::process::id())
        .expect("no free UDP port range")
}

/// `baton cluster up`; SIGTERM (then SIGKILL) of it and its nodes when dropped.
struct Cluster {
    process: Child,
    pids: Vec<u32>,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let mut process = Command::new(baton())
            .args(["cluster", "up", "--json", "--nodes", "3", "--dir"])
            .arg(dir)
            .args(["--base-port", &free_base_port(3).to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn baton cluster up");
        let stdout = process.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("cluster up prints its endpoints within 60 s");
        let v: serde_json::Value = serde_json::from_str(&line).expect("cluster up JSON");
        let pids = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["pid"].as_u64().unwrap() as u32)
            .collect();
        Cluster { process, pids }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: signals to processes this test started.
        unsafe { libc::kill(self.process.id() as libc::pid_t, libc::SIGTERM) };
        if self.process.wait().is_err() {
            for p in &self.pids {
                unsafe { libc::kill(*p as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

fn perf(args: &[&str]) -> (bool, String) {
    let out = Command::new(PERF)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run baton-perf");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn check_result(v: &serde_json::Value, mode: &str, seconds: usize) {
    assert_eq!(v["config"]["rate_tx_per_s"].is_null(), mode == "closed");
    // The open loop reports its own lag behind its schedule, one count per measured request.
    let lag = &v["client_send_lag_ms"];
    if mode == "closed" {
        assert!(lag.is_null(), "{lag}");
    } else {
        let requests = v["throughput"]["requests"].as_u64().unwrap();
        assert!(lag["count"].as_u64().unwrap() >= requests, "{lag}");
        assert!(
            lag["p50"].as_f64().unwrap() <= lag["max"].as_f64().unwrap(),
            "{lag}"
        );
    }
    let t = &v["throughput"];
    let tx = t["tx"].as_u64().unwrap();
    assert!(tx > 0, "some transactions sequenced");
    let per_second: Vec<u64> = t["per_second_tx"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert_eq!(per_second.len(), seconds);
    assert_eq!(per_second.iter().sum::<u64>(), tx);
    assert_eq!(t["bytes"].as_u64().unwrap(), tx * 128);
    let rate = t["tx_per_s"].as_f64().unwrap();
    assert!((rate - tx as f64 / v["measured_s"].as_f64().unwrap()).abs() < 1e-6);
    assert_eq!(v["errors"]["tx"].as_u64(), Some(0), "{}", v["errors"]);
    let l = &v["latency_ms"]["committed"];
    let p = |k: &str| l[k].as_f64().unwrap();
    assert!(l["count"].as_u64().unwrap() >= tx);
    assert!(0.0 < p("p50") && p("p50") <= p("p90") && p("p90") <= p("p99"));
    assert!(p("p99") <= p("p99_9") && p("p99_9") <= p("max"));
    // Per intended second: one entry per second, together every measured transaction, none
    // slower than the whole run's max (2 vs 3 significant digits: allow 1%).
    let by_second = v["latency_per_second_ms"].as_array().unwrap();
    assert_eq!(by_second.len(), seconds);
    let counted: u64 = by_second.iter().map(|s| s["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, l["count"].as_u64().unwrap());
    for s in by_second {
        let q = |k: &str| s[k].as_f64().unwrap();
        assert!(q("p50") <= q("p99") && q("p99") <= q("max"), "{s}");
        assert!(q("max") <= p("max") * 1.01, "{s} vs {}", p("max"));
    }
    assert!(v["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(!v["machine"]["kernel"].as_str().unwrap().is_empty());
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert_eq!(
        nodes.iter().filter(|n| n["role"] == "leader").count(),
        1,
        "{nodes:?}"
    );
    for n in nodes {
        assert!(n["rss_max_bytes"].as_u64().unwrap() > 1 << 20, "{n}");
        assert!(n["committed_index"].as_u64().unwrap() > 0);
        // Every node appended to its WAL in the window, which ran about as long as the
        // measured one (plus the drain of the last requests); the nodes that got requests
        // (all, or the leader) timed them.
        let stages = &n["stages"];
        let window = stages["window_s"].as_f64().unwrap();
        assert!(window >= seconds as f64 * 0.9, "{n}");
        let stage = |name: &str| {
            stages["stages"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["stage"] == name)
                .unwrap_or_else(|| panic!("no {name} in {n}"))
                .clone()
        };
        let took_requests = v["config"]["spread"] != "leader" || n["role"] == "leader";
        let leads = n["role"] == "leader";
        for name in [
            "queue",
            "total",
            "respond",
            "wal",
            "apply",
            "replicate",
            "append",
        ] {
            let s = stage(name);
            // A node's role implies replication rounds (leader) or appends (follower) in the
            // window; the converse is not checked (a leader change would give a node both).
            match name {
                "replicate" if !leads => continue,
                "append" if leads => continue,
                _ => {}
            }
            let recorded = !matches!(name, "queue" | "total" | "respond") || took_requests;
            if !recorded {
                assert_eq!(s["count"].as_u64(), Some(0), "{name}: {n}");
                continue;
            }
            assert!(s["count"].as_u64().unwrap() > 0, "{name}: {n}");
            assert!(s["p50_us"].as_u64().unwrap() <= s["p99_us"].as_u64().unwrap());
            assert!(s["p99_us"].as_u64().unwrap() <= s["max_us"].as_u64().unwrap());
        }
    }
}

#[test]
fn closed_and_open_loop_runs_against_a_real_cluster_produce_consistent_results() {
    let dir = tempfile::tempdir().unwrap();
    let cluster_dir = dir.path().join("cluster");
    let _cluster = Cluster::start(&cluster_dir);
    let c = cluster_dir.to_str().unwrap();

    let closed = dir.path().join("closed.json");
    let md = dir.path().join("closed.md");
    let (ok, stdout) = perf(&[
        "run",
        "--cluster",
        c,
        "--quiet",
        "--warmup-s",
        "1",
        "--duration-s",
        "3",
        "--connections",
        "3",
        "--in-flight",
        "4",
        "--batch",
        "50",
        "--rollups",
        "1:3,2",
        "--encrypted-pct",
        "25",
        "--out",
        closed.to_str().unwrap(),
        "--markdown",
        md.to_str().unwrap(),
    ]);
    assert!(ok, "closed-loop run failed:\n{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&closed).unwrap()).unwrap();
    check_result(&v, "closed", 3);
    assert_eq!(v["config"]["tx"]["encrypted_pct"], 25);
    let summary = std::fs::read_to_string(&md).unwrap();
    assert!(summary.contains("| submit → committed |"), "{summary}");
    assert!(summary.contains("| node | queue | batching |"), "{summary}");
    assert!(stdout.contains("closed loop: 3 connections × 4 requests in flight"));

    let open = dir.path().join("open.json");
    let (ok, stdout) = perf(&[
        "run",
        "--cluster",
        c,
        "--quiet",
        "--warmup-s",
        "1",
        "--duration-s",
        "2",
        "--rate",
        "5000",
        "--batch",
        "20",
        "--spread",
        "leader",
        "--out",
        open.to_str().unwrap(),
    ]);
    assert!(ok, "open-loop run failed:\n{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&open).unwrap()).unwrap();
    check_result(&v, "open", 2);
    assert_eq!(v["config"]["rate_tx_per_s"], 5000.0);

    let charts = dir.path().join("charts");
    let (ok, stdout) = perf(&[
        "plot",
        closed.to_str().unwrap(),
        open.to_str().unwrap(),
        "--out-dir",
        charts.to_str().unwrap(),
    ]);
    assert!(ok);
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    for f in stdout.lines() {
        assert!(std::fs::read_to_string(f).unwrap().starts_with("<svg"));
    }
}

#[test]
fn bad_arguments_are_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(PERF)
        .args(["run", "--cluster"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster.json"));
    let out = Command::new(PERF)
        .args([
            "run",
            "--endpoints",
            "127.0.0.1:9",
            "--ca",
            "/nonexistent",
            "--rollups",
            "1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("weight"));
    for (arg, says) in [("--rate=0", "rate"), ("--duration-s=-1", "duration")] {
        let out = Command::new(PERF)
            .args([
                "run",
                "--endpoints",
                "127.0.0.1:9",
                "--ca",
                "/nonexistent",
                arg,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{arg}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(says), "{arg}");
    }
}
