//! The incoming side: one QUIC endpoint per node accepts clients (ALPN `baton/1`) and peers
//! (ALPN `baton-peer/1`, mutual TLS, hello with the cluster id), reads frames and hands whole
//! requests to the node: submissions to its `NodeHandle`, Raft RPCs and forwarded batches to its
//! Raft shard through the bounded `Rpc` queue.
//!
//! Bad input gets a typed `Error` frame (or the stream or connection closed with a reason) and
//! never reaches the log; one client's garbage does not disturb other streams or connections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::command::Command;
use baton_core::node::{
    Consistency, LeadershipRejection, MembershipRejection, Read, Stage, SubmitError,
};
use baton_core::node::{NodeHandle, Rpc};
use baton_core::raft::wire;
use baton_core::raft::{BatchBytes, SealTicket};
use bytes::BytesMut;
use futures_channel::{mpsc, oneshot};
use futures_util::{SinkExt, StreamExt};
use rkyv::util::AlignedVec;

use crate::frame::{Frame, FrameKind, ProtocolError};
use crate::leader_msg::{LeaderRequest, LeaderResponse};
use crate::member_msg::{MemberRequest, MemberResponse};
use crate::msg::{
    ErrorCode, ErrorMsg, ForwardRequest, ForwardResponse, ForwardSealed, Hello, StagesRequest,
    StagesResponse, StatusRequest, StatusResponse, SubmitRequest, SubmitResponse,
};
use crate::rollup_msg::{
    Answer, BlockEvent, CommandRequest, CommandResponse, Query, ReadRequest, ReadResponse,
    SubscribeRequest,
};
use crate::stream::{write_frame, FrameReader, StreamError};
use crate::tls::{ALPN_CLIENT, ALPN_PEER};

/// Requests of one client stream being processed at once; beyond it the stream is not read
/// (QUIC flow control then slows the client).
pub const STREAM_REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// Responses of one stream waiting for its writer.
const RESPONSES_QUEUED_MAX: usize = 256;
/// Snapshot bytes reserved up front, before the chunks arrive.
const SNAPSHOT_RESERVE_BYTES_MAX: usize = 8 << 20;
/// How long a dialing peer has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// QUIC application error codes a node closes connections or streams with.
pub mod close_code {
    /// A protocol violation (malformed or oversized frame) on the stream.
    pub const PROTOCOL: u32 = 1;
    /// A peer connection without a client certificate.
    pub const NOT_A_PEER: u32 = 2;
    /// A peer of another cluster.
    pub const WRONG_CLUSTER: u32 = 3;
    /// An ALPN this node does not serve.
    pub const BAD_ALPN: u32 = 4;
    /// The node is shutting down.
    pub const SHUTDOWN: u32 = 5;
}

/// What the server needs from its node.
pub struct ServerContext {
    /// The node's handle (submissions, status).
    pub node: NodeHandle,
    /// This node's id.
    pub node_id: u64,
    /// The cluster id peers must present.
    pub cluster_id: String,
    /// Raft RPCs and forwarded batches for the Raft shard.
    pub inbound: mpsc::Sender<Rpc>,
    /// Client requests taken and whose answers are not yet written (see [`InFlight::drained`]).
    pub in_flight: InFlight,
    /// Submission bytes admitted and not yet answered, node-wide (see [`Admission`]).
    pub admission: Admission,
    /// What the client endpoint counts, for metrics ([`crate::metrics`]).
    pub counters: Arc<crate::metrics::Counters>,
}

/// Bounds the submissions a node holds at once, node-wide, by their frame bytes.
///
/// Every admitted submission holds its transactions, their batching state and then its
/// receipts (with Merkle paths) until its answer is computed: about 1 KiB per 128-byte
/// transaction. Per-stream bounds alone let many clients park that state in the node; under
/// 2x overload a load generator with 4,096 requests of 100 transactions outstanding held
/// 400k transactions there (1 GiB RSS, answers 5 s late). Past the bound a stream is not read
/// until admitted bytes are answered, so QUIC flow control slows its client (back-pressure,
/// nothing dropped). Frames are admitted first come, first served: a small frame does not
/// overtake a large one that waits.
pub struct Admission {
    bytes: Arc<tokio::sync::Semaphore>,
    max: usize,
}

