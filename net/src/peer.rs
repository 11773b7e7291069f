//! The outgoing side of node-to-node traffic: connections to peers (mutual TLS, ALPN
//! `baton-peer/1`, a hello exchange that checks the cluster id and node id), openraft's network
//! (`RaftNetworkV2`) and the forwarder of followers' batches.
//!
//! openraft calls the network on the Raft shard (glommio). The QUIC work runs on the node's
//! tokio runtime; the two meet at bounded channels and task handles:
//! - votes, unary appends, snapshots and forwarded batches: one short-lived QUIC stream per
//!   call, spawned on tokio and awaited on glommio with the call's deadline, so a vote never
//!   queues behind replication;
//! - `stream_append`: one QUIC stream per replication session; the Raft shard encodes requests
//!   (batch bytes are shared, not copied) into a bounded channel, a tokio task writes them
//!   pipelined and another reads the in-order results.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_core::node::{Committed, Forwarder, Stage, Stages, SubmitError};
use baton_core::raft::wire::{self, WireError};
use baton_core::raft::{BatchBytes, SnapshotBlob, TypeConfig};
use bytes::Bytes;
use futures_channel::mpsc;
use futures_util::future::LocalBoxFuture;
use futures_util::{SinkExt, Stream, StreamExt};
use openraft::alias::{SnapshotOf, VoteOf};
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetworkFactory, RaftNetworkV2};

use crate::frame::FrameKind;
use crate::msg::{ErrorMsg, ForwardRequest, ForwardResponse, ForwardSealed, Hello, MsgError};
use crate::stream::{write_frame, write_frame_chunks, FrameReader, StreamError};

