//! openraft's storage conformance suite against the WAL-backed `LogStore` and the sequencer
//! `StateMachine`, plus reopen tests: what a store returns after a restart is what it held.
//!
//! Everything runs on a glommio executor (`GlommioRuntime::block_on`); each store gets a fresh
//! temporary directory, removed when the suite's guard drops.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use baton_core::batch::{encode_batch, Batch};
use baton_core::raft::log_store::{LogStore, Vote};
use baton_core::raft::state_machine::StateMachine;
use baton_core::raft::{BatchBytes, Entry, GlommioRuntime, LogId, TypeConfig};
use baton_core::tx::Transaction;
use baton_core::tx_kind::TxKind;
use baton_wal::WalOptions;
use openraft::async_runtime::Oneshot as _;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::{AsyncRuntime, BasicNode, ErrorSubject, ErrorVerb, Membership, StorageError};
use tempfile::TempDir;

use baton_core::raft::runtime::GlommioOneshot;

struct WalStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for WalStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let err =
            |e: io::Error| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Read, e);
        let dir = tempfile::tempdir().map_err(err)?;
        let (store, _report) = LogStore::open(dir.path(), WalOptions::small_for_tests())
            .await
            .map_err(|e| err(e.into()))?;
        Ok((dir, store, StateMachine::new()))
    }
}

#[test]
fn wal_store_passes_openraft_storage_suite() {
    GlommioRuntime::new(1)
        .block_on(Suite::<
            TypeConfig,
            LogStore,
            StateMachine,
            WalStoreBuilder,
            TempDir,
        >::test_all(WalStoreBuilder))
        .unwrap();
}

fn batch(index: u64, payloads: &[&[u8]]) -> BatchBytes {
    let txs: Vec<Transaction> = payloads
        .iter()
        .map(|p| Transaction {
            rollup_id: 1,
            kind: TxKind::Raw,
            bytes: p.to_vec(),
        })
        .collect();
    BatchBytes::from_aligned(encode_batch(&Batch::new(txs, 2, index, 1)).unwrap())
}

fn membership() -> Membership<u64, BasicNode> {
    let nodes = BTreeMap::from([
        (1, BasicNode::new("127.0.0.1:7001")),
        (2, BasicNode::new("127.0.0.1:7002")),
        (3, BasicNode::new("127.0.0.1:7003")),
    ]);
    Membership::new(vec![[1, 2, 3].into()], nodes).unwrap()
}

/// Appends and waits for the flush callback.
async fn append(store: &mut LogStore, entries: Vec<Entry>) {
    let (tx, rx) = GlommioOneshot::channel();
    store.append(entries, IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
}

async fn open(dir: &Path) -> LogStore {
    LogStore::open(dir, WalOptions::small_for_tests())
        .await
        .unwrap()
        .0
}

async fn everything(
    store: &mut LogStore,
) -> (
    LogState<TypeConfig>,
    Option<Vote>,
    Option<LogId>,
    Vec<Entry>,
) {
    let state = store.get_log_state().await.unwrap();
    let mut reader = store.get_log_reader().await;
    let vote = reader.read_vote().await.unwrap();
    let committed = store.read_committed().await.unwrap();
    let entries = reader.try_get_log_entries(..).await.unwrap();
    (state, vote, committed, entries)
}

fn batch_ptr(entry: &Entry) -> *const u8 {
    match &entry.payload {
        openraft::EntryPayload::Normal(b) => b.as_bytes().as_ptr(),
        other => panic!("not a batch: {other:?}"),
    }
}

/// Entries just appended are read back without a copy (replication and the apply share the
/// appended batch bytes); the oldest, past the recent-entries bound (4,096 entries), come from
/// the WAL; all equal what the store reads after a reopen, from the WAL alone.
#[test]
fn recent_entries_are_read_back_without_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    GlommioRuntime::new(1).block_on(async {
        let mut store = open(dir.path()).await;
        let entries: Vec<Entry> = (1..=4_100u64)
            .map(|i| {
                let payload = format!("tx-{i}");
                Entry::new_normal(LogId::new_term_index(1, i), batch(i, &[payload.as_bytes()]))
            })
            .collect();
        append(&mut store, entries.clone()).await;
        let mut reader = store.get_log_reader().await;
        let read = reader.try_get_log_entries(1..=4_100).await.unwrap();
        assert_eq!(read, entries);
        let shared = |i: usize| batch_ptr(&read[i]) == batch_ptr(&entries[i]);
        assert!(!shared(0), "the oldest entries come from the WAL");
        assert!(
            (4..4_100).all(shared),
            "the newest 4,096 share the appended bytes"
        );
        drop(reader);
        drop(store);

        let mut store = open(dir.path()).await;
        let mut reader = store.get_log_reader().await;
        let reread = reader.try_get_log_entries(1..=4_100).await.unwrap();
        assert_eq!(reread, entries);
        assert!(batch_ptr(&reread[4_099]) != batch_ptr(&entries[4_099]));
    });
}

