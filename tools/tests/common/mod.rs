//! Harness for multi-process tests: `baton cluster up` and `baton node` as real processes on
//! 127.0.0.1, QUIC clients, and reading the nodes' WALs back after they stop.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_core::node::{NodeStatus, Receipt};
use baton_core::{Transaction, TxHash, TxKind};
use baton_net::{Client, ClientOptions};

pub const BATON: &str = env!("CARGO_BIN_EXE_baton");

/// Runs `baton ARGS…`; fails the test, with its stderr, unless it exits 0. Its stdout.
pub fn baton_ok(args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let out = Command::new(BATON).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "baton {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A range of `n` consecutive free UDP ports on 127.0.0.1, outside the kernel's ephemeral range
/// (where any client socket could take one before the node binds it), spread by process id so
/// concurrent test processes do not collide.
pub fn free_base_port(n: u16) -> u16 {
    baton_net::ports::free_loopback_udp_ports(n, std::process::id())
        .expect("no free UDP port range")
}

/// One node of a running local cluster.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub pid: u32,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Its metrics address (TCP), with `cluster up --metrics`.
    pub metrics: Option<SocketAddr>,
}

/// A cluster started by `baton cluster up`.
pub struct ClusterUp {
    pub dir: PathBuf,
    pub process: Child,
    pub ca: PathBuf,
    pub nodes: Vec<NodeInfo>,
    pub leader: u64,
    /// Nodes started by the test itself (restarts).
    pub extra: Vec<Child>,
    /// `stop` ran: nothing left to clean up.
    pub stopped: bool,
}

