//! Message bodies for rollups, blocks, reveals and reads (`docs/protocol.md` has the layouts):
//! [`CommandRequest`]/[`CommandResponse`] (register a rollup, reveal a key), [`ReadRequest`]/
//! [`ReadResponse`] (transaction, block, rollup reads at a chosen consistency) and
//! [`SubscribeRequest`]/[`BlockEvent`] (a block stream). Same conventions as [`crate::msg`]:
//! little-endian, request id first, every length checked before use, no trailing bytes.

use std::time::Duration;

use baton_core::block::{BlockMeta, SignedBlockHeader, SIGNED_BLOCK_HEADER_BYTES};
use baton_core::command::{Command, CommandRejection, PolicyError, RollupPolicy};
use baton_core::encrypted::DecryptError;
use baton_core::node::{
    BlockTx, BlockTxs, CommandReceipt, Consistency, Read, Reveal, SubmitError, TxInfo,
};
use baton_core::rollups::{Block, RollupInfo, Sealed};
use baton_core::sequencer::{CommandApplied, Position};
use baton_core::TxHash;

use crate::msg::{
    decode_submit_error, encode_submit_error, len_u32, put_option_u64, put_str_cut, put_tx,
    put_u32, put_u64, read_tx, MsgError, Reader, SubmitResponse,
};

/// Most rollups in one answer: all a cluster registers.
pub const ROLLUPS_MAX: usize = baton_core::command::ROLLUPS_MAX;
/// Most transactions of a block in one block message (a block's `max_block_txs` bound).
pub const BLOCK_TXS_MAX: usize = baton_core::command::BLOCK_TXS_MAX as usize;
/// Longest read wait a client may ask for.
pub const READ_TIMEOUT_MS_MAX: u32 = 60_000;

const OK: u8 = 0;
const ERR: u8 = 1;

fn put_position(out: &mut Vec<u8>, p: Position) {
    put_u64(out, p.index);
    put_u32(out, p.offset);
}

fn read_position(r: &mut Reader<'_>) -> Result<Position, MsgError> {
    Ok(Position {
        index: r.u64()?,
        offset: r.u32()?,
    })
}

fn bad(what: &'static str, value: u8) -> MsgError {
    MsgError::BadTag { what, value }
}

// ---------------------------------------------------------------------------------------------
// CommandRejection

/// The `&'static str` reasons and policy fields a decoder maps back.
const STALE_REASONS: [&str; 7] = [
    "height is not the rollup's next",
    "parent hash is not the previous block's digest",
    "time is before the parent's",
    "transaction count is not what is pending",
    "batch range is not that of the pending transactions",
    "Merkle root is not that of the pending transactions",
    "seal markers are proposed by the leader only",
];
const POLICY_FIELDS: [&str; 3] = ["block_time_ms", "max_block_txs", "reveal_window_blocks"];

/// Appends `[u8 code]` and the fields of a command rejection.
pub fn encode_rejection(e: &CommandRejection, out: &mut Vec<u8>) {
    let hash = |out: &mut Vec<u8>, code: u8, h: &TxHash| {
        out.push(code);
        out.extend_from_slice(&h.0);
    };
    match e {
        CommandRejection::Malformed(d) => {
            out.push(1);
            put_str_cut(out, &d.to_string(), 1024);
        }
        CommandRejection::Policy(p) => {
            out.push(2);
            out.push(
                POLICY_FIELDS
                    .iter()
                    .position(|f| *f == p.field)
                    .unwrap_or(0) as u8,
            );
            put_u32(out, p.value);
            put_u32(out, p.max);
        }
        CommandRejection::RollupExists { rollup_id } => {
            out.push(3);
            put_u64(out, *rollup_id);
        }
        CommandRejection::UnknownRollup { rollup_id } => {
            out.push(4);
            put_u64(out, *rollup_id);
        }
        CommandRejection::StaleSeal {
            rollup_id,
            height,
            reason,
        } => {
            out.push(5);
            put_u64(out, *rollup_id);
            put_u64(out, *height);
            out.push(STALE_REASONS.iter().position(|r| r == reason).unwrap_or(0) as u8);
        }
        CommandRejection::BadSignature => out.push(6),
        CommandRejection::UnknownTx { tx_hash } => hash(out, 7, tx_hash),
        CommandRejection::NotEncrypted { tx_hash } => hash(out, 8, tx_hash),
        CommandRejection::AlreadyRevealed { tx_hash } => hash(out, 9, tx_hash),
        CommandRejection::Expired { tx_hash, height } => {
            hash(out, 10, tx_hash);
            put_u64(out, *height);
        }
        CommandRejection::WrongKey { tx_hash } => hash(out, 11, tx_hash),
        CommandRejection::Undecryptable { tx_hash, reason } => {
            hash(out, 12, tx_hash);
            match reason {
                DecryptError::TooShort { len } => {
                    out.push(1);
                    put_u64(out, *len as u64);
                }
                DecryptError::WrongKey => out.push(2),
                DecryptError::Unauthentic => out.push(3),
            }
        }
        CommandRejection::TooManyRollups { max } => {
            out.push(13);
            put_u64(out, *max);
        }
    }
}

