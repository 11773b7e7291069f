//! TLS over real quinn endpoints on 127.0.0.1: ALPN negotiation, mutual TLS for peers, and
//! each refusal (wrong CA either way, expired certificate, unknown ALPN).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use baton_net::tls::{self, CertFiles, CertOptions, ALPN_CLIENT, ALPN_PEER};
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig};
use quinn::{Connection, ConnectionError, Endpoint};
use rustls_pki_types::CertificateDer;

/// Bound on every wait: handshakes on loopback take milliseconds.
const WAIT: Duration = Duration::from_secs(5);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} timed out"))
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn cluster(dir: &Path, cluster_id: &str) -> CertFiles {
    tls::generate(dir, &CertOptions::new(cluster_id, 2)).expect("generate")
}

/// A server endpoint for node 1 of `files`.
fn server(files: &CertFiles) -> (Endpoint, SocketAddr) {
    let (cert, key) = files.node(1).expect("node 1");
    let config = tls::server_config(&files.ca_cert, cert, key).expect("server config");
    let endpoint = Endpoint::server(config, loopback()).expect("bind server");
    let addr = endpoint.local_addr().expect("server addr");
    (endpoint, addr)
}

/// Dials `addr`; the endpoint is returned so it outlives the connection.
async fn connect(
    config: quinn::ClientConfig,
    addr: SocketAddr,
) -> (Endpoint, Result<Connection, ConnectionError>) {
    let endpoint = Endpoint::client(loopback()).expect("bind client");
    let connecting = endpoint
        .connect_with(config, addr, &tls::server_name(&addr))
        .expect("connect starts");
    let result = connecting.await;
    (endpoint, result)
}

/// Dials `addr` and reports how the connection ended: the handshake error, or (when the client
/// finished its side of the handshake before the server judged its certificate) the close.
async fn connect_expecting_refusal(
    config: quinn::ClientConfig,
    addr: SocketAddr,
) -> (Endpoint, ConnectionError) {
    let (endpoint, result) = connect(config, addr).await;
    let err = match result {
        Err(err) => err,
        Ok(conn) => conn.closed().await,
    };
    (endpoint, err)
}

async fn accept(endpoint: &Endpoint) -> Result<Connection, ConnectionError> {
    let incoming = endpoint.accept().await.expect("server endpoint open");
    incoming.await
}

fn alpn(conn: &Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<HandshakeData>()
        .ok()?
        .protocol
}

fn peer_certs(conn: &Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|certs| *certs)
}

/// Echoes one bi stream, then keeps the connection until the echo has been read.
async fn echo_once(conn: &Connection) {
    let (mut send, mut recv) = conn.accept_bi().await.expect("accept_bi");
    let got = recv.read_to_end(1024).await.expect("server read");
    send.write_all(&got).await.expect("server write");
    send.finish().expect("server finish");
    // Resolves once the client has read everything (or gone away).
    let _ = send.stopped().await;
}

async fn exchange(conn: &Connection, payload: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.expect("open_bi");
    send.write_all(payload).await.expect("client write");
    send.finish().expect("client finish");
    recv.read_to_end(1024).await.expect("client read")
}

#[tokio::test]
async fn client_negotiates_client_alpn_and_exchanges_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = cluster(dir.path(), "one");
    let (server, addr) = server(&files);
    let anonymous = tls::client_config(&files.ca_cert, None).expect("client config");
    let identified = tls::client_config(
        &files.ca_cert,
        Some((&files.client_cert, &files.client_key)),
    )
    .expect("client config with identity");

    for (config, with_identity) in [(anonymous, false), (identified, true)] {
        let server_side = async {
            let conn = accept(&server).await.expect("server handshake");
            assert_eq!(alpn(&conn).as_deref(), Some(ALPN_CLIENT));
            assert_eq!(conn.peer_identity().is_some(), with_identity);
            echo_once(&conn).await;
            conn
        };
        let client_side = async {
            let (endpoint, conn) = connect(config, addr).await;
            let conn = conn.expect("client handshake");
            assert_eq!(alpn(&conn).as_deref(), Some(ALPN_CLIENT));
            let echoed = exchange(&conn, b"hello baton").await;
            (endpoint, conn, echoed)
        };
        let (server_conn, (_endpoint, conn, echoed)) = within("client exchange", async {
            tokio::join!(server_side, client_side)
        })
        .await;
        assert_eq!(echoed, b"hello baton");
        conn.close(0u32.into(), b"done");
        server_conn.close(0u32.into(), b"done");
    }
}

