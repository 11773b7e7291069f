//! I/O errors: injected at named points (feature `failpoints`) and a real full disk (a small
//! loop-mounted ext4 filesystem, when the test runs as root). After any error the log refuses
//! further writes with a typed error, and a reopen finds every durable record intact.

mod common;

use baton_wal::{Wal, WalError};
use common::*;

/// Appends (each waited durable) from `first` until an operation fails; returns the error and
/// the index that failed. Bounded: panics after `limit` indexes.
async fn append_until_error(wal: &Wal, first: u64, limit: u64, max: usize) -> (WalError, u64) {
    for i in first..limit {
        if let Err(e) = wal.append(i, term(i), &payload(i, max)).await {
            return (e, i);
        }
        if let Err(e) = wal.durable(i).await {
            return (e, i);
        }
    }
    panic!("no error after appending up to index {limit}");
}

#[cfg(feature = "failpoints")]
mod injected {
    use super::*;
    use baton_wal::failpoint::{self, points};

    fn expect_failed(e: WalError, what: &str) -> WalError {
        match e {
            WalError::Failed { cause } => {
                std::sync::Arc::try_unwrap(cause).unwrap_or_else(|a| clone_shallow(&a))
            }
            other => panic!("{what}: expected Failed, got {other:?}"),
        }
    }

    fn clone_shallow(e: &WalError) -> WalError {
        match e {
            WalError::DiskFull { op, path } => WalError::DiskFull {
                op,
                path: path.clone(),
            },
            WalError::Io { op, path, source } => WalError::Io {
                op,
                path: path.clone(),
                source: std::io::Error::from(source.kind()),
            },
            _ => panic!("unexpected cause {e:?}"),
        }
    }

    fn injected_error_stops_writes_and_keeps_durable_data(point: &'static str, errno: i32) {
        let dir = tempfile::tempdir().unwrap();
        let max = small().payload_bytes_max;
        let durable = run(|| async {
            let (wal, _) = Wal::open(dir.path(), small()).await.unwrap();
            fill(&wal, 1, 40, max).await;
            failpoint::arm(point, errno, true);
            // Keep appending until the armed point is reached (segment creation needs a rotation).
            let (err, i) = append_until_error(&wal, 41, 5000, max).await;
            let cause = expect_failed(err, point);
            if errno == libc::ENOSPC {
                assert!(matches!(cause, WalError::DiskFull { .. }), "{cause:?}");
            } else {
                assert!(matches!(cause, WalError::Io { .. }), "{cause:?}");
            }
            // Every later write is refused, reads of durable data still work.
            assert!(matches!(
                wal.append(i + 1, 1, b"x").await,
                Err(WalError::Failed { .. }) | Err(WalError::NonContiguous { .. })
            ));
            check_all(&wal, 1, 40, max).await;
            failpoint::clear();
            i - 1
        });
        run(|| async {
            let (wal, report) = Wal::open(dir.path(), small()).await.unwrap();
            let last = wal.last_index().unwrap();
            assert!(
                last >= durable,
                "{point}: reopened log ends at {last}, {durable} was durable ({:?})",
                report.verdict
            );
            check_all(&wal, 1, last, max).await;
            fill(&wal, last + 1, last + 3, max).await;
        });
    }

    #[test]
    fn a_failed_log_releases_its_directory_on_shutdown_even_while_a_handle_lives() {
        let dir = tempfile::tempdir().unwrap();
        run(|| async {
            let (wal, _) = Wal::open(dir.path(), small()).await.unwrap();
            fill(&wal, 1, 5, 500).await;
            failpoint::arm(points::FDATASYNC, libc::EIO, true);
            // Several buffers queued behind the failing round.
            for i in 6..60 {
                if wal.append(i, term(i), &payload(i, 500)).await.is_err() {
                    break;
                }
            }
            assert!(wal.durable(6).await.is_err());
            failpoint::clear();
            wal.shutdown_handle().shutdown().await;
            // `wal` is still alive (as in a leaked task); the directory opens again.
            let (again, _) = Wal::open(dir.path(), small()).await.expect("lock released");
            assert!(again.last_index().unwrap() >= 5);
            assert!(matches!(
                wal.save_meta(b"stale").await,
                Err(WalError::Failed { .. }) | Err(WalError::Closed)
            ));
        });
    }

