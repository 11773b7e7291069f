//! Client and forwarding message bodies: pure encoders and decoders, no I/O (`docs/protocol.md`
//! has the byte layouts).
//!
//! All integers are little-endian. An `Option<u64>` is `[u8 present]`, then `[u64]` only when
//! present; a string is `[u32 len][utf-8]` with a per-field bound. Every client request and
//! response body starts with the client-chosen `u64 request_id`, echoed in the answer, so many
//! requests can be in flight on one stream and be answered in any order. Decoders check every
//! length and count against the bytes left before allocating, and refuse trailing bytes.
//!
//! Encoders cannot fail: a value over a limit (more than [`SUBMIT_TXS_MAX`] transactions, a
//! cluster id over [`CLUSTER_ID_BYTES_MAX`] bytes, …) is written as it is, and the receiver's
//! decoder refuses it with a typed error. A sender holding user input (the client) checks the
//! limits first; a body over the frame limit is refused by `frame_header` before it is sent.

use baton_core::node::{
    Committed, Member, NodeStatus, PeerProgress, Receipt, Role, Stage, StageReport, StageSummary,
    SubmitError,
};
use baton_core::receipt::{PROOF_PATH_MAX, SIGNED_HEADER_BYTES};
use baton_core::{
    AckLevel, Address, SignedHeader, SubmitRejection, Transaction, TxHash, TxKind, BATCH_BYTES_MAX,
    BATCH_TXS_MAX,
};
use bytes::Bytes;

/// Most transactions in one submit request (and results in one response).
pub const SUBMIT_TXS_MAX: usize = 65_536;
/// Most members (and replication entries) in a status response.
pub const STATUS_MEMBERS_MAX: usize = 1024;
/// Longest member address in a status response, in bytes.
pub const MEMBER_ADDR_BYTES_MAX: usize = baton_core::node::MEMBER_ADDR_BYTES_MAX;
/// Longest error message, in bytes; longer ones are cut (at a char boundary) when encoded.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 4096;
/// Longest cluster id in a peer hello, in bytes.
pub const CLUSTER_ID_BYTES_MAX: usize = 256;
/// Longest `Overloaded` queue name, in bytes; longer ones are cut when encoded.
pub const OVERLOADED_WHAT_BYTES_MAX: usize = 256;
/// Most duplicates in a forward response: one per transaction of a batch.
pub const FORWARD_DUPLICATES_MAX: usize = BATCH_TXS_MAX;

/// The `Overloaded` queue names a decoder maps back to a `&'static str`.
pub const OVERLOADED_WHATS: [&str; 5] = [
    "sealed batch queue",
    "dedup window (retry the submission)",
    "membership change",
    "forwarding queue",
    "proposal queue",
];
/// The `Overloaded` queue name a decoder gives to a name not in [`OVERLOADED_WHATS`].
pub const OVERLOADED_UNKNOWN: &str = "remote queue";

/// Smallest encoded transaction: `[u64 rollup_id][u8 kind][u32 len]`.
const TX_MIN_BYTES: usize = 13;
/// Smallest encoded submit result: `[u8 1][u8 code]` (ShuttingDown).
const RESULT_MIN_BYTES: usize = 2;
/// Smallest encoded member: `[u64 id][u32 len][u8 voter]`.
const MEMBER_MIN_BYTES: usize = 13;
/// Smallest encoded replication entry: `[u64 id][u8 present][u8 present]`.
const PROGRESS_MIN_BYTES: usize = 10;
/// Bytes of one encoded duplicate: `[u32 offset][u64 index][u32 offset]`.
const DUPLICATE_BYTES: usize = 16;

/// Why a message body could not be decoded (or a message not encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    /// Fewer bytes than a field (or an announced count) needs.
    #[error("{what}: needs {need} bytes, {have} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes it needs.
        need: u64,
        /// Bytes left.
        have: usize,
    },
    /// Bytes left over after a complete message.
    #[error("{what}: {len} trailing bytes")]
    Trailing {
        /// The message.
        what: &'static str,
        /// Bytes left over.
        len: usize,
    },
    /// A tag or flag byte that names no variant.
    #[error("{what}: unknown tag {value}")]
    BadTag {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u8,
    },
    /// An error code this build does not know.
    #[error("unknown error code {code}")]
    UnknownErrorCode {
        /// The code.
        code: u16,
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
    /// A string or byte field over its limit.
    #[error("{what}: {len} bytes exceed the maximum {max}")]
    TooLong {
        /// The field.
        what: &'static str,
        /// Its length in bytes.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A control command that does not decode.
    #[error("command: {0}")]
    Command(baton_core::command::CommandDecodeError),
    /// A string field that is not UTF-8.
    #[error("{what} is not UTF-8")]
    BadUtf8 {
        /// The field.
        what: &'static str,
    },
    /// A `u64` that does not fit this platform's `usize`.
    #[error("{what}: {value} does not fit in usize")]
    OutOfRange {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
}

// ---------------------------------------------------------------------------------------------
// Reading and writing fields

/// A cursor over an untrusted body: every read is bounds-checked.
pub struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `body`, the message `what` (named in errors).
    pub fn new(body: &'a [u8], what: &'static str) -> Self {
        Self { rest: body, what }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// The next `need` bytes.
    pub fn take(&mut self, need: usize) -> Result<&'a [u8], MsgError> {
        if need > self.rest.len() {
            return Err(MsgError::Truncated {
                what: self.what,
                need: need as u64,
                have: self.rest.len(),
            });
        }
        let (out, rest) = self.rest.split_at(need);
        self.rest = rest;
        Ok(out)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], MsgError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A `u8`.
    pub fn u8(&mut self) -> Result<u8, MsgError> {
        Ok(self.array::<1>()?[0])
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, MsgError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, MsgError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, MsgError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A `u64` that must fit a `usize`.
    pub fn usize(&mut self, what: &'static str) -> Result<usize, MsgError> {
        let value = self.u64()?;
        usize::try_from(value).map_err(|_| MsgError::OutOfRange { what, value })
    }

    /// A flag byte: 0 or 1.
    pub fn flag(&mut self, what: &'static str) -> Result<bool, MsgError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(MsgError::BadTag { what, value }),
        }
    }

    /// `[u8 present]`, then `[u64]` when present.
    pub fn option_u64(&mut self, what: &'static str) -> Result<Option<u64>, MsgError> {
        Ok(if self.flag(what)? {
            Some(self.u64()?)
        } else {
            None
        })
    }

    /// `[u32 len][utf-8]` of at most `max` bytes.
    pub fn str(&mut self, what: &'static str, max: usize) -> Result<&'a str, MsgError> {
        let len = self.u32()?;
        if len as usize > max {
            return Err(MsgError::TooLong {
                what,
                len: u64::from(len),
                max,
            });
        }
        std::str::from_utf8(self.take(len as usize)?).map_err(|_| MsgError::BadUtf8 { what })
    }

    /// A `u32` count of items, each at least `item_min_bytes` long, at most `max`: checked
    /// against the limit and the bytes left, so it is safe to allocate for.
    pub fn count(
        &mut self,
        what: &'static str,
        max: usize,
        item_min_bytes: usize,
    ) -> Result<usize, MsgError> {
        let count = self.u32()? as usize;
        if count > max {
            return Err(MsgError::TooMany {
                what,
                count: count as u64,
                max,
            });
        }
        let need = (count as u64).saturating_mul(item_min_bytes as u64);
        if need > self.rest.len() as u64 {
            return Err(MsgError::Truncated {
                what,
                need,
                have: self.rest.len(),
            });
        }
        Ok(count)
    }

    /// Ends the message: an error if bytes are left.
    pub fn finish(self) -> Result<(), MsgError> {
        if !self.rest.is_empty() {
            return Err(MsgError::Trailing {
                what: self.what,
                len: self.rest.len(),
            });
        }
        Ok(())
    }
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_option_u64(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put_u64(out, v);
        }
    }
}

/// A length or count as a `u32` field; one past `u32::MAX` is written as `u32::MAX`, which every
/// decoder refuses (its limits are far lower), so nothing over a limit is ever misread.
pub(crate) fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// `[u32 len][utf-8]`, as it is: a decoder refuses a string over its field's limit.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, len_u32(s.len()));
    out.extend_from_slice(s.as_bytes());
}

