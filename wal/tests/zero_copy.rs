//! Zero-copy appends (`Wal::append_buf`) through the public API: block-aligned records after
//! padding records, reads from every place a record can be, reopen, truncation, buffer reuse and
//! input errors. Crash and corruption cases are in crash.rs and corruption.rs.

mod common;

use baton_wal::record::HEADER_BYTES;
use baton_wal::segment::BLOCK_BYTES;
use baton_wal::{RecordBuf, Verdict, Wal, WalError, WalOptions};
use common::*;

/// Options for records of up to 256 KiB, so their buffers are large enough to be pooled.
fn large() -> WalOptions {
    WalOptions {
        payload_bytes_max: 256 << 10,
        segment_bytes: 4 << 20,
        flush_bytes_max: 1 << 20,
        pending_bytes_max: 4 << 20,
    }
}

/// Yields (no timer) until the group commit has a round in flight.
async fn until_writing(wal: &Wal) {
    for _ in 0..1000 {
        if wal.is_writing() {
            return;
        }
        futures_lite::future::yield_now().await;
    }
    panic!("the group commit never started a round");
}

#[test]
fn zero_copy_records_start_on_a_block_after_padding_and_read_back_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let max = small().payload_bytes_max;
    run(|| async {
        let (wal, _) = Wal::open(dir.path(), small()).await.unwrap();
        for i in 1..=400 {
            append_as(&wal, i, max, is_zero_copy(i)).await;
            if i % 97 == 0 {
                // Still queued: served from memory.
                check_all(&wal, i - 5, i, max).await;
            }
        }
        wal.durable(400).await.unwrap();
        check_all(&wal, 1, 400, max).await;
        assert!(segment_count(dir.path()) > 3, "small segments rotate");
        let padding = wal.stats().padding_bytes;
        wal.close().await.unwrap();

        let ins = baton_wal::inspect(dir.path()).unwrap();
        assert_eq!(ins.verdict.unwrap(), Verdict::Clean);
        let mut scanned_padding = 0;
        for seg in &ins.segments {
            for r in &seg.records {
                if is_zero_copy(r.header.index) {
                    assert_eq!(
                        r.offset % BLOCK_BYTES as u64,
                        0,
                        "record {}",
                        r.header.index
                    );
                }
            }
            for p in &seg.paddings {
                scanned_padding += p.bytes;
                assert_eq!((p.offset + p.bytes) % BLOCK_BYTES as u64, 0);
                let next = seg
                    .records
                    .iter()
                    .find(|r| r.header.index == p.next_index)
                    .expect("a padding is followed by the record it announces");
                assert_eq!(next.offset, p.offset + p.bytes);
                assert!(is_zero_copy(p.next_index));
            }
        }
        assert!(scanned_padding > 0);
        assert_eq!(scanned_padding, padding, "every padding written is on disk");
    });
    run(|| async {
        let (wal, report) = Wal::open(dir.path(), small()).await.unwrap();
        assert_eq!(report.verdict, Verdict::Clean);
        assert_eq!(report.last_index, Some(400));
        check_all(&wal, 1, 400, max).await;
        fill_mixed(&wal, 401, 450, max).await;
        check_all(&wal, 395, 450, max).await;
    });
}

#[test]
fn records_of_a_round_in_flight_read_back_and_keep_their_buffer() {
    let dir = tempfile::tempdir().unwrap();
    run(|| async {
        let (wal, _) = Wal::open(dir.path(), large()).await.unwrap();
        let body = |i: u64| vec![(i * 13) as u8; 100_000 + i as usize];
        let buf_of = |wal: &Wal, i: u64| {
            let mut buf = wal.record_buf(body(i).len());
            buf.set_payload(&body(i));
            buf
        };
        for i in 1..=4 {
            wal.append_buf(i, 1, buf_of(&wal, i)).await.unwrap();
        }
        until_writing(&wal).await;
        // Shared with the write in flight, not copied; held across later rounds.
        let held = wal.read(3).await.unwrap();
        assert_eq!(held.payload(), &body(3)[..]);
        assert_eq!(held.payload().as_ptr() as usize % 16, 0);
        wal.sync().await.unwrap();
        let reused_before = wal.stats().reused_buffers;
        for round in 0..6u64 {
            let first = 5 + round * 4;
            for i in first..first + 4 {
                wal.append_buf(i, 1, buf_of(&wal, i)).await.unwrap();
            }
            wal.durable(first + 3).await.unwrap();
        }
        assert!(
            wal.stats().reused_buffers >= reused_before + 12,
            "finished rounds' buffers are reused: {:?}",
            wal.stats()
        );
        // The held record's buffer was not handed out again.
        assert_eq!(held.payload(), &body(3)[..]);
        for i in 1..=28 {
            assert_eq!(wal.read(i).await.unwrap().payload(), &body(i)[..], "{i}");
        }
        // A shorter payload in a reused buffer: nothing of the old payload is part of it.
        let mut buf = wal.record_buf(200_000);
        assert!(buf.payload_capacity() >= 200_000);
        buf.set_payload(b"short");
        wal.append_buf(29, 2, buf).await.unwrap();
        wal.durable(29).await.unwrap();
        let r = wal.read(29).await.unwrap();
        assert_eq!((r.term, r.payload()), (2, &b"short"[..]));
    });
    let ins = baton_wal::inspect(dir.path()).unwrap();
    assert_eq!(ins.verdict.unwrap(), Verdict::Clean);
}

