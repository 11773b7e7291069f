//! [`LogStore`]: openraft's log storage (`RaftLogStorage` + `RaftLogReader`) on [`baton_wal::Wal`].
//!
//! One Raft entry is one WAL record:
//!
//! - **Index.** openraft numbers the log from 0 (`Raft::initialize` writes its membership entry
//!   at index 0) but the WAL reserves index 0, so the record at WAL index `i + 1` holds Raft
//!   index `i` ([`wal_index`]). The record header's term is the entry's term (standard Raft
//!   leader ids: a log id is exactly `(term, index)`).
//! - **Payload.** A 16-byte prefix `[u8 kind][15 zero bytes]` (kinds: 1 blank, 2 unsigned
//!   batch, 3 membership, 4 signed batch, 5 control command), then: nothing for blank; the
//!   command's bytes ([`crate::command`]) for a command; for a signed batch the
//!   160-byte [`SignedHeader`] encoding; for either batch kind the batch bytes as they are (WAL
//!   payloads start 16-byte aligned, so the batch does too and is read in place); for
//!   membership, the hand-written encoding of [`encode_membership`]. The batch bytes are not
//!   validated here (the WAL's crc32 guards them; the state machine validates before it reads
//!   them).
//! - **Signing.** The leader seals batches here, in `append`: an unsigned batch appended in a term
//!   whose committed vote names this node gets its header completed (term and index from the
//!   log id, `prev_batch_hash` = digest of the last signed batch in the log, the wall-clock time,
//!   never earlier than that batch's) and signed with the node's key ([`LogStore::set_signer`]),
//!   and is stored, replicated and applied in that form; the batch's [`SealTicket`], if any, is
//!   fired once the WAL holds the entry (the preconfirmation). Replication and apply read entries
//!   back from this store, so no node ever sees the unsigned form of a leader's batch. A signed
//!   batch from the leader is stored as it is, after checking its header names its log id.
//!
//! The vote, the last committed log id and the last purged log id live in one small blob
//! ([`Wal::save_meta`]: written to a temporary file, fsynced, renamed; a crash leaves the old or
//! the new blob).
//!
//! | openraft call | WAL |
//! |---|---|
//! | `append(entries, cb)` | `append` per entry (buffered, readable at once); a task awaits `durable(last)`, then calls `cb` |
//! | `truncate_after(id)` | `truncate_after(wal_index(id))` (`truncate_after(0)` for `None`) |
//! | `purge(id)` | in the background: save `last_purged` in the meta blob, then `purge_through(wal_index(id))` (inline when it empties the log) |
//! | `save_vote` | `save_meta` |
//! | `save_committed` | in the background, every `COMMITTED_PERSIST_EVERY_ENTRIES` entries: `durable`, then `save_meta` |
//! | `get_log_state` | cached last log id (read from the last record at open) and the purge point asked for |
//! | `try_get_log_entries`, `limited_get_log_entries` | the recent-entries cache (the newest entries as appended, at most 64 MiB of batch allocations and 4,096 entries: replication and the apply share their bytes), else `read` per index |
//!
//! Every write openraft waits for waits for the flush callbacks of earlier appends first, so
//! those writes reach the disk in the order openraft issued them (e.g. a vote is never durable
//! before an earlier append). The committed id and the purge point are saved behind openraft's
//! back by one background writer (`Shared::write_behind`): openraft awaits both inline in its
//! core loop, and neither has to be durable when it returns.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::rc::Rc;

use baton_wal::{RecoveryReport, Wal, WalError, WalOptions};
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AsyncRuntime, BasicNode, EntryPayload, OptionalSend};
use rkyv::util::AlignedVec;

use super::runtime::{GlommioRuntime, JoinHandle};
use super::types::{BatchBytes, Entry, LogId, SealTicket, TypeConfig};
use crate::batch::{access_batch_unchecked, BatchHeader};
use crate::node::stages::{Stage, Stages};
use crate::receipt::{SignedHeader, SignedHeaderError, SIGNED_HEADER_BYTES};
use crate::sign::{NoncePool, Signer};

/// A vote of [`TypeConfig`].
pub type Vote = <TypeConfig as openraft::RaftTypeConfig>::Vote;

/// A membership config of [`TypeConfig`].
pub type Membership = openraft::Membership<u64, BasicNode>;

/// Bytes before every entry's payload in a WAL record.
pub const ENTRY_PREFIX_BYTES: usize = 16;

/// Most sub-configs in an encoded membership (a joint config has two).
pub const MEMBERSHIP_CONFIGS_MAX: usize = 8;
/// Most node ids in one sub-config, and most nodes in a membership.
pub const MEMBERSHIP_NODES_MAX: usize = 1024;
/// Longest node address, in bytes.
pub const NODE_ADDR_BYTES_MAX: usize = 1024;

/// Payload bytes `limited_get_log_entries` reads before it stops (at least one entry is read).
pub const READ_BYTES_MAX: usize = 16 << 20;

const KIND_BLANK: u8 = 1;
const KIND_NORMAL: u8 = 2;
const KIND_MEMBERSHIP: u8 = 3;
const KIND_SIGNED: u8 = 4;
const KIND_COMMAND: u8 = 5;

const META_VERSION: u8 = 1;

/// The committed log id is written to META when it has advanced this many entries past the
/// one stored there (see `save_committed_durably`).
pub const COMMITTED_PERSIST_EVERY_ENTRIES: u64 = 1024;

/// Signing nonces kept ready per node: enough for a burst of batches while the pool's thread
/// makes more (about 30 µs each).
const NONCES_READY: usize = 64;

/// Why bytes from the WAL or the meta blob could not be decoded (or a value not encoded).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Fewer bytes than the field needs.
    #[error("{what}: needs {need} bytes at offset {at}, {have} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Offset of the field.
        at: usize,
        /// Bytes it needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// Bytes left over after a complete value.
    #[error("{what}: {len} trailing bytes")]
    Trailing {
        /// What was read.
        what: &'static str,
        /// Bytes left over.
        len: usize,
    },
    /// An entry kind this build does not know.
    #[error("unknown entry kind {kind}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// A reserved byte of the entry prefix is not zero.
    #[error("entry prefix byte {at} is {value:#04x}, must be zero")]
    ReservedNotZero {
        /// Offset in the prefix.
        at: usize,
        /// Its value.
        value: u8,
    },
    /// A presence flag other than 0 or 1.
    #[error("{what}: flag {value} is neither 0 nor 1")]
    BadFlag {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u8,
    },
    /// A count over its limit.
    #[error("{what}: {count} exceeds the maximum {max}")]
    TooMany {
        /// What was counted.
        what: &'static str,
        /// The count.
        count: u64,
        /// The limit.
        max: usize,
    },
    /// A node address that is not UTF-8.
    #[error("node {node_id}: address is not UTF-8")]
    AddrNotUtf8 {
        /// The node.
        node_id: u64,
    },
    /// Node ids of a config not in strictly ascending order (a set is encoded sorted).
    #[error("{what}: node id {node_id} is out of order or repeated")]
    Unsorted {
        /// The list.
        what: &'static str,
        /// The offending id.
        node_id: u64,
    },
    /// A membership openraft rejects (a voter without a node).
    #[error("invalid membership: {source}")]
    InvalidMembership {
        /// What openraft rejected.
        #[source]
        source: openraft::error::MembershipError<u64>,
    },
    /// A signed batch header that does not decode.
    #[error("signed batch header: {0}")]
    SignedHeader(#[from] SignedHeaderError),
    /// A signed batch header naming another log position than its entry's.
    #[error("signed header is for term {term} index {index}, not its entry's")]
    SealMismatch {
        /// Term in the header.
        term: u64,
        /// Index in the header.
        index: u64,
    },
    /// A meta blob version this build cannot read.
    #[error("log store meta version {found} is not supported (this build reads {supported})")]
    MetaVersion {
        /// Version found.
        found: u8,
        /// Version this build reads.
        supported: u8,
    },
}

