//! Restores take files that are already on this machine instead of downloading them:
//! SST files of a local-file store are hard-linked, and an earlier run's files are
//! reused (local recovery); every file taken is checked for size and CRC32 first.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use object_store::memory::InMemory;
use rockstate::testing::checks::columns_with_insert_hints;
use rockstate::testing::{GatedStore, Op};
use rockstate::{
    BackendOptions, CheckpointStorage, CoordinatorOptions, KeyedStateHandle, RocksStateBackend,
    ValueState, ValueStateDescriptor,
};
use rockstate_harness::{Harness, HarnessConfig, Operator, OperatorFactory, Source, StartFrom};

const MAX_PAR: u32 = 32;

fn options(dir: &Path) -> BackendOptions {
    BackendOptions::for_subtask(dir, 0, 1, MAX_PAR).unwrap()
}

/// Writes `keys` values in `rounds` rounds, flushing after each so that the checkpoint
/// holds several SST files.
fn fill(backend: &RocksStateBackend, keys: u64, rounds: u64) -> BTreeMap<u64, u64> {
    let state: ValueState<u64, u64> = backend.register(ValueStateDescriptor::new("v")).unwrap();
    let mut model = BTreeMap::new();
    for round in 0..rounds {
        for key in (round..keys).step_by(rounds as usize) {
            state.put(&key, &(key * 10 + round)).unwrap();
            model.insert(key, key * 10 + round);
        }
        backend.flush().unwrap();
    }
    model
}

fn read(backend: &RocksStateBackend, keys: u64) -> BTreeMap<u64, u64> {
    let state: ValueState<u64, u64> = backend.register(ValueStateDescriptor::new("v")).unwrap();
    (0..keys)
        .filter_map(|k| state.get(&k).unwrap().map(|v| (k, v)))
        .collect()
}

async fn checkpoint(backend: &RocksStateBackend, job: &CheckpointStorage) -> KeyedStateHandle {
    let pending = backend.snapshot(1).unwrap();
    let handle = pending.upload(job, "op", 0).await.unwrap();
    backend.notify_checkpoint_complete(1);
    handle
}

/// A checkpoint of `keys` values in a local-file job directory.
struct LocalJob {
    root: tempfile::TempDir,
    job: CheckpointStorage,
    work: tempfile::TempDir,
    handle: KeyedStateHandle,
    model: BTreeMap<u64, u64>,
}

async fn local_job(keys: u64) -> LocalJob {
    let root = tempfile::tempdir().unwrap();
    let job = CheckpointStorage::open(root.path().to_str().unwrap()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let backend = RocksStateBackend::open(options(&work.path().join("source"))).unwrap();
    let model = fill(&backend, keys, 2);
    let handle = checkpoint(&backend, &job).await;
    backend.close().unwrap();
    LocalJob {
        root,
        job,
        work,
        handle,
        model,
    }
}

fn sst_gets(store: &GatedStore) -> Vec<String> {
    store
        .requests()
        .into_iter()
        .filter(|r| r.op == Op::Get && r.path.ends_with(".sst"))
        .map(|r| r.path)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_takes_matching_local_files_and_downloads_the_rest() {
    let gated = Arc::new(GatedStore::new(Arc::new(InMemory::new())));
    let job = CheckpointStorage::from_store(gated.clone(), "gated://job");
    let work = tempfile::tempdir().unwrap();
    let earlier = work.path().join("earlier");
    let backend = RocksStateBackend::open(options(&earlier)).unwrap();
    let model = fill(&backend, 2_000, 3);
    let handle = checkpoint(&backend, &job).await;
    backend.close().unwrap();
    let ssts: Vec<_> = handle
        .files()
        .filter(|f| f.local_name.ends_with(".sst") && earlier.join(&f.local_name).exists())
        .cloned()
        .collect();
    assert!(ssts.len() >= 3, "{ssts:?}");

    // One local copy is damaged (same name and size), one is gone: both are downloaded.
    let damaged = &ssts[0];
    let mut bytes = std::fs::read(earlier.join(&damaged.local_name)).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::remove_file(earlier.join(&damaged.local_name)).unwrap();
    std::fs::write(earlier.join(&damaged.local_name), &bytes).unwrap();
    let missing = &ssts[1];
    std::fs::remove_file(earlier.join(&missing.local_name)).unwrap();

    gated.clear_requests();
    let restored = RocksStateBackend::builder(options(&work.path().join("restored")))
        .reuse_local_files([earlier.clone(), work.path().join("no-such-dir")])
        .restore(&handle, &job)
        .await
        .unwrap();
    let mut fetched = sst_gets(&gated);
    fetched.sort();
    let mut expected = vec![damaged.path.clone(), missing.path.clone()];
    expected.sort();
    assert_eq!(fetched, expected, "only the damaged and the missing file");
    assert_eq!(read(&restored, 2_000), model);
    // The earlier directory was only read.
    assert_eq!(
        std::fs::read(earlier.join(&damaged.local_name)).unwrap(),
        bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_from_local_files_links_sst_files_and_still_checks_them() {
    let LocalJob {
        root,
        job,
        work,
        handle,
        model,
    } = local_job(1_000).await;

    let target = work.path().join("restored");
    let restored = RocksStateBackend::restore(options(&target), &handle, &job)
        .await
        .unwrap();
    assert_eq!(read(&restored, 1_000), model);
    // SST files are never written in place: one copy serves both.
    let mut linked = 0;
    for file in handle.files().filter(|f| f.local_name.ends_with(".sst")) {
        let stored = std::fs::metadata(root.path().join(&file.path)).unwrap();
        if let Ok(local) = std::fs::metadata(target.join(&file.local_name)) {
            assert_eq!((stored.dev(), stored.ino()), (local.dev(), local.ino()));
            linked += 1;
        }
    }
    assert!(linked > 0);
    drop(restored);

    // A damaged stored file is refused even though it would only be linked.
    let sst = handle
        .files()
        .find(|f| f.local_name.ends_with(".sst"))
        .unwrap();
    let on_disk = root.path().join(&sst.path);
    let mut bytes = std::fs::read(&on_disk).unwrap();
    bytes[10] ^= 1;
    std::fs::remove_file(&on_disk).unwrap();
    std::fs::write(&on_disk, &bytes).unwrap();
    let again = work.path().join("again");
    let err = RocksStateBackend::restore(options(&again), &handle, &job)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), rockstate::ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains(&sst.path), "{err}");
    assert!(!again.exists(), "nothing left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_in_place_restore_is_cleared_by_the_next_one() {
    let LocalJob {
        root: _root,
        job,
        work,
        handle,
        model,
    } = local_job(500).await;

    // What a crash in the middle of a rescale leaves: a marked, half-built directory.
    let target = work.path().join("restored");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("ROCKSTATE-RESTORING"), b"").unwrap();
    std::fs::write(target.join("000009.sst"), b"half").unwrap();
    let restored = RocksStateBackend::restore(options(&target), &handle, &job)
        .await
        .unwrap();
    assert_eq!(read(&restored, 500), model);
    drop(restored);

    // Without the marker, someone else's files are never removed.
    let other = work.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"mine").unwrap();
    let err = RocksStateBackend::restore(options(&other), &handle, &job)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), rockstate::ErrorKind::InvalidArgument, "{err}");
    assert_eq!(std::fs::read(other.join("notes.txt")).unwrap(), b"mine");
}

