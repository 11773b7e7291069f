//! In-process Raft network: RPCs travel over bounded channels between the glommio executors
//! (threads) of nodes in one process. Used by the multi-node tests and the Raft benchmark; the
//! QUIC network replaces it between processes. Links can be cut and healed, and a node can be
//! unregistered, so tests can partition and stop nodes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_channel::{mpsc, oneshot};
use futures_util::SinkExt;
use openraft::alias::{SnapshotOf, VoteOf};
use openraft::error::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetworkFactory, RaftNetworkV2};

use futures_util::future::LocalBoxFuture;

use crate::node::error::SubmitError;
use crate::node::handle::Committed;
use crate::node::peer::{Forwarder, Reply, Rpc, RPC_QUEUE_MAX};
use crate::raft::{BatchBytes, SnapshotBlob, TypeConfig};

#[derive(Default)]
struct RouterState {
    endpoints: HashMap<u64, mpsc::Sender<Rpc>>,
    /// Directed links that drop every RPC.
    cut: HashSet<(u64, u64)>,
    /// Nodes that accepted a leadership transfer, in order.
    transfers: Vec<u64>,
}

/// Connects the nodes of one process. Cheap to clone; `Send + Sync`.
#[derive(Clone, Default)]
pub struct LocalRouter {
    state: Arc<Mutex<RouterState>>,
}

#[derive(Debug, thiserror::Error)]
#[error("node {to} is unreachable from node {from}")]
struct LinkDown {
    from: u64,
    to: u64,
}

impl LocalRouter {
    /// Registers node `id` and returns the queue its RPC server reads (replaces an earlier one).
    pub fn register(&self, id: u64) -> mpsc::Receiver<Rpc> {
        let (tx, rx) = mpsc::channel(RPC_QUEUE_MAX);
        self.state
            .lock()
            .expect("router lock")
            .endpoints
            .insert(id, tx);
        rx
    }

    /// Removes node `id`: RPCs to it fail as unreachable.
    pub fn unregister(&self, id: u64) {
        self.state
            .lock()
            .expect("router lock")
            .endpoints
            .remove(&id);
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut(&self, a: u64, b: u64) {
        let mut s = self.state.lock().expect("router lock");
        s.cut.insert((a, b));
        s.cut.insert((b, a));
    }

    /// Cuts `id` off from every node in `others`.
    pub fn isolate(&self, id: u64, others: &[u64]) {
        for &o in others {
            self.cut(id, o);
        }
    }

    /// The nodes that accepted a leadership transfer to themselves (openraft's `TransferLeader`
    /// RPC, sent to every voter, answered without refusal by the one it names), in order.
    pub fn transfers(&self) -> Vec<u64> {
        self.state.lock().expect("router lock").transfers.clone()
    }

    /// Restores every cut link.
    pub fn heal_all(&self) {
        self.state.lock().expect("router lock").cut.clear();
    }

    fn sender(&self, from: u64, to: u64) -> Result<mpsc::Sender<Rpc>, Unreachable<TypeConfig>> {
        let s = self.state.lock().expect("router lock");
        if s.cut.contains(&(from, to)) {
            return Err(Unreachable::new(&LinkDown { from, to }));
        }
        s.endpoints
            .get(&to)
            .cloned()
            .ok_or_else(|| Unreachable::new(&LinkDown { from, to }))
    }

    /// A network factory for node `from`.
    pub fn factory(&self, from: u64) -> LocalNetworkFactory {
        LocalNetworkFactory {
            router: self.clone(),
            from,
        }
    }
}

/// openraft network factory over a [`LocalRouter`].
pub struct LocalNetworkFactory {
    router: LocalRouter,
    from: u64,
}

impl RaftNetworkFactory<TypeConfig> for LocalNetworkFactory {
    type Network = LocalConnection;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> LocalConnection {
        LocalConnection {
            router: self.router.clone(),
            from: self.from,
            to: target,
        }
    }
}

/// One node's connection to another through the router.
pub struct LocalConnection {
    router: LocalRouter,
    from: u64,
    to: u64,
}

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("the target dropped the request")]
    Dropped,
    #[error("the target failed: {0}")]
    Remote(String),
}

