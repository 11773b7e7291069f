//! `baton node` (run one node from its TOML file) and `baton cluster up` (a local cluster of
//! real node processes on 127.0.0.1).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use baton_core::{Address, Signer};
use baton_net::tls::{self, CertOptions};
use baton_net::{Client, ClientOptions};
use clap::Args;
use serde::Serialize;

use crate::node_config::{NodeFile, PeerFile, TlsFile};

/// `baton node`
#[derive(Args)]
pub struct NodeArgs {
    /// The node's configuration file.
    #[arg(long)]
    config: PathBuf,
}

/// Runs one node until SIGTERM or SIGINT, then shuts it down cleanly.
pub fn run_node(args: NodeArgs) -> ExitCode {
    let file = match NodeFile::load(&args.config) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("baton node: {e}");
            return ExitCode::from(2);
        }
    };
    let base = args
        .config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut config = file.to_config(&base);
    if file.transparent_huge_pages {
        if let Err(e) = baton_core::memory::set_transparent_huge_pages(true) {
            eprintln!("baton node: cannot allow transparent huge pages: {e}");
            return ExitCode::from(2);
        }
    } else if file.huge_pages_at_start {
        // Until the node has started (see `baton_core::memory`). Best effort, like the default.
        if let Err(e) = baton_core::memory::set_transparent_huge_pages(true) {
            eprintln!("baton node: warning: no huge pages at start: {e}");
        }
    }
    match &file.signing_key_file {
        Some(path) => match baton_core::Signer::load(&base.join(path)) {
            Ok(signer) => config.node.signer = signer,
            Err(e) => {
                eprintln!("baton node: {e}");
                return ExitCode::from(2);
            }
        },
        None => eprintln!(
            "baton node {}: warning: no signing_key_file; signing with a fresh key {} that \
             changes on every restart",
            file.node_id,
            config.node.signer.address()
        ),
    }
    let signer = config.node.signer.address();
    let node = match baton_net::node::start(config) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("baton node: cannot start node {}: {e}", file.node_id);
            return ExitCode::from(1);
        }
    };
    if !file.transparent_huge_pages {
        // The start-time tables are allocated and written (the node is started): what is
        // mapped from now on gets small pages again; the huge pages already in place stay.
        let _ = baton_core::memory::set_transparent_huge_pages(false);
    }
    eprintln!(
        "baton node {} listening on {} (cluster {:?}, signer {signer})",
        file.node_id,
        node.local_addr(),
        file.cluster_id
    );
    if let Some(addr) = node.metrics_addr() {
        eprintln!(
            "baton node {} metrics on http://{addr}/metrics",
            file.node_id
        );
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let failed = tx.clone();
    node.runtime().spawn(async move {
        let signal = wait_for_stop_signal().await;
        let _ = tx.send(Err(signal));
    });
    let handle = node.handle().clone();
    node.runtime().spawn(async move {
        if let Some(reason) = handle.failed().await {
            let _ = failed.send(Ok(reason));
        }
    });
    // A node whose Raft core failed (a storage error) stops and exits 1, so that whatever
    // supervises it restarts it: it then recovers from its log, or fails to start and says why.
    let (reason, code) = match rx.recv() {
        Ok(Ok(failure)) => (format!("Raft core failed ({failure})"), ExitCode::from(1)),
        Ok(Err(signal)) => (signal.to_string(), ExitCode::SUCCESS),
        Err(_) => ("runtime stopped".to_string(), ExitCode::SUCCESS),
    };
    eprintln!("baton node {}: {reason}, shutting down", file.node_id);
    node.shutdown();
    eprintln!("baton node {}: stopped", file.node_id);
    code
}