#[test]
fn reopened_store_returns_log_state_vote_and_entries() {
    let dir = tempfile::tempdir().unwrap();
    GlommioRuntime::new(1).block_on(async {
        let mut store = open(dir.path()).await;
        let mut entries = vec![
            Entry::new_membership(LogId::new_term_index(0, 0), membership()),
            Entry::new_blank(LogId::new_term_index(1, 1)),
        ];
        for i in 2..40u64 {
            let payload = format!("tx-{i}");
            entries.push(Entry::new_normal(
                LogId::new_term_index(1 + i / 10, i),
                batch(i, &[payload.as_bytes(), b"shared"]),
            ));
        }
        append(&mut store, entries.clone()).await;
        store.save_vote(&Vote::new_committed(4, 2)).await.unwrap();
        store
            .save_committed(Some(LogId::new_term_index(4, 30)))
            .await
            .unwrap();
        store.purge(LogId::new_term_index(1, 9)).await.unwrap();
        store
            .truncate_after(Some(LogId::new_term_index(4, 35)))
            .await
            .unwrap();
        store.written_behind().await.unwrap();
        let before = everything(&mut store).await;
        assert_eq!(
            before.0,
            LogState {
                last_purged_log_id: Some(LogId::new_term_index(1, 9)),
                last_log_id: Some(LogId::new_term_index(4, 35)),
            }
        );
        assert_eq!(before.3, entries[10..=35].to_vec());
        drop(store);

        let mut store = open(dir.path()).await;
        let after = everything(&mut store).await;
        assert_eq!(after, before);

        // The log continues where it ended.
        append(
            &mut store,
            vec![Entry::new_blank(LogId::new_term_index(5, 36))],
        )
        .await;
        assert_eq!(
            store.get_log_state().await.unwrap().last_log_id,
            Some(LogId::new_term_index(5, 36))
        );
    });
}

#[test]
fn reopened_after_purging_everything_continues_after_the_purge_point() {
    let dir = tempfile::tempdir().unwrap();
    GlommioRuntime::new(1).block_on(async {
        let mut store = open(dir.path()).await;
        let entries: Vec<Entry> = (0..5)
            .map(|i| Entry::new_blank(LogId::new_term_index(1, i)))
            .collect();
        append(&mut store, entries).await;
        store.purge(LogId::new_term_index(2, 20)).await.unwrap();
        drop(store);

        let mut store = open(dir.path()).await;
        let (state, _, _, entries) = everything(&mut store).await;
        let purged = Some(LogId::new_term_index(2, 20));
        assert_eq!(
            state,
            LogState {
                last_purged_log_id: purged,
                last_log_id: purged,
            }
        );
        assert!(entries.is_empty());
        let (tx, _rx) = GlommioOneshot::channel();
        let gap = store
            .append(
                vec![Entry::new_blank(LogId::new_term_index(2, 22))],
                IOFlushed::signal(tx),
            )
            .await;
        assert!(gap.is_err(), "an append must continue the log");
        append(
            &mut store,
            vec![Entry::new_blank(LogId::new_term_index(2, 21))],
        )
        .await;
        let reader_entries = store
            .get_log_reader()
            .await
            .try_get_log_entries(0..100)
            .await
            .unwrap();
        assert_eq!(
            reader_entries
                .iter()
                .map(|e| e.log_id())
                .collect::<Vec<_>>(),
            vec![LogId::new_term_index(2, 21)]
        );
    });
}

