//! The Raft shard's side of rollups and reads: clients' control commands, the leader's block
//! sealing loop, read barriers (`min_index`, linearizable) and reading a block's transactions
//! back from the log.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use openraft::storage::RaftLogReader;

use super::engine::{propose_entry, wait_for, Raft};
use super::handle::{
    BlockTx, BlockTxs, CommandReceipt, Consistency, NodeStatus, Read, Reveal, Role, TxInfo,
};
use super::peer::{leader_read_index, Forwarder};
use crate::block::{BlockHeader, SignedBlockHeader};
use crate::command::{Command, CommandRejection};
use crate::hash::TxHash;
use crate::node::error::SubmitError;
use crate::raft::state_machine::SequencerView;
use crate::raft::{BatchBytes, LogReader};
use crate::rollups::Block;
use crate::sign::Signer;
use crate::tx::Transaction;
use crate::tx_kind::TxKind;

/// How often the leader looks for blocks that are due.
pub(crate) const SEAL_TICK: Duration = Duration::from_millis(5);
/// Sealing rounds the leader runs back to back (blocks filling faster than one per tick)
/// before it waits a tick.
const SEAL_ROUNDS_MAX: u32 = 64;

/// Timings a proposal waits under: (lease wait, commit wait).
pub(crate) type Waits = (Duration, Duration);

/// A client's control command: checked against the applied state, then proposed here (leader
/// only) and answered with what applying it did.
pub(crate) async fn run_command(
    raft: &Raft,
    view: &SequencerView,
    command: Command,
    waits: Waits,
) -> Result<CommandReceipt, SubmitError> {
    if let Command::SealBlock(_) = command {
        // Seal markers are the leader's own; a client cannot propose one.
        return Err(SubmitError::Command(CommandRejection::StaleSeal {
            rollup_id: 0,
            height: 0,
            reason: "seal markers are proposed by the leader only",
        }));
    }
    // Leadership first: a follower's applied state may lag (a reveal of a transaction it has
    // not applied yet would look unknown there), and the leader is where the command goes.
    if !raft.is_leader() {
        let leader = super::engine::status_of(raft).leader;
        return Err(SubmitError::NotLeader {
            leader_hint: leader,
        });
    }
    view.with(|s| s.check_command(&command))
        .map_err(SubmitError::Command)?;
    let (index, applied) =
        propose_entry(raft, BatchBytes::command(command.encode()), waits).await?;
    match applied.command {
        Some(Ok(applied)) => Ok(CommandReceipt { index, applied }),
        Some(Err(rejection)) => Err(SubmitError::Command(rejection)),
        None => Err(SubmitError::Rejected { index }),
    }
}

/// Waits until a read at `consistency` may be served here; returns the applied index then.
pub(crate) async fn barrier(
    raft: &Raft,
    forwarder: Option<&Rc<dyn Forwarder>>,
    consistency: Consistency,
    timeout: Duration,
) -> Result<(), SubmitError> {
    let min_index = match consistency {
        Consistency::Local => return Ok(()),
        Consistency::MinIndex(i) => i,
        Consistency::Linearizable => {
            let status = super::engine::status_of(raft);
            if status.role == Role::Leader {
                leader_read_index(raft).await?
            } else {
                let Some(leader) = status.leader else {
                    return Err(SubmitError::NotLeader { leader_hint: None });
                };
                let Some(forwarder) = forwarder else {
                    return Err(SubmitError::NotLeader {
                        leader_hint: Some(leader),
                    });
                };
                let addr = super::engine::member_addr(raft, leader).unwrap_or_default();
                let deadline = tokio_free_timeout(forwarder.read_index(leader, addr), timeout);
                deadline.await.unwrap_or(Err(SubmitError::ReadTimeout {
                    min_index: 0,
                    applied: status.applied_index,
                }))?
            }
        }
    };
    let applied = move |s: &NodeStatus| s.applied_index.is_some_and(|a| a >= min_index);
    match wait_for(raft, Box::new(applied), timeout).await {
        Ok(_) => Ok(()),
        Err(s) => Err(SubmitError::ReadTimeout {
            min_index,
            applied: s.applied_index,
        }),
    }
}

