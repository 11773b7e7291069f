//! Raft RPC bodies on the wire: pure encoders and decoders, no I/O (`docs/protocol.md` has the
//! byte layouts).
//!
//! An entry travels exactly as its WAL payload (`log_store::encode_entry`): a 16-byte prefix,
//! then the batch bytes, the membership encoding or nothing. [`encode_append`] hands the batch
//! bytes out as chunks that share the entries' buffers, so a batch is written to the socket
//! without a copy; [`decode_append`] copies each batch once, into an aligned buffer the entry
//! owns. All integers are little-endian; a vote is `[u64 term][u64 voted_for][u8 committed]`, a
//! log id as in `encode_log_id` (`[u8 present]`, then `[u64 term][u64 index]` when present).

use bytes::Bytes;
use openraft::raft::{
    AppendEntriesRequest, SnapshotResponse, StreamAppendError, StreamAppendResult,
    TransferLeaderError, TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::EntryPayload;

use super::log_store::{
    decode_entry, decode_log_id, decode_membership, encode_entry_prefix, encode_log_id,
    encode_membership, entry_head_len, CodecError, Reader, Vote, ENTRY_PREFIX_BYTES,
};
use super::state_machine::{SnapshotMeta, StoredMembership};
use super::types::{LogId, TypeConfig};

/// Most entries in one AppendEntries body.
pub const APPEND_ENTRIES_MAX: usize = 4096;
/// Bytes of entries one append request carries at most; the node configuration limits
/// openraft's entries per request (`max_payload_entries`) so that requests stay below it.
pub const APPEND_BYTES_MAX: usize = 32 << 20;
/// Largest snapshot a node sends or accepts, in bytes.
pub const SNAPSHOT_BYTES_MAX: u64 = 1 << 30;
/// Largest snapshot data chunk a sender puts in one frame, in bytes.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 1 << 20;
/// Longest remote error message, in bytes; longer ones are cut (at a char boundary) when encoded.
pub const ERROR_BYTES_MAX: usize = 4096;

/// Bytes before each entry's payload: `[u64 term][u64 index][u32 payload_len]`.
pub const ENTRY_HEADER_BYTES: usize = 20;

const APPEND_OK: u8 = 0;
const APPEND_CONFLICT: u8 = 1;
const APPEND_HIGHER_VOTE: u8 = 2;
const REMOTE_ERROR_APPEND: u8 = 3;
const RESPONSE_OK: u8 = 0;
const REMOTE_ERROR: u8 = 1;

/// Why a Raft RPC body could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A field (log id, membership, length) could not be read or written.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// An entry's WAL payload could not be encoded or decoded.
    #[error("entry {index}: {source}")]
    Entry {
        /// Raft index of the entry.
        index: u64,
        /// What is wrong.
        #[source]
        source: CodecError,
    },
    /// More entries than [`APPEND_ENTRIES_MAX`].
    #[error("{count} entries in one append, max {max}")]
    TooManyEntries {
        /// Entries announced or given.
        count: u64,
        /// [`APPEND_ENTRIES_MAX`].
        max: usize,
    },
    /// A count whose smallest encoding is longer than the bytes left.
    #[error("{what}: {count} items need at least {need} bytes, {have} left")]
    CountExceedsBody {
        /// What was counted.
        what: &'static str,
        /// The count.
        count: u64,
        /// Bytes the count needs at least.
        need: u64,
        /// Bytes left.
        have: usize,
    },
    /// An entry payload longer than a `u32` length can say.
    #[error("entry {index}: payload of {len} bytes exceeds {max}")]
    EntryTooLarge {
        /// Raft index of the entry.
        index: u64,
        /// Payload length in bytes.
        len: usize,
        /// `u32::MAX`.
        max: u64,
    },
    /// Entries whose indices do not follow `prev_log_id` one by one.
    #[error("append entry has index {got}, expected {expected}")]
    NonContiguous {
        /// Index that follows the previous one.
        expected: u64,
        /// Index found.
        got: u64,
    },
    /// A tag byte that names no variant.
    #[error("{what}: unknown tag {value}")]
    BadTag {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u8,
    },
    /// A snapshot over [`SNAPSHOT_BYTES_MAX`].
    #[error("snapshot of {len} bytes exceeds the maximum {max}")]
    SnapshotTooLarge {
        /// Announced length in bytes.
        len: u64,
        /// [`SNAPSHOT_BYTES_MAX`].
        max: u64,
    },
    /// A remote error message over [`ERROR_BYTES_MAX`].
    #[error("remote error message of {len} bytes exceeds {max}")]
    ErrorTooLong {
        /// Announced length in bytes.
        len: u64,
        /// [`ERROR_BYTES_MAX`].
        max: usize,
    },
    /// A remote error message that is not UTF-8.
    #[error("remote error message is not UTF-8")]
    ErrorNotUtf8,
}