struct Events;

impl Source for Events {
    type Key = u64;
    type Value = u64;
    fn partitions(&self) -> u32 {
        2
    }
    fn record(&self, partition: u32, offset: u64) -> Option<(u64, u64)> {
        (offset < 3_000).then(|| ((offset * 7 + u64::from(partition)) % 700, offset))
    }
}

struct Sum(ValueState<u64, u64>);

impl Operator<u64, u64> for Sum {
    fn process(&mut self, key: &u64, value: u64) -> rockstate::Result<()> {
        let sum = self.0.get(key)?.unwrap_or(0);
        self.0.put(key, &(sum + value))
    }
}

fn factory() -> OperatorFactory<u64, u64> {
    Arc::new(|backend: &RocksStateBackend| {
        let state = backend.register(ValueStateDescriptor::new("sum"))?;
        Ok(Box::new(Sum(state)) as Box<dyn Operator<u64, u64>>)
    })
}

fn config(local: &Path) -> HarnessConfig {
    HarnessConfig {
        job_id: "job".into(),
        operator_uid: "sum".into(),
        parallelism: 2,
        max_parallelism: MAX_PAR,
        local_root: local.to_path_buf(),
        checkpoint_interval: 0,
        memory_budget: 32 << 20,
        rocksdb_statistics: false,
        coordinator: CoordinatorOptions::default(),
    }
}

fn sums(backends: &[RocksStateBackend]) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for b in backends {
        out.extend(read_sums(b));
    }
    out
}

fn read_sums(backend: &RocksStateBackend) -> BTreeMap<u64, u64> {
    let state: ValueState<u64, u64> = backend.register(ValueStateDescriptor::new("sum")).unwrap();
    (0..700)
        .filter_map(|k| state.get(&k).ok().flatten().map(|v| (k, v)))
        .collect()
}

#[test]
fn a_restart_after_a_crash_downloads_no_file_still_on_this_machine() {
    let reference = {
        let local = tempfile::tempdir().unwrap();
        let dir = CheckpointStorage::open("memory://local-recovery-reference").unwrap();
        let h = Harness::start(
            config(local.path()),
            &dir,
            Events,
            factory(),
            StartFrom::Empty,
        )
        .unwrap();
        sums(&h.finish().unwrap().backends)
    };

    let gated = Arc::new(GatedStore::new(Arc::new(InMemory::new())));
    let dir = CheckpointStorage::from_store(gated.clone(), "gated://recovery");
    let local = tempfile::tempdir().unwrap();
    let mut h = Harness::start(
        config(local.path()),
        &dir,
        Events,
        factory(),
        StartFrom::Empty,
    )
    .unwrap();
    h.run(2_500).unwrap();
    let checkpoint = h.checkpoint_now().unwrap();
    h.crash();

    gated.clear_requests();
    let h = Harness::start(
        config(local.path()),
        &dir,
        Events,
        factory(),
        StartFrom::Latest,
    )
    .unwrap();
    assert_eq!(h.restored_from(), Some(checkpoint.checkpoint_id));
    assert_eq!(sst_gets(&gated), Vec::<String>::new(), "nothing downloaded");
    // The restored backends keep the insert hints of a backend that writes in key order.
    for i in 0..2 {
        let dir = local.path().join(format!("subtask-{i}"));
        assert_eq!(
            columns_with_insert_hints(&dir),
            ["state/sum"],
            "subtask {i}"
        );
    }
    let done = h.finish().unwrap();
    assert_eq!(sums(&done.backends), reference);
    drop(done);
    // The earlier run's files are gone once the restore is done.
    let left: Vec<_> = std::fs::read_dir(local.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("previous"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
