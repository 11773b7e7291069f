//! A transaction as submitted by a client: rollup, kind and opaque payload bytes.

use rkyv::{Archive, Deserialize, Serialize};

use crate::error::ModelError;
use crate::hash::TxHash;
use crate::limits::TX_BYTES_MAX;
use crate::tx_kind::TxKind;

/// One transaction: the unit a client submits and a batch orders.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug), compare(PartialEq))]
pub struct Transaction {
    /// The rollup this transaction is destined for.
    pub rollup_id: u64,
    /// Raw or encrypted.
    pub kind: TxKind,
    /// Opaque payload; its keccak256 is the transaction hash.
    pub bytes: Vec<u8>,
}

/// Checks a payload length against the transaction limits.
fn validate_payload_len(len: usize) -> Result<(), ModelError> {
    if len == 0 {
        return Err(ModelError::EmptyTx);
    }
    if len > TX_BYTES_MAX {
        return Err(ModelError::TxTooLarge {
            len,
            max: TX_BYTES_MAX,
        });
    }
    Ok(())
}

impl Transaction {
    /// `keccak256(self.bytes)`.
    pub fn tx_hash(&self) -> TxHash {
        TxHash::of(&self.bytes)
    }

    /// Checks the size limits: payload non-empty and at most `TX_BYTES_MAX` bytes.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_payload_len(self.bytes.len())
    }
}

impl ArchivedTransaction {
    /// `keccak256(self.bytes)`, the same value as `Transaction::tx_hash`.
    pub fn tx_hash(&self) -> TxHash {
        TxHash::of(self.bytes.as_slice())
    }

    /// The rollup id as a native integer.
    pub fn rollup_id(&self) -> u64 {
        self.rollup_id.to_native()
    }

    /// Checks the size limits, exactly as `Transaction::validate`.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_payload_len(self.bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rkyv::rancor::Error;

    fn raw(bytes: Vec<u8>) -> Transaction {
        Transaction {
            rollup_id: 7,
            kind: TxKind::Raw,
            bytes,
        }
    }

    #[test]
    fn empty_tx_rejected() {
        assert!(matches!(raw(vec![]).validate(), Err(ModelError::EmptyTx)));
    }

    #[test]
    fn oversized_tx_rejected_and_max_accepted() {
        let too_big = raw(vec![1; TX_BYTES_MAX + 1]);
        assert!(matches!(
            too_big.validate(),
            Err(ModelError::TxTooLarge { len, max })
                if len == TX_BYTES_MAX + 1 && max == TX_BYTES_MAX
        ));
        assert!(raw(vec![1; TX_BYTES_MAX]).validate().is_ok());
    }

    #[test]
    fn archived_tx_hash_and_fields_match_owned() {
        let tx = Transaction {
            rollup_id: 42,
            kind: TxKind::Encrypted {
                key_commitment: [9; 32],
            },
            bytes: b"ciphertext".to_vec(),
        };
        let bytes = rkyv::to_bytes::<Error>(&tx).expect("serialize");
        let archived = rkyv::access::<ArchivedTransaction, Error>(&bytes).expect("access");
        assert_eq!(archived, &tx);
        assert_eq!(archived.tx_hash(), tx.tx_hash());
        assert_eq!(archived.rollup_id(), 42);
        assert_eq!(archived.kind.key_commitment(), Some(&[9; 32]));
        assert!(archived.validate().is_ok());
    }
}