// ---------------------------------------------------------------------------------------------
// Shared fields

fn encode_vote(vote: &Vote, out: &mut Vec<u8>) {
    out.extend_from_slice(&vote.leader_id.term.to_le_bytes());
    out.extend_from_slice(&vote.leader_id.voted_for.to_le_bytes());
    out.push(u8::from(vote.committed));
}

fn decode_vote(r: &mut Reader<'_>) -> Result<Vote, WireError> {
    let term = r.u64()?;
    let voted_for = r.u64()?;
    let committed = r.flag("vote committed")?;
    let mut vote = Vote::new(term, voted_for);
    vote.committed = committed;
    Ok(vote)
}

fn encode_some_log_id(log_id: &LogId, out: &mut Vec<u8>) {
    out.extend_from_slice(&log_id.leader_id.term.to_le_bytes());
    out.extend_from_slice(&log_id.index.to_le_bytes());
}

fn decode_some_log_id(r: &mut Reader<'_>) -> Result<LogId, WireError> {
    let term = r.u64()?;
    let index = r.u64()?;
    Ok(LogId::new_term_index(term, index))
}

/// Appends `[u32 len][utf-8]`, cut to at most [`ERROR_BYTES_MAX`] bytes at a char boundary.
fn encode_error(message: &str, out: &mut Vec<u8>) {
    let mut len = message.len().min(ERROR_BYTES_MAX);
    while !message.is_char_boundary(len) {
        len -= 1;
    }
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&message.as_bytes()[..len]);
}

fn decode_error(r: &mut Reader<'_>) -> Result<String, WireError> {
    let len = r.u32()?;
    if len as usize > ERROR_BYTES_MAX {
        return Err(WireError::ErrorTooLong {
            len: u64::from(len),
            max: ERROR_BYTES_MAX,
        });
    }
    let bytes = r.take(len as usize)?;
    let s = std::str::from_utf8(bytes).map_err(|_| WireError::ErrorNotUtf8)?;
    Ok(s.to_owned())
}

/// Checks that nothing follows a decoded `value`.
fn finish<T>(r: Reader<'_>, value: T) -> Result<T, WireError> {
    r.finish()?;
    Ok(value)
}

// ---------------------------------------------------------------------------------------------
// AppendEntries

/// Moves `pending` into `chunks` as one chunk, if it holds anything.
fn flush(pending: &mut Vec<u8>, chunks: &mut Vec<Bytes>) {
    if !pending.is_empty() {
        chunks.push(Bytes::from(std::mem::take(pending)));
    }
}

/// Encodes an AppendEntries body as chunks whose concatenation is the body:
/// `[vote][prev_log_id][leader_commit][u32 n]`, then per entry
/// `[u64 term][u64 index][u32 payload_len][WAL payload]`.
///
/// A normal entry's batch is its own chunk sharing the entry's buffer (no copy); headers,
/// prefixes and membership payloads are coalesced into the chunks between batches.
pub fn encode_append(req: &AppendEntriesRequest<TypeConfig>) -> Result<Vec<Bytes>, WireError> {
    let n = req.entries.len();
    if n > APPEND_ENTRIES_MAX {
        return Err(WireError::TooManyEntries {
            count: n as u64,
            max: APPEND_ENTRIES_MAX,
        });
    }
    let mut chunks = Vec::with_capacity(2 * n + 1);
    let mut pending = Vec::with_capacity(64 + n * (ENTRY_HEADER_BYTES + ENTRY_PREFIX_BYTES));
    encode_vote(&req.vote, &mut pending);
    encode_log_id(req.prev_log_id.as_ref(), &mut pending);
    encode_log_id(req.leader_commit.as_ref(), &mut pending);
    pending.extend_from_slice(&(n as u32).to_le_bytes());
    for entry in &req.entries {
        let index = entry.log_id.index;
        encode_some_log_id(&entry.log_id, &mut pending);
        // The payload length is patched in once the payload is written (or known).
        let len_at = pending.len();
        pending.extend_from_slice(&0u32.to_le_bytes());
        let prefix_at = pending.len();
        encode_entry_prefix(&entry.payload, &mut pending);
        let payload_len = match &entry.payload {
            EntryPayload::Blank => ENTRY_PREFIX_BYTES,
            EntryPayload::Membership(m) => {
                encode_membership(m, &mut pending)
                    .map_err(|source| WireError::Entry { index, source })?;
                pending.len() - prefix_at
            }
            EntryPayload::Normal(batch) => entry_head_len(&entry.payload) + batch.len(),
        };
        let len = u32::try_from(payload_len).map_err(|_| WireError::EntryTooLarge {
            index,
            len: payload_len,
            max: u64::from(u32::MAX),
        })?;
        pending[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
        if let EntryPayload::Normal(batch) = &entry.payload {
            flush(&mut pending, &mut chunks);
            if !batch.is_empty() {
                chunks.push(batch.clone().into_bytes());
            }
        }
    }
    flush(&mut pending, &mut chunks);
    Ok(chunks)
}

/// Decodes an AppendEntries body; each entry's batch is copied once, into an aligned buffer.
pub fn decode_append(body: &[u8]) -> Result<AppendEntriesRequest<TypeConfig>, WireError> {
    let mut r = Reader::new(body, "append entries");
    let vote = decode_vote(&mut r)?;
    let prev_log_id = decode_log_id(&mut r)?;
    let leader_commit = decode_log_id(&mut r)?;
    let n = r.u32()?;
    if n as usize > APPEND_ENTRIES_MAX {
        return Err(WireError::TooManyEntries {
            count: u64::from(n),
            max: APPEND_ENTRIES_MAX,
        });
    }
    let rest = r.rest();
    let need = u64::from(n) * (ENTRY_HEADER_BYTES + ENTRY_PREFIX_BYTES) as u64;
    if need > rest.len() as u64 {
        return Err(WireError::CountExceedsBody {
            what: "append entries",
            count: u64::from(n),
            need,
            have: rest.len(),
        });
    }
    let mut r = Reader::new(rest, "append entries list");
    let mut expected = prev_log_id.map_or(Some(0), |p| p.index.checked_add(1));
    let mut entries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let term = r.u64()?;
        let index = r.u64()?;
        match expected {
            Some(e) if e == index => {}
            // `None`: the previous index was `u64::MAX`, so no index can follow.
            _ => {
                return Err(WireError::NonContiguous {
                    expected: expected.unwrap_or(u64::MAX),
                    got: index,
                })
            }
        }
        expected = index.checked_add(1);
        let len = r.u32()? as usize;
        let payload = r.take(len)?;
        let entry = decode_entry(index, term, payload)
            .map_err(|source| WireError::Entry { index, source })?;
        entries.push(entry);
    }
    r.finish()?;
    Ok(AppendEntriesRequest {
        vote,
        prev_log_id,
        entries,
        leader_commit,
    })
}