#[test]
fn truncate_after_and_purge_with_zero_copy_records() {
    let dir = tempfile::tempdir().unwrap();
    let max = 2000;
    run(|| async {
        let (wal, _) = Wal::open(dir.path(), small()).await.unwrap();
        fill_mixed(&wal, 1, 300, max).await;
        // 137 is copied and 138 zero-copy: the padding after 137 goes with the cut.
        assert!(!is_zero_copy(137) && is_zero_copy(138));
        wal.truncate_after(137).await.unwrap();
        assert_eq!(wal.last_index(), Some(137));
        // A copied record goes right after 137, then a zero-copy one after new padding.
        wal.append(138, 999, b"replacement").await.unwrap();
        let mut buf = wal.record_buf(10);
        buf.set_payload(b"zero-copy");
        wal.append_buf(139, 999, buf).await.unwrap();
        wal.durable(139).await.unwrap();
        check_all(&wal, 1, 137, max).await;
        // Cut right after a zero-copy record, before anything was synced after it.
        append_as(&wal, 140, max, true).await;
        wal.truncate_after(139).await.unwrap();
        wal.purge_through(100).await.unwrap();
        assert_eq!(wal.last_index(), Some(139));
    });
    run(|| async {
        let (wal, report) = Wal::open(dir.path(), small()).await.unwrap();
        assert_eq!(report.verdict, Verdict::Clean, "nothing torn is left");
        assert_eq!(wal.last_index(), Some(139));
        assert_eq!(wal.read(138).await.unwrap().payload(), b"replacement");
        let r = wal.read(139).await.unwrap();
        assert_eq!((r.term, r.payload()), (999, &b"zero-copy"[..]));
        check_all(&wal, wal.first_index().unwrap(), 137, max).await;
        fill_mixed(&wal, 140, 160, max).await;
        check_all(&wal, 130, 137, max).await;
        check_all(&wal, 140, 160, max).await;
    });
}

#[test]
fn zero_copy_input_errors_are_typed_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let max = small().payload_bytes_max;
    run(|| async {
        let (wal, _) = Wal::open(dir.path(), small()).await.unwrap();
        fill_mixed(&wal, 1, 10, max).await;
        let stats = wal.stats();
        let mut big = wal.record_buf(max + 1);
        big.set_payload_len(max + 1);
        assert!(matches!(
            wal.append_buf(11, 1, big).await,
            Err(WalError::PayloadTooLarge { len, .. }) if len == max + 1
        ));
        assert!(matches!(
            wal.append_buf(0, 1, wal.record_buf(1)).await,
            Err(WalError::ZeroIndex)
        ));
        assert!(matches!(
            wal.append_buf(13, 1, wal.record_buf(1)).await,
            Err(WalError::NonContiguous {
                expected: 11,
                got: 13
            })
        ));
        assert_eq!(wal.last_index(), Some(10));
        assert_eq!(wal.stats().appends, stats.appends);
        assert_eq!(wal.stats().padding_bytes, stats.padding_bytes);
        fill_mixed(&wal, 11, 12, max).await;
        check_all(&wal, 1, 12, max).await;
    });
}

#[test]
fn record_buffers_reserve_the_header_and_hold_whole_blocks() {
    let dir = tempfile::tempdir().unwrap();
    run(|| async {
        let (wal, _) = Wal::open(dir.path(), small()).await.unwrap();
        for cap in [0, 1, 4096 - HEADER_BYTES, 4096 - HEADER_BYTES + 1, 10_000] {
            let mut buf = wal.record_buf(cap);
            assert!(buf.payload_capacity() >= cap);
            assert_eq!(
                (buf.payload_capacity() + HEADER_BYTES) % BLOCK_BYTES,
                0,
                "capacity {cap}"
            );
            let area = buf.payload_area_mut();
            assert_eq!(area.as_ptr() as usize % 16, 0);
            assert_eq!(buf.payload_len(), 0);
        }
        assert_eq!(RecordBuf::buffer_bytes(10_000), 12288);
    });
}
