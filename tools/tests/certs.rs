//! `baton certs` writes the CA, node and client files with private keys at mode 0600, and
//! refuses (exit 1) to overwrite them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn certs(out: &Path, nodes: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["certs", "--out"])
        .arg(out)
        .args(["--nodes", nodes])
        .output()
        .expect("run baton")
}

#[test]
fn certs_writes_every_file_with_private_keys_0600() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("certs");
    let run = certs(&out, "3");
    assert_eq!(
        run.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8(run.stdout).expect("utf-8");

    let mut names = vec!["ca.pem", "ca.key", "client.pem", "client.key"];
    let nodes: Vec<String> = (1..=3)
        .flat_map(|id| [format!("node-{id}.pem"), format!("node-{id}.key")])
        .collect();
    names.extend(nodes.iter().map(String::as_str));
    assert_eq!(stdout.lines().count(), names.len(), "{stdout}");
    for name in names {
        let path = out.join(name);
        assert!(stdout.contains(&path.display().to_string()), "{stdout}");
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
            .permissions()
            .mode()
            & 0o777;
        if name.ends_with(".key") {
            assert_eq!(mode, 0o600, "{name}");
        }
    }

    let again = certs(&out, "3");
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8(again.stderr).expect("utf-8");
    assert!(stderr.contains("already exists"), "{stderr}");
}
