//! The per-rollup part of the deterministic state: registered rollups, the transactions each
//! one has waiting for a block, its sealed blocks with their metadata, and the encrypted
//! transactions and their reveals (ARCHITECTURE §6, docs/semantics.md).
//!
//! Pure code, driven by the [`Sequencer`](crate::sequencer::Sequencer): it hands every newly
//! sequenced transaction to [`Rollups::order`] and every control command to the methods below,
//! in log order. Two `Rollups` fed the same log are equal and encode to the same bytes.
//!
//! - A transaction of a registered rollup waits in that rollup's *pending* queue until a seal
//!   marker puts it in a block. One of an unregistered rollup (only a faulty leader can write
//!   one: every node refuses them at submission) keeps its position but joins no block; it is
//!   counted in [`Rollups::unblocked`].
//! - A seal marker for block `h` takes the first `tx_count` pending transactions. It is applied
//!   only if it is exactly the block this state would build (height, parent, batch range,
//!   Merkle root, count; time not before the parent's) and its signature recovers; otherwise it
//!   is rejected and nothing changes.
//! - An encrypted transaction keeps its ciphertext until its key is revealed (then the
//!   plaintext is kept instead) or it expires: once block `h + reveal_window_blocks` is sealed,
//!   every transaction of block `h` still unrevealed is marked expired and its ciphertext
//!   dropped. Reveals are accepted from the moment the transaction is sequenced.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::block::{BlockHeader, BlockMeta, SignedBlockHeader, SIGNED_BLOCK_HEADER_BYTES};
use crate::command::{CommandRejection, RollupPolicy};
use crate::encrypted::{self, KEY_BYTES};
use crate::hash::TxHash;
use crate::merkle::MerkleAccumulator;
use crate::sequencer::{Position, SnapshotError};

/// Room a rollup's pending queue keeps however far blocks drain it (~80 bytes a transaction:
/// about 330 KB); a surge's larger queue is shrunk once a block finds it under a quarter full.
const PENDING_KEPT: usize = 4096;

/// A transaction waiting for its rollup's next block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingTx {
    /// Its hash.
    pub tx_hash: TxHash,
    /// Where it was sequenced.
    pub position: Position,
    /// Whether it is encrypted.
    pub encrypted: bool,
    /// Its Merkle leaf hash (`merkle::leaf_hash(tx_hash)`).
    pub leaf: [u8; 32],
}

/// A sealed block as every node keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// The header and the sealing leader's signature.
    pub signed: SignedBlockHeader,
    /// What became of its encrypted transactions.
    pub meta: BlockMeta,
    /// Raft index of the seal marker.
    pub sealed_at: u64,
    /// Position of its first transaction.
    pub first: Position,
    /// Position of its last transaction.
    pub last: Position,
}

/// A registered rollup and its blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollupState {
    /// Its policy.
    pub policy: RollupPolicy,
    /// Raft index of its registration.
    pub registered_at: u64,
    pending: VecDeque<PendingTx>,
    blocks: Vec<Block>,
    /// Encrypted transactions in a sealed block still waiting for their key, by block height.
    /// Derived from `Rollups::secrets`; rebuilt when a snapshot is read.
    unrevealed: BTreeMap<u64, BTreeSet<TxHash>>,
    /// Merkle accumulator of the leaves of the first `min(pending, max_block_txs)` pending
    /// transactions (the next block, as the leader previews it): fed as they are applied, so
    /// its root costs nothing at seal time. Derived from `pending`.
    head: MerkleAccumulator,
}

impl RollupState {
    /// Feeds `head` the leaves of the pending transactions it lacks, so that it holds the first
    /// `min(pending, max_block_txs)` again (their node hashes computed together).
    fn catch_up_head(&mut self) {
        let want = self.pending.len().min(self.policy.max_block_txs as usize);
        let have = self.head.count() as usize;
        if want > have {
            let leaves: Vec<[u8; 32]> = self.pending.range(have..want).map(|t| t.leaf).collect();
            self.head.push_leaf_hashes(&leaves);
        }
    }

    /// Rebuilds `head` from the pending transactions (after a block took some).
    fn rebuild_head(&mut self) {
        self.head = MerkleAccumulator::new();
        self.catch_up_head();
    }

    /// Transactions waiting for a block, oldest first.
    pub fn pending(&self) -> &VecDeque<PendingTx> {
        &self.pending
    }

    /// Sealed blocks; `blocks()[h - 1]` has height `h`.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Height of the last sealed block, 0 before the first.
    pub fn height(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// The block at `height` (1-based).
    pub fn block(&self, height: u64) -> Option<&Block> {
        let i = usize::try_from(height.checked_sub(1)?).ok()?;
        self.blocks.get(i)
    }

    /// Height of the block holding the transaction at `position` (which must be one of this
    /// rollup's), `None` while it waits for a block.
    pub fn height_of(&self, position: Position) -> Option<u64> {
        let i = self.blocks.partition_point(|b| b.last < position);
        let b = self.blocks.get(i)?;
        (b.first <= position).then_some(i as u64 + 1)
    }

    /// What reads report about the rollup.
    pub fn info(&self, rollup_id: u64) -> RollupInfo {
        RollupInfo {
            rollup_id,
            policy: self.policy,
            registered_at: self.registered_at,
            height: self.height(),
            pending_txs: self.pending.len() as u64,
            sealed_txs: self.sealed_txs(),
        }
    }

    /// Transactions sealed in blocks.
    pub fn sealed_txs(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| u64::from(b.signed.header.tx_count))
            .sum()
    }
}

/// A rollup's registration and progress, as reads report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RollupInfo {
    /// Its id.
    pub rollup_id: u64,
    /// Its policy.
    pub policy: RollupPolicy,
    /// Raft index of its registration.
    pub registered_at: u64,
    /// Height of its last block (0: none yet).
    pub height: u64,
    /// Transactions waiting for a block.
    pub pending_txs: u64,
    /// Transactions in its blocks.
    pub sealed_txs: u64,
}

/// What became of an encrypted transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretState {
    /// Waiting for its key; the ciphertext (nonce ‖ sealed ‖ tag) is kept to open it.
    Sealed {
        /// The transaction bytes.
        ciphertext: Vec<u8>,
    },
    /// Revealed: the key and the plaintext it opened.
    Revealed {
        /// The key.
        key: [u8; KEY_BYTES],
        /// The decrypted transaction.
        plaintext: Vec<u8>,
        /// Raft index of the reveal.
        revealed_at: u64,
    },
    /// Not revealed within the reveal window; the ciphertext was dropped.
    Expired,
}

/// An encrypted transaction's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Secret {
    /// Its rollup.
    pub rollup_id: u64,
    /// `keccak256(key)`.
    pub commitment: [u8; 32],
    /// Height of the block holding it, once sealed.
    pub height: Option<u64>,
    /// Its state.
    pub state: SecretState,
}

/// What a seal marker did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// The rollup.
    pub rollup_id: u64,
    /// The new block's height.
    pub height: u64,
    /// Encrypted transactions of earlier blocks it expired.
    pub expired: u32,
}

