//! Why a batcher could not be built (`BatcherConfigError`) or a transaction was refused
//! (`SubmitRejection`).

/// An invalid `BatchPolicy` or dedup capacity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatcherConfigError {
    /// `batch_bytes_max` exceeds the model limit.
    #[error("batch_bytes_max is {value}, max {max}")]
    BatchBytesTooLarge {
        /// Configured value in bytes.
        value: usize,
        /// `BATCH_BYTES_MAX`.
        max: usize,
    },
    /// `batch_bytes_max` cannot hold even one 1-byte transaction.
    #[error("batch_bytes_max is {value}, min {min}")]
    BatchBytesTooSmall {
        /// Configured value in bytes.
        value: usize,
        /// Encoded size of a batch of one 1-byte transaction.
        min: usize,
    },
    /// `batch_txs_max` is zero or exceeds the model limit.
    #[error("batch_txs_max is {value}, must be 1..={max}")]
    BatchTxsOutOfRange {
        /// Configured value.
        value: usize,
        /// `BATCH_TXS_MAX`.
        max: usize,
    },
    /// `linger_us` exceeds `LINGER_US_MAX`.
    #[error("linger_us is {value_us}, max {max_us}")]
    LingerTooLong {
        /// Configured value in microseconds.
        value_us: u64,
        /// `LINGER_US_MAX`.
        max_us: u64,
    },
    /// The dedup window would exceed `DEDUP_CAPACITY_MAX` hashes.
    #[error("dedup capacity is {value} hashes, max {max}")]
    DedupCapacityTooLarge {
        /// Requested capacity in hashes.
        value: usize,
        /// `DEDUP_CAPACITY_MAX`.
        max: usize,
    },
}

/// Why `Batcher::push` refused a transaction; nothing was recorded for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitRejection {
    /// The payload is empty.
    #[error("transaction payload is empty")]
    EmptyTx,
    /// The payload exceeds `TX_BYTES_MAX`.
    #[error("transaction payload is {len} bytes, max {max}")]
    TxTooLarge {
        /// Payload length in bytes.
        len: usize,
        /// `TX_BYTES_MAX`.
        max: usize,
    },
    /// Even alone, the transaction's batch would exceed the policy's `batch_bytes_max`.
    #[error("a batch of this transaction alone encodes to {encoded_len} bytes, max {max}")]
    TxExceedsBatch {
        /// Encoded size of a batch holding only this transaction, in bytes.
        encoded_len: usize,
        /// `BatchPolicy::batch_bytes_max`.
        max: usize,
    },
    /// `max` sealed batches wait to be taken (`poll_seal`/`seal_now`): back-pressure.
    #[error("{max} sealed batches are waiting to be taken")]
    SealedQueueFull {
        /// `SEALED_QUEUE_MAX`.
        max: usize,
    },
}
