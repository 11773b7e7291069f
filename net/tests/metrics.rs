//! The metrics endpoint of an in-process networked node (one-node cluster on 127.0.0.1): what
//! a scrape says while the node's Raft shard does not answer, and after it does again.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use baton_core::node::NodeConfig;
use baton_net::tls::{self, CertOptions};
use baton_net::{NetNodeConfig, TlsPaths};

const WAIT: Duration = Duration::from_secs(30);

fn scrape(addr: SocketAddr) -> String {
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(WAIT)).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    body.to_string()
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// Scrapes until `condition` holds (bounded; a scrape renders at most once a second, so this
/// polls).
fn scrape_until(addr: SocketAddr, what: &str, condition: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = scrape(addr);
        if condition(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what} not seen: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Raft shard that does not answer for longer than a scrape waits for its status: the scrape
/// still answers, in time, with `baton_raft_status_ok 0`, no Raft series, and the rest (the node
/// info with its signer, stages, process); once the shard runs again the Raft series are back.
#[test]
fn a_scrape_answers_while_the_raft_shard_is_stalled() {
    let dir = tempfile::tempdir().unwrap();
    let certs = tls::generate(&dir.path().join("certs"), &CertOptions::new("m", 1)).unwrap();
    let (_, cert, key) = certs.nodes[0].clone();
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut node_config = NodeConfig::new(1, dir.path().join("data"));
    node_config.shards = 1;
    let node = baton_net::node::start(NetNodeConfig {
        node: node_config,
        cluster_id: "m".into(),
        listen,
        tls: TlsPaths {
            ca_cert: certs.ca_cert.clone(),
            cert,
            key,
        },
        net_threads: 1,
        net_cpus: Vec::new(),
        client_bytes_in_flight_max: baton_net::node::CLIENT_BYTES_IN_FLIGHT_MAX_DEFAULT,
        bootstrap: None,
        metrics: Some(([127, 0, 0, 1], 0).into()),
    })
    .expect("node starts");
    let addr = node.metrics_addr().expect("metrics served");
    assert_ne!(addr.port(), 0, "the bound port is reported");
    let signer = node.handle().signer().to_string();

    let text = scrape(addr);
    assert_eq!(sample(&text, "baton_raft_status_ok"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "baton_raft_term"),
        Some(0.0),
        "uninitialized: {text}"
    );

    // Stall the Raft shard for longer than a scrape waits for the status (2 s).
    let handle = node.handle().clone();
    let stall = std::thread::spawn(move || {
        futures_lite::future::block_on(handle.stall_for_testing(Duration::from_secs(8)))
    });
    let text = scrape_until(addr, "a scrape without the Raft status", |t| {
        sample(t, "baton_raft_status_ok") == Some(0.0)
    });
    assert!(
        !stall.is_finished(),
        "answered while the shard was still stalled"
    );
    assert!(!text.contains("baton_raft_term"), "{text}");
    assert!(
        text.contains(&format!(
            "baton_node_info{{node_id=\"1\",cluster_id=\"m\",signer=\"{signer}\"}} 1"
        )),
        "{text}"
    );
    assert!(
        text.contains("baton_stage_seconds_count{stage=\"wal\"}"),
        "{text}"
    );
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 0.0);
    assert!(text.ends_with("# EOF\n"));

    stall.join().unwrap().expect("the stall ends");
    scrape_until(addr, "the Raft series back", |t| {
        sample(t, "baton_raft_status_ok") == Some(1.0) && sample(t, "baton_raft_term").is_some()
    });
    node.shutdown();
}
