//! baton's openraft type configuration: [`TypeConfig`], its request [`BatchBytes`] and its
//! response [`ApplyResult`].
//!
//! openraft's `serde` feature is off, so neither `D` nor `R` needs serde: entries travel and rest
//! as baton's own rkyv batch bytes (WAL record, QUIC frame), never through openraft's encoding.

use std::fmt;

use bytes::Bytes;
use rkyv::util::AlignedVec;

use super::runtime::GlommioRuntime;
use crate::batch::{access_batch, ArchivedBatch};
use crate::error::ModelError;

openraft::declare_raft_types!(
    /// openraft types of a baton node: the log carries sealed batch buffers, applying one yields
    /// an [`ApplyResult`], nodes are `u64` ids with an address, and Raft runs on glommio.
    ///
    /// Standard Raft leader ids (one leader per term): a committed log id is `(term, index)`,
    /// exactly what a WAL record header stores (ARCHITECTURE §5). openraft's default
    /// (`leader_id_adv`) would also need the leader's node id in every log id.
    pub TypeConfig:
        D = BatchBytes,
        R = ApplyResult,
        NodeId = u64,
        Node = openraft::impls::BasicNode,
        Term = u64,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
        AsyncRuntime = GlommioRuntime,
);

/// A log entry of [`TypeConfig`] (openraft's default entry type).
pub type Entry = <TypeConfig as openraft::RaftTypeConfig>::Entry;

/// A log id of [`TypeConfig`]: term and index.
pub type LogId = openraft::LogId<openraft::vote::leader_id_std::CommittedLeaderId<u64>>;

/// A snapshot as one byte blob. openraft 0.10 no longer has `SnapshotData` in the type config;
/// the state machine (`RaftStateMachine::SnapshotData`) and the network name this type instead.
pub type SnapshotBlob = Bytes;

/// The Raft request: one encoded rkyv batch buffer (see [`crate::batch`]).
///
/// Cloning shares the buffer (a reference count, no copy), and the buffer is `Send`, so the same
/// bytes go from the shard that sealed the batch to shard 0, into the WAL, and to the net thread
/// for replication.
#[derive(Clone, PartialEq, Eq)]
pub struct BatchBytes(Bytes);

impl BatchBytes {
    /// Takes ownership of an encoder buffer without copying; its alignment is kept, so
    /// [`BatchBytes::batch`] can read it in place.
    pub fn from_aligned<const ALIGNMENT: usize>(buf: AlignedVec<ALIGNMENT>) -> Self {
        Self(Bytes::from_owner(buf))
    }

    /// The encoded batch.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Length of the encoded batch, in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if the buffer is empty (never a valid batch).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The shared buffer, e.g. to hand to the network without a copy.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Validated in-place view of the batch (for bytes from disk or the network).
    pub fn batch(&self) -> Result<&ArchivedBatch, ModelError> {
        access_batch(&self.0)
    }
}

impl From<Bytes> for BatchBytes {
    fn from(bytes: Bytes) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for BatchBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BatchBytes({} bytes)", self.0.len())
    }
}

/// openraft logs requests with `Display`; a batch shows as its size only.
impl fmt::Display for BatchBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch of {} bytes", self.0.len())
    }
}

/// What applying one entry to the state machine returns to the `client_write` caller
/// (see `raft::state_machine`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApplyResult {
    /// Raft log index of the applied batch; a transaction's position is `(index, offset)`.
    pub index: u64,
    /// Number of transactions the batch ordered, duplicates included.
    pub tx_count: u32,
    /// The transactions that repeat an already sequenced hash, in offset order, each with the
    /// position of its first occurrence; every other offset `o` was ordered at `(index, o)`.
    pub duplicates: Vec<crate::sequencer::Duplicate>,
    /// The batch was committed but its content is invalid: nothing was ordered.
    pub rejected: bool,
}

#[cfg(test)]
mod tests {
    use openraft::entry::RaftEntry;
    use openraft::{EntryPayload, RaftTypeConfig};

    use super::*;
    use crate::batch::{encode_batch, Batch, BatchHeader};
    use crate::tx::Transaction;
    use crate::tx_kind::TxKind;

    fn sample_batch() -> Batch {
        let txs = vec![Transaction {
            rollup_id: 7,
            kind: TxKind::Raw,
            bytes: vec![1, 2, 3],
        }];
        Batch {
            header: BatchHeader {
                term: 2,
                index: 5,
                prev_batch_hash: [0; 32],
                tx_merkle_root: [0; 32],
                tx_count: 1,
                timestamp_us: 1,
            },
            txs,
        }
    }

    #[test]
    fn entry_carries_batch_bytes_without_copy() {
        let buf = encode_batch(&sample_batch()).unwrap();
        let data = BatchBytes::from_aligned(buf);
        let ptr = data.as_bytes().as_ptr();

        let entry = Entry::new_normal(LogId::new_term_index(2, 5), data.clone());

        assert_eq!(entry.index(), 5);
        assert_eq!(entry.log_id().leader_id.term, 2);
        let EntryPayload::Normal(carried) = &entry.payload else {
            panic!("normal entry expected, got {}", entry.payload);
        };
        assert_eq!(carried.as_bytes().as_ptr(), ptr, "clone shares the buffer");
        let batch = carried.batch().unwrap();
        assert_eq!(batch.header.index, 5);
        assert_eq!(batch.txs.len(), 1);
        assert_eq!(
            format!("{carried}"),
            format!("batch of {} bytes", data.len())
        );
    }

    #[test]
    fn apply_result_is_the_configured_response() {
        let r: <TypeConfig as RaftTypeConfig>::R = ApplyResult {
            index: 5,
            tx_count: 1,
            ..ApplyResult::default()
        };
        assert_eq!(r.index, 5);
    }
}
