//! `NodeConfig`: every knob of a node, with units in the names and documented defaults.

use std::path::PathBuf;
use std::time::Duration;

use baton_wal::WalOptions;

use crate::batcher::BatchPolicy;
use crate::sign::Signer;

/// Raft timings and log compaction.
#[derive(Clone, Debug)]
pub struct RaftTimings {
    /// Leader heartbeat period. Default 50 ms.
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the randomized election timeout. Default 200 ms.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout. Default 400 ms.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last (0: never by count).
    /// Bounds how many entries a restart replays when entries are small. Default 100,000.
    pub snapshot_every_entries: u64,
    /// Build a snapshot once the log applied since the last one holds at least this many
    /// bytes, and at least `snapshot_log_ratio` times the last snapshot's size (whichever
    /// comes first, this or `snapshot_every_entries`). Default 256 MiB.
    pub snapshot_log_bytes_min: u64,
    /// See `snapshot_log_bytes_min`: snapshots then write at most 1/ratio of the log's bytes
    /// (0: the size of the last snapshot does not count). Default 4.
    pub snapshot_log_ratio: u64,
    /// Entries kept in the log behind a snapshot (for lagging followers). Default 1,000.
    pub log_entries_kept_after_snapshot: u64,
}

impl Default for RaftTimings {
    fn default() -> Self {
        RaftTimings {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            snapshot_every_entries: 100_000,
            snapshot_log_bytes_min: 256 << 20,
            snapshot_log_ratio: 4,
            log_entries_kept_after_snapshot: 1_000,
        }
    }
}

/// Configuration of one node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Raft node id (≥ 1).
    pub id: u64,
    /// Directory of the WAL and metadata.
    pub data_dir: PathBuf,
    /// Shards (glommio executors, one thread each). Default: available cores.
    pub shards: usize,
    /// The CPU each shard is pinned to (shard k on `shard_cpus[k]`; one per shard, distinct,
    /// each in the starting thread's affinity mask: [`crate::cpus`]). Default `None`: shards float
    /// (tests and local clusters run many nodes per machine). Bare metal: one core per shard.
    pub shard_cpus: Option<Vec<usize>>,
    /// When shards seal batches.
    pub batch: BatchPolicy,
    /// Seal at once, without lingering, when none of the shard's batches is waiting for its
    /// commit (a lone client gets no linger; under load batches still gather). Default true.
    pub seal_when_idle: bool,
    /// Transaction hashes each shard remembers for deduplication. Default 1,048,576.
    pub dedup_window_txs: usize,
    /// Submissions queued per shard before `submit` waits. Default 1,024.
    pub submit_queue_max: usize,
    /// Sealed batches queued for the Raft shard before shards wait. Default 64.
    pub propose_queue_max: usize,
    /// Batches proposed to Raft and not yet committed. Default 256.
    pub proposals_in_flight_max: usize,
    /// How long a proposed batch may wait for its commit before its submitters get
    /// `CommitTimeout` (outcome unknown). Default 10,000 ms.
    pub commit_wait_ms: u64,
    /// Raft timings.
    pub raft: RaftTimings,
    /// WAL sizes.
    pub wal: WalOptions,
    /// I/O buffer memory of shard 0's executor, which runs the WAL (group-commit buffers come
    /// from it; registered with io_uring where the locked-memory limit allows, then resident from
    /// the start). Default
    /// [`baton_wal::IO_MEMORY_BYTES`] (48 MiB); the other shards keep glommio's 10 MiB.
    pub wal_io_memory_bytes: usize,
    /// The key this node signs batch and block headers with while it leads. Default: a fresh
    /// random key (fine for tests; a real node loads its key file so its address stays the
    /// same across restarts).
    pub signer: Signer,
}

impl NodeConfig {
    /// Defaults for node `id` storing its data in `data_dir`.
    pub fn new(id: u64, data_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            id,
            data_dir: data_dir.into(),
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            shard_cpus: None,
            batch: BatchPolicy::default(),
            seal_when_idle: true,
            dedup_window_txs: 1 << 20,
            submit_queue_max: 1024,
            propose_queue_max: 64,
            proposals_in_flight_max: 256,
            commit_wait_ms: 10_000,
            raft: RaftTimings::default(),
            wal: WalOptions::default(),
            wal_io_memory_bytes: baton_wal::IO_MEMORY_BYTES,
            signer: Signer::random(),
        }
    }

    /// Checks `shard_cpus`: one CPU per shard, distinct, each in the calling thread's mask
    /// ([`crate::cpus`]). The reason says which rule broke.
    pub fn check_shard_cpus(&self) -> Result<(), String> {
        let Some(cpus) = &self.shard_cpus else {
            return Ok(());
        };
        if cpus.len() != self.shards {
            return Err(format!(
                "shard_cpus names {} CPUs for {} shards: one per shard",
                cpus.len(),
                self.shards
            ));
        }
        let allowed = crate::cpus::allowed()
            .map_err(|e| format!("shard_cpus: cannot read this process's CPU mask: {e}"))?;
        crate::cpus::check("shard_cpus", cpus, true, &allowed)
    }

    /// Entries per replication request: as many full batches as fit in
    /// `wire::APPEND_BYTES_MAX`, at least 1, at most 256.
    pub fn payload_entries_max(&self) -> u64 {
        let per_entry = self.batch.batch_bytes_max
            + crate::raft::wire::ENTRY_HEADER_BYTES
            + crate::raft::log_store::ENTRY_PREFIX_BYTES
            + crate::receipt::SIGNED_HEADER_BYTES;
        (crate::raft::wire::APPEND_BYTES_MAX / per_entry).clamp(1, 256) as u64
    }

    /// The openraft configuration these settings make.
    pub fn raft_config(&self) -> Result<openraft::Config, openraft::ConfigError> {
        let t = &self.raft;
        openraft::Config {
            cluster_name: "baton".into(),
            heartbeat_interval: t.heartbeat_interval_ms,
            election_timeout_min: t.election_timeout_min_ms,
            election_timeout_max: t.election_timeout_max_ms,
            // The size rule (`snapshot_log_bytes_min`) is the node's own: the state machine
            // asks for those snapshots through `Raft::trigger`.
            snapshot_policy: match t.snapshot_every_entries {
                0 => openraft::SnapshotPolicy::Never,
                n => openraft::SnapshotPolicy::LogsSinceLast(n),
            },
            max_in_snapshot_log_to_keep: t.log_entries_kept_after_snapshot,
            install_snapshot_timeout: Duration::from_secs(10).as_millis() as u64,
            // Replication requests stay below the wire limit even when every batch is full.
            max_payload_entries: self.payload_entries_max(),
            ..Default::default()
        }
        .validate()
    }
}