/// Reads what [`encode_rejection`] wrote.
pub fn decode_rejection(r: &mut Reader<'_>) -> Result<CommandRejection, MsgError> {
    let code = r.u8()?;
    let mut hash = || -> Result<TxHash, MsgError> { Ok(TxHash(r.array()?)) };
    Ok(match code {
        1 => {
            let message = r.str("malformed command", 1024)?;
            CommandRejection::Malformed(baton_core::command::CommandDecodeError::Remote(
                message.to_owned(),
            ))
        }
        2 => {
            let field = r.u8()?;
            let field = *POLICY_FIELDS
                .get(field as usize)
                .ok_or(bad("policy field", field))?;
            CommandRejection::Policy(PolicyError {
                field,
                value: r.u32()?,
                max: r.u32()?,
            })
        }
        3 => CommandRejection::RollupExists {
            rollup_id: r.u64()?,
        },
        4 => CommandRejection::UnknownRollup {
            rollup_id: r.u64()?,
        },
        5 => {
            let (rollup_id, height) = (r.u64()?, r.u64()?);
            let reason = r.u8()?;
            CommandRejection::StaleSeal {
                rollup_id,
                height,
                reason: STALE_REASONS
                    .get(reason as usize)
                    .ok_or(bad("stale seal reason", reason))?,
            }
        }
        6 => CommandRejection::BadSignature,
        7 => CommandRejection::UnknownTx { tx_hash: hash()? },
        8 => CommandRejection::NotEncrypted { tx_hash: hash()? },
        9 => CommandRejection::AlreadyRevealed { tx_hash: hash()? },
        10 => CommandRejection::Expired {
            tx_hash: hash()?,
            height: r.u64()?,
        },
        11 => CommandRejection::WrongKey { tx_hash: hash()? },
        12 => {
            let tx_hash = hash()?;
            let reason = match r.u8()? {
                1 => DecryptError::TooShort {
                    len: r.usize("ciphertext length")?,
                },
                2 => DecryptError::WrongKey,
                3 => DecryptError::Unauthentic,
                v => return Err(bad("decrypt error", v)),
            };
            CommandRejection::Undecryptable { tx_hash, reason }
        }
        13 => CommandRejection::TooManyRollups { max: r.u64()? },
        v => return Err(bad("command rejection", v)),
    })
}

// ---------------------------------------------------------------------------------------------
// Commands

/// Client → node: a control command (only `RegisterRollup` and `Reveal`; the leader proposes
/// seal markers itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandRequest {
    /// Client-chosen id.
    pub request_id: u64,
    /// The command.
    pub command: Command,
}

impl CommandRequest {
    /// Appends `[u64 request_id][command]` (the command in its log encoding,
    /// `baton_core::command`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        out.extend_from_slice(&self.command.encode());
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "command request");
        let request_id = r.u64()?;
        let command = Command::decode(r.take(r.remaining())?).map_err(MsgError::Command)?;
        Ok(Self {
            request_id,
            command,
        })
    }
}

/// Node → client: where the command was applied and what it did, or why it was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandResponse {
    /// The request's id.
    pub request_id: u64,
    /// The outcome.
    pub result: Result<CommandReceipt, SubmitError>,
}