/// Errors of the log store.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// The WAL failed.
    #[error("WAL {op} failed: {source}")]
    Wal {
        /// The WAL operation.
        op: &'static str,
        /// What the WAL reported.
        #[source]
        source: WalError,
    },
    /// A log entry could not be encoded or decoded.
    #[error("log entry {index}: {source}")]
    Entry {
        /// Raft index of the entry.
        index: u64,
        /// What is wrong.
        #[source]
        source: CodecError,
    },
    /// The meta blob (vote, committed, purged) could not be decoded.
    #[error("log store meta: {source}")]
    Meta {
        /// What is wrong.
        #[source]
        source: CodecError,
    },
    /// An append that does not continue the log.
    #[error("append of index {got}, but the log expects {expected}")]
    NonContiguous {
        /// The next index the log accepts.
        expected: u64,
        /// Index of the entry.
        got: u64,
    },
    /// The background writer (committed id and purge point, see `Shared::write_behind`)
    /// failed; nothing is written after that.
    #[error("log store background write failed: {0}")]
    Background(String),
    /// A Raft index with no WAL index (`u64::MAX`).
    #[error("raft index {index} is too large for the WAL")]
    IndexTooLarge {
        /// The index.
        index: u64,
    },
}

impl From<LogStoreError> for io::Error {
    fn from(e: LogStoreError) -> io::Error {
        io::Error::other(e)
    }
}

fn wal_err(op: &'static str) -> impl FnOnce(WalError) -> LogStoreError {
    move |source| LogStoreError::Wal { op, source }
}

/// WAL index of Raft index `index` (see the module docs).
pub fn wal_index(index: u64) -> Result<u64, LogStoreError> {
    index
        .checked_add(1)
        .ok_or(LogStoreError::IndexTooLarge { index })
}

// ---------------------------------------------------------------------------------------------
// Codec

/// A cursor over untrusted bytes: every read is bounds-checked.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, at: 0, what }
    }

    pub(crate) fn take(&mut self, need: usize) -> Result<&'a [u8], CodecError> {
        let have = self.bytes.len() - self.at;
        if need > have {
            return Err(CodecError::Truncated {
                what: self.what,
                at: self.at,
                need,
                have,
            });
        }
        let out = &self.bytes[self.at..self.at + need];
        self.at += need;
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub(crate) fn flag(&mut self, what: &'static str) -> Result<bool, CodecError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(CodecError::BadFlag { what, value }),
        }
    }

    /// The bytes not read yet.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let out = &self.bytes[self.at..];
        self.at = self.bytes.len();
        out
    }

    pub(crate) fn finish(self) -> Result<(), CodecError> {
        let len = self.bytes.len() - self.at;
        if len != 0 {
            return Err(CodecError::Trailing {
                what: self.what,
                len,
            });
        }
        Ok(())
    }
}

/// Appends `[u8 present][u64 term][u64 index]` (flag only when absent).
pub(crate) fn encode_log_id(log_id: Option<&LogId>, out: &mut Vec<u8>) {
    match log_id {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.leader_id.term.to_le_bytes());
            out.extend_from_slice(&id.index.to_le_bytes());
        }
    }
}

pub(crate) fn decode_log_id(r: &mut Reader<'_>) -> Result<Option<LogId>, CodecError> {
    if !r.flag("log id")? {
        return Ok(None);
    }
    let term = r.u64()?;
    let index = r.u64()?;
    Ok(Some(LogId::new_term_index(term, index)))
}

fn check_count(what: &'static str, count: usize, max: usize) -> Result<u32, CodecError> {
    if count > max {
        return Err(CodecError::TooMany {
            what,
            count: count as u64,
            max,
        });
    }
    Ok(count as u32)
}

