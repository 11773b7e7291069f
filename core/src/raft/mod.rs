//! openraft integration: the glommio runtime adapter ([`runtime`]) and baton's Raft type
//! configuration ([`types`]).

pub mod runtime;
pub mod types;

pub use runtime::GlommioRuntime;
pub use types::{ApplyResult, BatchBytes, Entry, LogId, SnapshotBlob, TypeConfig};