    #[test]
    fn a_failed_spare_write_only_turns_spares_off() {
        let dir = tempfile::tempdir().unwrap();
        let max = small().payload_bytes_max;
        run(|| async {
            failpoint::arm(points::SPARE_WRITE, libc::ENOSPC, true);
            let (wal, _) = Wal::open(dir.path(), small()).await.unwrap();
            wal.spares_settled().await;
            failpoint::clear();
            assert_eq!(wal.spares_ready(), 0);
            // Segments are preallocated on the write path instead; the log works as before.
            fill(&wal, 1, 200, max).await;
            let s = wal.stats();
            assert!(s.segments_created > 1, "{s:?}");
            assert_eq!((s.segments_from_spares, s.spares_written), (0, 0), "{s:?}");
            check_all(&wal, 1, 200, max).await;
            wal.close().await.unwrap();
            let (_, leftovers) = baton_wal::segment::list_spares(dir.path()).unwrap();
            assert!(leftovers.is_empty(), "{leftovers:?}");
        });
    }

    #[test]
    fn fdatasync_error() {
        injected_error_stops_writes_and_keeps_durable_data(points::FDATASYNC, libc::EIO);
    }

    #[test]
    fn write_error() {
        injected_error_stops_writes_and_keeps_durable_data(points::WRITE, libc::EIO);
    }

    #[test]
    fn segment_creation_out_of_space() {
        injected_error_stops_writes_and_keeps_durable_data(points::SEGMENT_CREATE, libc::ENOSPC);
    }
}

/// A real ENOSPC: an 8 MiB ext4 image, loop-mounted. Needs root (CI runs as root); elsewhere it
/// says so and does nothing.
#[test]
fn real_disk_full_is_a_typed_error_and_loses_nothing_durable() {
    let Some(fs) = LoopFs::mount(8) else {
        eprintln!("SKIPPED: cannot loop-mount a filesystem here (not root?)");
        return;
    };
    let dir = fs.mnt.join("wal");
    let max = small().payload_bytes_max;
    let durable = run(|| async {
        let (wal, _) = Wal::open(&dir, small()).await.unwrap();
        let (err, i) = append_until_error(&wal, 1, 1_000_000, max).await;
        match &err {
            WalError::Failed { cause } => {
                assert!(matches!(**cause, WalError::DiskFull { .. }), "{cause:?}")
            }
            other => panic!("expected Failed(DiskFull), got {other:?}"),
        }
        i - 1
    });
    assert!(durable > 100, "only {durable} records fit");
    run(|| async {
        let (wal, _) = Wal::open(&dir, small()).await.unwrap();
        let last = wal.last_index().unwrap();
        assert!(last >= durable);
        check_all(&wal, 1, last, max).await;
        // Space freed by a purge lets the log continue.
        wal.purge_through(last / 2).await.unwrap();
        fill(&wal, last + 1, last + 20, max).await;
    });
}

struct LoopFs {
    _tmp: tempfile::TempDir,
    mnt: std::path::PathBuf,
}

impl LoopFs {
    fn mount(mib: u64) -> Option<LoopFs> {
        use std::process::Command;
        let tmp = tempfile::tempdir().ok()?;
        let img = tmp.path().join("fs.img");
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).ok()?;
        std::fs::File::create(&img).ok()?.set_len(mib << 20).ok()?;
        let ok = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
        if !ok(Command::new("mkfs.ext4").arg("-q").arg(&img))
            || !ok(Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(&img)
                .arg(&mnt))
        {
            return None;
        }
        Some(LoopFs { _tmp: tmp, mnt })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
    }
}
