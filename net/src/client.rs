//! `Client`: submit transactions to a baton cluster from any tokio application.
//!
//! One QUIC connection to one node at a time (any node: followers forward to the leader), a few
//! long-lived streams over it, many requests in flight per stream (tagged with request ids,
//! answered in any order). A lost connection, a node that is shutting down, or per-transaction
//! `NotLeader`/`Overloaded`/`CommitTimeout` answers are retried on the next node, within a
//! bounded budget of attempts and time. Retrying is safe: submission is idempotent by
//! transaction hash, and a retried transaction that was already sequenced gets its original
//! receipt.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_core::command::{Command, RollupPolicy};
use baton_core::encrypted::KEY_BYTES;
use baton_core::node::{
    CommandReceipt, Consistency, LeaderTransferred, LeadershipRejection, MemberChange,
    MembershipChanged, MembershipRejection, NodeStatus, Read, Receipt, Role, StageReport,
    SubmitError,
};
use baton_core::AckLevel;
use baton_core::{Transaction, TxHash};
use tokio::sync::oneshot;

use crate::frame::FrameKind;
use crate::leader_msg::{LeaderRequest, LeaderResponse};
use crate::member_msg::{MemberRequest, MemberResponse};
use crate::msg::{
    ErrorCode, ErrorMsg, MsgError, StagesRequest, StagesResponse, StatusRequest, StatusResponse,
    SubmitRequest, SubmitResponse,
};
use crate::rollup_msg::{
    Answer, BlockEvent, CommandRequest, CommandResponse, Query, ReadRequest, ReadResponse,
    SubscribeRequest,
};
use crate::stream::{write_frame, FrameReader, StreamError};
use crate::tls::{self, TlsError};

/// Default of [`ClientOptions::idle_timeout_ms`].
pub const CLIENT_IDLE_TIMEOUT_MS: u64 = 1_000;

/// How a client connects and retries.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Nodes to try, in order (any node of the cluster serves clients). When a node names a
    /// leader that is not among them (a node added to the membership since), the client adds
    /// the leader's address from the membership, if it is of the same IP family.
    pub endpoints: Vec<SocketAddr>,
    /// The cluster CA certificate the nodes' certificates must chain to.
    pub ca_cert: PathBuf,
    /// A client certificate and key to present, if the operator requires one.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Streams per connection. Default 4.
    pub streams: usize,
    /// Attempts per call, the first included. Default 30.
    pub attempts_max: u32,
    /// Time budget of one call, retries included. Default 30,000 ms.
    pub call_budget_ms: u64,
    /// Bound on connecting to one node. Default 2,000 ms.
    pub connect_timeout_ms: u64,
    /// A connection that hears nothing from its node for this long is given up, and the
    /// requests on it are retried on the next node. A live node is never that quiet: it sends
    /// a keep-alive after 500 ms without traffic (`tls::KEEP_ALIVE_INTERVAL_MS`), so this
    /// is how long a killed or cut-off node holds up the requests in flight to it. The
    /// connection uses the smaller of this and the node's idle timeout. Default and minimum
    /// 1,000 ms (twice the keep-alive interval; smaller values are raised to it).
    pub idle_timeout_ms: u64,
}

impl ClientOptions {
    /// Defaults for `endpoints` trusting `ca_cert`.
    pub fn new(endpoints: Vec<SocketAddr>, ca_cert: impl Into<PathBuf>) -> ClientOptions {
        ClientOptions {
            endpoints,
            ca_cert: ca_cert.into(),
            identity: None,
            streams: 4,
            attempts_max: 30,
            call_budget_ms: 30_000,
            connect_timeout_ms: 2_000,
            idle_timeout_ms: CLIENT_IDLE_TIMEOUT_MS,
        }
    }
}

