//! Hard limits on the domain model. Every size that crosses a trust boundary has a maximum here.

/// Largest accepted transaction payload (`Transaction::bytes`), in bytes.
pub const TX_BYTES_MAX: usize = 128 * 1024;

/// Largest accepted encoded batch (the whole rkyv buffer, header and transactions), in bytes.
pub const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Largest number of transactions in one batch.
pub const BATCH_TXS_MAX: usize = 32_768;
