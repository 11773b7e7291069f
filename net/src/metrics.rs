//! A node's metrics over HTTP, for Prometheus (or anything that reads the OpenMetrics text
//! format): `GET /metrics` on the TCP address `metrics_addr` names (node.toml; off unless set).
//!
//! A scrape gathers, on the network runtime: the node's Raft status (role, term, leader, log
//! indices, membership, and on the leader each follower's progress), the stage latencies since
//! the node started as histograms ([`baton_core::node::Stages::totals`]), what the client
//! endpoint counted ([`Counters`]), and the process's memory and CPU. Nothing is kept between
//! scrapes; the node pays for metrics only when scraped. docs/operations.md lists the series.
//!
//! The HTTP side is the least a scraper needs, on purpose: one request per connection, a
//! request head of at most [`REQUEST_HEAD_BYTES_MAX`] that must arrive within [`HEAD_TIMEOUT`],
//! the whole exchange within [`REQUEST_TIMEOUT`], at most [`CONNECTIONS_MAX`] connections at
//! once (more are closed at once), `GET` or `HEAD` of `/metrics` (a query string is ignored);
//! anything else gets a 4xx status and the connection closed. Scrapes closer together than
//! [`RENDER_REUSE`] get the same rendered text, so a scraper in a loop costs the node no more
//! than one scrape a second. Bind it to a loopback or management address: it has no
//! authentication.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baton_core::node::{NodeStatus, Role, StageTotal, SubmitError};
use baton_core::Receipt;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Longest request head (request line and headers) read.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 << 10;
/// How long a connection may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection may take from its accept to its close (head, answer, lingering).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A rendered scrape is answered again to scrapes within this long of it.
pub const RENDER_REUSE: Duration = Duration::from_secs(1);
/// Connections served at once; one more is closed without an answer.
pub const CONNECTIONS_MAX: usize = 8;
/// How long a scrape waits for the node's Raft status (the Raft shard answers it); past it the
/// scrape answers without the Raft series and `baton_raft_status_ok` 0.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Upper bounds of the stage histograms' buckets, in seconds (`+Inf` follows).
pub const STAGE_BUCKETS_S: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// What the client endpoint counts, from the node's start.
#[derive(Debug, Default)]
pub struct Counters {
    /// Client connections open now.
    connections_open: AtomicI64,
    /// Client connections accepted (handshake done).
    connections: AtomicU64,
    /// Submission requests answered.
    submit_requests: AtomicU64,
    /// Client requests read, by [`REQUEST_KINDS`] slot.
    requests: [AtomicU64; REQUEST_KINDS.len()],
    /// Transactions answered with a receipt.
    receipts: AtomicU64,
    /// Transactions answered with an error, by [`SubmitError::kind_index`].
    errors: [AtomicU64; SubmitError::KINDS.len()],
    /// Client streams whose framing broke (a malformed, truncated or oversized frame).
    protocol_errors: AtomicU64,
}

/// The client request kinds counted by `baton_client_requests_total{kind}`, the last for
/// frames of any other kind.
pub const REQUEST_KINDS: [&str; 9] = [
    "submit",
    "status",
    "command",
    "read",
    "subscribe",
    "stages",
    "member",
    "leader",
    "other",
];

fn request_slot(kind: crate::frame::FrameKind) -> usize {
    use crate::frame::FrameKind as K;
    match kind {
        K::SubmitRequest => 0,
        K::StatusRequest => 1,
        K::CommandRequest => 2,
        K::ReadRequest => 3,
        K::SubscribeRequest => 4,
        K::StagesRequest => 5,
        K::MemberRequest => 6,
        K::LeaderRequest => 7,
        _ => 8,
    }
}

impl Counters {
    /// A client stream delivered a request frame of `kind`.
    pub fn request(&self, kind: crate::frame::FrameKind) {
        self.requests[request_slot(kind)].fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection was accepted; the guard counts it open until dropped.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }

