//! `baton admin member add|remove|list`: change and show the cluster's membership through the
//! leader; `baton admin leader transfer`: move leadership to another voter. Changes need a
//! client certificate from the cluster CA (`--cluster DIR` presents the cluster's; else
//! `--client-cert`/`--client-key`).

use std::process::ExitCode;
use std::time::Duration;

use baton_core::node::{LeaderTransferred, Member, MemberChange, MembershipChanged};
use baton_net::member_msg::CATCH_UP_MS_MAX;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client_cmd::{runtime, Target};
use crate::rollup_cmd::{connect, fail};

/// `baton admin member`
#[derive(Subcommand)]
pub enum MemberCommand {
    /// Add a node. It must already run (`bootstrap = false` in its node.toml) with a
    /// certificate from the cluster CA (`baton certs --add-node`). It joins as a learner, the
    /// leader brings it up to date, then it becomes a voter.
    Add(AddArgs),
    /// Remove a node (voter or learner). A removed leader hands leadership to another voter.
    Remove(RemoveArgs),
    /// List the members, as the first node that answers sees them.
    List(ListArgs),
}

/// `baton admin member add`
#[derive(Args)]
pub struct AddArgs {
    #[command(flatten)]
    target: Target,
    /// The new node's id (its `node_id`).
    #[arg(long)]
    id: u64,
    /// Where the other nodes reach it (its `listen_addr` as they see it), `host:port`.
    #[arg(long)]
    addr: String,
    /// Keep it a learner: it replicates and serves reads but does not vote.
    #[arg(long)]
    learner: bool,
    /// How long the new node may take to catch up with the leader's log before the addition is
    /// given up (it then stays a learner; run the command again to resume).
    #[arg(long, default_value_t = 120)]
    catch_up_s: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `baton admin member remove`
#[derive(Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    target: Target,
    /// The node's id.
    #[arg(long)]
    id: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `baton admin member list`
#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    target: Target,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `baton admin leader`
#[derive(Subcommand)]
pub enum LeaderCommand {
    /// Move leadership to another voter, and wait until it leads (at most twice the longest
    /// election timeout). Without `--to`, the voter whose log matches the leader's furthest.
    Transfer(TransferArgs),
}

/// `baton admin leader transfer`
#[derive(Args)]
pub struct TransferArgs {
    #[command(flatten)]
    target: Target,
    /// The voter to lead (its node id).
    #[arg(long)]
    to: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `baton admin leader`: exit 0 when another node leads (or the named one already did),
/// 1 when refused or unreachable.
pub fn run_leader(command: LeaderCommand) -> ExitCode {
    let LeaderCommand::Transfer(a) = command;
    let what = "admin leader transfer";
    let rt = runtime();
    let client = match connect(&rt, &a.target) {
        Ok(c) => c,
        Err(e) => return fail(what, e),
    };
    match rt.block_on(client.transfer_leader(a.to)) {
        Ok(LeaderTransferred { from, leader, term }) => {
            if a.json {
                println!(
                    "{}",
                    json!({ "from": from, "leader": leader, "term": term })
                );
            } else if from == leader {
                println!("node {leader} leads already (term {term}); nothing changed");
            } else {
                println!("leadership moved from node {from} to node {leader} (term {term})");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(what, e),
    }
}

/// Runs `baton admin member`: exit 0 when done, 1 when refused or unreachable, 2 on bad
/// arguments.
pub fn run(command: MemberCommand) -> ExitCode {
    match command {
        MemberCommand::Add(a) => {
            if a.catch_up_s.saturating_mul(1000) > CATCH_UP_MS_MAX {
                eprintln!(
                    "baton admin member add: --catch-up-s must be at most {}",
                    CATCH_UP_MS_MAX / 1000
                );
                return ExitCode::from(2);
            }
            let change = MemberChange::Add {
                id: a.id,
                addr: a.addr.clone(),
                voter: !a.learner,
            };
            let done = format!("node {} added as a {}", a.id, role_name(!a.learner));
            run_change(
                "admin member add",
                &a.target,
                change,
                Duration::from_secs(a.catch_up_s),
                a.json,
                &done,
            )
        }
        MemberCommand::Remove(a) => run_change(
            "admin member remove",
            &a.target,
            MemberChange::Remove { id: a.id },
            Duration::ZERO,
            a.json,
            &format!("node {} removed", a.id),
        ),
        MemberCommand::List(a) => list(a),
    }
}

fn role_name(voter: bool) -> &'static str {
    if voter {
        "voter"
    } else {
        "learner"
    }
}

fn members_json(members: &[Member]) -> Value {
    Value::Array(
        members
            .iter()
            .map(|m| json!({ "id": m.id, "addr": m.addr, "voter": m.voter }))
            .collect(),
    )
}

fn print_members(members: &[Member]) {
    for m in members {
        println!("  node {:<4} {:<8} {}", m.id, role_name(m.voter), m.addr);
    }
}

fn run_change(
    what: &str,
    target: &Target,
    change: MemberChange,
    catch_up: Duration,
    as_json: bool,
    done: &str,
) -> ExitCode {
    let rt = runtime();
    let client = match connect(&rt, target) {
        Ok(c) => c,
        Err(e) => return fail(what, e),
    };
    match rt.block_on(client.change_members(change, catch_up)) {
        Ok(MembershipChanged { index, members }) => {
            if as_json {
                println!(
                    "{}",
                    json!({ "index": index, "members": members_json(&members) })
                );
            } else {
                if index == 0 {
                    println!("{done} (already so; nothing changed)");
                } else {
                    println!("{done} at log index {index}; members:");
                }
                print_members(&members);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(what, e),
    }
}

fn list(a: ListArgs) -> ExitCode {
    let rt = runtime();
    let client = match connect(&rt, &a.target) {
        Ok(c) => c,
        Err(e) => return fail("admin member list", e),
    };
    match rt.block_on(client.status()) {
        Ok(s) => {
            if a.json {
                println!(
                    "{}",
                    json!({ "node": s.id, "leader": s.leader, "members": members_json(&s.members) })
                );
            } else {
                let leader = s.leader.map_or("none".to_string(), |l| l.to_string());
                println!("members as node {} sees them (leader: {leader}):", s.id);
                print_members(&s.members);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail("admin member list", e),
    }
}