/// openraft awaits `purge` and `save_committed` in its core loop, so the store answers both at
/// once and saves them behind (the purge is visible at once; the disk catches up): the purged
/// entries are gone from reads and the log state when `purge` returns, their segment files and
/// the saved purge point and committed id follow, and a reopened store agrees.
#[test]
fn purge_and_committed_are_seen_at_once_and_saved_behind() {
    let dir = tempfile::tempdir().unwrap();
    let segments = |dir: &Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".wal")
            })
            .count()
    };
    GlommioRuntime::new(1).block_on(async {
        let mut store = open(dir.path()).await;
        // 4 KiB batches: 60 of them fill several of the small test segments.
        let big = vec![7u8; 4096];
        let mut entries = vec![Entry::new_blank(LogId::new_term_index(1, 0))];
        for i in 1..60u64 {
            let distinct = i.to_le_bytes();
            entries.push(normal(1, i, batch(i, &[&big, &distinct])));
        }
        append(&mut store, entries.clone()).await;
        let before = segments(dir.path());
        assert!(before >= 3, "{before} segments");
        let purged = LogId::new_term_index(1, 40);
        store.purge(purged).await.unwrap();
        assert_eq!(
            store.get_log_state().await.unwrap(),
            LogState {
                last_purged_log_id: Some(purged),
                last_log_id: Some(LogId::new_term_index(1, 59)),
            }
        );
        let mut reader = store.get_log_reader().await;
        assert_eq!(
            reader.try_get_log_entries(0..60).await.unwrap(),
            entries[41..].to_vec()
        );
        let committed = LogId::new_term_index(1, 59);
        store.save_committed(Some(committed)).await.unwrap();
        store.written_behind().await.unwrap();
        assert!(segments(dir.path()) < before);
        assert_eq!(store.read_committed().await.unwrap(), Some(committed));
        let seen = everything(&mut store).await;
        drop((store, reader));

        let mut store = open(dir.path()).await;
        assert_eq!(everything(&mut store).await, seen);
    });
}

fn normal(term: u64, index: u64, b: BatchBytes) -> Entry {
    Entry::new_normal(LogId::new_term_index(term, index), b)
}

fn seal_of(entry: &Entry) -> Option<baton_core::SignedHeader> {
    match &entry.payload {
        openraft::EntryPayload::Normal(b) => b.seal().copied(),
        _ => None,
    }
}

/// The leader signs its batches on append: header fields from the log id and the previous
/// signed batch, signature by its key, the preconfirmation ticket fired; what is read back (by
/// replication and apply) is the signed form, also after a reopen.
#[test]
fn leader_signs_batches_on_append_and_chains_them() {
    use baton_core::raft::types::SealTicket;
    use baton_core::Signer;
    let dir = tempfile::tempdir().unwrap();
    let key = Signer::from_secret(&[3; 32]).unwrap();
    GlommioRuntime::new(1).block_on(async {
        let mut store = open(dir.path()).await;
        store.set_signer(1, key.clone());
        // Not the leader yet (no vote): stored unsigned.
        append(&mut store, vec![normal(1, 0, batch(0, &[b"a"]))]).await;
        // Leader of term 2.
        store.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        let (ticket, preconfirmed) = SealTicket::new();
        let first = batch(1, &[b"b", b"c"]).with_ticket(ticket);
        append(
            &mut store,
            vec![
                normal(2, 1, first),
                Entry::new_blank(LogId::new_term_index(2, 2)),
                normal(2, 3, batch(3, &[b"d"])),
            ],
        )
        .await;
        let fired = preconfirmed.await.expect("ticket fired on append");
        let (_, _, _, entries) = everything(&mut store).await;
        assert_eq!(seal_of(&entries[0]), None, "not signed outside its term");
        let s1 = seal_of(&entries[1]).expect("signed");
        let s3 = seal_of(&entries[3]).expect("signed");
        assert_eq!(fired, s1);
        assert_eq!(
            (s1.header.term, s1.header.index, s1.header.tx_count),
            (2, 1, 2)
        );
        assert_eq!(s1.header.prev_batch_hash, [0; 32], "first signed batch");
        assert_eq!(
            s3.header.prev_batch_hash,
            s1.digest(),
            "chained over the blank"
        );
        assert!(s3.header.timestamp_us >= s1.header.timestamp_us);
        assert_eq!(s1.signer().unwrap(), key.address());
        let root = match &entries[1].payload {
            openraft::EntryPayload::Normal(b) => b.batch().unwrap().compute_tx_merkle_root(),
            _ => unreachable!(),
        };
        assert_eq!(s1.header.tx_merkle_root, root);
        drop(store);

        // Reopened: same signed entries; the chain continues from the last signed batch.
        let mut store = open(dir.path()).await;
        store.set_signer(1, key.clone());
        let (_, _, _, again) = everything(&mut store).await;
        assert_eq!(again, entries);
        append(&mut store, vec![normal(2, 4, batch(4, &[b"e"]))]).await;
        let s4 = seal_of(
            &store
                .get_log_reader()
                .await
                .try_get_log_entries(4..5)
                .await
                .unwrap()[0],
        )
        .unwrap();
        assert_eq!(s4.header.prev_batch_hash, s3.digest());

        // Truncating the last signed batch moves the chain back.
        store
            .truncate_after(Some(LogId::new_term_index(2, 3)))
            .await
            .unwrap();
        append(&mut store, vec![normal(2, 4, batch(4, &[b"f"]))]).await;
        let s4b = seal_of(
            &store
                .get_log_reader()
                .await
                .try_get_log_entries(4..5)
                .await
                .unwrap()[0],
        )
        .unwrap();
        assert_eq!(s4b.header.prev_batch_hash, s3.digest());
    });
}

