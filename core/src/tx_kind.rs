//! Whether a transaction's payload is readable by the sequencer (raw) or ordered blind (encrypted).

// rkyv's derived `TxKindResolver` has undocumented variant fields that no attribute can reach.
#![allow(missing_docs)]

use rkyv::{Archive, Deserialize, Serialize};

/// Whether a transaction's payload is readable by the sequencer.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug), compare(PartialEq))]
pub enum TxKind {
    /// Plain payload, e.g. a signed RLP-encoded Ethereum transaction.
    Raw,
    /// Ciphertext ordered blind; the key is revealed after the receipt.
    Encrypted {
        /// `keccak256(key)`: binds the later key reveal to this ciphertext.
        key_commitment: [u8; 32],
    },
}

impl ArchivedTxKind {
    /// The key commitment of an encrypted transaction, `None` for a raw one.
    pub fn key_commitment(&self) -> Option<&[u8; 32]> {
        match self {
            ArchivedTxKind::Raw => None,
            ArchivedTxKind::Encrypted { key_commitment } => Some(key_commitment),
        }
    }
}
