//! What the leader signs and what a submitter gets back.
//!
//! - [`SignedHeader`]: a batch header with the leader's signature over its digest. It travels in
//!   a fixed 160-byte encoding ([`SignedHeader::encode`]) inside every sealed log entry, so every
//!   node stores the same signed header the leader made.
//! - [`Receipt`]: a transaction's position `(index, offset)` with the proof of it: the signed
//!   header and the Merkle path from the transaction's hash to the header's root. A receipt is
//!   checked offline with [`Receipt::verify`] against the addresses of the cluster's signers.
//! - [`AckLevel`]: when the receipt is given. *Preconfirmed*: the leader has ordered and signed
//!   the batch and put it in its log (a promise; lost if that leader dies before a majority has
//!   the batch, but the signature and term make a broken promise attributable). *Committed*: the
//!   batch is durable on a majority and is never lost or reordered.

use crate::batch::{BatchHeader, HEADER_DIGEST_INPUT_BYTES};
use crate::hash::{keccak256, TxHash};
use crate::merkle::{verify_proof, MerkleProof};
use crate::sign::{Address, SignError, Signature, SIGNATURE_BYTES};

/// Length of an encoded [`SignedHeader`]: the 92-byte canonical header, the 65-byte signature,
/// three zero bytes (so what follows stays 16-byte aligned).
pub const SIGNED_HEADER_BYTES: usize = 160;

/// Longest Merkle path a receipt may carry (a batch holds at most 2^15 transactions, so 15 is
/// enough; anything longer is malformed).
pub const PROOF_PATH_MAX: usize = 32;

/// A batch header and the leader's signature over `header.digest()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignedHeader {
    /// The header the leader built when it appended the batch.
    pub header: BatchHeader,
    /// Its signature over `header.digest()`.
    pub signature: Signature,
}

/// Why encoded bytes are not a signed header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignedHeaderError {
    /// Not exactly `SIGNED_HEADER_BYTES` bytes.
    #[error("signed header is {len} bytes, expected {SIGNED_HEADER_BYTES}")]
    Length {
        /// Bytes given.
        len: usize,
    },
    /// The padding is not zero.
    #[error("signed header padding is not zero")]
    Padding,
}

impl SignedHeader {
    /// Signs `header` with `signer`.
    pub fn sign(header: BatchHeader, signer: &crate::sign::Signer) -> SignedHeader {
        SignedHeader {
            header,
            signature: signer.sign(&header.digest()),
        }
    }

    /// Signs `header` with `signer` and a nonce made ahead ([`crate::sign::Signer::sign_with`]).
    pub fn sign_with(
        header: BatchHeader,
        signer: &crate::sign::Signer,
        nonce: crate::sign::Nonce,
    ) -> SignedHeader {
        SignedHeader {
            header,
            signature: signer.sign_with(&header.digest(), nonce),
        }
    }

    /// Who signed it.
    pub fn signer(&self) -> Result<Address, SignError> {
        self.signature.recover(&self.header.digest())
    }

    /// The fixed encoding: the header's canonical digest input (92 bytes, big-endian; see
    /// `BatchHeader::digest`), the signature `r ‖ s ‖ v`, three zero bytes.
    pub fn encode(&self) -> [u8; SIGNED_HEADER_BYTES] {
        let mut out = [0u8; SIGNED_HEADER_BYTES];
        out[..HEADER_DIGEST_INPUT_BYTES].copy_from_slice(&self.header.digest_input());
        out[HEADER_DIGEST_INPUT_BYTES..HEADER_DIGEST_INPUT_BYTES + SIGNATURE_BYTES]
            .copy_from_slice(&self.signature.0);
        out
    }

    /// Decodes `encode`'s output. The signature is not checked here (see `signer`).
    pub fn decode(bytes: &[u8]) -> Result<SignedHeader, SignedHeaderError> {
        if bytes.len() != SIGNED_HEADER_BYTES {
            return Err(SignedHeaderError::Length { len: bytes.len() });
        }
        if bytes[HEADER_DIGEST_INPUT_BYTES + SIGNATURE_BYTES..]
            .iter()
            .any(|b| *b != 0)
        {
            return Err(SignedHeaderError::Padding);
        }
        let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8"));
        let arr_at = |at: usize| -> [u8; 32] { bytes[at..at + 32].try_into().expect("32") };
        let header = BatchHeader {
            term: u64_at(0),
            index: u64_at(8),
            prev_batch_hash: arr_at(16),
            tx_merkle_root: arr_at(48),
            tx_count: u32::from_be_bytes(bytes[80..84].try_into().expect("4")),
            timestamp_us: u64_at(84),
        };
        let mut signature = [0u8; SIGNATURE_BYTES];
        signature.copy_from_slice(
            &bytes[HEADER_DIGEST_INPUT_BYTES..HEADER_DIGEST_INPUT_BYTES + SIGNATURE_BYTES],
        );
        Ok(SignedHeader {
            header,
            signature: Signature(signature),
        })
    }

    /// keccak256 of the header (what was signed, and the next batch's `prev_batch_hash`).
    pub fn digest(&self) -> [u8; 32] {
        keccak256(&self.header.digest_input())
    }
}

/// When a receipt is given (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AckLevel {
    /// Ordered and signed by the leader, in its log; not yet durable on a majority.
    Preconfirmed,
    /// Durable on a majority of the cluster.
    Committed,
}

impl AckLevel {
    /// Lower-case name, as the command line and results spell it.
    pub fn name(self) -> &'static str {
        match self {
            AckLevel::Preconfirmed => "preconfirmed",
            AckLevel::Committed => "committed",
        }
    }
}

