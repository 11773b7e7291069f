//! Bad input on a node's QUIC port: garbage, oversized, truncated and unknown frames, peer
//! messages from a client, malformed bodies, oversized transactions, a peer without a
//! certificate, a client certificate posing as a peer, a peer of another cluster, an unknown
//! ALPN. Each gets a typed error (or its stream or connection closed); the node keeps serving
//! everyone else and writes nothing.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use baton_core::node::SubmitError;
use baton_core::{SubmitRejection, Transaction, TxKind, TX_BYTES_MAX};
use baton_net::frame::{frame_header, FrameKind, FRAME_BYTES_MAX, WIRE_VERSION};
use baton_net::msg::{ErrorCode, ErrorMsg, Hello};
use baton_net::stream::{write_frame, FrameReader};
use baton_net::tls;
use common::*;

const WAIT: Duration = Duration::from_secs(10);

/// A raw QUIC connection to `addr` offering `alpn`, with an optional client certificate.
async fn raw(
    addr: SocketAddr,
    ca: &std::path::Path,
    alpn: &[u8],
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<quinn::Connection, String> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(tls::quic_client_config(ca, identity, alpn).unwrap());
    let connecting = endpoint
        .connect(addr, &tls::server_name(&addr))
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(WAIT, connecting)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())
}

/// Sends `bytes` on a fresh stream (then finishes it) and returns the first answer frame as an
/// error message, or `None` if the stream ended without one.
async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> Option<ErrorMsg> {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    let mut reader = FrameReader::new(recv);
    let frame = tokio::time::timeout(WAIT, reader.next())
        .await
        .expect("an answer in time")
        .ok()??;
    assert_eq!(frame.kind, FrameKind::Error, "an Error frame");
    Some(ErrorMsg::decode(&frame.body).expect("a valid error body"))
}

/// Dials `addr` as a peer presenting `identity` and sends a hello; returns the error code the
/// node answers with and the reason it closes the connection with.
async fn peer_hello(
    addr: SocketAddr,
    ca: &std::path::Path,
    identity: (&std::path::Path, &std::path::Path),
    cluster_id: &str,
    node_id: u64,
) -> (ErrorCode, String) {
    let conn = raw(addr, ca, tls::ALPN_PEER, Some(identity)).await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut body = Vec::new();
    Hello {
        cluster_id: cluster_id.into(),
        node_id,
    }
    .encode(&mut body);
    write_frame(&mut send, FrameKind::PeerHello, &body)
        .await
        .unwrap();
    let f = tokio::time::timeout(WAIT, FrameReader::peer(recv).next())
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("an error frame");
    assert_eq!(f.kind, FrameKind::Error);
    let code = ErrorMsg::decode(&f.body).unwrap().code;
    let closed = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("closed by the node");
    (code, closed.to_string())
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = ((2 + body.len()) as u32).to_le_bytes().to_vec();
    out.push(WIRE_VERSION);
    out.push(kind);
    out.extend_from_slice(body);
    out
}