/// Resolves on SIGTERM or SIGINT.
async fn wait_for_stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the node still runs; it stops when killed.
        std::future::pending::<()>().await;
        unreachable!()
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// SIGTERM and SIGINT, caught from the moment this is made (inside a tokio runtime) so that a
/// signal arriving while node processes start cannot kill this process and orphan them.
struct StopSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn new() -> StopSignals {
        use tokio::signal::unix::{signal, SignalKind};
        StopSignals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Resolves with the name of the first signal (never without handlers).
    async fn recv(&mut self) -> &'static str {
        match (&mut self.term, &mut self.int) {
            (Some(term), Some(int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            _ => std::future::pending().await,
        }
    }
}

/// `baton cluster up`
#[derive(Args)]
pub struct ClusterUpArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Directory for certificates, configurations, logs and data (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// UDP port of node 1; node i listens on base_port + i - 1.
    #[arg(long, default_value_t = 7100)]
    base_port: u16,
    /// Shards per node.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Print the endpoints as one JSON line.
    #[arg(long)]
    json: bool,
    /// Give up waiting for a leader after this long.
    #[arg(long, default_value_t = 30_000)]
    leader_timeout_ms: u64,
    /// Rollups to register once a leader is elected (comma-separated ids; empty for none),
    /// with the default policy of `baton admin rollup add`.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    rollups: Vec<u64>,
    /// Lower bound of the nodes' randomized election timeout (the upper bound is twice it).
    #[arg(long, default_value_t = crate::node_config::RaftFile::default().election_timeout_min_ms)]
    election_timeout_min_ms: u64,
    /// Raft log entries after which a snapshot is built (0: never by count); each snapshot
    /// lets the log before it be purged.
    #[arg(long, default_value_t = crate::node_config::RaftFile::default().snapshot_every_entries)]
    snapshot_every_entries: u64,
    /// Log bytes after which a snapshot is built (also at least `[raft] snapshot_log_ratio`
    /// times the last snapshot's size), whichever comes first with the entry count.
    #[arg(long, default_value_t = crate::node_config::RaftFile::default().snapshot_log_bytes_min)]
    snapshot_log_bytes_min: u64,
    /// Serve each node's Prometheus metrics over HTTP on 127.0.0.1, on the TCP port with its
    /// QUIC port's number (`http://127.0.0.1:PORT/metrics`; listed in cluster.json).
    #[arg(long)]
    metrics: bool,
}

/// `baton cluster`
#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// Start a local cluster of node processes on 127.0.0.1 and keep it up until Ctrl-C or
    /// SIGTERM.
    Up(ClusterUpArgs),
}

/// What `cluster up` prints (and writes to DIR/cluster.json) once a leader is elected.
#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct ClusterInfo {
    /// Cluster id.
    pub cluster_id: String,
    /// The CA certificate clients must trust.
    pub ca_cert: PathBuf,
    /// The client certificate and key.
    pub client_cert: PathBuf,
    /// The client key.
    pub client_key: PathBuf,
    /// The nodes.
    pub nodes: Vec<NodeInfo>,
    /// The leader when the cluster came up.
    pub leader: u64,
    /// Rollups registered when the cluster came up.
    #[serde(default)]
    pub rollups: Vec<u64>,
}

/// One node of a local cluster.
#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct NodeInfo {
    /// Node id.
    pub id: u64,
    /// Client and peer address.
    pub addr: SocketAddr,
    /// Its process id.
    pub pid: u32,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Address of its signing key (receipts it signs as leader recover to it).
    pub signer: String,
    /// Where it serves metrics over HTTP (TCP), if it does (`cluster up --metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

/// A node of a prepared local cluster: id, address, configuration file, signer address.
pub struct PreparedNode {
    /// Node id.
    pub id: u64,
    /// Client and peer address.
    pub addr: SocketAddr,
    /// Its configuration file.
    pub config: PathBuf,
    /// Address of its signing key.
    pub signer: Address,
    /// Its metrics address (TCP), if it serves metrics.
    pub metrics: Option<SocketAddr>,
}

/// Runs `cluster` subcommands.
pub fn run_cluster(command: ClusterCommand) -> ExitCode {
    match command {
        ClusterCommand::Up(args) => cluster_up(args),
    }
}