impl CommandResponse {
    /// Appends `[u64 request_id]`, then `[u8 0][u64 index][applied]` or `[u8 1][submit error]`;
    /// applied: `[u8 1][u64 rollup]` registered, `[u8 2][u64 rollup][u64 height][u32 expired]`
    /// sealed, `[u8 3][32 tx_hash]` revealed.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        match &self.result {
            Ok(c) => {
                out.push(OK);
                put_u64(out, c.index);
                match c.applied {
                    CommandApplied::Registered { rollup_id } => {
                        out.push(1);
                        put_u64(out, rollup_id);
                    }
                    CommandApplied::Sealed(s) => {
                        out.push(2);
                        put_u64(out, s.rollup_id);
                        put_u64(out, s.height);
                        put_u32(out, s.expired);
                    }
                    CommandApplied::Revealed { tx_hash } => {
                        out.push(3);
                        out.extend_from_slice(&tx_hash.0);
                    }
                }
            }
            Err(e) => {
                out.push(ERR);
                encode_submit_error(e, out);
            }
        }
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "command response");
        let request_id = r.u64()?;
        let result = match r.u8()? {
            OK => {
                let index = r.u64()?;
                let applied = match r.u8()? {
                    1 => CommandApplied::Registered {
                        rollup_id: r.u64()?,
                    },
                    2 => CommandApplied::Sealed(Sealed {
                        rollup_id: r.u64()?,
                        height: r.u64()?,
                        expired: r.u32()?,
                    }),
                    3 => CommandApplied::Revealed {
                        tx_hash: TxHash(r.array()?),
                    },
                    v => return Err(bad("command applied", v)),
                };
                Ok(CommandReceipt { index, applied })
            }
            ERR => Err(decode_submit_error(&mut r)?),
            v => return Err(bad("command result", v)),
        };
        r.finish()?;
        Ok(Self { request_id, result })
    }
}

// ---------------------------------------------------------------------------------------------
// Reads

/// What a read asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Query {
    /// A transaction's status by hash.
    Tx(TxHash),
    /// A block (header, metadata, transactions) by rollup and height.
    Block {
        /// The rollup.
        rollup_id: u64,
        /// The height.
        height: u64,
    },
    /// One rollup's registration and progress (latest height).
    Rollup(u64),
    /// Every registered rollup.
    Rollups,
}

/// What a read found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// For [`Query::Tx`].
    Tx(Option<TxInfo>),
    /// For [`Query::Block`].
    Block(Option<BlockTxs>),
    /// For [`Query::Rollup`].
    Rollup(Option<RollupInfo>),
    /// For [`Query::Rollups`].
    Rollups(Vec<RollupInfo>),
}

/// Client → node: a read at a consistency level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    /// Client-chosen id.
    pub request_id: u64,
    /// How fresh the answer must be.
    pub consistency: Consistency,
    /// How long the node may wait for the consistency to hold.
    pub timeout: Duration,
    /// What to read.
    pub query: Query,
}

impl ReadRequest {
    /// Appends `[u64 request_id][u8 consistency (0 local, 1 min_index, 2 linearizable)]
    /// [u64 min_index][u32 timeout_ms][u8 query]` and the query's fields: 1 tx `[32 hash]`,
    /// 2 block `[u64 rollup][u64 height]`, 3 rollup `[u64 rollup]`, 4 rollups.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        let (c, min) = match self.consistency {
            Consistency::Local => (0, 0),
            Consistency::MinIndex(i) => (1, i),
            Consistency::Linearizable => (2, 0),
        };
        out.push(c);
        put_u64(out, min);
        put_u32(
            out,
            self.timeout
                .as_millis()
                .min(u128::from(READ_TIMEOUT_MS_MAX)) as u32,
        );
        match self.query {
            Query::Tx(h) => {
                out.push(1);
                out.extend_from_slice(&h.0);
            }
            Query::Block { rollup_id, height } => {
                out.push(2);
                put_u64(out, rollup_id);
                put_u64(out, height);
            }
            Query::Rollup(id) => {
                out.push(3);
                put_u64(out, id);
            }
            Query::Rollups => out.push(4),
        }
    }

    /// Decodes a body; a timeout over [`READ_TIMEOUT_MS_MAX`] is refused.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "read request");
        let request_id = r.u64()?;
        let c = r.u8()?;
        let min = r.u64()?;
        let consistency = match c {
            0 => Consistency::Local,
            1 => Consistency::MinIndex(min),
            2 => Consistency::Linearizable,
            v => return Err(bad("read consistency", v)),
        };
        let timeout_ms = r.u32()?;
        if timeout_ms > READ_TIMEOUT_MS_MAX {
            return Err(MsgError::TooMany {
                what: "read timeout ms",
                count: timeout_ms.into(),
                max: READ_TIMEOUT_MS_MAX as usize,
            });
        }
        let query = match r.u8()? {
            1 => Query::Tx(TxHash(r.array()?)),
            2 => Query::Block {
                rollup_id: r.u64()?,
                height: r.u64()?,
            },
            3 => Query::Rollup(r.u64()?),
            4 => Query::Rollups,
            v => return Err(bad("read query", v)),
        };
        r.finish()?;
        Ok(Self {
            request_id,
            consistency,
            timeout: Duration::from_millis(timeout_ms.into()),
            query,
        })
    }
}