impl Admission {
    /// Admits at most `max_bytes` of submission frames at once (at least one frame's worth:
    /// a frame larger than the bound waits until nothing else is admitted).
    pub fn new(max_bytes: usize) -> Admission {
        let max = max_bytes.clamp(1, u32::MAX as usize);
        Admission {
            bytes: Arc::new(tokio::sync::Semaphore::new(max)),
            max,
        }
    }

    /// Waits until a frame of `len` bytes may be admitted; the permit is held until dropped.
    async fn admit(&self, len: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = len.clamp(1, self.max) as u32;
        self.bytes.clone().acquire_many_owned(n).await.ok()
    }

    /// Bytes admitted now.
    pub fn admitted(&self) -> usize {
        self.max - self.bytes.available_permits()
    }
}

/// Counts client requests between being read and their answer being handed to the stream.
#[derive(Default)]
pub struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

impl InFlight {
    fn enter(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    fn leave(&self) {
        if self.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Waits until no request is in flight, or `timeout` passes; true if drained.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.idle.notified();
                if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// Accepts connections until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, ctx: Arc<ServerContext>) {
    while let Some(incoming) = endpoint.accept().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(ctx, conn).await,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "connection refused during handshake")
                }
            }
        });
    }
}

fn alpn_of(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

async fn serve_connection(ctx: Arc<ServerContext>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    match alpn_of(&conn).as_deref() {
        Some(a) if a == ALPN_CLIENT => serve_client(ctx, conn).await,
        Some(a) if a == ALPN_PEER => {
            if conn.peer_identity().is_none() {
                tracing::warn!(%remote, "refused peer: no client certificate");
                conn.close(close_code::NOT_A_PEER.into(), b"peer certificate required");
                return;
            }
            serve_peer(ctx, conn).await
        }
        other => {
            tracing::warn!(%remote, alpn = ?other, "refused connection: unknown ALPN");
            conn.close(close_code::BAD_ALPN.into(), b"unknown ALPN");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

async fn serve_client(ctx: Arc<ServerContext>, conn: quinn::Connection) {
    let _open = ctx.counters.connection();
    tokio::spawn(crate::peer::log_stats(conn.clone(), 0, "client"));
    // A client that presented a certificate (rustls checked that it chains to the cluster CA)
    // other than a node's is an operator: it may change the membership and move leadership.
    let operator = conn
        .peer_identity()
        .is_some_and(|id| !crate::tls::names_a_node(id.as_ref()));
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(client_stream(ctx.clone(), send, recv, operator));
            }
            Err(e) => {
                tracing::debug!(remote = %conn.remote_address(), error = %e, "client connection ended");
                return;
            }
        }
    }
}

/// The request id at the start of a body, if there are 8 bytes to read.
fn request_id_of(body: &[u8]) -> u64 {
    body.get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0)
}

fn error_frame(request_id: u64, code: ErrorCode, message: String) -> (FrameKind, Vec<u8>) {
    let mut body = Vec::new();
    ErrorMsg {
        request_id,
        code,
        message,
    }
    .encode(&mut body);
    (FrameKind::Error, body)
}

fn protocol_code(e: &ProtocolError) -> ErrorCode {
    match e {
        ProtocolError::FrameTooLarge { .. } => ErrorCode::TooLarge,
        _ => ErrorCode::Malformed,
    }
}

