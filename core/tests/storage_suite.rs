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