/// Node → client: the node's applied index and what it read, or why it could not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResponse {
    /// The request's id.
    pub request_id: u64,
    /// The answer.
    pub result: Result<Read<Answer>, SubmitError>,
}

fn put_rollup(out: &mut Vec<u8>, i: &RollupInfo) {
    put_u64(out, i.rollup_id);
    put_u32(out, i.policy.block_time_ms);
    put_u32(out, i.policy.max_block_txs);
    put_u32(out, i.policy.reveal_window_blocks);
    put_u64(out, i.registered_at);
    put_u64(out, i.height);
    put_u64(out, i.pending_txs);
    put_u64(out, i.sealed_txs);
}

fn read_rollup(r: &mut Reader<'_>) -> Result<RollupInfo, MsgError> {
    Ok(RollupInfo {
        rollup_id: r.u64()?,
        policy: RollupPolicy {
            block_time_ms: r.u32()?,
            max_block_txs: r.u32()?,
            reveal_window_blocks: r.u32()?,
        },
        registered_at: r.u64()?,
        height: r.u64()?,
        pending_txs: r.u64()?,
        sealed_txs: r.u64()?,
    })
}

const ROLLUP_BYTES: usize = 52;

/// Largest encoded block body that still fits a client frame with its message header (request
/// id, applied index, answer tags); a block whose transactions do not fit is sent without them.
pub const BLOCK_BODY_BYTES_MAX: usize =
    crate::frame::FRAME_BYTES_MAX - crate::frame::FRAME_HEADER_BYTES - 64;

/// `b` as it can be sent: with its transactions if its encoding fits [`BLOCK_BODY_BYTES_MAX`],
/// else without them (`txs: None`, as for a block whose batches were purged).
pub fn fit_block(b: BlockTxs) -> BlockTxs {
    if block_len(&b) <= BLOCK_BODY_BYTES_MAX {
        b
    } else {
        BlockTxs {
            block: b.block,
            txs: None,
        }
    }
}

/// Bytes [`put_block`] writes for `b` (computed, not encoded).
fn block_len(b: &BlockTxs) -> usize {
    const FIXED: usize = SIGNED_BLOCK_HEADER_BYTES + 3 * 4 + 8 + 2 * 12 + 1;
    let txs = b.txs.as_ref().map_or(0, |txs| {
        4 + txs
            .iter()
            .map(|t| {
                let commitment = match t.tx.kind {
                    baton_core::TxKind::Raw => 0,
                    baton_core::TxKind::Encrypted { .. } => 32,
                };
                32 + 12
                    + (8 + 1 + commitment + 4 + t.tx.bytes.len())
                    + 1
                    + t.plaintext.as_ref().map_or(0, |p| 4 + p.len())
            })
            .sum::<usize>()
    });
    FIXED + txs
}

/// Appends a block: `[176 signed header][u32 encrypted][u32 revealed][u32 expired]
/// [u64 sealed_at][u64 first index][u32 first offset][u64 last index][u32 last offset]
/// [u8 has_txs][u32 n]{[32 hash][u64 index][u32 offset][tx][u8 has_plaintext]
/// [u32 len][plaintext]}`; the count and transactions only when `has_txs` is 1.
pub fn put_block(out: &mut Vec<u8>, b: &BlockTxs) {
    out.extend_from_slice(&b.block.signed.encode());
    put_u32(out, b.block.meta.encrypted);
    put_u32(out, b.block.meta.revealed);
    put_u32(out, b.block.meta.expired);
    put_u64(out, b.block.sealed_at);
    put_position(out, b.block.first);
    put_position(out, b.block.last);
    match &b.txs {
        None => out.push(0),
        Some(txs) => {
            out.push(1);
            put_u32(out, len_u32(txs.len()));
            for t in txs {
                out.extend_from_slice(&t.tx_hash.0);
                put_u64(out, t.index);
                put_u32(out, t.offset);
                put_tx(out, &t.tx);
                match &t.plaintext {
                    None => out.push(0),
                    Some(p) => {
                        out.push(1);
                        put_u32(out, len_u32(p.len()));
                        out.extend_from_slice(p);
                    }
                }
            }
        }
    }
}

