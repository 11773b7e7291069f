//! baton-wal: a segmented, append-only, O_DIRECT write-ahead log on glommio (io_uring).
//!
//! - [`record`]: the on-disk record framing (32-byte header, crc32, 16-byte alignment).
//! - [`segment`]: segment files and their header block.
//! - [`wal`]: the log: appends, group commit, reads, truncation, purge.
//! - [`recovery`]: what a crash left behind, and what open does about it.
//! - [`meta`]: an atomically replaced metadata blob (the Raft vote).
//!
//! The crate knows nothing of Raft or transactions: records are `(index, term, payload)`.
//! See docs/wal.md for the format and the durability argument.

pub mod error;
pub mod failpoint;
pub mod meta;
pub mod options;
pub mod record;
pub mod recovery;
pub mod segment;
pub mod slow_delete;
pub mod wal;

pub use error::{Corruption, WalError};
pub use options::{SyncMode, WalOptions};
pub use recovery::{inspect, Inspection, Verdict};
pub use wal::{
    check_io_memory, Record, RecoveryReport, Wal, WalShutdown, WalStats, IO_MEMORY_BYTES,
    IO_MEMORY_BYTES_MAX, IO_MEMORY_BYTES_MIN, RECENT_BYTES_MAX,
};
