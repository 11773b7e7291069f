//! The node engine: shards, the Raft shard, and the `NodeHandle` other threads use.

mod blocks;
pub mod config;
pub mod engine;
pub mod error;
pub mod handle;
pub mod local_net;
mod members;
pub mod peer;
pub mod stages;

pub use config::{NodeConfig, RaftTimings};
pub use engine::{run_local, start, start_with, Network, Peers};
pub use error::{LeadershipRejection, MembershipRejection, NodeError, SubmitError};
pub use handle::{
    BlockTx, BlockTxs, CommandReceipt, Committed, Consistency, LeaderTransferred, Member,
    MemberChange, MembershipChanged, NodeHandle, NodeStatus, PeerProgress, Read, Receipt, Reveal,
    Role, TxInfo, CATCH_UP_MAX, MEMBER_ADDR_BYTES_MAX,
};
pub use local_net::LocalRouter;
pub use peer::{Forwarder, Rpc};
pub use stages::{Stage, StageReport, StageSummary, StageTotal, Stages};