/// One client stream: requests are read in order and processed concurrently (bounded); each
/// response goes out when ready, tagged with its request id.
async fn client_stream(
    ctx: Arc<ServerContext>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    operator: bool,
) {
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Outgoing>(RESPONSES_QUEUED_MAX);
    let writer_ctx = ctx.clone();
    let stages = ctx.node.stage_recorder();
    // Set when the stream can no longer be written: block subscriptions stop.
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer_closed = closed.clone();
    let writer = tokio::spawn(async move {
        let mut broken = false;
        // One future for the stream's life (each `stopped()` call registers with the
        // connection).
        let stopped = send.stopped();
        tokio::pin!(stopped);
        // Every answer leaves the in-flight count once written (or dropped: the stream broke).
        loop {
            let next = tokio::select! {
                next = out_rx.recv() => next,
                // The client stopped reading, or the connection is gone: nothing more can be
                // written (block subscriptions waiting for a block learn it from `closed`).
                _ = &mut stopped, if !broken => {
                    broken = true;
                    writer_closed.store(true, std::sync::atomic::Ordering::Release);
                    continue;
                }
            };
            let Some((kind, body, answered)) = next else {
                break;
            };
            if !broken {
                if write_frame(&mut send, kind, &body).await.is_err() {
                    broken = true;
                    writer_closed.store(true, std::sync::atomic::Ordering::Release);
                } else if let Some(answered) = answered {
                    stages.record_since(Stage::Respond, answered);
                }
            }
            writer_ctx.in_flight.leave();
        }
        let _ = send.finish();
    });
    let permits = Arc::new(tokio::sync::Semaphore::new(STREAM_REQUESTS_IN_FLIGHT_MAX));
    let mut reader = FrameReader::new(recv);
    loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(StreamError::Protocol(e)) => {
                // The stream's framing is broken: say why, stop reading it.
                tracing::debug!(error = %e, "client stream: protocol error");
                ctx.counters.protocol_error();
                ctx.in_flight.enter();
                let (kind, body) = error_frame(0, protocol_code(&e), e.to_string());
                if out_tx.send((kind, body, None)).await.is_err() {
                    ctx.in_flight.leave();
                }
                reader.stop(close_code::PROTOCOL);
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "client stream ended");
                break;
            }
        };
        ctx.counters.request(frame.kind);
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let ctx = ctx.clone();
        let out = out_tx.clone();
        if frame.kind == FrameKind::SubscribeRequest {
            // Lives as long as the subscriber reads; holds its permit meanwhile.
            let closed = closed.clone();
            tokio::spawn(async move {
                subscription(&ctx, frame, out, closed).await;
                drop(permit);
            });
            continue;
        }
        // Not read further until admitted: back-pressure on this stream's client.
        let admitted = if frame.kind == FrameKind::SubmitRequest {
            match ctx.admission.admit(frame.body.len()).await {
                Some(a) => Some(a),
                None => break,
            }
        } else {
            None
        };
        ctx.in_flight.enter();
        tokio::spawn(async move {
            let mut answered = None;
            let (kind, body) =
                client_request(&ctx.node, &ctx.counters, frame, &mut answered, operator).await;
            drop(admitted);
            if out.send((kind, body, answered)).await.is_err() {
                ctx.in_flight.leave();
            }
            drop(permit);
        });
    }
    drop(out_tx);
    let _ = writer.await;
}

/// A response for a client stream's writer, with the instant a submission's receipts were all
/// in ([`Stage::Respond`] runs from there to the response written).
type Outgoing = (FrameKind, Vec<u8>, Option<Instant>);