    /// A submission was answered with `results`.
    pub fn submitted(&self, results: &[Result<Receipt, SubmitError>]) {
        self.submit_requests.fetch_add(1, Ordering::Relaxed);
        let mut receipts = 0;
        for r in results {
            match r {
                Ok(_) => receipts += 1,
                Err(e) => {
                    self.errors[e.kind_index()].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.receipts.fetch_add(receipts, Ordering::Relaxed);
    }

    /// A client stream's framing broke.
    pub fn protocol_error(&self) {
        self.protocol_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts a client connection open while it lives ([`Counters::connection`]).
pub struct ConnectionGuard(Arc<Counters>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a scrape reads from: the node's QUIC endpoint context (its node handle, cluster id,
/// counters and admission bound).
pub struct Source {
    /// The endpoint's context.
    ctx: Arc<crate::server::ServerContext>,
    /// The node's links to its peers.
    links: Arc<crate::peer::PeerLinks>,
    /// The last rendered text and when its gathering began (held while a scrape renders, so
    /// that concurrent scrapes wait for one rendering instead of each making their own).
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Arc<String>)>>,
}

/// Everything one scrape reports, gathered before it is encoded.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Node id.
    pub node_id: u64,
    /// Cluster id.
    pub cluster_id: String,
    /// Address of the node's signing key.
    pub signer: String,
    /// The Raft status, if the Raft shard answered in time.
    pub status: Option<NodeStatus>,
    /// Stage latencies since the start.
    pub stages: Vec<StageTotal>,
    /// Client connections open now.
    pub connections_open: i64,
    /// Client connections accepted.
    pub connections: u64,
    /// Submission requests answered.
    pub submit_requests: u64,
    /// Client requests read, per kind (in [`REQUEST_KINDS`] order).
    pub requests: Vec<u64>,
    /// Transactions answered with a receipt.
    pub receipts: u64,
    /// Transactions answered with an error, per kind (in [`SubmitError::KINDS`] order).
    pub errors: Vec<u64>,
    /// Client streams whose framing broke.
    pub protocol_errors: u64,
    /// Submission bytes admitted now.
    pub admitted_bytes: u64,
    /// The node's links to its peers.
    pub peers: Vec<crate::peer::PeerLinkStats>,
    /// The process's resident memory, bytes.
    pub rss_bytes: Option<u64>,
    /// The process's CPU time (user + system), seconds.
    pub cpu_seconds: Option<f64>,
    /// The process's open file descriptors.
    pub open_fds: Option<u64>,
}

impl Source {
    /// A source reading from the endpoint context `ctx` and the peer links `links`.
    pub fn new(
        ctx: Arc<crate::server::ServerContext>,
        links: Arc<crate::peer::PeerLinks>,
    ) -> Source {
        Source {
            ctx,
            links,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The rendered metrics: the last rendering if it began within [`RENDER_REUSE`], else a
    /// new one.
    pub async fn rendered(&self) -> Arc<String> {
        let mut last = self.last.lock().await;
        if let Some((at, text)) = last.as_ref() {
            if at.elapsed() < RENDER_REUSE {
                return text.clone();
            }
        }
        let at = tokio::time::Instant::now();
        let text = Arc::new(render(&self.snapshot().await));
        *last = Some((at, text.clone()));
        text
    }

    /// Gathers a scrape's values.
    pub async fn snapshot(&self) -> Snapshot {
        let ctx = &self.ctx;
        let status = tokio::time::timeout(STATUS_TIMEOUT, ctx.node.status())
            .await
            .ok()
            .and_then(Result::ok);
        let bounds: Vec<Duration> = STAGE_BUCKETS_S
            .iter()
            .map(|&s| Duration::from_secs_f64(s))
            .collect();
        let c = &ctx.counters;
        Snapshot {
            node_id: ctx.node_id,
            cluster_id: ctx.cluster_id.clone(),
            signer: ctx.node.signer().to_string(),
            status,
            stages: ctx.node.stage_recorder().totals(&bounds),
            connections_open: c.connections_open.load(Ordering::Relaxed),
            connections: c.connections.load(Ordering::Relaxed),
            submit_requests: c.submit_requests.load(Ordering::Relaxed),
            requests: c
                .requests
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect(),
            receipts: c.receipts.load(Ordering::Relaxed),
            errors: c.errors.iter().map(|e| e.load(Ordering::Relaxed)).collect(),
            protocol_errors: c.protocol_errors.load(Ordering::Relaxed),
            admitted_bytes: ctx.admission.admitted() as u64,
            peers: self.links.peer_stats(),
            rss_bytes: process_rss_bytes(),
            cpu_seconds: process_cpu_seconds(),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
        }
    }
}

fn page_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(4096)
}

fn process_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_bytes())
}

fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line (utime, stime) are 11 and 12 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

/// `value` as an OpenMetrics label value: backslash, double quote and newline escaped.
fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Encodes a snapshot in the OpenMetrics text format (ending in `# EOF`).
pub fn render(snapshot: &Snapshot) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String does not fail");
    out
}

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

/// A value for `encode_gauge` / `encode_counter` without exemplars.
type NoExemplar = Option<&'static prometheus_client::metrics::exemplar::Exemplar<NoLabelSet, f64>>;

impl prometheus_client::collector::Collector for SnapshotCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let gauge = |e: &mut DescriptorEncoder, name: &str, help: &str, v: i64| {
            e.encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&v)
        };
        let counter = |e: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            e.encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter(&v, None as NoExemplar)
        };

        let node_id = s.node_id.to_string();
        // The encoder writes label values as they are; the cluster id is the one free-form one.
        let cluster_id = escape_label_value(&s.cluster_id);
        e.encode_descriptor("baton_node", "The node.", None, MetricType::Info)?
            .encode_info(&[
                ("node_id", node_id.as_str()),
                ("cluster_id", cluster_id.as_str()),
                ("signer", s.signer.as_str()),
            ])?;
        gauge(
            &mut e,
            "baton_raft_status_ok",
            "1 if the Raft shard answered this scrape's status request in time (else the baton_raft series are missing).",
            i64::from(s.status.is_some()),
        )?;
        if let Some(st) = &s.status {
            encode_raft(&mut e, st)?;
        }

        let mut fam = e.encode_descriptor(
            "baton_stage_seconds",
            "Where the sequencing path's time went since the node started, by stage (docs/operations.md, stage latencies).",
            None,
            MetricType::Histogram,
        )?;
        for t in &s.stages {
            let mut buckets = Vec::with_capacity(t.buckets.len() + 1);
            let mut below = 0;
            for (&bound, &(_, cumulative)) in STAGE_BUCKETS_S.iter().zip(&t.buckets) {
                // A histogram bucket spans 1%: a value just above a bound may count below it,
                // never below the previous bound's count.
                let cumulative = cumulative.max(below).min(t.count);
                buckets.push((bound, cumulative - below));
                below = cumulative;
            }
            buckets.push((f64::MAX, t.count - below));
            fam.encode_family(&[("stage", t.stage.name())])?
                .encode_histogram::<NoLabelSet>(t.sum.as_secs_f64(), t.count, &buckets, None)?;
        }

        gauge(
            &mut e,
            "baton_client_connections_open",
            "Client connections open.",
            s.connections_open,
        )?;
        counter(
            &mut e,
            "baton_client_connections",
            "Client connections accepted.",
            s.connections,
        )?;
        counter(
            &mut e,
            "baton_client_submit_requests",
            "Submission requests answered.",
            s.submit_requests,
        )?;
        let mut fam = e.encode_descriptor(
            "baton_client_requests",
            "Client requests read, by kind (a stream's framing errors are counted apart).",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in REQUEST_KINDS.iter().zip(&s.requests) {
            fam.encode_family(&[("kind", *kind)])?
                .encode_counter(n, None as NoExemplar)?;
        }
        let mut fam = e.encode_descriptor(
            "baton_client_transactions",
            "Transactions of submission requests answered, by result: receipt, or the kind of error.",
            None,
            MetricType::Counter,
        )?;
        fam.encode_family(&[("result", "receipt")])?
            .encode_counter(&s.receipts, None as NoExemplar)?;
        for (kind, n) in SubmitError::KINDS.iter().zip(&s.errors) {
            fam.encode_family(&[("result", *kind)])?
                .encode_counter(n, None as NoExemplar)?;
        }
        counter(
            &mut e,
            "baton_client_protocol_errors",
            "Client streams closed because their framing broke (malformed, truncated or oversized frames).",
            s.protocol_errors,
        )?;
        gauge(
            &mut e,
            "baton_client_admitted_bytes",
            "Submission bytes admitted and not yet answered (bounded by client_bytes_in_flight_max).",
            s.admitted_bytes as i64,
        )?;

        encode_peers(&mut e, &s.peers)?;

        if let Some(rss) = s.rss_bytes {
            gauge(
                &mut e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                rss as i64,
            )?;
        }
        if let Some(cpu) = s.cpu_seconds {
            e.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?
            .encode_counter(&cpu, None as NoExemplar)?;
        }
        if let Some(fds) = s.open_fds {
            gauge(
                &mut e,
                "process_open_fds",
                "Number of open file descriptors.",
                fds as i64,
            )?;
        }
        Ok(())
    }
}