/// `[u32 len][utf-8]`, cut to at most `max` bytes at a char boundary.
pub(crate) fn put_str_cut(out: &mut Vec<u8>, s: &str, max: usize) {
    let mut len = s.len().min(max);
    while !s.is_char_boundary(len) {
        len -= 1;
    }
    put_u32(out, len as u32);
    out.extend_from_slice(&s.as_bytes()[..len]);
}

// ---------------------------------------------------------------------------------------------
// SubmitError

const NOT_LEADER: u8 = 1;
const OVERLOADED: u8 = 2;
const INVALID: u8 = 3;
const REJECTED: u8 = 4;
const COMMIT_TIMEOUT: u8 = 5;
const SHUTTING_DOWN: u8 = 6;
const RECEIPT_UNAVAILABLE: u8 = 7;
const UNKNOWN_ROLLUP: u8 = 8;
const MALFORMED_CIPHERTEXT: u8 = 9;
const COMMAND_REFUSED: u8 = 10;
const READ_TIMEOUT: u8 = 11;
const MEMBERSHIP_REFUSED: u8 = 12;
const LEADERSHIP_REFUSED: u8 = 13;

const EMPTY_TX: u8 = 1;
const TX_TOO_LARGE: u8 = 2;
const TX_EXCEEDS_BATCH: u8 = 3;
const SEALED_QUEUE_FULL: u8 = 4;

/// Appends `[u8 code]` and the fields of `e` (see `docs/protocol.md`).
pub fn encode_submit_error(e: &SubmitError, out: &mut Vec<u8>) {
    match e {
        SubmitError::NotLeader { leader_hint } => {
            out.push(NOT_LEADER);
            put_option_u64(out, *leader_hint);
        }
        SubmitError::Overloaded { what } => {
            out.push(OVERLOADED);
            put_str_cut(out, what, OVERLOADED_WHAT_BYTES_MAX);
        }
        SubmitError::Invalid { position, reason } => {
            out.push(INVALID);
            put_u64(out, *position as u64);
            encode_rejection(reason, out);
        }
        SubmitError::Rejected { index } => {
            out.push(REJECTED);
            put_u64(out, *index);
        }
        SubmitError::CommitTimeout { waited_ms } => {
            out.push(COMMIT_TIMEOUT);
            put_u64(out, *waited_ms);
        }
        SubmitError::ShuttingDown => out.push(SHUTTING_DOWN),
        SubmitError::ReceiptUnavailable { index } => {
            out.push(RECEIPT_UNAVAILABLE);
            put_u64(out, *index);
        }
        SubmitError::UnknownRollup {
            position,
            rollup_id,
        } => {
            out.push(UNKNOWN_ROLLUP);
            put_u64(out, *position as u64);
            put_u64(out, *rollup_id);
        }
        SubmitError::MalformedCiphertext { position, len } => {
            out.push(MALFORMED_CIPHERTEXT);
            put_u64(out, *position as u64);
            put_u64(out, *len as u64);
        }
        SubmitError::Command(rejection) => {
            out.push(COMMAND_REFUSED);
            crate::rollup_msg::encode_rejection(rejection, out);
        }
        SubmitError::ReadTimeout { min_index, applied } => {
            out.push(READ_TIMEOUT);
            put_u64(out, *min_index);
            put_option_u64(out, *applied);
        }
        SubmitError::Membership(rejection) => {
            out.push(MEMBERSHIP_REFUSED);
            crate::member_msg::encode_rejection(rejection, out);
        }
        SubmitError::Leadership(rejection) => {
            out.push(LEADERSHIP_REFUSED);
            crate::leader_msg::encode_rejection(rejection, out);
        }
    }
}

fn encode_rejection(reason: &SubmitRejection, out: &mut Vec<u8>) {
    match reason {
        SubmitRejection::EmptyTx => out.push(EMPTY_TX),
        SubmitRejection::TxTooLarge { len, max } => {
            out.push(TX_TOO_LARGE);
            put_u64(out, *len as u64);
            put_u64(out, *max as u64);
        }
        SubmitRejection::TxExceedsBatch { encoded_len, max } => {
            out.push(TX_EXCEEDS_BATCH);
            put_u64(out, *encoded_len as u64);
            put_u64(out, *max as u64);
        }
        SubmitRejection::SealedQueueFull { max } => {
            out.push(SEALED_QUEUE_FULL);
            put_u64(out, *max as u64);
        }
    }
}

/// Reads what [`encode_submit_error`] wrote.
pub fn decode_submit_error(r: &mut Reader<'_>) -> Result<SubmitError, MsgError> {
    Ok(match r.u8()? {
        NOT_LEADER => SubmitError::NotLeader {
            leader_hint: r.option_u64("leader hint")?,
        },
        OVERLOADED => {
            let what = r.str("overloaded queue", OVERLOADED_WHAT_BYTES_MAX)?;
            SubmitError::Overloaded {
                what: OVERLOADED_WHATS
                    .iter()
                    .find(|known| **known == what)
                    .copied()
                    .unwrap_or(OVERLOADED_UNKNOWN),
            }
        }
        INVALID => SubmitError::Invalid {
            position: r.usize("invalid position")?,
            reason: decode_rejection(r)?,
        },
        REJECTED => SubmitError::Rejected { index: r.u64()? },
        COMMIT_TIMEOUT => SubmitError::CommitTimeout {
            waited_ms: r.u64()?,
        },
        SHUTTING_DOWN => SubmitError::ShuttingDown,
        RECEIPT_UNAVAILABLE => SubmitError::ReceiptUnavailable { index: r.u64()? },
        UNKNOWN_ROLLUP => SubmitError::UnknownRollup {
            position: r.usize("unknown rollup position")?,
            rollup_id: r.u64()?,
        },
        MALFORMED_CIPHERTEXT => SubmitError::MalformedCiphertext {
            position: r.usize("ciphertext position")?,
            len: r.usize("ciphertext length")?,
        },
        COMMAND_REFUSED => SubmitError::Command(crate::rollup_msg::decode_rejection(r)?),
        READ_TIMEOUT => SubmitError::ReadTimeout {
            min_index: r.u64()?,
            applied: r.option_u64("read applied index")?,
        },
        MEMBERSHIP_REFUSED => SubmitError::Membership(crate::member_msg::decode_rejection(r)?),
        LEADERSHIP_REFUSED => SubmitError::Leadership(crate::leader_msg::decode_rejection(r)?),
        value => {
            return Err(MsgError::BadTag {
                what: "submit error",
                value,
            })
        }
    })
}

