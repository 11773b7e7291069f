//! Signed receipts against a real `baton cluster up`: preconfirmed and committed receipts from
//! the leader and through a follower verify offline against the signer addresses in
//! cluster.json; `baton submit --json` prints a receipt `baton verify` accepts, and a tampered
//! one is refused; `baton status` reports each node's signer.

mod common;

use std::process::Command;
use std::time::Duration;

use baton_core::{AckLevel, Address};
use common::*;

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn receipts_from_leader_and_follower_verify_offline() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterUp::start(dir.path(), 3, free_base_port(3));
    let keys = signers(dir.path());
    let all: Vec<Address> = keys.iter().map(|(_, a)| *a).collect();
    assert_eq!(all.len(), 3);
    let rt = runtime();
    // The leader now (an election may have followed `cluster up`'s report).
    let leader = rt.block_on(async {
        let s = wait_applied(&cluster.client_of(cluster.leader), 0, WAIT).await;
        s.leader.expect("a leader")
    });
    let follower = cluster.nodes.iter().find(|n| n.id != leader).unwrap().id;
    let leader_key = keys.iter().find(|(id, _)| *id == leader).unwrap().1;
    rt.block_on(async {
        // Every node reports its own signer.
        for n in &cluster.nodes {
            let s = cluster.client_of(n.id).status().await.unwrap();
            assert_eq!(
                Some(&(n.id, s.signer)),
                keys.iter().find(|(id, _)| *id == n.id)
            );
        }
        for (via, ack) in [
            (leader, AckLevel::Preconfirmed),
            (leader, AckLevel::Committed),
            (follower, AckLevel::Preconfirmed),
            (follower, AckLevel::Committed),
        ] {
            let client = cluster.client_of(via);
            let tag = format!("{via}-{}", ack.name());
            let results = client.submit_with(txs(&tag, 0, 40), ack).await.unwrap();
            for r in results {
                let r = r.expect("receipt");
                assert_eq!(r.verify(&all).unwrap(), leader_key, "signed by the leader");
                // Through a follower too: the leader passes its seal back ahead of the commit.
                assert_eq!(r.level, ack, "via node {via}");
                // Another node's key does not verify it.
                let others: Vec<Address> =
                    all.iter().copied().filter(|a| *a != leader_key).collect();
                assert!(r.verify(&others).is_err());
            }
            client.close().await;
        }
    });

    // The command line: submit --json, then verify against cluster.json.
    let args = [
        "submit",
        "--json",
        "--ack",
        "preconfirmed",
        "--text",
        "receipt-cli",
        "--cluster",
    ];
    let mut args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    args.push(dir.path().as_os_str());
    let receipt = String::from_utf8(baton_ok(&args)).unwrap();
    let file = dir.path().join("receipt.json");
    std::fs::write(&file, &receipt).unwrap();
    let verify = |file: &std::path::Path| {
        Command::new(BATON)
            .args(["verify", "--receipt"])
            .arg(file)
            .arg("--cluster")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let ok = verify(&file);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(stdout.starts_with("valid:"), "{stdout}");
    assert!(stdout.contains(&leader_key.to_string()), "{stdout}");

    // Moved to another offset: the Merkle path no longer leads to the signed root.
    let mut v: serde_json::Value = serde_json::from_str(&receipt).unwrap();
    v["offset"] = serde_json::json!(v["offset"].as_u64().unwrap() + 1);
    v["path"] = serde_json::json!([format!("0x{}", "11".repeat(32))]);
    std::fs::write(&file, v.to_string()).unwrap();
    let bad = verify(&file);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stdout).starts_with("INVALID"));

    // A signer that is not the cluster's: refused.
    std::fs::write(&file, &receipt).unwrap();
    let stranger = Command::new(BATON)
        .args([
            "verify",
            "--signer",
            "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23",
            "--receipt",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(stranger.status.code(), Some(1));
    cluster.stop();
}

#[test]
fn keygen_writes_a_private_key_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n.key");
    let out = Command::new(BATON)
        .args(["keygen", "--json", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let addr = Address::parse(v["address"].as_str().unwrap()).unwrap();
    assert_eq!(baton_core::Signer::load(&path).unwrap().address(), addr);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = Command::new(BATON)
        .args(["keygen", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(baton_core::Signer::load(&path).unwrap().address(), addr);
}