/// Answers one client request; for a submission, sets `answered` once its receipts are in.
/// `operator`: the connection presented a client certificate that is not a node's (membership
/// changes and leadership transfers need one).
async fn client_request(
    node: &NodeHandle,
    counters: &crate::metrics::Counters,
    frame: Frame,
    answered: &mut Option<Instant>,
    operator: bool,
) -> (FrameKind, Vec<u8>) {
    let request_id = request_id_of(&frame.body);
    let mut body = Vec::new();
    match frame.kind {
        FrameKind::SubmitRequest => match SubmitRequest::decode(&frame.body) {
            Ok(req) => {
                let results = node.submit_with(req.txs, req.ack).await;
                *answered = Some(Instant::now());
                counters.submitted(&results);
                SubmitResponse {
                    request_id: req.request_id,
                    results,
                }
                .encode(&mut body);
                (FrameKind::SubmitResponse, body)
            }
            Err(e) => error_frame(request_id, ErrorCode::Malformed, e.to_string()),
        },
        FrameKind::StatusRequest => match StatusRequest::decode(&frame.body) {
            Ok(req) => match node.status().await {
                Ok(status) => {
                    StatusResponse {
                        request_id: req.request_id,
                        status,
                    }
                    .encode(&mut body);
                    (FrameKind::StatusResponse, body)
                }
                Err(e) => error_frame(req.request_id, ErrorCode::ShuttingDown, e.to_string()),
            },
            Err(e) => error_frame(request_id, ErrorCode::Malformed, e.to_string()),
        },
        FrameKind::StagesRequest => match StagesRequest::decode(&frame.body) {
            Ok(req) => {
                StagesResponse {
                    request_id: req.request_id,
                    report: node.stages(),
                }
                .encode(&mut body);
                (FrameKind::StagesResponse, body)
            }
            Err(e) => error_frame(request_id, ErrorCode::Malformed, e.to_string()),
        },
        FrameKind::CommandRequest => match CommandRequest::decode(&frame.body) {
            Ok(req) => {
                let result = match req.command {
                    Command::SealBlock(_) => Err(SubmitError::Command(
                        baton_core::command::CommandRejection::StaleSeal {
                            rollup_id: 0,
                            height: 0,
                            reason: "seal markers are proposed by the leader only",
                        },
                    )),
                    command => node.command(command).await,
                };
                CommandResponse {
                    request_id: req.request_id,
                    result,
                }
                .encode(&mut body);
                (FrameKind::CommandResponse, body)
            }
            Err(e) => error_frame(request_id, ErrorCode::Malformed, e.to_string()),
        },
        FrameKind::MemberRequest => match MemberRequest::decode(&frame.body) {
            Ok(req) => {
                let result = if operator {
                    let change = req.change.clone();
                    let result = node.change_members(req.change, req.catch_up).await;
                    match &result {
                        Ok(done) => {
                            tracing::info!(?change, index = done.index, members = ?done.members, "membership changed")
                        }
                        Err(e) => tracing::info!(?change, error = %e, "membership change not made"),
                    }
                    result
                } else {
                    tracing::warn!(change = ?req.change, "refused membership change: no client certificate, or a node's");
                    Err(SubmitError::Membership(
                        MembershipRejection::Unauthenticated,
                    ))
                };
                MemberResponse {
                    request_id: req.request_id,
                    result,
                }
                .encode(&mut body);
                (FrameKind::MemberResponse, body)
            }
            Err(e) => error_frame(request_id, ErrorCode::Malformed, e.to_string()),
        },
        FrameKind::LeaderRequest => match LeaderRequest::decode(&frame.body) {
            Ok(req) => {
                let result = if operator {
                    let result = node.transfer_leader(req.to).await;
                    match &result {
                        Ok(moved) => {
                            tracing::info!(to = ?req.to, from = moved.from, leader = moved.leader, term = moved.term, "leadership moved")
                        }
                        Err(e) => tracing::info!(to = ?req.to, error = %e, "leadership not moved"),
                    }
                    result
                } else {
                    tracing::warn!(to = ?req.to, "refused leadership transfer: no client certificate, or a node's");
                    Err(SubmitError::Leadership(
                        LeadershipRejection::Unauthenticated,
                    ))
                };
                LeaderResponse {
                    request_id: req.request_id,
                    result,
                }
                .encode(&mut body);
                (FrameKind::LeaderResponse, body)
            }
            Err(e) => error_frame(request_id, ErrorCode::Malformed, e.to_string()),
        },
        FrameKind::ReadRequest => match ReadRequest::decode(&frame.body) {
            Ok(req) => {
                ReadResponse {
                    request_id: req.request_id,
                    result: read(node, &req).await,
                }
                .encode(&mut body);
                (FrameKind::ReadResponse, body)
            }
            Err(e) => error_frame(request_id, ErrorCode::Malformed, e.to_string()),
        },
        kind => error_frame(
            request_id,
            ErrorCode::UnexpectedKind,
            format!("{kind:?} is not a client request"),
        ),
    }
}

/// Serves one read.
async fn read(node: &NodeHandle, req: &ReadRequest) -> Result<Read<Answer>, SubmitError> {
    let (c, t) = (req.consistency, req.timeout);
    let answer = |r: Read<Answer>| r;
    match req.query {
        Query::Tx(h) => node.tx(h, c, t).await.map(|r| Read {
            applied_index: r.applied_index,
            value: Answer::Tx(r.value),
        }),
        Query::Block { rollup_id, height } => {
            node.block(rollup_id, height, c, t).await.map(|r| Read {
                applied_index: r.applied_index,
                value: Answer::Block(r.value.map(crate::rollup_msg::fit_block)),
            })
        }
        Query::Rollup(id) => node
            .read(c, t, move |s| s.rollups().rollup(id).map(|r| r.info(id)))
            .await
            .map(|r| Read {
                applied_index: r.applied_index,
                value: Answer::Rollup(r.value),
            }),
        Query::Rollups => node
            .read(c, t, |s| {
                s.rollups()
                    .iter()
                    .take(crate::rollup_msg::ROLLUPS_MAX)
                    .map(|(id, r)| r.info(id))
                    .collect()
            })
            .await
            .map(|r| Read {
                applied_index: r.applied_index,
                value: Answer::Rollups(r.value),
            }),
    }
    .map(answer)
}