fn decode_rejection(r: &mut Reader<'_>) -> Result<SubmitRejection, MsgError> {
    Ok(match r.u8()? {
        EMPTY_TX => SubmitRejection::EmptyTx,
        TX_TOO_LARGE => SubmitRejection::TxTooLarge {
            len: r.usize("rejected tx length")?,
            max: r.usize("rejected tx max")?,
        },
        TX_EXCEEDS_BATCH => SubmitRejection::TxExceedsBatch {
            encoded_len: r.usize("rejected batch length")?,
            max: r.usize("rejected batch max")?,
        },
        SEALED_QUEUE_FULL => SubmitRejection::SealedQueueFull {
            max: r.usize("sealed queue max")?,
        },
        value => {
            return Err(MsgError::BadTag {
                what: "submit rejection",
                value,
            })
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Submit

const ACK_COMMITTED: u8 = 0;
const ACK_PRECONFIRMED: u8 = 1;

fn ack_byte(level: AckLevel) -> u8 {
    match level {
        AckLevel::Committed => ACK_COMMITTED,
        AckLevel::Preconfirmed => ACK_PRECONFIRMED,
    }
}

fn ack_of(value: u8, what: &'static str) -> Result<AckLevel, MsgError> {
    match value {
        ACK_COMMITTED => Ok(AckLevel::Committed),
        ACK_PRECONFIRMED => Ok(AckLevel::Preconfirmed),
        value => Err(MsgError::BadTag { what, value }),
    }
}

/// A signed header (`SIGNED_HEADER_BYTES`), decoded.
fn read_signed_header(r: &mut Reader<'_>) -> Result<SignedHeader, MsgError> {
    let bytes = r.take(SIGNED_HEADER_BYTES)?;
    SignedHeader::decode(bytes).map_err(|_| MsgError::BadTag {
        what: "signed header padding",
        value: 1,
    })
}

const TX_RAW: u8 = 0;
const TX_ENCRYPTED: u8 = 1;
const RESULT_OK: u8 = 0;
const RESULT_ERR: u8 = 1;

/// Client → node: transactions to sequence, answered once each has a receipt at `ack`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmitRequest {
    /// Client-chosen id, echoed in the response.
    pub request_id: u64,
    /// When the node answers: preconfirmed or committed.
    pub ack: AckLevel,
    /// The transactions, at most [`SUBMIT_TXS_MAX`].
    pub txs: Vec<Transaction>,
}

/// Appends `[u64 rollup_id][u8 kind][32 key_commitment if encrypted][u32 len][bytes]`.
pub(crate) fn put_tx(out: &mut Vec<u8>, tx: &Transaction) {
    put_u64(out, tx.rollup_id);
    match &tx.kind {
        TxKind::Raw => out.push(TX_RAW),
        TxKind::Encrypted { key_commitment } => {
            out.push(TX_ENCRYPTED);
            out.extend_from_slice(key_commitment);
        }
    }
    put_u32(out, len_u32(tx.bytes.len()));
    out.extend_from_slice(&tx.bytes);
}

/// Bytes [`put_tx`] appends for `tx`.
pub(crate) fn tx_encoded_bytes(tx: &Transaction) -> usize {
    let commitment = match tx.kind {
        TxKind::Raw => 0,
        TxKind::Encrypted { .. } => 32,
    };
    8 + 1 + commitment + 4 + tx.bytes.len()
}

/// Reads what [`put_tx`] wrote.
pub(crate) fn read_tx(r: &mut Reader<'_>) -> Result<Transaction, MsgError> {
    let rollup_id = r.u64()?;
    let kind = match r.u8()? {
        TX_RAW => TxKind::Raw,
        TX_ENCRYPTED => TxKind::Encrypted {
            key_commitment: r.array()?,
        },
        value => {
            return Err(MsgError::BadTag {
                what: "transaction kind",
                value,
            })
        }
    };
    let len = r.u32()? as usize;
    let bytes = r.take(len)?.to_vec();
    Ok(Transaction {
        rollup_id,
        kind,
        bytes,
    })
}

impl SubmitRequest {
    /// Appends `[u64 request_id][u8 ack (0 committed, 1 preconfirmed)][u32 count]`, then per
    /// transaction `[u64 rollup_id][u8 kind][32 key_commitment if encrypted][u32 len][bytes]`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        Self::encode_from(self.request_id, self.ack, &self.txs, out);
    }

    /// [`SubmitRequest::encode`] of a request holding `txs`, without building one (a client
    /// retrying part of a request encodes that part straight from its own transactions).
    pub fn encode_from<'a, I>(request_id: u64, ack: AckLevel, txs: I, out: &mut Vec<u8>)
    where
        I: IntoIterator<Item = &'a Transaction>,
        I::IntoIter: ExactSizeIterator + Clone,
    {
        let txs = txs.into_iter();
        let bytes: usize = txs.clone().map(tx_encoded_bytes).sum();
        out.reserve(8 + 1 + 4 + bytes);
        put_u64(out, request_id);
        out.push(ack_byte(ack));
        put_u32(out, len_u32(txs.len()));
        for tx in txs {
            put_tx(out, tx);
        }
    }

    /// Decodes a body. A transaction over the node's size limit still decodes (the node answers
    /// it with a typed rejection); only a length past the end of the body is an error.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "submit request");
        let request_id = r.u64()?;
        let ack = ack_of(r.u8()?, "submit ack")?;
        let count = r.count("submit transactions", SUBMIT_TXS_MAX, TX_MIN_BYTES)?;
        let mut txs = Vec::with_capacity(count);
        for _ in 0..count {
            txs.push(read_tx(&mut r)?);
        }
        r.finish()?;
        Ok(Self {
            request_id,
            ack,
            txs,
        })
    }
}

/// Node → client: one result per submitted transaction, in request order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmitResponse {
    /// The request's id.
    pub request_id: u64,
    /// A receipt or the reason there is none, per transaction.
    pub results: Vec<Result<Receipt, SubmitError>>,
}

/// How many top siblings (the end of the slices) `path` has in common with `previous`.
fn shared_top(previous: &[[u8; 32]], path: &[[u8; 32]]) -> usize {
    previous
        .iter()
        .rev()
        .zip(path.iter().rev())
        .take_while(|(a, b)| a == b)
        .count()
}

impl SubmitResponse {
    /// Appends `[u64 request_id][u32 h]{[160 signed header]}[u32 count]`, then per result
    /// `[u8 0][32 tx_hash][u8 level][u32 header number][u32 offset][u8 duplicate]
    /// [u8 path_len][u8 shared]{[32 sibling]}` or `[u8 1][submit error]`. Each distinct signed
    /// header is sent once; receipts name it by its number in the list. A receipt's path is
    /// sent without its top `shared` siblings, which are the top siblings of the previous
    /// receipt in the response: the receipts of one request are mostly neighbours in one batch,
    /// whose paths differ only near the leaves, so this sends about two siblings per receipt
    /// instead of the whole path (which was most of a response's bytes).
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        let mut headers: Vec<&SignedHeader> = Vec::new();
        let mut numbers = Vec::with_capacity(self.results.len());
        for r in self.results.iter().flatten() {
            let at = match headers.iter().rposition(|h| **h == r.batch) {
                Some(at) => at,
                None => {
                    headers.push(&r.batch);
                    headers.len() - 1
                }
            };
            numbers.push(at as u32);
        }
        put_u32(out, len_u32(headers.len()));
        for h in &headers {
            out.extend_from_slice(&h.encode());
        }
        put_u32(out, len_u32(self.results.len()));
        let mut numbers = numbers.into_iter();
        let mut previous: &[[u8; 32]] = &[];
        for result in &self.results {
            match result {
                Ok(receipt) => {
                    // Paths are at most PROOF_PATH_MAX (32) long; a longer one is cut (its
                    // receipt then fails verification) rather than breaking the body's framing.
                    let path = &receipt.path[..receipt.path.len().min(PROOF_PATH_MAX)];
                    let shared = shared_top(previous, path);
                    out.push(RESULT_OK);
                    out.extend_from_slice(&receipt.tx_hash.0);
                    out.push(ack_byte(receipt.level));
                    put_u32(out, numbers.next().expect("one number per receipt"));
                    put_u32(out, receipt.offset);
                    out.push(u8::from(receipt.duplicate));
                    out.push(path.len() as u8);
                    out.push(shared as u8);
                    for sibling in &path[..path.len() - shared] {
                        out.extend_from_slice(sibling);
                    }
                    previous = path;
                }
                Err(e) => {
                    out.push(RESULT_ERR);
                    encode_submit_error(e, out);
                }
            }
        }
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "submit response");
        let request_id = r.u64()?;
        let h = r.count("receipt headers", SUBMIT_TXS_MAX, SIGNED_HEADER_BYTES)?;
        let mut headers = Vec::with_capacity(h);
        for _ in 0..h {
            headers.push(read_signed_header(&mut r)?);
        }
        let count = r.count("submit results", SUBMIT_TXS_MAX, RESULT_MIN_BYTES)?;
        let mut results: Vec<Result<Receipt, SubmitError>> = Vec::with_capacity(count);
        // Where the previous receipt is in `results` (its path's top is shared).
        let mut previous: Option<usize> = None;
        for _ in 0..count {
            let result = match r.u8()? {
                RESULT_OK => {
                    let tx_hash = TxHash(r.array()?);
                    let level = ack_of(r.u8()?, "receipt level")?;
                    let number = r.u32()? as usize;
                    let batch = *headers.get(number).ok_or(MsgError::BadTag {
                        what: "receipt header number",
                        value: u8::MAX,
                    })?;
                    let offset = r.u32()?;
                    let duplicate = r.flag("receipt duplicate")?;
                    let len = r.u8()? as usize;
                    if len > PROOF_PATH_MAX {
                        return Err(MsgError::TooLong {
                            what: "receipt path",
                            len: len as u64,
                            max: PROOF_PATH_MAX,
                        });
                    }
                    let shared = r.u8()? as usize;
                    let top: &[[u8; 32]] = match previous.map(|at| &results[at]) {
                        Some(Ok(p)) => &p.path,
                        _ => &[],
                    };
                    if shared > len.min(top.len()) {
                        return Err(MsgError::TooLong {
                            what: "receipt path siblings shared with the previous receipt",
                            len: shared as u64,
                            max: len.min(top.len()),
                        });
                    }
                    let mut path = Vec::with_capacity(len);
                    for _ in 0..len - shared {
                        path.push(r.array()?);
                    }
                    path.extend_from_slice(&top[top.len() - shared..]);
                    previous = Some(results.len());
                    Ok(Receipt {
                        tx_hash,
                        level,
                        batch,
                        offset,
                        path,
                        duplicate,
                    })
                }
                RESULT_ERR => Err(decode_submit_error(&mut r)?),
                value => {
                    return Err(MsgError::BadTag {
                        what: "submit result",
                        value,
                    })
                }
            };
            results.push(result);
        }
        r.finish()?;
        Ok(Self {
            request_id,
            results,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Status

/// Client → node: the node's Raft status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusRequest {
    /// Client-chosen id, echoed in the response.
    pub request_id: u64,
}

impl StatusRequest {
    /// Appends `[u64 request_id]`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "status request");
        let request_id = r.u64()?;
        r.finish()?;
        Ok(Self { request_id })
    }
}

