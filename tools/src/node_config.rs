//! `node.toml`: the configuration file of `baton node`. Every key has a unit in its name where it
//! has one, and a documented default (docs/operations.md lists them all).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use baton_core::node::{NodeConfig, RaftTimings};
use baton_net::{NetNodeConfig, TlsPaths};
use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// Raft node id (≥ 1). Required.
    pub node_id: u64,
    /// Cluster id peers must share. Default "baton-local".
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// UDP address for clients and peers. Required.
    pub listen_addr: SocketAddr,
    /// WAL and snapshot directory. Required (relative paths are relative to the file).
    pub data_dir: PathBuf,
    /// Glommio shards. Default: as many as `shard_cpus` names, else available cores.
    #[serde(default)]
    pub shards: Option<usize>,
    /// Pin shard k to CPU k. Default false. `shard_cpus` names the CPUs instead.
    #[serde(default)]
    pub pin_shards: bool,
    /// The CPU of each shard (shard k on the k-th; distinct, one per shard). Default: none,
    /// shards not pinned (or CPU k with `pin_shards`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_cpus: Option<Vec<usize>>,
    /// CPUs the QUIC runtime's threads are pinned to (they share the set). Default: none, not
    /// pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_cpus: Option<Vec<usize>>,
    /// Let all of this node's memory use transparent huge pages. Default false: the
    /// allocator's huge pages, faulted in (2 MiB cleared at a time) as memory is allocated,
    /// returned and taken again under load, made nodes stall for up to seconds
    /// (`baton_core::memory`).
    #[serde(default)]
    pub transparent_huge_pages: bool,
    /// Let the memory a node allocates and writes while it starts (its idempotency index, each
    /// shard's dedup window, I/O buffers: ~400 MiB of random-access tables) use transparent huge
    /// pages, and none it allocates later. Default true: fewer TLB misses on every lookup, no
    /// huge page faults at run time (`baton_core::memory`).
    #[serde(default = "yes")]
    pub huge_pages_at_start: bool,
    /// Threads of the QUIC runtime. Default 1.
    #[serde(default = "one")]
    pub net_threads: usize,
    /// Initialize a fresh cluster with `peers` on start (harmless once it has state).
    /// Default false.
    #[serde(default)]
    pub bootstrap: bool,
    /// This node's secp256k1 signing key (`baton keygen`), which signs batch and block headers
    /// while it leads. Default: none, and the node makes a fresh key each start (its address
    /// then changes on every restart, so receipts cannot name a stable signer; set it for any
    /// real deployment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_file: Option<PathBuf>,
    /// TCP address (`host:port`) to serve Prometheus metrics on, `GET /metrics`. Default:
    /// none, no metrics endpoint. It has no authentication: a loopback or management address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
    /// TLS files. Required.
    pub tls: TlsFile,
    /// The cluster's first members, this node included: the initial membership with
    /// `bootstrap = true` (required then). A node that joins a running cluster (`bootstrap =
    /// false`, added with `baton admin member add`) needs none: the membership comes from the
    /// leader's log.
    #[serde(default)]
    pub peers: Vec<PeerFile>,
    /// Raft timings.
    #[serde(default)]
    pub raft: RaftFile,
    /// Batching.
    #[serde(default)]
    pub batch: BatchFile,
    /// Submission queues and limits.
    #[serde(default)]
    pub limits: LimitsFile,
    /// The write-ahead log.
    #[serde(default)]
    pub wal: WalFile,
}

/// `[wal]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalFile {
    /// Size of each segment file. Default 67,108,864 (64 MiB).
    pub segment_bytes: u64,
    /// Spare segment files kept written ahead (zero-filled, or recycled after purges), so log
    /// writes overwrite allocated blocks. 0 turns them off. Default 2.
    pub spare_segments: usize,
    /// Largest single write of the group commit. Default 8,388,608 (8 MiB).
    pub flush_bytes_max: usize,
    /// Most bytes appended and not yet durable before appends wait. Default 33,554,432 (32 MiB).
    pub pending_bytes_max: usize,
    /// How rounds are made durable: "dsync" (O_DSYNC writes) or "fdatasync". Default "dsync".
    pub sync: String,
    /// I/O buffer memory of the shard that runs the log (shard 0), where group-commit buffers
    /// come from; resident from the start where it can be registered with io_uring (root, or a
    /// locked-memory limit of about three times it). Default 50,331,648 (48 MiB).
    pub io_memory_bytes: usize,
}