/// Writes certificates and signing keys (once: existing ones are kept) and node configuration
/// files (on every call) for a local cluster in `dir`. With `metrics`, each node serves metrics
/// on the TCP port with its UDP port's number.
pub fn prepare_cluster(
    dir: &Path,
    nodes: u64,
    base_port: u16,
    shards: usize,
    raft: &crate::node_config::RaftFile,
    metrics: bool,
) -> Result<Vec<PreparedNode>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let certs = dir.join("certs");
    if !certs.join("ca.pem").exists() {
        tls::generate(&certs, &CertOptions::new("baton-local", nodes))
            .map_err(|e| e.to_string())?;
    }
    let peers: Vec<PeerFile> = (1..=nodes)
        .map(|id| PeerFile {
            id,
            addr: format!("127.0.0.1:{}", base_port as u64 + id - 1),
        })
        .collect();
    let mut out = Vec::new();
    for id in 1..=nodes {
        let addr: SocketAddr = peers[(id - 1) as usize]
            .addr
            .parse()
            .expect("literal address");
        let config = dir.join(format!("node-{id}.toml"));
        let (cert, key) = tls::node_files(&certs, id);
        let key_file = dir.join(format!("node-{id}.key"));
        let signer = if key_file.exists() {
            Signer::load(&key_file).map_err(|e| e.to_string())?
        } else {
            let s = Signer::random();
            s.save(&key_file).map_err(|e| e.to_string())?;
            s
        };
        let file = NodeFile {
            node_id: id,
            cluster_id: "baton-local".into(),
            listen_addr: addr,
            data_dir: dir.join(format!("node-{id}")),
            shards: Some(shards),
            pin_shards: false,
            shard_cpus: None,
            net_cpus: None,
            transparent_huge_pages: false,
            huge_pages_at_start: true,
            net_threads: 1,
            bootstrap: true,
            signing_key_file: Some(key_file),
            metrics_addr: metrics.then_some(addr),
            tls: TlsFile {
                ca_cert: certs.join("ca.pem"),
                cert,
                key,
            },
            peers: peers.clone(),
            raft: raft.clone(),
            batch: Default::default(),
            limits: Default::default(),
            wal: Default::default(),
        };
        let text = toml::to_string(&file).map_err(|e| e.to_string())?;
        std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
        out.push(PreparedNode {
            id,
            addr,
            config,
            signer: signer.address(),
            metrics: metrics.then_some(addr),
        });
    }
    Ok(out)
}

/// Locked memory glommio's executors need per node (io_uring rings and registered buffers),
/// with room: 64 MiB.
const MEMLOCK_BYTES: u64 = 64 << 20;

/// Raises this process's locked-memory limit (inherited by the nodes it starts) to what glommio
/// needs: the soft limit up to the hard one, and the hard one too where allowed (root). Returns
/// the soft limit now in force.
pub fn raise_memlock() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut l) != 0 {
            return 0;
        }
        if l.rlim_cur >= MEMLOCK_BYTES || l.rlim_cur == libc::RLIM_INFINITY {
            return l.rlim_cur;
        }
        let wanted = libc::rlimit {
            rlim_cur: MEMLOCK_BYTES,
            rlim_max: l.rlim_max.max(MEMLOCK_BYTES),
        };
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &wanted) == 0 {
            return MEMLOCK_BYTES;
        }
        let soft = libc::rlimit {
            rlim_cur: l.rlim_max,
            rlim_max: l.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &soft) == 0 {
            return l.rlim_max;
        }
        l.rlim_cur
    }
}

/// Starts `baton node --config <config>` with its output appended to `log`.
pub fn spawn_node(config: &Path, log: &Path) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    Command::new(exe)
        .arg("node")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
}

/// Sends SIGTERM to every child, waits up to `grace`, then SIGKILLs what is left.
pub fn stop_children(children: &mut [Child], grace: Duration) {
    for c in children.iter_mut() {
        // One already reaped is not signalled: its pid may belong to another process by now.
        if !matches!(c.try_wait(), Ok(None)) {
            continue;
        }
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    for c in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
            }
        }
    }
}

