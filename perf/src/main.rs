//! `baton-perf`: drive a baton cluster over QUIC and report what it sustains.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use baton_perf::gen::{parse_rollups, TxShape};
use baton_perf::load::{self, Cluster, Progress};
use baton_perf::report::{AckLevel, RunConfig, Spread};
use baton_perf::sweep::{self, SweepConfig};
use clap::{Args, Parser, Subcommand};

/// baton-perf: the load generator of baton.
#[derive(Parser)]
#[command(name = "baton-perf", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One run: closed loop (default) or open loop (`--rate`).
    Run(RunArgs),
    /// Step the offered load (open loop) up until p99 or errors blow up; report the peak.
    Sweep(SweepArgs),
    /// Render SVG charts of result files.
    Plot(PlotArgs),
}

/// Where the cluster is.
#[derive(Args, Clone)]
struct Target {
    /// A local cluster's directory (from `baton cluster up`): endpoints, CA and node pids.
    #[arg(long, conflicts_with_all = ["endpoints", "ca"])]
    cluster: Option<PathBuf>,
    /// Node addresses (`host:port`, comma-separated).
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<SocketAddr>,
    /// The cluster CA certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
}

impl Target {
    fn cluster(&self) -> Result<Cluster, String> {
        match &self.cluster {
            Some(dir) => Cluster::from_dir(dir),
            None => {
                let ca = self.ca.clone().ok_or("--ca (or --cluster) is required")?;
                if self.endpoints.is_empty() {
                    return Err("--endpoints (or --cluster) is required".into());
                }
                Ok(Cluster::remote(self.endpoints.clone(), ca))
            }
        }
    }
}

/// The load of a run.
#[derive(Args, Clone)]
struct LoadArgs {
    #[command(flatten)]
    target: Target,
    /// Client connections (one QUIC connection each).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Closed loop: requests in flight per connection.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Open loop: bound on requests in flight over all connections.
    #[arg(long, default_value_t = 4096)]
    outstanding_max: usize,
    /// Transactions per request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Bytes per transaction.
    #[arg(long, default_value_t = 128)]
    tx_bytes: usize,
    /// Rollup mix: `ID[:WEIGHT],...`.
    #[arg(long, default_value = "1")]
    rollups: String,
    /// Percentage of encrypted transactions (ChaCha20-Poly1305 ciphertext, key commitment).
    #[arg(long, default_value_t = 0)]
    encrypted_pct: u8,
    /// Receipt level to wait for.
    #[arg(long, value_enum, default_value_t = AckLevel::Committed)]
    ack: AckLevel,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Which nodes get the load.
    #[arg(long, value_enum, default_value_t = Spread::All)]
    spread: Spread,
    /// Client runtime threads (1: one current-thread runtime).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

impl LoadArgs {
    fn config(&self, rate: Option<f64>) -> Result<RunConfig, String> {
        let config = RunConfig {
            connections: self.connections.max(1),
            in_flight: self.in_flight.max(1),
            rate_tx_per_s: rate,
            outstanding_max: self.outstanding_max.max(1),
            batch: self.batch.max(1),
            tx: TxShape {
                tx_bytes: self.tx_bytes,
                rollups: parse_rollups(&self.rollups)?,
                encrypted_pct: self.encrypted_pct,
            },
            ack: self.ack,
            warmup_s: self.warmup_s,
            duration_s: self.duration_s,
            spread: self.spread,
            client_threads: self.client_threads.max(1),
        };
        config.validate()?;
        Ok(config)
    }