fn encode_peers(
    e: &mut DescriptorEncoder,
    peers: &[crate::peer::PeerLinkStats],
) -> Result<(), std::fmt::Error> {
    /// A series: its name, its help, and its value for one peer (`None`: no sample).
    type Series<V> = (
        &'static str,
        &'static str,
        fn(&crate::peer::PeerLinkStats) -> V,
    );
    let gauges: [Series<Option<f64>>; 3] = [
        (
            "baton_peer_connected",
            "1 while this node's connection to the peer (replication, votes, forwarding) is open.",
            |p| Some(f64::from(u8::from(p.connected))),
        ),
        (
            "baton_peer_dial_failures",
            "Dials of the peer that failed in a row with no link open (0: the last one succeeded).",
            |p| Some(f64::from(p.dial_failures)),
        ),
        (
            "baton_peer_rtt_seconds",
            "QUIC's smoothed round trip to the peer, while connected.",
            |p| p.rtt.map(|rtt| rtt.as_secs_f64()),
        ),
    ];
    for (name, help, value) in gauges {
        let mut fam = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for p in peers {
            if let Some(v) = value(p) {
                fam.encode_family(&[("peer", p.peer)])?.encode_gauge(&v)?;
            }
        }
    }
    let counters: [Series<u64>; 3] = [
        (
            "baton_peer_lost_packets",
            "Packets the connection to the peer declared lost (from 0 again after a new dial).",
            |p| p.lost_packets,
        ),
        (
            "baton_peer_sent_bytes",
            "UDP payload bytes sent to the peer (from 0 again after a new dial).",
            |p| p.sent_bytes,
        ),
        (
            "baton_peer_received_bytes",
            "UDP payload bytes received from the peer on this node's connection (from 0 again after a new dial).",
            |p| p.received_bytes,
        ),
    ];
    for (name, help, value) in counters {
        let mut fam = e.encode_descriptor(name, help, None, MetricType::Counter)?;
        for p in peers {
            fam.encode_family(&[("peer", p.peer)])?
                .encode_counter(&value(p), None as NoExemplar)?;
        }
    }
    Ok(())
}

