//! `baton certs`: make a cluster CA plus node and client certificates for a test or small
//! cluster, or (`--add-node`) one more node certificate from the CA already made. Never
//! overwrites existing files.

use std::path::PathBuf;
use std::process::ExitCode;

use baton_net::tls::{self, CertOptions};
use clap::Args;

/// Options of `baton certs`.
#[derive(Args)]
pub struct CertsArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Node certificates to make, for ids 1..=N.
    #[arg(
        long,
        required_unless_present = "add_node",
        conflicts_with = "add_node"
    )]
    nodes: Option<u64>,
    /// Instead: make a certificate for this one node id with the CA already in `--out` (for a
    /// node that joins a running cluster; `--cluster-id` must be the CA's).
    #[arg(long, value_name = "ID")]
    add_node: Option<u64>,
    /// Cluster name, in the CA's common name.
    #[arg(long, default_value = "baton-local")]
    cluster_id: String,
    /// Extra subject alternative name for every node (IP address or DNS name); repeatable.
    /// 127.0.0.1, ::1 and localhost are always included.
    #[arg(long = "san", value_name = "HOST")]
    sans: Vec<String>,
    /// Validity in days, starting now.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

/// Generates the certificates and prints one line per file written.
pub fn run(args: CertsArgs) -> ExitCode {
    let mut opts = CertOptions::new(args.cluster_id, args.nodes.unwrap_or(1));
    opts.extra_sans = args.sans;
    opts.validity_days = args.days;
    if let Some(id) = args.add_node {
        return match tls::issue_node(&args.out, id, &opts) {
            Ok((cert, key)) => {
                println!("wrote {}", cert.display());
                println!("wrote {}", key.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("baton certs: {err}");
                ExitCode::from(1)
            }
        };
    }
    match tls::generate(&args.out, &opts) {
        Ok(files) => {
            for path in files.paths() {
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("baton certs: {err}");
            ExitCode::from(1)
        }
    }
}
