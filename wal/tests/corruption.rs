//! Corruption and truncation at every offset of the last records (a torn tail, cut on open),
//! and corruption of durable data before the tail (a typed error, nothing changed on disk).

mod common;

use baton_wal::recovery::ScannedRecord;
use baton_wal::{Corruption, Verdict, Wal, WalError, WalOptions};
use common::*;

/// A closed log of `n` records; returns the records of its last segment.
fn make_log(dir: &std::path::Path, n: u64, opts: WalOptions) -> Vec<ScannedRecord> {
    let max = opts.payload_bytes_max;
    run(|| async {
        let (wal, _) = Wal::open(dir, opts).await.unwrap();
        fill(&wal, 1, n, max).await;
        wal.close().await.unwrap();
    });
    let ins = baton_wal::inspect(dir).unwrap();
    assert_eq!(ins.verdict.unwrap(), Verdict::Clean);
    ins.segments.last().unwrap().records.clone()
}

/// Opens the damaged log and checks it recovers to exactly `expect_last`, stays usable, and
/// that the repair is itself durable (a second open finds it clean).
fn expect_recovers_to(dir: &std::path::Path, expect_last: u64, what: &str) {
    let max = small().payload_bytes_max;
    run(|| async {
        let (wal, report) = Wal::open(dir, small())
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            wal.last_index(),
            Some(expect_last),
            "{what}: {:?}",
            report.verdict
        );
        check_all(&wal, expect_last.saturating_sub(3).max(1), expect_last, max).await;
        fill(&wal, expect_last + 1, expect_last + 2, max).await;
    });
    run(|| async {
        let (wal, report) = Wal::open(dir, small()).await.unwrap();
        assert_eq!(
            report.verdict,
            Verdict::Clean,
            "{what}: the repair was durable"
        );
        check_all(
            &wal,
            expect_last.saturating_sub(3).max(1),
            expect_last + 2,
            max,
        )
        .await;
    });
}

fn last_segment(dir: &std::path::Path) -> std::path::PathBuf {
    baton_wal::segment::list_segments(dir)
        .unwrap()
        .pop()
        .unwrap()
        .1
}

#[test]
fn flipping_any_byte_of_the_last_records_cuts_the_tail_there() {
    let dir = tempfile::tempdir().unwrap();
    let recs = make_log(dir.path(), 120, small());
    let pristine = snapshot(dir.path());
    let seg = last_segment(dir.path());
    let last3 = &recs[recs.len() - 3..];
    let mut cases = 0;
    for r in last3 {
        let covered = 32 + r.header.payload_len as u64; // padding is outside the crc by design
                                                        // Every header byte, and payload bytes with a stride (every byte would take minutes).
        let offsets: Vec<u64> = (0..32)
            .chain((32..covered).step_by(37))
            .chain([covered - 1])
            .collect();
        for off in offsets {
            restore(dir.path(), &pristine);
            let mut img = std::fs::read(&seg).unwrap();
            img[(r.offset + off) as usize] ^= 0x5a;
            std::fs::write(&seg, &img).unwrap();
            expect_recovers_to(
                dir.path(),
                r.header.index - 1,
                &format!("flip at +{off} of record {}", r.header.index),
            );
            cases += 1;
        }
    }
    assert!(cases > 100);
}

#[test]
fn truncating_the_file_at_any_offset_of_the_last_records_cuts_the_tail_there() {
    let dir = tempfile::tempdir().unwrap();
    let recs = make_log(dir.path(), 120, small());
    let pristine = snapshot(dir.path());
    let seg = last_segment(dir.path());
    let last3 = &recs[recs.len() - 3..];
    let end = last3[2].offset + last3[2].header.record_bytes() as u64;
    for at in (last3[0].offset..=end).step_by(29).chain([end - 1, end]) {
        restore(dir.path(), &pristine);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(at)
            .unwrap();
        // The last record that still fits whole survives.
        let survivors = recs
            .iter()
            .filter(|r| r.offset + 32 + r.header.payload_len as u64 <= at)
            .count();
        let expect = recs[survivors - 1].header.index;
        expect_recovers_to(dir.path(), expect, &format!("truncate at {at}"));
    }
}

