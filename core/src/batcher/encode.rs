//! Building the rkyv `Batch` archive in place around payload bytes that are already in the buffer.
//!
//! rkyv lays out a `Batch` depth first: every transaction's payload bytes back to back (`u8` needs
//! no padding), then the `ArchivedTransaction` array, then the `ArchivedBatch` root at the end.
//! The batcher writes each payload straight into the batch buffer when the transaction is pushed
//! (its one copy), and at seal the types here let rkyv append the array and root, pointing at the
//! bytes already there. The result is byte for byte what `encode_batch` writes for the same batch.

use core::mem::{align_of, size_of};

use rkyv::munge::munge;
use rkyv::rancor::{self, Fallible};
use rkyv::ser::{Allocator, Writer};
use rkyv::util::AlignedVec;
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::{Archive, Place, Serialize};

use crate::batch::{ArchivedBatch, BatchHeader};
use crate::tx::ArchivedTransaction;
use crate::tx_kind::TxKind;

/// Exact length of the encoded batch of `tx_count` transactions whose payloads total
/// `payload_bytes` bytes.
pub(crate) const fn encoded_len(payload_bytes: usize, tx_count: usize) -> usize {
    let array_at = payload_bytes.next_multiple_of(align_of::<ArchivedTransaction>());
    let array_end = array_at + tx_count * size_of::<ArchivedTransaction>();
    array_end.next_multiple_of(align_of::<ArchivedBatch>()) + size_of::<ArchivedBatch>()
}

/// A transaction whose payload already sits in the batch buffer at `bytes_pos`.
#[derive(Debug)]
pub(crate) struct PlacedTx {
    /// Destination rollup.
    pub rollup_id: u64,
    /// Raw or encrypted.
    pub kind: TxKind,
    /// Offset of the payload in the batch buffer.
    pub bytes_pos: usize,
    /// Payload length in bytes.
    pub bytes_len: usize,
}

/// Resolver of a `PlacedTx`: the kind's, and the payload position.
pub(crate) struct PlacedTxResolver {
    kind: <TxKind as Archive>::Resolver,
    bytes: VecResolver,
}

impl Archive for PlacedTx {
    type Archived = ArchivedTransaction;
    type Resolver = PlacedTxResolver;

    fn resolve(&self, resolver: Self::Resolver, out: Place<Self::Archived>) {
        munge!(let ArchivedTransaction { rollup_id, kind, bytes } = out);
        self.rollup_id.resolve((), rollup_id);
        self.kind.resolve(resolver.kind, kind);
        ArchivedVec::<u8>::resolve_from_len(self.bytes_len, resolver.bytes, bytes);
    }
}

impl<S: Fallible + ?Sized> Serialize<S> for PlacedTx
where
    TxKind: Serialize<S>,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        // The payload was written when the transaction was pushed; only point at it.
        Ok(PlacedTxResolver {
            kind: self.kind.serialize(serializer)?,
            bytes: VecResolver::from_pos(self.bytes_pos),
        })
    }
}

/// The header and transactions of a batch whose payloads are already in the buffer.
struct PlacedBatch<'a> {
    header: BatchHeader,
    txs: &'a [PlacedTx],
}

impl Archive for PlacedBatch<'_> {
    type Archived = ArchivedBatch;
    type Resolver = (<BatchHeader as Archive>::Resolver, VecResolver);

    fn resolve(&self, resolver: Self::Resolver, out: Place<Self::Archived>) {
        munge!(let ArchivedBatch { header, txs } = out);
        self.header.resolve(resolver.0, header);
        ArchivedVec::resolve_from_slice(self.txs, resolver.1, txs);
    }
}

impl<S: Fallible + Allocator + Writer + ?Sized> Serialize<S> for PlacedBatch<'_>
where
    BatchHeader: Serialize<S>,
    TxKind: Serialize<S>,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        // Field order as in the derived `Batch`: header (writes nothing), then the txs array.
        let header = self.header.serialize(serializer)?;
        let txs = ArchivedVec::<ArchivedTransaction>::serialize_from_slice(self.txs, serializer)?;
        Ok((header, txs))
    }
}

/// Appends the transaction array and the batch root to `buf`, which holds exactly the payloads
/// of `txs` in order from offset 0; returns the finished archive.
pub(crate) fn finish_batch(buf: AlignedVec, header: BatchHeader, txs: &[PlacedTx]) -> AlignedVec {
    let batch = PlacedBatch { header, txs };
    // Writing to a Vec and the thread-local arena cannot fail short of aborting on OOM.
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(&batch, buf)
        .expect("encoding into an AlignedVec cannot fail")
}