/// Appends a stream-append result: `[u8 0][log id]` (matched up to), `[u8 1][u64 term][u64
/// index]` (conflict), `[u8 2][vote]` (higher vote) or `[u8 3][u32 len][utf-8]` (remote fatal
/// error).
pub fn encode_append_result(r: &Result<StreamAppendResult<TypeConfig>, String>, out: &mut Vec<u8>) {
    match r {
        Ok(Ok(matched)) => {
            out.push(APPEND_OK);
            encode_log_id(matched.as_ref(), out);
        }
        Ok(Err(StreamAppendError::Conflict(log_id))) => {
            out.push(APPEND_CONFLICT);
            encode_some_log_id(log_id, out);
        }
        Ok(Err(StreamAppendError::HigherVote(vote))) => {
            out.push(APPEND_HIGHER_VOTE);
            encode_vote(vote, out);
        }
        Err(message) => {
            out.push(REMOTE_ERROR_APPEND);
            encode_error(message, out);
        }
    }
}

/// Decodes what [`encode_append_result`] wrote.
pub fn decode_append_result(
    body: &[u8],
) -> Result<Result<StreamAppendResult<TypeConfig>, String>, WireError> {
    let mut r = Reader::new(body, "append result");
    let value = match r.u8()? {
        APPEND_OK => Ok(Ok(decode_log_id(&mut r)?)),
        APPEND_CONFLICT => Ok(Err(StreamAppendError::Conflict(decode_some_log_id(
            &mut r,
        )?))),
        APPEND_HIGHER_VOTE => Ok(Err(StreamAppendError::HigherVote(decode_vote(&mut r)?))),
        REMOTE_ERROR_APPEND => Err(decode_error(&mut r)?),
        value => {
            return Err(WireError::BadTag {
                what: "append result",
                value,
            })
        }
    };
    finish(r, value)
}

// ---------------------------------------------------------------------------------------------
// Vote

/// Appends a vote request: `[vote][last_log_id][u8 leadership_transfer]`.
pub fn encode_vote_request(req: &VoteRequest<TypeConfig>, out: &mut Vec<u8>) {
    encode_vote(&req.vote, out);
    encode_log_id(req.last_log_id.as_ref(), out);
    out.push(u8::from(req.leadership_transfer));
}

/// Decodes what [`encode_vote_request`] wrote.
pub fn decode_vote_request(body: &[u8]) -> Result<VoteRequest<TypeConfig>, WireError> {
    let mut r = Reader::new(body, "vote request");
    let vote = decode_vote(&mut r)?;
    let last_log_id = decode_log_id(&mut r)?;
    let mut req = VoteRequest::new(vote, last_log_id);
    req.leadership_transfer = r.flag("leadership transfer")?;
    finish(r, req)
}

