//! Control commands: the log entries that are not transaction batches.
//!
//! Registering a rollup, sealing a block and revealing an encrypted transaction's key all go
//! through the Raft log, so every node applies them at the same position and ends in the same
//! state. A command is a small fixed-layout record (little-endian), stored in the WAL and sent
//! to followers as entry kind 5 (see `raft::log_store`):
//!
//! ```text
//! version u8 (1) | tag u8 | body
//! tag 1 RegisterRollup: rollup_id u64 | block_time_ms u32 | max_block_txs u32 |
//!                       reveal_window_blocks u32                               (20 bytes)
//! tag 2 SealBlock:      signed block header [176]   (block::SignedBlockHeader::encode)
//! tag 3 Reveal:         tx_hash [32] | key [32]
//! ```
//!
//! Decoding checks the exact length of each body, so trailing or missing bytes are errors.

use crate::block::{BlockHeaderError, SignedBlockHeader, SIGNED_BLOCK_HEADER_BYTES};
use crate::encrypted::KEY_BYTES;
use crate::hash::TxHash;

/// Command format version written by this build.
pub const COMMAND_VERSION: u8 = 1;
const TAG_REGISTER: u8 = 1;
const TAG_SEAL: u8 = 2;
const TAG_REVEAL: u8 = 3;

/// Longest block time a rollup may ask for: one hour.
pub const BLOCK_TIME_MS_MAX: u32 = 3_600_000;
/// Most transactions a rollup's block may hold.
pub const BLOCK_TXS_MAX: u32 = 1 << 20;
/// Most rollups a cluster registers (each costs state on every node, and reads list them all).
pub const ROLLUPS_MAX: usize = 65_536;
/// Longest reveal window, in blocks.
pub const REVEAL_WINDOW_BLOCKS_MAX: u32 = 1 << 20;

/// How a rollup's blocks are sealed and how long its encrypted transactions may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RollupPolicy {
    /// The leader seals a block once this long has passed since the previous one (and there is
    /// something to seal).
    pub block_time_ms: u32,
    /// ...or as soon as this many transactions wait; a block never holds more.
    pub max_block_txs: u32,
    /// An encrypted transaction in block `h` whose key is not revealed by the time block
    /// `h + reveal_window_blocks` is sealed is marked expired.
    pub reveal_window_blocks: u32,
}

impl RollupPolicy {
    /// Checks the bounds: every field at least 1 and at most its `*_MAX`.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let check = |field: &'static str, value: u32, max: u32| {
            if value == 0 || value > max {
                Err(PolicyError { field, value, max })
            } else {
                Ok(())
            }
        };
        check("block_time_ms", self.block_time_ms, BLOCK_TIME_MS_MAX)?;
        check("max_block_txs", self.max_block_txs, BLOCK_TXS_MAX)?;
        check(
            "reveal_window_blocks",
            self.reveal_window_blocks,
            REVEAL_WINDOW_BLOCKS_MAX,
        )
    }
}

/// A rollup policy field outside its bounds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} is {value}, must be between 1 and {max}")]
pub struct PolicyError {
    /// The field.
    pub field: &'static str,
    /// Its value.
    pub value: u32,
    /// Its upper bound.
    pub max: u32,
}

/// A control command (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Registers a rollup; transactions for it are accepted from the moment a node applies
    /// this.
    RegisterRollup {
        /// The rollup id transactions carry.
        rollup_id: u64,
        /// How its blocks are sealed.
        policy: RollupPolicy,
    },
    /// A seal marker: the leader's signed header of the rollup's next block.
    SealBlock(SignedBlockHeader),
    /// The key of an encrypted transaction.
    Reveal {
        /// Hash of the encrypted transaction (of its ciphertext bytes).
        tx_hash: TxHash,
        /// The ChaCha20-Poly1305 key whose keccak256 is the transaction's commitment.
        key: [u8; KEY_BYTES],
    },
}