#[test]
fn a_zeroed_tail_is_an_ordinary_end() {
    let dir = tempfile::tempdir().unwrap();
    let recs = make_log(dir.path(), 120, small());
    let seg = last_segment(dir.path());
    let r = recs[recs.len() - 2];
    let mut img = std::fs::read(&seg).unwrap();
    img[r.offset as usize..].fill(0);
    std::fs::write(&seg, &img).unwrap();
    expect_recovers_to(dir.path(), r.header.index - 1, "zeroed tail");
}

#[test]
fn corruption_in_an_earlier_segment_refuses_to_open_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 300, small());
    let segs = baton_wal::segment::list_segments(dir.path()).unwrap();
    assert!(segs.len() >= 3);
    let ins = baton_wal::inspect(dir.path()).unwrap();
    let victim = &ins.segments[1];
    let r = victim.records[victim.records.len() / 2];
    let mut img = std::fs::read(&victim.path).unwrap();
    img[r.offset as usize + 40] ^= 1;
    std::fs::write(&victim.path, &img).unwrap();
    let before = snapshot(dir.path());
    let err = run(|| async {
        Wal::open(dir.path(), small())
            .await
            .err()
            .expect("open must fail")
    });
    match err {
        WalError::Corrupt {
            path,
            offset,
            reason: Corruption::Record(_),
        } => {
            assert_eq!((path, offset), (victim.path.clone(), r.offset));
        }
        other => panic!("unexpected {other:?}"),
    }
    let after = snapshot(dir.path());
    assert_eq!(before.len(), after.len());
    for ((p, a), (_, b)) in before.iter().zip(&after) {
        if !p.ends_with("PROBE") && !p.ends_with("LOCK") {
            assert!(a == b, "{} changed by a refused open", p.display());
        }
    }
    // The inspection (what `baton wal dump` prints) agrees.
    assert!(matches!(
        baton_wal::inspect(dir.path()).unwrap().verdict,
        Err(WalError::Corrupt { .. })
    ));
}

#[test]
fn corruption_far_before_the_tail_of_the_last_segment_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    // One big segment; the unsynced window is 64 KiB, the data much longer.
    let opts = WalOptions {
        payload_bytes_max: 4 << 10,
        segment_bytes: 4 << 20,
        flush_bytes_max: 32 << 10,
        pending_bytes_max: 64 << 10,
        ..WalOptions::default()
    };
    let recs = make_log(dir.path(), 1500, opts.clone());
    assert_eq!(
        baton_wal::segment::list_segments(dir.path()).unwrap().len(),
        1
    );
    let seg = last_segment(dir.path());
    let mut img = std::fs::read(&seg).unwrap();
    img[recs[10].offset as usize + 33] ^= 1;
    std::fs::write(&seg, &img).unwrap();
    let err = run(|| async {
        Wal::open(dir.path(), opts)
            .await
            .err()
            .expect("open must fail")
    });
    assert!(
        matches!(
            err,
            WalError::Corrupt {
                reason: Corruption::BeforeTail { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_half_created_last_segment_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    make_log(dir.path(), 50, small());
    let ins = baton_wal::inspect(dir.path()).unwrap();
    let next = ins.segments.last().unwrap().next_index();
    // As if the crash came after creating the file but before its header was synced.
    let path = baton_wal::segment::segment_path(dir.path(), next);
    std::fs::write(&path, vec![0u8; 8192]).unwrap();
    run(|| async {
        let (wal, report) = Wal::open(dir.path(), small()).await.unwrap();
        assert!(
            matches!(report.verdict, Verdict::TornSegment { .. }),
            "{:?}",
            report.verdict
        );
        assert_eq!(wal.last_index(), Some(50));
    });
    assert!(!path.exists());
}
