//! Command-line behaviour that is not about a cluster.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

const BATON: &str = env!("CARGO_BIN_EXE_baton");

/// Output to a reader that went away (`baton … | head`) ends the command quietly, by SIGPIPE as
/// for other tools, instead of a panic about failed printing.
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills both descriptors; the read end is closed at once and the write end
    // is owned by the child's stdout below.
    let write_end = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        OwnedFd::from_raw_fd(fds[1])
    };
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BATON)
        .args(["keygen", "--json", "--out"])
        .arg(dir.path().join("node.key"))
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .expect("run baton keygen");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {stderr}",
        out.status
    );
}

/// `baton wal bench` measures a real log (JSON with its rates), and refuses an I/O arena size
/// outside its bounds with a message instead of failing inside the allocator.
#[test]
fn wal_bench_measures_and_refuses_an_arena_out_of_bounds() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let log = dir.path().join("wal");
    let out = Command::new(BATON)
        .args(["wal", "bench", "--seconds", "1", "--record-bytes", "4096"])
        .args(["--in-flight", "4", "--json", "--dir"])
        .arg(&log)
        .output()
        .expect("run baton wal bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(
        result["bytes_per_s"].as_f64().expect("rate") > 0.0,
        "{result}"
    );
    assert!(result["syncs"].as_u64().expect("syncs") > 0, "{result}");
    for bad in ["1", "2147483648"] {
        let out = Command::new(BATON)
            .args([
                "wal",
                "bench",
                "--seconds",
                "1",
                "--io-memory-bytes",
                bad,
                "--dir",
            ])
            .arg(&log)
            .output()
            .expect("run baton wal bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad}: {stderr}");
        assert!(
            stderr.contains("--io-memory-bytes") && stderr.contains("must be between"),
            "{stderr}"
        );
    }
}
