//! baton's openraft type configuration: [`TypeConfig`], its request [`BatchBytes`] and its
//! response [`ApplyResult`].
//!
//! openraft's `serde` feature is off, so neither `D` nor `R` needs serde: entries travel and rest
//! as baton's own rkyv batch bytes (WAL record, QUIC frame), never through openraft's encoding.

use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_channel::oneshot;
use rkyv::util::AlignedVec;

use super::runtime::GlommioRuntime;
use crate::batch::{access_batch, ArchivedBatch};
use crate::error::ModelError;
use crate::receipt::SignedHeader;

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

/// The Raft request: one encoded rkyv batch buffer (see [`crate::batch`]) and, once the leader
/// has appended it, the leader's [`SignedHeader`].
///
/// Cloning shares the buffer (a reference count, no copy), and the buffer is `Send`, so the same
/// bytes go from the shard that sealed the batch to shard 0, into the WAL, and to the net thread
/// for replication.
///
/// A shard's batch enters `client_write` unsigned; the leader's log store fills in the header
/// fields only the leader knows (term, index, previous batch digest, time), signs it, and stores
/// and replicates the batch with that [`SignedHeader`] (see `raft::log_store`). The optional
/// [`SealTicket`] tells the proposer at that moment (the preconfirmation); it never leaves the
/// process.
///
/// The same type carries the log's control commands ([`crate::command`]): a `BatchBytes` made
/// with [`BatchBytes::command`] holds a command's bytes instead of a batch, is never signed, and
/// is stored and replicated as its own entry kind.
#[derive(Clone)]
pub struct BatchBytes {
    bytes: Bytes,
    seal: Option<SignedHeader>,
    ticket: Option<SealTicket>,
    command: bool,
    /// Bytes of the allocation `bytes` keeps alive (a batcher's buffer is reserved at the
    /// largest batch size, whatever the batch fills).
    footprint: usize,
}

/// One-shot notice of a batch's signed header, fired by the leader's log store when it appends
/// the batch. Clones share the slot; the first `fire` wins.
#[derive(Clone, Default)]
pub struct SealTicket(Arc<Mutex<Option<oneshot::Sender<SignedHeader>>>>);

impl SealTicket {
    /// A ticket and the receiver its `fire` reaches.
    pub fn new() -> (SealTicket, oneshot::Receiver<SignedHeader>) {
        let (tx, rx) = oneshot::channel();
        (SealTicket(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    /// Sends `seal` to the receiver, if nobody did yet and it still listens.
    pub fn fire(&self, seal: SignedHeader) {
        let sender = self.0.lock().map(|mut s| s.take()).unwrap_or(None);
        if let Some(tx) = sender {
            let _ = tx.send(seal);
        }
    }
}

impl BatchBytes {
    /// Takes ownership of an encoder buffer without copying; its alignment is kept, so
    /// [`BatchBytes::batch`] can read it in place.
    pub fn from_aligned<const ALIGNMENT: usize>(buf: AlignedVec<ALIGNMENT>) -> Self {
        let footprint = buf.capacity();
        Self {
            footprint,
            ..Self::from(Bytes::from_owner(buf))
        }
    }

    /// A control command's encoding ([`crate::command::Command::encode`]) as a log entry.
    pub fn command(bytes: Vec<u8>) -> Self {
        Self {
            command: true,
            footprint: bytes.capacity(),
            ..Self::from(Bytes::from(bytes))
        }
    }

    /// Bytes of memory this batch keeps alive (its buffer's allocation, at least its length).
    pub fn footprint(&self) -> usize {
        self.footprint.max(self.bytes.len())
    }

    /// True for a control command, false for a transaction batch.
    pub fn is_command(&self) -> bool {
        self.command
    }

    /// The same batch carrying `seal`.
    pub fn with_seal(mut self, seal: SignedHeader) -> Self {
        self.seal = Some(seal);
        self
    }

    /// The same batch without its ticket (as it is stored and read back).
    pub fn without_ticket(mut self) -> Self {
        self.ticket = None;
        self
    }

    /// The same batch carrying `ticket`.
    pub fn with_ticket(mut self, ticket: SealTicket) -> Self {
        self.ticket = Some(ticket);
        self
    }

    /// The leader's signed header, once the batch is in a leader's log.
    pub fn seal(&self) -> Option<&SignedHeader> {
        self.seal.as_ref()
    }

    /// The preconfirmation ticket, on the leader before append.
    pub fn ticket(&self) -> Option<&SealTicket> {
        self.ticket.as_ref()
    }

    /// The encoded batch.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Length of the encoded batch, in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True if the buffer is empty (never a valid batch).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The shared buffer, e.g. to hand to the network without a copy.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// Validated in-place view of the batch (for bytes from disk or the network).
    pub fn batch(&self) -> Result<&ArchivedBatch, ModelError> {
        access_batch(&self.bytes)
    }
}

impl From<Bytes> for BatchBytes {
    fn from(bytes: Bytes) -> Self {
        Self {
            footprint: bytes.len(),
            bytes,
            seal: None,
            ticket: None,
            command: false,
        }
    }
}

/// Equal bytes and seal (the ticket is a process-local notice, not part of the value).
impl PartialEq for BatchBytes {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes && self.seal == other.seal && self.command == other.command
    }
}

impl Eq for BatchBytes {}

impl fmt::Debug for BatchBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.command {
            return write!(f, "Command({} bytes)", self.bytes.len());
        }
        match &self.seal {
            Some(s) => write!(
                f,
                "BatchBytes({} bytes, sealed at {}/{})",
                self.bytes.len(),
                s.header.term,
                s.header.index
            ),
            None => write!(f, "BatchBytes({} bytes)", self.bytes.len()),
        }
    }
}

/// openraft logs requests with `Display`; a batch shows as its size only.
impl fmt::Display for BatchBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.command {
            true => write!(f, "command of {} bytes", self.bytes.len()),
            false => write!(f, "batch of {} bytes", self.bytes.len()),
        }
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
    /// The leader's signed header of the batch (`None` if its leader had no key).
    pub seal: Option<SignedHeader>,
    /// For a control command: what it did, or why every node rejected it.
    pub command: Option<Result<crate::sequencer::CommandApplied, crate::command::CommandRejection>>,
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
