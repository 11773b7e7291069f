//! Per-rollup blocks: the header the leader signs and the metadata every node keeps
//! (ARCHITECTURE §6, docs/semantics.md).
//!
//! A block orders a run of one rollup's transactions, in log order: the first `tx_count`
//! transactions of that rollup sequenced after the previous block. The leader proposes a seal
//! marker (`command::Command::SealBlock`) carrying the header it built from its applied state
//! and its signature; every node rebuilds the header from its own state when it applies the
//! marker and keeps the block only if the two agree, so blocks are identical on every node.
//!
//! [`BlockMeta`] is what changes after sealing: how many of the block's encrypted transactions
//! were revealed or expired. It is not signed (it changes); it is synchronized the same way,
//! by the reveal commands and seal markers in the log.

use crate::hash::keccak256;
use crate::sign::{Address, SignError, Signature, Signer, SIGNATURE_BYTES};

/// Bytes of the canonical big-endian header encoding that [`BlockHeader::digest`] hashes.
pub const BLOCK_DIGEST_INPUT_BYTES: usize = 8 + 8 + 32 + 8 + 8 + 32 + 4 + 8;

/// Bytes of an encoded [`SignedBlockHeader`]: canonical header, signature, three zero bytes.
pub const SIGNED_BLOCK_HEADER_BYTES: usize = 176;

/// A block's header (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BlockHeader {
    /// The rollup the block belongs to.
    pub rollup_id: u64,
    /// 1 for a rollup's first block, then +1 per block.
    pub height: u64,
    /// `digest()` of the previous block of this rollup; zero for height 1.
    pub parent_hash: [u8; 32],
    /// Raft index of the batch holding the block's first transaction.
    pub first_batch: u64,
    /// Raft index of the batch holding its last transaction.
    pub last_batch: u64,
    /// Merkle root (`merkle::merkle_root`) of the block's transaction hashes, in order.
    pub tx_merkle_root: [u8; 32],
    /// Transactions in the block (at least one).
    pub tx_count: u32,
    /// Leader's wall clock when it sealed the block, in µs since the Unix epoch; never less
    /// than the parent's.
    pub timestamp_us: u64,
}

impl BlockHeader {
    /// The canonical 108-byte big-endian encoding: `rollup_id u64 ‖ height u64 ‖ parent_hash
    /// [32] ‖ first_batch u64 ‖ last_batch u64 ‖ tx_merkle_root [32] ‖ tx_count u32 ‖
    /// timestamp_us u64`, i.e. Solidity's `abi.encodePacked(uint64, uint64, bytes32, uint64,
    /// uint64, bytes32, uint32, uint64)`.
    pub fn digest_input(&self) -> [u8; BLOCK_DIGEST_INPUT_BYTES] {
        let mut out = [0u8; BLOCK_DIGEST_INPUT_BYTES];
        out[0..8].copy_from_slice(&self.rollup_id.to_be_bytes());
        out[8..16].copy_from_slice(&self.height.to_be_bytes());
        out[16..48].copy_from_slice(&self.parent_hash);
        out[48..56].copy_from_slice(&self.first_batch.to_be_bytes());
        out[56..64].copy_from_slice(&self.last_batch.to_be_bytes());
        out[64..96].copy_from_slice(&self.tx_merkle_root);
        out[96..100].copy_from_slice(&self.tx_count.to_be_bytes());
        out[100..108].copy_from_slice(&self.timestamp_us.to_be_bytes());
        out
    }

    /// keccak256 of [`digest_input`](BlockHeader::digest_input): what the leader signs and the
    /// next block's `parent_hash`.
    pub fn digest(&self) -> [u8; 32] {
        keccak256(&self.digest_input())
    }

    fn from_digest_input(b: &[u8]) -> BlockHeader {
        let u64_at = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8"));
        let arr_at = |at: usize| -> [u8; 32] { b[at..at + 32].try_into().expect("32") };
        BlockHeader {
            rollup_id: u64_at(0),
            height: u64_at(8),
            parent_hash: arr_at(16),
            first_batch: u64_at(48),
            last_batch: u64_at(56),
            tx_merkle_root: arr_at(64),
            tx_count: u32::from_be_bytes(b[96..100].try_into().expect("4")),
            timestamp_us: u64_at(100),
        }
    }
}

/// A block header and the leader's signature over its digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignedBlockHeader {
    /// The header.
    pub header: BlockHeader,
    /// The sealing leader's signature over `header.digest()`.
    pub signature: Signature,
}

/// Why bytes are not a signed block header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockHeaderError {
    /// Not exactly `SIGNED_BLOCK_HEADER_BYTES` bytes.
    #[error("signed block header is {len} bytes, expected {SIGNED_BLOCK_HEADER_BYTES}")]
    Length {
        /// Bytes given.
        len: usize,
    },
    /// The padding is not zero.
    #[error("signed block header padding is not zero")]
    Padding,
}

impl SignedBlockHeader {
    /// Signs `header` with `signer`.
    pub fn sign(header: BlockHeader, signer: &Signer) -> SignedBlockHeader {
        SignedBlockHeader {
            header,
            signature: signer.sign(&header.digest()),
        }
    }

    /// The address the signature recovers to.
    pub fn signer(&self) -> Result<Address, SignError> {
        self.signature.recover(&self.header.digest())
    }