fn encode_raft(e: &mut DescriptorEncoder, st: &NodeStatus) -> Result<(), std::fmt::Error> {
    let index = |i: Option<u64>| i.unwrap_or(0) as i64;
    let mut fam = e.encode_descriptor(
        "baton_raft_role",
        "1 for the node's current Raft role.",
        None,
        MetricType::Gauge,
    )?;
    for role in Role::ALL {
        fam.encode_family(&[("role", role.name())])?
            .encode_gauge(&i64::from(st.role == role))?;
    }
    for (name, help, v) in [
        ("baton_raft_term", "Current term.", st.term as i64),
        (
            "baton_raft_leader_id",
            "The leader this node knows of (0: none).",
            st.leader.unwrap_or(0) as i64,
        ),
        (
            "baton_raft_last_log_index",
            "Last index in the local log (0: empty).",
            index(st.last_log_index),
        ),
        (
            "baton_raft_committed_index",
            "Highest index known committed (0: none).",
            index(st.committed_index),
        ),
        (
            "baton_raft_applied_index",
            "Highest index applied to the state machine (0: none).",
            index(st.applied_index),
        ),
        (
            "baton_raft_snapshot_index",
            "Index the latest snapshot covers (0: none).",
            index(st.snapshot_index),
        ),
        (
            "baton_raft_purged_index",
            "Log entries up to this index were purged (0: none).",
            index(st.purged_index),
        ),
        (
            "baton_raft_voters",
            "Voters in the membership.",
            st.members.iter().filter(|m| m.voter).count() as i64,
        ),
        (
            "baton_raft_learners",
            "Learners in the membership.",
            st.members.iter().filter(|m| !m.voter).count() as i64,
        ),
    ] {
        e.encode_descriptor(name, help, None, MetricType::Gauge)?
            .encode_gauge(&v)?;
    }
    if !st.replication.is_empty() {
        let last = index(st.last_log_index);
        let mut fam = e.encode_descriptor(
            "baton_raft_peer_lag_entries",
            "On the leader: entries of its log a follower is not known to hold.",
            None,
            MetricType::Gauge,
        )?;
        for p in &st.replication {
            let lag = (last - index(p.matched_index)).max(0);
            fam.encode_family(&[("peer", p.id)])?.encode_gauge(&lag)?;
        }
        let mut fam = e.encode_descriptor(
            "baton_raft_peer_last_heard_seconds",
            "On the leader: time since the last request a follower acknowledged was sent (absent: none this term).",
            None,
            MetricType::Gauge,
        )?;
        for p in &st.replication {
            if let Some(ms) = p.last_heard_ms {
                fam.encode_family(&[("peer", p.id)])?
                    .encode_gauge(&(ms as f64 / 1000.0))?;
            }
        }
    }
    Ok(())
}