/// How long a subscription waits for the next applied entry before it looks again (and checks
/// that its stream is still open).
const SUBSCRIPTION_POLL: Duration = Duration::from_secs(1);

/// A block subscription: the rollup's blocks from the requested height, then each new one as
/// this node applies it, until the subscriber stops reading.
async fn subscription(
    ctx: &ServerContext,
    frame: Frame,
    out: tokio::sync::mpsc::Sender<Outgoing>,
    closed: Arc<std::sync::atomic::AtomicBool>,
) {
    let send = |(kind, body): (FrameKind, Vec<u8>)| {
        ctx.in_flight.enter();
        let out = out.clone();
        async move {
            let sent = out.send((kind, body, None)).await.is_ok();
            if !sent {
                ctx.in_flight.leave();
            }
            sent
        }
    };
    let req = match SubscribeRequest::decode(&frame.body) {
        Ok(r) => r,
        Err(e) => {
            let id = request_id_of(&frame.body);
            send(error_frame(id, ErrorCode::Malformed, e.to_string())).await;
            return;
        }
    };
    let node = &ctx.node;
    let mut next = req.from_height.max(1);
    while !closed.load(std::sync::atomic::Ordering::Acquire) {
        let read = match node
            .block(req.rollup_id, next, Consistency::Local, SUBSCRIPTION_POLL)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let (kind, body) = submit_error_frame(req.request_id, &e);
                send((kind, body)).await;
                return;
            }
        };
        match read.value {
            Some(block) => {
                let mut body = Vec::new();
                BlockEvent {
                    request_id: req.request_id,
                    applied_index: read.applied_index,
                    block: crate::rollup_msg::fit_block(block),
                }
                .encode(&mut body);
                if !send((FrameKind::BlockEvent, body)).await {
                    return;
                }
                next += 1;
            }
            None if !node.is_registered(req.rollup_id)
                && !confirmed_registered(node, req.rollup_id).await =>
            {
                let e =
                    SubmitError::Command(baton_core::command::CommandRejection::UnknownRollup {
                        rollup_id: req.rollup_id,
                    });
                send(submit_error_frame(req.request_id, &e)).await;
                return;
            }
            None => {
                let seen = read.applied_index;
                let _ = node
                    .wait_for(SUBSCRIPTION_POLL, move |s| {
                        s.applied_index.is_some_and(|a| a > seen)
                    })
                    .await;
            }
        }
    }
}

/// Whether `rollup_id` is registered as of a linearizable read (this node may lag, or have just
/// restarted); true when that cannot be confirmed, so the subscription keeps waiting.
async fn confirmed_registered(node: &NodeHandle, rollup_id: u64) -> bool {
    match node
        .read(Consistency::Linearizable, SUBSCRIPTION_POLL, |_| ())
        .await
    {
        Ok(_) => node.is_registered(rollup_id),
        Err(_) => true,
    }
}

/// A typed submit error as an answer to `request_id`: a read response carrying it.
fn submit_error_frame(request_id: u64, e: &SubmitError) -> (FrameKind, Vec<u8>) {
    let mut body = Vec::new();
    ReadResponse {
        request_id,
        result: Err(e.clone()),
    }
    .encode(&mut body);
    (FrameKind::ReadResponse, body)
}

// ---------------------------------------------------------------------------------------------
// Peers

async fn serve_peer(ctx: Arc<ServerContext>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let hello = tokio::time::timeout(HELLO_TIMEOUT, accept_hello(&ctx, &conn)).await;
    match hello {
        Ok(Ok(from)) => {
            tracing::debug!(%remote, from, "peer connected");
            tokio::spawn(crate::peer::log_stats(conn.clone(), from, "accepted"));
        }
        Ok(Err(reason)) => {
            tracing::warn!(%remote, %reason, "refused peer");
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, "refused peer: no hello in time");
            conn.close(close_code::PROTOCOL.into(), b"no hello");
            return;
        }
    }
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(peer_stream(ctx.clone(), send, recv));
            }
            Err(e) => {
                tracing::debug!(%remote, error = %e, "peer connection ended");
                return;
            }
        }
    }
}