    fn progress(&self) -> Progress {
        if self.quiet {
            Progress::Quiet
        } else {
            Progress::Line
        }
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Open loop at this offered rate, tx/s (closed loop when absent).
    #[arg(long)]
    rate: Option<f64>,
    /// Write the JSON result here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the Markdown summary here (it is printed either way).
    #[arg(long)]
    markdown: Option<PathBuf>,
}

#[derive(Args)]
struct SweepArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Offered rate of the first step, tx/s.
    #[arg(long, default_value_t = 20_000.0)]
    start_rate: f64,
    /// Each step offers this many times the previous one.
    #[arg(long, default_value_t = 1.25)]
    factor: f64,
    /// At most this many steps.
    #[arg(long, default_value_t = 20)]
    steps_max: usize,
    /// A step holds while its p99 is at most this, ms.
    #[arg(long, default_value_t = 5.0)]
    p99_max_ms: f64,
    /// A step holds while at most this share of transactions failed.
    #[arg(long, default_value_t = 0.0)]
    error_ratio_max: f64,
    /// A step holds while the cluster answered at least this share of the offer.
    #[arg(long, default_value_t = 0.95)]
    achieved_min_ratio: f64,
    /// Write the JSON result here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct PlotArgs {
    /// Result files of `run` or `sweep`.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Directory for the SVG files.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build().expect("tokio runtime")
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn run(args: RunArgs) -> Result<bool, String> {
    let config = args.load.config(args.rate)?;
    let cluster = args.load.target.cluster()?;
    let result = runtime(config.client_threads).block_on(load::run(
        &config,
        &cluster,
        args.load.progress(),
    ))?;
    let md = result.markdown();
    println!("{md}");
    if let Some(p) = &args.out {
        write(
            p,
            &serde_json::to_string_pretty(&result).expect("serializable"),
        )?;
        eprintln!("result: {}", p.display());
    }
    if let Some(p) = &args.markdown {
        write(p, &md)?;
    }
    Ok(result.errors.tx == 0 && result.throughput.tx > 0)
}

fn sweep(args: SweepArgs) -> Result<bool, String> {
    let base = args.load.config(Some(args.start_rate))?;
    let cluster = args.load.target.cluster()?;
    let cfg = SweepConfig {
        start_tx_per_s: args.start_rate,
        factor: args.factor,
        steps_max: args.steps_max.max(1),
        p99_max_ms: args.p99_max_ms,
        error_ratio_max: args.error_ratio_max,
        achieved_min_ratio: args.achieved_min_ratio,
    };
    let result = runtime(base.client_threads).block_on(sweep::sweep(
        &cfg,
        &base,
        &cluster,
        args.load.progress(),
    ))?;
    println!("| offered tx/s | achieved tx/s | p50 ms | p99 ms | p99.9 ms | errors | holds |");
    println!("|---|---|---|---|---|---|---|");
    for s in &result.steps {
        println!(
            "| {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.4} | {} |",
            s.offered_tx_per_s,
            s.achieved_tx_per_s,
            s.p50_ms,
            s.p99_ms,
            s.p99_9_ms,
            s.error_ratio,
            s.reason.as_deref().unwrap_or("yes")
        );
    }
    match result.sustainable_peak_tx_per_s {
        Some(p) => println!(
            "\nsustainable peak: {p:.0} tx/s (p99 ≤ {} ms); stopped: {}",
            cfg.p99_max_ms, result.stopped
        ),
        None => println!("\nno step held; stopped: {}", result.stopped),
    }
    if let Some(p) = &args.out {
        write(
            p,
            &serde_json::to_string_pretty(&result).expect("serializable"),
        )?;
        eprintln!("result: {}", p.display());
    }
    Ok(result.sustainable_peak_tx_per_s.is_some())
}

fn plot(args: PlotArgs) -> Result<bool, String> {
    for f in &args.files {
        for written in baton_perf::plot::plot_file(f, &args.out_dir)? {
            println!("{}", written.display());
        }
    }
    Ok(true)
}

fn main() -> ExitCode {
    // No transparent huge pages for the load generator either (baton_core::memory).
    let _ = baton_core::memory::set_transparent_huge_pages(false);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let outcome = match Cli::parse().command {
        Command::Run(a) => run(a),
        Command::Sweep(a) => sweep(a),
        Command::Plot(a) => plot(a),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("baton-perf: {e}");
            ExitCode::from(2)
        }
    }
}