impl LocalConnection {
    /// Sends one RPC and waits (bounded by `ttl`) for its reply.
    async fn call<T, E: std::fmt::Display>(
        &self,
        action: RPCTypes,
        ttl: Duration,
        make: impl FnOnce(Reply<T, E>) -> Rpc,
    ) -> Result<T, RPCError<TypeConfig>> {
        let mut tx = self.router.sender(self.from, self.to)?;
        let (reply_tx, reply_rx) = oneshot::channel();
        let exchange = async move {
            tx.send(make(reply_tx))
                .await
                .map_err(|_| CallError::Dropped)?;
            match reply_rx.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(CallError::Remote(e.to_string())),
                Err(_) => Err(CallError::Dropped),
            }
        };
        let timer = glommio::timer::sleep(ttl);
        futures_util::pin_mut!(exchange, timer);
        match futures_util::future::select(exchange, timer).await {
            futures_util::future::Either::Left((Ok(v), _)) => Ok(v),
            futures_util::future::Either::Left((Err(e), _)) => {
                Err(RPCError::Network(NetworkError::new(&e)))
            }
            // A slow reply is a timeout, not an unreachable node: openraft backs off much
            // longer after Unreachable.
            futures_util::future::Either::Right(_) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.from,
                target: self.to,
                timeout: ttl,
            })),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for LocalConnection {
    type SnapshotData = SnapshotBlob;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RPCTypes::AppendEntries, option.hard_ttl(), |r| {
            Rpc::Append(rpc, r)
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RPCTypes::Vote, option.hard_ttl(), |r| Rpc::Vote(rpc, r))
            .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        // openraft tells every voter; only the named one takes over.
        let named = *req.to_node_id() == self.to;
        let to = self.to;
        let r = self
            .call(RPCTypes::TransferLeader, option.hard_ttl(), |r| {
                Rpc::TransferLeader(req, r)
            })
            .await;
        if let (true, Ok(Ok(()))) = (named, &r) {
            let mut s = self.router.state.lock().expect("router lock");
            s.transfers.push(to);
        }
        r
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotBlob>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        match self
            .call(RPCTypes::InstallSnapshot, option.hard_ttl(), |r| {
                Rpc::Snapshot(vote, snapshot, r)
            })
            .await
        {
            Ok(v) => Ok(v),
            Err(RPCError::Unreachable(u)) => Err(StreamingError::Unreachable(u)),
            Err(RPCError::Network(n)) => Err(StreamingError::Network(n)),
            Err(RPCError::Timeout(t)) => Err(StreamingError::Timeout(t)),
            Err(e) => Err(StreamingError::Network(NetworkError::new(&e))),
        }
    }
}

/// Forwards a follower's batches to the leader through the router (see [`Forwarder`]).
pub struct LocalForwarder {
    router: LocalRouter,
    from: u64,
}

impl LocalRouter {
    /// A forwarder for node `from`.
    pub fn forwarder(&self, from: u64) -> LocalForwarder {
        LocalForwarder {
            router: self.clone(),
            from,
        }
    }
}

impl LocalForwarder {
    /// Sends the RPC `make` builds to `leader` and waits for its answer; an unreachable or
    /// vanished leader is `NotLeader` without a hint.
    fn ask<T: 'static>(
        &self,
        leader: u64,
        make: impl FnOnce(Reply<T, SubmitError>) -> Rpc + 'static,
    ) -> LocalBoxFuture<'static, Result<T, SubmitError>> {
        let sender = self.router.sender(self.from, leader);
        Box::pin(async move {
            let unavailable = SubmitError::NotLeader { leader_hint: None };
            let Ok(mut tx) = sender else {
                return Err(unavailable);
            };
            let (reply, rx) = oneshot::channel();
            if tx.send(make(reply)).await.is_err() {
                return Err(unavailable);
            }
            rx.await.unwrap_or(Err(unavailable))
        })
    }
}

impl Forwarder for LocalForwarder {
    fn forward(
        &self,
        leader: u64,
        _addr: String,
        batch: BatchBytes,
    ) -> LocalBoxFuture<'static, Result<Committed, SubmitError>> {
        self.ask(leader, move |reply| Rpc::Forward(batch, reply))
    }

    fn read_index(
        &self,
        leader: u64,
        _addr: String,
    ) -> LocalBoxFuture<'static, Result<u64, SubmitError>> {
        self.ask(leader, Rpc::ReadIndex)
    }
}
