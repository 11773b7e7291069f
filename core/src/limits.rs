//! Hard limits on the domain model. Every size that crosses a trust boundary has a maximum here.

/// Largest accepted transaction payload (`Transaction::bytes`), in bytes.
pub const TX_BYTES_MAX: usize = 128 * 1024;

/// Largest accepted encoded batch (the whole rkyv buffer, header and transactions), in bytes.
pub const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Largest number of transactions in one batch.
pub const BATCH_TXS_MAX: usize = 32_768;

/// Transactions a generation of the state machine's idempotency index holds
/// (`tx_index::Window`): a sequenced hash is remembered for at least this many later sequenced
/// transactions (up to twice as many); a resubmission after that is ordered again. Bounds the
/// index (and snapshots) to about 2 × 2^20 entries, about 160 MB, however long a node runs.
/// Part of the replicated state: every node of a cluster must use the same value (snapshots
/// carry it).
pub const IDEMPOTENCY_GENERATION_TXS: usize = 1 << 20;
