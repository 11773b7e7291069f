//! `baton wal …`: `dump` inspects a log directory without changing it; `bench` measures
//! append + group-commit throughput and latency on a real directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use baton_wal::recovery::{Inspection, ScanEnd};
use baton_wal::{Verdict, Wal, WalOptions};
use clap::Subcommand;
use serde_json::json;

#[derive(Subcommand)]
pub enum WalCommand {
    /// List segments and records and the verdict recovery would reach. Changes nothing.
    /// Exit status: 0 when the log would open (clean or with a torn tail to cut), 2 when
    /// recovery would refuse it (corruption before the tail).
    Dump {
        /// The log directory.
        dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Segments and verdict only, no per-record lines.
        #[arg(long)]
        summary: bool,
    },
    /// Append records with group commit for a while and print throughput and latency.
    Bench(BenchArgs),
}

/// Options of `baton wal bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Directory for the log (default: a fresh temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 4096)]
    record_bytes: usize,
    /// Records appended before waiting for durability (concurrent writers).
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds of `in_flight` records outstanding at once: 1 waits for each round's sync
    /// before appending the next (closed loop); 2 appends the next round while the previous
    /// one syncs, as a busy log does.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// How rounds are made durable: `dsync` (O_DSYNC writes, the default) or `fdatasync`
    /// (plain writes, then one fdatasync per round).
    #[arg(long, default_value = "dsync")]
    sync: baton_wal::SyncMode,
    /// Purge behind the writer, keeping about this many segments, as a node does after
    /// snapshots: new segments then come from recycled files (steady state). 0 (the
    /// default) never purges: a fresh log, whose new segments are zero-filled spares
    /// written in the background while it runs.
    #[arg(long, default_value_t = 0)]
    keep_segments: u64,
    /// Largest single write of a round, in bytes (the log's `flush_bytes_max`; default: the
    /// log's default).
    #[arg(long)]
    flush_bytes_max: Option<usize>,
    /// Most bytes appended but not yet durable (the log's `pending_bytes_max`; default: the
    /// log's default, raised to `--flush-bytes-max` if that is larger).
    #[arg(long)]
    pending_bytes_max: Option<usize>,
    /// I/O buffer memory of the executor running the log, in bytes (glommio's `io_memory`;
    /// default: what a node gives its WAL shard, 48 MiB). Group-commit buffers come from it
    /// while it has room, else from the heap.
    #[arg(long, default_value_t = baton_wal::IO_MEMORY_BYTES)]
    io_memory_bytes: usize,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: WalCommand) -> ExitCode {
    match cmd {
        WalCommand::Dump { dir, json, summary } => dump(&dir, json, summary),
        WalCommand::Bench(args) => bench(args),
    }
}

fn end_json(end: &ScanEnd) -> serde_json::Value {
    match end {
        ScanEnd::Clean { offset } => json!({"kind": "clean", "offset": offset}),
        ScanEnd::Fault {
            offset,
            fault,
            last_valid_after,
        } => {
            json!({"kind": "fault", "offset": offset, "fault": fault.to_string(), "last_valid_record_after": last_valid_after})
        }
    }
}

fn verdict_text(ins: &Inspection) -> (String, bool) {
    match &ins.verdict {
        Ok(Verdict::Clean) => ("clean".into(), true),
        Ok(Verdict::TornTail { path, offset, fault, discarded_bytes }) => {
            (format!("torn tail: {} will be cut at offset {offset} ({fault}; {discarded_bytes} bytes discarded)", path.display()), true)
        }
        Ok(Verdict::TornSegment { path, fault }) => (format!("torn segment: {} will be removed ({fault})", path.display()), true),
        Err(e) => (format!("CORRUPT, open refuses: {e}"), false),
    }
}