/// The per-rollup state (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rollups {
    rollups: BTreeMap<u64, RollupState>,
    secrets: HashMap<TxHash, Secret>,
    unblocked: u64,
}

impl Rollups {
    /// Nothing registered.
    pub fn new() -> Self {
        Self::default()
    }

    /// True if `rollup_id` is registered.
    pub fn is_registered(&self, rollup_id: u64) -> bool {
        self.rollups.contains_key(&rollup_id)
    }

    /// A registered rollup.
    pub fn rollup(&self, rollup_id: u64) -> Option<&RollupState> {
        self.rollups.get(&rollup_id)
    }

    /// Every registered rollup, by id.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &RollupState)> {
        self.rollups.iter().map(|(id, r)| (*id, r))
    }

    /// Sequenced transactions of unregistered rollups (in no block).
    pub fn unblocked(&self) -> u64 {
        self.unblocked
    }

    /// An encrypted transaction's record.
    pub fn secret(&self, tx_hash: &TxHash) -> Option<&Secret> {
        self.secrets.get(tx_hash)
    }

    /// Whether registering `rollup_id` with `policy` would be accepted.
    pub fn check_register(
        &self,
        rollup_id: u64,
        policy: &RollupPolicy,
    ) -> Result<(), CommandRejection> {
        policy.validate()?;
        if self.is_registered(rollup_id) {
            return Err(CommandRejection::RollupExists { rollup_id });
        }
        if self.rollups.len() >= crate::command::ROLLUPS_MAX {
            return Err(CommandRejection::TooManyRollups {
                max: crate::command::ROLLUPS_MAX as u64,
            });
        }
        Ok(())
    }

    /// Registers a rollup (command at Raft index `index`).
    pub fn register(
        &mut self,
        index: u64,
        rollup_id: u64,
        policy: RollupPolicy,
    ) -> Result<(), CommandRejection> {
        self.check_register(rollup_id, &policy)?;
        self.rollups.insert(
            rollup_id,
            RollupState {
                policy,
                registered_at: index,
                pending: VecDeque::new(),
                blocks: Vec::new(),
                unrevealed: BTreeMap::new(),
                head: MerkleAccumulator::new(),
            },
        );
        Ok(())
    }

    /// A transaction sequenced at `position` for the first time. `leaf` is its Merkle leaf
    /// hash (`merkle::leaf_hash(tx_hash)`, which the caller computed for the batch root),
    /// `commitment` its key commitment if it is encrypted, and `bytes` its ciphertext.
    ///
    /// The caller must call [`Rollups::catch_up_heads`] for the rollups it ordered into before
    /// anything reads or seals blocks: the next block's Merkle accumulator is fed then, many
    /// leaves at once.
    pub fn order(
        &mut self,
        rollup_id: u64,
        position: Position,
        tx_hash: TxHash,
        leaf: [u8; 32],
        commitment: Option<&[u8; 32]>,
        bytes: &[u8],
    ) {
        let Some(rollup) = self.rollups.get_mut(&rollup_id) else {
            self.unblocked += 1;
            return;
        };
        // The same ciphertext ordered again after the idempotency window forgot it: its secret
        // (and the block that holds the first copy) stay as they are, and this copy joins no
        // block. Taking it would overwrite the secret and break the block's reveal accounting.
        if commitment.is_some() && self.secrets.contains_key(&tx_hash) {
            self.unblocked += 1;
            return;
        }
        rollup.pending.push_back(PendingTx {
            tx_hash,
            position,
            encrypted: commitment.is_some(),
            leaf,
        });
        if let Some(commitment) = commitment {
            self.secrets.insert(
                tx_hash,
                Secret {
                    rollup_id,
                    commitment: *commitment,
                    height: None,
                    state: SecretState::Sealed {
                        ciphertext: bytes.to_vec(),
                    },
                },
            );
        }
    }

    /// Brings the next-block accumulators of `rollup_ids` (repeats and unknown ids are fine)
    /// up to date after [`Rollups::order`].
    pub fn catch_up_heads(&mut self, rollup_ids: &[u64]) {
        for id in rollup_ids {
            if let Some(rollup) = self.rollups.get_mut(id) {
                rollup.catch_up_head();
            }
        }
    }

    /// The header of `rollup_id`'s next block as this state would seal it at wall-clock time
    /// `now_us` (the leader calls this on its applied state and signs the result): the first
    /// `max_block_txs` pending transactions. `None` if nothing is pending.
    pub fn next_block(&self, rollup_id: u64, now_us: u64) -> Option<BlockHeader> {
        let rollup = self.rollups.get(&rollup_id)?;
        // `head` holds exactly min(pending, max_block_txs) transactions.
        let run = &rollup.head;
        let n = run.count() as usize;
        if n == 0 {
            return None;
        }
        debug_assert_eq!(
            n,
            rollup
                .pending
                .len()
                .min(rollup.policy.max_block_txs as usize)
        );
        let parent = rollup.blocks.last().map(|b| b.signed.header);
        Some(BlockHeader {
            rollup_id,
            height: rollup.height() + 1,
            parent_hash: parent.map_or([0; 32], |p| p.digest()),
            first_batch: rollup.pending[0].position.index,
            last_batch: rollup.pending[n - 1].position.index,
            tx_merkle_root: run.root(),
            tx_count: n as u32,
            timestamp_us: now_us.max(parent.map_or(0, |p| p.timestamp_us)),
        })
    }

    /// The header of a *full* block that continues a chain of blocks the leader has proposed
    /// but this state has not applied yet: `parent` is the last block of that chain, and
    /// `skip` the pending transactions its blocks take. The block takes the `max_block_txs`
    /// pending transactions after those, and is what [`Rollups::seal`] accepts once the chain
    /// before it is applied. `None` if fewer than `max_block_txs` wait after `skip`, or the
    /// rollup is unknown.
    ///
    /// With `skip == 0` (nothing in flight) use [`Rollups::next_block`], which also seals a
    /// partial block and costs no hashing.
    pub fn block_after(
        &self,
        rollup_id: u64,
        parent: &BlockHeader,
        skip: usize,
        now_us: u64,
    ) -> Option<BlockHeader> {
        let rollup = self.rollups.get(&rollup_id)?;
        let n = rollup.policy.max_block_txs as usize;
        let end = skip.checked_add(n)?;
        if rollup.pending.len() < end {
            return None;
        }
        let leaves: Vec<[u8; 32]> = rollup.pending.range(skip..end).map(|t| t.leaf).collect();
        let mut run = MerkleAccumulator::new();
        run.push_leaf_hashes(&leaves);
        Some(BlockHeader {
            rollup_id,
            height: parent.height + 1,
            parent_hash: parent.digest(),
            first_batch: rollup.pending[skip].position.index,
            last_batch: rollup.pending[end - 1].position.index,
            tx_merkle_root: run.root(),
            tx_count: n as u32,
            timestamp_us: now_us.max(parent.timestamp_us),
        })
    }

    /// Applies a seal marker at Raft index `index` (module docs). On error nothing changes.
    pub fn seal(
        &mut self,
        index: u64,
        signed: &SignedBlockHeader,
    ) -> Result<Sealed, CommandRejection> {
        let h = signed.header;
        let stale = |reason| CommandRejection::StaleSeal {
            rollup_id: h.rollup_id,
            height: h.height,
            reason,
        };
        let rollup = self
            .rollups
            .get_mut(&h.rollup_id)
            .ok_or(CommandRejection::UnknownRollup {
                rollup_id: h.rollup_id,
            })?;
        if h.height != rollup.height() + 1 {
            return Err(stale("height is not the rollup's next"));
        }
        let parent = rollup.blocks.last().map(|b| b.signed.header);
        if h.parent_hash != parent.map_or([0; 32], |p| p.digest()) {
            return Err(stale("parent hash is not the previous block's digest"));
        }
        if h.timestamp_us < parent.map_or(0, |p| p.timestamp_us) {
            return Err(stale("time is before the parent's"));
        }
        // A block takes the first `n` waiting transactions: all of the first run, the common
        // case (its root is ready), or a prefix of it when transactions arrived between the
        // leader's preview and this marker (its root costs n node hashes; the leaves are kept).
        let n = h.tx_count as usize;
        let run = &rollup.head;
        if n == 0 || n as u64 > run.count() {
            return Err(stale("transaction count is not what is pending"));
        }
        let whole_run = n as u64 == run.count();
        let (first, last) = (rollup.pending[0].position, rollup.pending[n - 1].position);
        if (h.first_batch, h.last_batch) != (first.index, last.index) {
            return Err(stale("batch range is not that of the pending transactions"));
        }
        let root = if whole_run {
            run.root()
        } else {
            let mut prefix = MerkleAccumulator::new();
            for t in rollup.pending.iter().take(n) {
                prefix.push_leaf_hash(t.leaf);
            }
            prefix.root()
        };
        if root != h.tx_merkle_root {
            return Err(stale("Merkle root is not that of the pending transactions"));
        }
        signed
            .signer()
            .map_err(|_| CommandRejection::BadSignature)?;

        // Valid: from here on nothing fails.
        let height = h.height;
        let mut meta = BlockMeta::default();
        // How full the queue got since the last block: the room the next interval will need.
        let filled = rollup.pending.len();
        for tx in rollup.pending.drain(..n).filter(|t| t.encrypted) {
            meta.encrypted += 1;
            // Every pending encrypted transaction has a secret (`order`; checked when a
            // snapshot is read).
            let Some(secret) = self.secrets.get_mut(&tx.tx_hash) else {
                continue;
            };
            secret.height = Some(height);
            match secret.state {
                SecretState::Revealed { .. } => meta.revealed += 1,
                _ => {
                    rollup
                        .unrevealed
                        .entry(height)
                        .or_default()
                        .insert(tx.tx_hash);
                }
            }
        }
        // A surge's queue gives its memory back, but only once a whole interval between blocks
        // filled under a quarter of its room (and never below PENDING_KEPT). Measured after the
        // drain instead, a queue that fills and empties every block was shrunk at each block and
        // grew back by doubling (copying) before the next.
        let need = PENDING_KEPT.max(filled);
        if rollup.pending.capacity() > 4 * need {
            rollup.pending.shrink_to(2 * need);
        }
        rollup.blocks.push(Block {
            signed: *signed,
            meta,
            sealed_at: index,
            first,
            last,
        });
        // The next block's leaves: each waiting transaction is fed once (or, after a prefix
        // was sealed, again: those arrived during one commit round).
        rollup.rebuild_head();
        let window = u64::from(rollup.policy.reveal_window_blocks);
        let mut expired = 0;
        while let Some(entry) = rollup.unrevealed.first_entry() {
            let old = *entry.key();
            if old + window > height {
                break;
            }
            let hashes = entry.remove();
            let block = &mut rollup.blocks[(old - 1) as usize];
            for hash in hashes {
                if let Some(s) = self.secrets.get_mut(&hash) {
                    s.state = SecretState::Expired;
                }
                block.meta.expired = block.meta.expired.saturating_add(1);
                expired += 1;
            }
        }
        Ok(Sealed {
            rollup_id: h.rollup_id,
            height,
            expired,
        })
    }

    /// Whether `key` reveals `tx_hash`; returns the plaintext. `sequenced` tells a raw
    /// transaction ([`CommandRejection::NotEncrypted`]) from an unknown one.
    pub fn check_reveal(
        &self,
        tx_hash: &TxHash,
        key: &[u8; KEY_BYTES],
        sequenced: bool,
    ) -> Result<Vec<u8>, CommandRejection> {
        let tx_hash = *tx_hash;
        let Some(secret) = self.secrets.get(&tx_hash) else {
            return Err(if sequenced {
                CommandRejection::NotEncrypted { tx_hash }
            } else {
                CommandRejection::UnknownTx { tx_hash }
            });
        };
        match &secret.state {
            SecretState::Revealed { .. } => Err(CommandRejection::AlreadyRevealed { tx_hash }),
            SecretState::Expired => Err(CommandRejection::Expired {
                tx_hash,
                height: secret.height.unwrap_or(0),
            }),
            SecretState::Sealed { ciphertext } => {
                if encrypted::key_commitment(key) != secret.commitment {
                    return Err(CommandRejection::WrongKey { tx_hash });
                }
                encrypted::open(&secret.commitment, key, ciphertext)
                    .map_err(|reason| CommandRejection::Undecryptable { tx_hash, reason })
            }
        }
    }

    /// Applies a reveal at Raft index `index`. On error nothing changes.
    pub fn reveal(
        &mut self,
        index: u64,
        tx_hash: &TxHash,
        key: &[u8; KEY_BYTES],
        sequenced: bool,
    ) -> Result<(), CommandRejection> {
        let plaintext = self.check_reveal(tx_hash, key, sequenced)?;
        let secret = self.secrets.get_mut(tx_hash).expect("checked above");
        secret.state = SecretState::Revealed {
            key: *key,
            plaintext,
            revealed_at: index,
        };
        if let Some(height) = secret.height {
            let rollup = self
                .rollups
                .get_mut(&secret.rollup_id)
                .expect("a secret's rollup is registered");
            if let Some(set) = rollup.unrevealed.get_mut(&height) {
                set.remove(tx_hash);
                if set.is_empty() {
                    rollup.unrevealed.remove(&height);
                }
            }
            if let Some(b) = rollup.blocks.get_mut((height - 1) as usize) {
                b.meta.revealed = b.meta.revealed.saturating_add(1);
            }
        }
        Ok(())
    }

    /// A lower bound of `encode`'s output length (exact but for the secrets' payloads), for
    /// reserving the buffer once.
    pub(crate) fn encoded_len_hint(&self) -> usize {
        const PENDING: usize = 32 + 12 + 4;
        const BLOCK: usize = 176 + 16 + 8 + 12 + 12;
        const SECRET: usize = 32 + 8 + 32 + 8 + 4 + 4 + 8 + 32;
        24 + self
            .rollups
            .values()
            .map(|r| 48 + r.pending.len() * PENDING + r.blocks.len() * BLOCK)
            .sum::<usize>()
            + self.secrets.len() * SECRET
    }

    /// Appends the snapshot section (format in `sequencer`'s module docs).
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.rollups.len() as u64);
        put_u64(out, self.unblocked);
        put_u64(out, self.secrets.len() as u64);
        for (id, r) in &self.rollups {
            put_u64(out, *id);
            put_u32(out, r.policy.block_time_ms);
            put_u32(out, r.policy.max_block_txs);
            put_u32(out, r.policy.reveal_window_blocks);
            put_u32(out, 0);
            put_u64(out, r.registered_at);
            put_u64(out, r.pending.len() as u64);
            put_u64(out, r.blocks.len() as u64);
            for p in &r.pending {
                out.extend_from_slice(p.tx_hash.as_bytes());
                put_position(out, p.position);
                put_u32(out, u32::from(p.encrypted));
            }
            for b in &r.blocks {
                out.extend_from_slice(&b.signed.encode());
                put_u32(out, b.meta.encrypted);
                put_u32(out, b.meta.revealed);
                put_u32(out, b.meta.expired);
                put_u32(out, 0);
                put_u64(out, b.sealed_at);
                put_position(out, b.first);
                put_position(out, b.last);
            }
        }
        let mut secrets: Vec<(&TxHash, &Secret)> = self.secrets.iter().collect();
        secrets.sort_unstable_by_key(|(h, _)| **h);
        for (hash, s) in secrets {
            out.extend_from_slice(hash.as_bytes());
            put_u64(out, s.rollup_id);
            out.extend_from_slice(&s.commitment);
            put_u64(out, s.height.unwrap_or(0));
            let (tag, key, at, bytes): (u32, [u8; 32], u64, &[u8]) = match &s.state {
                SecretState::Sealed { ciphertext } => (0, [0; 32], 0, ciphertext),
                SecretState::Revealed {
                    key,
                    plaintext,
                    revealed_at,
                } => (1, *key, *revealed_at, plaintext),
                SecretState::Expired => (2, [0; 32], 0, &[]),
            };
            put_u32(out, tag);
            put_u32(out, bytes.len() as u32);
            put_u64(out, at);
            out.extend_from_slice(&key);
            out.extend_from_slice(bytes);
        }
    }

    /// Reads [`encode`](Rollups::encode)'s output (all of `bytes`), checking its invariants.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Rollups, SnapshotError> {
        let bad = |reason, at| SnapshotError::Inconsistent { reason, at };
        let mut r = Cursor { bytes, at: 0 };
        let truncated = |at| bad("rollup section truncated", at);
        let rollup_count = r.u64().ok_or(truncated(0))?;
        let unblocked = r.u64().ok_or(truncated(0))?;
        let secret_count = r.u64().ok_or(truncated(0))?;
        if rollup_count > crate::command::ROLLUPS_MAX as u64 {
            return Err(bad("more rollups than ROLLUPS_MAX", 0));
        }
        let mut rollups = BTreeMap::new();
        for at in 0..rollup_count {
            let id = r.u64().ok_or(truncated(at))?;
            let policy = RollupPolicy {
                block_time_ms: r.u32().ok_or(truncated(at))?,
                max_block_txs: r.u32().ok_or(truncated(at))?,
                reveal_window_blocks: r.u32().ok_or(truncated(at))?,
            };
            if r.u32() != Some(0) || policy.validate().is_err() {
                return Err(bad("bad rollup policy", at));
            }
            if rollups.keys().next_back().is_some_and(|last| *last >= id) {
                return Err(bad("rollups not in ascending id order", at));
            }
            let registered_at = r.u64().ok_or(truncated(at))?;
            let pending_count = r.u64().ok_or(truncated(at))?;
            let block_count = r.u64().ok_or(truncated(at))?;
            let mut pending = VecDeque::new();
            for _ in 0..pending_count {
                let tx_hash = r.hash().ok_or(truncated(at))?;
                let position = r.position().ok_or(truncated(at))?;
                let encrypted = match r.u32().ok_or(truncated(at))? {
                    0 => false,
                    1 => true,
                    _ => return Err(bad("bad pending encrypted flag", at)),
                };
                pending.push_back(PendingTx {
                    tx_hash,
                    position,
                    encrypted,
                    leaf: crate::merkle::leaf_hash(&tx_hash),
                });
            }
            let mut blocks: Vec<Block> = Vec::new();
            for _ in 0..block_count {
                let signed = SignedBlockHeader::decode(
                    r.take(SIGNED_BLOCK_HEADER_BYTES).ok_or(truncated(at))?,
                )
                .map_err(|_| bad("malformed block header", at))?;
                let meta = BlockMeta {
                    encrypted: r.u32().ok_or(truncated(at))?,
                    revealed: r.u32().ok_or(truncated(at))?,
                    expired: r.u32().ok_or(truncated(at))?,
                };
                if r.u32() != Some(0)
                    || meta
                        .revealed
                        .checked_add(meta.expired)
                        .is_none_or(|s| s > meta.encrypted)
                {
                    return Err(bad("bad block metadata", at));
                }
                let block = Block {
                    signed,
                    meta,
                    sealed_at: r.u64().ok_or(truncated(at))?,
                    first: r.position().ok_or(truncated(at))?,
                    last: r.position().ok_or(truncated(at))?,
                };
                let parent = blocks.last().map(|b| b.signed.header);
                let h = &block.signed.header;
                if h.rollup_id != id
                    || h.height != blocks.len() as u64 + 1
                    || h.parent_hash != parent.map_or([0; 32], |p| p.digest())
                    || (h.first_batch, h.last_batch) != (block.first.index, block.last.index)
                {
                    return Err(bad("blocks do not chain", at));
                }
                blocks.push(block);
            }
            let mut state = RollupState {
                policy,
                registered_at,
                pending,
                blocks,
                unrevealed: BTreeMap::new(),
                head: MerkleAccumulator::new(),
            };
            state.rebuild_head();
            rollups.insert(id, state);
        }
        let mut secrets = HashMap::new();
        let mut prev: Option<TxHash> = None;
        for at in 0..secret_count {
            let hash = r.hash().ok_or(truncated(at))?;
            if prev.is_some_and(|p| p >= hash) {
                return Err(bad("secrets not in ascending hash order", at));
            }
            prev = Some(hash);
            let rollup_id = r.u64().ok_or(truncated(at))?;
            let commitment = r.take(32).ok_or(truncated(at))?.try_into().expect("32");
            let height = match r.u64().ok_or(truncated(at))? {
                0 => None,
                h => Some(h),
            };
            let tag = r.u32().ok_or(truncated(at))?;
            let len = r.u32().ok_or(truncated(at))? as usize;
            let revealed_at = r.u64().ok_or(truncated(at))?;
            let key: [u8; 32] = r.take(32).ok_or(truncated(at))?.try_into().expect("32");
            let bytes = r.take(len).ok_or(truncated(at))?.to_vec();
            let state = match tag {
                0 => SecretState::Sealed { ciphertext: bytes },
                1 => SecretState::Revealed {
                    key,
                    plaintext: bytes,
                    revealed_at,
                },
                2 if bytes.is_empty() => SecretState::Expired,
                _ => return Err(bad("bad secret state", at)),
            };
            let Some(rollup) = rollups.get_mut(&rollup_id) else {
                return Err(bad("secret of an unregistered rollup", at));
            };
            match (height, &state) {
                (Some(h), _) if h > rollup.height() => {
                    return Err(bad("secret in a block that does not exist", at))
                }
                (Some(h), SecretState::Sealed { .. }) => {
                    rollup.unrevealed.entry(h).or_default().insert(hash);
                }
                (None, SecretState::Expired) => {
                    return Err(bad("expired secret in no block", at));
                }
                _ => {}
            }
            secrets.insert(
                hash,
                Secret {
                    rollup_id,
                    commitment,
                    height,
                    state,
                },
            );
        }
        if r.at != bytes.len() {
            return Err(bad("trailing bytes after the rollup section", 0));
        }
        // Cross-checks: every pending encrypted transaction has a secret in no block yet, and
        // each block's counts are those of its secrets.
        for (id, rollup) in &rollups {
            for p in rollup.pending.iter().filter(|p| p.encrypted) {
                match secrets.get(&p.tx_hash) {
                    Some(s) if s.rollup_id == *id && s.height.is_none() => {}
                    _ => return Err(bad("pending encrypted transaction without its secret", *id)),
                }
            }
            let mut counts = vec![BlockMeta::default(); rollup.blocks.len()];
            for s in secrets.values().filter(|s| s.rollup_id == *id) {
                if let Some(h) = s.height {
                    let m = &mut counts[(h - 1) as usize];
                    m.encrypted += 1;
                    match s.state {
                        SecretState::Revealed { .. } => m.revealed += 1,
                        SecretState::Expired => m.expired += 1,
                        SecretState::Sealed { .. } => {}
                    }
                }
            }
            if rollup.blocks.iter().zip(&counts).any(|(b, c)| b.meta != *c) {
                return Err(bad("block metadata disagrees with its secrets", *id));
            }
        }
        Ok(Rollups {
            rollups,
            secrets,
            unblocked,
        })
    }
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_position(out: &mut Vec<u8>, p: Position) {
    put_u64(out, p.index);
    put_u32(out, p.offset);
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn hash(&mut self) -> Option<TxHash> {
        Some(TxHash(self.take(32)?.try_into().ok()?))
    }

    fn position(&mut self) -> Option<Position> {
        Some(Position {
            index: self.u64()?,
            offset: self.u32()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::batch::{encode_batch, Batch};
    use crate::command::Command;
    use crate::encrypted::{encrypted_transaction, DecryptError, NONCE_BYTES};
    use crate::sequencer::{CommandApplied, Sequencer};
    use crate::sign::Signer;
    use crate::tx::Transaction;
    use crate::tx_kind::TxKind;

    const POLICY: RollupPolicy = RollupPolicy {
        block_time_ms: 100,
        max_block_txs: 3,
        reveal_window_blocks: 2,
    };

    fn raw(rollup_id: u64, payload: &[u8]) -> Transaction {
        Transaction {
            rollup_id,
            kind: TxKind::Raw,
            bytes: payload.to_vec(),
        }
    }

    fn key(n: u8) -> [u8; KEY_BYTES] {
        [n; KEY_BYTES]
    }

    fn secret_tx(rollup_id: u64, n: u8) -> Transaction {
        encrypted_transaction(rollup_id, &key(n), &[n; NONCE_BYTES], &[n, n, n])
    }

    /// A sequencer and the log it was fed, so tests can replay it into a second one.
    struct Log {
        seq: Sequencer,
        next: u64,
        entries: Vec<(u64, Vec<u8>, bool)>,
        signer: Signer,
        clock: u64,
    }

    impl Log {
        fn new() -> Log {
            Log {
                seq: Sequencer::new(),
                next: 1,
                entries: Vec::new(),
                signer: Signer::from_secret(&[7; 32]).unwrap(),
                clock: 1_000,
            }
        }

        fn batch(&mut self, txs: Vec<Transaction>) -> u64 {
            let index = self.next;
            self.next += 1;
            let bytes = encode_batch(&Batch::new(txs, 1, index, 5))
                .unwrap()
                .to_vec();
            self.seq.apply_batch(index, 1, &bytes).unwrap();
            self.entries.push((index, bytes, false));
            index
        }

        fn command(&mut self, c: &Command) -> Result<CommandApplied, CommandRejection> {
            let index = self.next;
            self.next += 1;
            let bytes = c.encode();
            let r = self.seq.apply_command(index, &bytes);
            self.entries.push((index, bytes, true));
            r
        }

        fn register(&mut self, rollup_id: u64) {
            let c = Command::RegisterRollup {
                rollup_id,
                policy: POLICY,
            };
            assert_eq!(
                self.command(&c),
                Ok(CommandApplied::Registered { rollup_id })
            );
        }

        /// Seals what the leader would seal now; `None` if nothing is pending.
        fn seal(&mut self, rollup_id: u64) -> Option<Result<CommandApplied, CommandRejection>> {
            self.clock += 10;
            let header = self.seq.rollups().next_block(rollup_id, self.clock)?;
            let signed = SignedBlockHeader::sign(header, &self.signer);
            Some(self.command(&Command::SealBlock(signed)))
        }

        fn replay(&self) -> Sequencer {
            let mut s = Sequencer::new();
            for (index, bytes, command) in &self.entries {
                if *command {
                    let _ = s.apply_command(*index, bytes);
                } else {
                    s.apply_batch(*index, 1, bytes).unwrap();
                }
            }
            s
        }
    }

    fn rollup(l: &Log, id: u64) -> &RollupState {
        l.seq.rollups().rollup(id).unwrap()
    }

    #[test]
    fn blocks_take_pending_transactions_in_log_order_up_to_the_size_limit() {
        let mut l = Log::new();
        l.register(1);
        l.register(2);
        let b1 = l.batch(vec![raw(1, b"a"), raw(2, b"x"), raw(1, b"b")]);
        let b2 = l.batch(vec![raw(1, b"c"), raw(1, b"a"), raw(1, b"d")]);
        // "a" again is a duplicate: it has a position already and joins no block twice.
        assert_eq!(rollup(&l, 1).pending().len(), 4);

        let Some(Ok(CommandApplied::Sealed(s))) = l.seal(1) else {
            panic!("sealed")
        };
        assert_eq!((s.rollup_id, s.height, s.expired), (1, 1, 0));
        let block = *rollup(&l, 1).block(1).unwrap();
        let h = block.signed.header;
        assert_eq!((h.height, h.tx_count, h.parent_hash), (1, 3, [0; 32]));
        assert_eq!((h.first_batch, h.last_batch), (b1, b2));
        assert_eq!(
            h.tx_merkle_root,
            crate::merkle::merkle_root(&[TxHash::of(b"a"), TxHash::of(b"b"), TxHash::of(b"c")])
        );
        assert_eq!(block.signed.signer().unwrap(), l.signer.address());
        assert_eq!(rollup(&l, 1).pending().len(), 1);

        let Some(Ok(CommandApplied::Sealed(s))) = l.seal(1) else {
            panic!("sealed")
        };
        assert_eq!(s.height, 2);
        let h2 = rollup(&l, 1).block(2).unwrap().signed.header;
        assert_eq!(h2.parent_hash, h.digest());
        assert_eq!((h2.tx_count, h2.first_batch, h2.last_batch), (1, b2, b2));
        assert!(h2.timestamp_us >= h.timestamp_us);
        assert!(l.seal(1).is_none(), "nothing pending, no block");
        assert_eq!(rollup(&l, 1).sealed_txs(), 4);
        assert_eq!(rollup(&l, 2).height(), 0);
        assert_eq!(rollup(&l, 2).pending().len(), 1);
    }

    #[test]
    fn a_surge_of_pending_transactions_gives_its_memory_back_once_blocks_drain_it() {
        let mut l = Log::new();
        let policy = RollupPolicy {
            max_block_txs: 10_000,
            ..POLICY
        };
        let c = Command::RegisterRollup {
            rollup_id: 1,
            policy,
        };
        assert!(l.command(&c).is_ok());
        for b in 0..3u32 {
            let txs = (0..10_000u32)
                .map(|i| raw(1, &(b * 10_000 + i).to_le_bytes()))
                .collect();
            l.batch(txs);
        }
        let surge = rollup(&l, 1).pending().capacity();
        assert!(surge >= 30_000, "{surge}");
        // Three blocks drain it; each found the queue at least a third full: it keeps its room
        // (hysteresis).
        for _ in 0..3 {
            assert!(matches!(l.seal(1), Some(Ok(CommandApplied::Sealed(_)))));
        }
        assert!(rollup(&l, 1).pending().is_empty());
        assert_eq!(rollup(&l, 1).pending().capacity(), surge);
        // The next block finds only a few transactions: the room shrinks to what it keeps.
        l.batch(
            (0..100u32)
                .map(|i| raw(1, &(40_000 + i).to_le_bytes()))
                .collect(),
        );
        assert!(matches!(l.seal(1), Some(Ok(CommandApplied::Sealed(_)))));
        let kept = rollup(&l, 1).pending().capacity();
        assert!(kept <= 2 * PENDING_KEPT, "{kept}");
        // Nothing else changed: a replay of the same log has the same state.
        assert_eq!(rollup(&l, 1).sealed_txs(), 30_100);
        assert!(l.replay() == l.seq);
    }

    /// A queue that fills and empties at every block keeps its room: no block shrinks it, so the
    /// next interval does not grow it again (each growth copies the whole queue).
    #[test]
    fn a_queue_filled_and_drained_at_every_block_keeps_its_room() {
        let mut l = Log::new();
        let policy = RollupPolicy {
            max_block_txs: 20_000,
            ..POLICY
        };
        let c = Command::RegisterRollup {
            rollup_id: 1,
            policy,
        };
        assert!(l.command(&c).is_ok());
        let mut rooms = Vec::new();
        for b in 0..4u32 {
            let txs = (0..20_000u32)
                .map(|i| raw(1, &(b * 20_000 + i).to_le_bytes()))
                .collect();
            l.batch(txs);
            assert!(matches!(l.seal(1), Some(Ok(CommandApplied::Sealed(_)))));
            assert!(rollup(&l, 1).pending().is_empty());
            rooms.push(rollup(&l, 1).pending().capacity());
        }
        assert!(rooms[0] >= 20_000, "{rooms:?}");
        assert!(rooms.iter().all(|&r| r == rooms[0]), "{rooms:?}");
        assert!(l.replay() == l.seq);
    }

    #[test]
    fn a_chain_of_blocks_previewed_at_once_seals_in_order_and_equals_one_by_one_sealing() {
        let mut l = Log::new();
        l.register(1);
        // 3 full blocks of 3 and 2 left over.
        let letters: Vec<Vec<u8>> = (0..11u8).map(|i| vec![b'a' + i]).collect();
        l.batch(letters[..6].iter().map(|p| raw(1, p)).collect());
        l.batch(letters[6..].iter().map(|p| raw(1, p)).collect());
        let mut one_by_one = l.replay();

        // The leader previews the whole chain before any marker is applied.
        let now = l.clock + 10;
        let first = l.seq.rollups().next_block(1, now).unwrap();
        let mut chain = vec![first];
        let mut skip = first.tx_count as usize;
        while let Some(h) = l
            .seq
            .rollups()
            .block_after(1, chain.last().unwrap(), skip, now)
        {
            skip += h.tx_count as usize;
            chain.push(h);
        }
        assert_eq!(chain.len(), 3, "only full blocks after the first");
        assert!(l.seq.rollups().block_after(1, &first, 9, now).is_none());
        assert!(l.seq.rollups().block_after(9, &first, 3, now).is_none());
        for h in &chain {
            let signed = SignedBlockHeader::sign(*h, &l.signer);
            assert!(matches!(
                l.command(&Command::SealBlock(signed)),
                Ok(CommandApplied::Sealed(_))
            ));
        }
        assert_eq!(rollup(&l, 1).height(), 3);
        assert_eq!(rollup(&l, 1).pending().len(), 2);

        // The same blocks as sealing each after the previous one applied.
        for (i, h) in chain.iter().enumerate() {
            let next = one_by_one.rollups().next_block(1, now).unwrap();
            assert_eq!(&next, h, "block {}", i + 1);
            let signed = SignedBlockHeader::sign(next, &l.signer);
            one_by_one
                .apply_command(100 + i as u64, &Command::SealBlock(signed).encode())
                .unwrap();
        }

        // A chain block applied out of order (its parent not sealed) is stale.
        let mut l2 = Log::new();
        l2.register(1);
        l2.batch(letters[..6].iter().map(|p| raw(1, p)).collect());
        let first = l2.seq.rollups().next_block(1, now).unwrap();
        let second = l2.seq.rollups().block_after(1, &first, 3, now).unwrap();
        let signed = SignedBlockHeader::sign(second, &l2.signer);
        assert!(matches!(
            l2.command(&Command::SealBlock(signed)),
            Err(CommandRejection::StaleSeal { .. })
        ));
        assert_eq!(rollup(&l2, 1).height(), 0);
    }

    #[test]
    fn an_encrypted_transaction_ordered_again_after_the_window_joins_no_block() {
        let mut l = Log::new();
        l.seq = Sequencer::with_idempotency_generation(2);
        l.register(1);
        let e = secret_tx(1, 1);
        let e_hash = TxHash::of(&e.bytes);
        l.batch(vec![e.clone()]);
        assert!(matches!(l.seal(1), Some(Ok(CommandApplied::Sealed(_)))));
        l.batch(
            [b"a", b"b", b"c", b"d"]
                .iter()
                .map(|p| raw(1, *p))
                .collect(),
        );
        assert_eq!(l.seq.lookup(&e_hash), None, "forgotten by the window");
        let unblocked = l.seq.rollups().unblocked();
        let index = l.batch(vec![e.clone()]);
        assert_eq!(
            l.seq.lookup(&e_hash).map(|p| p.index),
            Some(index),
            "ordered again"
        );
        assert_eq!(l.seq.rollups().unblocked(), unblocked + 1);
        assert_eq!(rollup(&l, 1).pending().len(), 4, "the copy joins no block");
        assert_eq!(l.seq.rollups().secret(&e_hash).unwrap().height, Some(1));
        let restored = Sequencer::from_snapshot(&l.seq.snapshot_bytes()).expect("loads");
        assert_eq!(restored, l.seq);
    }

    #[test]
    fn stale_or_forged_seal_markers_change_nothing() {
        let mut l = Log::new();
        l.register(1);
        l.batch(vec![raw(1, b"a"), raw(1, b"b")]);
        let header = l.seq.rollups().next_block(1, 50).unwrap();
        let good = SignedBlockHeader::sign(header, &l.signer);
        let before = l.seq.clone();
        let mut cases: Vec<(SignedBlockHeader, &str)> = Vec::new();
        let mut bump = |f: &dyn Fn(&mut BlockHeader), what| {
            let mut h = header;
            f(&mut h);
            cases.push((SignedBlockHeader::sign(h, &l.signer), what));
        };
        bump(&|h| h.height = 2, "height");
        bump(&|h| h.parent_hash = [1; 32], "parent");
        bump(&|h| h.tx_count = 1, "count");
        bump(&|h| h.tx_count = 3, "count beyond pending");
        bump(&|h| h.first_batch = 9, "range");
        bump(&|h| h.tx_merkle_root = [2; 32], "root");
        bump(&|h| h.rollup_id = 5, "rollup");
        for (signed, what) in cases {
            let r = l.command(&Command::SealBlock(signed));
            assert!(
                matches!(
                    r,
                    Err(CommandRejection::StaleSeal { .. } | CommandRejection::UnknownRollup { .. })
                ),
                "{what}: {r:?}"
            );
            assert_eq!(l.seq, before, "{what}");
        }
        let mut unsigned = good;
        unsigned.signature = crate::sign::Signature([0; 65]);
        assert_eq!(
            l.command(&Command::SealBlock(unsigned)),
            Err(CommandRejection::BadSignature)
        );
        assert_eq!(l.seq, before);
        assert!(l.command(&Command::SealBlock(good)).is_ok());
        // The same marker again is stale: that height exists now.
        assert!(matches!(
            l.command(&Command::SealBlock(good)),
            Err(CommandRejection::StaleSeal { .. })
        ));
        assert_eq!(rollup(&l, 1).height(), 1);
    }

    #[test]
    fn reveals_record_plaintext_and_unrevealed_transactions_expire_after_the_window() {
        let mut l = Log::new();
        l.register(1);
        let (t1, t2, t3) = (secret_tx(1, 1), secret_tx(1, 2), secret_tx(1, 3));
        let (h1, h2, h3) = (t1.tx_hash(), t2.tx_hash(), t3.tx_hash());
        // t1 is revealed before its block is sealed, t2 after, t3 never.
        l.batch(vec![t1, t2, t3]);
        let reveal = |tx_hash, n| Command::Reveal {
            tx_hash,
            key: key(n),
        };
        assert_eq!(
            l.command(&reveal(h1, 1)),
            Ok(CommandApplied::Revealed { tx_hash: h1 })
        );
        l.seal(1).unwrap().unwrap();
        let meta = rollup(&l, 1).block(1).unwrap().meta;
        assert_eq!((meta.encrypted, meta.revealed, meta.expired), (3, 1, 0));
        assert!(l.command(&reveal(h2, 2)).is_ok());
        let Some(SecretState::Revealed { plaintext, .. }) =
            l.seq.rollups().secret(&h2).map(|s| &s.state)
        else {
            panic!("revealed")
        };
        assert_eq!(plaintext, &[2, 2, 2]);
        assert_eq!(rollup(&l, 1).block(1).unwrap().meta.revealed, 2);

        // Window 2: block 2 leaves t3 pending, block 3 expires it.
        l.batch(vec![raw(1, b"x")]);
        let Some(Ok(CommandApplied::Sealed(s))) = l.seal(1) else {
            panic!()
        };
        assert_eq!(s.expired, 0);
        l.batch(vec![raw(1, b"y")]);
        let Some(Ok(CommandApplied::Sealed(s))) = l.seal(1) else {
            panic!()
        };
        assert_eq!((s.height, s.expired), (3, 1));
        let meta = rollup(&l, 1).block(1).unwrap().meta;
        assert_eq!((meta.revealed, meta.expired, meta.pending()), (2, 1, 0));
        assert_eq!(
            l.seq.rollups().secret(&h3).unwrap().state,
            SecretState::Expired
        );
        assert_eq!(
            l.command(&reveal(h3, 3)),
            Err(CommandRejection::Expired {
                tx_hash: h3,
                height: 1
            })
        );
    }

    #[test]
    fn bad_commands_are_typed_errors_and_change_nothing() {
        let mut l = Log::new();
        l.register(1);
        let t = secret_tx(1, 1);
        let h = t.tx_hash();
        // A ciphertext sealed under the committed key but cut short: the key matches, the
        // bytes do not open.
        let mut broken = secret_tx(1, 4);
        broken.bytes.truncate(10);
        let hb = broken.tx_hash();
        l.batch(vec![t, raw(1, b"plain"), broken]);
        let before = l.seq.clone();
        let cases = [
            (
                Command::Reveal {
                    tx_hash: h,
                    key: key(9),
                },
                CommandRejection::WrongKey { tx_hash: h },
            ),
            (
                Command::Reveal {
                    tx_hash: TxHash([3; 32]),
                    key: key(1),
                },
                CommandRejection::UnknownTx {
                    tx_hash: TxHash([3; 32]),
                },
            ),
            (
                Command::Reveal {
                    tx_hash: TxHash::of(b"plain"),
                    key: key(1),
                },
                CommandRejection::NotEncrypted {
                    tx_hash: TxHash::of(b"plain"),
                },
            ),
            (
                Command::Reveal {
                    tx_hash: hb,
                    key: key(4),
                },
                CommandRejection::Undecryptable {
                    tx_hash: hb,
                    reason: DecryptError::TooShort { len: 10 },
                },
            ),
            (
                Command::RegisterRollup {
                    rollup_id: 1,
                    policy: POLICY,
                },
                CommandRejection::RollupExists { rollup_id: 1 },
            ),
        ];
        for (c, want) in cases {
            assert_eq!(l.seq.check_command(&c), Err(want.clone()), "{c:?}");
            assert_eq!(l.command(&c), Err(want), "{c:?}");
            assert_eq!(l.seq, before);
        }
        let zero = Command::RegisterRollup {
            rollup_id: 2,
            policy: RollupPolicy {
                max_block_txs: 0,
                ..POLICY
            },
        };
        assert!(matches!(l.command(&zero), Err(CommandRejection::Policy(_))));
        assert!(matches!(
            l.seq.apply_command(99, &[1, 3, 0]),
            Err(CommandRejection::Malformed(_))
        ));
        assert_eq!(l.seq, before);
        // A duplicate reveal.
        let ok = Command::Reveal {
            tx_hash: h,
            key: key(1),
        };
        assert!(l.command(&ok).is_ok());
        assert_eq!(
            l.command(&ok),
            Err(CommandRejection::AlreadyRevealed { tx_hash: h })
        );
    }

    #[test]
    fn a_marker_previewed_before_more_transactions_arrived_seals_what_it_saw() {
        let mut l = Log::new();
        l.register(1);
        l.batch(vec![raw(1, b"a"), raw(1, b"b")]);
        // The leader previews two transactions; two more are applied before its marker.
        let header = l.seq.rollups().next_block(1, 50).unwrap();
        assert_eq!(header.tx_count, 2);
        let marker = Command::SealBlock(SignedBlockHeader::sign(header, &l.signer));
        l.batch(vec![raw(1, b"c"), raw(1, b"d")]);
        let Ok(CommandApplied::Sealed(s)) = l.command(&marker) else {
            panic!("the previewed block is still the rollup's next block")
        };
        assert_eq!(s.height, 1);
        let r = rollup(&l, 1);
        assert_eq!(r.block(1).unwrap().signed.header.tx_count, 2);
        assert_eq!(r.pending().len(), 2);
        // The rest waits for the next block, whose root is that of c, d (max 3: one run).
        let next = l.seq.rollups().next_block(1, 60).unwrap();
        assert_eq!(next.tx_count, 2);
        assert_eq!(
            next.tx_merkle_root,
            crate::merkle::merkle_root(&[TxHash::of(b"c"), TxHash::of(b"d")])
        );
        assert!(matches!(l.seal(1), Some(Ok(_))));
        assert_eq!(l.replay(), l.seq);
    }

    #[test]
    fn snapshots_with_inconsistent_rollup_state_are_refused() {
        let mut l = Log::new();
        l.register(1);
        l.batch(vec![secret_tx(1, 1), raw(1, b"a")]);
        l.seal(1).unwrap().unwrap();
        l.batch(vec![secret_tx(1, 2)]);
        let good = l.seq.rollups().clone();
        let mut bytes = Vec::new();
        good.encode(&mut bytes);
        assert_eq!(Rollups::decode(&bytes).unwrap(), good);
        // Drop the pending encrypted transaction's secret; then bump a block's count.
        let mut missing = good.clone();
        missing.secrets.remove(&secret_tx(1, 2).tx_hash());
        let mut bytes = Vec::new();
        missing.encode(&mut bytes);
        assert!(Rollups::decode(&bytes).is_err());
        let mut counts = good.clone();
        counts.rollups.get_mut(&1).unwrap().blocks[0].meta.encrypted += 1;
        let mut bytes = Vec::new();
        counts.encode(&mut bytes);
        assert!(Rollups::decode(&bytes).is_err());
        // Every truncation is an error, never a panic.
        let mut full = Vec::new();
        good.encode(&mut full);
        for cut in 0..full.len() {
            assert!(Rollups::decode(&full[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_cluster_takes_at_most_rollups_max_rollups() {
        let mut r = Rollups::new();
        for id in 0..crate::command::ROLLUPS_MAX as u64 {
            r.register(1, id, POLICY).unwrap();
        }
        let before = r.clone();
        assert_eq!(
            r.register(2, u64::MAX, POLICY),
            Err(CommandRejection::TooManyRollups {
                max: crate::command::ROLLUPS_MAX as u64
            })
        );
        assert_eq!(r, before);
    }

    #[test]
    fn transactions_of_unregistered_rollups_join_no_block() {
        let mut l = Log::new();
        l.register(1);
        l.batch(vec![raw(1, b"a"), raw(8, b"b")]);
        assert_eq!(l.seq.rollups().unblocked(), 1);
        assert!(l.seq.lookup(&TxHash::of(b"b")).is_some(), "still ordered");
        assert!(l.seq.rollups().next_block(8, 1).is_none());
    }

    #[derive(Debug, Clone)]
    enum Step {
        Batch(Vec<(u64, u8, bool)>),
        Seal(u64),
        /// Preview a block now, propose it after the next step (as a leader whose marker
        /// commits after more batches).
        SealLater(u64),
        Reveal(u8, u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            proptest::collection::vec((1u64..4, any::<u8>(), any::<bool>()), 1..6)
                .prop_map(Step::Batch),
            (1u64..4).prop_map(Step::Seal),
            (1u64..4).prop_map(Step::SealLater),
            (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Step::Reveal(a, b)),
        ]
    }

    proptest! {
        /// Arbitrary bytes, and valid sections with a flipped byte, never make decode panic.
        #[test]
        fn decoding_arbitrary_rollup_sections_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            flip in any::<proptest::sample::Index>(),
            value in any::<u8>(),
        ) {
            let _ = Rollups::decode(&bytes);
            let mut l = Log::new();
            l.register(1);
            l.batch(vec![secret_tx(1, 1), raw(1, b"a"), secret_tx(1, 2)]);
            let _ = l.seal(1);
            l.batch(vec![raw(1, b"b")]);
            let mut good = Vec::new();
            l.seq.rollups().encode(&mut good);
            let at = flip.index(good.len());
            good[at] = value;
            let _ = Rollups::decode(&good);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Two sequencers fed the same log end equal, with byte-identical snapshots, and a
        /// snapshot restores the same state.
        #[test]
        fn same_log_same_blocks_and_metadata(steps in proptest::collection::vec(step(), 1..40)) {
            let mut l = Log::new();
            l.register(1);
            l.register(2);
            let mut later: Option<Command> = None;
            for s in steps {
                let delayed = later.take();
                match s {
                    Step::Batch(txs) => {
                        let txs = txs
                            .into_iter()
                            .map(|(r, n, enc)| if enc { secret_tx(r, n) } else { raw(r, &[n]) })
                            .collect();
                        l.batch(txs);
                    }
                    Step::Seal(r) => {
                        let _ = l.seal(r);
                    }
                    Step::SealLater(r) => {
                        l.clock += 10;
                        later = l
                            .seq
                            .rollups()
                            .next_block(r, l.clock)
                            .map(|h| Command::SealBlock(SignedBlockHeader::sign(h, &l.signer)));
                    }
                    Step::Reveal(n, k) => {
                        let tx_hash = secret_tx(1, n).tx_hash();
                        let _ = l.command(&Command::Reveal { tx_hash, key: key(k) });
                    }
                }
                if let Some(c) = delayed {
                    let _ = l.command(&c);
                }
            }
            let replayed = l.replay();
            prop_assert_eq!(&replayed, &l.seq);
            let bytes = l.seq.snapshot_bytes();
            prop_assert_eq!(&replayed.snapshot_bytes(), &bytes);
            let restored = Sequencer::from_snapshot(&bytes).unwrap();
            prop_assert_eq!(&restored, &l.seq);
            for (_, r) in l.seq.rollups().iter() {
                for b in r.blocks() {
                    prop_assert!(b.meta.revealed + b.meta.expired <= b.meta.encrypted);
                }
            }
        }
    }
}
