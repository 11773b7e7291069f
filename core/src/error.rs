//! `ModelError`: every way a domain-model value can be rejected.

/// Why a transaction, batch or Merkle proof was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The bytes are not a valid archived value (bytecheck failed).
    #[error("malformed archive: {source}")]
    Malformed {
        /// What bytecheck rejected.
        #[source]
        source: rkyv::rancor::Error,
    },
    /// rkyv failed to serialize a value.
    #[error("encoding failed: {source}")]
    Encode {
        /// What the serializer reported.
        #[source]
        source: rkyv::rancor::Error,
    },
    /// A transaction has no payload bytes.
    #[error("transaction payload is empty")]
    EmptyTx,
    /// A transaction's payload is larger than allowed.
    #[error("transaction payload is {len} bytes, max {max}")]
    TxTooLarge {
        /// Payload length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// An encoded batch is larger than allowed.
    #[error("encoded batch is {len} bytes, max {max}")]
    BatchTooLarge {
        /// Encoded (or lower-bound estimated) length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// A batch holds more transactions than allowed.
    #[error("batch holds {count} transactions, max {max}")]
    TooManyTxs {
        /// Number of transactions.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The header's `tx_count` disagrees with the number of transactions.
    #[error("header says {header} transactions, batch holds {actual}")]
    CountMismatch {
        /// `tx_count` from the header.
        header: u32,
        /// Number of transactions actually present.
        actual: usize,
    },
    /// A Merkle proof was requested for a leaf that does not exist.
    #[error("proof index {index} out of range for {count} leaves")]
    ProofIndexOutOfRange {
        /// Requested leaf index.
        index: usize,
        /// Number of leaves.
        count: usize,
    },
}
