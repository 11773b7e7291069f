//! `WalError`: every way the log can refuse or fail, carrying the offending values.

use std::path::PathBuf;
use std::sync::Arc;

use crate::record::RecordFault;
use crate::segment::HeaderFault;

/// Errors of the write-ahead log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An I/O operation failed.
    #[error("WAL I/O error during {op} on {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The filesystem is out of space (ENOSPC / EDQUOT). What was durable stays durable.
    #[error("disk full during {op} on {path}")]
    DiskFull { op: &'static str, path: PathBuf },
    /// A segment holds data that recovery will not silently drop.
    #[error("corrupt WAL segment {path} at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: Corruption,
    },
    /// `append` was given an index that does not follow the last one.
    #[error("append of index {got}, but the log expects {expected}")]
    NonContiguous { expected: u64, got: u64 },
    /// `append` was given index 0, which Raft never uses.
    #[error("index 0 is not a valid log index")]
    ZeroIndex,
    /// A payload over the record size limit.
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLarge { len: usize, max: usize },
    /// A read of an index the log does not hold (an empty log has `first == last + 1`).
    #[error("index {index} is not in the log (first {first}, last {last})")]
    NotFound { index: u64, first: u64, last: u64 },
    /// `truncate_after` or `purge_through` asked for something the log cannot do.
    #[error("invalid range operation {op} at index {index} (log holds {first}..={last})")]
    BadRange {
        op: &'static str,
        index: u64,
        first: u64,
        last: u64,
    },
    /// The log stopped accepting writes after an earlier I/O error; restart to recover.
    #[error("the WAL stopped after an earlier error: {cause}")]
    Failed { cause: Arc<WalError> },
    /// The log was closed.
    #[error("the WAL is closed")]
    Closed,
    /// Another process holds the directory's lock.
    #[error("WAL directory {path} is locked by another process")]
    Locked { path: PathBuf },
    /// Options that cannot work together.
    #[error("invalid WAL options: {reason}")]
    InvalidOptions { reason: &'static str },
    /// The metadata file exists but fails its checks.
    #[error("WAL metadata file {path} is corrupt")]
    MetaCorrupt { path: PathBuf },
}

/// What exactly is wrong with a corrupt segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// The header block is unusable (in a segment that is not the last one).
    #[error("segment header: {0}")]
    Header(HeaderFault),
    /// The header names another first index than the file name.
    #[error("file name says first index {name_index}, header says {header_index}")]
    NameMismatch { name_index: u64, header_index: u64 },
    /// A bad record in a segment that is not the last one.
    #[error("record: {0}")]
    Record(RecordFault),
    /// Segments do not continue each other.
    #[error("segment starts at index {found}, but {expected} was expected")]
    Gap { expected: u64, found: u64 },
    /// A bad record in the last segment with valid records after it beyond what a torn write can
    /// explain: committed data would be lost by truncating.
    #[error("{fault}, but a valid record follows at offset {valid_record_at}")]
    BeforeTail {
        fault: RecordFault,
        valid_record_at: u64,
    },
}

impl WalError {
    /// Wraps an I/O error, telling a full disk apart.
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> WalError {
        let path = path.into();
        // glommio reports errno values inside custom errors: look at the kind too.
        let full = matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        ) || matches!(
            source.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        );
        if full {
            WalError::DiskFull { op, path }
        } else {
            WalError::Io { op, path, source }
        }
    }

    /// Wraps a glommio error from an operation on `path`.
    pub(crate) fn glommio(
        op: &'static str,
        path: impl Into<PathBuf>,
        e: glommio::GlommioError<()>,
    ) -> WalError {
        WalError::io(op, path, std::io::Error::from(e))
    }
}