/// `f`, or `None` once `timeout` passes (on the glommio timer).
pub(crate) async fn tokio_free_timeout<T>(
    f: impl std::future::Future<Output = T>,
    timeout: Duration,
) -> Option<T> {
    let timer = glommio::timer::sleep(timeout);
    futures_util::pin_mut!(f, timer);
    match futures_util::future::select(f, timer).await {
        futures_util::future::Either::Left((v, _)) => Some(v),
        futures_util::future::Either::Right(_) => None,
    }
}

/// The applied index as the view sees it (0 before anything was applied).
pub(crate) fn applied_index(view: &SequencerView) -> u64 {
    view.last_applied().map_or(0, |l| l.index)
}

/// Block `height` of `rollup_id` with its transactions, read from this node's log.
pub(crate) async fn block_txs(
    view: &SequencerView,
    mut reader: LogReader,
    rollup_id: u64,
    height: u64,
) -> Read<Option<BlockTxs>> {
    let applied_index = applied_index(view);
    let Some(block) = view.with(|s| s.rollups().rollup(rollup_id)?.block(height).copied()) else {
        return Read {
            applied_index,
            value: None,
        };
    };
    let txs = read_block_txs(view, &mut reader, &block).await;
    Read {
        applied_index,
        value: Some(BlockTxs { block, txs }),
    }
}

/// The block's transactions: those of its rollup from its first to its last position that were
/// sequenced there (not duplicates). `None` if a batch in the range is gone from the log.
async fn read_block_txs(
    view: &SequencerView,
    reader: &mut LogReader,
    block: &Block,
) -> Option<Vec<BlockTx>> {
    let rollup_id = block.signed.header.rollup_id;
    let want = block.signed.header.tx_count as usize;
    let mut out = Vec::with_capacity(want);
    // Whether a member was taken without the idempotency window confirming it.
    let mut guessed = false;
    for index in block.first.index..=block.last.index {
        let entries = reader.try_get_log_entries(index..index + 1).await.ok()?;
        let entry = entries.first()?;
        let openraft::EntryPayload::Normal(batch) = &entry.payload else {
            continue;
        };
        if batch.is_command() {
            continue;
        }
        // A batch rejected for its content ordered nothing; its transactions are in no block.
        let Ok(archived) = batch.batch() else {
            continue;
        };
        for (offset, tx) in archived.txs.iter().enumerate() {
            let offset = offset as u32;
            if tx.rollup_id() != rollup_id
                || (index == block.first.index && offset < block.first.offset)
                || (index == block.last.index && offset > block.last.offset)
            {
                continue;
            }
            let tx_hash = tx.tx_hash();
            // A duplicate joined no block: its first occurrence is elsewhere. A hash the
            // idempotency window has forgotten is taken as a member; the count and Merkle root
            // checks below refuse the list if that was wrong.
            match view.with(|s| s.lookup(&tx_hash)) {
                Some(p) if (p.index, p.offset) != (index, offset) => continue,
                Some(_) => {}
                None => guessed = true,
            }
            let kind = match tx.kind.key_commitment() {
                Some(c) => TxKind::Encrypted { key_commitment: *c },
                None => TxKind::Raw,
            };
            let plaintext = view.with(|s| match s.rollups().secret(&tx_hash).map(|s| &s.state) {
                Some(crate::rollups::SecretState::Revealed { plaintext, .. }) => {
                    Some(plaintext.clone())
                }
                _ => None,
            });
            out.push(BlockTx {
                tx_hash,
                index,
                offset,
                tx: Transaction {
                    rollup_id,
                    kind,
                    bytes: tx.bytes.to_vec(),
                },
                plaintext,
            });
        }
    }
    if out.len() != want {
        return None;
    }
    if guessed {
        // Only then is the root recomputed (a block read inside the window costs no hashing).
        let hashes: Vec<TxHash> = out.iter().map(|t| t.tx_hash).collect();
        if crate::merkle::merkle_root(&hashes) != block.signed.header.tx_merkle_root {
            return None;
        }
    }
    Some(out)
}