/// Reads the dialer's hello, checks its cluster id, answers with ours.
async fn accept_hello(ctx: &ServerContext, conn: &quinn::Connection) -> Result<u64, String> {
    let (mut send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let mut reader = FrameReader::peer(recv);
    let frame = reader
        .expect("PeerHello")
        .await
        .map_err(|e| e.to_string())?;
    if frame.kind != FrameKind::PeerHello {
        conn.close(close_code::PROTOCOL.into(), b"hello expected");
        return Err(format!("first frame is {:?}, not a hello", frame.kind));
    }
    let hello = Hello::decode(&frame.body).map_err(|e| e.to_string())?;
    if hello.cluster_id != ctx.cluster_id {
        let (kind, body) = error_frame(
            0,
            ErrorCode::WrongCluster,
            format!("this is cluster {:?}", ctx.cluster_id),
        );
        let _ = write_frame(&mut send, kind, &body).await;
        let _ = send.finish();
        // Let the reason arrive before the connection closes (bounded).
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        conn.close(close_code::WRONG_CLUSTER.into(), b"wrong cluster id");
        return Err(format!(
            "wrong cluster id {:?} (this is {:?}), node {}",
            hello.cluster_id, ctx.cluster_id, hello.node_id
        ));
    }
    let is_node = conn
        .peer_identity()
        .is_some_and(|identity| crate::tls::is_node_certificate(identity.as_ref(), hello.node_id));
    if !is_node {
        let (kind, body) = error_frame(
            0,
            ErrorCode::NotAPeer,
            format!("the certificate is not node {}'s", hello.node_id),
        );
        let _ = write_frame(&mut send, kind, &body).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        conn.close(
            close_code::NOT_A_PEER.into(),
            b"certificate does not name the node",
        );
        return Err(format!(
            "announced node {} but its certificate does not name it",
            hello.node_id
        ));
    }
    let mut body = Vec::new();
    Hello {
        cluster_id: ctx.cluster_id.clone(),
        node_id: ctx.node_id,
    }
    .encode(&mut body);
    write_frame(&mut send, FrameKind::PeerHello, &body)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    Ok(hello.node_id)
}

async fn peer_stream(
    ctx: Arc<ServerContext>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut reader = FrameReader::peer(recv);
    let first = match reader.next().await {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(error = %e, "peer stream: bad first frame");
            return;
        }
    };
    let inbound = ctx.inbound.clone();
    let result = match first.kind {
        FrameKind::RaftAppend => serve_append(first, reader, send, inbound).await,
        FrameKind::RaftVote => serve_vote(first, &mut send, inbound).await,
        FrameKind::RaftTransferLeader => serve_transfer_leader(first, &mut send, inbound).await,
        FrameKind::RaftSnapshot => serve_snapshot(first, reader, &mut send, inbound).await,
        FrameKind::Forward => serve_forward(first, &mut send, inbound).await,
        FrameKind::ReadIndex => serve_read_index(first, &mut send, inbound).await,
        kind => {
            let (k, body) = error_frame(
                request_id_of(&first.body),
                ErrorCode::UnexpectedKind,
                format!("{kind:?} does not open a peer stream"),
            );
            let _ = write_frame(&mut send, k, &body).await;
            let _ = send.finish();
            Ok(())
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "peer stream failed");
    }
}

/// A follower's read index request: the leader confirms its leadership and answers the index.
async fn serve_read_index(
    first: Frame,
    send: &mut quinn::SendStream,
    mut inbound: mpsc::Sender<Rpc>,
) -> Result<(), ServeError> {
    let request_id = request_id_of(&first.body);
    let (tx, rx) = futures_channel::oneshot::channel();
    inbound
        .send(Rpc::ReadIndex(tx))
        .await
        .map_err(|_| ServeError::NodeGone)?;
    let result = rx.await.unwrap_or(Err(SubmitError::ShuttingDown));
    let mut body = Vec::new();
    crate::rollup_msg::ReadIndexResponse { request_id, result }.encode(&mut body);
    respond(send, FrameKind::ReadIndexResponse, &body).await
}

/// Why serving a peer stream stopped early.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("the node is shutting down")]
    NodeGone,
}

async fn respond(
    send: &mut quinn::SendStream,
    kind: FrameKind,
    body: &[u8],
) -> Result<(), ServeError> {
    write_frame(send, kind, body).await?;
    let _ = send.finish();
    Ok(())
}

async fn refuse(
    send: &mut quinn::SendStream,
    request_id: u64,
    code: ErrorCode,
    message: String,
) -> Result<(), ServeError> {
    let (k, body) = error_frame(request_id, code, message);
    respond(send, k, &body).await
}

