//! A networked node: the core node engine (glommio shards, Raft, WAL) plus its QUIC endpoint on a
//! dedicated tokio runtime thread, serving clients and peers and dialing peers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_core::node::{self, NodeConfig, NodeHandle, Peers};
use futures_channel::mpsc;

use crate::peer::{PeerLinks, QuicForwarder, QuicNetworkFactory};
use crate::server::{close_code, serve, ServerContext};
use crate::tls::{self, TlsError};

/// How long a stopping node waits for its connections to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// TLS material of a node.
#[derive(Clone, Debug)]
pub struct TlsPaths {
    /// The cluster CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// This node's certificate (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

/// Default of [`NetNodeConfig::client_bytes_in_flight_max`]: 8 MiB, about 55,000 transactions
/// of 128 bytes (0.4 s of work at 150k tx/s).
pub const CLIENT_BYTES_IN_FLIGHT_MAX_DEFAULT: usize = 8 << 20;

/// Everything a networked node needs.
#[derive(Clone, Debug)]
pub struct NetNodeConfig {
    /// The core node (id, data dir, shards, batching, Raft timings, WAL).
    pub node: NodeConfig,
    /// Peers must present this cluster id.
    pub cluster_id: String,
    /// UDP address of the QUIC endpoint (clients and peers).
    pub listen: SocketAddr,
    /// TLS files.
    pub tls: TlsPaths,
    /// Threads of the network runtime (1: a current-thread runtime). Default 1.
    pub net_threads: usize,
    /// CPUs the network runtime's threads are pinned to (all of them share the set; each in
    /// the process's affinity mask, [`baton_core::cpus`]). Default empty: not pinned.
    pub net_cpus: Vec<usize>,
    /// Client submission bytes (request frames) admitted and not yet answered, node-wide;
    /// past it client streams are not read until answers free room (`server::Admission`).
    /// Default [`CLIENT_BYTES_IN_FLIGHT_MAX_DEFAULT`].
    pub client_bytes_in_flight_max: usize,
    /// Members (id → peer address) to initialize a fresh cluster with; ignored once the node
    /// has state. Give the same map to every node of a new cluster.
    pub bootstrap: Option<BTreeMap<u64, String>>,
    /// TCP address to serve Prometheus metrics on (`GET /metrics`, [`crate::metrics`]); `None`:
    /// no metrics endpoint. Default `None`.
    pub metrics: Option<SocketAddr>,
}

/// Why a networked node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NetNodeError {
    /// TLS files or configuration.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The network runtime or endpoint could not start.
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    /// The core node could not start.
    #[error("node: {0}")]
    Node(#[from] node::NodeError),
    /// Bad configuration.
    #[error("invalid configuration: {reason}")]
    Config { reason: String },
}

/// A running networked node.
pub struct NetNode {
    node: NodeHandle,
    ctx: Arc<ServerContext>,
    endpoint: quinn::Endpoint,
    links: Arc<PeerLinks>,
    rt: tokio::runtime::Handle,
    stop_rt: Option<tokio::sync::oneshot::Sender<()>>,
    rt_thread: Option<std::thread::JoinHandle<()>>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
}

/// Starts the network runtime on its own thread and returns its handle. Its threads are
/// pinned to `cpus` unless that is empty.
fn start_runtime(
    id: u64,
    threads: usize,
    cpus: &[usize],
) -> Result<
    (
        tokio::runtime::Handle,
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    ),
    NetNodeError,
> {
    let cpus = cpus.to_vec();
    let pin = move || {
        if cpus.is_empty() {
            return;
        }
        // The CPUs were checked against the process's mask at start; this only fails if the
        // mask shrank since.
        if let Err(e) = baton_core::cpus::pin_current_thread(&cpus) {
            tracing::warn!(node = id, cpus = %baton_core::cpus::list(&cpus), error = %e,
                "network thread not pinned");
        }
    };
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        let pin = pin.clone();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(format!("baton-{id}-net"))
            .on_thread_start(pin)
            .enable_all()
            .build()?
    };
    let handle = rt.handle().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("baton-{id}-net"))
        .spawn(move || {
            // A current-thread runtime runs its tasks on this thread.
            pin();
            rt.block_on(async move {
                let _ = stop_rx.await;
            });
            rt.shutdown_timeout(DRAIN_TIMEOUT);
        })?;
    Ok((handle, stop_tx, thread))
}