/// Appends a vote response: `[u8 0][vote][u8 granted][last_log_id]` or `[u8 1][u32 len][utf-8]`
/// (remote fatal error).
pub fn encode_vote_response(r: &Result<VoteResponse<TypeConfig>, String>, out: &mut Vec<u8>) {
    match r {
        Ok(resp) => {
            out.push(RESPONSE_OK);
            encode_vote(&resp.vote, out);
            out.push(u8::from(resp.vote_granted));
            encode_log_id(resp.last_log_id.as_ref(), out);
        }
        Err(message) => {
            out.push(REMOTE_ERROR);
            encode_error(message, out);
        }
    }
}

/// Decodes what [`encode_vote_response`] wrote.
pub fn decode_vote_response(
    body: &[u8],
) -> Result<Result<VoteResponse<TypeConfig>, String>, WireError> {
    let mut r = Reader::new(body, "vote response");
    let value = match r.u8()? {
        RESPONSE_OK => {
            let vote = decode_vote(&mut r)?;
            let granted = r.flag("vote granted")?;
            let last_log_id = decode_log_id(&mut r)?;
            Ok(VoteResponse::new(vote, last_log_id, granted))
        }
        REMOTE_ERROR => Err(decode_error(&mut r)?),
        value => {
            return Err(WireError::BadTag {
                what: "vote response",
                value,
            })
        }
    };
    finish(r, value)
}

// ---------------------------------------------------------------------------------------------
// Transfer leader

const TRANSFER_VOTE_CHANGED: u8 = 2;
const TRANSFER_LOG_NOT_FLUSHED: u8 = 3;

/// Appends a transfer-leader request: `[from_leader vote][u64 to][last_log_id]`.
pub fn encode_transfer_leader_request(req: &TransferLeaderRequest<TypeConfig>, out: &mut Vec<u8>) {
    encode_vote(req.from_leader(), out);
    out.extend_from_slice(&req.to_node_id().to_le_bytes());
    encode_log_id(req.last_log_id(), out);
}

/// Decodes what [`encode_transfer_leader_request`] wrote.
pub fn decode_transfer_leader_request(
    body: &[u8],
) -> Result<TransferLeaderRequest<TypeConfig>, WireError> {
    let mut r = Reader::new(body, "transfer leader request");
    let from = decode_vote(&mut r)?;
    let to = r.u64()?;
    let last_log_id = decode_log_id(&mut r)?;
    finish(r, TransferLeaderRequest::new(from, to, last_log_id))
}

/// Appends a transfer-leader response: `[u8 0]` accepted, `[u8 2][vote expected][vote actual]`
/// refused (vote changed), `[u8 3][log id expected][log id actual]` refused (log not flushed),
/// or `[u8 1][u32 len][utf-8]` (remote fatal error).
pub fn encode_transfer_leader_response(
    r: &Result<TransferLeaderResponse<TypeConfig>, String>,
    out: &mut Vec<u8>,
) {
    match r {
        Ok(Ok(())) => out.push(RESPONSE_OK),
        Ok(Err(TransferLeaderError::VoteChanged { expected, actual })) => {
            out.push(TRANSFER_VOTE_CHANGED);
            encode_vote(expected, out);
            encode_vote(actual, out);
        }
        Ok(Err(TransferLeaderError::LogNotFlushed { expected, actual })) => {
            out.push(TRANSFER_LOG_NOT_FLUSHED);
            encode_log_id(expected.as_ref(), out);
            encode_log_id(actual.as_ref(), out);
        }
        Err(message) => {
            out.push(REMOTE_ERROR);
            encode_error(message, out);
        }
    }
}

/// Decodes what [`encode_transfer_leader_response`] wrote.
pub fn decode_transfer_leader_response(
    body: &[u8],
) -> Result<Result<TransferLeaderResponse<TypeConfig>, String>, WireError> {
    let mut r = Reader::new(body, "transfer leader response");
    let value = match r.u8()? {
        RESPONSE_OK => Ok(Ok(())),
        TRANSFER_VOTE_CHANGED => Ok(Err(TransferLeaderError::VoteChanged {
            expected: decode_vote(&mut r)?,
            actual: decode_vote(&mut r)?,
        })),
        TRANSFER_LOG_NOT_FLUSHED => Ok(Err(TransferLeaderError::LogNotFlushed {
            expected: decode_log_id(&mut r)?,
            actual: decode_log_id(&mut r)?,
        })),
        REMOTE_ERROR => Err(decode_error(&mut r)?),
        value => {
            return Err(WireError::BadTag {
                what: "transfer leader response",
                value,
            })
        }
    };
    finish(r, value)
}

// ---------------------------------------------------------------------------------------------
// Snapshot

