//! Encrypted transactions: the ciphertext format and the key commitment (ARCHITECTURE §6).
//!
//! An encrypted transaction's `bytes` are `nonce (12) ‖ ChaCha20-Poly1305 ciphertext ‖ tag (16)`
//! under a 32-byte key; its kind carries `key_commitment = keccak256(key)`. The sequencer orders
//! the bytes blind; once the key is revealed anyone can check it against the commitment and
//! decrypt. The transaction hash stays `keccak256(bytes)`, i.e. of the ciphertext.

use chacha20poly1305::aead::Aead;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce};

use crate::hash::keccak256;
use crate::tx::Transaction;
use crate::tx_kind::TxKind;

/// Bytes of the key.
pub const KEY_BYTES: usize = 32;
/// Bytes of the nonce that opens the ciphertext.
pub const NONCE_BYTES: usize = 12;
/// Bytes of the Poly1305 tag that closes it.
pub const TAG_BYTES: usize = 16;
/// What encryption adds to a plaintext.
pub const OVERHEAD_BYTES: usize = NONCE_BYTES + TAG_BYTES;

/// Why a ciphertext could not be opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    /// Shorter than a nonce and a tag.
    #[error("ciphertext of {len} bytes is shorter than the {OVERHEAD_BYTES}-byte nonce and tag")]
    TooShort {
        /// Its length.
        len: usize,
    },
    /// `keccak256(key)` is not the transaction's commitment.
    #[error("the key does not match the transaction's key commitment")]
    WrongKey,
    /// The tag did not verify: the bytes were not sealed under this key.
    #[error("the ciphertext does not open under this key (tag mismatch)")]
    Unauthentic,
}

/// `keccak256(key)`.
pub fn key_commitment(key: &[u8; KEY_BYTES]) -> [u8; 32] {
    keccak256(key)
}

/// Seals `plaintext` under `key` with `nonce`: the bytes of an encrypted transaction.
///
/// A (key, nonce) pair must never seal two different plaintexts.
pub fn seal(key: &[u8; KEY_BYTES], nonce: &[u8; NONCE_BYTES], plaintext: &[u8]) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(key.into());
    let sealed = cipher
        .encrypt(Nonce::from_slice(nonce), plaintext)
        .expect("ChaCha20-Poly1305 encrypts any plaintext that fits in memory");
    let mut out = Vec::with_capacity(NONCE_BYTES + sealed.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&sealed);
    out
}

/// An encrypted transaction for `rollup_id`: `plaintext` sealed under `key` with `nonce`.
pub fn encrypted_transaction(
    rollup_id: u64,
    key: &[u8; KEY_BYTES],
    nonce: &[u8; NONCE_BYTES],
    plaintext: &[u8],
) -> Transaction {
    Transaction {
        rollup_id,
        kind: TxKind::Encrypted {
            key_commitment: key_commitment(key),
        },
        bytes: seal(key, nonce, plaintext),
    }
}

/// Opens `bytes` (nonce ‖ ciphertext ‖ tag) with `key`, first checking `key` against
/// `commitment`.
pub fn open(
    commitment: &[u8; 32],
    key: &[u8; KEY_BYTES],
    bytes: &[u8],
) -> Result<Vec<u8>, DecryptError> {
    if bytes.len() < OVERHEAD_BYTES {
        return Err(DecryptError::TooShort { len: bytes.len() });
    }
    if key_commitment(key) != *commitment {
        return Err(DecryptError::WrongKey);
    }
    let (nonce, sealed) = bytes.split_at(NONCE_BYTES);
    ChaCha20Poly1305::new(key.into())
        .decrypt(Nonce::from_slice(nonce), sealed)
        .map_err(|_| DecryptError::Unauthentic)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(tx: &Transaction) -> [u8; 32] {
        match tx.kind {
            TxKind::Encrypted { key_commitment } => key_commitment,
            TxKind::Raw => panic!("not encrypted"),
        }
    }

    #[test]
    fn sealed_transaction_opens_with_its_key() {
        let key = [7u8; KEY_BYTES];
        let tx = encrypted_transaction(3, &key, &[1; NONCE_BYTES], b"swap 1 ETH");
        assert_eq!(tx.rollup_id, 3);
        assert_eq!(tx.bytes.len(), b"swap 1 ETH".len() + OVERHEAD_BYTES);
        assert_eq!(&tx.bytes[..NONCE_BYTES], &[1; NONCE_BYTES]);
        assert_eq!(parts(&tx), keccak256(&key));
        assert_eq!(open(&parts(&tx), &key, &tx.bytes).unwrap(), b"swap 1 ETH");
    }

    #[test]
    fn wrong_key_tampering_and_truncation_are_typed_errors() {
        let key = [7u8; KEY_BYTES];
        let tx = encrypted_transaction(1, &key, &[2; NONCE_BYTES], b"payload");
        let c = parts(&tx);
        assert_eq!(
            open(&c, &[8; KEY_BYTES], &tx.bytes),
            Err(DecryptError::WrongKey)
        );
        // A key that matches a forged commitment still cannot open someone else's ciphertext.
        let other = [9u8; KEY_BYTES];
        assert_eq!(
            open(&key_commitment(&other), &other, &tx.bytes),
            Err(DecryptError::Unauthentic)
        );
        for i in 0..tx.bytes.len() {
            let mut bad = tx.bytes.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                open(&c, &key, &bad),
                Err(DecryptError::Unauthentic),
                "byte {i}"
            );
        }
        assert_eq!(
            open(&c, &key, &tx.bytes[..OVERHEAD_BYTES - 1]),
            Err(DecryptError::TooShort {
                len: OVERHEAD_BYTES - 1
            })
        );
    }
}
