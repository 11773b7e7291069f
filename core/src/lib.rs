//! baton-core: the domain model of the baton sequencer.
//!
//! - [`tx`]: transactions (`Transaction`) and their limits, [`tx_kind`]: raw or encrypted,
//! - [`batch`]: the batch (Raft entry) as one zero-copy rkyv buffer: encode, validated access,
//!   in-place header patching, header digest,
//! - [`batcher`]: the shard's deterministic batch builder (validate, hash, dedup, seal),
//! - [`merkle`]: the RFC 6962-shaped keccak256 Merkle tree over transaction hashes,
//! - [`hash`]: keccak256 and `TxHash`, [`tx_index`]: tables keyed by it that grow without
//!   stalling,
//! - [`encrypted`]: the ciphertext format of encrypted transactions and their key commitment,
//! - [`receipt`]: the leader's signed batch header, receipts at two ack levels and their offline
//!   verification,
//! - [`block`]: per-rollup block headers (signed) and block metadata, [`rollups`]: the
//!   per-rollup state (registrations, pending transactions, blocks, reveals), [`command`]: the
//!   control commands that drive it through the log,
//! - [`cpus`]: the CPUs a node may pin its threads to,
//! - [`sign`]: leader signatures (secp256k1, Ethereum-style recoverable) and addresses,
//! - [`limits`]: every size limit, [`error`]: `ModelError`,
//! - [`raft`]: openraft on glommio: the runtime adapter and baton's `TypeConfig`.
//!
//! Bytes from disk or the network are only read through validated access (`access_batch`);
//! nothing here panics on untrusted input.

#![warn(missing_docs)]

pub mod batch;
pub mod batcher;
pub mod block;
pub mod command;
pub mod cpus;
pub mod encrypted;
pub mod error;
pub mod hash;
pub mod keccak_many;
pub mod limits;
pub mod memory;
pub mod merkle;
pub mod node;
pub mod raft;
pub mod receipt;
pub mod rollups;
pub mod sequencer;
pub mod sign;
pub mod tx;
pub mod tx_index;
pub mod tx_kind;

pub use batch::{
    access_batch, access_batch_unchecked, encode_batch, encode_batch_into, patch_header,
    ArchivedBatch, ArchivedBatchHeader, Batch, BatchHeader,
};
pub use batcher::{
    BatchPolicy, Batcher, BatcherConfigError, IncomingTx, PushOutcome, SealedBatch,
    SubmitRejection, TxSlot,
};
pub use error::ModelError;
pub use hash::{keccak256, TxHash};
pub use limits::{BATCH_BYTES_MAX, BATCH_TXS_MAX, TX_BYTES_MAX};
pub use merkle::{
    merkle_proof, merkle_root, verify_proof, MerkleAccumulator, MerkleProof, MerkleTree,
};
pub use raft::{ApplyResult, BatchBytes, GlommioRuntime, TypeConfig};
pub use receipt::{AckLevel, Receipt, ReceiptError, SignedHeader};
pub use sequencer::{Applied, Duplicate, Position, Sequencer, SequencerError};
pub use sign::{Address, Signature, Signer};
pub use tx::{ArchivedTransaction, Transaction};
pub use tx_kind::{ArchivedTxKind, TxKind};