/// Serves `GET /metrics` on `listener` until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, source: Arc<Source>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: wait a little instead of spinning.
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%remote, "metrics: too many connections, closing one");
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &source))
                .await
                .is_err()
            {
                tracing::debug!(%remote, "metrics: request timed out");
            }
            drop(slot);
        });
    }
}

/// What a request head asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// `GET /metrics`.
    Metrics,
    /// `HEAD /metrics`: the headers only.
    MetricsHead,
}

/// Why a request head is refused: the HTTP status to answer.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Refusal {
    /// 400: not an HTTP/1 request line.
    BadRequest,
    /// 404: a path other than `/metrics`.
    NotFound,
    /// 405: a method other than GET or HEAD.
    MethodNotAllowed,
    /// 431: the head did not end within [`REQUEST_HEAD_BYTES_MAX`].
    HeadTooLarge,
}

impl Refusal {
    fn status_line(self) -> &'static str {
        match self {
            Refusal::BadRequest => "400 Bad Request",
            Refusal::NotFound => "404 Not Found",
            Refusal::MethodNotAllowed => "405 Method Not Allowed",
            Refusal::HeadTooLarge => "431 Request Header Fields Too Large",
        }
    }
}

/// Parses the request line of a complete request head.
pub fn parse_request(head: &[u8]) -> Result<Request, Refusal> {
    let line_end = head
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(Refusal::BadRequest)?;
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| Refusal::BadRequest)?;
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::BadRequest);
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || !target.starts_with('/') {
        return Err(Refusal::BadRequest);
    }
    let path = target.split('?').next().unwrap_or(target);
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => {
            return Err(Refusal::MethodNotAllowed)
        }
        _ => return Err(Refusal::BadRequest),
    };
    if path != "/metrics" {
        return Err(Refusal::NotFound);
    }
    Ok(if head_only {
        Request::MetricsHead
    } else {
        Request::Metrics
    })
}

/// Where a request head ends (after its blank line: CRLF CRLF, or LF LF), if it has; only
/// blank lines with a byte at or after `from` are looked for (the bytes before were searched).
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let tail = &buf[start..];
    let crlf = tail
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = tail.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(start + a.min(b)),
        (a, b) => a.or(b).map(|end| start + end),
    }
}