/// A follower stores the leader's signed batch as it is and never signs with its own key; a
/// signed header naming another position is refused.
#[test]
fn follower_keeps_the_leaders_signature() {
    use baton_core::{BatchHeader, SignedHeader, Signer};
    let dir = tempfile::tempdir().unwrap();
    let leader = Signer::from_secret(&[4; 32]).unwrap();
    GlommioRuntime::new(1).block_on(async {
        let mut store = open(dir.path()).await;
        store.set_signer(2, Signer::from_secret(&[5; 32]).unwrap());
        store.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
        let b = batch(0, &[b"x"]);
        let root = b.batch().unwrap().compute_tx_merkle_root();
        let header = BatchHeader {
            term: 3,
            index: 0,
            prev_batch_hash: [0; 32],
            tx_merkle_root: root,
            tx_count: 1,
            timestamp_us: 10,
        };
        let signed = SignedHeader::sign(header, &leader);
        append(&mut store, vec![normal(3, 0, b.clone().with_seal(signed))]).await;
        // Unsigned in the leader's term: the follower does not sign it.
        append(&mut store, vec![normal(3, 1, batch(1, &[b"y"]))]).await;
        let (_, _, _, entries) = everything(&mut store).await;
        assert_eq!(seal_of(&entries[0]), Some(signed));
        assert_eq!(seal_of(&entries[1]), None);

        let mut wrong = header;
        wrong.index = 7;
        let (tx, _rx) = GlommioOneshot::channel();
        let refused = store
            .append(
                vec![normal(
                    3,
                    2,
                    b.with_seal(SignedHeader::sign(wrong, &leader)),
                )],
                IOFlushed::signal(tx),
            )
            .await;
        assert!(refused.is_err());
    });
}

/// A read that is still awaiting the WAL when a truncation (a follower dropping a deposed
/// leader's uncommitted tail) removes the entries it was about to read returns the entries
/// before the cut: a short read at the end, as openraft's reader contract allows. It used to
/// fail with "index … is not in the log", which openraft treats as a fatal storage error (a
/// restarted node whose old-leadership replication task was still reading stopped its Raft).
#[test]
fn a_read_racing_a_truncation_returns_a_prefix_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    GlommioRuntime::new(1).block_on(async {
        let mut store = open(dir.path()).await;
        let mut entries = vec![Entry::new_membership(
            LogId::new_term_index(0, 0),
            membership(),
        )];
        for i in 1..200u64 {
            let payload = format!("tx-{i}-{}", "p".repeat(300));
            entries.push(Entry::new_normal(
                LogId::new_term_index(1, i),
                batch(i, &[payload.as_bytes()]),
            ));
        }
        append(&mut store, entries.clone()).await;
        drop(store);
        // Reopened: entries are read back from disk, so every read awaits I/O.
        let mut store = open(dir.path()).await;
        let mut reader = store.get_log_reader().await;
        let read = reader.try_get_log_entries(..);
        let truncate = store.truncate_after(Some(LogId::new_term_index(1, 9)));
        let (read, truncated) = futures_util::future::join(read, truncate).await;
        truncated.unwrap();
        let read = read.expect("a read racing a truncation is not an error");
        assert!(
            read.len() >= 10,
            "at least what the truncation kept: {}",
            read.len()
        );
        assert_eq!(
            read[..],
            entries[..read.len()],
            "a prefix of the log as it was"
        );
        let after = reader.try_get_log_entries(..).await.unwrap();
        assert_eq!(after[..], entries[..10]);
    });
}
