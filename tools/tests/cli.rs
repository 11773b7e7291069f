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
