//! `baton admin rollup add|list`, `baton reveal`, `baton tx`, `baton block` and `baton blocks`:
//! rollups, encrypted transactions and reads through a QUIC client.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use baton_core::block::SignedBlockHeader;
use baton_core::command::RollupPolicy;
use baton_core::node::{BlockTxs, Consistency, Reveal, SubmitError, TxInfo};
use baton_core::rollups::RollupInfo;
use baton_core::sequencer::CommandApplied;
use baton_core::sign::hex;
use baton_core::{TxHash, TxKind};
use baton_net::rollup_msg::{Answer, Query};
use baton_net::{Client, ClientError, ClientOptions};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client_cmd::{runtime, Target};

/// Default policy of rollups that `cluster up` and `admin rollup add` register.
pub const DEFAULT_POLICY: RollupPolicy = RollupPolicy {
    block_time_ms: 250,
    max_block_txs: 10_000,
    reveal_window_blocks: 16,
};

/// `baton admin`
#[derive(Subcommand)]
pub enum AdminCommand {
    /// Rollup registrations.
    Rollup {
        #[command(subcommand)]
        command: RollupCommand,
    },
    /// Cluster membership: add, remove and list nodes.
    Member {
        #[command(subcommand)]
        command: crate::member_cmd::MemberCommand,
    },
    /// Leadership: move it to another voter (before maintenance of the leader's machine).
    Leader {
        #[command(subcommand)]
        command: crate::member_cmd::LeaderCommand,
    },
}

/// `baton admin rollup`
#[derive(Subcommand)]
pub enum RollupCommand {
    /// Register a rollup through the log (transactions for unknown rollups are refused).
    Add(AddArgs),
    /// List the registered rollups with their heights.
    List(ListArgs),
}