/// A transaction's status: its position from the state machine, its rollup and receipt from
/// its batch in the log, its block and reveal status from the rollup state.
pub(crate) async fn tx_info(
    raft: &Raft,
    view: &SequencerView,
    mut reader: LogReader,
    proofs: &super::engine::ProofCache,
    tx_hash: TxHash,
) -> Read<Option<TxInfo>> {
    let applied_index = applied_index(view);
    let Some(position) = view.with(|s| s.lookup(&tx_hash)) else {
        return Read {
            applied_index,
            value: None,
        };
    };
    let (secret_rollup, reveal) = view.with(|s| match s.rollups().secret(&tx_hash) {
        Some(secret) => (
            Some(secret.rollup_id),
            Some(match &secret.state {
                crate::rollups::SecretState::Sealed { .. } => Reveal::Pending,
                crate::rollups::SecretState::Revealed {
                    plaintext,
                    revealed_at,
                    ..
                } => Reveal::Revealed {
                    plaintext: plaintext.clone(),
                    revealed_at: *revealed_at,
                },
                crate::rollups::SecretState::Expired => Reveal::Expired,
            }),
        ),
        None => (None, None),
    });
    let rollup_id = match secret_rollup {
        Some(r) => Some(r),
        None => rollup_in_log(&mut reader, position).await,
    };
    let block_height = rollup_id
        .and_then(|r| view.with(|s| s.rollups().rollup(r).and_then(|r| r.height_of(position))));
    let receipt = super::engine::receipt_of(raft, reader, proofs, tx_hash)
        .await
        .unwrap_or(Err(SubmitError::ReceiptUnavailable {
            index: position.index,
        }));
    Read {
        applied_index,
        value: Some(TxInfo {
            index: position.index,
            offset: position.offset,
            rollup_id,
            block_height,
            receipt,
            reveal,
        }),
    }
}

/// The rollup of the transaction at `position`, from its batch in the log.
async fn rollup_in_log(
    reader: &mut LogReader,
    position: crate::sequencer::Position,
) -> Option<u64> {
    let entries = reader
        .try_get_log_entries(position.index..position.index + 1)
        .await
        .ok()?;
    let openraft::EntryPayload::Normal(batch) = &entries.first()?.payload else {
        return None;
    };
    let archived = batch.batch().ok()?;
    Some(archived.txs.get(position.offset as usize)?.rollup_id())
}

/// Microseconds since the Unix epoch.
fn wall_clock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Seal markers the leader proposed for one rollup and has not applied yet: the chain its next
/// blocks continue. `epoch` changes whenever the chain is dropped, so a proposal task that
/// fails late cannot drop a chain built after it.
#[derive(Default)]
struct InFlight {
    epoch: u64,
    blocks: VecDeque<BlockHeader>,
    /// After a failed chain, no new one before this (a leader without its lease would
    /// otherwise rebuild and re-sign chains back to back on the Raft shard).
    retry_at: Option<Instant>,
}

impl InFlight {
    fn drop_chain(&mut self) {
        self.blocks.clear();
        self.epoch += 1;
    }
}

/// How long a rollup's sealing waits after its chain failed.
const SEAL_RETRY_AFTER: Duration = Duration::from_millis(50);

/// Per rollup, the leader's seal markers in flight.
type Chains = Rc<RefCell<HashMap<u64, InFlight>>>;

