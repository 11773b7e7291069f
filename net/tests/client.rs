//! `Client` against fake nodes: quinn server endpoints on 127.0.0.1 that speak the client
//! protocol (frames of `SubmitRequest`/`StatusRequest`, answered by request id) with scripted
//! answers, so leader hints, lost connections, per-transaction retries and an exhausted budget
//! can each be provoked on purpose.

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_core::node::{Member, NodeStatus, Receipt, Role, SubmitError};
use baton_core::{SubmitRejection, Transaction, TxKind};
use baton_net::msg::{StatusRequest, StatusResponse, SubmitRequest, SubmitResponse};
use baton_net::stream::{write_frame, FrameReader};
use baton_net::tls::{self, CertFiles, CertOptions};
use baton_net::{Client, ClientError, ClientOptions, FrameKind};
use quinn::{Connection, Endpoint};
use tempfile::TempDir;

/// Bound on every test: everything happens on loopback.
const WAIT: Duration = Duration::from_secs(5);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} timed out"))
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A CA and certificates for nodes 1 and 2, in a directory that lives as long as this.
struct Certs {
    _dir: TempDir,
    files: CertFiles,
}

fn certs() -> Certs {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tls::generate(dir.path(), &CertOptions::new("test", 2)).expect("generate");
    Certs { _dir: dir, files }
}

// ---------------------------------------------------------------------------------------------
// Fake nodes

/// A request as a fake node received it.
#[derive(Clone, Debug)]
enum Request {
    Submit(SubmitRequest),
    Status(StatusRequest),
}

/// What a fake node does about a request.
enum Reply {
    /// A `SubmitResponse` with these results.
    Submit(Vec<Result<Receipt, SubmitError>>),
    /// A `StatusResponse` with this status.
    Status(NodeStatus),
    /// Closes the whole connection instead of answering.
    Close,
    /// Never answers (the connection stays up, kept alive by QUIC).
    Silence,
}

/// Every request a fake node received, in order.
type Seen = Arc<Mutex<Vec<Request>>>;

/// Decides the reply to a request, given how many submit requests the node saw before it.
type Behaviour = Arc<dyn Fn(&Request, usize) -> Reply + Send + Sync>;

/// A fake node: a server endpoint accepting client connections and their streams, answering
/// every request as its behaviour says, and recording every request it received.
struct FakeNode {
    addr: SocketAddr,
    seen: Seen,
}

impl FakeNode {
    /// Node `id` of `certs`, listening on 127.0.0.1 (port chosen by the system).
    fn start(
        certs: &Certs,
        id: u64,
        behaviour: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    ) -> FakeNode {
        let (cert, key) = certs.files.node(id).expect("node certificate");
        let config = tls::server_config(&certs.files.ca_cert, cert, key).expect("server config");
        let endpoint = Endpoint::server(config, loopback()).expect("bind fake node");
        let addr = endpoint.local_addr().expect("fake node address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(accept_connections(
            endpoint,
            Arc::new(behaviour),
            seen.clone(),
        ));
        FakeNode { addr, seen }
    }

    fn submits(&self) -> Vec<SubmitRequest> {
        let seen = self.seen.lock().expect("seen lock");
        seen.iter()
            .filter_map(|r| match r {
                Request::Submit(s) => Some(s.clone()),
                Request::Status(_) => None,
            })
            .collect()
    }
}

async fn accept_connections(endpoint: Endpoint, behaviour: Behaviour, seen: Seen) {
    while let Some(incoming) = endpoint.accept().await {
        let Ok(conn) = incoming.await else { continue };
        tokio::spawn(accept_streams(conn, behaviour.clone(), seen.clone()));
    }
}

async fn accept_streams(conn: Connection, behaviour: Behaviour, seen: Seen) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_stream(
            conn.clone(),
            send,
            recv,
            behaviour.clone(),
            seen.clone(),
        ));
    }
}