/// Node → client: the node's Raft status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusResponse {
    /// The request's id.
    pub request_id: u64,
    /// The status.
    pub status: NodeStatus,
}

fn role_byte(role: Role) -> u8 {
    match role {
        Role::Leader => 0,
        Role::Follower => 1,
        Role::Candidate => 2,
        Role::Learner => 3,
        Role::Shutdown => 4,
    }
}

fn role_of(value: u8) -> Result<Role, MsgError> {
    Ok(match value {
        0 => Role::Leader,
        1 => Role::Follower,
        2 => Role::Candidate,
        3 => Role::Learner,
        4 => Role::Shutdown,
        value => {
            return Err(MsgError::BadTag {
                what: "role",
                value,
            })
        }
    })
}

impl StatusResponse {
    /// Appends `[u64 request_id][u64 id][u8 role][u64 term][20 signer address]`, six optional
    /// indices (leader,
    /// last log, committed, applied, snapshot, purged), `[u32 n]{[u64 id][u32 len][addr][u8
    /// voter]}` members and `[u32 n]{[u64 id][option matched][option last heard ms]}`
    /// replication.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let s = &self.status;
        put_u64(out, self.request_id);
        put_u64(out, s.id);
        out.push(role_byte(s.role));
        put_u64(out, s.term);
        out.extend_from_slice(&s.signer.0);
        for v in [
            s.leader,
            s.last_log_index,
            s.committed_index,
            s.applied_index,
            s.snapshot_index,
            s.purged_index,
        ] {
            put_option_u64(out, v);
        }
        put_members(out, &s.members);
        put_u32(out, len_u32(s.replication.len()));
        for p in &s.replication {
            put_u64(out, p.id);
            put_option_u64(out, p.matched_index);
            put_option_u64(out, p.last_heard_ms);
        }
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "status response");
        let request_id = r.u64()?;
        let id = r.u64()?;
        let role = role_of(r.u8()?)?;
        let term = r.u64()?;
        let signer = Address(r.array()?);
        let leader = r.option_u64("leader")?;
        let last_log_index = r.option_u64("last log index")?;
        let committed_index = r.option_u64("committed index")?;
        let applied_index = r.option_u64("applied index")?;
        let snapshot_index = r.option_u64("snapshot index")?;
        let purged_index = r.option_u64("purged index")?;
        let members = read_members(&mut r)?;
        let n = r.count("status replication", STATUS_MEMBERS_MAX, PROGRESS_MIN_BYTES)?;
        let mut replication = Vec::with_capacity(n);
        for _ in 0..n {
            replication.push(PeerProgress {
                id: r.u64()?,
                matched_index: r.option_u64("matched index")?,
                last_heard_ms: r.option_u64("last heard")?,
            });
        }
        r.finish()?;
        Ok(Self {
            request_id,
            status: NodeStatus {
                id,
                role,
                term,
                leader,
                last_log_index,
                committed_index,
                applied_index,
                snapshot_index,
                purged_index,
                members,
                replication,
                signer,
            },
        })
    }
}

/// Appends `[u32 n]{[u64 id][u32 len][addr][u8 voter]}`.
pub(crate) fn put_members(out: &mut Vec<u8>, members: &[Member]) {
    put_u32(out, len_u32(members.len()));
    for m in members {
        put_u64(out, m.id);
        put_str(out, &m.addr);
        out.push(u8::from(m.voter));
    }
}

/// Reads what [`put_members`] wrote (at most [`STATUS_MEMBERS_MAX`]).
pub(crate) fn read_members(r: &mut Reader<'_>) -> Result<Vec<Member>, MsgError> {
    let n = r.count("members", STATUS_MEMBERS_MAX, MEMBER_MIN_BYTES)?;
    let mut members = Vec::with_capacity(n);
    for _ in 0..n {
        members.push(Member {
            id: r.u64()?,
            addr: r.str("member address", MEMBER_ADDR_BYTES_MAX)?.to_owned(),
            voter: r.flag("member voter")?,
        });
    }
    Ok(members)
}

// ---------------------------------------------------------------------------------------------
// Stages

/// Client → node: the node's stage latencies since the previous such request (or the node's
/// start, or its stage logger's last window); the node starts a new window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagesRequest {
    /// Client-chosen id, echoed in the response.
    pub request_id: u64,
}

impl StagesRequest {
    /// Appends `[u64 request_id]`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "stages request");
        let request_id = r.u64()?;
        r.finish()?;
        Ok(Self { request_id })
    }
}

/// Node → client: its stage latencies over the window the request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagesResponse {
    /// The request's id.
    pub request_id: u64,
    /// The window's latencies.
    pub report: StageReport,
}

/// Most stages a response may carry (a decoder's bound; a node sends [`Stage::ALL`]).
const STAGES_MAX: usize = 64;
/// Bytes of one encoded stage.
const STAGE_BYTES: usize = 1 + 5 * 8;

impl StagesResponse {
    /// Appends `[u64 request_id][u64 window_us][u32 n]{[u8 stage][u64 count][u64 p50_us][u64
    /// p90_us][u64 p99_us][u64 max_us]}`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        put_u64(
            out,
            u64::try_from(self.report.window.as_micros()).unwrap_or(u64::MAX),
        );
        put_u32(out, len_u32(self.report.stages.len()));
        for s in &self.report.stages {
            out.push(s.stage.code());
            for v in [s.count, s.p50_us, s.p90_us, s.p99_us, s.max_us] {
                put_u64(out, v);
            }
        }
    }

    /// Decodes a body. Stages this client does not know (a newer node's) are skipped.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "stages response");
        let request_id = r.u64()?;
        let window = std::time::Duration::from_micros(r.u64()?);
        let n = r.count("stages", STAGES_MAX, STAGE_BYTES)?;
        let mut stages = Vec::with_capacity(n);
        for _ in 0..n {
            let code = r.u8()?;
            let [count, p50_us, p90_us, p99_us, max_us] =
                [r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?];
            if let Some(stage) = Stage::from_code(code) {
                stages.push(StageSummary {
                    stage,
                    count,
                    p50_us,
                    p90_us,
                    p99_us,
                    max_us,
                });
            }
        }
        r.finish()?;
        Ok(Self {
            request_id,
            report: StageReport { window, stages },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Error

/// What went wrong with a request (or a connection), in an [`ErrorMsg`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The body could not be decoded.
    Malformed = 1,
    /// A frame kind not expected here (e.g. a peer kind on a client connection).
    UnexpectedKind = 2,
    /// A request over a limit.
    TooLarge = 3,
    /// A bounded queue is full; retry later.
    Overloaded = 4,
    /// The node is stopping.
    ShuttingDown = 5,
    /// A peer-only request from a client.
    NotAPeer = 6,
    /// A peer of another cluster.
    WrongCluster = 7,
    /// A bug on the node.
    Internal = 8,
}

impl ErrorCode {
    /// The code for a `u16`, if it is one.
    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match code {
            1 => Malformed,
            2 => UnexpectedKind,
            3 => TooLarge,
            4 => Overloaded,
            5 => ShuttingDown,
            6 => NotAPeer,
            7 => WrongCluster,
            8 => Internal,
            _ => return None,
        })
    }
}