async fn answer(mut stream: tokio::net::TcpStream, source: &Source) {
    let mut buf = Vec::with_capacity(1024);
    let read_head = async {
        let mut searched = 0;
        loop {
            if let Some(end) = head_end(&buf, searched) {
                return Some(parse_request(&buf[..end]));
            }
            searched = buf.len();
            if buf.len() >= REQUEST_HEAD_BYTES_MAX {
                return Some(Err(Refusal::HeadTooLarge));
            }
            let mut chunk = [0u8; 1024];
            let room = (REQUEST_HEAD_BYTES_MAX - buf.len()).min(chunk.len());
            match stream.read(&mut chunk[..room]).await {
                // Closed before a whole head: nothing to answer if nothing came.
                Ok(0) | Err(_) => return (!buf.is_empty()).then_some(Err(Refusal::BadRequest)),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let request = match tokio::time::timeout(HEAD_TIMEOUT, read_head).await {
        Ok(Some(r)) => r,
        Ok(None) | Err(_) => return,
    };
    let response = match request {
        Ok(r) => {
            let body = source.rendered().await;
            let mut out = String::with_capacity(body.len() + 160);
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if r == Request::Metrics {
                out.push_str(body.as_str());
            }
            out
        }
        Err(refusal) => {
            let body = format!("{}\n", refusal.status_line());
            format!(
                "HTTP/1.1 {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                refusal.status_line(),
                body.len()
            )
        }
    };
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Closing with unread bytes would reset the connection, and a reset can discard the answer
    // before the client reads it: read what the client still sends (bounded) until it closes.
    let mut rest = [0u8; 1024];
    let mut drained = 0;
    let linger = async {
        while drained < LINGER_BYTES_MAX {
            match stream.read(&mut rest).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, linger).await;
}

/// After answering, how long a connection is read (and what it sends discarded) before it is
/// closed, and how much is read at most.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES_MAX: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::node::{Member, PeerProgress, Stage};

    #[test]
    fn request_lines_are_parsed_and_refused_with_a_status() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(Request::Metrics)
        );
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.0\n\n"),
            Ok(Request::Metrics)
        );
        assert_eq!(
            parse_request(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Ok(Request::MetricsHead)
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\n\r\n"),
            Err(Refusal::NotFound)
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Err(Refusal::MethodNotAllowed)
        );
        for bad in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n"[..],
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert_eq!(parse_request(bad), Err(Refusal::BadRequest), "{bad:?}");
        }
        let head = b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest";
        for from in 0..head.len() {
            // Found while the search starts within the blank line (bytes 20..24).
            let want = (from <= 23).then_some(24);
            assert_eq!(head_end(head, from), want, "from {from}");
        }
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.0\n\nx", 0), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\r\n\r\n", 0), Some(19));
    }

    fn snapshot() -> Snapshot {
        let status = NodeStatus {
            id: 2,
            role: Role::Leader,
            term: 7,
            leader: Some(2),
            last_log_index: Some(120),
            committed_index: Some(118),
            applied_index: Some(117),
            snapshot_index: None,
            purged_index: None,
            members: vec![
                Member {
                    id: 1,
                    addr: "127.0.0.1:1".into(),
                    voter: true,
                },
                Member {
                    id: 2,
                    addr: "127.0.0.1:2".into(),
                    voter: true,
                },
                Member {
                    id: 3,
                    addr: "127.0.0.1:3".into(),
                    voter: false,
                },
            ],
            replication: vec![
                PeerProgress {
                    id: 1,
                    matched_index: Some(100),
                    last_heard_ms: Some(1500),
                },
                PeerProgress {
                    id: 3,
                    matched_index: None,
                    last_heard_ms: None,
                },
            ],
            signer: baton_core::Address([0xab; 20]),
        };
        let stages = baton_core::node::Stages::default();
        for us in [40, 90, 3_000, 20_000_000] {
            stages.record(Stage::Wal, Duration::from_micros(us));
        }
        let bounds: Vec<Duration> = STAGE_BUCKETS_S
            .iter()
            .map(|&s| Duration::from_secs_f64(s))
            .collect();
        let mut errors = vec![0; SubmitError::KINDS.len()];
        errors[SubmitError::ShuttingDown.kind_index()] = 4;
        Snapshot {
            node_id: 2,
            cluster_id: "prod-a".into(),
            signer: baton_core::Address([0xab; 20]).to_string(),
            status: Some(status),
            stages: stages.totals(&bounds),
            connections_open: 3,
            connections: 9,
            submit_requests: 50,
            requests: vec![50, 7, 0, 0, 0, 0, 0, 0, 1],
            receipts: 4_996,
            errors,
            protocol_errors: 1,
            admitted_bytes: 4096,
            peers: vec![
                crate::peer::PeerLinkStats {
                    peer: 1,
                    connected: true,
                    rtt: Some(Duration::from_micros(250)),
                    lost_packets: 3,
                    sent_bytes: 1_000_000,
                    received_bytes: 20_000,
                    dial_failures: 0,
                },
                crate::peer::PeerLinkStats {
                    peer: 3,
                    connected: false,
                    rtt: None,
                    lost_packets: 0,
                    sent_bytes: 0,
                    received_bytes: 0,
                    dial_failures: 4,
                },
            ],
            rss_bytes: Some(1 << 30),
            cpu_seconds: Some(12.5),
            open_fds: Some(40),
        }
    }

    /// The value of the sample whose line starts with `series ` (name and labels).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn a_snapshot_renders_as_openmetrics_text() {
        let text = render(&snapshot());
        assert!(text.ends_with("# EOF\n"), "{text}");
        let info = format!(
            "baton_node_info{{node_id=\"2\",cluster_id=\"prod-a\",signer=\"{}\"}}",
            baton_core::Address([0xab; 20])
        );
        assert_eq!(sample(&text, &info), Some(1.0), "{text}");
        assert_eq!(sample(&text, "baton_raft_status_ok"), Some(1.0));
        assert_eq!(sample(&text, "baton_raft_role{role=\"leader\"}"), Some(1.0));
        assert_eq!(
            sample(&text, "baton_raft_role{role=\"follower\"}"),
            Some(0.0)
        );
        assert_eq!(sample(&text, "baton_raft_term"), Some(7.0));
        assert_eq!(sample(&text, "baton_raft_leader_id"), Some(2.0));
        assert_eq!(sample(&text, "baton_raft_applied_index"), Some(117.0));
        assert_eq!(sample(&text, "baton_raft_snapshot_index"), Some(0.0));
        assert_eq!(sample(&text, "baton_raft_voters"), Some(2.0));
        assert_eq!(sample(&text, "baton_raft_learners"), Some(1.0));
        assert_eq!(
            sample(&text, "baton_raft_peer_lag_entries{peer=\"1\"}"),
            Some(20.0)
        );
        assert_eq!(
            sample(&text, "baton_raft_peer_lag_entries{peer=\"3\"}"),
            Some(120.0)
        );
        assert_eq!(
            sample(&text, "baton_raft_peer_last_heard_seconds{peer=\"1\"}"),
            Some(1.5)
        );
        assert_eq!(
            sample(&text, "baton_raft_peer_last_heard_seconds{peer=\"3\"}"),
            None
        );
        // Histograms: cumulative buckets, +Inf equal to the count, the exact sum.
        let wal = |le: &str| {
            sample(
                &text,
                &format!("baton_stage_seconds_bucket{{le=\"{le}\",stage=\"wal\"}}"),
            )
        };
        assert_eq!(wal("0.00005"), Some(1.0), "{text}");
        assert_eq!(wal("0.0001"), Some(2.0), "{text}");
        assert_eq!(wal("0.005"), Some(3.0), "{text}");
        assert_eq!(wal("10.0"), Some(3.0), "{text}");
        assert_eq!(wal("+Inf"), Some(4.0), "{text}");
        assert_eq!(
            sample(&text, "baton_stage_seconds_count{stage=\"wal\"}"),
            Some(4.0)
        );
        let sum = sample(&text, "baton_stage_seconds_sum{stage=\"wal\"}").unwrap();
        assert!((sum - 20.003_13).abs() < 1e-9, "{sum}");
        assert_eq!(
            sample(&text, "baton_stage_seconds_count{stage=\"commit\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "baton_client_transactions_total{result=\"receipt\"}"),
            Some(4996.0)
        );
        assert_eq!(
            sample(
                &text,
                "baton_client_transactions_total{result=\"shutting_down\"}"
            ),
            Some(4.0)
        );
        assert_eq!(
            sample(
                &text,
                "baton_client_transactions_total{result=\"overloaded\"}"
            ),
            Some(0.0)
        );
        assert_eq!(sample(&text, "baton_client_connections_open"), Some(3.0));
        assert_eq!(
            sample(&text, "baton_client_requests_total{kind=\"status\"}"),
            Some(7.0)
        );
        assert_eq!(
            sample(&text, "baton_client_requests_total{kind=\"other\"}"),
            Some(1.0)
        );
        assert_eq!(sample(&text, "baton_client_connections_total"), Some(9.0));
        assert_eq!(
            sample(&text, "baton_client_protocol_errors_total"),
            Some(1.0)
        );
        assert_eq!(sample(&text, "baton_client_admitted_bytes"), Some(4096.0));
        assert_eq!(
            sample(&text, "process_resident_memory_bytes"),
            Some((1u64 << 30) as f64)
        );
        assert_eq!(sample(&text, "process_cpu_seconds_total"), Some(12.5));
        assert_eq!(sample(&text, "baton_peer_connected{peer=\"1\"}"), Some(1.0));
        assert_eq!(sample(&text, "baton_peer_connected{peer=\"3\"}"), Some(0.0));
        assert_eq!(
            sample(&text, "baton_peer_dial_failures{peer=\"3\"}"),
            Some(4.0)
        );
        assert_eq!(
            sample(&text, "baton_peer_rtt_seconds{peer=\"1\"}"),
            Some(0.00025)
        );
        assert_eq!(sample(&text, "baton_peer_rtt_seconds{peer=\"3\"}"), None);
        assert_eq!(
            sample(&text, "baton_peer_lost_packets_total{peer=\"1\"}"),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, "baton_peer_sent_bytes_total{peer=\"1\"}"),
            Some(1e6)
        );
        assert_eq!(
            sample(&text, "baton_peer_received_bytes_total{peer=\"1\"}"),
            Some(20_000.0)
        );
        // Every series is declared once, before its samples.
        for family in [
            "baton_raft_term",
            "baton_stage_seconds",
            "baton_client_transactions",
        ] {
            let decl = format!("# TYPE {family} ");
            assert_eq!(text.matches(&decl).count(), 1, "{family}");
        }
    }

    #[test]
    fn without_a_raft_status_the_raft_series_are_left_out() {
        let mut s = snapshot();
        s.status = None;
        let text = render(&s);
        assert_eq!(sample(&text, "baton_raft_status_ok"), Some(0.0));
        assert!(!text.contains("baton_raft_term"), "{text}");
        let info = format!(
            "baton_node_info{{node_id=\"2\",cluster_id=\"prod-a\",signer=\"{}\"}} 1",
            baton_core::Address([0xab; 20])
        );
        assert!(text.contains(&info), "the signer stays: {text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_free_form_cluster_id_is_escaped_in_its_label() {
        let mut s = snapshot();
        s.cluster_id = "a\"b\\c\nd".into();
        let text = render(&s);
        assert!(text.contains("cluster_id=\"a\\\"b\\\\c\\nd\""), "{text}");
        assert_eq!(
            text.matches('\n').count(),
            render(&snapshot()).matches('\n').count()
        );
    }

    #[test]
    fn this_process_reports_its_memory_cpu_and_descriptors() {
        let rss = process_rss_bytes().expect("statm");
        assert!(rss > 1 << 20, "{rss}");
        let burn = std::time::Instant::now();
        while burn.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        assert!(process_cpu_seconds().expect("stat") > 0.0);
    }

    #[test]
    fn counters_count_receipts_and_errors_by_kind_and_open_connections() {
        let c = Arc::new(Counters::default());
        let open = c.connection();
        let second = c.connection();
        drop(second);
        c.submitted(&[
            Err(SubmitError::Overloaded { what: "q" }),
            Err(SubmitError::Overloaded { what: "q" }),
            Err(SubmitError::ShuttingDown),
        ]);
        c.protocol_error();
        c.request(crate::frame::FrameKind::SubmitRequest);
        c.request(crate::frame::FrameKind::ReadRequest);
        c.request(crate::frame::FrameKind::RaftVote);
        let read: Vec<u64> = c
            .requests
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect();
        assert_eq!(read, [1, 0, 0, 1, 0, 0, 0, 0, 1]);
        assert_eq!(c.connections.load(Ordering::Relaxed), 2);
        assert_eq!(c.connections_open.load(Ordering::Relaxed), 1);
        drop(open);
        assert_eq!(c.connections_open.load(Ordering::Relaxed), 0);
        assert_eq!(c.submit_requests.load(Ordering::Relaxed), 1);
        assert_eq!(c.receipts.load(Ordering::Relaxed), 0);
        assert_eq!(c.errors[1].load(Ordering::Relaxed), 2);
        assert_eq!(c.errors[12].load(Ordering::Relaxed), 1);
        assert_eq!(c.protocol_errors.load(Ordering::Relaxed), 1);
    }
}