/// A transaction's position and the proof of it (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// keccak256 of the transaction bytes.
    pub tx_hash: TxHash,
    /// The level this receipt was given at.
    pub level: AckLevel,
    /// The signed header of the batch that ordered the transaction; the position's index and
    /// the leader's term are `batch.header.index` and `batch.header.term`.
    pub batch: SignedHeader,
    /// Offset of the transaction in the batch.
    pub offset: u32,
    /// Merkle path from the transaction's leaf to `batch.header.tx_merkle_root` (siblings,
    /// bottom up; the leaf index is `offset`, the leaf count `batch.header.tx_count`).
    pub path: Vec<[u8; 32]>,
    /// True when this submission repeated an already ordered transaction and the receipt is
    /// the original's.
    pub duplicate: bool,
}

/// Why a receipt does not prove what it claims.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    /// The Merkle path does not lead from the transaction hash to the header's root.
    #[error("Merkle path of tx at offset {offset} does not lead to the batch root")]
    BadProof {
        /// The claimed offset.
        offset: u32,
    },
    /// The signature is malformed or unrecoverable.
    #[error("batch header signature: {0}")]
    Signature(#[from] SignError),
    /// A valid signature by a key that is not one of the expected signers.
    #[error("batch header signed by {signer}, which is not an expected signer")]
    UnknownSigner {
        /// Who signed.
        signer: Address,
    },
}

impl Receipt {
    /// Raft index of the batch (the first part of the position).
    pub fn index(&self) -> u64 {
        self.batch.header.index
    }

    /// Term of the leader that sequenced the batch.
    pub fn term(&self) -> u64 {
        self.batch.header.term
    }

    /// The Merkle proof in `merkle`'s form.
    pub fn proof(&self) -> MerkleProof {
        MerkleProof {
            index: self.offset,
            count: self.batch.header.tx_count,
            path: self.path.clone(),
        }
    }

    /// Checks the receipt offline: the Merkle path proves `tx_hash` at `offset` under the
    /// header's root, and the header is signed by one of `signers`. Returns the signer.
    pub fn verify(&self, signers: &[Address]) -> Result<Address, ReceiptError> {
        if !verify_proof(
            &self.batch.header.tx_merkle_root,
            &self.tx_hash,
            &self.proof(),
        ) {
            return Err(ReceiptError::BadProof {
                offset: self.offset,
            });
        }
        let signer = self.batch.signer()?;
        if signers.contains(&signer) {
            Ok(signer)
        } else {
            Err(ReceiptError::UnknownSigner { signer })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::MerkleTree;
    use crate::sign::Signer;

    fn header(root: [u8; 32], count: u32) -> BatchHeader {
        BatchHeader {
            term: 3,
            index: 17,
            prev_batch_hash: [9; 32],
            tx_merkle_root: root,
            tx_count: count,
            timestamp_us: 1_700_000_000_000_000,
        }
    }

    #[test]
    fn signed_header_round_trips_and_rejects_bad_bytes() {
        let s = Signer::from_secret(&[5; 32]).unwrap();
        let sh = SignedHeader::sign(header([1; 32], 4), &s);
        let bytes = sh.encode();
        assert_eq!(SignedHeader::decode(&bytes).unwrap(), sh);
        assert_eq!(sh.signer().unwrap(), s.address());
        assert_eq!(sh.digest(), sh.header.digest());
        assert_eq!(
            SignedHeader::decode(&bytes[1..]),
            Err(SignedHeaderError::Length { len: 159 })
        );
        let mut padded = bytes;
        padded[159] = 1;
        assert_eq!(
            SignedHeader::decode(&padded),
            Err(SignedHeaderError::Padding)
        );
    }

    fn receipts(n: usize, signer: &Signer) -> Vec<Receipt> {
        let hashes: Vec<TxHash> = (0..n as u64)
            .map(|i| TxHash::of(&i.to_le_bytes()))
            .collect();
        let tree = MerkleTree::new(&hashes);
        let batch = SignedHeader::sign(header(tree.root(), n as u32), signer);
        (0..n)
            .map(|i| Receipt {
                tx_hash: hashes[i],
                level: AckLevel::Committed,
                batch,
                offset: i as u32,
                path: tree.proof(i).unwrap().path,
                duplicate: false,
            })
            .collect()
    }

    #[test]
    fn receipts_verify_against_the_signer() {
        let s = Signer::from_secret(&[6; 32]).unwrap();
        let other = Signer::from_secret(&[7; 32]).unwrap();
        for n in [1, 2, 3, 7, 64, 100] {
            for r in receipts(n, &s) {
                assert_eq!(
                    r.verify(&[other.address(), s.address()]).unwrap(),
                    s.address()
                );
                assert!(matches!(
                    r.verify(&[other.address()]),
                    Err(ReceiptError::UnknownSigner { signer }) if signer == s.address()
                ));
            }
        }
    }

    #[test]
    fn tampered_receipts_fail() {
        let s = Signer::from_secret(&[6; 32]).unwrap();
        let ok = &receipts(5, &s)[2];
        let signers = [s.address()];

        let mut wrong_offset = ok.clone();
        wrong_offset.offset = 3;
        assert!(matches!(
            wrong_offset.verify(&signers),
            Err(ReceiptError::BadProof { .. })
        ));

        let mut wrong_hash = ok.clone();
        wrong_hash.tx_hash = TxHash([0; 32]);
        assert!(matches!(
            wrong_hash.verify(&signers),
            Err(ReceiptError::BadProof { .. })
        ));

        // Moving the batch (another index) breaks the signature, not the proof.
        let mut moved = ok.clone();
        moved.batch.header.index += 1;
        assert!(moved.verify(&signers).is_err());

        let mut forged = ok.clone();
        forged.batch.signature.0[10] ^= 1;
        assert!(forged.verify(&signers).is_err());
    }
}