#[test]
fn bad_input_gets_typed_errors_and_disturbs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Long election timeouts: a re-election's blank entry would also move the log (below).
    let cluster = ClusterUp::start_with(
        dir.path(),
        3,
        free_base_port(3),
        &["--election-timeout-min-ms", "1000"],
    );
    let rt = runtime();
    rt.block_on(async {
        let good = cluster.client_from(1);
        let first = good.submit(txs("good", 0, 10)).await.unwrap();
        assert!(first.iter().all(|r| r.is_ok()));
        // Rollup 1 seals a block of those ten a block time (250 ms) later: an entry of its
        // own. Wait for it, so that the log stands still from here on.
        let mut blocks = good.subscribe_blocks(1, 1);
        let mut sealed = 0;
        let mut seen_at = 0;
        while sealed < 10 {
            let e = tokio::time::timeout(WAIT, blocks.next())
                .await
                .expect("the block is sealed")
                .expect("block");
            sealed += e.block.block.signed.header.tx_count;
            seen_at = e.applied_index;
        }
        assert_eq!(sealed, 10);
        let leader = cluster.client_of(cluster.leader);
        let before = wait_applied(&leader, seen_at, WAIT).await;

        let addr = cluster.node(1).addr;
        let conn = raw(addr, &cluster.ca, tls::ALPN_CLIENT, None)
            .await
            .unwrap();
        let code = |e: Option<ErrorMsg>| e.map(|e| e.code);

        // Garbage: a length field far over the maximum.
        let e = send_raw(&conn, b"\xff\xff\xff\xffgarbage garbage").await;
        assert_eq!(code(e), Some(ErrorCode::TooLarge));
        // A frame just over the maximum is refused from its header alone.
        let header = ((FRAME_BYTES_MAX - 3) as u32).to_le_bytes();
        let e = send_raw(&conn, &[&header[..], &[WIRE_VERSION, 1]].concat()).await;
        assert_eq!(code(e), Some(ErrorCode::TooLarge));
        // Truncated: the stream ends inside a frame.
        let mut t = frame_header(FrameKind::SubmitRequest, 100)
            .unwrap()
            .to_vec();
        t.extend_from_slice(&[0; 10]);
        let e = send_raw(&conn, &t).await.expect("an error");
        assert_eq!(e.code, ErrorCode::Malformed);
        assert!(e.message.contains("ended inside a frame"), "{}", e.message);
        // Unknown message kind, unknown version.
        let e = send_raw(&conn, &frame(200, b"12345678"))
            .await
            .expect("an error");
        assert!(e.message.contains("unknown message kind"), "{}", e.message);
        let mut v = frame(1, b"12345678");
        v[4] = 99;
        let e = send_raw(&conn, &v).await.expect("an error");
        assert!(e.message.contains("version"), "{}", e.message);
        // A peer message from a client.
        let e = send_raw(&conn, &frame(FrameKind::RaftAppend as u8, &[0; 40])).await;
        assert_eq!(code(e), Some(ErrorCode::UnexpectedKind));
        // A submit request whose body does not decode; the stream stays usable after it.
        let (mut send, recv) = conn.open_bi().await.unwrap();
        write_frame(
            &mut send,
            FrameKind::SubmitRequest,
            &[7, 0, 0, 0, 0, 0, 0, 0, 0, 9, 9],
        )
        .await
        .unwrap();
        let mut reader = FrameReader::new(recv);
        let f = reader.next().await.unwrap().unwrap();
        let e = ErrorMsg::decode(&f.body).unwrap();
        assert_eq!((e.request_id, e.code), (7, ErrorCode::Malformed));
        let mut body = Vec::new();
        baton_net::msg::StatusRequest { request_id: 8 }.encode(&mut body);
        write_frame(&mut send, FrameKind::StatusRequest, &body)
            .await
            .unwrap();
        let f = reader.next().await.unwrap().unwrap();
        assert_eq!(f.kind, FrameKind::StatusResponse, "the stream still serves");

        // A transaction over the size limit: a typed per-transaction error.
        let big = Transaction {
            rollup_id: 1,
            kind: TxKind::Raw,
            bytes: vec![1; TX_BYTES_MAX + 1],
        };
        let r = good.submit(vec![big]).await.unwrap();
        assert!(
            matches!(
                r[0],
                Err(SubmitError::Invalid {
                    position: 0,
                    reason: SubmitRejection::TxTooLarge { .. }
                })
            ),
            "{r:?}"
        );
        let empty = Transaction {
            rollup_id: 1,
            kind: TxKind::Raw,
            bytes: Vec::new(),
        };
        let r = good.submit(vec![empty]).await.unwrap();
        assert!(
            matches!(
                r[0],
                Err(SubmitError::Invalid {
                    position: 0,
                    reason: SubmitRejection::EmptyTx
                })
            ),
            "{r:?}"
        );

        // Peers: no certificate, another cluster, an unknown ALPN.
        let no_cert = raw(addr, &cluster.ca, tls::ALPN_PEER, None).await.unwrap();
        let closed = tokio::time::timeout(WAIT, no_cert.closed())
            .await
            .expect("closed by the node");
        assert!(
            closed.to_string().contains("peer certificate required"),
            "{closed}"
        );
        let certs = cluster.dir.join("certs");
        let (cert, key) = tls::node_files(&certs, 2);
        let (code, closed) = peer_hello(addr, &cluster.ca, (&cert, &key), "someone-else", 2).await;
        assert_eq!(code, ErrorCode::WrongCluster);
        assert!(closed.contains("wrong cluster id"), "{closed}");
        // The client certificate chains to the cluster CA but names no node: not a peer.
        let (cert, key) = tls::client_files(&certs);
        let (code, closed) = peer_hello(addr, &cluster.ca, (&cert, &key), "baton-local", 2).await;
        assert_eq!(code, ErrorCode::NotAPeer);
        assert!(closed.contains("does not name the node"), "{closed}");
        assert!(
            raw(addr, &cluster.ca, b"nope/1", None).await.is_err(),
            "unknown ALPN refused"
        );

        // Nothing of the above reached the log; the node and the cluster still serve.
        let after = leader.status().await.unwrap();
        assert_eq!(
            after.last_log_index, before.last_log_index,
            "bad input wrote nothing"
        );
        let again = good.submit(txs("good", 10, 10)).await.unwrap();
        assert!(again.iter().all(|r| r.is_ok()), "{again:?}");
        good.close().await;
    });
    cluster.stop();
}