#[tokio::test]
async fn peer_negotiates_peer_alpn_and_is_identified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = cluster(dir.path(), "one");
    let (server, addr) = server(&files);
    let (cert2, key2) = files.node(2).expect("node 2");
    let config = tls::peer_client_config(&files.ca_cert, cert2, key2).expect("peer config");

    let server_side = async {
        let conn = accept(&server).await.expect("server handshake");
        assert_eq!(alpn(&conn).as_deref(), Some(ALPN_PEER));
        echo_once(&conn).await;
        conn
    };
    let client_side = async {
        let (endpoint, conn) = connect(config, addr).await;
        let conn = conn.expect("peer handshake");
        assert_eq!(alpn(&conn).as_deref(), Some(ALPN_PEER));
        let echoed = exchange(&conn, b"raft").await;
        (endpoint, conn, echoed)
    };
    let (server_conn, (_endpoint, conn, echoed)) = within("peer exchange", async {
        tokio::join!(server_side, client_side)
    })
    .await;
    assert_eq!(echoed, b"raft");
    let presented = peer_certs(&server_conn).expect("peer presented a certificate");
    assert_eq!(presented, tls::load_certs(cert2).expect("node 2 cert"));
    conn.close(0u32.into(), b"done");
}

#[tokio::test]
async fn client_trusting_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = cluster(&dir.path().join("a"), "a");
    let other = cluster(&dir.path().join("b"), "b");
    let (server, addr) = server(&files);
    let config = tls::client_config(&other.ca_cert, None).expect("client config");

    let (server_result, (_endpoint, client_result)) = within("refusal", async {
        tokio::join!(accept(&server), connect(config, addr))
    })
    .await;
    let err = client_result.expect_err("client must refuse the server");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    assert!(server_result.is_err());
}

#[tokio::test]
async fn peer_with_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = cluster(&dir.path().join("a"), "a");
    let other = cluster(&dir.path().join("b"), "b");
    let (server, addr) = server(&files);
    let (cert, key) = other.node(2).expect("other node 2");
    // Trusts the right CA but presents a certificate signed by another.
    let config = tls::peer_client_config(&files.ca_cert, cert, key).expect("peer config");

    let (server_result, (_endpoint, client_err)) = within("refusal", async {
        tokio::join!(accept(&server), connect_expecting_refusal(config, addr))
    })
    .await;
    let server_err = server_result.expect_err("server must refuse the peer");
    assert!(
        server_err.to_string().contains("UnknownIssuer"),
        "{server_err}"
    );
    assert!(
        !matches!(client_err, ConnectionError::LocallyClosed),
        "{client_err}"
    );
}

#[tokio::test]
async fn expired_node_certificate_is_refused_by_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = CertOptions::new("old", 1);
    opts.not_before_days_ago = 30;
    opts.validity_days = 1;
    let files = tls::generate(dir.path(), &opts).expect("generate");
    let (server, addr) = server(&files);
    let config = tls::client_config(&files.ca_cert, None).expect("client config");

    let (server_result, (_endpoint, client_result)) = within("refusal", async {
        tokio::join!(accept(&server), connect(config, addr))
    })
    .await;
    let err = client_result.expect_err("client must refuse an expired certificate");
    assert!(err.to_string().to_lowercase().contains("expired"), "{err}");
    assert!(server_result.is_err());
}

#[tokio::test]
async fn unknown_alpn_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = cluster(dir.path(), "one");
    let (server, addr) = server(&files);
    let roots = tls::load_roots(&files.ca_cert).expect("roots");
    let mut tls_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls_config.alpn_protocols = vec![b"nope".to_vec()];
    let quic = QuicClientConfig::try_from(tls_config).expect("quic client config");
    let config = quinn::ClientConfig::new(Arc::new(quic));

    let (server_result, (_endpoint, client_result)) = within("refusal", async {
        tokio::join!(accept(&server), connect(config, addr))
    })
    .await;
    let err = client_result.expect_err("server must refuse an unknown ALPN");
    assert!(server_result.is_err(), "server accepted ALPN nope");
    assert!(err.to_string().contains("120"), "{err}"); // no_application_protocol alert
}