/// Either way: a typed error that ends the request `request_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorMsg {
    /// The request it answers (0 when it answers none, e.g. a bad first frame).
    pub request_id: u64,
    /// What went wrong.
    pub code: ErrorCode,
    /// Details for humans, at most [`ERROR_MESSAGE_BYTES_MAX`] bytes on the wire.
    pub message: String,
}

impl ErrorMsg {
    /// Appends `[u64 request_id][u16 code][u32 len][utf-8]`; a longer message is cut to
    /// [`ERROR_MESSAGE_BYTES_MAX`] bytes at a char boundary.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        out.extend_from_slice(&(self.code as u16).to_le_bytes());
        put_str_cut(out, &self.message, ERROR_MESSAGE_BYTES_MAX);
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "error");
        let request_id = r.u64()?;
        let code = r.u16()?;
        let code = ErrorCode::from_u16(code).ok_or(MsgError::UnknownErrorCode { code })?;
        let message = r.str("error message", ERROR_MESSAGE_BYTES_MAX)?.to_owned();
        r.finish()?;
        Ok(Self {
            request_id,
            code,
            message,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Peers

/// Peer → peer: the first frame on a peer connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The cluster the sender belongs to, at most [`CLUSTER_ID_BYTES_MAX`] bytes.
    pub cluster_id: String,
    /// The sender's node id.
    pub node_id: u64,
}

impl Hello {
    /// Appends `[u64 node_id][u32 len][cluster_id utf-8]`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.node_id);
        put_str(out, &self.cluster_id);
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "peer hello");
        let node_id = r.u64()?;
        let cluster_id = r.str("cluster id", CLUSTER_ID_BYTES_MAX)?.to_owned();
        r.finish()?;
        Ok(Self {
            cluster_id,
            node_id,
        })
    }
}

/// Follower → leader: a sealed batch to propose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardRequest {
    /// Follower-chosen id, echoed in the [`ForwardResponse`].
    pub request_id: u64,
    /// The encoded batch, at most `BATCH_BYTES_MAX` bytes.
    pub batch: Bytes,
}

impl ForwardRequest {
    /// The body as chunks, the batch shared (see [`encode_forward_request`]).
    pub fn encode(&self) -> Vec<Bytes> {
        encode_forward_request(self.request_id, &self.batch)
    }

    /// [`encode_forward_request`], for callers holding the parts.
    pub fn encode_chunks(request_id: u64, batch: &Bytes) -> Vec<Bytes> {
        encode_forward_request(request_id, batch)
    }

    /// [`decode_forward_request`]: the request id and the batch bytes, in place.
    pub fn decode(body: &[u8]) -> Result<(u64, &[u8]), MsgError> {
        decode_forward_request(body)
    }
}

/// A forward request body as chunks whose concatenation is `[u64 request_id][batch]`; the batch
/// chunk shares `batch`'s buffer (no copy).
pub fn encode_forward_request(request_id: u64, batch: &Bytes) -> Vec<Bytes> {
    let id = Bytes::copy_from_slice(&request_id.to_le_bytes());
    vec![id, batch.clone()]
}

/// The request id and the batch bytes of a forward request body (the batch in place; the
/// receiver copies it into an aligned buffer and validates it).
pub fn decode_forward_request(body: &[u8]) -> Result<(u64, &[u8]), MsgError> {
    let mut r = Reader::new(body, "forward request");
    let request_id = r.u64()?;
    let batch = r.take(r.remaining())?;
    if batch.len() > BATCH_BYTES_MAX {
        return Err(MsgError::TooLong {
            what: "forwarded batch",
            len: batch.len() as u64,
            max: BATCH_BYTES_MAX,
        });
    }
    Ok((request_id, batch))
}

/// Leader → follower: the leader signed a forwarded batch (sent before its
/// [`ForwardResponse`], so the follower can answer preconfirmation requests without waiting for
/// the commit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardSealed {
    /// The forward request's id.
    pub request_id: u64,
    /// The leader's signed header of the batch.
    pub seal: SignedHeader,
}

impl ForwardSealed {
    /// Appends `[u64 request_id][signed header]`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        out.extend_from_slice(&self.seal.encode());
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "forward sealed");
        let request_id = r.u64()?;
        let seal = read_signed_header(&mut r)?;
        r.finish()?;
        Ok(ForwardSealed { request_id, seal })
    }
}

/// Leader → follower: where a forwarded batch committed, or why it did not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardResponse {
    /// The forward request's id.
    pub request_id: u64,
    /// The outcome.
    pub result: Result<Committed, SubmitError>,
}

impl ForwardResponse {
    /// Appends `[u64 request_id]`, then `[u8 0][u64 index][u8 signed][160 signed header if
    /// signed][u32 n]{[u32 offset][u64 first index][u32 first offset]}` or
    /// `[u8 1][submit error]`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        match &self.result {
            Ok(c) => {
                out.push(RESULT_OK);
                put_u64(out, c.index);
                out.push(u8::from(c.seal.is_some()));
                if let Some(seal) = &c.seal {
                    out.extend_from_slice(&seal.encode());
                }
                put_u32(out, len_u32(c.duplicates.len()));
                for (offset, (index, first_offset)) in &c.duplicates {
                    put_u32(out, *offset);
                    put_u64(out, *index);
                    put_u32(out, *first_offset);
                }
            }
            Err(e) => {
                out.push(RESULT_ERR);
                encode_submit_error(e, out);
            }
        }
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "forward response");
        let request_id = r.u64()?;
        let result = match r.u8()? {
            RESULT_OK => {
                let index = r.u64()?;
                let seal = match r.flag("forward signed")? {
                    true => Some(read_signed_header(&mut r)?),
                    false => None,
                };
                let n = r.count(
                    "forward duplicates",
                    FORWARD_DUPLICATES_MAX,
                    DUPLICATE_BYTES,
                )?;
                let mut duplicates = Vec::with_capacity(n);
                for _ in 0..n {
                    duplicates.push((r.u32()?, (r.u64()?, r.u32()?)));
                }
                Ok(Committed {
                    index,
                    duplicates,
                    seal,
                })
            }
            RESULT_ERR => Err(decode_submit_error(&mut r)?),
            value => {
                return Err(MsgError::BadTag {
                    what: "forward result",
                    value,
                })
            }
        };
        r.finish()?;
        Ok(Self { request_id, result })
    }
}

#[cfg(test)]
mod tests {
    use baton_core::TX_BYTES_MAX;
    use proptest::prelude::*;

    use super::*;

    fn every_submit_error() -> Vec<SubmitError> {
        let mut errors = vec![
            SubmitError::NotLeader { leader_hint: None },
            SubmitError::NotLeader {
                leader_hint: Some(3),
            },
            SubmitError::Rejected { index: 77 },
            SubmitError::CommitTimeout { waited_ms: 5000 },
            SubmitError::ShuttingDown,
            SubmitError::ReceiptUnavailable { index: 12 },
            SubmitError::UnknownRollup {
                position: 3,
                rollup_id: 99,
            },
            SubmitError::MalformedCiphertext {
                position: 1,
                len: 20,
            },
            SubmitError::ReadTimeout {
                min_index: 50,
                applied: None,
            },
            SubmitError::Command(baton_core::command::CommandRejection::WrongKey {
                tx_hash: TxHash([4; 32]),
            }),
        ];
        errors.extend(
            crate::member_msg::every_rejection()
                .into_iter()
                .map(SubmitError::Membership),
        );
        errors.extend(
            crate::leader_msg::every_rejection()
                .into_iter()
                .map(SubmitError::Leadership),
        );
        for what in OVERLOADED_WHATS.iter().chain([&OVERLOADED_UNKNOWN]) {
            errors.push(SubmitError::Overloaded { what });
        }
        for reason in [
            SubmitRejection::EmptyTx,
            SubmitRejection::TxTooLarge {
                len: TX_BYTES_MAX + 1,
                max: TX_BYTES_MAX,
            },
            SubmitRejection::TxExceedsBatch {
                encoded_len: 9000,
                max: 8192,
            },
            SubmitRejection::SealedQueueFull { max: 64 },
        ] {
            errors.push(SubmitError::Invalid {
                position: 12,
                reason,
            });
        }
        errors
    }