/// Answers the requests of one stream, one at a time, in order.
async fn serve_stream(
    conn: Connection,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    behaviour: Behaviour,
    seen: Seen,
) {
    let mut reader = FrameReader::new(recv);
    while let Ok(Some(frame)) = reader.next().await {
        let request = match frame.kind {
            FrameKind::SubmitRequest => {
                Request::Submit(SubmitRequest::decode(&frame.body).expect("submit request"))
            }
            FrameKind::StatusRequest => {
                Request::Status(StatusRequest::decode(&frame.body).expect("status request"))
            }
            kind => panic!("fake node got a {kind:?} frame"),
        };
        let submits_before = {
            let mut seen = seen.lock().expect("seen lock");
            let n = seen
                .iter()
                .filter(|r| matches!(r, Request::Submit(_)))
                .count();
            seen.push(request.clone());
            n
        };
        let mut body = Vec::new();
        let kind = match (behaviour(&request, submits_before), &request) {
            (Reply::Close, _) => {
                conn.close(1u32.into(), b"fake node hangs up");
                return;
            }
            (Reply::Silence, _) => continue,
            (Reply::Submit(results), Request::Submit(r)) => {
                SubmitResponse {
                    request_id: r.request_id,
                    results,
                }
                .encode(&mut body);
                FrameKind::SubmitResponse
            }
            (Reply::Status(status), Request::Status(r)) => {
                StatusResponse {
                    request_id: r.request_id,
                    status,
                }
                .encode(&mut body);
                FrameKind::StatusResponse
            }
            (_, request) => panic!("behaviour answered {request:?} with the wrong kind"),
        };
        if write_frame(&mut send, kind, &body).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn tx(i: u8) -> Transaction {
    Transaction {
        rollup_id: 1,
        kind: TxKind::Raw,
        bytes: vec![i; 16],
    }
}

fn txs(n: u8) -> Vec<Transaction> {
    (0..n).map(tx).collect()
}

/// The receipt a fake node gives the transaction at `offset` of a request: batch index 7.
fn receipt(tx: &Transaction, offset: usize) -> Receipt {
    let header = baton_core::BatchHeader {
        term: 3,
        index: 7,
        prev_batch_hash: [0; 32],
        tx_merkle_root: [0; 32],
        tx_count: 1 << 12,
        timestamp_us: 1,
    };
    let key = baton_core::Signer::from_secret(&[1; 32]).unwrap();
    Receipt {
        tx_hash: tx.tx_hash(),
        level: baton_core::AckLevel::Committed,
        batch: baton_core::SignedHeader::sign(header, &key),
        offset: offset as u32,
        path: Vec::new(),
        duplicate: false,
    }
}

/// Receipts for every transaction of a request.
fn receipts(txs: &[Transaction]) -> Vec<Result<Receipt, SubmitError>> {
    txs.iter()
        .enumerate()
        .map(|(i, tx)| Ok(receipt(tx, i)))
        .collect()
}

/// A follower's status naming the members `(id, address)`.
fn status(id: u64, leader: u64, members: &[(u64, SocketAddr)]) -> NodeStatus {
    NodeStatus {
        id,
        role: Role::Follower,
        term: 3,
        leader: Some(leader),
        last_log_index: Some(10),
        committed_index: Some(10),
        applied_index: Some(10),
        snapshot_index: None,
        purged_index: None,
        signer: baton_core::Address::default(),
        members: members
            .iter()
            .map(|&(id, addr)| Member {
                id,
                addr: addr.to_string(),
                voter: true,
            })
            .collect(),
        replication: Vec::new(),
    }
}

/// A node that sequences everything: receipts for every submission.
fn sequencing(request: &Request, _: usize) -> Reply {
    match request {
        Request::Submit(r) => Reply::Submit(receipts(&r.txs)),
        Request::Status(_) => panic!("no status request expected"),
    }
}

fn client(certs: &Certs, endpoints: Vec<SocketAddr>) -> Client {
    Client::new(ClientOptions::new(endpoints, &certs.files.ca_cert)).expect("client")
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "current_thread")]
async fn not_leader_hint_moves_the_client_to_the_leader() {
    let certs = certs();
    let b = FakeNode::start(&certs, 2, sequencing);
    let b_addr = b.addr;
    // A's status names A itself, whose address is known only once it is bound: its behaviour
    // reads it from a slot filled right after the start.
    let a_addr = Arc::new(Mutex::new(None::<SocketAddr>));
    let a_slot = a_addr.clone();
    let a = FakeNode::start(&certs, 1, move |request, _| match request {
        Request::Submit(r) => Reply::Submit(
            r.txs
                .iter()
                .map(|_| {
                    Err(SubmitError::NotLeader {
                        leader_hint: Some(2),
                    })
                })
                .collect(),
        ),
        Request::Status(_) => {
            let a = a_slot.lock().expect("a addr").expect("a addr set");
            Reply::Status(status(1, 2, &[(1, a), (2, b_addr)]))
        }
    });
    *a_addr.lock().expect("a addr") = Some(a.addr);
    let client = client(&certs, vec![a.addr, b.addr]);
    let sent = txs(3);

    let results = within("submit", client.submit(sent.clone()))
        .await
        .expect("submit");

    assert_eq!(results, receipts(&sent));
    assert_eq!(client.connected_to().await, Some(b.addr));
    assert_eq!(a.submits().len(), 1, "A saw one submission");
    let at_b = b.submits();
    assert_eq!(at_b.len(), 1, "B saw one submission");
    assert_eq!(at_b[0].txs, sent);
}

#[tokio::test(flavor = "current_thread")]
async fn a_lost_connection_fails_over_and_retries() {
    let certs = certs();
    let a = FakeNode::start(&certs, 1, |request, submits_before| match request {
        Request::Submit(_) if submits_before == 0 => Reply::Close,
        request => sequencing(request, submits_before),
    });
    let b = FakeNode::start(&certs, 2, sequencing);
    let client = client(&certs, vec![a.addr, b.addr]);
    let sent = txs(3);

    let results = within("submit", client.submit(sent.clone()))
        .await
        .expect("submit");

    assert_eq!(results, receipts(&sent));
    assert_eq!(a.submits().len(), 1, "A saw the first attempt");
    assert_eq!(b.submits().len(), 1, "B saw the retry");
    assert_eq!(client.connected_to().await, Some(b.addr));
}

/// A node that answers `ShuttingDown` for every transaction (it is stopping) is not asked again:
/// the client moves the rest to the next node.
#[tokio::test(flavor = "current_thread")]
async fn a_stopping_node_sends_the_client_to_another() {
    let certs = certs();
    let a = FakeNode::start(&certs, 1, |request, _| match request {
        Request::Submit(r) => Reply::Submit(
            r.txs
                .iter()
                .map(|_| Err(SubmitError::ShuttingDown))
                .collect(),
        ),
        Request::Status(_) => panic!("no status request expected"),
    });
    let b = FakeNode::start(&certs, 2, sequencing);
    let client = client(&certs, vec![a.addr, b.addr]);
    let sent = txs(3);

    let results = within("submit", client.submit(sent.clone()))
        .await
        .expect("submit");

    assert_eq!(results, receipts(&sent));
    assert_eq!(a.submits().len(), 1, "A was asked once");
    assert_eq!(b.submits().len(), 1, "B took the rest");
    assert_eq!(client.connected_to().await, Some(b.addr));
}

#[tokio::test(flavor = "current_thread")]
async fn per_transaction_errors_are_retried_only_for_retryable_ones() {
    let certs = certs();
    let invalid = SubmitError::Invalid {
        position: 2,
        reason: SubmitRejection::EmptyTx,
    };
    let first_answer = invalid.clone();
    let node = FakeNode::start(&certs, 1, move |request, submits_before| match request {
        Request::Submit(r) if submits_before == 0 => {
            assert_eq!(
                r.txs.len(),
                3,
                "the first request carries every transaction"
            );
            Reply::Submit(vec![
                Ok(receipt(&r.txs[0], 0)),
                Err(SubmitError::Overloaded {
                    what: "sealed batch queue",
                }),
                Err(first_answer.clone()),
            ])
        }
        request => sequencing(request, submits_before),
    });
    let client = client(&certs, vec![node.addr]);
    let sent = txs(3);

    let results = within("submit", client.submit(sent.clone()))
        .await
        .expect("submit");

    // The retried transaction was alone in its request: offset 0 of that request.
    assert_eq!(
        results,
        vec![
            Ok(receipt(&sent[0], 0)),
            Ok(receipt(&sent[1], 0)),
            Err(invalid)
        ]
    );
    let submits = node.submits();
    assert_eq!(submits.len(), 2, "one request, one retry");
    assert_eq!(
        submits[1].txs,
        vec![sent[1].clone()],
        "only the overloaded one is retried"
    );
    assert_ne!(
        submits[0].request_id, submits[1].request_id,
        "a retry has a fresh id"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn budget_exhausted_is_a_typed_error() {
    let certs = certs();
    // A loopback port nobody listens on.
    let nobody = {
        let socket = UdpSocket::bind(loopback()).expect("bind udp");
        socket.local_addr().expect("udp addr")
    };
    let mut options = ClientOptions::new(vec![nobody], &certs.files.ca_cert);
    options.attempts_max = 3;
    // Generous: the attempts, not the budget, end this call, however slow the machine.
    options.call_budget_ms = 30_000;
    options.connect_timeout_ms = 200;
    let client = Client::new(options).expect("client");

    let result = within("submit", client.submit(txs(2))).await;

    match result {
        Err(ClientError::Exhausted { attempts: 3, .. }) => {}
        other => panic!("expected Exhausted after 3 attempts, got {other:?}"),
    }
    assert_eq!(client.connected_to().await, None);
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_that_never_answers_costs_at_most_the_budget() {
    let certs = certs();
    let mute = FakeNode::start(&certs, 1, |_, _| Reply::Silence);
    let mut options = ClientOptions::new(vec![mute.addr], &certs.files.ca_cert);
    options.call_budget_ms = 500;
    let client = Client::new(options).expect("client");

    // Without the budget bounding each attempt this would never return (keep-alives hold the
    // connection open), and `within` would fail the test.
    let result = within("submit", client.submit(txs(1))).await;

    assert!(
        matches!(result, Err(ClientError::Exhausted { .. })),
        "{result:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_empty_submission_is_an_empty_answer() {
    let certs = certs();
    let node = FakeNode::start(&certs, 1, sequencing);
    let client = client(&certs, vec![node.addr]);
    assert_eq!(
        within("submit", client.submit(Vec::new())).await.unwrap(),
        Vec::new()
    );
    assert!(node.submits().is_empty(), "nothing sent");
}

#[tokio::test(flavor = "current_thread")]
async fn an_invalid_retried_transaction_reports_its_position_in_the_callers_list() {
    let certs = certs();
    let node = FakeNode::start(&certs, 1, |request, submits_before| match request {
        Request::Submit(r) if submits_before == 0 => Reply::Submit(vec![
            Ok(receipt(&r.txs[0], 0)),
            Err(SubmitError::Overloaded {
                what: "sealed batch queue",
            }),
        ]),
        // The retry carries only the second transaction: position 0 of that request.
        Request::Submit(_) => Reply::Submit(vec![Err(SubmitError::Invalid {
            position: 0,
            reason: SubmitRejection::EmptyTx,
        })]),
        Request::Status(_) => panic!("no status request expected"),
    });
    let client = client(&certs, vec![node.addr]);

    let results = within("submit", client.submit(txs(2)))
        .await
        .expect("submit");

    assert_eq!(
        results[1],
        Err(SubmitError::Invalid {
            position: 1,
            reason: SubmitRejection::EmptyTx
        })
    );
}