/// Replication requests encoded and waiting for the QUIC writer, per session.
const APPEND_QUEUE_MAX: usize = 64;
/// Bytes of those requests, at most: a follower that falls behind under overload holds the
/// leader's encoded requests (each a copy of its entries read from the log) only up to this, not
/// `APPEND_QUEUE_MAX` requests of up to `APPEND_BYTES_MAX` each; openraft reads further entries
/// once the writer has handed earlier ones to QUIC. One request of the largest size fits.
const APPEND_QUEUE_BYTES_MAX: usize = baton_core::raft::wire::APPEND_BYTES_MAX;
/// How long a replication request that carries no entries, only the leader's commit index,
/// waits for the next request of its session before it is sent alone. openraft sends one as soon
/// as an entry commits, and with little load no entry follows it at once: each then cost a round
/// trip of its own to every follower (their network thread, their Raft shard, and back), about a
/// quarter of the ~31 thread wake-ups of a committed request on 3 nodes (`perf sched timehist`).
/// Held, it travels with the next append, which a client waiting for its commit sends within
/// about half a millisecond. Only followers learn the commit later (their applied state, which
/// serves local reads, lags by at most this); the leader answers its clients at its own commit.
const COMMIT_ONLY_HOLD: Duration = Duration::from_millis(1);
/// A replication session with unanswered requests fails after this long without a response.
const APPEND_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on connecting to a peer and exchanging hellos.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed dial, the next dial to that peer waits this long, doubling with each further
/// failure up to [`DIAL_BACKOFF_MAX`]; a successful dial resets it. Without it a peer that
/// refuses connections (stopping, or not yet listening) is dialed in a tight loop: openraft backs
/// off only between the requests of a replication stream, and a stream that cannot connect never
/// asks for one.
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest wait between two dials to a peer that keeps failing: well under the shortest
/// election timeout (200 ms by default), so that a follower back after a restart is reached
/// before it campaigns (its higher term would then depose the leader).
const DIAL_BACKOFF_MAX: Duration = Duration::from_millis(50);
/// How long a forwarded batch may take to commit through the leader.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);
/// Snapshot data per chunk frame.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// QUIC application error code of a connection closed by its owner.
pub const CLOSE_NORMAL: u32 = 0;

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer address does not resolve.
    #[error("cannot resolve peer address {addr:?}")]
    Resolve { addr: String },
    /// QUIC refused to start the connection.
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    /// The connection failed or was lost.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A stream failed.
    #[error("stream: {0}")]
    Stream(#[from] StreamError),
    /// The peer belongs to another cluster.
    #[error("peer {addr} is in cluster {found:?}, not {expected:?}")]
    WrongCluster {
        addr: SocketAddr,
        expected: String,
        found: String,
    },
    /// Another node answers at the address.
    #[error("expected node {expected} at {addr}, found node {found}")]
    WrongNode {
        addr: SocketAddr,
        expected: u64,
        found: u64,
    },
    /// A Raft message did not decode.
    #[error("raft message: {0}")]
    Wire(#[from] WireError),
    /// A baton message did not decode.
    #[error("message: {0}")]
    Msg(#[from] MsgError),
    /// The peer answered with an error.
    #[error("peer error: {0}")]
    Remote(String),
    /// No answer in time.
    #[error("no answer within {ms} ms")]
    Timeout { ms: u64 },
    /// The node's network runtime is gone.
    #[error("the network runtime stopped")]
    RuntimeGone,
}

impl PeerError {
    /// True when the peer could not be reached at all (openraft backs off longer).
    fn unreachable(&self) -> bool {
        matches!(
            self,
            PeerError::Resolve { .. }
                | PeerError::Connect { .. }
                | PeerError::WrongCluster { .. }
                | PeerError::WrongNode { .. }
                | PeerError::RuntimeGone
        ) || matches!(self, PeerError::Connection(_))
    }
}

/// One peer link as [`PeerLinks::peer_stats`] sees it. The counts are the current
/// connection's: they start again from 0 when the link is dialed anew.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerLinkStats {
    /// The peer's node id.
    pub peer: u64,
    /// Whether the connection is open.
    pub connected: bool,
    /// QUIC's smoothed round-trip estimate, while connected.
    pub rtt: Option<Duration>,
    /// Packets the connection declared lost.
    pub lost_packets: u64,
    /// UDP payload bytes sent on the connection.
    pub sent_bytes: u64,
    /// UDP payload bytes received on it.
    pub received_bytes: u64,
    /// Dials that failed in a row since the last that succeeded (0: the last succeeded).
    pub dial_failures: u32,
}

/// Connections from this node to its peers, shared by openraft's network and the forwarder.
pub struct PeerLinks {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    cluster_id: String,
    node_id: u64,
    rt: tokio::runtime::Handle,
    conns: Mutex<HashMap<u64, quinn::Connection>>,
    /// Per peer whose last dial failed: failures in a row, and when the next dial may start.
    dial_failures: Mutex<HashMap<u64, (u32, tokio::time::Instant)>>,
    /// The node's stage histograms ([`Stage::Replicate`]), once the node is up.
    stages: std::sync::OnceLock<Stages>,
}

impl PeerLinks {
    /// Links for node `node_id` of `cluster_id`, dialing from `endpoint` with `config` (mutual
    /// TLS, peer ALPN); QUIC work runs on `rt`.
    pub fn new(
        endpoint: quinn::Endpoint,
        config: quinn::ClientConfig,
        cluster_id: String,
        node_id: u64,
        rt: tokio::runtime::Handle,
    ) -> Arc<PeerLinks> {
        Arc::new(PeerLinks {
            endpoint,
            config,
            cluster_id,
            node_id,
            rt,
            conns: Mutex::new(HashMap::new()),
            dial_failures: Mutex::new(HashMap::new()),
            stages: std::sync::OnceLock::new(),
        })
    }

    /// What this node's connections to its peers (those it dialed: replication, votes,
    /// forwarding) look like now, in peer id order: one entry per peer it has dialed or failed
    /// to dial.
    pub fn peer_stats(&self) -> Vec<PeerLinkStats> {
        let mut out: std::collections::BTreeMap<u64, PeerLinkStats> = Default::default();
        for (&peer, conn) in self.conns.lock().expect("conns lock").iter() {
            let open = conn.close_reason().is_none();
            let s = conn.stats();
            out.insert(
                peer,
                PeerLinkStats {
                    peer,
                    connected: open,
                    rtt: open.then_some(s.path.rtt),
                    lost_packets: s.path.lost_packets,
                    sent_bytes: s.udp_tx.bytes,
                    received_bytes: s.udp_rx.bytes,
                    dial_failures: 0,
                },
            );
        }
        for (&peer, &(failures, _)) in self
            .dial_failures
            .lock()
            .expect("dial failures lock")
            .iter()
        {
            out.entry(peer)
                .or_insert(PeerLinkStats {
                    peer,
                    connected: false,
                    rtt: None,
                    lost_packets: 0,
                    sent_bytes: 0,
                    received_bytes: 0,
                    dial_failures: 0,
                })
                .dial_failures = failures;
        }
        out.into_values().collect()
    }

    /// Records replication rounds into `stages` from now on (the node's, known once it started;
    /// sessions opened before record from then on too).
    pub fn set_stages(&self, stages: Stages) {
        let _ = self.stages.set(stages);
    }

    /// The open connection to `target`, or a new one (hello exchanged). Runs on tokio.
    async fn connect(&self, target: u64, addr: &str) -> Result<quinn::Connection, PeerError> {
        if let Some(c) = self.conns.lock().expect("conns lock").get(&target) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let retry_at = self
            .dial_failures
            .lock()
            .expect("dial failures lock")
            .get(&target)
            .map(|(_, at)| *at);
        if let Some(at) = retry_at {
            tokio::time::sleep_until(at).await;
            // Another caller may have dialed meanwhile.
            if let Some(c) = self.conns.lock().expect("conns lock").get(&target) {
                if c.close_reason().is_none() {
                    return Ok(c.clone());
                }
            }
        }
        let dialed = tokio::time::timeout(CONNECT_TIMEOUT, self.dial(target, addr))
            .await
            .unwrap_or(Err(PeerError::Timeout {
                ms: CONNECT_TIMEOUT.as_millis() as u64,
            }));
        let conn = {
            let mut failures = self.dial_failures.lock().expect("dial failures lock");
            match dialed {
                Ok(conn) => {
                    failures.remove(&target);
                    conn
                }
                Err(e) => {
                    // A dial that began before another one succeeded says nothing about the
                    // peer now: count (and back off for) failures only while no link is open.
                    let open = self
                        .conns
                        .lock()
                        .expect("conns lock")
                        .get(&target)
                        .is_some_and(|c| c.close_reason().is_none());
                    if !open {
                        let n = failures
                            .get(&target)
                            .map_or(1, |(n, _)| n.saturating_add(1));
                        let at = tokio::time::Instant::now() + dial_backoff(n);
                        failures.insert(target, (n, at));
                    }
                    return Err(e);
                }
            }
        };
        self.conns
            .lock()
            .expect("conns lock")
            .insert(target, conn.clone());
        tokio::spawn(log_stats(conn.clone(), target, "dialed"));
        Ok(conn)
    }

    async fn dial(&self, target: u64, addr: &str) -> Result<quinn::Connection, PeerError> {
        let sock = resolve(addr).await?;
        let name = crate::tls::server_name(&sock);
        let conn = self
            .endpoint
            .connect_with(self.config.clone(), sock, &name)
            .map_err(|source| PeerError::Connect { addr: sock, source })?
            .await?;
        // Hello both ways on the first stream: same cluster, the expected node.
        let (mut send, recv) = conn.open_bi().await?;
        let mut body = Vec::new();
        Hello {
            cluster_id: self.cluster_id.clone(),
            node_id: self.node_id,
        }
        .encode(&mut body);
        write_frame(&mut send, FrameKind::PeerHello, &body).await?;
        let _ = send.finish();
        let mut reader = FrameReader::peer(recv);
        let frame = reader.expect("PeerHello").await?;
        match frame.kind {
            FrameKind::PeerHello => {}
            FrameKind::Error => {
                let e = ErrorMsg::decode(&frame.body)?;
                return Err(PeerError::Remote(format!("{:?}: {}", e.code, e.message)));
            }
            kind => return Err(StreamError::Unexpected { kind }.into()),
        }
        let hello = Hello::decode(&frame.body)?;
        if hello.cluster_id != self.cluster_id {
            conn.close(CLOSE_NORMAL.into(), b"wrong cluster");
            return Err(PeerError::WrongCluster {
                addr: sock,
                expected: self.cluster_id.clone(),
                found: hello.cluster_id,
            });
        }
        let is_node = conn
            .peer_identity()
            .is_some_and(|identity| crate::tls::is_node_certificate(identity.as_ref(), target));
        if hello.node_id != target || !is_node {
            conn.close(CLOSE_NORMAL.into(), b"wrong node");
            return Err(PeerError::WrongNode {
                addr: sock,
                expected: target,
                found: hello.node_id,
            });
        }
        Ok(conn)
    }

    /// Drops the cached connection to `target` (after a timeout: the next call dials again).
    fn forget(&self, target: u64) {
        if let Some(c) = self.conns.lock().expect("conns lock").remove(&target) {
            c.close(CLOSE_NORMAL.into(), b"timeout");
        }
    }

    /// Closes every connection.
    pub fn close_all(&self) {
        for (_, c) in self.conns.lock().expect("conns lock").drain() {
            c.close(CLOSE_NORMAL.into(), b"shutdown");
        }
    }

    /// Runs `f` on the network runtime and waits for it (from any executor) at most `ttl`.
    async fn call<T, F>(self: &Arc<Self>, target: u64, ttl: Duration, f: F) -> Result<T, PeerError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, PeerError>> + Send + 'static,
    {
        let task = self.rt.spawn(async move {
            tokio::time::timeout(ttl, f)
                .await
                .unwrap_or(Err(PeerError::Timeout {
                    ms: ttl.as_millis() as u64,
                }))
        });
        // A slow answer alone does not condemn the connection (heartbeats have tight
        // deadlines); a dead peer's connection is dropped by the replication session's response
        // timeout, and a restarted peer answers the old connection with a stateless reset.
        let _ = target;
        task.await.unwrap_or(Err(PeerError::RuntimeGone))
    }
}

/// How long to wait before dialing a peer again after `failures` failed dials in a row.
fn dial_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (DIAL_BACKOFF_MIN * (1u32 << doublings)).min(DIAL_BACKOFF_MAX)
}