    fn sample_receipt(
        tx: u8,
        index: u64,
        offset: u32,
        level: AckLevel,
        duplicate: bool,
    ) -> Receipt {
        let signer = baton_core::Signer::from_secret(&[7; 32]).unwrap();
        let header = baton_core::BatchHeader {
            term: 3,
            index,
            prev_batch_hash: [1; 32],
            tx_merkle_root: [2; 32],
            tx_count: offset.saturating_add(1),
            timestamp_us: 99,
        };
        Receipt {
            tx_hash: TxHash([tx; 32]),
            level,
            batch: SignedHeader::sign(header, &signer),
            offset,
            path: vec![[tx; 32]; (offset % 16) as usize],
            duplicate,
        }
    }

    fn sample_submit() -> SubmitRequest {
        SubmitRequest {
            request_id: 42,
            ack: AckLevel::Preconfirmed,
            txs: vec![
                Transaction {
                    rollup_id: 7,
                    kind: TxKind::Raw,
                    bytes: vec![1, 2, 3],
                },
                Transaction {
                    rollup_id: u64::MAX,
                    kind: TxKind::Encrypted {
                        key_commitment: [9; 32],
                    },
                    bytes: vec![0xab; 100],
                },
                // Empty: decodes; the node rejects it with a typed error.
                Transaction {
                    rollup_id: 0,
                    kind: TxKind::Raw,
                    bytes: Vec::new(),
                },
            ],
        }
    }

    #[test]
    fn a_request_encoded_from_a_subset_is_that_request() {
        let whole = sample_submit();
        let mut full = Vec::new();
        whole.encode(&mut full);
        // Exactly sized up front: the sum of the per-transaction sizes plus the fixed head.
        let expected: usize = 13 + whole.txs.iter().map(tx_encoded_bytes).sum::<usize>();
        assert_eq!(full.len(), expected);
        let subset = [2usize, 1];
        let mut body = Vec::new();
        SubmitRequest::encode_from(
            7,
            AckLevel::Committed,
            subset.iter().map(|&i| &whole.txs[i]),
            &mut body,
        );
        let decoded = SubmitRequest::decode(&body).expect("decodes");
        assert_eq!(
            decoded,
            SubmitRequest {
                request_id: 7,
                ack: AckLevel::Committed,
                txs: vec![whole.txs[2].clone(), whole.txs[1].clone()],
            }
        );
    }

    fn sample_status() -> StatusResponse {
        StatusResponse {
            request_id: 5,
            status: NodeStatus {
                id: 1,
                role: Role::Leader,
                term: 9,
                leader: Some(1),
                last_log_index: Some(100),
                committed_index: Some(99),
                applied_index: Some(98),
                snapshot_index: None,
                purged_index: Some(0),
                signer: Address([0x5a; 20]),
                members: vec![
                    Member {
                        id: 1,
                        addr: "10.0.0.1:7000".into(),
                        voter: true,
                    },
                    Member {
                        id: 4,
                        addr: "learner.example:7000".into(),
                        voter: false,
                    },
                ],
                replication: vec![
                    PeerProgress {
                        id: 4,
                        matched_index: None,
                        last_heard_ms: None,
                    },
                    PeerProgress {
                        id: 2,
                        matched_index: Some(99),
                        last_heard_ms: Some(12),
                    },
                ],
            },
        }
    }

    fn encoded(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        f(&mut out);
        out
    }