impl Drop for ClusterUp {
    /// A failed test leaves no processes behind: SIGKILL everything it started.
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if std::thread::panicking() {
            // The directory goes away with the test: show the ends of the node logs first.
            for n in &self.nodes {
                let log = std::fs::read_to_string(&n.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- node {} log (last lines) ---", n.id);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for n in &self.nodes {
            // SAFETY: kill(2) on node processes this test started (an exited pid is harmless
            // within the test's short life).
            unsafe { libc::kill(n.pid as libc::pid_t, libc::SIGKILL) };
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
        for c in &mut self.extra {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl ClusterUp {
    /// Runs `baton cluster up --json` and waits (bounded) for its endpoints line.
    pub fn start(dir: &Path, nodes: u64, base_port: u16) -> ClusterUp {
        Self::start_with(dir, nodes, base_port, &[])
    }

    /// [`ClusterUp::start`] with more `cluster up` arguments.
    pub fn start_with(dir: &Path, nodes: u64, base_port: u16, extra: &[&str]) -> ClusterUp {
        Self::start_to(dir, nodes, base_port, extra, Stdio::inherit())
    }

    /// [`ClusterUp::start_with`] with `cluster up`'s own stderr going to `stderr`.
    pub fn start_to(
        dir: &Path,
        nodes: u64,
        base_port: u16,
        extra: &[&str],
        stderr: Stdio,
    ) -> ClusterUp {
        let mut process = Command::new(BATON)
            .args(["cluster", "up", "--json", "--nodes", &nodes.to_string()])
            .args(extra)
            .arg("--dir")
            .arg(dir)
            .args(["--base-port", &base_port.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn baton cluster up");
        let stdout = process.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("cluster up prints its endpoints within 60 s");
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("cluster up printed {line:?}: {e}"));
        let nodes = v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| NodeInfo {
                id: n["id"].as_u64().unwrap(),
                addr: n["addr"].as_str().unwrap().parse().unwrap(),
                pid: n["pid"].as_u64().unwrap() as u32,
                config: n["config"].as_str().unwrap().into(),
                data_dir: n["data_dir"].as_str().unwrap().into(),
                log: n["log"].as_str().unwrap().into(),
                metrics: n["metrics"].as_str().map(|a| a.parse().unwrap()),
            })
            .collect();
        ClusterUp {
            dir: dir.to_path_buf(),
            process,
            ca: v["ca_cert"].as_str().unwrap().into(),
            nodes,
            leader: v["leader"].as_u64().unwrap(),
            extra: Vec::new(),
            stopped: false,
        }
    }

    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    pub fn node(&self, id: u64) -> &NodeInfo {
        self.nodes.iter().find(|n| n.id == id).expect("node id")
    }

    /// Default client options trying the nodes starting with node `first`.
    pub fn options_from(&self, first: u64) -> ClientOptions {
        let mut eps = self.endpoints();
        let at = eps
            .iter()
            .position(|e| *e == self.node(first).addr)
            .unwrap();
        eps.rotate_left(at);
        ClientOptions::new(eps, &self.ca)
    }

    /// A client trying the nodes starting with node `first`.
    pub fn client_from(&self, first: u64) -> Client {
        Client::new(self.options_from(first)).expect("client")
    }

    /// A client of node `id` alone. Its budget (which also bounds each call's own wait) leaves
    /// room for a loaded machine; three attempts keep a call to a dead node short.
    pub fn client_of(&self, id: u64) -> Client {
        let mut o = ClientOptions::new(vec![self.node(id).addr], &self.ca);
        o.attempts_max = 3;
        o.call_budget_ms = 15_000;
        Client::new(o).expect("client")
    }

    /// Sends `signal` to node `id`'s process.
    pub fn signal(&self, id: u64, signal: libc::c_int) {
        let pid = self.node(id).pid;
        // SAFETY: kill(2) on a pid of a node process this test started (through cluster up).
        let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(rc, 0, "signal {signal} to node {id} (pid {pid})");
    }

    /// SIGKILLs node `id`'s process and waits (bounded) until it has exited, so its port and
    /// WAL directory are free for a restart.
    pub fn kill(&self, id: u64) {
        self.signal(id, libc::SIGKILL);
        self.wait_exit(id, Duration::from_secs(10));
    }

    /// Waits until node `id`'s process has exited (a process this test has not reaped: the
    /// cluster up process or the test reaps it), at most `limit`.
    pub fn wait_exit(&self, id: u64, limit: Duration) {
        let pid = self.node(id).pid;
        // SAFETY: pidfd_open(2) on a pid of a node process this test started; the pidfd is
        // polled (it becomes readable when the process exits) and closed here.
        unsafe {
            let fd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as libc::c_int;
            if fd < 0 {
                // Already gone (and reaped).
                return;
            }
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ready = libc::poll(&mut p, 1, limit.as_millis() as libc::c_int);
            libc::close(fd);
            assert_eq!(
                ready, 1,
                "node {id} (pid {pid}) did not exit within {limit:?}"
            );
        }
    }

    /// Starts node `id` again as a process of this test (same config, data, port).
    pub fn restart(&mut self, id: u64) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.node(id).log)
            .unwrap();
        let child = Command::new(BATON)
            .arg("node")
            .arg("--config")
            .arg(&self.node(id).config)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("restart node");
        let pid = child.id();
        self.extra.push(child);
        self.nodes.iter_mut().find(|n| n.id == id).unwrap().pid = pid;
    }

    /// SIGTERM to cluster up (which stops its nodes) and to restarted nodes; waits for all.
    pub fn stop(mut self) -> Vec<NodeInfo> {
        let mut all: Vec<&mut Child> = vec![&mut self.process];
        all.extend(self.extra.iter_mut());
        for c in &all {
            // SAFETY: kill(2) on processes this test started.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for c in all {
            loop {
                if c.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() >= deadline {
                    let report: Vec<String> = self.nodes.iter().map(stuck_report).collect();
                    panic!(
                        "processes did not stop on SIGTERM within 60 s:\n{}",
                        report.join("\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.stopped = true;
        std::mem::take(&mut self.nodes)
    }
}

/// For a failed stop: whether node `n`'s process still runs, where each of its threads waits
/// (`/proc/PID/task/*/wchan`), and the end of its log.
fn stuck_report(n: &NodeInfo) -> String {
    let mut out = format!("node {} (pid {}):", n.id, n.pid);
    match std::fs::read_dir(format!("/proc/{}/task", n.pid)) {
        Err(_) => out.push_str(" exited\n"),
        Ok(tasks) => {
            out.push_str(" still running\n");
            for task in tasks.flatten() {
                let path = task.path();
                let read = |f: &str| std::fs::read_to_string(path.join(f)).unwrap_or_default();
                let state = read("status")
                    .lines()
                    .find_map(|l| l.strip_prefix("State:").map(|s| s.trim().to_string()))
                    .unwrap_or_default();
                out.push_str(&format!(
                    "  thread {} {:?}: {state}, waiting in {}\n",
                    task.file_name().to_string_lossy(),
                    read("comm").trim_end(),
                    read("wchan"),
                ));
            }
        }
    }
    let log = std::fs::read_to_string(&n.log).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    out.push_str("  log tail:\n");
    for l in &lines[lines.len().saturating_sub(30)..] {
        out.push_str(&format!("    {l}\n"));
    }
    out
}

/// `n` distinct transactions whose payloads start with `tag`.
pub fn txs(tag: &str, from: u64, n: u64) -> Vec<Transaction> {
    (from..from + n)
        .map(|i| Transaction {
            rollup_id: 1,
            kind: TxKind::Raw,
            bytes: format!("{tag}-{i:010}-{}", "x".repeat(100)).into_bytes(),
        })
        .collect()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Every node's id and signer address, from a `cluster up` directory's cluster.json.
pub fn signers(dir: &Path) -> Vec<(u64, baton_core::Address)> {
    let text = std::fs::read_to_string(dir.join("cluster.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().unwrap(),
                baton_core::Address::parse(n["signer"].as_str().unwrap()).unwrap(),
            )
        })
        .collect()
}

/// The leader `client`'s node knows of, waiting (bounded) until it knows one.
pub async fn leader_seen_by(client: &Client, timeout: Duration) -> u64 {
    let s = wait_status(client, timeout, |s| s.leader.is_some()).await;
    s.leader.expect("checked")
}

/// Waits (bounded) until `client`'s node has applied `index`.
pub async fn wait_applied(client: &Client, index: u64, timeout: Duration) -> NodeStatus {
    wait_status(client, timeout, move |s| s.applied_index >= Some(index)).await
}

/// Asks `client`'s node for its status until `condition` holds (bounded by `timeout`; the
/// status request has no push form, so this polls every 50 ms).
pub async fn wait_status(
    client: &Client,
    timeout: Duration,
    condition: impl Fn(&NodeStatus) -> bool,
) -> NodeStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = client.status().await {
            if condition(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "condition not met in time: {s:?}"
            );
        }
        assert!(Instant::now() < deadline, "no status in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node's log as read back from its WAL: index → (term, tx hashes of the batch).
pub struct Log {
    pub entries: BTreeMap<u64, (u64, Option<Vec<TxHash>>)>,
}

impl Log {
    pub fn read(dir: &Path) -> Log {
        let dir = dir.to_path_buf();
        let entries = glommio::LocalExecutorBuilder::default()
            .make()
            .expect("glommio executor")
            .run(async move {
                let (wal, _) = baton_wal::Wal::open(&dir, baton_wal::WalOptions::default())
                    .await
                    .expect("open WAL");
                let mut entries = BTreeMap::new();
                if let (Some(first), Some(last)) = (wal.first_index(), wal.last_index()) {
                    for i in first..=last {
                        let r = wal.read(i).await.expect("read entry");
                        let hashes = baton_core::raft::log_store::entry_batch(r.payload())
                            .expect("entries decode")
                            .map(|b| {
                                baton_core::access_batch(b)
                                    .expect("valid batch")
                                    .txs
                                    .iter()
                                    .map(|t| t.tx_hash())
                                    .collect()
                            });
                        let raft_index = baton_core::raft::log_store::raft_index(i).unwrap();
                        entries.insert(raft_index, (r.term, hashes));
                    }
                }
                entries
            });
        Log { entries }
    }

    pub fn last_index(&self) -> u64 {
        self.entries.keys().next_back().copied().unwrap_or(0)
    }
}

/// Every log holds the same entries up to `through` (a point every node has applied: a prefix
/// that is committed everywhere); past it a node that was stopped may still hold entries of its
/// old term that no leader has overwritten yet, which Raft allows. Returns the longest log.
pub fn check_logs_agree_through(logs: &HashMap<u64, Log>, through: u64) -> &Log {
    let prefixes: HashMap<u64, Log> = logs
        .iter()
        .map(|(id, log)| {
            let entries = log
                .entries
                .range(..=through)
                .map(|(i, e)| (*i, e.clone()))
                .collect();
            (*id, Log { entries })
        })
        .collect();
    check_logs_agree(&prefixes);
    logs.values().max_by_key(|l| l.last_index()).unwrap()
}

/// Every log holds the same entries where they overlap; returns the longest.
pub fn check_logs_agree(logs: &HashMap<u64, Log>) -> &Log {
    let ids: Vec<u64> = logs.keys().copied().collect();
    for (k, a) in ids.iter().enumerate() {
        for b in &ids[k + 1..] {
            for (i, ea) in &logs[a].entries {
                if let Some(eb) = logs[b].entries.get(i) {
                    assert_eq!(ea, eb, "nodes {a} and {b} disagree at index {i}");
                }
            }
        }
    }
    logs.values().max_by_key(|l| l.last_index()).unwrap()
}

/// Every receipt names the first position of its transaction in the logs (later copies, from
/// retries, are duplicates the state machine does not order again), and no two transactions
/// share a position. The logs may each have purged a different prefix: their union is used,
/// and receipts below every log's first entry are skipped.
pub fn check_receipts(logs: &HashMap<u64, Log>, receipts: &[Receipt]) {
    let first_held = logs
        .values()
        .filter_map(|l| l.entries.keys().next().copied())
        .min()
        .unwrap_or(u64::MAX);
    let mut union = BTreeMap::new();
    for log in logs.values() {
        for (index, (_, hashes)) in &log.entries {
            union.entry(*index).or_insert(hashes);
        }
    }
    let mut first: HashMap<TxHash, (u64, u32)> = HashMap::new();
    for (index, hashes) in union {
        for (offset, h) in hashes.iter().flatten().enumerate() {
            first.entry(*h).or_insert((index, offset as u32));
        }
    }
    for r in receipts.iter().filter(|r| r.index() >= first_held) {
        assert_eq!(
            first.get(&r.tx_hash),
            Some(&(r.index(), r.offset)),
            "receipt {r:?} is not the first position of its transaction"
        );
    }
}