impl Default for WalFile {
    fn default() -> Self {
        let w = baton_wal::WalOptions::default();
        WalFile {
            segment_bytes: w.segment_bytes,
            spare_segments: w.spare_segments,
            flush_bytes_max: w.flush_bytes_max,
            pending_bytes_max: w.pending_bytes_max,
            sync: "dsync".into(),
            io_memory_bytes: baton_wal::IO_MEMORY_BYTES,
        }
    }
}

impl WalFile {
    /// The log's options, or why they cannot work.
    pub fn options(&self) -> Result<baton_wal::WalOptions, String> {
        let opts = baton_wal::WalOptions {
            segment_bytes: self.segment_bytes,
            spare_segments: self.spare_segments,
            flush_bytes_max: self.flush_bytes_max,
            pending_bytes_max: self.pending_bytes_max,
            sync: self.sync.parse()?,
            ..baton_wal::WalOptions::default()
        };
        opts.validate().map_err(|e| e.to_string())?;
        Ok(opts)
    }

    /// Checks `io_memory_bytes` against `baton_wal`'s bounds.
    pub fn check_io_memory(&self) -> Result<(), String> {
        baton_wal::check_io_memory(self.io_memory_bytes).map_err(|e| e.to_string())
    }
}

/// `[tls]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// Cluster CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// This node's certificate (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

/// `[[peers]]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    /// Node id.
    pub id: u64,
    /// Its `host:port`.
    pub addr: String,
}

/// `[raft]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftFile {
    /// Default 50.
    pub heartbeat_interval_ms: u64,
    /// Default 200.
    pub election_timeout_min_ms: u64,
    /// Default 400.
    pub election_timeout_max_ms: u64,
    /// Default 100,000 (0: never by count).
    pub snapshot_every_entries: u64,
    /// Default 268,435,456 (256 MiB).
    pub snapshot_log_bytes_min: u64,
    /// Default 4.
    pub snapshot_log_ratio: u64,
    /// Default 1,000.
    pub log_entries_kept_after_snapshot: u64,
}

impl Default for RaftFile {
    fn default() -> Self {
        let t = RaftTimings::default();
        RaftFile {
            heartbeat_interval_ms: t.heartbeat_interval_ms,
            election_timeout_min_ms: t.election_timeout_min_ms,
            election_timeout_max_ms: t.election_timeout_max_ms,
            snapshot_every_entries: t.snapshot_every_entries,
            snapshot_log_bytes_min: t.snapshot_log_bytes_min,
            snapshot_log_ratio: t.snapshot_log_ratio,
            log_entries_kept_after_snapshot: t.log_entries_kept_after_snapshot,
        }
    }
}

/// `[batch]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchFile {
    /// Largest encoded batch. Default 1 MiB.
    pub batch_bytes_max: usize,
    /// Most transactions per batch.
    pub batch_txs_max: usize,
    /// Seal a batch once its oldest transaction waited this long.
    pub linger_us: u64,
    /// Seal at once when none of the shard's batches awaits its commit. Default true.
    pub seal_when_idle: bool,
}

impl Default for BatchFile {
    fn default() -> Self {
        let p = baton_core::batcher::BatchPolicy::default();
        BatchFile {
            batch_bytes_max: p.batch_bytes_max,
            batch_txs_max: p.batch_txs_max,
            linger_us: p.linger_us,
            seal_when_idle: true,
        }
    }
}

/// `[limits]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsFile {
    /// Transaction hashes each shard remembers for deduplication. Default 1,048,576.
    pub dedup_window_txs: usize,
    /// Submissions queued per shard. Default 1,024.
    pub submit_queue_max: usize,
    /// Sealed batches queued for the Raft shard. Default 64.
    pub propose_queue_max: usize,
    /// Batches proposed and not yet committed. Default 256.
    pub proposals_in_flight_max: usize,
    /// How long a batch may wait for its commit. Default 10,000.
    pub commit_wait_ms: u64,
    /// Client submission bytes admitted and not yet answered, node-wide. Default 8,388,608.
    pub client_bytes_in_flight_max: usize,
}