/// Reads what [`put_block`] wrote.
pub fn read_block(r: &mut Reader<'_>) -> Result<BlockTxs, MsgError> {
    let signed = SignedBlockHeader::decode(r.take(SIGNED_BLOCK_HEADER_BYTES)?)
        .map_err(|_| bad("block header padding", 0))?;
    let meta = BlockMeta {
        encrypted: r.u32()?,
        revealed: r.u32()?,
        expired: r.u32()?,
    };
    if u64::from(meta.revealed) + u64::from(meta.expired) > u64::from(meta.encrypted) {
        return Err(MsgError::TooMany {
            what: "revealed and expired transactions of a block",
            count: u64::from(meta.revealed) + u64::from(meta.expired),
            max: meta.encrypted as usize,
        });
    }
    let block = Block {
        signed,
        meta,
        sealed_at: r.u64()?,
        first: read_position(r)?,
        last: read_position(r)?,
    };
    let txs = match r.flag("block has txs")? {
        false => None,
        true => {
            let n = r.count("block transactions", BLOCK_TXS_MAX, 32 + 12 + 13 + 1)?;
            let mut txs = Vec::with_capacity(n);
            for _ in 0..n {
                let tx_hash = TxHash(r.array()?);
                let index = r.u64()?;
                let offset = r.u32()?;
                let tx = read_tx(r)?;
                let plaintext = match r.flag("tx plaintext")? {
                    false => None,
                    true => {
                        let len = r.u32()? as usize;
                        Some(r.take(len)?.to_vec())
                    }
                };
                txs.push(BlockTx {
                    tx_hash,
                    index,
                    offset,
                    tx,
                    plaintext,
                });
            }
            Some(txs)
        }
    };
    Ok(BlockTxs { block, txs })
}

fn put_tx_info(out: &mut Vec<u8>, t: &TxInfo) {
    put_u64(out, t.index);
    put_u32(out, t.offset);
    put_option_u64(out, t.rollup_id);
    put_option_u64(out, t.block_height);
    // The receipt as a one-result submit response (request id 0), length-prefixed.
    let mut receipt = Vec::new();
    SubmitResponse {
        request_id: 0,
        results: vec![t.receipt.clone()],
    }
    .encode(&mut receipt);
    put_u32(out, len_u32(receipt.len()));
    out.extend_from_slice(&receipt);
    match &t.reveal {
        None => out.push(0),
        Some(Reveal::Pending) => out.push(1),
        Some(Reveal::Revealed {
            plaintext,
            revealed_at,
        }) => {
            out.push(2);
            put_u64(out, *revealed_at);
            put_u32(out, len_u32(plaintext.len()));
            out.extend_from_slice(plaintext);
        }
        Some(Reveal::Expired) => out.push(3),
    }
}

fn read_tx_info(r: &mut Reader<'_>) -> Result<TxInfo, MsgError> {
    let index = r.u64()?;
    let offset = r.u32()?;
    let rollup_id = r.option_u64("tx rollup")?;
    let block_height = r.option_u64("tx block height")?;
    let len = r.u32()? as usize;
    let mut receipt = SubmitResponse::decode(r.take(len)?)?;
    if receipt.results.len() != 1 {
        return Err(MsgError::TooMany {
            what: "tx receipts",
            count: receipt.results.len() as u64,
            max: 1,
        });
    }
    let receipt = receipt.results.remove(0);
    let reveal = match r.u8()? {
        0 => None,
        1 => Some(Reveal::Pending),
        2 => {
            let revealed_at = r.u64()?;
            let len = r.u32()? as usize;
            Some(Reveal::Revealed {
                plaintext: r.take(len)?.to_vec(),
                revealed_at,
            })
        }
        3 => Some(Reveal::Expired),
        v => return Err(bad("tx reveal", v)),
    };
    Ok(TxInfo {
        index,
        offset,
        rollup_id,
        block_height,
        receipt,
        reveal,
    })
}