/// Appends a snapshot header: `[vote][last_log_id][membership log id][membership][u64
/// data_len]`; the data follows in `data_len` bytes of chunk frames.
///
/// Refuses a snapshot over [`SNAPSHOT_BYTES_MAX`] or a membership `decode_membership` would
/// refuse; `out` may then hold a partial header.
pub fn encode_snapshot_header(
    vote: &Vote,
    meta: &SnapshotMeta,
    data_len: u64,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    check_snapshot_len(data_len)?;
    encode_vote(vote, out);
    encode_log_id(meta.last_log_id.as_ref(), out);
    encode_log_id(meta.last_membership.log_id().as_ref(), out);
    encode_membership(meta.last_membership.membership(), out)?;
    out.extend_from_slice(&data_len.to_le_bytes());
    Ok(())
}

fn check_snapshot_len(len: u64) -> Result<(), WireError> {
    if len > SNAPSHOT_BYTES_MAX {
        return Err(WireError::SnapshotTooLarge {
            len,
            max: SNAPSHOT_BYTES_MAX,
        });
    }
    Ok(())
}

/// Decodes what [`encode_snapshot_header`] wrote: the sender's vote, the snapshot's meta and
/// the length of the data to follow (at most [`SNAPSHOT_BYTES_MAX`]).
pub fn decode_snapshot_header(body: &[u8]) -> Result<(Vote, SnapshotMeta, u64), WireError> {
    let mut r = Reader::new(body, "snapshot header");
    let vote = decode_vote(&mut r)?;
    let last_log_id = decode_log_id(&mut r)?;
    let membership_log_id = decode_log_id(&mut r)?;
    let membership = decode_membership(&mut r)?;
    let data_len = r.u64()?;
    check_snapshot_len(data_len)?;
    let meta = SnapshotMeta {
        last_log_id,
        last_membership: StoredMembership::new(membership_log_id, membership),
    };
    finish(r, (vote, meta, data_len))
}

/// Appends a snapshot response: `[u8 0][vote]` or `[u8 1][u32 len][utf-8]` (remote error).
pub fn encode_snapshot_response(
    r: &Result<SnapshotResponse<TypeConfig>, String>,
    out: &mut Vec<u8>,
) {
    match r {
        Ok(resp) => {
            out.push(RESPONSE_OK);
            encode_vote(&resp.vote, out);
        }
        Err(message) => {
            out.push(REMOTE_ERROR);
            encode_error(message, out);
        }
    }
}

