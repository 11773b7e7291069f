//! `baton wal dump` on real log directories: the JSON lists every record and the verdict, and
//! the exit status says whether the log would open.

use std::process::Command;

use baton_wal::{Wal, WalOptions};

fn make_log(dir: &std::path::Path, records: u64) {
    let ex = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor");
    ex.run(async {
        let (wal, _) = Wal::open(dir, WalOptions::small_for_tests())
            .await
            .expect("open");
        for i in 1..=records {
            wal.append(i, 1 + i / 100, &vec![i as u8; 3000])
                .await
                .expect("append");
        }
        wal.close().await.expect("close");
    });
}

fn dump(dir: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["wal", "dump"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("run baton");
    (
        out.status.code().expect("exit code"),
        String::from_utf8(out.stdout).expect("utf-8"),
    )
}

#[test]
fn dump_lists_spare_segments_apart_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let ex = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor");
    ex.run(async {
        let (wal, _) = Wal::open(dir.path(), WalOptions::small_for_tests())
            .await
            .expect("open");
        for i in 1..=250 {
            wal.append(i, 1, &vec![i as u8; 3000])
                .await
                .expect("append");
        }
        wal.durable(250).await.expect("durable");
        wal.spares_settled().await;
        // The pool holds one zero-filled spare and has room for one purged segment.
        wal.purge_through(200).await.expect("purge");
        wal.close().await.expect("close");
    });
    let (code, out) = dump(dir.path(), &["--json", "--summary"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let mut stale: Vec<u64> = v["spares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stale_through"].as_u64().unwrap())
        .collect();
    stale.sort_unstable();
    assert_eq!(stale.len(), 2, "{out}");
    assert_eq!(stale[0], 0, "the zero-filled one");
    assert!(
        stale[1] > 0 && stale[1] <= 200,
        "the recycled one: {stale:?}"
    );
    // Spares are not segments: the log starts after the purge and opens clean.
    let segments = v["segments"].as_array().unwrap();
    assert!(segments[0]["first_index"].as_u64().unwrap() > 1);
    assert_eq!(v["verdict"], "clean");
    let (_, text) = dump(dir.path(), &["--summary"]);
    assert!(
        text.contains("zero-filled") && text.contains("recycled, old records up to index"),
        "{text}"
    );
}

#[test]
fn dump_lists_every_record_and_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 250);
    let (code, out) = dump(dir.path(), &["--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["opens"], true);
    assert_eq!(v["verdict"], "clean");
    let segments = v["segments"].as_array().unwrap();
    assert!(segments.len() > 2);
    let records: Vec<&serde_json::Value> = segments
        .iter()
        .flat_map(|s| s["records"].as_array().unwrap())
        .collect();
    assert_eq!(records.len(), 250);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["index"], i as u64 + 1);
        assert_eq!(r["len"], 3000);
        assert_eq!(r["crc_ok"], true);
    }
    // The text form says the same.
    let (code, text) = dump(dir.path(), &["--summary"]);
    assert_eq!(code, 0);
    assert!(text.contains("verdict: clean"), "{text}");
}

#[test]
fn dump_reports_corruption_and_exits_2_without_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 250);
    let segs = baton_wal::segment::list_segments(dir.path()).unwrap();
    let victim = &segs[1].1;
    let mut img = std::fs::read(victim).unwrap();
    img[4096 + 100] ^= 0xff; // inside the first record's payload
    std::fs::write(victim, &img).unwrap();
    let (code, out) = dump(dir.path(), &["--json", "--summary"]);
    assert_eq!(code, 2, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["opens"], false);
    assert!(
        v["verdict"].as_str().unwrap().starts_with("CORRUPT"),
        "{}",
        v["verdict"]
    );
    assert_eq!(v["segments"][1]["end"]["kind"], "fault");
    assert_eq!(std::fs::read(victim).unwrap(), img, "dump changes nothing");
}
