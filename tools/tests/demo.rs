//! `baton demo`, shortened: real node processes, load, the table, a clean stop, exit 0.

use std::process::Command;

#[test]
fn demo_runs_a_cluster_under_load_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("demo.json");
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args([
            "demo",
            "--duration-s",
            "2",
            "--warmup-s",
            "1",
            "--preconfirmed-s",
            "1",
            "--out",
        ])
        .arg(&json)
        .output()
        .expect("run baton demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("demo: OK"), "{stdout}");
    assert!(stdout.contains("submit → committed"), "{stdout}");
    assert!(stdout.contains("submit → preconfirmed"), "{stdout}");
    // Rollup 1's blocks were sealed and every node has the same latest block.
    let blocks = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("blocks"))
        .unwrap_or_else(|| panic!("no blocks line: {stdout}"));
    assert!(blocks.contains("the same on every node"), "{blocks}");
    assert!(!blocks.contains("rollup 1: 0 blocks"), "{blocks}");
    // One line per node with the same applied index.
    let applied: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("node "))
        .map(|l| {
            l.split("applied index")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(applied.len(), 3, "{stdout}");
    assert!(
        applied.iter().all(|a| *a == applied[0] && *a != "-"),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["throughput"]["tx"].as_u64().unwrap() > 0);
    assert_eq!(v["errors"]["tx"], 0);
    // The temporary cluster directory is gone.
    let tmp_dir = stdout
        .lines()
        .find_map(|l| {
            l.split(" in ")
                .nth(1)
                .filter(|_| l.starts_with("demo: starting"))
        })
        .expect("the demo says where the cluster lives");
    assert!(
        !std::path::Path::new(tmp_dir.trim()).exists(),
        "{tmp_dir} left behind"
    );
}
