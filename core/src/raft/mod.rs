//! openraft integration: the glommio runtime adapter ([`runtime`]) and baton's Raft type
//! configuration ([`types`]).

pub mod log_store;
pub mod runtime;
pub mod state_machine;
pub mod types;
pub mod wire;

pub use log_store::{LogReader, LogStore, LogStoreError};
pub use runtime::GlommioRuntime;
pub use state_machine::{SequencerView, StateMachine, StateMachineError};
pub use types::{ApplyResult, BatchBytes, Entry, LogId, SealTicket, SnapshotBlob, TypeConfig};