/// A replication session: requests are decoded as they arrive and fed, in order, to the Raft
/// shard's `stream_append`; its in-order results go back as they come.
async fn serve_append(
    first: Frame,
    mut reader: FrameReader,
    mut send: quinn::SendStream,
    mut inbound: mpsc::Sender<Rpc>,
) -> Result<(), ServeError> {
    let began = std::time::Instant::now();
    let (mut req_tx, req_rx) = mpsc::channel(baton_core::node::peer::STREAM_APPEND_QUEUE_MAX);
    let (res_tx, mut res_rx) = mpsc::channel(baton_core::node::peer::STREAM_APPEND_QUEUE_MAX);
    inbound
        .send(Rpc::StreamAppend(req_rx, res_tx))
        .await
        .map_err(|_| ServeError::NodeGone)?;
    let feed = tokio::spawn(async move {
        let mut next = Some(first);
        loop {
            let frame = match next.take() {
                Some(f) => f,
                None => match reader.next().await {
                    Ok(Some(f)) => f,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "replication stream read failed");
                        return;
                    }
                },
            };
            if frame.kind != FrameKind::RaftAppend {
                tracing::warn!(kind = ?frame.kind, "replication stream: unexpected frame; ending it");
                return;
            }
            match wire::decode_append(&frame.body) {
                Ok(req) => {
                    if req_tx.send(req).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "replication stream: undecodable append; ending it");
                    return;
                }
            }
        }
    });
    let mut body = Vec::new();
    let mut answered = 0u64;
    while let Some(r) = res_rx.next().await {
        body.clear();
        wire::encode_append_result(&r, &mut body);
        if let Err(e) = write_frame(&mut send, FrameKind::RaftResponse, &body).await {
            feed.abort();
            return Err(e.into());
        }
        answered += 1;
        if answered == 1 {
            tracing::trace!(
                target: "baton_net::hops",
                stream = %send.id(),
                first_response_us = began.elapsed().as_micros() as u64,
                "replication session: first answer written"
            );
        }
    }
    feed.abort();
    let _ = send.finish();
    Ok(())
}

async fn serve_vote(
    first: Frame,
    send: &mut quinn::SendStream,
    mut inbound: mpsc::Sender<Rpc>,
) -> Result<(), ServeError> {
    let req = match wire::decode_vote_request(&first.body) {
        Ok(r) => r,
        Err(e) => return refuse(send, 0, ErrorCode::Malformed, e.to_string()).await,
    };
    let (tx, rx) = oneshot::channel();
    inbound
        .send(Rpc::Vote(req, tx))
        .await
        .map_err(|_| ServeError::NodeGone)?;
    let r = rx.await.map_err(|_| ServeError::NodeGone)?;
    let mut body = Vec::new();
    wire::encode_vote_response(&r.map_err(|e| e.to_string()), &mut body);
    respond(send, FrameKind::RaftResponse, &body).await
}

async fn serve_transfer_leader(
    first: Frame,
    send: &mut quinn::SendStream,
    mut inbound: mpsc::Sender<Rpc>,
) -> Result<(), ServeError> {
    let req = match wire::decode_transfer_leader_request(&first.body) {
        Ok(r) => r,
        Err(e) => return refuse(send, 0, ErrorCode::Malformed, e.to_string()).await,
    };
    let (tx, rx) = oneshot::channel();
    inbound
        .send(Rpc::TransferLeader(req, tx))
        .await
        .map_err(|_| ServeError::NodeGone)?;
    let r = rx.await.map_err(|_| ServeError::NodeGone)?;
    let mut body = Vec::new();
    wire::encode_transfer_leader_response(&r.map_err(|e| e.to_string()), &mut body);
    respond(send, FrameKind::RaftResponse, &body).await
}