/// Most seal markers in flight per rollup.
const SEAL_IN_FLIGHT_MAX: usize = 64;
/// Most transactions a sealing round previews past the first block (their Merkle roots are
/// computed on the Raft shard: about 1 ms per 10,000).
const SEAL_ROUND_LEAVES_MAX: usize = 1 << 16;

/// The leader's block sealer: every [`SEAL_TICK`], for each rollup with transactions waiting,
/// seals a block when its policy says so (`max_block_txs` waiting, or `block_time_ms` since the
/// previous block, or since this leader first saw the rollup's first waiting transaction), by
/// proposing a seal marker with the header built from the applied state and signed.
///
/// Markers are pipelined: the sealer does not wait for one to commit before proposing the
/// next. Each rollup's proposed-but-unapplied markers form a chain; a round appends the full
/// blocks waiting after it (`Rollups::block_after`), so blocks are sealed as fast as they fill
/// whatever the commit latency. Waiting for each commit sealed at most `max_block_txs` per
/// commit round trip: under overload (commits seconds behind) far fewer transactions than were
/// ordered, and the pending queues grew without bound (200 MB in 10 s at 2x overload). A chain
/// whose marker fails (not leader, timeout, refused as stale) is dropped, and the next round
/// starts again from the applied state; markers of a dropped chain still in the log are refused
/// as stale when applied, changing nothing.
pub(crate) async fn seal_blocks(raft: Raft, view: SequencerView, signer: Signer, waits: Waits) {
    // When this node, as leader, first saw transactions waiting in a rollup with no block yet.
    let mut first_seen: HashMap<u64, Instant> = HashMap::new();
    let chains: Chains = Rc::default();
    // Rounds in a row that sealed something: while blocks fill faster than one per tick, the
    // next round starts at once (up to SEAL_ROUNDS_MAX, then the tick lets other tasks run).
    let mut busy_rounds = 0;
    loop {
        if busy_rounds == 0 || busy_rounds >= SEAL_ROUNDS_MAX {
            glommio::timer::sleep(SEAL_TICK).await;
            busy_rounds = 0;
        } else {
            glommio::yield_if_needed().await;
        }
        if !raft.is_leader() {
            first_seen.clear();
            drop_all(&chains);
            busy_rounds = 0;
            continue;
        }
        let now_us = wall_clock_us();
        let now = Instant::now();
        let due: Vec<(u64, u64, Vec<BlockHeader>)> = view.with(|s| {
            let mut chains = chains.borrow_mut();
            s.rollups()
                .iter()
                .filter(|(_, r)| !r.pending().is_empty())
                .filter_map(|(id, r)| {
                    let chain = chains.entry(id).or_default();
                    if chain.retry_at.is_some_and(|t| now < t) {
                        return None;
                    }
                    // Applied blocks leave the chain; a different block at one of its heights
                    // (an earlier leader's, or a marker that timed out and committed after
                    // all) means the rest of the chain can never apply.
                    while let Some(b) = chain.blocks.front().copied() {
                        if b.height > r.height() {
                            break;
                        }
                        if r.block(b.height).map(|a| a.signed.header) == Some(b) {
                            chain.blocks.pop_front();
                        } else {
                            chain.drop_chain();
                        }
                    }
                    let blocks = due_blocks(s.rollups(), id, r, chain, now_us, || {
                        let seen = *first_seen.entry(id).or_insert(now);
                        now.duration_since(seen)
                            >= Duration::from_millis(r.policy.block_time_ms.into())
                    });
                    chain.blocks.extend(blocks.iter().copied());
                    (!blocks.is_empty()).then_some((id, chain.epoch, blocks))
                })
                .collect()
        });
        let sealing = !due.is_empty();
        busy_rounds = if sealing { busy_rounds + 1 } else { 0 };
        for (rollup_id, epoch, headers) in due {
            first_seen.remove(&rollup_id);
            let markers: Vec<BatchBytes> = headers
                .iter()
                .map(|h| {
                    let signed = SignedBlockHeader::sign(*h, &signer);
                    BatchBytes::command(Command::SealBlock(signed).encode())
                })
                .collect();
            let (raft, chains) = (raft.clone(), chains.clone());
            glommio::spawn_local(async move {
                if let Err(e) = propose_markers(&raft, markers, waits.1).await {
                    tracing::debug!(rollup = rollup_id, error = %e, "seal markers failed; chain dropped");
                    let mut chains = chains.borrow_mut();
                    if let Some(chain) = chains.get_mut(&rollup_id).filter(|c| c.epoch == epoch) {
                        chain.drop_chain();
                        chain.retry_at = Some(Instant::now() + SEAL_RETRY_AFTER);
                    }
                }
            })
            .detach();
        }
    }
}