/// While `conn` is open, logs its QUIC statistics every second at debug level (target
/// `baton_net::quic_stats`): round trip, congestion window, losses, and the flow-control frames
/// that tell whether either side ran out of stream or data credit.
pub(crate) async fn log_stats(conn: quinn::Connection, peer: u64, side: &'static str) {
    if !tracing::enabled!(target: "baton_net::quic_stats", tracing::Level::DEBUG) {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = conn.closed() => return,
        }
        let s = conn.stats();
        tracing::debug!(
            target: "baton_net::quic_stats",
            peer,
            side,
            rtt_us = s.path.rtt.as_micros() as u64,
            cwnd = s.path.cwnd,
            lost = s.path.lost_packets,
            congestion = s.path.congestion_events,
            tx_stream = s.frame_tx.stream,
            rx_stream = s.frame_rx.stream,
            tx_blocked_streams = s.frame_tx.streams_blocked_bidi,
            rx_blocked_streams = s.frame_rx.streams_blocked_bidi,
            tx_data_blocked = s.frame_tx.data_blocked,
            rx_data_blocked = s.frame_rx.data_blocked,
            tx_stream_data_blocked = s.frame_tx.stream_data_blocked,
            rx_stream_data_blocked = s.frame_rx.stream_data_blocked,
            tx_max_streams = s.frame_tx.max_streams_bidi,
            rx_max_streams = s.frame_rx.max_streams_bidi,
            tx_max_data = s.frame_tx.max_data,
            rx_max_data = s.frame_rx.max_data,
            "quic"
        );
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, PeerError> {
    let resolve_err = || PeerError::Resolve {
        addr: addr.to_string(),
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(|_| resolve_err())?
        .next()
        .ok_or_else(resolve_err)
}

/// One request, one response, on a fresh stream of the connection to `target`.
async fn unary(
    links: Arc<PeerLinks>,
    target: u64,
    addr: String,
    kind: FrameKind,
    chunks: Vec<Bytes>,
) -> Result<Vec<u8>, PeerError> {
    let conn = links.connect(target, &addr).await?;
    let (mut send, recv) = conn.open_bi().await?;
    write_frame_chunks(&mut send, kind, chunks).await?;
    let _ = send.finish();
    let mut reader = FrameReader::peer(recv);
    let frame = reader.expect("response").await?;
    match frame.kind {
        FrameKind::RaftResponse | FrameKind::ForwardResponse | FrameKind::ReadIndexResponse => {
            Ok(frame.body)
        }
        FrameKind::Error => {
            let e = ErrorMsg::decode(&frame.body)?;
            Err(PeerError::Remote(format!("{:?}: {}", e.code, e.message)))
        }
        kind => Err(StreamError::Unexpected { kind }.into()),
    }
}

/// A forward: sends the batch, passes any `ForwardSealed` frame to `on_seal`, returns the
/// `ForwardResponse`.
async fn forward_call(
    links: Arc<PeerLinks>,
    target: u64,
    addr: String,
    chunks: Vec<Bytes>,
    on_seal: impl Fn(ForwardSealed),
) -> Result<ForwardResponse, PeerError> {
    let conn = links.connect(target, &addr).await?;
    let (mut send, recv) = conn.open_bi().await?;
    write_frame_chunks(&mut send, FrameKind::Forward, chunks).await?;
    let _ = send.finish();
    let mut reader = FrameReader::peer(recv);
    // Bounded: a seal, then the outcome; anything else ends the call.
    for _ in 0..2 {
        let frame = reader.expect("forward response").await?;
        match frame.kind {
            FrameKind::ForwardSealed => on_seal(ForwardSealed::decode(&frame.body)?),
            FrameKind::ForwardResponse => return Ok(ForwardResponse::decode(&frame.body)?),
            FrameKind::Error => {
                let e = ErrorMsg::decode(&frame.body)?;
                return Err(PeerError::Remote(format!("{:?}: {}", e.code, e.message)));
            }
            kind => return Err(StreamError::Unexpected { kind }.into()),
        }
    }
    Err(PeerError::Remote(
        "a second seal before the forward's outcome".into(),
    ))
}

fn rpc_error(
    e: PeerError,
    action: RPCTypes,
    from: u64,
    target: u64,
    ttl: Duration,
) -> RPCError<TypeConfig> {
    match e {
        PeerError::Timeout { .. } => RPCError::Timeout(Timeout {
            action,
            id: from,
            target,
            timeout: ttl,
        }),
        e if e.unreachable() => RPCError::Unreachable(Unreachable::new(&e)),
        e => RPCError::Network(NetworkError::new(&e)),
    }
}

/// openraft's network factory over QUIC.
pub struct QuicNetworkFactory {
    links: Arc<PeerLinks>,
}

impl QuicNetworkFactory {
    /// A factory dialing through `links`.
    pub fn new(links: Arc<PeerLinks>) -> QuicNetworkFactory {
        QuicNetworkFactory { links }
    }
}

impl RaftNetworkFactory<TypeConfig> for QuicNetworkFactory {
    type Network = QuicPeer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> QuicPeer {
        QuicPeer {
            links: self.links.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

/// One node's view of one peer, for openraft.
pub struct QuicPeer {
    links: Arc<PeerLinks>,
    target: u64,
    addr: String,
}

impl QuicPeer {
    async fn unary(
        &self,
        action: RPCTypes,
        ttl: Duration,
        kind: FrameKind,
        chunks: Vec<Bytes>,
    ) -> Result<Vec<u8>, RPCError<TypeConfig>> {
        let (links, target, addr) = (self.links.clone(), self.target, self.addr.clone());
        let from = self.links.node_id;
        self.links
            .call(target, ttl, unary(links, target, addr, kind, chunks))
            .await
            .map_err(|e| rpc_error(e, action, from, target, ttl))
    }

    fn remote(&self, e: String) -> RPCError<TypeConfig> {
        RPCError::Network(NetworkError::new(&PeerError::Remote(e)))
    }

    fn decode_err(&self, e: WireError) -> RPCError<TypeConfig> {
        RPCError::Network(NetworkError::new(&PeerError::Wire(e)))
    }
}

impl RaftNetworkV2<TypeConfig> for QuicPeer {
    type SnapshotData = SnapshotBlob;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let chunks = wire::encode_append(&rpc).map_err(|e| self.decode_err(e))?;
        let body = self
            .unary(
                RPCTypes::AppendEntries,
                option.hard_ttl(),
                FrameKind::RaftAppend,
                chunks,
            )
            .await?;
        match wire::decode_append_result(&body).map_err(|e| self.decode_err(e))? {
            Ok(r) => Ok(AppendEntriesResponse::from(r)),
            Err(e) => Err(self.remote(e)),
        }
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Unpin + 'static,
    {
        let links = self.links.clone();
        let (target, addr) = (self.target, self.addr.clone());
        let from = links.node_id;
        let ttl = option.soft_ttl().max(CONNECT_TIMEOUT);
        Box::pin(async move {
            let conn = {
                let l = links.clone();
                let addr = addr.clone();
                links
                    .call(target, ttl, async move { l.connect(target, &addr).await })
                    .await
                    .map_err(|e| rpc_error(e, RPCTypes::AppendEntries, from, target, ttl))?
            };
            let (req_tx, req_rx) = mpsc::channel::<QueuedRequest>(APPEND_QUEUE_MAX);
            let (res_tx, res_rx) = mpsc::channel(APPEND_QUEUE_MAX);
            links
                .rt
                .spawn(replicate(links.clone(), target, conn, req_rx, res_tx));
            // Encode on this (the Raft) shard: the batch bytes are shared with the log.
            let budget = Arc::new(tokio::sync::Semaphore::new(APPEND_QUEUE_BYTES_MAX));
            glommio::spawn_local(encode_requests(input, req_tx, COMMIT_ONLY_HOLD, budget)).detach();
            let out = res_rx.map(
                move |r: Result<StreamAppendResult<TypeConfig>, PeerError>| {
                    r.map_err(|e| {
                        rpc_error(
                            e,
                            RPCTypes::AppendEntries,
                            from,
                            target,
                            APPEND_RESPONSE_TIMEOUT,
                        )
                    })
                },
            );
            Ok(Box::pin(out) as BoxStream<'s, _>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut body = Vec::new();
        wire::encode_vote_request(&rpc, &mut body);
        let chunks = vec![Bytes::from(body)];
        let body = self
            .unary(
                RPCTypes::Vote,
                option.hard_ttl(),
                FrameKind::RaftVote,
                chunks,
            )
            .await?;
        match wire::decode_vote_response(&body).map_err(|e| self.decode_err(e))? {
            Ok(r) => Ok(r),
            Err(e) => Err(self.remote(e)),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut body = Vec::new();
        wire::encode_transfer_leader_request(&req, &mut body);
        let body = self
            .unary(
                RPCTypes::TransferLeader,
                option.hard_ttl(),
                FrameKind::RaftTransferLeader,
                vec![Bytes::from(body)],
            )
            .await?;
        match wire::decode_transfer_leader_response(&body).map_err(|e| self.decode_err(e))? {
            Ok(r) => Ok(r),
            Err(e) => Err(self.remote(e)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotBlob>,
        _cancel: impl Future<Output = ReplicationClosed> + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut header = Vec::new();
        let data = snapshot.snapshot.clone();
        let (links, target, addr) = (self.links.clone(), self.target, self.addr.clone());
        let from = links.node_id;
        let ttl = option.hard_ttl();
        let to_streaming =
            |e: PeerError| match rpc_error(e, RPCTypes::InstallSnapshot, from, target, ttl) {
                RPCError::Timeout(t) => StreamingError::Timeout(t),
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Network(n) => StreamingError::Network(n),
                other => StreamingError::Network(NetworkError::new(&other)),
            };
        wire::encode_snapshot_header(&vote, &snapshot.meta, data.len() as u64, &mut header)
            .map_err(|e| to_streaming(PeerError::Wire(e)))?;
        let sent = self
            .links
            .call(
                target,
                ttl,
                send_snapshot(links, target, addr, header, data),
            )
            .await;
        let body = sent.map_err(to_streaming)?;
        match wire::decode_snapshot_response(&body) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(to_streaming(PeerError::Remote(e))),
            Err(e) => Err(to_streaming(PeerError::Wire(e))),
        }
    }
}

/// An encoded replication request, its share of the session's byte budget (given back when
/// the writer has handed it to QUIC), and whether it carries entries (its round is timed:
/// [`Stage::Replicate`]).
type QueuedRequest = (Vec<Bytes>, tokio::sync::OwnedSemaphorePermit, bool);

/// Feeds a replication session's requests, encoded, to its QUIC writer, holding at most
/// `budget`'s bytes queued (a request larger than the whole budget takes all of it).
async fn encode_requests<S>(
    mut input: S,
    mut out: mpsc::Sender<QueuedRequest>,
    hold: Duration,
    budget: Arc<tokio::sync::Semaphore>,
) where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Unpin,
{
    let mut next = input.next().await;
    while let Some(req) = next.take() {
        let commit_only = req.entries.is_empty();
        let chunks = match wire::encode_append(&req) {
            Ok(chunks) => chunks,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an append request; session ends");
                return;
            }
        };
        let mut ended = false;
        if commit_only {
            // Held back a little for the request after it, so that both reach the follower
            // together: one wake-up of each thread on the way there and back instead of two.
            let hold = glommio::timer::sleep(hold);
            let following = input.next();
            futures_util::pin_mut!(hold, following);
            if let futures_util::future::Either::Left((item, _)) =
                futures_util::future::select(following, hold).await
            {
                ended = item.is_none();
                next = item;
            }
        }
        let bytes: usize = chunks.iter().map(Bytes::len).sum();
        let want = bytes.clamp(1, APPEND_QUEUE_BYTES_MAX) as u32;
        let Ok(permit) = budget.clone().acquire_many_owned(want).await else {
            return;
        };
        if out.send((chunks, permit, !commit_only)).await.is_err() || ended {
            return;
        }
        if next.is_none() {
            next = input.next().await;
        }
    }
}

/// One replication session on one QUIC stream: a writer sends requests as they come
/// (pipelined), this task reads the results, in order, until the peer finishes the stream.
async fn replicate(
    links: Arc<PeerLinks>,
    target: u64,
    conn: quinn::Connection,
    mut requests: mpsc::Receiver<QueuedRequest>,
    mut results: mpsc::Sender<Result<StreamAppendResult<TypeConfig>, PeerError>>,
) {
    let began = std::time::Instant::now();
    let (mut send, recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            let _ = results.send(Err(e.into())).await;
            return;
        }
    };
    let opened_us = began.elapsed().as_micros() as u64;
    let sent = Arc::new(AtomicU64::new(0));
    // When each request written and not yet answered started out (`None`: not timed).
    let written = Arc::new(Mutex::new(VecDeque::<Option<Instant>>::new()));
    let send_id = send.id();
    let writer = {
        let sent = sent.clone();
        let written = written.clone();
        tokio::spawn(async move {
            while let Some((chunks, permit, timed)) = requests.next().await {
                written
                    .lock()
                    .expect("written lock")
                    .push_back(timed.then(Instant::now));
                if let Err(e) = write_frame_chunks(&mut send, FrameKind::RaftAppend, chunks).await {
                    tracing::debug!(target, error = %e, "replication stream write failed");
                    return;
                }
                drop(permit);
                sent.fetch_add(1, Ordering::Release);
            }
            let _ = send.finish();
        })
    };
    let mut reader = FrameReader::peer(recv);
    let mut received = 0u64;
    loop {
        let next = match tokio::time::timeout(APPEND_RESPONSE_TIMEOUT, reader.next()).await {
            Ok(n) => n,
            Err(_) if sent.load(Ordering::Acquire) > received => {
                links.forget(target);
                Err(StreamError::Ended {
                    expected: "append response in time",
                })
            }
            // Nothing outstanding: an idle session is fine.
            Err(_) => continue,
        };
        let result = match next {
            Ok(Some(f)) if f.kind == FrameKind::RaftResponse => {
                match wire::decode_append_result(&f.body) {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(remote)) => Err(PeerError::Remote(remote)),
                    Err(e) => Err(PeerError::Wire(e)),
                }
            }
            Ok(Some(f)) => Err(StreamError::Unexpected { kind: f.kind }.into()),
            Ok(None) => break,
            Err(e) => Err(e.into()),
        };
        received += 1;
        let at = written.lock().expect("written lock").pop_front();
        if let Some(Some(at)) = at {
            if let Some(stages) = links.stages.get() {
                stages.record_since(Stage::Replicate, at);
            }
        }
        if received == 1 {
            tracing::trace!(
                target: "baton_net::hops",
                target_node = target,
                stream = %send_id,
                opened_us,
                first_response_us = began.elapsed().as_micros() as u64,
                "replication session answered"
            );
        }
        let stop = !matches!(result, Ok(Ok(_)));
        if results.send(result).await.is_err() || stop {
            break;
        }
    }
    writer.abort();
}

async fn send_snapshot(
    links: Arc<PeerLinks>,
    target: u64,
    addr: String,
    header: Vec<u8>,
    data: Bytes,
) -> Result<Vec<u8>, PeerError> {
    let conn = links.connect(target, &addr).await?;
    let (mut send, recv) = conn.open_bi().await?;
    write_frame(&mut send, FrameKind::RaftSnapshot, &header).await?;
    let mut at = 0;
    while at < data.len() {
        let end = (at + SNAPSHOT_CHUNK_BYTES).min(data.len());
        write_frame_chunks(
            &mut send,
            FrameKind::RaftSnapshotChunk,
            vec![data.slice(at..end)],
        )
        .await?;
        at = end;
    }
    let _ = send.finish();
    let mut reader = FrameReader::peer(recv);
    let frame = reader.expect("snapshot response").await?;
    match frame.kind {
        FrameKind::RaftResponse => Ok(frame.body),
        FrameKind::Error => {
            let e = ErrorMsg::decode(&frame.body)?;
            Err(PeerError::Remote(format!("{:?}: {}", e.code, e.message)))
        }
        kind => Err(StreamError::Unexpected { kind }.into()),
    }
}

/// Forwards followers' sealed batches to the leader over QUIC.
pub struct QuicForwarder {
    links: Arc<PeerLinks>,
    next_request: AtomicU64,
}

impl QuicForwarder {
    /// A forwarder dialing through `links`.
    pub fn new(links: Arc<PeerLinks>) -> QuicForwarder {
        QuicForwarder {
            links,
            next_request: AtomicU64::new(1),
        }
    }
}

impl Forwarder for QuicForwarder {
    fn forward(
        &self,
        leader: u64,
        addr: String,
        batch: BatchBytes,
    ) -> LocalBoxFuture<'static, Result<Committed, SubmitError>> {
        let links = self.links.clone();
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            // The follower's shard waits on this ticket to answer preconfirmation requests; the
            // leader's seal arrives ahead of the outcome.
            let ticket = batch.ticket().cloned();
            let chunks = ForwardRequest::encode_chunks(request_id, &batch.into_bytes());
            let l = links.clone();
            let call = forward_call(l, leader, addr, chunks, move |sealed: ForwardSealed| {
                // Only a seal of this request is passed on (the shard checks its Merkle root).
                if sealed.request_id != request_id {
                    tracing::warn!(
                        leader,
                        request_id,
                        "forward seal for another request, ignored"
                    );
                    return;
                }
                if let Some(t) = &ticket {
                    t.fire(sealed.seal);
                }
            });
            match links.call(leader, FORWARD_TIMEOUT, call).await {
                Ok(r) if r.request_id == request_id => r.result,
                Ok(r) => {
                    tracing::warn!(
                        leader,
                        request_id,
                        got = r.request_id,
                        "forward answer for another request"
                    );
                    Err(SubmitError::NotLeader { leader_hint: None })
                }
                // The outcome is unknown: the caller retries (idempotent by transaction hash).
                Err(PeerError::Timeout { ms }) => Err(SubmitError::CommitTimeout { waited_ms: ms }),
                Err(e) => {
                    tracing::debug!(leader, error = %e, "forwarding failed");
                    Err(SubmitError::NotLeader { leader_hint: None })
                }
            }
        })
    }

    fn read_index(
        &self,
        leader: u64,
        addr: String,
    ) -> LocalBoxFuture<'static, Result<u64, SubmitError>> {
        let links = self.links.clone();
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let chunks = vec![Bytes::copy_from_slice(&request_id.to_le_bytes())];
            let l = links.clone();
            let call = async move {
                let body = unary(l, leader, addr, FrameKind::ReadIndex, chunks).await?;
                Ok(crate::rollup_msg::ReadIndexResponse::decode(&body)?)
            };
            match links.call(leader, FORWARD_TIMEOUT, call).await {
                Ok(r) if r.request_id == request_id => r.result,
                Ok(_) => Err(SubmitError::NotLeader { leader_hint: None }),
                Err(e) => {
                    tracing::debug!(leader, error = %e, "read index failed");
                    Err(SubmitError::NotLeader { leader_hint: None })
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use baton_core::raft::{Entry, LogId};
    use openraft::entry::RaftEntry;

    use super::*;

    fn append(last: u64, commit: u64, with_entry: bool) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: openraft::Vote::new_committed(1, 1),
            prev_log_id: Some(LogId::new_term_index(1, last - u64::from(with_entry))),
            entries: if with_entry {
                vec![Entry::new_blank(LogId::new_term_index(1, last))]
            } else {
                Vec::new()
            },
            leader_commit: Some(LogId::new_term_index(1, commit)),
        }
    }

    /// A peer that refuses connections (a node stopping: its endpoint is up and turns dials
    /// away) is dialed again only after a pause that doubles with each failure, not in a tight
    /// loop; a successful dial would reset it. Six refused dials in a row take at least the first
    /// five pauses.
    #[test]
    fn dials_to_a_peer_that_refuses_back_off() {
        assert_eq!(dial_backoff(1), DIAL_BACKOFF_MIN);
        assert_eq!(dial_backoff(2), DIAL_BACKOFF_MIN * 2);
        assert_eq!(dial_backoff(4), DIAL_BACKOFF_MAX);
        assert_eq!(dial_backoff(u32::MAX), DIAL_BACKOFF_MAX);

        let dir = tempfile::tempdir().unwrap();
        let files = crate::tls::generate(dir.path(), &crate::tls::CertOptions::new("t", 2))
            .expect("certificates");
        let (_, cert1, key1) = &files.nodes[0];
        let (_, cert2, key2) = &files.nodes[1];
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let server = crate::tls::server_config(&files.ca_cert, cert2, key2).unwrap();
            let refusing = crate::udp::endpoint(loopback, Some(server)).unwrap();
            let addr = refusing.local_addr().unwrap().to_string();
            let turned_away = tokio::spawn(async move {
                let mut n = 0;
                while let Some(incoming) = refusing.accept().await {
                    incoming.refuse();
                    n += 1;
                    if n == 6 {
                        return n;
                    }
                }
                n
            });
            let config = crate::tls::peer_client_config(&files.ca_cert, cert1, key1).unwrap();
            let links = PeerLinks::new(
                crate::udp::endpoint(loopback, None).unwrap(),
                config,
                "t".into(),
                1,
                tokio::runtime::Handle::current(),
            );
            let start = Instant::now();
            let mut sixth = tokio::time::Instant::now();
            for k in 0..6 {
                if k == 5 {
                    sixth = tokio::time::Instant::now();
                }
                assert!(matches!(
                    links.connect(2, &addr).await,
                    Err(PeerError::Connection(_))
                ));
            }
            let pauses: Duration = (1..=5).map(dial_backoff).sum();
            assert!(start.elapsed() >= pauses, "{:?}", start.elapsed());
            assert_eq!(turned_away.await.unwrap(), 6);
            let (failures, retry_at) = *links.dial_failures.lock().unwrap().get(&2).unwrap();
            assert_eq!(failures, 6);
            // The seventh dial would wait 50 ms from the sixth failure.
            assert!(retry_at >= sixth + DIAL_BACKOFF_MAX);
        });
    }

    /// A request with no entries (only a commit index) waits for the next request, up to
    /// `COMMIT_ONLY_HOLD`, so the two are handed to the writer back to back; alone, it still goes
    /// out once the hold is over; requests with entries never wait, and the order never changes.
    #[test]
    fn a_commit_only_request_waits_briefly_for_the_next_and_never_reorders() {
        baton_core::node::run_local(async {
            // A long hold here, so that "held" does not depend on how fast this runs.
            let (input, requests) = mpsc::unbounded();
            let (out, mut written) = mpsc::channel(16);
            let hold = Duration::from_secs(30);
            glommio::spawn_local(encode_requests(requests, out, hold, budget())).detach();
            // A request's round is timed exactly when it carries entries.
            let decoded = |(chunks, _permit, timed): QueuedRequest| {
                let body: Vec<u8> = chunks.concat();
                let req = wire::decode_append(&body).expect("decodes");
                assert_eq!(timed, !req.entries.is_empty());
                req
            };
            // An append with an entry goes at once.
            input.unbounded_send(append(1, 0, true)).unwrap();
            let first = decoded(written.next().await.unwrap());
            assert_eq!(first.entries.len(), 1);
            // A commit-only request followed later by an append: nothing is written until
            // the append comes, then both, in order.
            input.unbounded_send(append(1, 1, false)).unwrap();
            glommio::timer::sleep(Duration::from_millis(20)).await;
            assert!(written.try_recv().is_err(), "held for the next request");
            input.unbounded_send(append(2, 1, true)).unwrap();
            let commit = decoded(written.next().await.unwrap());
            assert!(commit.entries.is_empty());
            assert_eq!(commit.leader_commit, Some(LogId::new_term_index(1, 1)));
            let next = decoded(written.next().await.unwrap());
            assert_eq!(next.entries.len(), 1);
            // The session ends when openraft's stream does, a held request still written.
            input.unbounded_send(append(2, 2, false)).unwrap();
            drop(input);
            assert!(decoded(written.next().await.unwrap()).entries.is_empty());
            assert!(written.next().await.is_none());
            // With nothing after it, a commit-only request goes alone once the hold is over.
            let (input, requests) = mpsc::unbounded();
            let (out, mut written) = mpsc::channel(16);
            let hold = Duration::from_millis(5);
            glommio::spawn_local(encode_requests(requests, out, hold, budget())).detach();
            let sent = Instant::now();
            input.unbounded_send(append(2, 2, false)).unwrap();
            let alone = decoded(written.next().await.unwrap());
            assert_eq!(alone.leader_commit, Some(LogId::new_term_index(1, 2)));
            assert!(sent.elapsed() >= hold);
        });
    }

    fn budget() -> Arc<tokio::sync::Semaphore> {
        Arc::new(tokio::sync::Semaphore::new(APPEND_QUEUE_BYTES_MAX))
    }

    /// Requests queued for the writer hold the session's byte budget until the writer takes
    /// them: past it, the encoder stops pulling requests from openraft (so reading entries).
    #[test]
    fn queued_replication_requests_are_bounded_in_bytes() {
        baton_core::node::run_local(async {
            let (input, requests) = mpsc::unbounded();
            let (out, mut written) = mpsc::channel(64);
            let one = wire::encode_append(&append(1, 0, true))
                .unwrap()
                .iter()
                .map(Bytes::len)
                .sum::<usize>();
            // Room for two requests of this size, not three.
            let budget = Arc::new(tokio::sync::Semaphore::new(2 * one + one / 2));
            glommio::spawn_local(encode_requests(
                requests,
                out,
                Duration::from_millis(1),
                budget.clone(),
            ))
            .detach();
            for i in 0..4 {
                input.unbounded_send(append(1, i, true)).unwrap();
            }
            let first = written.next().await.unwrap();
            let second = written.next().await.unwrap();
            glommio::timer::sleep(Duration::from_millis(20)).await;
            assert!(written.try_recv().is_err(), "the third waits for room");
            // The writer handed the first to QUIC: room for one more, and only one.
            drop(first);
            let third = written.next().await.unwrap();
            glommio::timer::sleep(Duration::from_millis(20)).await;
            assert!(written.try_recv().is_err(), "the fourth waits for room");
            drop((second, third));
            let fourth = written.next().await.unwrap();
            assert_eq!(budget.available_permits(), 2 * one + one / 2 - one);
            drop(fourth);
            assert_eq!(budget.available_permits(), 2 * one + one / 2);
        });
    }
}