/// Appends the membership encoding:
/// `[u32 configs]{[u32 n][u64 id]×n}×configs [u32 nodes]{[u64 id][u32 len][addr utf-8]}×nodes`.
///
/// Refuses (rather than writes) a membership that [`decode_membership`] would refuse by size.
pub(crate) fn encode_membership(m: &Membership, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let configs = m.get_joint_config();
    let n = check_count("membership configs", configs.len(), MEMBERSHIP_CONFIGS_MAX)?;
    out.extend_from_slice(&n.to_le_bytes());
    for config in configs {
        let n = check_count("config voters", config.len(), MEMBERSHIP_NODES_MAX)?;
        out.extend_from_slice(&n.to_le_bytes());
        for id in config {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    let nodes: Vec<(&u64, &BasicNode)> = m.nodes().collect();
    let n = check_count("membership nodes", nodes.len(), MEMBERSHIP_NODES_MAX)?;
    out.extend_from_slice(&n.to_le_bytes());
    for (id, node) in nodes {
        let len = check_count("node address bytes", node.addr.len(), NODE_ADDR_BYTES_MAX)?;
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(node.addr.as_bytes());
    }
    Ok(())
}

/// Reads a list of node ids that must be strictly ascending.
fn decode_ids(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<u64>, CodecError> {
    let n = r.u32()? as usize;
    check_count(what, n, MEMBERSHIP_NODES_MAX)?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let id = r.u64()?;
        if ids.last().is_some_and(|last| *last >= id) {
            return Err(CodecError::Unsorted { what, node_id: id });
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Reads what [`encode_membership`] wrote; checks limits, order and openraft's own validity.
pub(crate) fn decode_membership(r: &mut Reader<'_>) -> Result<Membership, CodecError> {
    let n = r.u32()? as usize;
    check_count("membership configs", n, MEMBERSHIP_CONFIGS_MAX)?;
    let mut configs = Vec::with_capacity(n);
    for _ in 0..n {
        configs.push(
            decode_ids(r, "config voters")?
                .into_iter()
                .collect::<BTreeSet<u64>>(),
        );
    }
    let n = r.u32()? as usize;
    check_count("membership nodes", n, MEMBERSHIP_NODES_MAX)?;
    let mut nodes = BTreeMap::new();
    let mut last_id = None;
    for _ in 0..n {
        let id = r.u64()?;
        if last_id.is_some_and(|last| last >= id) {
            return Err(CodecError::Unsorted {
                what: "membership nodes",
                node_id: id,
            });
        }
        last_id = Some(id);
        let len = r.u32()? as usize;
        check_count("node address bytes", len, NODE_ADDR_BYTES_MAX)?;
        let addr = std::str::from_utf8(r.take(len)?)
            .map_err(|_| CodecError::AddrNotUtf8 { node_id: id })?;
        nodes.insert(id, BasicNode::new(addr));
    }
    Membership::new(configs, nodes).map_err(|source| CodecError::InvalidMembership { source })
}

/// Bytes of an entry's WAL payload before its batch or membership encoding: the prefix, plus
/// the signed header of a signed batch.
pub(crate) fn entry_head_len(payload: &EntryPayload<BatchBytes, u64, BasicNode>) -> usize {
    match payload {
        EntryPayload::Normal(b) if b.seal().is_some() => ENTRY_PREFIX_BYTES + SIGNED_HEADER_BYTES,
        _ => ENTRY_PREFIX_BYTES,
    }
}

/// Appends the head of an entry with `payload` (`entry_head_len` bytes): `[u8 kind][15 zeros]`,
/// then a signed batch's 160-byte signed header. Shared by the WAL payload and the wire encoding
/// (`wire::encode_append`).
pub(crate) fn encode_entry_prefix(
    payload: &EntryPayload<BatchBytes, u64, BasicNode>,
    out: &mut Vec<u8>,
) {
    let kind = match payload {
        EntryPayload::Blank => KIND_BLANK,
        EntryPayload::Normal(b) if b.is_command() => KIND_COMMAND,
        EntryPayload::Normal(b) if b.seal().is_some() => KIND_SIGNED,
        EntryPayload::Normal(_) => KIND_NORMAL,
        EntryPayload::Membership(_) => KIND_MEMBERSHIP,
    };
    out.push(kind);
    out.extend_from_slice(&[0u8; ENTRY_PREFIX_BYTES - 1]);
    if let EntryPayload::Normal(b) = payload {
        if let Some(seal) = b.seal() {
            out.extend_from_slice(&seal.encode());
        }
    }
}

/// Writes the WAL payload of `entry` into `out` (cleared first).
pub fn encode_entry(entry: &Entry, out: &mut Vec<u8>) -> Result<(), LogStoreError> {
    out.clear();
    encode_entry_prefix(&entry.payload, out);
    match &entry.payload {
        EntryPayload::Blank => {}
        EntryPayload::Normal(batch) => out.extend_from_slice(batch.as_bytes()),
        EntryPayload::Membership(m) => {
            encode_membership(m, out).map_err(|source| LogStoreError::Entry {
                index: entry.log_id.index,
                source,
            })?
        }
    }
    Ok(())
}

/// The kind byte of an entry prefix.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blank,
    Normal,
    Membership,
    Signed,
    Command,
}

/// Checks the entry prefix; returns the kind and a reader positioned after the prefix.
fn read_prefix(payload: &[u8]) -> Result<(Kind, Reader<'_>), CodecError> {
    let mut r = Reader::new(payload, "entry");
    let prefix = r.take(ENTRY_PREFIX_BYTES)?;
    if let Some((at, &value)) = prefix.iter().enumerate().skip(1).find(|(_, b)| **b != 0) {
        return Err(CodecError::ReservedNotZero { at, value });
    }
    match prefix[0] {
        KIND_BLANK => Ok((Kind::Blank, r)),
        KIND_NORMAL => Ok((Kind::Normal, r)),
        KIND_MEMBERSHIP => Ok((Kind::Membership, r)),
        KIND_SIGNED => Ok((Kind::Signed, r)),
        KIND_COMMAND => Ok((Kind::Command, r)),
        kind => Err(CodecError::UnknownKind { kind }),
    }
}

/// Reads a signed batch's header and checks it names `(term, index)` when given.
fn read_seal(r: &mut Reader<'_>, log_id: Option<(u64, u64)>) -> Result<SignedHeader, CodecError> {
    let seal = SignedHeader::decode(r.take(SIGNED_HEADER_BYTES)?)?;
    if let Some((term, index)) = log_id {
        if (seal.header.term, seal.header.index) != (term, index) {
            return Err(CodecError::SealMismatch {
                term: seal.header.term,
                index: seal.header.index,
            });
        }
    }
    Ok(seal)
}

/// The batch bytes inside a WAL payload written by this store, in place (16-byte aligned when
/// the payload is); `None` for blank, membership and command entries. For tools and tests that read the
/// WAL directly; the batch itself is not validated (use `access_batch`).
pub fn entry_batch(payload: &[u8]) -> Result<Option<&[u8]>, CodecError> {
    let (kind, mut r) = read_prefix(payload)?;
    match kind {
        Kind::Normal => Ok(Some(r.rest())),
        Kind::Signed => {
            read_seal(&mut r, None)?;
            Ok(Some(r.rest()))
        }
        Kind::Blank | Kind::Membership | Kind::Command => Ok(None),
    }
}

/// The control command bytes inside a WAL payload of a command entry; `None` for other kinds.
pub fn entry_command(payload: &[u8]) -> Result<Option<&[u8]>, CodecError> {
    let (kind, mut r) = read_prefix(payload)?;
    match kind {
        Kind::Command => Ok(Some(r.rest())),
        _ => Ok(None),
    }
}

/// The leader's signed header inside a WAL payload of a signed batch; `None` for other kinds.
pub fn entry_seal(payload: &[u8]) -> Result<Option<SignedHeader>, CodecError> {
    let (kind, mut r) = read_prefix(payload)?;
    match kind {
        Kind::Signed => Ok(Some(read_seal(&mut r, None)?)),
        _ => Ok(None),
    }
}

/// Raft index of WAL index `wal_index` (see the module docs); `None` for 0, which the WAL never
/// holds.
pub fn raft_index(wal_index: u64) -> Option<u64> {
    wal_index.checked_sub(1)
}

/// Rebuilds the entry at log id `(term, index)` from its WAL payload.
pub fn decode_entry(index: u64, term: u64, payload: &[u8]) -> Result<Entry, CodecError> {
    let (kind, mut r) = read_prefix(payload)?;
    let payload = match kind {
        Kind::Blank => EntryPayload::Blank,
        Kind::Normal | Kind::Signed => {
            let seal = match kind {
                Kind::Signed => Some(read_seal(&mut r, Some((term, index)))?),
                _ => None,
            };
            // One copy, into an aligned buffer the entry owns (the WAL's read buffer is !Send).
            let bytes = r.rest();
            let mut buf = AlignedVec::<16>::with_capacity(bytes.len());
            buf.extend_from_slice(bytes);
            let batch = BatchBytes::from_aligned(buf);
            EntryPayload::Normal(match seal {
                Some(seal) => batch.with_seal(seal),
                None => batch,
            })
        }
        Kind::Membership => EntryPayload::Membership(decode_membership(&mut r)?),
        Kind::Command => EntryPayload::Normal(BatchBytes::command(r.rest().to_vec())),
    };
    r.finish()?;
    Ok(Entry {
        log_id: LogId::new_term_index(term, index),
        payload,
    })
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
fn wall_clock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What the meta blob holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StoreMeta {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

impl StoreMeta {
    /// `[u8 version] [vote: u8 present, u64 term, u64 voted_for, u8 committed]
    /// [committed log id] [last purged log id]` (log ids as in `encode_log_id`).
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(META_VERSION);
        match &self.vote {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&v.leader_id.term.to_le_bytes());
                out.extend_from_slice(&v.leader_id.voted_for.to_le_bytes());
                out.push(u8::from(v.committed));
            }
        }
        encode_log_id(self.committed.as_ref(), &mut out);
        encode_log_id(self.last_purged.as_ref(), &mut out);
        out
    }

    fn decode(bytes: &[u8]) -> Result<StoreMeta, CodecError> {
        let mut r = Reader::new(bytes, "log store meta");
        let version = r.u8()?;
        if version != META_VERSION {
            return Err(CodecError::MetaVersion {
                found: version,
                supported: META_VERSION,
            });
        }
        let vote = if r.flag("vote")? {
            let term = r.u64()?;
            let voted_for = r.u64()?;
            let committed = r.flag("vote committed")?;
            let mut vote = Vote::new(term, voted_for);
            vote.committed = committed;
            Some(vote)
        } else {
            None
        };
        let committed = decode_log_id(&mut r)?;
        let last_purged = decode_log_id(&mut r)?;
        r.finish()?;
        Ok(StoreMeta {
            vote,
            committed,
            last_purged,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The store

struct State {
    /// What the META blob holds (durable).
    meta: StoreMeta,
    /// The newest committed log id openraft reported; `meta.committed` trails it by less than
    /// `COMMITTED_PERSIST_EVERY_ENTRIES`.
    committed: Option<LogId>,
    /// Last entry present, or `meta.last_purged` when there is none.
    last_log_id: Option<LogId>,
    /// The newest flush task; each one first awaits its predecessor, so awaiting this one waits
    /// for every append's callback.
    last_flush: Option<JoinHandle<()>>,
    /// The newest purge point openraft asked for; `meta.last_purged` trails it while the
    /// background writer saves it and purges the WAL (see [`Shared::write_behind`]).
    purge_wanted: Option<LogId>,
    /// The background writer is running.
    writer_running: bool,
    /// Woken when the background writer stops.
    writer_waiters: Vec<std::task::Waker>,
    /// Why the background writer failed; every later write of the store fails with it.
    writer_failed: Option<String>,
    /// Encoding buffer reused across appends.
    scratch: Vec<u8>,
    /// This node's id and key, to sign batches in terms it leads.
    signer: Option<(u64, Signer)>,
    /// Signing nonces made ahead on a thread of their own (started with the signer).
    nonces: Option<NoncePool>,
    /// Digest and time of the last signed batch in the log (the next one's `prev_batch_hash`).
    last_signed: Option<([u8; 32], u64)>,
    /// Where each append's time to durability is recorded ([`Stage::Wal`]), if anywhere.
    stages: Option<Stages>,
    /// The newest entries as appended (contiguous indices, oldest first), so that replication
    /// and the apply read them without a copy: their batch bytes are shared, not decoded from
    /// the WAL into a buffer of their own. At most [`RECENT_BYTES_MAX`] bytes of batch
    /// allocations and [`RECENT_ENTRIES_MAX`] entries.
    recent: std::collections::VecDeque<Entry>,
    /// Batch bytes in `recent`.
    recent_bytes: usize,
}

/// Memory the recent-entries cache of a log store keeps alive at most, counted as its batches'
/// allocations (see `State::recent`; a batch the leader's batcher built holds a buffer of the
/// largest batch size, mostly untouched pages when it is not full).
const RECENT_BYTES_MAX: usize = 64 << 20;
/// Entries the recent-entries cache of a log store holds at most.
const RECENT_ENTRIES_MAX: usize = 4096;

/// Bytes an entry counts for in the recent-entries cache.
fn cached_bytes(entry: &Entry) -> usize {
    match &entry.payload {
        EntryPayload::Normal(b) => b.footprint().max(64),
        _ => 64,
    }
}

impl State {
    /// The cached entry at `index`, if the cache holds it.
    fn recent_entry(&self, index: u64) -> Option<Entry> {
        let first = self.recent.front()?.log_id.index;
        let at = usize::try_from(index.checked_sub(first)?).ok()?;
        self.recent.get(at).cloned()
    }

    /// Adds `entry` (just appended) to the cache, dropping the oldest entries over the bounds.
    fn remember(&mut self, entry: Entry) {
        let contiguous = self
            .recent
            .back()
            .is_none_or(|b| b.log_id.index + 1 == entry.log_id.index);
        if !contiguous {
            self.recent.clear();
            self.recent_bytes = 0;
        }
        self.recent_bytes += cached_bytes(&entry);
        self.recent.push_back(entry);
        while self.recent_bytes > RECENT_BYTES_MAX || self.recent.len() > RECENT_ENTRIES_MAX {
            let Some(old) = self.recent.pop_front() else {
                break;
            };
            self.recent_bytes -= cached_bytes(&old);
        }
    }

    /// Drops the cached entries after `last_kept` (a truncation).
    fn forget_after(&mut self, last_kept: u64) {
        while self
            .recent
            .back()
            .is_some_and(|b| b.log_id.index > last_kept)
        {
            let b = self.recent.pop_back().expect("checked");
            self.recent_bytes -= cached_bytes(&b);
        }
    }

    /// Drops the cached entries through `purged` (a purge).
    fn forget_through(&mut self, purged: u64) {
        while self
            .recent
            .front()
            .is_some_and(|f| f.log_id.index <= purged)
        {
            let f = self.recent.pop_front().expect("checked");
            self.recent_bytes -= cached_bytes(&f);
        }
    }
}

struct Shared {
    wal: Wal,
    state: RefCell<State>,
    /// Held while the meta blob is written: saves of the vote (openraft's, awaited) and of the
    /// committed id and purge point (the background writer's) take turns, each writing the
    /// blob as it is when its turn comes, so none undoes another.
    meta_lock: glommio::sync::Semaphore,
}

impl Shared {
    /// Raft indices readable now: `(first, last)`, `None` when the log holds no entry.
    fn visible(&self) -> Option<(u64, u64)> {
        let first = self.wal.first_index()?.checked_sub(1)?;
        let last = self.wal.last_index()?.checked_sub(1)?;
        let purged = self.state.borrow().purged().map(|p| p.index);
        let first = match purged {
            Some(p) => first.max(p.checked_add(1)?),
            None => first,
        };
        (first <= last).then_some((first, last))
    }

    /// Entries in `range`, present ones only; stops after `bytes_max` payload bytes (but
    /// returns at least one entry when there is one).
    async fn read<RB: RangeBounds<u64>>(
        &self,
        range: RB,
        bytes_max: usize,
    ) -> Result<Vec<Entry>, LogStoreError> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => *e,
            Bound::Unbounded => u64::MAX,
        };
        let Some((first, last)) = self.visible() else {
            return Ok(Vec::new());
        };
        let (lo, hi) = (start.max(first), end.min(last.saturating_add(1)));
        let mut entries = Vec::with_capacity(hi.saturating_sub(lo).min(1024) as usize);
        let mut bytes = 0usize;
        for index in lo..hi {
            let cached = self.state.borrow().recent_entry(index);
            if let Some(entry) = cached {
                // The read's budget counts batch lengths, as for a WAL read (not allocations).
                let len = match &entry.payload {
                    EntryPayload::Normal(b) => b.len(),
                    _ => 0,
                };
                bytes = bytes.saturating_add(len);
                entries.push(entry);
                if bytes >= bytes_max {
                    break;
                }
                continue;
            }
            let record = match self.wal.read(wal_index(index)?).await {
                Ok(r) => r,
                // A truncation (a follower dropping a deposed leader's uncommitted tail) ran
                // while this read awaited the WAL: the entries from `index` on are no longer
                // in the log. A short read at the end is what openraft's reader contract
                // allows; the entries already read are the log as it was when the read began.
                Err(_) if self.visible().is_none_or(|(_, last)| index > last) => break,
                Err(e) => return Err(wal_err("read")(e)),
            };
            let payload = record.payload();
            let entry = decode_entry(index, record.term, payload)
                .map_err(|source| LogStoreError::Entry { index, source })?;
            entries.push(entry);
            bytes = bytes.saturating_add(payload.len());
            if bytes >= bytes_max {
                break;
            }
        }
        Ok(entries)
    }

    /// Sets `last_signed` from the newest signed batch in the log (scanning back from the end;
    /// none when the log holds no signed batch).
    async fn find_last_signed(&self) -> Result<(), LogStoreError> {
        let mut found = None;
        if let Some((first, last)) = self.visible() {
            let mut index = last;
            loop {
                let record = self
                    .wal
                    .read(wal_index(index)?)
                    .await
                    .map_err(wal_err("read"))?;
                let seal = entry_seal(record.payload())
                    .map_err(|source| LogStoreError::Entry { index, source })?;
                if let Some(seal) = seal {
                    found = Some((seal.digest(), seal.header.timestamp_us));
                    break;
                }
                if index == first {
                    break;
                }
                index -= 1;
            }
        }
        self.state.borrow_mut().last_signed = found;
        Ok(())
    }

    /// Signs `entry` if it is an unsigned batch and this node leads its term (see the module
    /// docs); checks that a signed batch's header names its log id. Returns the entry as it is
    /// to be stored, and the ticket to fire once it is.
    fn seal(
        &self,
        entry: Entry,
    ) -> Result<(Entry, Option<(SealTicket, SignedHeader)>), LogStoreError> {
        let EntryPayload::Normal(batch) = &entry.payload else {
            return Ok((entry, None));
        };
        if batch.is_command() {
            return Ok((entry, None));
        }
        let (term, index) = (entry.log_id.leader_id.term, entry.log_id.index);
        let mut state = self.state.borrow_mut();
        if let Some(seal) = batch.seal() {
            if (seal.header.term, seal.header.index) != (term, index) {
                return Err(LogStoreError::Entry {
                    index,
                    source: CodecError::SealMismatch {
                        term: seal.header.term,
                        index: seal.header.index,
                    },
                });
            }
            state.last_signed = Some((seal.digest(), seal.header.timestamp_us));
            return Ok((entry, None));
        }
        let leads = match (&state.signer, &state.meta.vote) {
            (Some((id, _)), Some(vote)) => {
                vote.committed && vote.leader_id.voted_for == *id && vote.leader_id.term == term
            }
            _ => false,
        };
        let Some((_, signer)) = state.signer.as_ref().filter(|_| leads) else {
            return Ok((entry, None));
        };
        // SAFETY: a batch proposed on this node was built by this process's batcher or, when
        // forwarded by a follower, validated with `access_batch` where it entered the process;
        // the buffer is immutable since.
        let archived = unsafe { access_batch_unchecked(batch.as_bytes()) };
        let (prev, prev_time) = state.last_signed.unwrap_or(([0; 32], 0));
        let header = BatchHeader {
            term,
            index,
            prev_batch_hash: prev,
            tx_merkle_root: archived.header.tx_merkle_root,
            tx_count: archived.header.tx_count.to_native(),
            timestamp_us: wall_clock_us().max(prev_time),
        };
        // A nonce made ahead on the pool's thread takes the curve arithmetic off this path.
        let seal = match state.nonces.as_ref().and_then(|p| p.take()) {
            Some(nonce) => SignedHeader::sign_with(header, signer, nonce),
            None => SignedHeader::sign(header, signer),
        };
        state.last_signed = Some((seal.digest(), header.timestamp_us));
        let ticket = batch.ticket().cloned().map(|t| (t, seal));
        let sealed = Entry {
            log_id: entry.log_id,
            payload: EntryPayload::Normal(batch.clone().with_seal(seal)),
        };
        Ok((sealed, ticket))
    }

    /// Waits until every append so far is durable and its callback was called.
    async fn settle(&self) {
        let last = self.state.borrow_mut().last_flush.take();
        if let Some(handle) = last {
            // A panicked flush task already dropped its callback, which openraft reports.
            let _ = handle.await;
        }
    }

    /// Writes the meta blob with `change` made to it, durably, in turn with other writers.
    async fn save_meta(&self, change: impl FnOnce(&mut StoreMeta)) -> Result<(), LogStoreError> {
        let _turn = self
            .meta_lock
            .acquire_permit(1)
            .await
            .map_err(|e| LogStoreError::Background(format!("meta lock: {e}")))?;
        let mut meta = self.meta();
        change(&mut meta);
        self.wal
            .save_meta(&meta.encode())
            .await
            .map_err(wal_err("save meta"))?;
        self.state.borrow_mut().meta = meta;
        Ok(())
    }

    /// Fails if the background writer failed.
    fn check_writer(&self) -> Result<(), LogStoreError> {
        match &self.state.borrow().writer_failed {
            Some(why) => Err(LogStoreError::Background(why.clone())),
            None => Ok(()),
        }
    }

    /// Starts the background writer unless it runs: it saves the committed id and the purge
    /// point openraft asked for, then purges the WAL, off openraft's core. openraft awaits
    /// `save_committed` and `purge` inline in its core loop, so every millisecond they take
    /// holds up appends, commits and heartbeats of the whole node: a meta save is two fsyncs
    /// and a rename (1-3 ms), a purge renames or deletes 64 MiB segment files and syncs the
    /// directory (up to ~10 ms), and every node purges at the same index after its snapshot.
    /// Neither has to be durable when it returns (openraft requires only that a purge leave
    /// no hole; the committed id is a hint, see `save_committed_durably`), and a crash between
    /// the two steps of a purge is finished at open, as before.
    fn write_behind(self: &Rc<Self>) {
        {
            let mut state = self.state.borrow_mut();
            if state.writer_running || state.writer_failed.is_some() {
                return;
            }
            state.writer_running = true;
        }
        let shared = self.clone();
        // Detached: it ends when there is nothing left to write.
        drop(GlommioRuntime::spawn(async move {
            let result = shared.write_behind_loop().await;
            let mut state = shared.state.borrow_mut();
            if let Err(e) = result {
                tracing::error!(error = %e, "log store: background meta save or purge failed");
                state.writer_failed = Some(e.to_string());
            }
            state.writer_running = false;
            for w in state.writer_waiters.drain(..) {
                w.wake();
            }
        }));
    }

    async fn write_behind_loop(&self) -> Result<(), LogStoreError> {
        loop {
            let (commit, purge) = {
                let state = self.state.borrow();
                let commit = state.committed_to_save();
                let purge = state
                    .purge_wanted
                    .filter(|p| state.meta.last_purged < Some(*p));
                (commit, purge)
            };
            if commit.is_none() && purge.is_none() {
                return Ok(());
            }
            if let (Some(c), Some(last)) = (commit, self.wal.last_index()) {
                // The saved value never points past the local durable log.
                let through = wal_index(c.index)?.min(last);
                self.wal
                    .durable(through)
                    .await
                    .map_err(wal_err("durable"))?;
            }
            // Purge point first: after a crash between the two steps `open` finishes the purge.
            self.save_meta(|meta| {
                if let Some(c) = commit {
                    meta.committed = meta.committed.max(Some(c));
                }
                if let Some(p) = purge {
                    meta.last_purged = meta.last_purged.max(Some(p));
                }
            })
            .await?;
            if let Some(p) = purge {
                self.wal
                    .purge_through(wal_index(p.index)?)
                    .await
                    .map_err(wal_err("purge"))?;
            }
        }
    }

    /// [`LogStore::written_behind`].
    async fn written_behind(&self) -> Result<(), LogStoreError> {
        self.writer_stopped().await;
        self.check_writer()
    }

    /// Waits until the background writer has stopped (it stops once it has written everything
    /// asked of it so far).
    async fn writer_stopped(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.writer_running {
                state.writer_waiters.push(cx.waker().clone());
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await
    }

    fn meta(&self) -> StoreMeta {
        self.state.borrow().meta.clone()
    }
}

impl State {
    /// The purge point as openraft sees it: what it last asked for, saved or not yet.
    fn purged(&self) -> Option<LogId> {
        self.meta.last_purged.max(self.purge_wanted)
    }

    /// The committed id to save in the meta blob now, if any: the newest one openraft
    /// reported, once it is `COMMITTED_PERSIST_EVERY_ENTRIES` past the saved one (or none is
    /// saved yet). Writing META on every commit would add two fsyncs per commit.
    fn committed_to_save(&self) -> Option<LogId> {
        self.committed.filter(|c| {
            self.meta.committed.is_none_or(|saved| {
                c.index >= saved.index.saturating_add(COMMITTED_PERSIST_EVERY_ENTRIES)
            })
        })
    }
}

/// openraft log storage on the WAL (see the module docs). `!Send`: it lives on shard 0's glommio
/// executor, which openraft's `single-threaded` feature allows.
pub struct LogStore {
    shared: Rc<Shared>,
}

/// A reader of the same log, for openraft's replication tasks.
#[derive(Clone)]
pub struct LogReader {
    shared: Rc<Shared>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir`: recovers the WAL, loads the meta blob, and finishes
    /// a purge that a crash interrupted. Must run inside a glommio executor.
    pub async fn open(
        dir: &Path,
        opts: WalOptions,
    ) -> Result<(LogStore, RecoveryReport), LogStoreError> {
        let (wal, report) = Wal::open(dir, opts).await.map_err(wal_err("open"))?;
        tracing::debug!(
            segments = report.segments,
            last = ?report.last_index,
            "WAL opened, loading meta"
        );
        let meta = match wal.load_meta().await.map_err(wal_err("load meta"))? {
            None => StoreMeta::default(),
            Some(bytes) => {
                StoreMeta::decode(&bytes).map_err(|source| LogStoreError::Meta { source })?
            }
        };
        // `purge` saves `last_purged` before it purges the WAL: finish what a crash cut short.
        if let Some(purged) = meta.last_purged {
            let through = wal_index(purged.index)?;
            if wal.first_index().is_some_and(|first| first <= through) {
                wal.purge_through(through).await.map_err(wal_err("purge"))?;
            }
        }
        let last_present = match wal.last_index() {
            Some(last) => {
                let record = wal.read(last).await.map_err(wal_err("read"))?;
                Some(LogId::new_term_index(record.term, last - 1))
            }
            None => None,
        };
        let last_log_id = last_present.max(meta.last_purged);
        tracing::debug!(?last_log_id, "meta loaded, finding the last signed batch");
        let shared = Rc::new(Shared {
            wal,
            meta_lock: glommio::sync::Semaphore::new(1),
            state: RefCell::new(State {
                committed: meta.committed,
                meta,
                last_log_id,
                last_flush: None,
                purge_wanted: None,
                writer_running: false,
                writer_waiters: Vec::new(),
                writer_failed: None,
                scratch: Vec::new(),
                recent: std::collections::VecDeque::new(),
                recent_bytes: 0,
                signer: None,
                nonces: None,
                last_signed: None,
                stages: None,
            }),
        });
        shared.find_last_signed().await?;
        Ok((LogStore { shared }, report))
    }

    /// Signs batches appended in terms this node (`id`) leads with `signer` (see the module
    /// docs). Without a signer, a leader stores its batches unsigned.
    pub fn set_signer(&self, id: u64, signer: Signer) {
        let mut state = self.shared.state.borrow_mut();
        state.signer = Some((id, signer));
        if state.nonces.is_none() {
            state.nonces = NoncePool::spawn(format!("baton-{id}-nonce"), NONCES_READY);
        }
    }

    /// Records each append's time from the call to its records being durable in `stages`
    /// ([`Stage::Wal`]).
    pub fn set_stages(&self, stages: Stages) {
        self.shared.state.borrow_mut().stages = Some(stages);
    }

    /// A reader of this log, e.g. to fetch a committed batch for a receipt.
    pub fn reader(&self) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }

    /// The WAL underneath (stats, directory).
    pub fn wal(&self) -> &Wal {
        &self.shared.wal
    }

    /// Waits until the committed id and purge point asked for so far are saved and the WAL is
    /// purged ([`Shared::write_behind`]); fails if that failed. A node does this before it
    /// closes its log.
    pub async fn written_behind(&self) -> Result<(), io::Error> {
        Ok(self.shared.written_behind().await?)
    }

    async fn append_entries<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), LogStoreError>
    where
        I: IntoIterator<Item = Entry>,
    {
        let shared = &self.shared;
        let started = std::time::Instant::now();
        let mut last_wal = None;
        let mut buf = std::mem::take(&mut shared.state.borrow_mut().scratch);
        let result = async {
            for entry in entries {
                let index = entry.log_id.index;
                let expected = shared.state.borrow().last_log_id.map(|l| l.index + 1);
                if let Some(expected) = expected.filter(|e| *e != index) {
                    return Err(LogStoreError::NonContiguous {
                        expected,
                        got: index,
                    });
                }
                let w = wal_index(index)?;
                let (entry, ticket) = shared.seal(entry)?;
                encode_entry(&entry, &mut buf)?;
                shared
                    .wal
                    .append(w, entry.log_id.leader_id.term, &buf)
                    .await
                    .map_err(wal_err("append"))?;
                {
                    let mut state = shared.state.borrow_mut();
                    state.last_log_id = Some(entry.log_id);
                    // As a read from the WAL would give it back: no ticket (a local notice).
                    let stored = match entry.payload {
                        EntryPayload::Normal(b) => Entry {
                            log_id: entry.log_id,
                            payload: EntryPayload::Normal(b.without_ticket()),
                        },
                        other => Entry {
                            log_id: entry.log_id,
                            payload: other,
                        },
                    };
                    state.remember(stored);
                }
                if let Some((ticket, seal)) = ticket {
                    ticket.fire(seal);
                }
                last_wal = Some(w);
            }
            Ok(())
        }
        .await;
        buf.clear();
        shared.state.borrow_mut().scratch = buf;
        result?;

        // Durability is awaited on a task, so `append` returns once the entries are readable
        // and openraft can send them to followers while the group commit syncs.
        let durable = last_wal.map(|w| shared.wal.durable(w));
        let stages = shared.state.borrow().stages.clone();
        let previous = shared.state.borrow_mut().last_flush.take();
        let handle = GlommioRuntime::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let result = match durable {
                None => Ok(()),
                Some(durable) => durable.await.map_err(|source| {
                    io::Error::from(LogStoreError::Wal {
                        op: "durable",
                        source,
                    })
                }),
            };
            if let (Some(stages), true) = (&stages, result.is_ok()) {
                stages.record_since(Stage::Wal, started);
            }
            callback.io_completed(result);
        });
        shared.state.borrow_mut().last_flush = Some(handle);
        Ok(())
    }

    async fn truncate(&mut self, last_kept: Option<LogId>) -> Result<(), LogStoreError> {
        let shared = &self.shared;
        shared.settle().await;
        let keep_through = match last_kept {
            Some(id) => wal_index(id.index)?,
            None => 0,
        };
        shared
            .wal
            .truncate_after(keep_through)
            .await
            .map_err(wal_err("truncate"))?;
        {
            let mut state = shared.state.borrow_mut();
            if state.last_log_id > last_kept {
                state.last_log_id = last_kept.max(state.purged());
            }
            match last_kept {
                Some(k) => state.forget_after(k.index),
                None => {
                    state.recent.clear();
                    state.recent_bytes = 0;
                }
            }
        }
        // The last signed batch may have been cut off.
        shared.find_last_signed().await
    }

    /// Purges the log through `log_id` (see [`Shared::write_behind`]): at once in memory, in
    /// the background on disk. A purge past the last entry (after a snapshot was installed)
    /// empties the log and moves its next index, so that one is done here, in order after the
    /// background writer.
    async fn purge_through(&mut self, log_id: LogId) -> Result<(), LogStoreError> {
        let shared = &self.shared;
        shared.check_writer()?;
        if shared.state.borrow().purged() >= Some(log_id) {
            return Ok(());
        }
        let through = wal_index(log_id.index)?;
        let empties = shared.wal.last_index().is_none_or(|last| through >= last);
        if empties {
            shared.writer_stopped().await;
            shared.check_writer()?;
            shared.settle().await;
            shared
                .save_meta(|meta| meta.last_purged = meta.last_purged.max(Some(log_id)))
                .await?;
            shared
                .wal
                .purge_through(through)
                .await
                .map_err(wal_err("purge"))?;
        } else {
            shared.state.borrow_mut().purge_wanted = Some(log_id);
            shared.write_behind();
        }
        let mut state = shared.state.borrow_mut();
        state.last_log_id = state.last_log_id.max(Some(log_id));
        state.forget_through(log_id.index);
        Ok(())
    }

    async fn save_vote_durably(&mut self, vote: &Vote) -> Result<(), LogStoreError> {
        let shared = &self.shared;
        shared.check_writer()?;
        shared.settle().await;
        shared.save_meta(|meta| meta.vote = Some(*vote)).await
    }

    /// Records the committed id openraft reports, and has the background writer save it in
    /// the meta blob once it has moved `COMMITTED_PERSIST_EVERY_ENTRIES` past the saved one.
    /// It is saved because an in-memory state machine is rebuilt on restart from the last
    /// snapshot plus the log up to the saved committed id; without it a restarted node could
    /// serve state older than what it served before the crash. It is a hint (Raft's safety does
    /// not depend on it: a restarted node learns it again from the leader), already up to that
    /// many entries old, so it is saved behind openraft's back ([`Shared::write_behind`]):
    /// each save is a small file write, two fsyncs and a rename, which openraft would otherwise
    /// wait for in its core loop. The WAL is first made durable up to the committed index, so
    /// the saved value never points past the local durable log.
    async fn save_committed_durably(
        &mut self,
        committed: Option<LogId>,
    ) -> Result<(), LogStoreError> {
        let shared = &self.shared;
        shared.check_writer()?;
        let due = {
            let mut state = shared.state.borrow_mut();
            state.committed = state.committed.max(committed);
            state.committed_to_save().is_some()
        };
        if due {
            shared.write_behind();
        }
        Ok(())
    }
}

impl LogReader {
    /// [`LogStore::written_behind`].
    pub async fn written_behind(&self) -> Result<(), io::Error> {
        Ok(self.shared.written_behind().await?)
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        Ok(self.shared.read(range, usize::MAX).await?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.shared.state.borrow().meta.vote)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        Ok(self.shared.read(start..end, READ_BYTES_MAX).await?)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let state = self.shared.state.borrow();
        Ok(LogState {
            last_purged_log_id: state.purged(),
            last_log_id: state.last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        Ok(self.save_vote_durably(vote).await?)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        Ok(self.save_committed_durably(committed).await?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.shared.state.borrow().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        Ok(self.append_entries(entries, callback).await?)
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        Ok(self.truncate(last_log_id).await?)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        Ok(self.purge_through(log_id).await?)
    }
}

#[cfg(test)]
mod tests {
    use openraft::entry::RaftEntry;
    use proptest::prelude::*;

    use super::*;
    use crate::batch::{encode_batch, Batch, BatchHeader};
    use crate::tx::Transaction;
    use crate::tx_kind::TxKind;

    fn membership(configs: Vec<Vec<u64>>, learners: &[(u64, &str)]) -> Membership {
        let mut nodes: BTreeMap<u64, BasicNode> = configs
            .iter()
            .flatten()
            .map(|id| (*id, BasicNode::new(format!("127.0.0.1:{}", 7000 + id))))
            .collect();
        for (id, addr) in learners {
            nodes.insert(*id, BasicNode::new(*addr));
        }
        Membership::new(
            configs
                .into_iter()
                .map(|c| c.into_iter().collect())
                .collect(),
            nodes,
        )
        .unwrap()
    }

    fn batch_bytes() -> BatchBytes {
        let mut batch = Batch {
            header: BatchHeader {
                term: 2,
                index: 9,
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

    fn round_trip(entry: &Entry) -> Entry {
        let mut buf = Vec::new();
        encode_entry(entry, &mut buf).unwrap();
        // The WAL hands payloads back 16-byte aligned.
        let mut aligned = AlignedVec::<16>::new();
        aligned.extend_from_slice(&buf);
        decode_entry(entry.index(), entry.log_id.leader_id.term, &aligned).unwrap()
    }

    #[test]
    fn entries_round_trip() {
        let blank = Entry::new_blank(LogId::new_term_index(1, 0));
        assert_eq!(round_trip(&blank), blank);

        let m = membership(vec![vec![1, 2, 3], vec![3, 4]], &[(9, "learner:1")]);
        let member = Entry::new_membership(LogId::new_term_index(2, 1), m);
        assert_eq!(round_trip(&member), member);

        let normal = Entry::new_normal(LogId::new_term_index(2, 9), batch_bytes());
        let back = round_trip(&normal);
        assert_eq!(back, normal);
        let EntryPayload::Normal(data) = &back.payload else {
            panic!("normal entry expected");
        };
        assert_eq!(data.as_bytes().as_ptr() as usize % 16, 0);
        assert_eq!(data.batch().unwrap().header.index, 9);
    }

    #[test]
    fn normal_payload_is_prefix_then_batch_as_is() {
        let data = batch_bytes();
        let entry = Entry::new_normal(LogId::new_term_index(2, 9), data.clone());
        let mut buf = Vec::new();
        encode_entry(&entry, &mut buf).unwrap();
        assert_eq!(buf[0], KIND_NORMAL);
        assert_eq!(&buf[1..ENTRY_PREFIX_BYTES], &[0u8; 15]);
        assert_eq!(&buf[ENTRY_PREFIX_BYTES..], data.as_bytes());
    }

    #[test]
    fn bad_entries_are_typed_errors() {
        let err = |bytes: &[u8]| decode_entry(1, 1, bytes).unwrap_err();
        assert!(matches!(
            err(&[1; 3]),
            CodecError::Truncated {
                need: 16,
                have: 3,
                ..
            }
        ));
        let mut prefix = [0u8; 16];
        prefix[0] = 9;
        assert!(matches!(err(&prefix), CodecError::UnknownKind { kind: 9 }));
        prefix[0] = KIND_BLANK;
        prefix[5] = 1;
        assert!(matches!(
            err(&prefix),
            CodecError::ReservedNotZero { at: 5, value: 1 }
        ));
        prefix[5] = 0;
        let mut trailing = prefix.to_vec();
        trailing.push(0);
        assert!(matches!(
            err(&trailing),
            CodecError::Trailing { len: 1, .. }
        ));

        // A voter without a node entry.
        let mut m = prefix.to_vec();
        m[0] = KIND_MEMBERSHIP;
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&5u64.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(err(&m), CodecError::InvalidMembership { .. }));

        // A count far over the limit is refused before anything is allocated.
        let mut m = prefix.to_vec();
        m[0] = KIND_MEMBERSHIP;
        m.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(err(&m), CodecError::TooMany { .. }));
    }

    #[test]
    fn meta_round_trips_and_rejects_garbage() {
        let meta = StoreMeta {
            vote: Some(Vote::new_committed(7, 3)),
            committed: Some(LogId::new_term_index(7, 40)),
            last_purged: None,
        };
        assert_eq!(StoreMeta::decode(&meta.encode()).unwrap(), meta);
        assert_eq!(
            StoreMeta::decode(&StoreMeta::default().encode()).unwrap(),
            StoreMeta::default()
        );
        assert!(matches!(
            StoreMeta::decode(&[2]),
            Err(CodecError::MetaVersion { found: 2, .. })
        ));
        assert!(matches!(
            StoreMeta::decode(&[1, 7]),
            Err(CodecError::BadFlag { value: 7, .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200), kind in 0u8..5) {
            let mut payload = vec![0u8; ENTRY_PREFIX_BYTES];
            payload[0] = kind;
            payload.extend_from_slice(&bytes);
            let _ = decode_entry(1, 1, &payload);
            let _ = decode_entry(1, 1, &bytes);
            let _ = StoreMeta::decode(&bytes);
        }

        #[test]
        fn membership_round_trips(
            configs in prop::collection::vec(prop::collection::btree_set(0u64..20, 1..5), 0..3),
            learners in prop::collection::btree_map(20u64..40, "[a-z:0-9]{0,12}", 0..4),
        ) {
            let mut nodes: BTreeMap<u64, BasicNode> =
                learners.into_iter().map(|(id, a)| (id, BasicNode::new(a))).collect();
            for id in configs.iter().flatten() {
                nodes.insert(*id, BasicNode::new(format!("n{id}")));
            }
            let m = Membership::new(configs, nodes).unwrap();
            let mut buf = Vec::new();
            encode_membership(&m, &mut buf).unwrap();
            let mut r = Reader::new(&buf, "membership");
            prop_assert_eq!(decode_membership(&mut r).unwrap(), m);
            r.finish().unwrap();
        }
    }
}