async fn serve_snapshot(
    first: Frame,
    mut reader: FrameReader,
    send: &mut quinn::SendStream,
    mut inbound: mpsc::Sender<Rpc>,
) -> Result<(), ServeError> {
    let (vote, meta, len) = match wire::decode_snapshot_header(&first.body) {
        Ok(h) => h,
        Err(e) => return refuse(send, 0, ErrorCode::Malformed, e.to_string()).await,
    };
    // `len` is bounded by the decoder (SNAPSHOT_BYTES_MAX); memory grows with the chunks that
    // actually arrive, so a header alone cannot make the node reserve it.
    let len = len as usize;
    let mut data = BytesMut::with_capacity(len.min(SNAPSHOT_RESERVE_BYTES_MAX));
    while data.len() < len {
        let f = reader.expect("snapshot chunk").await?;
        if f.kind != FrameKind::RaftSnapshotChunk || data.len() + f.body.len() > len {
            let msg = format!("bad snapshot chunk ({:?}, {} bytes)", f.kind, f.body.len());
            return refuse(send, 0, ErrorCode::Malformed, msg).await;
        }
        data.extend_from_slice(&f.body);
    }
    let snapshot = openraft::Snapshot {
        meta,
        snapshot: data.freeze(),
    };
    let (tx, rx) = oneshot::channel();
    inbound
        .send(Rpc::Snapshot(vote, snapshot, tx))
        .await
        .map_err(|_| ServeError::NodeGone)?;
    let r = rx.await.map_err(|_| ServeError::NodeGone)?;
    let mut body = Vec::new();
    wire::encode_snapshot_response(&r.map_err(|e| e.to_string()), &mut body);
    respond(send, FrameKind::RaftResponse, &body).await
}

/// A follower's sealed batch: validated here (untrusted bytes), then proposed by the Raft
/// shard, which never forwards it again.
async fn serve_forward(
    first: Frame,
    send: &mut quinn::SendStream,
    mut inbound: mpsc::Sender<Rpc>,
) -> Result<(), ServeError> {
    let (request_id, batch) = match ForwardRequest::decode(&first.body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                send,
                request_id_of(&first.body),
                ErrorCode::Malformed,
                e.to_string(),
            )
            .await
        }
    };
    // One copy into an aligned buffer, so the batch can be read in place from here on.
    let mut buf = AlignedVec::<16>::with_capacity(batch.len());
    buf.extend_from_slice(batch);
    let bytes = BatchBytes::from_aligned(buf);
    if let Err(e) = bytes.batch() {
        return refuse(
            send,
            request_id,
            ErrorCode::Malformed,
            format!("forwarded batch: {e}"),
        )
        .await;
    }
    // The Raft shard fires the ticket once it signed the batch: pass the seal on at once, so
    // the follower can answer preconfirmation requests before the commit.
    let (ticket, sealed) = SealTicket::new();
    let (tx, rx) = oneshot::channel();
    inbound
        .send(Rpc::Forward(bytes.with_ticket(ticket), tx))
        .await
        .map_err(|_| ServeError::NodeGone)?;
    futures_util::pin_mut!(rx);
    let result = match futures_util::future::select(sealed, &mut rx).await {
        futures_util::future::Either::Left((Ok(seal), _)) => {
            let mut body = Vec::new();
            ForwardSealed { request_id, seal }.encode(&mut body);
            write_frame(send, FrameKind::ForwardSealed, &body).await?;
            rx.await
        }
        // Never signed (the batch failed first): only the outcome follows.
        futures_util::future::Either::Left((Err(_), _)) => rx.await,
        futures_util::future::Either::Right((r, _)) => r,
    }
    .map_err(|_| ServeError::NodeGone)?;
    let mut body = Vec::new();
    ForwardResponse { request_id, result }.encode(&mut body);
    respond(send, FrameKind::ForwardResponse, &body).await
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::Admission;

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn admission_holds_frames_past_the_byte_bound_until_answers_free_room() {
        block_on(async {
            let a = Admission::new(100);
            let first = a.admit(60).await.expect("room");
            assert_eq!(a.admitted(), 60);
            let second = a.admit(60);
            tokio::pin!(second);
            assert!(
                (&mut second).now_or_never().is_none(),
                "60 + 60 bytes exceed the 100-byte bound: the second frame waits"
            );
            // First come, first admitted: a smaller frame does not overtake the waiting one.
            assert!(a.admit(40).now_or_never().is_none());
            drop(first);
            let second = second.await.expect("admitted once the first is answered");
            assert_eq!(a.admitted(), 60);
            drop(second);
            // A frame larger than the whole bound is admitted alone, never refused forever.
            let big = a.admit(1_000).await.expect("clamped to the bound");
            assert_eq!(a.admitted(), 100);
            assert!(a.admit(1).now_or_never().is_none());
            drop(big);
            assert_eq!(a.admitted(), 0);
        });
    }
}