/// Why bytes are not a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandDecodeError {
    /// Fewer than the two leading bytes.
    #[error("command is {len} bytes, shorter than its version and tag")]
    TooShort {
        /// Bytes given.
        len: usize,
    },
    /// A version this build does not read.
    #[error("command format version {0} is not supported (this build reads {COMMAND_VERSION})")]
    Version(u8),
    /// An unknown tag.
    #[error("unknown command tag {0}")]
    Tag(u8),
    /// The body has the wrong length for its tag.
    #[error("{what} body is {len} bytes, expected {expected}")]
    BodyLength {
        /// Which command.
        what: &'static str,
        /// Bytes given.
        len: usize,
        /// Bytes its layout has.
        expected: usize,
    },
    /// A malformed signed block header.
    #[error("seal marker: {0}")]
    BlockHeader(#[from] BlockHeaderError),
    /// A remote node's description of a decode error (the wire carries the message only).
    #[error("{0}")]
    Remote(String),
}

impl Command {
    /// The command's encoding (module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![COMMAND_VERSION];
        match self {
            Command::RegisterRollup { rollup_id, policy } => {
                out.push(TAG_REGISTER);
                out.extend_from_slice(&rollup_id.to_le_bytes());
                out.extend_from_slice(&policy.block_time_ms.to_le_bytes());
                out.extend_from_slice(&policy.max_block_txs.to_le_bytes());
                out.extend_from_slice(&policy.reveal_window_blocks.to_le_bytes());
            }
            Command::SealBlock(signed) => {
                out.push(TAG_SEAL);
                out.extend_from_slice(&signed.encode());
            }
            Command::Reveal { tx_hash, key } => {
                out.push(TAG_REVEAL);
                out.extend_from_slice(tx_hash.as_bytes());
                out.extend_from_slice(key);
            }
        }
        out
    }

    /// Decodes [`encode`](Command::encode)'s output; never panics.
    pub fn decode(bytes: &[u8]) -> Result<Command, CommandDecodeError> {
        let [version, tag, body @ ..] = bytes else {
            return Err(CommandDecodeError::TooShort { len: bytes.len() });
        };
        if *version != COMMAND_VERSION {
            return Err(CommandDecodeError::Version(*version));
        }
        let expect = |what, expected| {
            if body.len() == expected {
                Ok(())
            } else {
                Err(CommandDecodeError::BodyLength {
                    what,
                    len: body.len(),
                    expected,
                })
            }
        };
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4"));
        match *tag {
            TAG_REGISTER => {
                expect("register rollup", 20)?;
                Ok(Command::RegisterRollup {
                    rollup_id: u64::from_le_bytes(body[0..8].try_into().expect("8")),
                    policy: RollupPolicy {
                        block_time_ms: u32_at(8),
                        max_block_txs: u32_at(12),
                        reveal_window_blocks: u32_at(16),
                    },
                })
            }
            TAG_SEAL => {
                expect("seal block", SIGNED_BLOCK_HEADER_BYTES)?;
                Ok(Command::SealBlock(SignedBlockHeader::decode(body)?))
            }
            TAG_REVEAL => {
                expect("reveal", 32 + KEY_BYTES)?;
                Ok(Command::Reveal {
                    tx_hash: TxHash(body[0..32].try_into().expect("32")),
                    key: body[32..].try_into().expect("32"),
                })
            }
            other => Err(CommandDecodeError::Tag(other)),
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Command::RegisterRollup { .. } => "register rollup",
            Command::SealBlock(_) => "seal block",
            Command::Reveal { .. } => "reveal",
        }
    }
}