/// Starts a networked node: network runtime, QUIC endpoint, core node; initializes the cluster
/// when `bootstrap` is set and the node is fresh.
pub fn start(config: NetNodeConfig) -> Result<NetNode, NetNodeError> {
    let id = config.node.id;
    if config.cluster_id.is_empty() {
        return Err(NetNodeError::Config {
            reason: "cluster_id must not be empty".into(),
        });
    }
    let server_config = tls::server_config(&config.tls.ca_cert, &config.tls.cert, &config.tls.key)?;
    let peer_config =
        tls::peer_client_config(&config.tls.ca_cert, &config.tls.cert, &config.tls.key)?;
    // Both placements are checked before the first thread starts.
    config
        .node
        .check_shard_cpus()
        .map_err(|reason| NetNodeError::Config { reason })?;
    baton_core::cpus::remember_start_mask();
    if !config.net_cpus.is_empty() {
        let allowed = baton_core::cpus::allowed()?;
        baton_core::cpus::check("net_cpus", &config.net_cpus, false, &allowed)
            .map_err(|reason| NetNodeError::Config { reason })?;
    }
    // Bound before anything starts, so that a taken port stops the node with its address.
    let metrics_listener = match config.metrics {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("metrics address {addr}: {e}"))
                })?,
        ),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let (rt, stop_rt, rt_thread) = start_runtime(id, config.net_threads, &config.net_cpus)?;
    let endpoint = {
        let _guard = rt.enter();
        crate::udp::endpoint(config.listen, Some(server_config))?
    };
    let local_addr = endpoint.local_addr()?;
    let links = PeerLinks::new(
        endpoint.clone(),
        peer_config,
        config.cluster_id.clone(),
        id,
        rt.clone(),
    );
    let (inbound_tx, inbound_rx) = mpsc::channel(baton_core::node::peer::RPC_QUEUE_MAX);
    let peers = Peers {
        factory: QuicNetworkFactory::new(links.clone()),
        inbound: inbound_rx,
        forwarder: Some(Box::new(QuicForwarder::new(links.clone()))),
        on_stop: None,
    };
    let node = match node::start_with(config.node.clone(), peers) {
        Ok(n) => n,
        Err(e) => {
            let _ = stop_rt.send(());
            let _ = rt_thread.join();
            return Err(e.into());
        }
    };
    links.set_stages(node.stage_recorder());
    if config.node.shard_cpus.is_some() || !config.net_cpus.is_empty() {
        let show = |c: Option<&Vec<usize>>| c.map_or("any".to_string(), |c| format!("{c:?}"));
        tracing::info!(
            node = id,
            shard_cpus = %show(config.node.shard_cpus.as_ref()),
            net_cpus = %show(Some(&config.net_cpus).filter(|c| !c.is_empty())),
            "threads pinned"
        );
    }
    let ctx = Arc::new(ServerContext {
        node: node.clone(),
        node_id: id,
        cluster_id: config.cluster_id.clone(),
        inbound: inbound_tx,
        in_flight: Default::default(),
        admission: crate::server::Admission::new(config.client_bytes_in_flight_max),
        counters: Default::default(),
    });
    rt.spawn(serve(endpoint.clone(), ctx.clone()));
    if let Some(listener) = metrics_listener {
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let source = Arc::new(crate::metrics::Source::new(ctx.clone(), links.clone()));
        rt.spawn(crate::metrics::serve(listener, source));
        tracing::info!(node = id, addr = ?metrics_addr, "metrics served");
    }
    if let Some(members) = config.bootstrap {
        let members = members
            .into_iter()
            .map(|(id, addr)| (id, openraft::BasicNode::new(addr)))
            .collect();
        // Refused (harmlessly) when the node already has a log or a vote.
        if let Err(e) = futures_lite::future::block_on(node.initialize(members)) {
            tracing::info!(node = id, reason = %e, "not initializing: node has state");
        }
    }
    tracing::info!(node = id, %local_addr, "node listening");
    Ok(NetNode {
        node,
        ctx,
        endpoint,
        links,
        rt,
        stop_rt: Some(stop_rt),
        rt_thread: Some(rt_thread),
        local_addr,
        metrics_addr,
    })
}

impl NetNode {
    /// The core node's handle.
    pub fn handle(&self) -> &NodeHandle {
        &self.node
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The TCP address metrics are served on, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The network runtime (e.g. to wait for signals on it).
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// Stops the node: Raft and the WAL shut down first (durable work stays durable; pending
    /// submissions are answered with `ShuttingDown`), then connections close and the network
    /// runtime stops. Blocks until every thread has exited.
    pub fn shutdown(mut self) {
        futures_lite::future::block_on(self.node.shutdown());
        self.node.join();
        // Every request taken is answered now (committed, or `ShuttingDown`): let the answers
        // reach their streams, then close, giving QUIC a moment to deliver them.
        let endpoint = self.endpoint.clone();
        let ctx = self.ctx.clone();
        self.links.close_all();
        let _ = self.rt.block_on(async move {
            if !ctx.in_flight.drained(DRAIN_TIMEOUT).await {
                tracing::warn!("client requests still in flight at shutdown");
            }
            endpoint.close(close_code::SHUTDOWN.into(), b"shutdown");
            tokio::time::timeout(DRAIN_TIMEOUT, endpoint.wait_idle()).await
        });
        if let Some(stop) = self.stop_rt.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.rt_thread.take() {
            let _ = t.join();
        }
    }
}