/// Decodes what [`encode_snapshot_response`] wrote.
pub fn decode_snapshot_response(
    body: &[u8],
) -> Result<Result<SnapshotResponse<TypeConfig>, String>, WireError> {
    let mut r = Reader::new(body, "snapshot response");
    let value = match r.u8()? {
        RESPONSE_OK => Ok(SnapshotResponse::new(decode_vote(&mut r)?)),
        REMOTE_ERROR => Err(decode_error(&mut r)?),
        value => {
            return Err(WireError::BadTag {
                what: "snapshot response",
                value,
            })
        }
    };
    finish(r, value)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::entry::RaftEntry;
    use openraft::BasicNode;
    use proptest::prelude::*;

    use super::*;
    use crate::batch::{encode_batch, Batch, BatchHeader};
    use crate::raft::log_store::{encode_entry, Membership};
    use crate::raft::types::{BatchBytes, Entry};
    use crate::tx::Transaction;
    use crate::tx_kind::TxKind;

    fn membership(configs: Vec<Vec<u64>>, learners: &[(u64, &str)]) -> Membership {
        let mut nodes: BTreeMap<u64, BasicNode> = configs
            .iter()
            .flatten()
            .map(|id| (*id, BasicNode::new(format!("10.0.0.{id}:7000"))))
            .collect();
        for (id, addr) in learners {
            nodes.insert(*id, BasicNode::new(*addr));
        }
        let configs = configs
            .into_iter()
            .map(|c| c.into_iter().collect())
            .collect();
        Membership::new(configs, nodes).unwrap()
    }

    fn batch_bytes(index: u64) -> BatchBytes {
        let mut batch = Batch {
            header: BatchHeader {
                term: 2,
                index,
                prev_batch_hash: [1; 32],
                tx_merkle_root: [0; 32],
                tx_count: 1,
                timestamp_us: 5,
            },
            txs: vec![Transaction {
                rollup_id: 3,
                kind: TxKind::Raw,
                bytes: vec![7; 33],
            }],
        };
        batch.header.tx_merkle_root = batch.compute_tx_merkle_root();
        BatchBytes::from_aligned(encode_batch(&batch).unwrap())
    }

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new_term_index(term, index)
    }

    fn committed_vote(term: u64, node: u64) -> Vote {
        Vote::new_committed(term, node)
    }

    /// An append of every entry kind, a joint membership among them.
    fn sample_append() -> AppendEntriesRequest<TypeConfig> {
        let joint = membership(vec![vec![1, 2, 3], vec![3, 4]], &[(9, "learner:1")]);
        AppendEntriesRequest {
            vote: committed_vote(3, 1),
            prev_log_id: Some(log_id(2, 4)),
            entries: vec![
                Entry::new_membership(log_id(3, 5), joint),
                Entry::new_normal(log_id(3, 6), batch_bytes(6)),
                Entry::new_blank(log_id(3, 7)),
                Entry::new_normal(log_id(3, 8), batch_bytes(8)),
            ],
            leader_commit: Some(log_id(3, 5)),
        }
    }

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new(1, 2),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        }
    }

    fn concat(chunks: &[Bytes]) -> Vec<u8> {
        chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    fn assert_append_eq(
        a: &AppendEntriesRequest<TypeConfig>,
        b: &AppendEntriesRequest<TypeConfig>,
    ) {
        assert_eq!(a.vote, b.vote);
        assert_eq!(a.prev_log_id, b.prev_log_id);
        assert_eq!(a.leader_commit, b.leader_commit);
        assert_eq!(a.entries, b.entries);
    }

    fn snapshot_meta() -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(log_id(4, 100)),
            last_membership: StoredMembership::new(
                Some(log_id(3, 5)),
                membership(vec![vec![1, 2, 3], vec![3, 4]], &[(9, "learner:1")]),
            ),
        }
    }

    fn append_results() -> Vec<Result<StreamAppendResult<TypeConfig>, String>> {
        vec![
            Ok(Ok(Some(log_id(3, 8)))),
            Ok(Ok(None)),
            Ok(Err(StreamAppendError::Conflict(log_id(2, 4)))),
            Ok(Err(StreamAppendError::HigherVote(committed_vote(5, 2)))),
            Err("raft stopped: storage error".to_owned()),
        ]
    }

    fn vote_responses() -> Vec<Result<VoteResponse<TypeConfig>, String>> {
        vec![
            Ok(VoteResponse::new(Vote::new(4, 2), Some(log_id(3, 8)), true)),
            Ok(VoteResponse::new(committed_vote(5, 3), None, false)),
            Err("fatal: panicked".to_owned()),
        ]
    }

    fn snapshot_responses() -> Vec<Result<SnapshotResponse<TypeConfig>, String>> {
        vec![
            Ok(SnapshotResponse::new(committed_vote(4, 1))),
            Err(String::new()),
        ]
    }

    /// Every valid encoding of every message, with a decoder that checks it.
    /// A message name, a valid body, and a decoder that says whether bytes decode.
    type Case = (&'static str, Vec<u8>, fn(&[u8]) -> bool);

    fn valid_bodies() -> Vec<Case> {
        let mut out: Vec<Case> = Vec::new();
        for req in [sample_append(), heartbeat()] {
            let body = concat(&encode_append(&req).unwrap());
            out.push(("append", body, |b| decode_append(b).is_ok()));
        }
        for r in append_results() {
            let mut body = Vec::new();
            encode_append_result(&r, &mut body);
            out.push(("append result", body, |b| decode_append_result(b).is_ok()));
        }
        let mut req = VoteRequest::new(Vote::new(4, 2), Some(log_id(3, 8)));
        req.leadership_transfer = true;
        for req in [req, VoteRequest::new(Vote::new(1, 1), None)] {
            let mut body = Vec::new();
            encode_vote_request(&req, &mut body);
            out.push(("vote request", body, |b| decode_vote_request(b).is_ok()));
        }
        for r in vote_responses() {
            let mut body = Vec::new();
            encode_vote_response(&r, &mut body);
            out.push(("vote response", body, |b| decode_vote_response(b).is_ok()));
        }
        let mut body = Vec::new();
        encode_snapshot_header(&committed_vote(4, 1), &snapshot_meta(), 1234, &mut body).unwrap();
        out.push(("snapshot header", body, |b| {
            decode_snapshot_header(b).is_ok()
        }));
        for r in snapshot_responses() {
            let mut body = Vec::new();
            encode_snapshot_response(&r, &mut body);
            out.push(("snapshot response", body, |b| {
                decode_snapshot_response(b).is_ok()
            }));
        }
        out
    }

    #[test]
    fn append_round_trips_every_entry_kind() {
        for req in [sample_append(), heartbeat()] {
            let body = concat(&encode_append(&req).unwrap());
            assert_append_eq(&decode_append(&body).unwrap(), &req);
        }
        // A decoded batch sits in its own aligned buffer and is a valid batch.
        let back = decode_append(&concat(&encode_append(&sample_append()).unwrap())).unwrap();
        let EntryPayload::Normal(batch) = &back.entries[1].payload else {
            panic!("normal entry expected, got {}", back.entries[1].payload);
        };
        assert_eq!(batch.as_bytes().as_ptr() as usize % 16, 0);
        assert_eq!(batch.batch().unwrap().header.index, 6);
    }

    #[test]
    fn entries_travel_as_their_wal_payload() {
        let req = sample_append();
        let body = concat(&encode_append(&req).unwrap());
        let mut r = Reader::new(&body, "test");
        decode_vote(&mut r).unwrap();
        decode_log_id(&mut r).unwrap();
        decode_log_id(&mut r).unwrap();
        assert_eq!(r.u32().unwrap() as usize, req.entries.len());
        let mut wal = Vec::new();
        for entry in &req.entries {
            assert_eq!(r.u64().unwrap(), entry.log_id.leader_id.term);
            assert_eq!(r.u64().unwrap(), entry.index());
            let len = r.u32().unwrap() as usize;
            encode_entry(entry, &mut wal).unwrap();
            assert_eq!(r.take(len).unwrap(), &wal[..], "entry {}", entry.index());
        }
        r.finish().unwrap();
    }

    #[test]
    fn batch_chunks_share_the_entry_buffers() {
        let req = sample_append();
        let chunks = encode_append(&req).unwrap();
        let batches: Vec<&Bytes> = req
            .entries
            .iter()
            .filter_map(|e| match &e.payload {
                EntryPayload::Normal(b) => Some(b.as_bytes().as_ptr()),
                _ => None,
            })
            .map(|ptr| {
                chunks
                    .iter()
                    .find(|c| c.as_ptr() == ptr)
                    .expect("a chunk is the entry's buffer")
            })
            .collect();
        assert_eq!(batches.len(), 2);
        // Small bits are coalesced: [append header, membership entry, header and prefix of
        // entry 6], [batch 6], [blank entry 7, header and prefix of entry 8], [batch 8].
        assert_eq!(chunks.len(), 4);
        assert_eq!(chunks[1].as_ptr(), batches[0].as_ptr());
        assert_eq!(chunks[3].as_ptr(), batches[1].as_ptr());
    }

    #[test]
    fn responses_round_trip() {
        for r in append_results() {
            let mut body = Vec::new();
            encode_append_result(&r, &mut body);
            assert_eq!(decode_append_result(&body).unwrap(), r);
        }

        let mut req = VoteRequest::new(committed_vote(4, 2), Some(log_id(3, 8)));
        req.leadership_transfer = true;
        for req in [req, VoteRequest::new(Vote::new(1, 1), None)] {
            let mut body = Vec::new();
            encode_vote_request(&req, &mut body);
            assert_eq!(decode_vote_request(&body).unwrap(), req);
        }

        for r in vote_responses() {
            let mut body = Vec::new();
            encode_vote_response(&r, &mut body);
            assert_eq!(decode_vote_response(&body).unwrap(), r);
        }

        for r in snapshot_responses() {
            let mut body = Vec::new();
            encode_snapshot_response(&r, &mut body);
            assert_eq!(decode_snapshot_response(&body).unwrap(), r);
        }

        for req in [
            TransferLeaderRequest::new(committed_vote(4, 2), 3, Some(log_id(4, 90))),
            TransferLeaderRequest::new(Vote::new(1, 1), 2, None),
        ] {
            let mut body = Vec::new();
            encode_transfer_leader_request(&req, &mut body);
            let back = decode_transfer_leader_request(&body).unwrap();
            assert_eq!(
                (back.from_leader(), back.to_node_id(), back.last_log_id()),
                (req.from_leader(), req.to_node_id(), req.last_log_id())
            );
        }
        for r in [
            Ok(Ok(())),
            Ok(Err(TransferLeaderError::VoteChanged {
                expected: committed_vote(4, 2),
                actual: Vote::new(5, 3),
            })),
            Ok(Err(TransferLeaderError::LogNotFlushed {
                expected: Some(log_id(4, 90)),
                actual: None,
            })),
            Err("stopped".to_string()),
        ] {
            let mut body = Vec::new();
            encode_transfer_leader_response(&r, &mut body);
            assert_eq!(decode_transfer_leader_response(&body).unwrap(), r);
        }
    }

    #[test]
    fn snapshot_headers_round_trip() {
        let empty = SnapshotMeta {
            last_log_id: None,
            last_membership: StoredMembership::default(),
        };
        for (meta, len) in [(snapshot_meta(), 0), (empty, SNAPSHOT_BYTES_MAX)] {
            let vote = committed_vote(7, 3);
            let mut body = Vec::new();
            encode_snapshot_header(&vote, &meta, len, &mut body).unwrap();
            assert_eq!(decode_snapshot_header(&body).unwrap(), (vote, meta, len));
        }
    }

    #[test]
    fn prefixes_and_trailing_bytes_are_errors() {
        for (what, body, decodes) in valid_bodies() {
            assert!(decodes(&body), "{what}: valid body must decode");
            for end in 0..body.len() {
                assert!(
                    !decodes(&body[..end]),
                    "{what}: prefix of {end} bytes decoded"
                );
            }
            let mut long = body.clone();
            long.push(0);
            assert!(!decodes(&long), "{what}: trailing byte accepted");
        }
    }

    #[test]
    fn bad_bodies_get_typed_errors() {
        // A count far over the limit is refused before anything is allocated.
        let mut body = Vec::new();
        encode_vote(&Vote::new(1, 1), &mut body);
        body.extend_from_slice(&[0, 0]);
        let mut huge = body.clone();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_append(&huge),
            Err(WireError::TooManyEntries { count, max: APPEND_ENTRIES_MAX }) if count == u64::from(u32::MAX)
        ));
        let mut short = body.clone();
        short.extend_from_slice(&4096u32.to_le_bytes());
        assert!(matches!(
            decode_append(&short),
            Err(WireError::CountExceedsBody {
                count: 4096,
                have: 0,
                ..
            })
        ));

        // Entries must follow prev_log_id one by one.
        let mut req = sample_append();
        req.prev_log_id = Some(log_id(2, 3));
        let body = concat(&encode_append(&req).unwrap());
        assert!(matches!(
            decode_append(&body),
            Err(WireError::NonContiguous {
                expected: 4,
                got: 5
            })
        ));
        let mut req = sample_append();
        req.entries.swap(1, 2);
        let body = concat(&encode_append(&req).unwrap());
        assert!(matches!(
            decode_append(&body),
            Err(WireError::NonContiguous {
                expected: 6,
                got: 7
            })
        ));

        let mut req = heartbeat();
        req.entries = (0..=APPEND_ENTRIES_MAX as u64)
            .map(|i| Entry::new_blank(log_id(1, i)))
            .collect();
        assert!(matches!(
            encode_append(&req),
            Err(WireError::TooManyEntries { count: 4097, .. })
        ));

        assert!(matches!(
            decode_append_result(&[9]),
            Err(WireError::BadTag { value: 9, .. })
        ));
        assert!(matches!(
            decode_vote_response(&[2]),
            Err(WireError::BadTag { value: 2, .. })
        ));

        let too_large = SNAPSHOT_BYTES_MAX + 1;
        assert!(matches!(
            encode_snapshot_header(&Vote::new(1, 1), &snapshot_meta(), too_large, &mut Vec::new()),
            Err(WireError::SnapshotTooLarge { len, .. }) if len == too_large
        ));
        let mut body = Vec::new();
        encode_snapshot_header(&Vote::new(1, 1), &snapshot_meta(), 0, &mut body).unwrap();
        let at = body.len() - 8;
        body[at..].copy_from_slice(&too_large.to_le_bytes());
        assert!(matches!(
            decode_snapshot_header(&body),
            Err(WireError::SnapshotTooLarge { len, .. }) if len == too_large
        ));

        let mut body = vec![REMOTE_ERROR];
        body.extend_from_slice(&(ERROR_BYTES_MAX as u32 + 1).to_le_bytes());
        assert!(matches!(
            decode_snapshot_response(&body),
            Err(WireError::ErrorTooLong { len: 4097, .. })
        ));
        let mut body = vec![REMOTE_ERROR, 2, 0, 0, 0, 0xff, 0xfe];
        assert!(matches!(
            decode_vote_response(&body),
            Err(WireError::ErrorNotUtf8)
        ));
        body[0] = 7;
        assert!(matches!(
            decode_snapshot_response(&body),
            Err(WireError::BadTag { value: 7, .. })
        ));
    }

    #[test]
    fn long_remote_errors_are_cut_at_a_char_boundary() {
        let message = "é".repeat(ERROR_BYTES_MAX); // 2 bytes each
        let mut body = Vec::new();
        encode_append_result(&Err(message.clone()), &mut body);
        let Err(back) = decode_append_result(&body).unwrap() else {
            panic!("remote error expected");
        };
        assert_eq!(back.len(), ERROR_BYTES_MAX);
        assert!(message.starts_with(&back));

        let message = format!("a{}", "é".repeat(ERROR_BYTES_MAX));
        let mut body = Vec::new();
        encode_vote_response(&Err(message.clone()), &mut body);
        let Err(back) = decode_vote_response(&body).unwrap() else {
            panic!("remote error expected");
        };
        assert_eq!(back.len(), ERROR_BYTES_MAX - 1);
        assert!(message.starts_with(&back));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// No decoder panics on arbitrary bytes, nor on a valid body with bytes flipped.
        #[test]
        fn decoding_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
            pick in any::<prop::sample::Index>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let _ = decode_append(&bytes);
            let _ = decode_append_result(&bytes);
            let _ = decode_vote_request(&bytes);
            let _ = decode_vote_response(&bytes);
            let _ = decode_transfer_leader_request(&bytes);
            let _ = decode_transfer_leader_response(&bytes);
            let _ = decode_snapshot_header(&bytes);
            let _ = decode_snapshot_response(&bytes);

            let bodies = valid_bodies();
            let (_, mut body, decodes) = bodies[pick.index(bodies.len())].clone();
            for (at, value) in flips {
                let i = at.index(body.len());
                body[i] = value;
            }
            let _ = decodes(&body);
            let _ = decode_append(&body);
        }
    }
}
