//! The `baton` command.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod certs_cmd;
mod client_cmd;
mod demo_cmd;
mod keys_cmd;
mod member_cmd;
mod node_cmd;
mod node_config;
mod rollup_cmd;
mod wal_cmd;

use clap::{Parser, Subcommand};

/// baton: a distributed transaction sequencer.
#[derive(Parser)]
#[command(name = "baton", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect and exercise write-ahead logs.
    Wal {
        #[command(subcommand)]
        command: wal_cmd::WalCommand,
    },
    /// Generate a cluster CA and node and client certificates.
    Certs(certs_cmd::CertsArgs),
    /// Run one node from its configuration file until SIGTERM/SIGINT.
    Node(node_cmd::NodeArgs),
    /// Local clusters.
    Cluster {
        #[command(subcommand)]
        command: node_cmd::ClusterCommand,
    },
    /// Submit transactions to a cluster.
    Submit(client_cmd::SubmitArgs),
    /// Show the status of a cluster's nodes.
    Status(client_cmd::StatusArgs),
    /// Make a node's secp256k1 signing key.
    Keygen(keys_cmd::KeygenArgs),
    /// Check a receipt offline: Merkle path and leader signature.
    Verify(keys_cmd::VerifyArgs),
    /// Start a local 3-node cluster, put it under load for 10 s, print the results, clean up.
    Demo(demo_cmd::DemoArgs),
    /// Cluster administration (rollup registration).
    Admin {
        #[command(subcommand)]
        command: rollup_cmd::AdminCommand,
    },
    /// Reveal an encrypted transaction's key; every node records its plaintext.
    Reveal(rollup_cmd::RevealArgs),
    /// Read a transaction's status: position, block, receipt, reveal.
    Tx(rollup_cmd::TxArgs),
    /// Read a rollup's block: signed header, metadata, transactions.
    Block(rollup_cmd::BlockArgs),
    /// Stream a rollup's blocks (history, then live), one JSON line each.
    Blocks(rollup_cmd::BlocksArgs),
}

/// The log filter when `RUST_LOG` is unset or invalid. openraft warns of every heartbeat not
/// answered within the heartbeat interval, which on a saturated machine is most of them (about
/// 1,600 lines a minute at 2x overload on the development VM) while appends keep the followers
/// current; a follower that is really gone shows in the replication errors and `baton status`.
const DEFAULT_LOG_FILTER: &str = "warn,openraft::core::heartbeat=error";

fn main() -> std::process::ExitCode {
    // Before the allocator maps much: no transparent huge pages unless a node's configuration
    // asks for them (baton_core::memory explains why). Best effort: an old kernel without the
    // flag leaves the system's setting.
    let _ = baton_core::memory::set_transparent_huge_pages(false);
    let cli = Cli::parse();
    // Like other command-line tools, a command that prints results ends quietly when the reader
    // of its output goes away (`baton status | head`): Rust ignores SIGPIPE, so printing would
    // panic instead. Long-running servers (`node`, `cluster up`) keep ignoring it: a log reader
    // that goes away must not kill a node.
    if !matches!(cli.command, Command::Node(_) | Command::Cluster { .. }) {
        // SAFETY: restoring the default disposition of one signal before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: node logs are files (`cluster up`, systemd's journal).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Wal { command } => wal_cmd::run(command),
        Command::Certs(args) => certs_cmd::run(args),
        Command::Node(args) => node_cmd::run_node(args),
        Command::Cluster { command } => node_cmd::run_cluster(command),
        Command::Submit(args) => client_cmd::run_submit(args),
        Command::Status(args) => client_cmd::run_status(args),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Keygen(args) => keys_cmd::run_keygen(args),
        Command::Verify(args) => keys_cmd::run_verify(args),
        Command::Admin { command } => rollup_cmd::run_admin(command),
        Command::Reveal(args) => rollup_cmd::run_reveal(args),
        Command::Tx(args) => rollup_cmd::run_tx(args),
        Command::Block(args) => rollup_cmd::run_block(args),
        Command::Blocks(args) => rollup_cmd::run_blocks(args),
    }
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks over every subcommand (a flag name used twice in one
    /// command, a `requires` naming no argument…), which otherwise only panic when that
    /// subcommand runs.
    #[test]
    fn every_command_line_definition_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