impl ReadResponse {
    /// Appends `[u64 request_id]`, then `[u8 0][u64 applied_index][u8 answer][fields]` or
    /// `[u8 1][submit error]`. Answers: 1 tx `[u8 found][tx info]`, 2 block `[u8 found][block]`,
    /// 3 rollup `[u8 found][rollup]`, 4 rollups `[u32 n]{[rollup]}` (see `docs/protocol.md`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        let read = match &self.result {
            Ok(read) => read,
            Err(e) => {
                out.push(ERR);
                encode_submit_error(e, out);
                return;
            }
        };
        out.push(OK);
        put_u64(out, read.applied_index);
        match &read.value {
            Answer::Tx(t) => {
                out.push(1);
                out.push(u8::from(t.is_some()));
                if let Some(t) = t {
                    put_tx_info(out, t);
                }
            }
            Answer::Block(b) => {
                out.push(2);
                out.push(u8::from(b.is_some()));
                if let Some(b) = b {
                    put_block(out, b);
                }
            }
            Answer::Rollup(i) => {
                out.push(3);
                out.push(u8::from(i.is_some()));
                if let Some(i) = i {
                    put_rollup(out, i);
                }
            }
            Answer::Rollups(list) => {
                out.push(4);
                put_u32(out, len_u32(list.len()));
                for i in list {
                    put_rollup(out, i);
                }
            }
        }
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "read response");
        let request_id = r.u64()?;
        let result = match r.u8()? {
            OK => {
                let applied_index = r.u64()?;
                let value = match r.u8()? {
                    1 => Answer::Tx(match r.flag("tx found")? {
                        true => Some(read_tx_info(&mut r)?),
                        false => None,
                    }),
                    2 => Answer::Block(match r.flag("block found")? {
                        true => Some(read_block(&mut r)?),
                        false => None,
                    }),
                    3 => Answer::Rollup(match r.flag("rollup found")? {
                        true => Some(read_rollup(&mut r)?),
                        false => None,
                    }),
                    4 => {
                        let n = r.count("rollups", ROLLUPS_MAX, ROLLUP_BYTES)?;
                        let mut list = Vec::with_capacity(n);
                        for _ in 0..n {
                            list.push(read_rollup(&mut r)?);
                        }
                        Answer::Rollups(list)
                    }
                    v => return Err(bad("read answer", v)),
                };
                Ok(Read {
                    applied_index,
                    value,
                })
            }
            ERR => Err(decode_submit_error(&mut r)?),
            v => return Err(bad("read result", v)),
        };
        r.finish()?;
        Ok(Self { request_id, result })
    }
}

// ---------------------------------------------------------------------------------------------
// Block stream

/// Client → node, on a stream of its own: send the rollup's blocks from `from_height` on, then
/// each new block as it is sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscribeRequest {
    /// Client-chosen id, echoed in every [`BlockEvent`].
    pub request_id: u64,
    /// The rollup.
    pub rollup_id: u64,
    /// First height to send (1: from the start).
    pub from_height: u64,
}

impl SubscribeRequest {
    /// Appends `[u64 request_id][u64 rollup_id][u64 from_height]`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        put_u64(out, self.rollup_id);
        put_u64(out, self.from_height);
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "subscribe request");
        let v = Self {
            request_id: r.u64()?,
            rollup_id: r.u64()?,
            from_height: r.u64()?,
        };
        r.finish()?;
        Ok(v)
    }
}

/// Node → client: one block of a subscription, in height order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockEvent {
    /// The subscription's id.
    pub request_id: u64,
    /// The node's applied index when it read the block.
    pub applied_index: u64,
    /// The block.
    pub block: BlockTxs,
}

impl BlockEvent {
    /// Appends `[u64 request_id][u64 applied_index][block]` (see [`put_block`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        put_u64(out, self.applied_index);
        put_block(out, &self.block);
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "block event");
        let request_id = r.u64()?;
        let applied_index = r.u64()?;
        let block = read_block(&mut r)?;
        r.finish()?;
        Ok(Self {
            request_id,
            applied_index,
            block,
        })
    }
}

/// Leader → follower: the answer to a read index request (`[u64 request_id]`): `[u64
/// request_id]`, then `[u8 0][u64 index]` or `[u8 1][submit error]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadIndexResponse {
    /// The request's id.
    pub request_id: u64,
    /// The leader's read index.
    pub result: Result<u64, SubmitError>,
}