/// `baton admin rollup add`
#[derive(Args)]
pub struct AddArgs {
    #[command(flatten)]
    target: Target,
    /// The rollup id its transactions carry.
    #[arg(long)]
    id: u64,
    /// The leader seals a block this long after the previous one (if anything waits).
    #[arg(long, default_value_t = DEFAULT_POLICY.block_time_ms)]
    block_time_ms: u32,
    /// ...or as soon as this many transactions wait; blocks never hold more.
    #[arg(long, default_value_t = DEFAULT_POLICY.max_block_txs)]
    max_block_txs: u32,
    /// Encrypted transactions not revealed within this many blocks are marked expired.
    #[arg(long, default_value_t = DEFAULT_POLICY.reveal_window_blocks)]
    reveal_window_blocks: u32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Read options shared by the read commands.
#[derive(Args, Clone)]
pub struct ReadOpts {
    #[command(flatten)]
    target: Target,
    /// Read on this node (default: the first endpoint that answers).
    #[arg(long)]
    node: Option<SocketAddr>,
    /// Read-your-writes: the node first waits until it has applied this log index.
    #[arg(long, conflicts_with = "linearizable")]
    min_index: Option<u64>,
    /// Confirm through the leader first (sees every write acknowledged before the read).
    #[arg(long)]
    linearizable: bool,
    /// How long the node may wait for `--min-index` / `--linearizable`.
    #[arg(long, default_value_t = 5_000)]
    wait_ms: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl ReadOpts {
    fn client(&self) -> Result<Client, String> {
        let mut options = self.target.options()?;
        if let Some(node) = self.node {
            options.endpoints = vec![node];
        }
        Client::new(options).map_err(|e| e.to_string())
    }

    fn consistency(&self) -> Consistency {
        match (self.min_index, self.linearizable) {
            (Some(i), _) => Consistency::MinIndex(i),
            (None, true) => Consistency::Linearizable,
            (None, false) => Consistency::Local,
        }
    }

    fn read(&self, query: Query) -> Result<(u64, Answer), String> {
        let rt = runtime();
        let client = {
            let _in_runtime = rt.enter();
            self.client()?
        };
        let wait = Duration::from_millis(self.wait_ms);
        let read = rt.block_on(client.read(query, self.consistency(), wait));
        let read = read.map_err(|e| e.to_string())?;
        Ok((read.applied_index, read.value))
    }
}

/// `baton admin rollup list`
#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    read: ReadOpts,
}

/// `baton reveal`
#[derive(Args)]
pub struct RevealArgs {
    #[command(flatten)]
    target: Target,
    /// Hash of the encrypted transaction (hex).
    #[arg(long)]
    tx: String,
    /// Its 32-byte key (hex); keccak256 of it must be the transaction's key commitment.
    #[arg(long)]
    key: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `baton tx`
#[derive(Args)]
pub struct TxArgs {
    #[command(flatten)]
    read: ReadOpts,
    /// The transaction hash (hex).
    hash: String,
}

/// `baton block`
#[derive(Args)]
pub struct BlockArgs {
    #[command(flatten)]
    read: ReadOpts,
    /// The rollup.
    #[arg(long)]
    rollup: u64,
    /// The height (default: the latest).
    #[arg(long)]
    height: Option<u64>,
}

/// `baton blocks`
#[derive(Args)]
pub struct BlocksArgs {
    #[command(flatten)]
    target: Target,
    /// The rollup.
    #[arg(long)]
    rollup: u64,
    /// First height.
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// Stop after this many blocks (default: follow until interrupted).
    #[arg(long)]
    count: Option<u64>,
}

/// A client of `target`, made inside `rt` (the QUIC endpoint needs a runtime).
pub(crate) fn connect(rt: &tokio::runtime::Runtime, target: &Target) -> Result<Client, String> {
    let _in_runtime = rt.enter();
    Client::new(target.options()?).map_err(|e| e.to_string())
}

fn parse_hash(s: &str) -> Result<TxHash, String> {
    let mut out = [0u8; 32];
    let s = s.strip_prefix("0x").unwrap_or(s);
    baton_core::sign::decode_hex(s, &mut out).map_err(|e| format!("bad hash: {e}"))?;
    Ok(TxHash(out))
}

pub(crate) fn fail(what: &str, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("baton {what}: {e}");
    ExitCode::from(1)
}

/// JSON of a policy.
fn policy_json(p: &RollupPolicy) -> Value {
    json!({
        "block_time_ms": p.block_time_ms,
        "max_block_txs": p.max_block_txs,
        "reveal_window_blocks": p.reveal_window_blocks,
    })
}

fn rollup_json(i: &RollupInfo) -> Value {
    json!({
        "rollup_id": i.rollup_id,
        "policy": policy_json(&i.policy),
        "registered_at": i.registered_at,
        "height": i.height,
        "pending_txs": i.pending_txs,
        "sealed_txs": i.sealed_txs,
    })
}

/// JSON of a signed block header.
pub fn header_json(s: &SignedBlockHeader) -> Value {
    let h = &s.header;
    json!({
        "rollup_id": h.rollup_id,
        "height": h.height,
        "parent_hash": format!("0x{}", hex(&h.parent_hash)),
        "first_batch": h.first_batch,
        "last_batch": h.last_batch,
        "tx_merkle_root": format!("0x{}", hex(&h.tx_merkle_root)),
        "tx_count": h.tx_count,
        "timestamp_us": h.timestamp_us,
        "digest": format!("0x{}", hex(&h.digest())),
        "signature": format!("0x{}", hex(&s.signature.0)),
        "signer": s.signer().map(|a| a.to_string()).unwrap_or_default(),
    })
}

/// JSON of a block with its metadata and transactions.
pub fn block_json(b: &BlockTxs) -> Value {
    let m = &b.block.meta;
    json!({
        "header": header_json(&b.block.signed),
        "meta": {
            "encrypted": m.encrypted,
            "revealed": m.revealed,
            "expired": m.expired,
            "pending": m.pending(),
        },
        "sealed_at": b.block.sealed_at,
        "txs": b.txs.as_ref().map(|txs| txs.iter().map(|t| json!({
            "hash": t.tx_hash.to_string(),
            "index": t.index,
            "offset": t.offset,
            "encrypted": matches!(t.tx.kind, TxKind::Encrypted { .. }),
            "bytes": format!("0x{}", hex(&t.tx.bytes)),
            "plaintext": t.plaintext.as_ref().map(|p| format!("0x{}", hex(p))),
        })).collect::<Vec<_>>()),
    })
}

fn tx_json(t: &TxInfo) -> Value {
    json!({
        "index": t.index,
        "offset": t.offset,
        "rollup_id": t.rollup_id,
        "block_height": t.block_height,
        "receipt": match &t.receipt {
            Ok(r) => crate::keys_cmd::receipt_json(r),
            Err(e) => json!({ "unavailable": e.to_string() }),
        },
        "reveal": match &t.reveal {
            None => Value::Null,
            Some(Reveal::Pending) => json!({ "status": "pending" }),
            Some(Reveal::Revealed { plaintext, revealed_at }) => json!({
                "status": "revealed",
                "plaintext": format!("0x{}", hex(plaintext)),
                "revealed_at": revealed_at,
            }),
            Some(Reveal::Expired) => json!({ "status": "expired" }),
        },
    })
}

/// Runs `baton admin`.
pub fn run_admin(command: AdminCommand) -> ExitCode {
    match command {
        AdminCommand::Rollup {
            command: RollupCommand::Add(a),
        } => add(a),
        AdminCommand::Rollup {
            command: RollupCommand::List(a),
        } => list(a),
        AdminCommand::Member { command } => crate::member_cmd::run(command),
        AdminCommand::Leader { command } => crate::member_cmd::run_leader(command),
    }
}

fn add(a: AddArgs) -> ExitCode {
    let policy = RollupPolicy {
        block_time_ms: a.block_time_ms,
        max_block_txs: a.max_block_txs,
        reveal_window_blocks: a.reveal_window_blocks,
    };
    if let Err(e) = policy.validate() {
        eprintln!("baton admin rollup add: {e}");
        return ExitCode::from(2);
    }
    let rt = runtime();
    let client = match connect(&rt, &a.target) {
        Ok(c) => c,
        Err(e) => return fail("admin rollup add", e),
    };
    match rt.block_on(client.register_rollup(a.id, policy)) {
        Ok(r) => {
            if a.json {
                println!(
                    "{}",
                    json!({ "rollup_id": a.id, "index": r.index, "policy": policy_json(&policy) })
                );
            } else {
                println!("rollup {} registered at log index {}", a.id, r.index);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail("admin rollup add", e),
    }
}

fn list(a: ListArgs) -> ExitCode {
    match a.read.read(Query::Rollups) {
        Ok((applied, Answer::Rollups(list))) => {
            if a.read.json {
                let v: Vec<Value> = list.iter().map(rollup_json).collect();
                println!("{}", json!({ "applied_index": applied, "rollups": v }));
            } else {
                println!(
                    "{:>10} {:>8} {:>10} {:>12} {:>8} {:>10} {:>10}",
                    "rollup", "height", "block ms", "max txs", "window", "pending", "sealed"
                );
                for i in &list {
                    println!(
                        "{:>10} {:>8} {:>10} {:>12} {:>8} {:>10} {:>10}",
                        i.rollup_id,
                        i.height,
                        i.policy.block_time_ms,
                        i.policy.max_block_txs,
                        i.policy.reveal_window_blocks,
                        i.pending_txs,
                        i.sealed_txs
                    );
                }
                println!("(node applied index {applied})");
            }
            ExitCode::SUCCESS
        }
        Ok(_) => fail("admin rollup list", "unexpected answer"),
        Err(e) => fail("admin rollup list", e),
    }
}

/// Runs `baton reveal`.
pub fn run_reveal(a: RevealArgs) -> ExitCode {
    let tx = match parse_hash(&a.tx) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("baton reveal: --tx: {e}");
            return ExitCode::from(2);
        }
    };
    let mut key = [0u8; 32];
    if let Err(e) =
        baton_core::sign::decode_hex(a.key.strip_prefix("0x").unwrap_or(&a.key), &mut key)
    {
        eprintln!("baton reveal: --key: bad hex: {e}");
        return ExitCode::from(2);
    }
    let rt = runtime();
    let client = match connect(&rt, &a.target) {
        Ok(c) => c,
        Err(e) => return fail("reveal", e),
    };
    match rt.block_on(client.reveal(tx, key)) {
        Ok(r) => {
            debug_assert!(matches!(r.applied, CommandApplied::Revealed { .. }));
            if a.json {
                println!(
                    "{}",
                    json!({ "tx": tx.to_string(), "revealed_at": r.index })
                );
            } else {
                println!("{tx} revealed at log index {}", r.index);
            }
            ExitCode::SUCCESS
        }
        // A refusal (wrong key, unknown transaction, ...) is the answer, not a failure to ask.
        Err(ClientError::NotSequenced(SubmitError::Command(e))) => {
            eprintln!("baton reveal: refused: {e}");
            ExitCode::from(1)
        }
        Err(e) => fail("reveal", e),
    }
}

/// Prints a read's answer (one line with `--json`, indented otherwise); exit status 0 if
/// something was found, 3 if not.
fn print_found(v: &Value, found: bool, one_line: bool) -> ExitCode {
    if one_line {
        println!("{v}");
    } else {
        println!("{v:#}");
    }
    if found {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

/// Runs `baton tx`.
pub fn run_tx(a: TxArgs) -> ExitCode {
    let hash = match parse_hash(&a.hash) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("baton tx: {e}");
            return ExitCode::from(2);
        }
    };
    match a.read.read(Query::Tx(hash)) {
        Ok((applied, Answer::Tx(found))) => {
            let v = json!({ "applied_index": applied, "tx": found.as_ref().map(tx_json) });
            print_found(&v, found.is_some(), a.read.json)
        }
        Ok(_) => fail("tx", "unexpected answer"),
        Err(e) => fail("tx", e),
    }
}

/// Runs `baton block`.
pub fn run_block(a: BlockArgs) -> ExitCode {
    let height = match a.height {
        Some(h) => h,
        None => match a.read.read(Query::Rollup(a.rollup)) {
            Ok((_, Answer::Rollup(Some(i)))) => i.height,
            Ok((_, Answer::Rollup(None))) => {
                return fail("block", format!("rollup {} is not registered", a.rollup))
            }
            Ok(_) => return fail("block", "unexpected answer"),
            Err(e) => return fail("block", e),
        },
    };
    match a.read.read(Query::Block {
        rollup_id: a.rollup,
        height,
    }) {
        Ok((applied, Answer::Block(found))) => {
            let v = json!({ "applied_index": applied, "block": found.as_ref().map(block_json) });
            print_found(&v, found.is_some(), a.read.json)
        }
        Ok(_) => fail("block", "unexpected answer"),
        Err(e) => fail("block", e),
    }
}

/// Runs `baton blocks`: one JSON line per block, replaying from `--from` and following.
pub fn run_blocks(a: BlocksArgs) -> ExitCode {
    let rt = runtime();
    let client = match connect(&rt, &a.target) {
        Ok(c) => c,
        Err(e) => return fail("blocks", e),
    };
    let mut stream = client.subscribe_blocks(a.rollup, a.from);
    let mut n = 0;
    while a.count.is_none_or(|c| n < c) {
        match rt.block_on(stream.next()) {
            Ok(event) => {
                use std::io::Write;
                println!("{}", block_json(&event.block));
                let _ = std::io::stdout().flush();
                n += 1;
            }
            Err(e) => return fail("blocks", e),
        }
    }
    ExitCode::SUCCESS
}

/// Registers `ids` with `policy` through the cluster at `endpoints` (an id already registered
/// is fine) and waits until every node has applied the registrations.
pub async fn register_rollups(
    endpoints: &[SocketAddr],
    ca: &Path,
    ids: &[u64],
    policy: RollupPolicy,
) -> Result<(), String> {
    let client =
        Client::new(ClientOptions::new(endpoints.to_vec(), ca)).map_err(|e| e.to_string())?;
    let mut last = 0;
    for &id in ids {
        match client.register_rollup(id, policy).await {
            Ok(r) => last = last.max(r.index),
            Err(ClientError::NotSequenced(SubmitError::Command(
                baton_core::command::CommandRejection::RollupExists { .. },
            ))) => {}
            Err(e) => return Err(format!("registering rollup {id}: {e}")),
        }
    }
    for e in endpoints {
        let node = Client::new(ClientOptions::new(vec![*e], ca)).map_err(|e| e.to_string())?;
        node.read(
            Query::Rollups,
            Consistency::MinIndex(last),
            Duration::from_secs(10),
        )
        .await
        .map_err(|err| format!("node {e} did not apply the registrations: {err}"))?;
    }
    Ok(())
}