    /// `header.digest()`.
    pub fn digest(&self) -> [u8; 32] {
        self.header.digest()
    }

    /// The fixed encoding: canonical header (108 bytes), signature `r ‖ s ‖ v` (65), three
    /// zero bytes.
    pub fn encode(&self) -> [u8; SIGNED_BLOCK_HEADER_BYTES] {
        let mut out = [0u8; SIGNED_BLOCK_HEADER_BYTES];
        out[..BLOCK_DIGEST_INPUT_BYTES].copy_from_slice(&self.header.digest_input());
        out[BLOCK_DIGEST_INPUT_BYTES..BLOCK_DIGEST_INPUT_BYTES + SIGNATURE_BYTES]
            .copy_from_slice(&self.signature.0);
        out
    }

    /// Decodes [`encode`](SignedBlockHeader::encode)'s output; the signature is not checked.
    pub fn decode(bytes: &[u8]) -> Result<SignedBlockHeader, BlockHeaderError> {
        if bytes.len() != SIGNED_BLOCK_HEADER_BYTES {
            return Err(BlockHeaderError::Length { len: bytes.len() });
        }
        if bytes[BLOCK_DIGEST_INPUT_BYTES + SIGNATURE_BYTES..]
            .iter()
            .any(|b| *b != 0)
        {
            return Err(BlockHeaderError::Padding);
        }
        let mut signature = [0u8; SIGNATURE_BYTES];
        signature.copy_from_slice(
            &bytes[BLOCK_DIGEST_INPUT_BYTES..BLOCK_DIGEST_INPUT_BYTES + SIGNATURE_BYTES],
        );
        Ok(SignedBlockHeader {
            header: BlockHeader::from_digest_input(&bytes[..BLOCK_DIGEST_INPUT_BYTES]),
            signature: Signature(signature),
        })
    }

    /// Checks the signature against the cluster's signer addresses; returns the signer.
    pub fn verify(&self, signers: &[Address]) -> Result<Address, BlockVerifyError> {
        let signer = self.signer()?;
        if signers.contains(&signer) {
            Ok(signer)
        } else {
            Err(BlockVerifyError::UnknownSigner { signer })
        }
    }
}

/// Why a signed block header does not verify.
#[derive(Debug, thiserror::Error)]
pub enum BlockVerifyError {
    /// The signature is malformed or unrecoverable.
    #[error("block header signature: {0}")]
    Signature(#[from] SignError),
    /// A valid signature by a key that is not one of the expected signers.
    #[error("block header signed by {signer}, which is not an expected signer")]
    UnknownSigner {
        /// Who signed.
        signer: Address,
    },
}

/// A block's mutable metadata: the fate of its encrypted transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BlockMeta {
    /// Encrypted transactions in the block.
    pub encrypted: u32,
    /// Of those, how many have had their key revealed (and their plaintext recorded).
    pub revealed: u32,
    /// Of those, how many were not revealed within the rollup's reveal window.
    pub expired: u32,
}

impl BlockMeta {
    /// Encrypted transactions still waiting for their key.
    pub fn pending(&self) -> u32 {
        self.encrypted
            .saturating_sub(self.revealed)
            .saturating_sub(self.expired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> BlockHeader {
        BlockHeader {
            rollup_id: 7,
            height: 3,
            parent_hash: [1; 32],
            first_batch: 10,
            last_batch: 12,
            tx_merkle_root: [2; 32],
            tx_count: 5,
            timestamp_us: 1_700_000_000_000_000,
        }
    }

    #[test]
    fn signed_block_header_round_trips_and_recovers_its_signer() {
        let signer = Signer::from_secret(&[9; 32]).unwrap();
        let signed = SignedBlockHeader::sign(header(), &signer);
        let bytes = signed.encode();
        assert_eq!(&bytes[..8], &7u64.to_be_bytes());
        let back = SignedBlockHeader::decode(&bytes).unwrap();
        assert_eq!(back, signed);
        assert_eq!(back.signer().unwrap(), signer.address());
        assert_eq!(back.verify(&[signer.address()]).unwrap(), signer.address());
        assert!(matches!(
            back.verify(&[Address([3; 20])]),
            Err(BlockVerifyError::UnknownSigner { .. })
        ));
    }

    #[test]
    fn any_changed_field_changes_the_digest_and_the_recovered_signer() {
        let signer = Signer::from_secret(&[9; 32]).unwrap();
        let signed = SignedBlockHeader::sign(header(), &signer);
        let mut other = signed;
        other.header.tx_count += 1;
        assert_ne!(other.digest(), signed.digest());
        assert_ne!(other.signer().ok(), Some(signer.address()));
    }

    #[test]
    fn bad_lengths_and_padding_are_typed_errors() {
        let signer = Signer::from_secret(&[9; 32]).unwrap();
        let bytes = SignedBlockHeader::sign(header(), &signer).encode();
        assert_eq!(
            SignedBlockHeader::decode(&bytes[..175]),
            Err(BlockHeaderError::Length { len: 175 })
        );
        let mut padded = bytes;
        padded[175] = 1;
        assert_eq!(
            SignedBlockHeader::decode(&padded),
            Err(BlockHeaderError::Padding)
        );
    }
}