fn cluster_up(args: ClusterUpArgs) -> ExitCode {
    if args.nodes == 0 || args.nodes > 7 {
        eprintln!("baton cluster up: --nodes must be 1 to 7");
        return ExitCode::from(2);
    }
    let raft = crate::node_config::RaftFile {
        election_timeout_min_ms: args.election_timeout_min_ms,
        election_timeout_max_ms: 2 * args.election_timeout_min_ms,
        snapshot_every_entries: args.snapshot_every_entries,
        snapshot_log_bytes_min: args.snapshot_log_bytes_min,
        ..Default::default()
    };
    let prepared = match prepare_cluster(
        &args.dir,
        args.nodes,
        args.base_port,
        args.shards,
        &raft,
        args.metrics,
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("baton cluster up: {e}");
            return ExitCode::from(1);
        }
    };
    let dir = args.dir.canonicalize().expect("created above");
    let memlock = raise_memlock();
    if memlock < 512 << 10 {
        eprintln!(
            "baton cluster up: warning: locked memory is limited to {memlock} bytes; nodes need \
             at least 512 KiB (raise `ulimit -l`)"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut signals = {
        let _in_runtime = rt.enter();
        StopSignals::new()
    };
    let mut children = Vec::new();
    let mut infos = Vec::new();
    for PreparedNode {
        id,
        addr,
        config,
        signer,
        metrics,
    } in &prepared
    {
        let log = dir.join(format!("node-{id}.log"));
        match spawn_node(config, &log) {
            Ok(child) => {
                infos.push(NodeInfo {
                    id: *id,
                    addr: *addr,
                    pid: child.id(),
                    config: config.clone(),
                    data_dir: dir.join(format!("node-{id}")),
                    log,
                    signer: signer.to_string(),
                    metrics: *metrics,
                });
                children.push(child);
            }
            Err(e) => {
                eprintln!("baton cluster up: cannot start node {id}: {e}");
                stop_children(&mut children, Duration::from_secs(5));
                return ExitCode::from(1);
            }
        }
    }
    let certs = dir.join("certs");
    let (client_cert, client_key) = tls::client_files(&certs);
    let endpoints: Vec<SocketAddr> = infos.iter().map(|n| n.addr).collect();
    let ca = certs.join("ca.pem");
    // Waiting for a leader and registering the rollups; a signal meanwhile stops the nodes.
    let logs: Vec<(u64, PathBuf)> = infos.iter().map(|n| (n.id, n.log.clone())).collect();
    let started = rt.block_on(async {
        let startup = async {
            let leader = wait_for_leader(
                &endpoints,
                &ca,
                Duration::from_millis(args.leader_timeout_ms),
                || exited_node(&mut children, &logs),
            )
            .await?;
            crate::rollup_cmd::register_rollups(
                &endpoints,
                &ca,
                &args.rollups,
                crate::rollup_cmd::DEFAULT_POLICY,
            )
            .await?;
            Ok::<u64, String>(leader)
        };
        tokio::select! {
            r = startup => r,
            s = signals.recv() => Err(format!("{s} while starting")),
        }
    });
    let leader = match started {
        Ok(l) => l,
        Err(e) => {
            // Where the nodes still running wait, before they are stopped: a node that never
            // answered shows here what it was blocked in.
            let threads = running_threads(&mut children, &logs);
            stop_children(&mut children, Duration::from_secs(5));
            eprintln!(
                "baton cluster up: {e}\nnode logs are in {}; their last lines:\n{}\n{threads}",
                dir.display(),
                log_tails(&logs, 8)
            );
            return ExitCode::from(1);
        }
    };
    let info = ClusterInfo {
        cluster_id: "baton-local".into(),
        ca_cert: ca,
        client_cert,
        client_key,
        nodes: infos,
        leader,
        rollups: args.rollups.clone(),
    };
    let json = serde_json::to_string(&info).expect("serializable");
    let _ = std::fs::write(dir.join("cluster.json"), &json);
    if args.json {
        println!("{json}");
    } else {
        println!(
            "baton cluster up: {} nodes, leader {leader}, rollups {:?}",
            info.nodes.len(),
            info.rollups
        );
        for n in &info.nodes {
            println!(
                "  node {}  {}  pid {}  signer {}  log {}",
                n.id,
                n.addr,
                n.pid,
                n.signer,
                n.log.display()
            );
        }
        println!("  CA {}", info.ca_cert.display());
        println!("Ctrl-C stops the cluster.");
    }
    let _ = std::io::stdout().flush();
    let signal = rt.block_on(async {
        tokio::select! {
            s = signals.recv() => s,
            _ = watch_children_exit(&mut children, &info) => "every node exited",
        }
    });
    eprintln!("baton cluster up: {signal}, stopping the nodes");
    stop_children(&mut children, Duration::from_secs(10));
    ExitCode::SUCCESS
}

/// Resolves when every node process has exited (killed from outside, or stopped on its own: a
/// node whose storage fails exits 1); says so for each as it happens, with its exit status.
async fn watch_children_exit(children: &mut [Child], info: &ClusterInfo) {
    let mut reported = vec![false; children.len()];
    loop {
        for ((c, n), done) in children.iter_mut().zip(&info.nodes).zip(&mut reported) {
            if *done {
                continue;
            }
            if let Ok(Some(status)) = c.try_wait() {
                *done = true;
                eprintln!(
                    "baton cluster up: node {} exited ({status}); see {}",
                    n.id,
                    n.log.display()
                );
            }
        }
        if reported.iter().all(|&d| d) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The first of `children` (node ids and logs in `logs`, same order) that has exited, described
/// with its exit status and the end of its log: a node that cannot start (its port is taken, its
/// WAL is unreadable) ends the wait for a leader at once instead of at the timeout.
pub fn exited_node(children: &mut [Child], logs: &[(u64, PathBuf)]) -> Result<(), String> {
    for (c, (id, log)) in children.iter_mut().zip(logs) {
        if let Ok(Some(status)) = c.try_wait() {
            return Err(format!(
                "node {id} exited while starting ({status}); the end of {}:\n{}",
                log.display(),
                tail(log, 8)
            ));
        }
    }
    Ok(())
}

/// Each thread of each child still running: name, state, the kernel function it sleeps in,
/// and its kernel stack where this process may read it (root).
pub fn running_threads(children: &mut [Child], logs: &[(u64, PathBuf)]) -> String {
    let mut out = String::new();
    for (c, (id, _)) in children.iter_mut().zip(logs) {
        if !matches!(c.try_wait(), Ok(None)) {
            continue;
        }
        out.push_str(&format!("  threads of node {id} (pid {}):\n", c.id()));
        let tasks = PathBuf::from(format!("/proc/{}/task", c.id()));
        let Ok(entries) = std::fs::read_dir(&tasks) else {
            continue;
        };
        let mut tids: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        tids.sort();
        for t in tids {
            let read = |f: &str| {
                std::fs::read_to_string(t.join(f))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default()
            };
            // The state is the field after the parenthesized name in `stat`.
            let stat = read("stat");
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').next())
                .unwrap_or("?")
                .to_string();
            let stack: Vec<String> = read("stack")
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .map(|f| f.split('+').next().unwrap_or(f).to_string())
                // The system call entry and thread start frames say nothing.
                .filter(|f| {
                    !f.starts_with("do_syscall_64")
                        && !f.starts_with("entry_SYSCALL")
                        && !f.starts_with("ret_from_fork")
                })
                .collect();
            out.push_str(&format!(
                "    {} {} {state} in {} [{}]\n",
                t.file_name().unwrap_or_default().to_string_lossy(),
                read("comm"),
                read("wchan"),
                stack.join(" < ")
            ));
        }
    }
    out
}

/// The last `lines` lines of `path`, indented (or why it could not be read).
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            all[from..]
                .iter()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(e) => format!("    ({e})"),
    }
}

/// The end of every node's log, for a failed start.
pub fn log_tails(logs: &[(u64, PathBuf)], lines: usize) -> String {
    logs.iter()
        .map(|(id, log)| format!("  node {id} ({}):\n{}", log.display(), tail(log, lines)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls the nodes' status until one of them reports a leader that all of them agree on.
/// `check` runs before every round and ends the wait with its error (a node process exited).
pub async fn wait_for_leader(
    endpoints: &[SocketAddr],
    ca: &Path,
    timeout: Duration,
    mut check: impl FnMut() -> Result<(), String>,
) -> Result<u64, String> {
    let deadline = Instant::now() + timeout;
    let clients: Vec<Client> = endpoints
        .iter()
        .map(|e| {
            let mut o = ClientOptions::new(vec![*e], ca);
            o.attempts_max = 1;
            o.call_budget_ms = 1_000;
            Client::new(o).map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        check()?;
        let mut leaders = Vec::new();
        for c in &clients {
            match c.status().await {
                Ok(s) => leaders.push(s.leader),
                Err(e) => last = e.to_string(),
            }
        }
        if leaders.len() == clients.len() && leaders.iter().all(|l| l.is_some() && *l == leaders[0])
        {
            return Ok(leaders[0].expect("checked"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "no leader within {} ms (last: {last})",
        timeout.as_millis()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running child is reported thread by thread (name and state); an exited one is not.
    #[test]
    fn running_threads_reports_the_threads_of_children_still_running() {
        let mut children = vec![
            Command::new("sleep").arg("30").spawn().unwrap(),
            Command::new("true").spawn().unwrap(),
        ];
        // `true` has exited once it can be waited for.
        let _ = children[1].wait();
        let logs = vec![(1, PathBuf::from("n1.log")), (2, PathBuf::from("n2.log"))];
        // The sleeper is asleep once its state says so (it may still be starting).
        let deadline = Instant::now() + Duration::from_secs(10);
        let report = loop {
            let report = running_threads(&mut children, &logs);
            if report.contains(" sleep S ") || Instant::now() > deadline {
                break report;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = children[0].kill();
        let _ = children[0].wait();
        let pid = children[0].id();
        assert!(
            report.contains(&format!("threads of node 1 (pid {pid})")),
            "{report}"
        );
        assert!(
            report.contains(&format!("    {pid} sleep S in ")),
            "{report}"
        );
        assert!(!report.contains("node 2"), "{report}");
    }
}
