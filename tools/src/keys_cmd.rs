//! `baton keygen` (a node's signing key) and `baton verify` (a receipt, offline), and the JSON
//! form of a receipt that `baton submit --json` prints and `baton verify` reads.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use baton_core::sign::{decode_hex, hex};
use baton_core::{AckLevel, Address, Receipt, SignedHeader, Signer, TxHash};
use clap::Args;
use serde_json::{json, Value};

use crate::node_cmd::ClusterInfo;

/// `baton keygen`
#[derive(Args)]
pub struct KeygenArgs {
    /// Where to write the key (mode 0600; an existing file is never overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `baton keygen`: writes a fresh secp256k1 key and prints its address.
pub fn run_keygen(args: KeygenArgs) -> ExitCode {
    let signer = Signer::random();
    if let Err(e) = signer.save(&args.out) {
        eprintln!("baton keygen: {e}");
        return ExitCode::from(1);
    }
    if args.json {
        println!(
            "{}",
            json!({"key_file": args.out.display().to_string(), "address": signer.address().to_string()})
        );
    } else {
        println!("{}  {}", signer.address(), args.out.display());
    }
    ExitCode::SUCCESS
}

/// A receipt as JSON: every field, hex-encoded, plus the position and term for readers.
pub fn receipt_json(r: &Receipt) -> Value {
    json!({
        "tx_hash": r.tx_hash.to_string(),
        "level": r.level.name(),
        "index": r.index(),
        "offset": r.offset,
        "term": r.term(),
        "duplicate": r.duplicate,
        "signed_header": format!("0x{}", hex(&r.batch.encode())),
        "path": r.path.iter().map(|p| format!("0x{}", hex(p))).collect::<Vec<_>>(),
    })
}

fn hex32(v: &Value, what: &str) -> Result<[u8; 32], String> {
    let s = v.as_str().ok_or(format!("{what}: expected a hex string"))?;
    let mut out = [0u8; 32];
    decode_hex(s.strip_prefix("0x").unwrap_or(s), &mut out).map_err(|e| format!("{what}: {e}"))?;
    Ok(out)
}

/// Parses [`receipt_json`]'s output. `index` and `term` are read from the signed header; the
/// copies beside it must agree.
pub fn receipt_from_json(v: &Value) -> Result<Receipt, String> {
    let tx_hash = TxHash(hex32(&v["tx_hash"], "tx_hash")?);
    let level = match v["level"].as_str() {
        Some("preconfirmed") => AckLevel::Preconfirmed,
        Some("committed") => AckLevel::Committed,
        _ => return Err("level: expected \"preconfirmed\" or \"committed\"".into()),
    };
    let header_hex = v["signed_header"]
        .as_str()
        .ok_or("signed_header: expected a hex string")?;
    let mut header = [0u8; baton_core::receipt::SIGNED_HEADER_BYTES];
    decode_hex(
        header_hex.strip_prefix("0x").unwrap_or(header_hex),
        &mut header,
    )
    .map_err(|e| format!("signed_header: {e}"))?;
    let batch = SignedHeader::decode(&header).map_err(|e| format!("signed_header: {e}"))?;
    let offset = v["offset"]
        .as_u64()
        .and_then(|o| u32::try_from(o).ok())
        .ok_or("offset: expected a u32")?;
    let path = v["path"]
        .as_array()
        .ok_or("path: expected an array")?
        .iter()
        .map(|p| hex32(p, "path"))
        .collect::<Result<Vec<_>, _>>()?;
    let duplicate = v["duplicate"].as_bool().unwrap_or(false);
    for (field, expected) in [("index", batch.header.index), ("term", batch.header.term)] {
        if let Some(given) = v[field].as_u64() {
            if given != expected {
                return Err(format!(
                    "{field} {given} disagrees with the signed header ({expected})"
                ));
            }
        }
    }
    Ok(Receipt {
        tx_hash,
        level,
        batch,
        offset,
        path,
        duplicate,
    })
}

/// `baton verify`
#[derive(Args)]
pub struct VerifyArgs {
    /// The receipt JSON (as `baton submit --json` prints it); `-` reads standard input.
    #[arg(long, default_value = "-")]
    receipt: PathBuf,
    /// An address the batch may be signed by (repeatable).
    #[arg(long = "signer")]
    signers: Vec<String>,
    /// A local cluster's directory: its nodes' signer addresses from cluster.json.
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `baton verify`: exit 0 if the receipt proves its transaction's position under a
/// signature by one of the given signers, 1 if not, 2 on bad arguments.
pub fn run_verify(args: VerifyArgs) -> ExitCode {
    let mut signers = Vec::new();
    for s in &args.signers {
        match Address::parse(s) {
            Ok(a) => signers.push(a),
            Err(e) => {
                eprintln!("baton verify: --signer {s}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(dir) = &args.cluster {
        let path = dir.join("cluster.json");
        let info: Result<ClusterInfo, String> = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()));
        match info {
            Ok(info) => {
                for n in &info.nodes {
                    match Address::parse(&n.signer) {
                        Ok(a) => signers.push(a),
                        Err(e) => {
                            eprintln!("baton verify: {}: node {}: {e}", path.display(), n.id);
                            return ExitCode::from(2);
                        }
                    }
                }
            }
            Err(e) => {
                eprintln!("baton verify: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    if signers.is_empty() {
        eprintln!("baton verify: give --signer ADDRESS or --cluster DIR");
        return ExitCode::from(2);
    }
    let mut text = String::new();
    let read = if args.receipt.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(&args.receipt).map(|t| text = t)
    };
    if let Err(e) = read {
        eprintln!("baton verify: {}: {e}", args.receipt.display());
        return ExitCode::from(2);
    }
    let receipt = match serde_json::from_str::<Value>(&text)
        .map_err(|e| e.to_string())
        .and_then(|v| receipt_from_json(&v))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("baton verify: not a receipt: {e}");
            return ExitCode::from(2);
        }
    };
    match receipt.verify(&signers) {
        Ok(signer) => {
            if args.json {
                println!(
                    "{}",
                    json!({"valid": true, "tx_hash": receipt.tx_hash.to_string(),
                        "index": receipt.index(), "offset": receipt.offset,
                        "term": receipt.term(), "level": receipt.level.name(),
                        "signer": signer.to_string()})
                );
            } else {
                println!(
                    "valid: {} at index {} offset {}, term {}, {} by {signer}",
                    receipt.tx_hash,
                    receipt.index(),
                    receipt.offset,
                    receipt.term(),
                    receipt.level.name()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if args.json {
                println!("{}", json!({"valid": false, "error": e.to_string()}));
            } else {
                println!("INVALID: {e}");
            }
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::{BatchHeader, MerkleTree};

    fn sample() -> (Receipt, Signer) {
        let key = Signer::from_secret(&[8; 32]).unwrap();
        let hashes: Vec<TxHash> = (0..5u8).map(|i| TxHash::of(&[i])).collect();
        let tree = MerkleTree::new(&hashes);
        let header = BatchHeader {
            term: 2,
            index: 40,
            prev_batch_hash: [3; 32],
            tx_merkle_root: tree.root(),
            tx_count: 5,
            timestamp_us: 77,
        };
        let r = Receipt {
            tx_hash: hashes[3],
            level: AckLevel::Preconfirmed,
            batch: SignedHeader::sign(header, &key),
            offset: 3,
            path: tree.proof(3).unwrap().path,
            duplicate: false,
        };
        (r, key)
    }

    #[test]
    fn receipt_json_round_trips_and_verifies() {
        let (r, key) = sample();
        let v = receipt_json(&r);
        let back = receipt_from_json(&v).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.verify(&[key.address()]).unwrap(), key.address());
    }

    #[test]
    fn bad_receipt_json_is_refused_with_a_reason() {
        let (r, _) = sample();
        let mut v = receipt_json(&r);
        v["index"] = json!(41);
        assert!(receipt_from_json(&v).unwrap_err().contains("index"));
        let mut v = receipt_json(&r);
        v["path"] = json!(["0x12"]);
        assert!(receipt_from_json(&v).unwrap_err().contains("path"));
        let mut v = receipt_json(&r);
        v["level"] = json!("final");
        assert!(receipt_from_json(&v).unwrap_err().contains("level"));
    }
}