/// The blocks of rollup `id` to propose now after its in-flight `chain`: when nothing is in
/// flight, the next block if it is full or `timed()` says its time has come, then the full
/// blocks after it; otherwise the full blocks after the chain. Bounded by `SEAL_IN_FLIGHT_MAX`
/// and `SEAL_ROUND_LEAVES_MAX`.
fn due_blocks(
    rollups: &crate::rollups::Rollups,
    id: u64,
    r: &crate::rollups::RollupState,
    chain: &InFlight,
    now_us: u64,
    timed: impl FnOnce() -> bool,
) -> Vec<BlockHeader> {
    let p = r.policy;
    let full = p.max_block_txs as usize;
    let mut skip: usize = chain.blocks.iter().map(|b| b.tx_count as usize).sum();
    let mut out = Vec::new();
    let mut parent = match chain.blocks.back() {
        Some(last) => *last,
        None => {
            let period_us = u64::from(p.block_time_ms) * 1000;
            let due = r.pending().len() >= full
                || match r.blocks().last() {
                    Some(b) => now_us >= b.signed.header.timestamp_us.saturating_add(period_us),
                    None => timed(),
                };
            let Some(first) = due.then(|| rollups.next_block(id, now_us)).flatten() else {
                return out;
            };
            skip = first.tx_count as usize;
            out.push(first);
            first
        }
    };
    let mut leaves = 0;
    // The first chained block is always allowed (a policy may exceed the cap on its own).
    while chain.blocks.len() + out.len() < SEAL_IN_FLIGHT_MAX
        && (leaves == 0 || leaves + full <= SEAL_ROUND_LEAVES_MAX)
    {
        let Some(next) = rollups.block_after(id, &parent, skip, now_us) else {
            break;
        };
        skip += next.tx_count as usize;
        leaves += next.tx_count as usize;
        out.push(next);
        parent = next;
    }
    out
}

/// Drops every rollup's in-flight chain (this node stopped leading).
fn drop_all(chains: &Chains) {
    for chain in chains.borrow_mut().values_mut() {
        if !chain.blocks.is_empty() {
            chain.drop_chain();
        }
    }
}

/// Proposes seal markers in this order in one request to the Raft core, and waits (at most
/// `commit_wait`) until all are applied. An error if any was not committed or was refused.
async fn propose_markers(
    raft: &Raft,
    markers: Vec<BatchBytes>,
    commit_wait: Duration,
) -> Result<(), String> {
    use futures_util::StreamExt;
    let all = async {
        let mut results = raft
            .client_write_many(markers)
            .await
            .map_err(|e| e.to_string())?;
        while let Some(r) = results.next().await {
            match r.map_err(|e| e.to_string())? {
                Ok(resp) => match resp.response.command {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("refused at {}: {e}", resp.log_id.index)),
                    None => return Err(format!("not a command at {}", resp.log_id.index)),
                },
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    };
    tokio_free_timeout(all, commit_wait)
        .await
        .unwrap_or_else(|| Err(format!("not applied within {} ms", commit_wait.as_millis())))
}