/// Why a committed command changed nothing. Every node rejects the same command the same way
/// (the check is part of the deterministic state machine), and the node that accepts a
/// command from a client runs the same check first, so a client hears the same typed error
/// without the command reaching the log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandRejection {
    /// The command bytes are malformed.
    #[error("malformed command: {0}")]
    Malformed(#[from] CommandDecodeError),
    /// A policy field is out of bounds.
    #[error("invalid rollup policy: {0}")]
    Policy(#[from] PolicyError),
    /// The rollup id is taken.
    #[error("rollup {rollup_id} is already registered")]
    RollupExists {
        /// The rollup.
        rollup_id: u64,
    },
    /// `ROLLUPS_MAX` rollups are registered already.
    #[error("{max} rollups are registered already, the most a cluster takes")]
    TooManyRollups {
        /// `ROLLUPS_MAX`.
        max: u64,
    },
    /// No rollup has this id.
    #[error("rollup {rollup_id} is not registered")]
    UnknownRollup {
        /// The rollup.
        rollup_id: u64,
    },
    /// A seal marker that does not describe the rollup's next block as this state sees it
    /// (a stale marker of a deposed leader, or a second marker for the same height).
    #[error("seal marker for rollup {rollup_id} height {height}: {reason}")]
    StaleSeal {
        /// The rollup.
        rollup_id: u64,
        /// The height the marker names.
        height: u64,
        /// What disagrees.
        reason: &'static str,
    },
    /// The seal marker's signature does not recover to any key.
    #[error("seal marker signature does not recover")]
    BadSignature,
    /// No encrypted transaction with this hash was sequenced.
    #[error("no encrypted transaction {tx_hash} is sequenced")]
    UnknownTx {
        /// The hash.
        tx_hash: TxHash,
    },
    /// The transaction was sequenced raw: there is nothing to reveal.
    #[error("transaction {tx_hash} is not encrypted")]
    NotEncrypted {
        /// The hash.
        tx_hash: TxHash,
    },
    /// The key was revealed already.
    #[error("transaction {tx_hash} is already revealed")]
    AlreadyRevealed {
        /// The hash.
        tx_hash: TxHash,
    },
    /// The reveal window passed.
    #[error("transaction {tx_hash} expired unrevealed in block {height}'s window")]
    Expired {
        /// The hash.
        tx_hash: TxHash,
        /// Height of the block that holds it.
        height: u64,
    },
    /// `keccak256(key)` is not the transaction's commitment.
    #[error("the key does not match transaction {tx_hash}'s commitment")]
    WrongKey {
        /// The hash.
        tx_hash: TxHash,
    },
    /// The key matches the commitment but the ciphertext does not open (too short, or its tag
    /// fails): the submitter sealed it wrongly. Marked undecryptable; nothing is recorded.
    #[error("transaction {tx_hash}'s ciphertext does not open under its committed key: {reason}")]
    Undecryptable {
        /// The hash.
        tx_hash: TxHash,
        /// What failed.
        reason: crate::encrypted::DecryptError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockHeader;
    use crate::sign::Signer;
    use proptest::prelude::*;

    fn samples() -> Vec<Command> {
        let signer = Signer::from_secret(&[4; 32]).unwrap();
        vec![
            Command::RegisterRollup {
                rollup_id: 9,
                policy: RollupPolicy {
                    block_time_ms: 250,
                    max_block_txs: 1000,
                    reveal_window_blocks: 4,
                },
            },
            Command::SealBlock(SignedBlockHeader::sign(
                BlockHeader {
                    rollup_id: 9,
                    height: 1,
                    tx_count: 2,
                    ..BlockHeader::default()
                },
                &signer,
            )),
            Command::Reveal {
                tx_hash: TxHash([5; 32]),
                key: [6; 32],
            },
        ]
    }

    #[test]
    fn commands_round_trip() {
        for c in samples() {
            assert_eq!(Command::decode(&c.encode()).unwrap(), c, "{}", c.name());
        }
    }

    #[test]
    fn malformed_commands_are_typed_errors() {
        assert_eq!(
            Command::decode(&[1]),
            Err(CommandDecodeError::TooShort { len: 1 })
        );
        assert_eq!(
            Command::decode(&[2, 1]),
            Err(CommandDecodeError::Version(2))
        );
        assert_eq!(Command::decode(&[1, 9]), Err(CommandDecodeError::Tag(9)));
        for c in samples() {
            let mut long = c.encode();
            long.push(0);
            assert!(matches!(
                Command::decode(&long),
                Err(CommandDecodeError::BodyLength { .. })
            ));
            let short = c.encode();
            assert!(matches!(
                Command::decode(&short[..short.len() - 1]),
                Err(CommandDecodeError::BodyLength { .. })
            ));
        }
    }

    #[test]
    fn policy_bounds() {
        let ok = RollupPolicy {
            block_time_ms: 1,
            max_block_txs: BLOCK_TXS_MAX,
            reveal_window_blocks: 1,
        };
        assert!(ok.validate().is_ok());
        let zero = RollupPolicy {
            block_time_ms: 0,
            ..ok
        };
        assert_eq!(zero.validate().unwrap_err().field, "block_time_ms");
        let big = RollupPolicy {
            max_block_txs: BLOCK_TXS_MAX + 1,
            ..ok
        };
        assert_eq!(big.validate().unwrap_err().field, "max_block_txs");
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..260)) {
            let _ = Command::decode(&bytes);
        }
    }
}