impl Default for LimitsFile {
    fn default() -> Self {
        let c = NodeConfig::new(1, "");
        LimitsFile {
            dedup_window_txs: c.dedup_window_txs,
            submit_queue_max: c.submit_queue_max,
            propose_queue_max: c.propose_queue_max,
            proposals_in_flight_max: c.proposals_in_flight_max,
            commit_wait_ms: c.commit_wait_ms,
            client_bytes_in_flight_max: baton_net::node::CLIENT_BYTES_IN_FLIGHT_MAX_DEFAULT,
        }
    }
}

fn default_cluster_id() -> String {
    "baton-local".into()
}

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
}

/// Why a configuration file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not readable.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not valid TOML or not this schema.
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    /// A value breaks a rule.
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl NodeFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<NodeFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: NodeFile = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        if file.node_id == 0 {
            return Err(invalid("node_id must be at least 1".into()));
        }
        if file.bootstrap && !file.peers.iter().any(|p| p.id == file.node_id) {
            return Err(invalid(format!(
                "with bootstrap = true, peers must list this node (id {})",
                file.node_id
            )));
        }
        let mut ids: Vec<u64> = file.peers.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != file.peers.len() {
            return Err(invalid("peer ids must be unique".into()));
        }
        if let Err(reason) = file.wal.options().and_then(|_| file.wal.check_io_memory()) {
            return Err(invalid(format!("wal: {reason}")));
        }
        if let Some(cpus) = &file.shard_cpus {
            if file.pin_shards {
                return Err(invalid(
                    "set pin_shards (shard k on CPU k) or shard_cpus, not both".into(),
                ));
            }
            if cpus.is_empty() {
                return Err(invalid(
                    "shard_cpus is empty: leave it out to not pin".into(),
                ));
            }
            if file.shards.is_some_and(|n| n != cpus.len()) {
                return Err(invalid(format!(
                    "shard_cpus names {} CPUs for shards = {}: one per shard",
                    cpus.len(),
                    file.shards.unwrap_or_default()
                )));
            }
        }
        if file.net_cpus.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid("net_cpus is empty: leave it out to not pin".into()));
        }
        if file.limits.client_bytes_in_flight_max == 0 {
            return Err(invalid(
                "limits.client_bytes_in_flight_max must be at least 1".into(),
            ));
        }
        Ok(file)
    }

    /// The networked node configuration; relative paths are taken relative to `base` (the
    /// directory of the file).
    pub fn to_config(&self, base: &Path) -> NetNodeConfig {
        let mut node = NodeConfig::new(self.node_id, resolve(base, &self.data_dir));
        if let Some(s) = self.shards {
            node.shards = s;
        }
        // Checked by `load` (a CPU outside this machine's mask is refused when the node starts).
        node.shard_cpus = match &self.shard_cpus {
            Some(cpus) => {
                node.shards = cpus.len();
                Some(cpus.clone())
            }
            None => self.pin_shards.then(|| (0..node.shards).collect()),
        };
        node.raft = RaftTimings {
            heartbeat_interval_ms: self.raft.heartbeat_interval_ms,
            election_timeout_min_ms: self.raft.election_timeout_min_ms,
            election_timeout_max_ms: self.raft.election_timeout_max_ms,
            snapshot_every_entries: self.raft.snapshot_every_entries,
            snapshot_log_bytes_min: self.raft.snapshot_log_bytes_min,
            snapshot_log_ratio: self.raft.snapshot_log_ratio,
            log_entries_kept_after_snapshot: self.raft.log_entries_kept_after_snapshot,
        };
        node.batch.batch_bytes_max = self.batch.batch_bytes_max;
        node.batch.batch_txs_max = self.batch.batch_txs_max;
        node.batch.linger_us = self.batch.linger_us;
        node.seal_when_idle = self.batch.seal_when_idle;
        node.dedup_window_txs = self.limits.dedup_window_txs;
        node.submit_queue_max = self.limits.submit_queue_max;
        node.propose_queue_max = self.limits.propose_queue_max;
        node.proposals_in_flight_max = self.limits.proposals_in_flight_max;
        node.commit_wait_ms = self.limits.commit_wait_ms;
        // Checked by `load`; a file built in code falls back to the defaults.
        node.wal = self.wal.options().unwrap_or_default();
        node.wal_io_memory_bytes = self.wal.io_memory_bytes;
        let bootstrap = self.bootstrap.then(|| {
            self.peers
                .iter()
                .map(|p| (p.id, p.addr.clone()))
                .collect::<BTreeMap<_, _>>()
        });
        NetNodeConfig {
            node,
            cluster_id: self.cluster_id.clone(),
            listen: self.listen_addr,
            tls: TlsPaths {
                ca_cert: resolve(base, &self.tls.ca_cert),
                cert: resolve(base, &self.tls.cert),
                key: resolve(base, &self.tls.key),
            },
            net_threads: self.net_threads,
            net_cpus: self.net_cpus.clone().unwrap_or_default(),
            client_bytes_in_flight_max: self.limits.client_bytes_in_flight_max,
            bootstrap,
            metrics: self.metrics_addr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(tables: &str) -> (tempfile::TempDir, Result<NodeFile, ConfigError>) {
        file_with_top("", tables)
    }

    /// A file with `top` among its top-level keys and `tables` at its end.
    fn file_with_top(
        top: &str,
        tables: &str,
    ) -> (tempfile::TempDir, Result<NodeFile, ConfigError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        let text = format!(
            "{top}node_id = 1\nlisten_addr = \"127.0.0.1:7100\"\ndata_dir = \"data\"\n\
             [tls]\nca_cert = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n.key\"\n\
             [[peers]]\nid = 1\naddr = \"127.0.0.1:7100\"\n{tables}"
        );
        std::fs::write(&path, text).expect("write");
        let loaded = NodeFile::load(&path);
        (dir, loaded)
    }

    /// A node that joins a running cluster lists no peers; a bootstrapping one must list
    /// itself.
    #[test]
    fn peers_are_needed_only_to_bootstrap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        let text = |bootstrap: bool| {
            format!(
                "node_id = 4\nlisten_addr = \"127.0.0.1:7103\"\ndata_dir = \"data\"\n\
                 bootstrap = {bootstrap}\n\
                 [tls]\nca_cert = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n.key\"\n"
            )
        };
        std::fs::write(&path, text(false)).expect("write");
        let f = NodeFile::load(&path).expect("a joining node needs no peers");
        assert!(f.peers.is_empty());
        assert!(f.to_config(dir.path()).bootstrap.is_none());
        std::fs::write(&path, text(true)).expect("write");
        let f = NodeFile::load(&path);
        assert!(
            matches!(&f, Err(ConfigError::Invalid { reason, .. }) if reason.contains("peers must list this node")),
            "{f:?}"
        );
    }

    #[test]
    fn client_admission_bound_comes_from_limits_and_zero_is_refused() {
        let (dir, f) = file_with("");
        let c = f.expect("defaults load").to_config(dir.path());
        assert_eq!(
            c.client_bytes_in_flight_max,
            baton_net::node::CLIENT_BYTES_IN_FLIGHT_MAX_DEFAULT
        );
        let (dir, f) = file_with("[limits]\nclient_bytes_in_flight_max = 65536\n");
        let c = f.expect("loads").to_config(dir.path());
        assert_eq!(c.client_bytes_in_flight_max, 65_536);
        let (_dir, f) = file_with("[limits]\nclient_bytes_in_flight_max = 0\n");
        assert!(matches!(f, Err(ConfigError::Invalid { .. })), "{f:?}");
    }

    #[test]
    fn wal_options_come_from_the_wal_section_and_bad_ones_are_refused() {
        let (dir, f) = file_with("");
        let c = f.expect("defaults load").to_config(dir.path());
        let d = baton_wal::WalOptions::default();
        assert_eq!(
            (
                c.node.wal.segment_bytes,
                c.node.wal.spare_segments,
                c.node.wal.sync
            ),
            (d.segment_bytes, d.spare_segments, d.sync)
        );
        let (dir, f) = file_with(
            "[wal]\nsegment_bytes = 134217728\nspare_segments = 0\nsync = \"fdatasync\"\n",
        );
        let c = f.expect("loads").to_config(dir.path());
        assert_eq!(c.node.wal.segment_bytes, 128 << 20);
        assert_eq!(c.node.wal.spare_segments, 0);
        assert_eq!(c.node.wal.sync, baton_wal::SyncMode::Fdatasync);
        assert_eq!(c.node.wal.flush_bytes_max, d.flush_bytes_max);
        assert_eq!(c.node.wal_io_memory_bytes, baton_wal::IO_MEMORY_BYTES);
        let (dir, f) = file_with("[wal]\nio_memory_bytes = 16777216\n");
        assert_eq!(
            f.expect("loads")
                .to_config(dir.path())
                .node
                .wal_io_memory_bytes,
            16 << 20
        );
        for bad in [
            "[wal]\nio_memory_bytes = 4096\n",
            "[wal]\nio_memory_bytes = 2147483648\n",
            "[wal]\nsync = \"sometimes\"\n",
            "[wal]\nsegment_bytes = 4097\n",
            "[wal]\nspare_segments = 17\n",
            "[wal]\nflush_bytes_max = 4096\n",
            "[wal]\nsegment_bytes_typo = 1\n",
        ] {
            let (_dir, f) = file_with(bad);
            assert!(
                matches!(
                    f,
                    Err(ConfigError::Invalid { .. }) | Err(ConfigError::Parse { .. })
                ),
                "{bad}: {f:?}"
            );
        }
    }

    #[test]
    fn cpu_placement_comes_from_shard_cpus_or_pin_shards_and_contradictions_are_refused() {
        let placement = |top: &str| {
            let (dir, f) = file_with_top(top, "");
            let c = f
                .unwrap_or_else(|e| panic!("{top}: {e}"))
                .to_config(dir.path());
            (c.node.shards, c.node.shard_cpus, c.net_cpus)
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(placement(""), (cores, None, vec![]));
        assert_eq!(
            placement("pin_shards = true\nshards = 2\n"),
            (2, Some(vec![0, 1]), vec![])
        );
        // The shard count follows the CPU list; net threads may share a shard's CPU.
        assert_eq!(
            placement("shard_cpus = [3, 1]\nnet_cpus = [0, 1]\n"),
            (2, Some(vec![3, 1]), vec![0, 1])
        );
        assert_eq!(
            placement("shards = 1\nshard_cpus = [5]\n"),
            (1, Some(vec![5]), vec![])
        );
        for (bad, says) in [
            ("shards = 3\nshard_cpus = [1, 2]\n", "2 CPUs for shards = 3"),
            ("pin_shards = true\nshard_cpus = [1]\n", "not both"),
            ("shard_cpus = []\n", "empty"),
            ("net_cpus = []\n", "empty"),
        ] {
            let (_dir, f) = file_with_top(bad, "");
            assert!(
                matches!(&f, Err(ConfigError::Invalid { reason, .. }) if reason.contains(says)),
                "{bad}: {f:?}"
            );
        }
    }

    #[test]
    fn the_operations_guide_example_loads_as_it_reads() {
        let guide = include_str!("../../docs/operations.md");
        let start = guide
            .find("```toml\nnode_id = 1\ncluster_id = \"prod-a\"")
            .expect("the example node.toml in docs/operations.md")
            + "```toml\n".len();
        let text = &guide[start..start + guide[start..].find("```").expect("its end")];
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node-1.toml");
        std::fs::write(&path, text).expect("write");
        let c = NodeFile::load(&path)
            .expect("the example loads")
            .to_config(dir.path());
        assert_eq!(c.node.shards, 6);
        assert_eq!(c.node.shard_cpus, Some(vec![2, 3, 4, 5, 6, 7]));
        assert_eq!(c.net_cpus, vec![1]);
        assert_eq!(c.cluster_id, "prod-a");
    }
}
