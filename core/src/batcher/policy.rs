//! `BatchPolicy`: when the batcher seals a batch (size, count, linger), and its limits.

use crate::limits::{BATCH_BYTES_MAX, BATCH_TXS_MAX};

use super::encode::encoded_len;
use super::error::BatcherConfigError;

/// Default `BatchPolicy::batch_bytes_max`: 1 MiB, a quarter of the model limit, so one batch
/// stays a cheap WAL append and replication message.
pub const BATCH_BYTES_MAX_DEFAULT: usize = 1024 * 1024;

/// Default `BatchPolicy::linger_us`: how long the oldest transaction may wait for company.
pub const LINGER_US_DEFAULT: u64 = 500;

/// Largest accepted `BatchPolicy::linger_us` (1 s): beyond it latency, not throughput, suffers.
pub const LINGER_US_MAX: u64 = 1_000_000;

/// Size-or-linger sealing policy of one shard's batcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Largest encoded batch (the whole rkyv buffer), in bytes; at most `BATCH_BYTES_MAX`.
    /// Default `BATCH_BYTES_MAX_DEFAULT`.
    pub batch_bytes_max: usize,
    /// Largest number of transactions in one batch; 1 to `BATCH_TXS_MAX`. Default
    /// `BATCH_TXS_MAX` (the byte limit binds first for typical transaction sizes).
    pub batch_txs_max: usize,
    /// A batch is sealed once its oldest transaction has waited this long, in microseconds; at
    /// most `LINGER_US_MAX`. Default `LINGER_US_DEFAULT`.
    pub linger_us: u64,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        Self {
            batch_bytes_max: BATCH_BYTES_MAX_DEFAULT,
            batch_txs_max: BATCH_TXS_MAX,
            linger_us: LINGER_US_DEFAULT,
        }
    }
}

impl BatchPolicy {
    /// Smallest accepted `batch_bytes_max`: the encoding of one 1-byte transaction.
    pub fn batch_bytes_min() -> usize {
        encoded_len(1, 1)
    }

    /// Checks every field against its limit.
    pub fn validate(&self) -> Result<(), BatcherConfigError> {
        let bytes_min = Self::batch_bytes_min();
        if self.batch_bytes_max > BATCH_BYTES_MAX {
            return Err(BatcherConfigError::BatchBytesTooLarge {
                value: self.batch_bytes_max,
                max: BATCH_BYTES_MAX,
            });
        }
        if self.batch_bytes_max < bytes_min {
            return Err(BatcherConfigError::BatchBytesTooSmall {
                value: self.batch_bytes_max,
                min: bytes_min,
            });
        }
        if self.batch_txs_max == 0 || self.batch_txs_max > BATCH_TXS_MAX {
            return Err(BatcherConfigError::BatchTxsOutOfRange {
                value: self.batch_txs_max,
                max: BATCH_TXS_MAX,
            });
        }
        if self.linger_us > LINGER_US_MAX {
            return Err(BatcherConfigError::LingerTooLong {
                value_us: self.linger_us,
                max_us: LINGER_US_MAX,
            });
        }
        Ok(())
    }
}