fn dump(dir: &std::path::Path, as_json: bool, summary: bool) -> ExitCode {
    let ins = match baton_wal::inspect(dir) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("baton wal dump: {e}");
            return ExitCode::from(1);
        }
    };
    let (verdict, opens) = verdict_text(&ins);
    // Spare segment files: written ahead or recycled, not part of the log (docs/wal.md).
    let spares = baton_wal::segment::list_spares(dir)
        .map(|(s, _)| s)
        .unwrap_or_default();
    if as_json {
        let segments: Vec<_> = ins
            .segments
            .iter()
            .map(|s| {
                let records: Vec<_> = if summary {
                    Vec::new()
                } else {
                    s.records.iter().map(|r| json!({"index": r.header.index, "term": r.header.term, "offset": r.offset, "len": r.header.payload_len, "crc": format!("{:#010x}", r.header.crc), "crc_ok": true})).collect()
                };
                json!({
                    "path": s.path,
                    "first_index": s.name_index,
                    "header": s.header.map(|h| json!({"first_index": h.first_index, "segment_bytes": h.segment_bytes, "torn_window_bytes": h.torn_window_bytes})).map_err(|f| f.to_string()),
                    "record_count": s.records.len(),
                    "last_index": s.records.last().map(|r| r.header.index),
                    "end": end_json(&s.end),
                    "records": records,
                })
            })
            .collect();
        let spares: Vec<_> = spares
            .iter()
            .map(|(seq, stale_through, path)| json!({"path": path, "seq": seq, "stale_through": stale_through}))
            .collect();
        let out = json!({"dir": dir, "segments": segments, "spares": spares, "verdict": verdict, "opens": opens});
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    } else {
        for s in &ins.segments {
            let last = s
                .records
                .last()
                .map_or("-".to_string(), |r| r.header.index.to_string());
            let header = match &s.header {
                Ok(h) => format!(
                    "segment_bytes={} torn_window={}",
                    h.segment_bytes, h.torn_window_bytes
                ),
                Err(f) => format!("BAD HEADER: {f}"),
            };
            println!(
                "segment {}  first={} last={} records={}  {header}",
                s.path.display(),
                s.name_index,
                last,
                s.records.len()
            );
            if !summary {
                println!(
                    "  {:>12} {:>8} {:>10} {:>8} {:>10}  crc",
                    "index", "term", "offset", "len", "crc32"
                );
                for r in &s.records {
                    println!(
                        "  {:>12} {:>8} {:>10} {:>8} {:#010x}  ok",
                        r.header.index, r.header.term, r.offset, r.header.payload_len, r.header.crc
                    );
                }
            }
            match &s.end {
                ScanEnd::Clean { offset } => println!("  end: clean at offset {offset}"),
                ScanEnd::Fault {
                    offset,
                    fault,
                    last_valid_after,
                } => {
                    println!("  end: FAULT at offset {offset}: {fault}; last valid record after it: {last_valid_after:?}")
                }
            }
        }
        for (seq, stale_through, path) in &spares {
            let holds = match stale_through {
                0 => "zero-filled".to_string(),
                n => format!("recycled, old records up to index {n}"),
            };
            println!("spare {}  seq={seq}  {holds}", path.display());
        }
        println!("verdict: {verdict}");
    }
    if opens {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn bench(args: BenchArgs) -> ExitCode {
    let BenchArgs {
        dir,
        record_bytes,
        in_flight,
        seconds,
        depth,
        sync,
        keep_segments,
        flush_bytes_max,
        pending_bytes_max,
        io_memory_bytes,
        json: as_json,
    } = args;
    let tmp;
    let dir = match dir {
        Some(d) => d,
        None => {
            tmp = match tempfile::Builder::new()
                .prefix("baton-wal-bench")
                .tempdir_in(".")
            {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("baton wal bench: temporary directory: {e}");
                    return ExitCode::from(1);
                }
            };
            tmp.path().to_path_buf()
        }
    };
    let defaults = WalOptions::default();
    let flush_bytes_max = flush_bytes_max.unwrap_or(defaults.flush_bytes_max);
    let opts = WalOptions {
        sync,
        flush_bytes_max,
        pending_bytes_max: pending_bytes_max
            .unwrap_or(defaults.pending_bytes_max.max(flush_bytes_max)),
        ..defaults
    };
    if let Err(e) = opts.validate() {
        eprintln!("baton wal bench: {e}");
        return ExitCode::from(1);
    }
    if let Err(e) = baton_wal::check_io_memory(io_memory_bytes) {
        eprintln!("baton wal bench: --io-memory-bytes {io_memory_bytes}: {e}");
        return ExitCode::from(1);
    }
    if record_bytes == 0 || record_bytes > opts.payload_bytes_max || in_flight == 0 || depth == 0 {
        eprintln!(
            "baton wal bench: --record-bytes must be 1..={}, --in-flight and --depth at least 1",
            opts.payload_bytes_max
        );
        return ExitCode::from(1);
    }
    let ex = match glommio::LocalExecutorBuilder::default()
        .name("wal-bench")
        .io_memory(io_memory_bytes)
        .make()
    {
        Ok(ex) => ex,
        Err(e) => {
            eprintln!("baton wal bench: glommio executor: {e} (needs >= 512 KiB of locked memory: ulimit -l)");
            return ExitCode::from(1);
        }
    };
    let result = ex.run(async move {
        let segment_bytes = opts.segment_bytes;
        let (wal, _) = Wal::open(&dir, opts).await?;
        // Start from the steady state of an idle log: its spare written.
        wal.spares_settled().await;
        let per_segment =
            (segment_bytes / baton_wal::record::record_bytes(record_bytes) as u64).max(1);
        let payload = vec![0xabu8; record_bytes];
        let mut latencies = Vec::new();
        let mut index = wal.last_index().unwrap_or(0) + 1;
        let start_stats = wal.stats();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(seconds);
        // Bounded by time. Each round appends `in_flight` records; before the next round starts,
        // the round `depth - 1` rounds back must be durable.
        let mut rounds: std::collections::VecDeque<(u64, Instant)> =
            std::collections::VecDeque::new();
        while Instant::now() < deadline {
            let round = Instant::now();
            for _ in 0..in_flight {
                wal.append(index, 1, &payload).await?;
                index += 1;
            }
            rounds.push_back((index - 1, round));
            while rounds.len() >= depth {
                let (last, started) = rounds.pop_front().expect("non-empty");
                wal.durable(last).await?;
                latencies.extend(std::iter::repeat_n(started.elapsed(), in_flight));
                let first = wal.first_index().unwrap_or(0);
                if keep_segments > 0 && last >= first + (keep_segments + 1) * per_segment {
                    wal.purge_through(last - keep_segments * per_segment)
                        .await?;
                }
            }
        }
        while let Some((last, started)) = rounds.pop_front() {
            wal.durable(last).await?;
            latencies.extend(std::iter::repeat_n(started.elapsed(), in_flight));
        }
        let secs = start.elapsed().as_secs_f64();
        let s = wal.stats();
        Ok::<_, baton_wal::WalError>((
            secs,
            s.appends - start_stats.appends,
            s.syncs - start_stats.syncs,
            latencies,
            (
                s.segments_created - start_stats.segments_created,
                s.spares_written - start_stats.spares_written,
                s.spares_recycled - start_stats.spares_recycled,
                s.writes - start_stats.writes,
            ),
        ))
    });
    match result {
        Ok((secs, appends, syncs, mut lat, (segments, zeroed, recycled, writes))) => {
            lat.sort();
            let mb = appends as f64 * record_bytes as f64 / secs / (1 << 20) as f64;
            if as_json {
                let us = |d: Duration| d.as_secs_f64() * 1e6;
                let out = json!({
                    "record_bytes": record_bytes, "in_flight": in_flight, "depth": depth, "seconds": secs,
                    "bytes_per_sync": appends as f64 * record_bytes as f64 / syncs.max(1) as f64,
                    "records_per_s": appends as f64 / secs, "bytes_per_s": appends as f64 * record_bytes as f64 / secs,
                    "sync": format!("{sync:?}").to_lowercase(), "syncs": syncs, "records_per_sync": appends as f64 / syncs.max(1) as f64,
                    "latency_us": {"p50": us(percentile(&lat, 0.5)), "p99": us(percentile(&lat, 0.99)), "max": us(percentile(&lat, 1.0))},
                    "keep_segments": keep_segments, "segments_created": segments, "spares_zero_filled": zeroed, "spares_recycled": recycled,
                    "writes": writes, "flush_bytes_max": flush_bytes_max,
                });
                println!("{out}");
                return ExitCode::SUCCESS;
            }
            println!(
                "baton wal bench: {record_bytes}-byte records, {in_flight} per round, depth {depth}, sync {sync:?}, {secs:.1} s"
            );
            println!("  records/s        {:>12.0}", appends as f64 / secs);
            println!("  MiB/s            {mb:>12.1}");
            println!(
                "  durable rounds   {syncs:>12}  ({:.1} records per round, {writes} writes)",
                appends as f64 / syncs.max(1) as f64
            );
            println!(
                "  segments         {segments:>12}  ({zeroed} zero-filled spares written, {recycled} purged segments recycled)"
            );
            println!(
                "  append→durable   p50 {:?}  p99 {:?}  max {:?}",
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                percentile(&lat, 1.0)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("baton wal bench: {e}");
            ExitCode::from(1)
        }
    }
}