/// Why a client call failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TLS configuration.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The local endpoint could not be created.
    #[error("endpoint: {0}")]
    Io(#[from] std::io::Error),
    /// No endpoints were given.
    #[error("no endpoints given")]
    NoEndpoints,
    /// An option is out of range.
    #[error("client option {what} is out of range")]
    BadOption { what: &'static str },
    /// Every attempt failed; the last failure.
    #[error("gave up after {attempts} attempts in {elapsed_ms} ms: {last}")]
    Exhausted {
        attempts: u32,
        elapsed_ms: u64,
        last: String,
    },
    /// The node refused the request itself (malformed, too large, unexpected).
    #[error("refused by node: {code:?}: {message}")]
    Refused { code: ErrorCode, message: String },
    /// The transaction got no receipt (see [`SubmitError`]).
    #[error("not sequenced: {0}")]
    NotSequenced(SubmitError),
    /// The request does not fit in one frame.
    #[error("request too large: {0}")]
    TooLarge(#[from] crate::frame::ProtocolError),
    /// The node's answer could not be decoded.
    #[error("undecodable answer: {0}")]
    Undecodable(#[from] MsgError),
}

/// What went wrong on one attempt.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("{0}")]
    Stream(#[from] StreamError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("undecodable answer: {0}")]
    Msg(#[from] MsgError),
    #[error("node error {code:?}: {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("connection lost before the answer")]
    Lost,
    #[error("no answer within the call's budget")]
    Timeout,
}

impl AttemptError {
    /// Errors that retrying elsewhere cannot fix.
    fn is_final(&self) -> bool {
        matches!(
            self,
            AttemptError::Remote {
                code: ErrorCode::Malformed | ErrorCode::TooLarge | ErrorCode::UnexpectedKind,
                ..
            }
        )
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<(FrameKind, Vec<u8>)>>>>;

/// One stream of a session: a shared writer and a reader task that routes answers by id.
struct Lane {
    send: tokio::sync::Mutex<quinn::SendStream>,
    pending: Pending,
    /// False once its reader stopped: nothing would route an answer any more.
    alive: Arc<AtomicBool>,
}

/// One connection to one node.
struct Session {
    conn: quinn::Connection,
    addr: SocketAddr,
    lanes: Vec<Arc<Lane>>,
    next_lane: AtomicUsize,
}

impl Session {
    async fn open(
        conn: quinn::Connection,
        addr: SocketAddr,
        streams: usize,
    ) -> Result<Session, AttemptError> {
        let mut lanes = Vec::new();
        for _ in 0..streams.max(1) {
            let (send, recv) = conn.open_bi().await?;
            let pending: Pending = Arc::default();
            let alive = Arc::new(AtomicBool::new(true));
            tokio::spawn(read_answers(
                FrameReader::new(recv),
                pending.clone(),
                alive.clone(),
            ));
            lanes.push(Arc::new(Lane {
                send: tokio::sync::Mutex::new(send),
                pending,
                alive,
            }));
        }
        Ok(Session {
            conn,
            addr,
            lanes,
            next_lane: AtomicUsize::new(0),
        })
    }

    /// Sends one request and waits for its answer.
    async fn request(
        &self,
        request_id: u64,
        kind: FrameKind,
        body: &[u8],
    ) -> Result<(FrameKind, Vec<u8>), AttemptError> {
        let lane = &self.lanes[self.next_lane.fetch_add(1, Ordering::Relaxed) % self.lanes.len()];
        let (tx, rx) = oneshot::channel();
        lane.pending
            .lock()
            .expect("pending lock")
            .insert(request_id, tx);
        // Checked after registering: a reader that stopped meanwhile cleared the map first.
        if !lane.alive.load(Ordering::Acquire) {
            lane.pending
                .lock()
                .expect("pending lock")
                .remove(&request_id);
            return Err(AttemptError::Lost);
        }
        let sent = {
            let mut send = lane.send.lock().await;
            write_frame(&mut send, kind, body).await
        };
        if let Err(e) = sent {
            lane.pending
                .lock()
                .expect("pending lock")
                .remove(&request_id);
            return Err(e.into());
        }
        let (kind, body) = rx.await.map_err(|_| AttemptError::Lost)?;
        if kind == FrameKind::Error {
            let e = ErrorMsg::decode(&body)?;
            return Err(AttemptError::Remote {
                code: e.code,
                message: e.message,
            });
        }
        Ok((kind, body))
    }

    /// True while the connection is open and every stream still routes answers.
    fn usable(&self) -> bool {
        self.conn.close_reason().is_none()
            && self.lanes.iter().all(|l| l.alive.load(Ordering::Acquire))
    }
}

/// Routes a stream's answers to their waiting requests; when the stream ends, every waiting
/// request learns it (its sender is dropped).
async fn read_answers(mut reader: FrameReader, pending: Pending, alive: Arc<AtomicBool>) {
    while let Ok(Some(f)) = reader.next().await {
        let id = f
            .body
            .get(..8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        let waiter = pending.lock().expect("pending lock").remove(&id);
        match waiter {
            Some(w) => {
                let _ = w.send((f.kind, f.body));
            }
            // An error about the stream itself (id 0): it is over.
            None if f.kind == FrameKind::Error && id == 0 => break,
            None => tracing::debug!(id, "answer for no waiting request"),
        }
    }
    alive.store(false, Ordering::Release);
    pending.lock().expect("pending lock").clear();
}

/// A client of a baton cluster. Cheap to clone; use from any tokio runtime.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    options: ClientOptions,
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// `options.endpoints`, then leaders' addresses learned from `NotLeader` hints.
    endpoints: Mutex<Vec<SocketAddr>>,
    /// Index into `endpoints` of the node to try next.
    next_endpoint: AtomicUsize,
    next_request: AtomicU64,
}

impl Inner {
    /// The endpoints now (the configured ones, then learned leaders).
    fn endpoints(&self) -> Vec<SocketAddr> {
        self.endpoints.lock().expect("endpoints lock").clone()
    }

    /// The endpoint to try next.
    fn next_addr(&self) -> SocketAddr {
        let eps = self.endpoints.lock().expect("endpoints lock");
        eps[self.next_endpoint.load(Ordering::Relaxed) % eps.len()]
    }

    /// The index of `addr` among the endpoints, adding it if the client can reach it from its
    /// socket (bound like the first configured endpoint: same family, loopback to loopback).
    fn learn(&self, addr: SocketAddr) -> Option<usize> {
        let mut eps = self.endpoints.lock().expect("endpoints lock");
        if let Some(at) = eps.iter().position(|e| *e == addr) {
            return Some(at);
        }
        let first = self.options.endpoints[0];
        let reachable = first.is_ipv6() == addr.is_ipv6()
            && (!first.ip().is_loopback() || addr.ip().is_loopback());
        if !reachable || eps.len() >= ENDPOINTS_LEARNED_MAX + self.options.endpoints.len() {
            return None;
        }
        eps.push(addr);
        Some(eps.len() - 1)
    }
}

/// Most leader addresses a client adds to its configured endpoints.
const ENDPOINTS_LEARNED_MAX: usize = 64;

fn retryable(e: &SubmitError) -> bool {
    matches!(
        e,
        SubmitError::NotLeader { .. }
            | SubmitError::Overloaded { .. }
            | SubmitError::CommitTimeout { .. }
            | SubmitError::ShuttingDown
            | SubmitError::Membership(MembershipRejection::InProgress)
            | SubmitError::Leadership(LeadershipRejection::InProgress)
    )
}

impl Client {
    /// A client for the nodes in `options` (connects lazily, on the first call).
    pub fn new(options: ClientOptions) -> Result<Client, ClientError> {
        if options.endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let identity = options
            .identity
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        let mut config = tls::client_config(&options.ca_cert, identity)?;
        let mut transport = tls::transport_config();
        let idle =
            Duration::from_millis(options.idle_timeout_ms.max(2 * tls::KEEP_ALIVE_INTERVAL_MS));
        transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(idle).map_err(|_| {
            ClientError::BadOption {
                what: "idle_timeout_ms",
            }
        })?));
        config.transport_config(Arc::new(transport));
        let bind: SocketAddr = if options.endpoints[0].is_ipv6() {
            "[::1]:0".parse().expect("literal")
        } else {
            "127.0.0.1:0".parse().expect("literal")
        };
        let bind = if options.endpoints[0].ip().is_loopback() {
            bind
        } else if options.endpoints[0].is_ipv6() {
            "[::]:0".parse().expect("literal")
        } else {
            "0.0.0.0:0".parse().expect("literal")
        };
        let endpoint = crate::udp::endpoint(bind, None)?;
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints: Mutex::new(options.endpoints.clone()),
                options,
                endpoint,
                config,
                session: tokio::sync::Mutex::new(None),
                next_endpoint: AtomicUsize::new(0),
                next_request: AtomicU64::new(1),
            }),
        })
    }

    /// The node the client is connected to, if any.
    pub async fn connected_to(&self) -> Option<SocketAddr> {
        self.inner.session.lock().await.as_ref().map(|s| s.addr)
    }

    /// The current session, connecting (to the next endpoint in turn) if there is none.
    async fn session(&self) -> Result<Arc<Session>, AttemptError> {
        let mut slot = self.inner.session.lock().await;
        if let Some(s) = slot.as_ref() {
            if s.usable() {
                return Ok(s.clone());
            }
        }
        *slot = None;
        let addr = self.inner.next_addr();
        let timeout = Duration::from_millis(self.inner.options.connect_timeout_ms);
        let connect = async {
            let conn = self
                .inner
                .endpoint
                .connect_with(self.inner.config.clone(), addr, &tls::server_name(&addr))
                .map_err(|e| AttemptError::Connect {
                    addr,
                    reason: e.to_string(),
                })?
                .await
                .map_err(|e| AttemptError::Connect {
                    addr,
                    reason: e.to_string(),
                })?;
            Session::open(conn, addr, self.inner.options.streams).await
        };
        let session =
            tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| AttemptError::Connect {
                    addr,
                    reason: format!("no handshake within {} ms", timeout.as_millis()),
                })??;
        let session = Arc::new(session);
        *slot = Some(session.clone());
        Ok(session)
    }

    /// Drops the session to `addr` (if still current) and moves on to the next endpoint.
    async fn fail_over(&self, addr: SocketAddr) {
        let mut slot = self.inner.session.lock().await;
        if slot.as_ref().is_some_and(|s| s.addr == addr) {
            if let Some(s) = slot.take() {
                s.conn.close(0u32.into(), b"failing over");
            }
        }
        let eps = self.inner.endpoints();
        let current = eps.iter().position(|e| *e == addr).unwrap_or(0);
        let _ = self.inner.next_endpoint.compare_exchange(
            current,
            (current + 1) % eps.len(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Moves the client to node `leader` (a `NotLeader` hint), at its address as the cluster
    /// membership gives it; an address the client did not know is added to its endpoints if
    /// the client's socket can reach it (same IP family; loopback only from loopback).
    async fn prefer_leader(&self, leader: u64) {
        let Some(session) = self.inner.session.lock().await.clone() else {
            return;
        };
        let request_id = self.next_id();
        let mut body = Vec::new();
        StatusRequest { request_id }.encode(&mut body);
        let asked = session.request(request_id, FrameKind::StatusRequest, &body);
        let Ok(Ok((FrameKind::StatusResponse, answer))) =
            tokio::time::timeout(Duration::from_secs(1), asked).await
        else {
            return;
        };
        let Ok(status) = StatusResponse::decode(&answer) else {
            return;
        };
        let named = status.status.members.iter().find(|m| m.id == leader);
        let names_itself = leader == status.status.id && status.status.role != Role::Leader;
        if names_itself || named.is_none() {
            // A node that names itself while refusing (a leader removed from the membership
            // keeps its last vote), or a leader outside its own membership, knows no better:
            // try the next node.
            self.fail_over(session.addr).await;
            return;
        }
        let target = named
            .and_then(|m| m.addr.parse::<SocketAddr>().ok())
            .and_then(|addr| self.inner.learn(addr));
        let eps = self.inner.endpoints();
        if let Some(at) = target {
            if eps[at] != session.addr {
                self.inner.next_endpoint.store(at, Ordering::Relaxed);
                let mut slot = self.inner.session.lock().await;
                if slot.as_ref().is_some_and(|s| s.addr == session.addr) {
                    *slot = None;
                }
            }
        }
    }

    fn next_id(&self) -> u64 {
        self.inner.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// One request on the current session; on a connection-level failure the client fails over
    /// to the next node.
    async fn attempt(
        &self,
        kind: FrameKind,
        body: &[u8],
        request_id: u64,
        deadline: Instant,
        asked: &mut SocketAddr,
    ) -> Result<(FrameKind, Vec<u8>), AttemptError> {
        let session = self.session().await;
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                *asked = self.inner.next_addr();
                self.fail_over(*asked).await;
                return Err(e);
            }
        };
        *asked = session.addr;
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, session.request(request_id, kind, body))
            .await
            .unwrap_or(Err(AttemptError::Timeout));
        match &r {
            Err(AttemptError::Remote {
                code: ErrorCode::ShuttingDown | ErrorCode::Overloaded,
                ..
            })
            | Err(AttemptError::Stream(_))
            | Err(AttemptError::Connection(_))
            | Err(AttemptError::Lost)
            | Err(AttemptError::Timeout) => self.fail_over(session.addr).await,
            _ => {}
        }
        r
    }

    /// Sequences one transaction; its receipt or why it has none.
    pub async fn submit_one(&self, tx: Transaction) -> Result<Receipt, ClientError> {
        let mut r = self.submit(vec![tx]).await?;
        r.pop()
            .expect("one result per transaction")
            .map_err(ClientError::NotSequenced)
    }

    /// Sequences `txs` (one request; retried as needed) and waits for committed receipts; one
    /// result per transaction, in order. `Err` when the cluster could not be reached within the
    /// budget or refused the request.
    pub async fn submit(
        &self,
        txs: Vec<Transaction>,
    ) -> Result<Vec<Result<Receipt, SubmitError>>, ClientError> {
        self.submit_with(txs, AckLevel::Committed).await
    }

    /// [`submit`](Client::submit), answered at level `ack`: `Preconfirmed` returns as soon as the
    /// leader has ordered and signed each transaction's batch (a receipt may come back at
    /// `Committed` when that happened first, e.g. through a follower).
    pub async fn submit_with(
        &self,
        txs: Vec<Transaction>,
        ack: AckLevel,
    ) -> Result<Vec<Result<Receipt, SubmitError>>, ClientError> {
        let started = Instant::now();
        let budget = Duration::from_millis(self.inner.options.call_budget_ms);
        let n = txs.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut results: Vec<Option<Result<Receipt, SubmitError>>> = vec![None; n];
        let mut todo: Vec<usize> = (0..n).collect();
        let mut last = String::new();
        let mut attempts = 0;
        let mut pace = Pace::default();
        // The node the last attempt asked (its session's, or the one that could not be reached).
        let mut tried = self.inner.next_addr();
        while !todo.is_empty() {
            if attempts == self.inner.options.attempts_max || started.elapsed() >= budget {
                break;
            }
            if attempts > 0 {
                pace.moved(self.inner.next_addr() != tried);
            }
            pace.wait(attempts).await;
            attempts += 1;
            let request_id = self.next_id();
            let mut body = Vec::new();
            SubmitRequest::encode_from(request_id, ack, todo.iter().map(|&i| &txs[i]), &mut body);
            crate::frame::frame_header(FrameKind::SubmitRequest, body.len())?;
            let answer = match self
                .attempt(
                    FrameKind::SubmitRequest,
                    &body,
                    request_id,
                    started + budget,
                    &mut tried,
                )
                .await
            {
                Ok(a) => a,
                Err(AttemptError::Remote { code, message })
                    if (AttemptError::Remote {
                        code,
                        message: String::new(),
                    })
                    .is_final() =>
                {
                    return Err(ClientError::Refused { code, message });
                }
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let response = match answer.0 {
                FrameKind::SubmitResponse => SubmitResponse::decode(&answer.1),
                kind => {
                    last = format!("unexpected answer {kind:?}");
                    continue;
                }
            };
            let response = match response {
                Ok(r) if r.results.len() == todo.len() => r,
                Ok(r) => {
                    last = format!(
                        "{} results for {} transactions",
                        r.results.len(),
                        todo.len()
                    );
                    continue;
                }
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let mut again = Vec::new();
            let mut hint = None;
            let mut stopping = false;
            for (&i, r) in todo.iter().zip(response.results) {
                match &r {
                    Err(SubmitError::NotLeader {
                        leader_hint: Some(l),
                    }) => hint = Some(*l),
                    Err(SubmitError::ShuttingDown) => stopping = true,
                    _ => {}
                }
                // Positions in a retried request count within the retried subset.
                let r = match r {
                    Err(SubmitError::Invalid { reason, .. }) => Err(SubmitError::Invalid {
                        position: i,
                        reason,
                    }),
                    r => r,
                };
                match r {
                    Err(e) if retryable(&e) => {
                        last = e.to_string();
                        results[i] = Some(Err(e));
                        again.push(i);
                    }
                    r => results[i] = Some(r),
                }
            }
            todo = again;
            if let (Some(leader), false) = (hint, todo.is_empty()) {
                self.prefer_leader(leader).await;
            } else if stopping && !todo.is_empty() {
                // That node is stopping: the rest goes to another one.
                self.fail_over(tried).await;
            }
        }
        if results.iter().all(Option::is_none) {
            return Err(ClientError::Exhausted {
                attempts,
                elapsed_ms: started.elapsed().as_millis() as u64,
                last,
            });
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or(Err(SubmitError::CommitTimeout {
                    waited_ms: started.elapsed().as_millis() as u64,
                }))
            })
            .collect())
    }

    /// The status of the node the client is connected to.
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        let response = self
            .call(
                FrameKind::StatusRequest,
                FrameKind::StatusResponse,
                |request_id| {
                    let mut body = Vec::new();
                    StatusRequest { request_id }.encode(&mut body);
                    body
                },
                StatusResponse::decode,
                |_| None,
            )
            .await?;
        Ok(response.status)
    }

    /// The stage latencies of the node the client is connected to, over the window this call
    /// ends (since the previous call, by anyone, or the node's start; see
    /// `baton_core::node::stages`).
    pub async fn stages(&self) -> Result<StageReport, ClientError> {
        let response = self
            .call(
                FrameKind::StagesRequest,
                FrameKind::StagesResponse,
                |request_id| {
                    let mut body = Vec::new();
                    StagesRequest { request_id }.encode(&mut body);
                    body
                },
                StagesResponse::decode,
                |_| None,
            )
            .await?;
        Ok(response.report)
    }

    /// One request answered by one frame of kind `want`, retried (with backoff, within the
    /// call budget) while the node cannot be reached or answers with a retryable `SubmitError`
    /// (`retry` says which answers those are; a `NotLeader` hint moves the client first).
    async fn call<T>(
        &self,
        kind: FrameKind,
        want: FrameKind,
        body: impl Fn(u64) -> Vec<u8>,
        decode: impl Fn(&[u8]) -> Result<T, MsgError>,
        retry: impl Fn(&T) -> Option<&SubmitError>,
    ) -> Result<T, ClientError> {
        let budget = Duration::from_millis(self.inner.options.call_budget_ms);
        self.call_within(budget, kind, want, body, decode, retry)
            .await
    }

    /// [`Client::call`] with its own time budget.
    async fn call_within<T>(
        &self,
        budget: Duration,
        kind: FrameKind,
        want: FrameKind,
        body: impl Fn(u64) -> Vec<u8>,
        decode: impl Fn(&[u8]) -> Result<T, MsgError>,
        retry: impl Fn(&T) -> Option<&SubmitError>,
    ) -> Result<T, ClientError> {
        let started = Instant::now();
        let mut last = String::new();
        let mut attempts = 0;
        let mut pace = Pace::default();
        let mut tried = self.inner.next_addr();
        while attempts < self.inner.options.attempts_max && started.elapsed() < budget {
            if attempts > 0 {
                pace.moved(self.inner.next_addr() != tried);
            }
            pace.wait(attempts).await;
            attempts += 1;
            let request_id = self.next_id();
            let request = body(request_id);
            crate::frame::frame_header(kind, request.len())?;
            match self
                .attempt(kind, &request, request_id, started + budget, &mut tried)
                .await
            {
                Ok((k, answer)) if k == want => match decode(&answer) {
                    Ok(v) => match retry(&v) {
                        Some(e) if retryable(e) && attempts < self.inner.options.attempts_max => {
                            last = e.to_string();
                            if let SubmitError::NotLeader {
                                leader_hint: Some(l),
                            } = e
                            {
                                self.prefer_leader(*l).await;
                            }
                        }
                        _ => return Ok(v),
                    },
                    Err(e) => last = e.to_string(),
                },
                Ok((k, _)) => last = format!("unexpected answer {k:?}"),
                Err(AttemptError::Remote { code, message })
                    if (AttemptError::Remote {
                        code,
                        message: String::new(),
                    })
                    .is_final() =>
                {
                    return Err(ClientError::Refused { code, message });
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(ClientError::Exhausted {
            attempts,
            elapsed_ms: started.elapsed().as_millis() as u64,
            last,
        })
    }

    /// Proposes a control command through the leader (followed through `NotLeader` hints):
    /// where it was applied and what it did, or [`ClientError::NotSequenced`] with the typed
    /// reason it was refused (e.g. [`SubmitError::Command`]).
    pub async fn command(&self, command: Command) -> Result<CommandReceipt, ClientError> {
        let response = self
            .call(
                FrameKind::CommandRequest,
                FrameKind::CommandResponse,
                |request_id| {
                    let mut body = Vec::new();
                    CommandRequest {
                        request_id,
                        command: command.clone(),
                    }
                    .encode(&mut body);
                    body
                },
                CommandResponse::decode,
                |r: &CommandResponse| r.result.as_ref().err(),
            )
            .await?;
        response.result.map_err(ClientError::NotSequenced)
    }

    /// Changes the cluster's membership through the leader (`baton admin member`): adds a
    /// node (as a learner, then, once it has caught up with the leader's log within
    /// `catch_up`, as a voter if asked) or removes one. Needs the cluster's client certificate
    /// ([`ClientOptions::identity`]): without one, or with a node's, the node answers
    /// [`MembershipRejection::Unauthenticated`]. The call's budget is the client's plus
    /// `catch_up`. A `CommitTimeout` is returned, not retried: the change may still complete;
    /// asking again is safe (an addition already made answers with the membership as it is,
    /// index 0; a removal already made answers `NotAMember`).
    pub async fn change_members(
        &self,
        change: MemberChange,
        catch_up: Duration,
    ) -> Result<MembershipChanged, ClientError> {
        let budget = Duration::from_millis(self.inner.options.call_budget_ms) + catch_up;
        let response = self
            .call_within(
                budget,
                FrameKind::MemberRequest,
                FrameKind::MemberResponse,
                |request_id| {
                    let mut body = Vec::new();
                    MemberRequest {
                        request_id,
                        change: change.clone(),
                        catch_up,
                    }
                    .encode(&mut body);
                    body
                },
                MemberResponse::decode,
                // Not retried: a `CommitTimeout` (the change may still complete, on the leader's
                // own task) goes back to the caller, who asks again knowing it.
                |r: &MemberResponse| {
                    r.result
                        .as_ref()
                        .err()
                        .filter(|e| !matches!(e, SubmitError::CommitTimeout { .. }))
                },
            )
            .await?;
        response.result.map_err(ClientError::NotSequenced)
    }

    /// Moves leadership through the leader (`baton admin leader transfer`) to voter `to`, or
    /// with `None` to the voter whose log matches the leader's furthest; answers once another
    /// node leads. Needs the cluster's client certificate, like
    /// [`change_members`](Self::change_members). `NotLeader` answers are followed; a
    /// [`SubmitError::Leadership`] rejection is returned (`NotTakenOver`: the old leader stopped
    /// taking writes and an election follows). An answer lost with its connection is asked
    /// for again, so with `to = None` leadership may move twice.
    pub async fn transfer_leader(&self, to: Option<u64>) -> Result<LeaderTransferred, ClientError> {
        let response = self
            .call(
                FrameKind::LeaderRequest,
                FrameKind::LeaderResponse,
                |request_id| {
                    let mut body = Vec::new();
                    LeaderRequest { request_id, to }.encode(&mut body);
                    body
                },
                LeaderResponse::decode,
                |r: &LeaderResponse| r.result.as_ref().err(),
            )
            .await?;
        response.result.map_err(ClientError::NotSequenced)
    }

    /// Registers a rollup (`baton admin rollup add`).
    pub async fn register_rollup(
        &self,
        rollup_id: u64,
        policy: RollupPolicy,
    ) -> Result<CommandReceipt, ClientError> {
        self.command(Command::RegisterRollup { rollup_id, policy })
            .await
    }

    /// Reveals the key of an encrypted transaction; every node records its plaintext.
    pub async fn reveal(
        &self,
        tx_hash: TxHash,
        key: [u8; KEY_BYTES],
    ) -> Result<CommandReceipt, ClientError> {
        self.command(Command::Reveal { tx_hash, key }).await
    }

    /// A read on the connected node at `consistency` (the node waits at most `timeout` for it
    /// to hold): the node's applied index and what it found.
    pub async fn read(
        &self,
        query: Query,
        consistency: Consistency,
        timeout: Duration,
    ) -> Result<Read<Answer>, ClientError> {
        let response = self
            .call(
                FrameKind::ReadRequest,
                FrameKind::ReadResponse,
                |request_id| {
                    let mut body = Vec::new();
                    ReadRequest {
                        request_id,
                        consistency,
                        timeout,
                        query,
                    }
                    .encode(&mut body);
                    body
                },
                ReadResponse::decode,
                |r: &ReadResponse| r.result.as_ref().err(),
            )
            .await?;
        response.result.map_err(ClientError::NotSequenced)
    }

    /// Streams `rollup_id`'s blocks from `from_height` (1: the first), then each new block as
    /// the connected node applies it. The stream resumes on another node after a lost
    /// connection, from the next height it has not delivered.
    pub fn subscribe_blocks(&self, rollup_id: u64, from_height: u64) -> BlockStream {
        BlockStream {
            client: self.clone(),
            rollup_id,
            next_height: from_height.max(1),
            reader: None,
        }
    }

    /// Opens a subscription stream on the current session.
    async fn open_subscription(
        &self,
        rollup_id: u64,
        from_height: u64,
    ) -> Result<FrameReader, AttemptError> {
        let session = self.session().await?;
        let (mut send, recv) = session.conn.open_bi().await?;
        let mut body = Vec::new();
        SubscribeRequest {
            request_id: self.next_id(),
            rollup_id,
            from_height,
        }
        .encode(&mut body);
        write_frame(&mut send, FrameKind::SubscribeRequest, &body).await?;
        Ok(FrameReader::new(recv))
    }

    /// Closes the connection.
    pub async fn close(&self) {
        if let Some(s) = self.inner.session.lock().await.take() {
            s.conn.close(0u32.into(), b"bye");
        }
        self.inner.endpoint.wait_idle().await;
    }
}

/// A block subscription (see [`Client::subscribe_blocks`]).
pub struct BlockStream {
    client: Client,
    rollup_id: u64,
    next_height: u64,
    reader: Option<FrameReader>,
}

impl BlockStream {
    /// The next block in height order, waiting for it to be sealed. Connection failures are
    /// retried within the client's budget; a refusal (unknown rollup) is final.
    pub async fn next(&mut self) -> Result<BlockEvent, ClientError> {
        let started = Instant::now();
        let budget = Duration::from_millis(self.client.inner.options.call_budget_ms);
        let mut attempts = 0;
        let mut last = String::new();
        loop {
            let reader = match self.reader.as_mut() {
                Some(r) => r,
                None => {
                    if attempts > 0 && started.elapsed() >= budget {
                        return Err(ClientError::Exhausted {
                            attempts,
                            elapsed_ms: started.elapsed().as_millis() as u64,
                            last,
                        });
                    }
                    if attempts > 0 {
                        backoff(attempts).await;
                    }
                    attempts += 1;
                    match self
                        .client
                        .open_subscription(self.rollup_id, self.next_height)
                        .await
                    {
                        Ok(r) => self.reader.insert(r),
                        Err(e) => {
                            last = e.to_string();
                            self.client.fail_over(self.client.inner.next_addr()).await;
                            continue;
                        }
                    }
                }
            };
            match reader.next().await {
                Ok(Some(f)) if f.kind == FrameKind::BlockEvent => {
                    let event = BlockEvent::decode(&f.body)?;
                    if event.block.block.signed.header.height != self.next_height {
                        self.reader = None;
                        last = "block out of order".into();
                        continue;
                    }
                    self.next_height += 1;
                    return Ok(event);
                }
                Ok(Some(f)) if f.kind == FrameKind::ReadResponse => {
                    let r = ReadResponse::decode(&f.body)?;
                    // The node is stopping (or cannot tell): resume elsewhere.
                    if let Err(e) = &r.result {
                        if retryable(e) {
                            last = e.to_string();
                            self.reader = None;
                            let addr = self.client.connected_to().await;
                            if let Some(addr) = addr {
                                self.client.fail_over(addr).await;
                            }
                            continue;
                        }
                    }
                    return Err(match r.result {
                        Err(e) => ClientError::NotSequenced(e),
                        Ok(_) => ClientError::Refused {
                            code: ErrorCode::UnexpectedKind,
                            message: "a read answer on a block stream".into(),
                        },
                    });
                }
                Ok(Some(f)) if f.kind == FrameKind::Error => {
                    let e = ErrorMsg::decode(&f.body)?;
                    return Err(ClientError::Refused {
                        code: e.code,
                        message: e.message,
                    });
                }
                Ok(other) => {
                    last = format!("block stream ended: {:?}", other.map(|f| f.kind));
                    self.reader = None;
                }
                Err(e) => {
                    last = e.to_string();
                    self.reader = None;
                }
            }
        }
    }

    /// Height of the next block this stream will deliver.
    pub fn next_height(&self) -> u64 {
        self.next_height
    }
}

/// When a client's next attempt starts: after a backoff, except right after the client moved to
/// another node (a leader hint, or a node that failed or is stopping), which is tried at once;
/// never twice in a row at once, so a cluster with no leader is not asked in a tight loop.
#[derive(Default)]
struct Pace {
    moved: bool,
    skipped: bool,
}

impl Pace {
    /// Notes whether the last attempt left the client pointed at another node than it asked.
    fn moved(&mut self, moved: bool) {
        self.moved = moved;
    }

    /// Waits before attempt `attempts + 1` (not before the first).
    async fn wait(&mut self, attempts: u32) {
        let at_once = attempts > 0 && self.moved && !self.skipped;
        if attempts > 0 && !at_once {
            backoff(attempts).await;
        }
        self.skipped = at_once;
    }
}

/// Exponential backoff between attempts: 10 ms doubling, at most 500 ms.
async fn backoff(attempt: u32) {
    let ms = (10u64 << attempt.min(6)).min(500);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}