impl ReadIndexResponse {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        match &self.result {
            Ok(i) => {
                out.push(OK);
                put_u64(out, *i);
            }
            Err(e) => {
                out.push(ERR);
                encode_submit_error(e, out);
            }
        }
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "read index response");
        let request_id = r.u64()?;
        let result = match r.u8()? {
            OK => Ok(r.u64()?),
            ERR => Err(decode_submit_error(&mut r)?),
            v => return Err(bad("read index result", v)),
        };
        r.finish()?;
        Ok(Self { request_id, result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::block::BlockHeader;
    use baton_core::{Signer, Transaction, TxKind};
    use proptest::prelude::*;

    fn block() -> BlockTxs {
        let signer = Signer::from_secret(&[3; 32]).unwrap();
        BlockTxs {
            block: Block {
                signed: SignedBlockHeader::sign(
                    BlockHeader {
                        rollup_id: 4,
                        height: 2,
                        tx_count: 2,
                        first_batch: 7,
                        last_batch: 9,
                        ..BlockHeader::default()
                    },
                    &signer,
                ),
                meta: BlockMeta {
                    encrypted: 1,
                    revealed: 1,
                    expired: 0,
                },
                sealed_at: 12,
                first: Position {
                    index: 7,
                    offset: 1,
                },
                last: Position {
                    index: 9,
                    offset: 0,
                },
            },
            txs: Some(vec![
                BlockTx {
                    tx_hash: TxHash([1; 32]),
                    index: 7,
                    offset: 1,
                    tx: Transaction {
                        rollup_id: 4,
                        kind: TxKind::Raw,
                        bytes: b"abc".to_vec(),
                    },
                    plaintext: None,
                },
                BlockTx {
                    tx_hash: TxHash([2; 32]),
                    index: 9,
                    offset: 0,
                    tx: Transaction {
                        rollup_id: 4,
                        kind: TxKind::Encrypted {
                            key_commitment: [5; 32],
                        },
                        bytes: vec![9; 40],
                    },
                    plaintext: Some(b"hello".to_vec()),
                },
            ]),
        }
    }

    fn info() -> RollupInfo {
        RollupInfo {
            rollup_id: 4,
            policy: RollupPolicy {
                block_time_ms: 100,
                max_block_txs: 500,
                reveal_window_blocks: 3,
            },
            registered_at: 2,
            height: 7,
            pending_txs: 3,
            sealed_txs: 40,
        }
    }

    fn responses() -> Vec<ReadResponse> {
        let ok = |value| {
            Ok(Read {
                applied_index: 55,
                value,
            })
        };
        let tx = TxInfo {
            index: 7,
            offset: 1,
            rollup_id: Some(4),
            block_height: Some(2),
            receipt: Err(SubmitError::ReceiptUnavailable { index: 7 }),
            reveal: Some(Reveal::Revealed {
                plaintext: b"x".to_vec(),
                revealed_at: 20,
            }),
        };
        vec![
            ReadResponse {
                request_id: 1,
                result: ok(Answer::Tx(Some(tx))),
            },
            ReadResponse {
                request_id: 2,
                result: ok(Answer::Tx(None)),
            },
            ReadResponse {
                request_id: 3,
                result: ok(Answer::Block(Some(block()))),
            },
            ReadResponse {
                request_id: 4,
                result: ok(Answer::Rollup(Some(info()))),
            },
            ReadResponse {
                request_id: 5,
                result: ok(Answer::Rollups(vec![info(), info()])),
            },
            ReadResponse {
                request_id: 6,
                result: Err(SubmitError::ReadTimeout {
                    min_index: 9,
                    applied: Some(3),
                }),
            },
        ]
    }

    #[test]
    fn reads_round_trip() {
        for q in [
            Query::Tx(TxHash([7; 32])),
            Query::Block {
                rollup_id: 1,
                height: 2,
            },
            Query::Rollup(3),
            Query::Rollups,
        ] {
            for consistency in [
                Consistency::Local,
                Consistency::MinIndex(42),
                Consistency::Linearizable,
            ] {
                let req = ReadRequest {
                    request_id: 9,
                    consistency,
                    timeout: Duration::from_millis(1500),
                    query: q,
                };
                let mut body = Vec::new();
                req.encode(&mut body);
                assert_eq!(ReadRequest::decode(&body).unwrap(), req);
            }
        }
        for resp in responses() {
            let mut body = Vec::new();
            resp.encode(&mut body);
            assert_eq!(ReadResponse::decode(&body).unwrap(), resp);
            body.push(0);
            assert!(ReadResponse::decode(&body).is_err(), "trailing byte");
        }
    }

    #[test]
    fn commands_and_rejections_round_trip() {
        let h = TxHash([8; 32]);
        let rejections = vec![
            CommandRejection::Policy(PolicyError {
                field: "max_block_txs",
                value: 0,
                max: 5,
            }),
            CommandRejection::RollupExists { rollup_id: 3 },
            CommandRejection::UnknownRollup { rollup_id: 3 },
            CommandRejection::StaleSeal {
                rollup_id: 1,
                height: 2,
                reason: STALE_REASONS[3],
            },
            CommandRejection::BadSignature,
            CommandRejection::UnknownTx { tx_hash: h },
            CommandRejection::NotEncrypted { tx_hash: h },
            CommandRejection::AlreadyRevealed { tx_hash: h },
            CommandRejection::Expired {
                tx_hash: h,
                height: 4,
            },
            CommandRejection::WrongKey { tx_hash: h },
            CommandRejection::TooManyRollups { max: 65_536 },
            CommandRejection::Undecryptable {
                tx_hash: h,
                reason: DecryptError::TooShort { len: 3 },
            },
        ];
        for e in rejections {
            let resp = CommandResponse {
                request_id: 4,
                result: Err(SubmitError::Command(e)),
            };
            let mut body = Vec::new();
            resp.encode(&mut body);
            assert_eq!(CommandResponse::decode(&body).unwrap(), resp);
        }
        for applied in [
            CommandApplied::Registered { rollup_id: 2 },
            CommandApplied::Sealed(Sealed {
                rollup_id: 2,
                height: 5,
                expired: 1,
            }),
            CommandApplied::Revealed { tx_hash: h },
        ] {
            let resp = CommandResponse {
                request_id: 4,
                result: Ok(CommandReceipt { index: 10, applied }),
            };
            let mut body = Vec::new();
            resp.encode(&mut body);
            assert_eq!(CommandResponse::decode(&body).unwrap(), resp);
        }
        let req = CommandRequest {
            request_id: 3,
            command: Command::Reveal {
                tx_hash: h,
                key: [1; 32],
            },
        };
        let mut body = Vec::new();
        req.encode(&mut body);
        assert_eq!(CommandRequest::decode(&body).unwrap(), req);
        assert!(matches!(
            CommandRequest::decode(&body[..body.len() - 1]),
            Err(MsgError::Command(_))
        ));
    }

    #[test]
    fn blocks_too_large_for_a_frame_are_sent_without_their_transactions() {
        for b in [
            block(),
            BlockTxs {
                txs: None,
                ..block()
            },
        ] {
            let mut body = Vec::new();
            put_block(&mut body, &b);
            assert_eq!(
                block_len(&b),
                body.len(),
                "computed length is the encoded length"
            );
        }
        let small = block();
        assert_eq!(fit_block(small.clone()), small);
        let mut big = block();
        let tx = big.txs.as_ref().unwrap()[0].clone();
        let mut fat = tx.clone();
        fat.tx.bytes = vec![7; 1 << 20];
        big.txs = Some(vec![fat; 5]);
        let fitted = fit_block(big.clone());
        assert_eq!(fitted.block, big.block);
        assert_eq!(fitted.txs, None);
        let mut body = Vec::new();
        BlockEvent {
            request_id: 1,
            applied_index: 2,
            block: fitted,
        }
        .encode(&mut body);
        assert!(
            crate::frame::frame_header(crate::frame::FrameKind::BlockEvent, body.len()).is_ok()
        );
    }

    #[test]
    fn impossible_block_metadata_is_refused() {
        let mut b = block();
        b.block.meta = BlockMeta {
            encrypted: 1,
            revealed: 1,
            expired: 1,
        };
        let mut body = Vec::new();
        put_block(&mut body, &b);
        assert!(read_block(&mut Reader::new(&body, "block")).is_err());
    }

    #[test]
    fn block_events_round_trip() {
        let e = BlockEvent {
            request_id: 5,
            applied_index: 77,
            block: block(),
        };
        let mut body = Vec::new();
        e.encode(&mut body);
        assert_eq!(BlockEvent::decode(&body).unwrap(), e);
        let s = SubscribeRequest {
            request_id: 5,
            rollup_id: 4,
            from_height: 1,
        };
        let mut body = Vec::new();
        s.encode(&mut body);
        assert_eq!(SubscribeRequest::decode(&body).unwrap(), s);
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = ReadRequest::decode(&bytes);
            let _ = ReadResponse::decode(&bytes);
            let _ = CommandRequest::decode(&bytes);
            let _ = CommandResponse::decode(&bytes);
            let _ = BlockEvent::decode(&bytes);
            let _ = SubscribeRequest::decode(&bytes);
        }

        #[test]
        fn truncated_responses_are_errors(cut in 0usize..2000) {
            for resp in responses() {
                let mut body = Vec::new();
                resp.encode(&mut body);
                if cut < body.len() {
                    prop_assert!(ReadResponse::decode(&body[..cut]).is_err());
                }
            }
        }
    }
}
