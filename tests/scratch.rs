//! Scratch copies: a local copy made only to be read or rewritten, then removed (an
//! offline reader's, a backend restored only to write a savepoint, a staged snapshot
//! rewritten in the canonical format), is closed as it is, with no flush, no sync of its
//! files and no clean mark, and is gone afterwards; a backend's own directory is never
//! closed that way.

use std::path::Path;

use rockstate::restore::{SavepointReader, SavepointWriter};
use rockstate::runtime::savepoint_from_snapshot;
use rockstate::savepoint::Compression;
use rockstate::testing::checks::{scratch_closes_under, watch_scratch_closes};
use rockstate::{
    BackendOptions, CheckpointStorage, KeyGroupRange, RestoreSource, RocksStateBackend,
    SavepointFormat, ValueStateDescriptor,
};

const MAX_PAR: u32 = 128;
const UID: &str = "op";
const KEYS: u64 = 2_000;

fn storage(dir: &Path) -> CheckpointStorage {
    std::fs::create_dir_all(dir).unwrap();
    CheckpointStorage::open(dir.to_str().unwrap()).unwrap()
}

/// A savepoint of `KEYS` values written without a job.
async fn savepoint(root: &Path) -> RestoreSource {
    let mut writer = SavepointWriter::new(MAX_PAR, root.join("writer")).unwrap();
    writer
        .operator(UID)
        .unwrap()
        .write_values(
            ValueStateDescriptor::<u64, u64>::new("v"),
            (0..KEYS).map(|k| (k, k * 3)),
        )
        .unwrap();
    let (folder, _) = writer
        .write(&storage(&root.join("savepoints")), "job")
        .await
        .unwrap();
    RestoreSource::open_folder(&folder).await.unwrap()
}

fn assert_gone(dirs: &[std::path::PathBuf]) {
    for dir in dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

/// An offline reader's copy, closed or dropped, is a scratch copy and is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_readers_copy_is_closed_as_scratch() {
    let tmp = tempfile::tempdir().unwrap();
    let source = savepoint(tmp.path()).await;
    let scratch = tmp.path().join("reader");
    watch_scratch_closes(&scratch);
    let reader = SavepointReader::from_source(source, &scratch);
    for close in [true, false] {
        let state = reader.keyed_state(UID).await.unwrap();
        let v = state
            .register(ValueStateDescriptor::<u64, u64>::new("v"))
            .unwrap();
        assert_eq!(v.get(&7).unwrap(), Some(21));
        drop(v);
        if close {
            state.close().unwrap();
        } else {
            drop(state);
        }
        let closed = scratch_closes_under(&scratch);
        assert_eq!(closed.len(), if close { 1 } else { 2 }, "{closed:?}");
        assert_gone(&closed);
    }
}

/// A savepoint made from a snapshot restores each subtask into a scratch copy (and, in
/// the canonical format, stages a copy of its files to rewrite): every one is closed as
/// such and removed, in both formats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_savepoint_of_a_snapshot_closes_its_copies_as_scratch() {
    let tmp = tempfile::tempdir().unwrap();
    let source = savepoint(tmp.path()).await;
    let subtasks = source.metadata().operator(UID).unwrap().subtasks.len();
    assert!(subtasks > 0);
    let scratch = tmp.path().join("scratch");
    watch_scratch_closes(&scratch);
    let parent = storage(&tmp.path().join("made"));
    let mut expected = 0;
    for format in [SavepointFormat::Native, SavepointFormat::Canonical] {
        let (folder, _) =
            savepoint_from_snapshot(&source, &parent, "job", format, &scratch, 16 << 20)
                .await
                .unwrap();
        // Per subtask, the restored backend; in the canonical format also the staged
        // copy of its files that is rewritten.
        expected += match format {
            SavepointFormat::Native => subtasks,
            SavepointFormat::Canonical => 2 * subtasks,
        };
        let closed = scratch_closes_under(&scratch);
        assert_eq!(closed.len(), expected, "{format:?}: {closed:?}");
        assert_gone(&closed);
        // What they held is in the savepoint.
        let made = SavepointReader::from_source(
            RestoreSource::open_folder(&folder).await.unwrap(),
            tmp.path().join("check"),
        );
        let state = made.keyed_state(UID).await.unwrap();
        let v = state
            .register(ValueStateDescriptor::<u64, u64>::new("v"))
            .unwrap();
        assert_eq!(v.get(&(KEYS - 1)).unwrap(), Some((KEYS - 1) * 3));
    }
}

/// A canonical savepoint of a running backend rewrites a staged copy of its files: the
/// copy is closed as scratch and removed; the backend's own directory is not, and still
/// closes cleanly and reopens with its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_canonical_savepoint_is_closed_as_scratch() {
    let tmp = tempfile::tempdir().unwrap();
    watch_scratch_closes(tmp.path());
    let local = tmp.path().join("local");
    let options = BackendOptions::new(&local, KeyGroupRange::all(MAX_PAR).unwrap(), MAX_PAR);
    let backend = RocksStateBackend::open(options.clone()).unwrap();
    let v = backend
        .register(ValueStateDescriptor::<u64, u64>::new("v"))
        .unwrap();
    for k in 0..KEYS {
        v.put(&k, &(k + 1)).unwrap();
    }
    let pending = backend.snapshot(1).unwrap();
    pending
        .write_savepoint(
            &storage(&tmp.path().join("made")),
            UID,
            0,
            SavepointFormat::Canonical,
            Compression::Lz4,
        )
        .await
        .unwrap();
    let closed = scratch_closes_under(tmp.path());
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_ne!(closed[0], local, "the backend's own directory");
    assert_gone(&closed);
    v.put(&0, &7).unwrap();
    drop(v);
    tokio::task::spawn_blocking(move || drop(backend))
        .await
        .unwrap();
    assert_eq!(scratch_closes_under(tmp.path()).len(), 1);
    let reopened = RocksStateBackend::open(options).unwrap();
    let v = reopened
        .register(ValueStateDescriptor::<u64, u64>::new("v"))
        .unwrap();
    assert_eq!(v.get(&0).unwrap(), Some(7));
    assert_eq!(v.get(&(KEYS - 1)).unwrap(), Some(KEYS));
}