    /// A valid body of every message, with a decoder that checks it.
    /// A message name, a valid body, and a decoder that says whether bytes decode.
    type Case = (&'static str, Vec<u8>, fn(&[u8]) -> bool);

    fn valid_bodies() -> Vec<Case> {
        let mut out: Vec<Case> = vec![
            (
                "submit request",
                encoded(|o| sample_submit().encode(o)),
                |b| SubmitRequest::decode(b).is_ok(),
            ),
            (
                "status request",
                encoded(|o| StatusRequest { request_id: 1 }.encode(o)),
                |b| StatusRequest::decode(b).is_ok(),
            ),
            (
                "status response",
                encoded(|o| sample_status().encode(o)),
                |b| StatusResponse::decode(b).is_ok(),
            ),
            (
                "stages request",
                encoded(|o| StagesRequest { request_id: 1 }.encode(o)),
                |b| StagesRequest::decode(b).is_ok(),
            ),
            (
                "stages response",
                encoded(|o| sample_stages().encode(o)),
                |b| StagesResponse::decode(b).is_ok(),
            ),
            (
                "error",
                encoded(|o| {
                    ErrorMsg {
                        request_id: 3,
                        code: ErrorCode::WrongCluster,
                        message: "cluster a, not b".into(),
                    }
                    .encode(o)
                }),
                |b| ErrorMsg::decode(b).is_ok(),
            ),
            (
                "hello",
                encoded(|o| {
                    Hello {
                        cluster_id: "prod-eu".into(),
                        node_id: 3,
                    }
                    .encode(o)
                }),
                |b| Hello::decode(b).is_ok(),
            ),
            (
                "forward ok",
                encoded(|o| {
                    ForwardResponse {
                        request_id: 8,
                        result: Ok(Committed {
                            index: 50,
                            duplicates: vec![(1, (40, 2)), (3, (41, 0))],
                            seal: Some(sample_receipt(1, 50, 0, AckLevel::Committed, false).batch),
                        }),
                    }
                    .encode(o)
                }),
                |b| ForwardResponse::decode(b).is_ok(),
            ),
        ];
        let results = every_submit_error()
            .into_iter()
            .map(Err)
            .chain([Ok(sample_receipt(4, 10, 2, AckLevel::Committed, true))])
            .collect();
        out.push((
            "submit response",
            encoded(|o| {
                SubmitResponse {
                    request_id: 6,
                    results,
                }
                .encode(o)
            }),
            |b| SubmitResponse::decode(b).is_ok(),
        ));
        for e in every_submit_error() {
            out.push((
                "forward error",
                encoded(|o| {
                    ForwardResponse {
                        request_id: 8,
                        result: Err(e),
                    }
                    .encode(o)
                }),
                |b| ForwardResponse::decode(b).is_ok(),
            ));
        }
        out
    }

    #[test]
    fn submit_round_trips() {
        let req = sample_submit();
        let body = encoded(|o| req.encode(o));
        assert_eq!(SubmitRequest::decode(&body).unwrap(), req);

        let mut results: Vec<Result<Receipt, SubmitError>> =
            every_submit_error().into_iter().map(Err).collect();
        results.push(Ok(sample_receipt(4, 10, 2, AckLevel::Preconfirmed, false)));
        results.push(Ok(sample_receipt(
            5,
            u64::MAX,
            u32::MAX,
            AckLevel::Committed,
            true,
        )));
        // Same batch as the first: its header is sent once.
        results.push(Ok(Receipt {
            offset: 1,
            ..sample_receipt(4, 10, 2, AckLevel::Preconfirmed, false)
        }));
        let resp = SubmitResponse {
            request_id: u64::MAX,
            results,
        };
        let body = encoded(|o| resp.encode(o));
        assert_eq!(SubmitResponse::decode(&body).unwrap(), resp);
    }

    /// Receipts of neighbouring transactions of one batch, as a node answers a request: real
    /// Merkle paths, which share their top siblings; an error and a receipt of another batch
    /// in between. The response round-trips, every decoded receipt verifies, and the shared
    /// tops make it a fraction of what whole paths would take.
    #[test]
    fn neighbouring_receipts_send_their_shared_path_tops_once() {
        let signer = baton_core::Signer::from_secret(&[7; 32]).unwrap();
        let txs: Vec<TxHash> = (0..700u32).map(|i| TxHash::of(&i.to_le_bytes())).collect();
        let tree = baton_core::MerkleTree::new(&txs);
        let header = baton_core::BatchHeader {
            term: 3,
            index: 10,
            prev_batch_hash: [1; 32],
            tx_merkle_root: tree.root(),
            tx_count: txs.len() as u32,
            timestamp_us: 99,
        };
        let batch = SignedHeader::sign(header, &signer);
        let receipt = |offset: u32| Receipt {
            tx_hash: txs[offset as usize],
            level: AckLevel::Committed,
            batch,
            offset,
            path: tree.proof(offset as usize).unwrap().path,
            duplicate: false,
        };
        let mut results: Vec<Result<Receipt, SubmitError>> =
            (200..300).map(|o| Ok(receipt(o))).collect();
        results.insert(50, Err(SubmitError::ShuttingDown));
        results.insert(
            70,
            Ok(sample_receipt(4, 11, 9, AckLevel::Preconfirmed, false)),
        );
        results.push(Ok(receipt(699)));
        let resp = SubmitResponse {
            request_id: 1,
            results,
        };
        let body = encoded(|o| resp.encode(o));
        let decoded = SubmitResponse::decode(&body).unwrap();
        assert_eq!(decoded, resp);
        for r in decoded
            .results
            .iter()
            .flatten()
            .filter(|r| r.batch == batch)
        {
            r.verify(&[signer.address()]).unwrap();
        }
        let whole_paths: usize = resp
            .results
            .iter()
            .flatten()
            .map(|r| 32 * r.path.len())
            .sum();
        // Request id, two headers, count, 102 receipts' fixed 45 bytes, the 2-byte error.
        let sent_paths = body.len() - 8 - 4 - 2 * 160 - 4 - 102 * 45 - 2;
        assert!(
            sent_paths * 3 < whole_paths,
            "{sent_paths} path bytes sent for {whole_paths} of paths"
        );
    }

    /// A receipt that claims more shared siblings than the previous receipt has (or than its
    /// own path) is refused, not read past.
    #[test]
    fn a_shared_path_top_past_the_previous_receipt_is_refused() {
        let first = sample_receipt(4, 10, 3, AckLevel::Committed, false);
        let resp = SubmitResponse {
            request_id: 1,
            results: vec![Ok(first.clone()), Ok(first)],
        };
        let mut body = encoded(|o| resp.encode(o));
        // The second receipt's `shared` byte: the last of its fixed part before the (empty)
        // rest of its path; it shares all 3 siblings.
        let at = body.len() - 1;
        assert_eq!(body[at], 3);
        assert!(SubmitResponse::decode(&body).is_ok());
        body[at] = 4;
        let e = SubmitResponse::decode(&body).unwrap_err();
        assert!(e.to_string().contains("shared"), "{e}");
        // The first receipt has no previous one to share with.
        let first_shared = 8 + 4 + 160 + 4 + 1 + 32 + 1 + 4 + 4 + 1 + 1;
        assert_eq!(body[first_shared], 0);
        body[at] = 3;
        body[first_shared] = 1;
        let e = SubmitResponse::decode(&body).unwrap_err();
        assert!(e.to_string().contains("shared"), "{e}");
    }

    /// An error between two receipts does not break the sharing: the receipt after it shares
    /// with the one before. A receipt may not share more than its own path either.
    #[test]
    fn sharing_skips_errors_and_is_bounded_by_the_receipts_own_path() {
        let first = sample_receipt(4, 10, 3, AckLevel::Committed, false);
        let resp = SubmitResponse {
            request_id: 1,
            results: vec![Ok(first.clone()), Err(SubmitError::ShuttingDown), Ok(first)],
        };
        let body = encoded(|o| resp.encode(o));
        assert_eq!(
            body[body.len() - 1],
            3,
            "the last receipt shares its whole path"
        );
        assert_eq!(SubmitResponse::decode(&body).unwrap(), resp);

        // A 2-sibling path after a 3-sibling one shares at most 2.
        let short = sample_receipt(4, 10, 2, AckLevel::Committed, false);
        let resp = SubmitResponse {
            request_id: 1,
            results: vec![
                Ok(sample_receipt(4, 10, 3, AckLevel::Committed, false)),
                Ok(short),
            ],
        };
        let mut body = encoded(|o| resp.encode(o));
        let at = body.len() - 1;
        assert_eq!(body[at], 2);
        body[at] = 3;
        let e = SubmitResponse::decode(&body).unwrap_err();
        assert!(e.to_string().contains("shared"), "{e}");
    }

    #[test]
    fn every_submit_error_round_trips() {
        for e in every_submit_error() {
            let body = encoded(|o| encode_submit_error(&e, o));
            let mut r = Reader::new(&body, "test");
            assert_eq!(decode_submit_error(&mut r).unwrap(), e);
            r.finish().unwrap();
        }
        // A queue this build does not know keeps its meaning, not its name.
        let body = encoded(|o| {
            encode_submit_error(
                &SubmitError::Overloaded {
                    what: "a queue from a newer build",
                },
                o,
            )
        });
        assert_eq!(
            decode_submit_error(&mut Reader::new(&body, "test")).unwrap(),
            SubmitError::Overloaded {
                what: OVERLOADED_UNKNOWN
            }
        );
    }

    fn sample_stages() -> StagesResponse {
        StagesResponse {
            request_id: 5,
            report: StageReport {
                window: std::time::Duration::from_micros(10_000_123),
                stages: Stage::ALL
                    .iter()
                    .enumerate()
                    .map(|(i, &stage)| {
                        let i = i as u64;
                        StageSummary {
                            stage,
                            count: 1000 + i,
                            p50_us: 10 * i,
                            p90_us: 20 * i,
                            p99_us: 30 * i,
                            max_us: u64::MAX - i,
                        }
                    })
                    .collect(),
            },
        }
    }

    #[test]
    fn stages_round_trip_and_unknown_stages_are_skipped() {
        let req = StagesRequest { request_id: 9 };
        assert_eq!(
            StagesRequest::decode(&encoded(|o| req.encode(o))).unwrap(),
            req
        );
        let resp = sample_stages();
        assert_eq!(
            StagesResponse::decode(&encoded(|o| resp.encode(o))).unwrap(),
            resp
        );
        // A newer node's stage this client does not know: skipped, the rest kept.
        let mut body = encoded(|o| resp.encode(o));
        let n = resp.report.stages.len();
        body[16..20].copy_from_slice(&(n as u32 + 1).to_le_bytes());
        body.push(200);
        body.extend_from_slice(&[7; 40]);
        let decoded = StagesResponse::decode(&body).unwrap();
        assert_eq!(decoded, resp);
        // A count past the bound is refused before anything is allocated for it.
        let mut huge = encoded(|o| resp.encode(o));
        huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            StagesResponse::decode(&huge),
            Err(MsgError::TooMany { .. })
        ));
    }

    #[test]
    fn status_error_hello_and_forward_round_trip() {
        let req = StatusRequest { request_id: 77 };
        assert_eq!(
            StatusRequest::decode(&encoded(|o| req.encode(o))).unwrap(),
            req
        );

        for role in Role::ALL {
            let mut resp = sample_status();
            resp.status.role = role;
            let body = encoded(|o| resp.encode(o));
            assert_eq!(StatusResponse::decode(&body).unwrap(), resp);
        }
        let mut empty = sample_status();
        empty.status.members.clear();
        empty.status.replication.clear();
        empty.status.leader = None;
        let body = encoded(|o| empty.encode(o));
        assert_eq!(StatusResponse::decode(&body).unwrap(), empty);

        for code in 1..=8 {
            let msg = ErrorMsg {
                request_id: code.into(),
                code: ErrorCode::from_u16(code).unwrap(),
                message: format!("error {code}"),
            };
            assert_eq!(msg.code as u16, code);
            assert_eq!(ErrorMsg::decode(&encoded(|o| msg.encode(o))).unwrap(), msg);
        }

        let hello = Hello {
            cluster_id: "c".repeat(CLUSTER_ID_BYTES_MAX),
            node_id: 9,
        };
        let body = encoded(|o| hello.encode(o));
        assert_eq!(Hello::decode(&body).unwrap(), hello);

        let committed = ForwardResponse {
            request_id: 1,
            result: Ok(Committed {
                index: 50,
                duplicates: vec![(1, (40, 2)), (3, (41, 0))],
                seal: Some(sample_receipt(2, 50, 3, AckLevel::Committed, false).batch),
            }),
        };
        let body = encoded(|o| committed.encode(o));
        assert_eq!(ForwardResponse::decode(&body).unwrap(), committed);
        let unsigned = ForwardResponse {
            request_id: 1,
            result: Ok(Committed {
                index: 50,
                duplicates: vec![],
                seal: None,
            }),
        };
        let body = encoded(|o| unsigned.encode(o));
        assert_eq!(ForwardResponse::decode(&body).unwrap(), unsigned);
        let body = encoded(|o| committed.encode(o));
        assert_eq!(ForwardResponse::decode(&body).unwrap(), committed);
        for e in every_submit_error() {
            let failed = ForwardResponse {
                request_id: 2,
                result: Err(e),
            };
            let body = encoded(|o| failed.encode(o));
            assert_eq!(ForwardResponse::decode(&body).unwrap(), failed);
        }
    }

    #[test]
    fn forward_seal_roundtrips_and_refuses_bad_lengths() {
        let sealed = ForwardSealed {
            request_id: 7,
            seal: sample_receipt(2, 50, 3, AckLevel::Preconfirmed, false).batch,
        };
        let body = encoded(|o| sealed.encode(o));
        assert_eq!(ForwardSealed::decode(&body).unwrap(), sealed);
        assert!(
            ForwardSealed::decode(&body[..body.len() - 1]).is_err(),
            "truncated"
        );
        let mut longer = body.clone();
        longer.push(0);
        assert!(ForwardSealed::decode(&longer).is_err(), "trailing bytes");
    }

    #[test]
    fn forward_request_shares_the_batch() {
        let batch = Bytes::from(vec![7u8; 300]);
        let req = ForwardRequest {
            request_id: 11,
            batch: batch.clone(),
        };
        let chunks = req.encode();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[1].as_ptr(), batch.as_ptr());
        let body: Vec<u8> = chunks.concat();
        assert_eq!(decode_forward_request(&body).unwrap(), (11, &batch[..]));

        assert!(matches!(
            decode_forward_request(&[1, 2, 3]),
            Err(MsgError::Truncated {
                need: 8,
                have: 3,
                ..
            })
        ));
        let mut big = vec![0u8; 8 + BATCH_BYTES_MAX + 1];
        big[0] = 1;
        assert_eq!(
            decode_forward_request(&big),
            Err(MsgError::TooLong {
                what: "forwarded batch",
                len: BATCH_BYTES_MAX as u64 + 1,
                max: BATCH_BYTES_MAX
            })
        );
    }

    #[test]
    fn tx_lengths_are_checked_against_the_body_not_the_core_limit() {
        // Over the core limit but inside the body: decodes (the node rejects it later).
        let req = SubmitRequest {
            request_id: 1,
            ack: AckLevel::Committed,
            txs: vec![Transaction {
                rollup_id: 1,
                kind: TxKind::Raw,
                bytes: vec![5; TX_BYTES_MAX + 1],
            }],
        };
        let body = encoded(|o| req.encode(o));
        assert_eq!(SubmitRequest::decode(&body).unwrap(), req);

        // A length past the end of the body is an error.
        let mut body = encoded(|o| sample_submit().encode(o));
        let len_at = 8 + 1 + 4 + 8 + 1; // first tx's length field
        body[len_at..len_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            SubmitRequest::decode(&body),
            Err(MsgError::Truncated { need, .. }) if need == u64::from(u32::MAX)
        ));
    }

    #[test]
    fn bad_bodies_get_typed_errors() {
        let mut body = encoded(|o| sample_submit().encode(o));
        body[8] = 2;
        assert_eq!(
            SubmitRequest::decode(&body),
            Err(MsgError::BadTag {
                what: "submit ack",
                value: 2
            })
        );
        // A receipt naming a header the response does not carry.
        let resp = SubmitResponse {
            request_id: 1,
            results: vec![Ok(sample_receipt(3, 9, 1, AckLevel::Committed, false))],
        };
        let mut body = encoded(|o| resp.encode(o));
        let number_at = 8 + 4 + SIGNED_HEADER_BYTES + 4 + 1 + 32 + 1;
        body[number_at] = 1;
        assert!(matches!(
            SubmitResponse::decode(&body),
            Err(MsgError::BadTag {
                what: "receipt header number",
                ..
            })
        ));

        // Counts are checked against the limit and the bytes left before allocating.
        let mut head = 1u64.to_le_bytes().to_vec();
        head.push(0);
        let mut over = head.clone();
        over.extend_from_slice(&(SUBMIT_TXS_MAX as u32 + 1).to_le_bytes());
        assert!(matches!(
            SubmitRequest::decode(&over),
            Err(MsgError::TooMany { count, .. }) if count == SUBMIT_TXS_MAX as u64 + 1
        ));
        let mut short = head.clone();
        short.extend_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            SubmitRequest::decode(&short),
            Err(MsgError::Truncated {
                need: 13_000,
                have: 0,
                ..
            })
        ));

        let too_many = SubmitRequest {
            ack: AckLevel::Committed,
            request_id: 1,
            txs: vec![
                Transaction {
                    rollup_id: 0,
                    kind: TxKind::Raw,
                    bytes: vec![1],
                };
                SUBMIT_TXS_MAX + 1
            ],
        };
        // Encoding writes it as it is; the receiver refuses it.
        let body = encoded(|o| too_many.encode(o));
        assert_eq!(
            SubmitRequest::decode(&body),
            Err(MsgError::TooMany {
                what: "submit transactions",
                count: SUBMIT_TXS_MAX as u64 + 1,
                max: SUBMIT_TXS_MAX
            })
        );

        let mut body = 3u64.to_le_bytes().to_vec();
        body.extend_from_slice(&99u16.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            ErrorMsg::decode(&body),
            Err(MsgError::UnknownErrorCode { code: 99 })
        );

        let long = Hello {
            cluster_id: "c".repeat(CLUSTER_ID_BYTES_MAX + 1),
            node_id: 1,
        };
        assert_eq!(
            Hello::decode(&encoded(|o| long.encode(o))),
            Err(MsgError::TooLong {
                what: "cluster id",
                len: CLUSTER_ID_BYTES_MAX as u64 + 1,
                max: CLUSTER_ID_BYTES_MAX
            })
        );
        let mut body = 1u64.to_le_bytes().to_vec();
        body.extend_from_slice(&2u32.to_le_bytes());
        body.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(
            Hello::decode(&body),
            Err(MsgError::BadUtf8 { what: "cluster id" })
        );

        let mut long_addr = sample_status();
        long_addr.status.members[0].addr = "a".repeat(MEMBER_ADDR_BYTES_MAX + 1);
        assert!(matches!(
            StatusResponse::decode(&encoded(|o| long_addr.encode(o))),
            Err(MsgError::TooLong {
                what: "member address",
                ..
            })
        ));

        let mut status = encoded(|o| sample_status().encode(o));
        status[16] = 5;
        assert_eq!(
            StatusResponse::decode(&status),
            Err(MsgError::BadTag {
                what: "role",
                value: 5
            })
        );

        let mut err = vec![RESULT_ERR, 0];
        assert!(matches!(
            decode_submit_error(&mut Reader::new(&err[1..], "t")),
            Err(MsgError::BadTag { value: 0, .. })
        ));
        err[1] = INVALID;
        err.extend_from_slice(&0u64.to_le_bytes());
        err.push(9);
        assert!(matches!(
            decode_submit_error(&mut Reader::new(&err[1..], "t")),
            Err(MsgError::BadTag {
                what: "submit rejection",
                value: 9
            })
        ));
    }

    #[test]
    fn long_error_messages_are_cut_at_a_char_boundary() {
        let msg = ErrorMsg {
            request_id: 1,
            code: ErrorCode::Internal,
            message: format!("a{}", "é".repeat(ERROR_MESSAGE_BYTES_MAX)),
        };
        let back = ErrorMsg::decode(&encoded(|o| msg.encode(o))).unwrap();
        assert_eq!(back.message.len(), ERROR_MESSAGE_BYTES_MAX - 1);
        assert!(msg.message.starts_with(&back.message));
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// No decoder panics on arbitrary bytes, nor on a valid body with bytes changed.
        #[test]
        fn decoding_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
            pick in any::<prop::sample::Index>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let _ = SubmitRequest::decode(&bytes);
            let _ = SubmitResponse::decode(&bytes);
            let _ = StatusRequest::decode(&bytes);
            let _ = StatusResponse::decode(&bytes);
            let _ = StagesRequest::decode(&bytes);
            let _ = StagesResponse::decode(&bytes);
            let _ = ErrorMsg::decode(&bytes);
            let _ = Hello::decode(&bytes);
            let _ = decode_forward_request(&bytes);
            let _ = ForwardResponse::decode(&bytes);
            let _ = ForwardSealed::decode(&bytes);
            let _ = decode_submit_error(&mut Reader::new(&bytes, "arbitrary"));

            let bodies = valid_bodies();
            let (_, mut body, decodes) = bodies[pick.index(bodies.len())].clone();
            for (at, value) in flips {
                let i = at.index(body.len());
                body[i] = value;
            }
            let _ = decodes(&body);
        }
    }
}
