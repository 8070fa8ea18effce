//! Incremental checkpoints to object storage and same-range restore, on local files, the
//! in-memory store and a real S3-protocol server, compared with a model at every checkpoint.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use common::*;
use rockstate::testing::s3::S3Server;
use rockstate::testing::{GatedStore, Match, Op};
use rockstate::{
    AggregateFunction, AggregatingState, AggregatingStateDescriptor, BackendOptions,
    CheckpointStorage, ErrorKind, KeyedStateHandle, ListState, ListStateDescriptor, ManualClock,
    MapState, MapStateDescriptor, ReducingState, ReducingStateDescriptor, RocksStateBackend,
    ValueState, ValueStateDescriptor,
};

struct Sum;

impl AggregateFunction for Sum {
    type In = u64;
    type Acc = (u64, u64);
    type Out = (u64, u64);
    fn create_accumulator(&self) -> (u64, u64) {
        (0, 0)
    }
    fn add(&self, v: u64, (n, s): (u64, u64)) -> (u64, u64) {
        (n + 1, s + v)
    }
    fn get_result(&self, acc: &(u64, u64)) -> (u64, u64) {
        *acc
    }
}

struct Workload {
    value: ValueState<String, u64>,
    list: ListState<String, u64>,
    map: MapState<String, u32, u64>,
    reduce: ReducingState<String, u64>,
    agg: AggregatingState<String, Sum>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Contents {
    value: BTreeMap<String, u64>,
    list: BTreeMap<String, Vec<u64>>,
    map: BTreeMap<String, BTreeMap<u32, u64>>,
    reduce: BTreeMap<String, u64>,
    agg: BTreeMap<String, (u64, u64)>,
}

fn register(b: &RocksStateBackend) -> Workload {
    Workload {
        value: b.register(ValueStateDescriptor::new("value")).unwrap(),
        list: b.register(ListStateDescriptor::new("list")).unwrap(),
        map: b.register(MapStateDescriptor::new("map")).unwrap(),
        reduce: b
            .register(ReducingStateDescriptor::new("reduce", |a: u64, b: u64| {
                a + b
            }))
            .unwrap(),
        agg: b
            .register(AggregatingStateDescriptor::new("agg", Sum))
            .unwrap(),
    }
}

/// Writes round `round` to `n` keys (starting at `first`), mirroring it in `model`.
fn apply(w: &Workload, model: &mut Contents, keys: &[String], round: u64) {
    for (i, key) in keys.iter().enumerate() {
        let v = round * 1_000 + i as u64;
        w.value.put(key, &v).unwrap();
        model.value.insert(key.clone(), v);
        w.list.add(key, &v).unwrap();
        model.list.entry(key.clone()).or_default().push(v);
        let uk = (i % 7) as u32 + round as u32;
        w.map.put(key, &uk, &v).unwrap();
        model.map.entry(key.clone()).or_default().insert(uk, v);
        w.reduce.add(key, v).unwrap();
        *model.reduce.entry(key.clone()).or_default() += v;
        w.agg.add(key, v).unwrap();
        let e = model.agg.entry(key.clone()).or_default();
        *e = (e.0 + 1, e.1 + v);
    }
    if round > 1 {
        // Deletions must survive checkpoints too.
        let gone = &keys[0];
        w.value.clear(gone).unwrap();
        model.value.remove(gone);
        w.map.clear(gone).unwrap();
        model.map.remove(gone);
    }
}

fn read_all(w: &Workload) -> Contents {
    let mut c = Contents::default();
    for e in w.value.all_keys().unwrap() {
        let (k, ()) = e.unwrap();
        c.value.insert(k.clone(), w.value.get(&k).unwrap().unwrap());
    }
    for e in w.list.all_keys().unwrap() {
        let (k, ()) = e.unwrap();
        c.list.insert(k.clone(), w.list.get(&k).unwrap());
    }
    for e in w.map.all_keys().unwrap() {
        let (k, ()) = e.unwrap();
        c.map.insert(
            k.clone(),
            collect(w.map.iter(&k).unwrap()).into_iter().collect(),
        );
    }
    for e in w.reduce.all_keys().unwrap() {
        let (k, ()) = e.unwrap();
        c.reduce
            .insert(k.clone(), w.reduce.get(&k).unwrap().unwrap());
    }
    for e in w.agg.all_keys().unwrap() {
        let (k, ()) = e.unwrap();
        c.agg.insert(k.clone(), w.agg.get(&k).unwrap().unwrap());
    }
    c
}

fn options(dir: &Path) -> BackendOptions {
    BackendOptions::for_subtask(dir, 0, PAR, MAX_PAR).unwrap()
}

/// Snapshot, upload and confirm, passing the handle through its byte encoding as a
/// runtime would.
async fn checkpoint(b: &RocksStateBackend, job: &CheckpointStorage, id: u64) -> KeyedStateHandle {
    let pending = b.snapshot(id).unwrap();
    let handle = pending.upload(job, "counter", 0).await.unwrap();
    b.notify_checkpoint_complete(id);
    KeyedStateHandle::decode(&handle.encode().unwrap()).unwrap()
}

async fn restore(
    handle: &KeyedStateHandle,
    job: &CheckpointStorage,
    dir: &Path,
) -> RocksStateBackend {
    RocksStateBackend::restore(options(dir), handle, job)
        .await
        .unwrap()
}

fn paths(files: &[rockstate::StateFile]) -> BTreeSet<String> {
    files.iter().map(|f| f.path.clone()).collect()
}

/// Bytes of shared files in `handle` that `before` did not reference, plus private files.
fn expected_upload(handle: &KeyedStateHandle, before: &KeyedStateHandle) -> u64 {
    let old = paths(&before.shared);
    let new: u64 = handle
        .shared
        .iter()
        .filter(|f| !old.contains(&f.path))
        .map(|f| f.size)
        .sum();
    new + handle.private.iter().map(|f| f.size).sum::<u64>()
}

async fn round_trip(job: CheckpointStorage) {
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let keys = owned_keys(300);
    let backend = open(&dirs[0].path().join("db"), &ManualClock::new(0));
    let w = register(&backend);
    let mut model = Contents::default();

    apply(&w, &mut model, &keys[..200], 1);
    let h1 = checkpoint(&backend, &job, 1).await;
    let m1 = model.clone();
    assert!(!h1.shared.is_empty());
    assert_eq!(
        h1.uploaded_bytes,
        h1.total_size(),
        "first checkpoint uploads everything"
    );

    apply(&w, &mut model, &keys[150..300], 2);
    let m2 = model.clone();
    // Writes after the sync phase are not part of the snapshot.
    let pending = backend.snapshot(2).unwrap();
    apply(&w, &mut model, &keys[250..260], 9);
    let h2 = pending.upload(&job, "counter", 0).await.unwrap();
    backend.notify_checkpoint_complete(2);
    assert_eq!(h2.uploaded_bytes, expected_upload(&h2, &h1));
    assert!(
        paths(&h2.shared).intersection(&paths(&h1.shared)).count() > 0,
        "unchanged SSTs are referenced, not uploaded again"
    );

    // Nothing changed since checkpoint 3: no SST is uploaded at all.
    let before = checkpoint(&backend, &job, 3).await;
    let h3 = checkpoint(&backend, &job, 30).await;
    assert_eq!(paths(&h3.shared), paths(&before.shared));
    assert_eq!(
        h3.uploaded_bytes,
        h3.private.iter().map(|f| f.size).sum::<u64>()
    );

    for (handle, expected, dir) in [(&h1, &m1, &dirs[1]), (&h2, &m2, &dirs[2])] {
        let restored = restore(handle, &job, &dir.path().join("db")).await;
        assert_eq!(
            &read_all(&register(&restored)),
            expected,
            "checkpoint {}",
            handle.checkpoint_id
        );
    }

    // A restored backend keeps checkpointing incrementally from the restored files.
    let restored = restore(&h2, &job, &dirs[3].path().join("db")).await;
    assert_eq!(restored.last_confirmed_checkpoint(), Some(2));
    let rw = register(&restored);
    let mut m3 = m2.clone();
    apply(&rw, &mut m3, &keys[..10], 3);
    let h4 = checkpoint(&restored, &job, 4).await;
    assert!(paths(&h4.shared).intersection(&paths(&h2.shared)).count() > 0);
    assert_eq!(h4.uploaded_bytes, expected_upload(&h4, &h2));
    assert!(h4.uploaded_bytes < h4.total_size());
    let again = restore(&h4, &job, &dirs[4].path().join("db")).await;
    assert_eq!(read_all(&register(&again)), m3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_on_local_files() {
    let root = tempfile::tempdir().unwrap();
    let url = format!("file://{}", root.path().display());
    let job = CheckpointStorage::open(&url)
        .unwrap()
        .child("job-1")
        .unwrap();
    round_trip(job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_in_memory() {
    let job = CheckpointStorage::open("memory://round-trip")
        .unwrap()
        .child("job")
        .unwrap();
    round_trip(job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_on_s3() {
    let server = S3Server::start("rockstate-test");
    let job = server.storage("checkpoints").child("job").unwrap();
    round_trip(job.clone()).await;
    // The layout is the documented one.
    let objects = job.list("").await.unwrap();
    assert!(objects
        .iter()
        .any(|o| o.path.starts_with("shared/") && o.path.ends_with(".sst")));
    assert!(objects.iter().any(|o| o.path.starts_with("chk-1/")
        && o.path.ends_with("/CURRENT")
        && o.path.contains("/0/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_use_multipart_upload_on_s3() {
    let server = S3Server::start("rockstate-multipart");
    let job = server
        .storage("mp")
        .with_options(rockstate::StorageOptions {
            multipart_threshold: 5 << 20,
            part_size: 5 << 20,
            ..Default::default()
        });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big");
    let content: Vec<u8> = (0..(12u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &content).unwrap();
    let info = job.upload_file(&file, "shared/big.sst").await.unwrap();
    assert_eq!(info.size, content.len() as u64);
    assert_eq!(info.crc32, crc32fast::hash(&content));
    let back = dir.path().join("back");
    job.download_file("shared/big.sst", &back, &info)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_is_published_once() {
    let server = S3Server::start("rockstate-once");
    let root = tempfile::tempdir().unwrap();
    for job in [
        server.storage("x"),
        CheckpointStorage::open("memory://once").unwrap(),
        CheckpointStorage::open(root.path().to_str().unwrap()).unwrap(),
    ] {
        job.put_if_absent("chk-1/_metadata", "first".into())
            .await
            .unwrap();
        let err = job
            .put_if_absent("chk-1/_metadata", "second".into())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{}", job.url());
        assert_eq!(
            &job.read_small("chk-1/_metadata", 100).await.unwrap()[..],
            b"first"
        );
        assert_eq!(
            job.read_small("chk-1/_metadata", 2)
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::Corrupt
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_checkpoints_upload_everything() {
    let root = tempfile::tempdir().unwrap();
    let job = CheckpointStorage::open(root.path().to_str().unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&dir.path().join("db"));
    opts.incremental = false;
    let backend = RocksStateBackend::open(opts).unwrap();
    let w = register(&backend);
    let keys = owned_keys(100);
    let mut model = Contents::default();
    apply(&w, &mut model, &keys, 1);
    let h1 = checkpoint(&backend, &job, 1).await;
    apply(&w, &mut model, &keys[..5], 2);
    let h2 = checkpoint(&backend, &job, 2).await;
    for h in [&h1, &h2] {
        assert!(!h.incremental && h.shared.is_empty());
        assert_eq!(h.uploaded_bytes, h.total_size());
        assert!(h.private.iter().any(|f| f.local_name.ends_with(".sst")));
    }
    let target = tempfile::tempdir().unwrap();
    let restored = restore(&h2, &job, &target.path().join("db")).await;
    assert_eq!(read_all(&register(&restored)), model);
}

/// A local-file job with one checkpoint, for damaging its files.
async fn damaged_setup() -> (tempfile::TempDir, CheckpointStorage, KeyedStateHandle) {
    let root = tempfile::tempdir().unwrap();
    let job = CheckpointStorage::open(root.path().to_str().unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backend = open(&dir.path().join("db"), &ManualClock::new(0));
    let w = register(&backend);
    apply(&w, &mut Contents::default(), &owned_keys(100), 1);
    let handle = checkpoint(&backend, &job, 1).await;
    (root, job, handle)
}

async fn expect_restore_failure(
    handle: &KeyedStateHandle,
    job: &CheckpointStorage,
    kind: ErrorKind,
    file: &str,
) {
    let target = tempfile::tempdir().unwrap();
    let db = target.path().join("db");
    let err = RocksStateBackend::restore(options(&db), handle, job)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), kind, "{err}");
    assert!(err.to_string().contains(file), "{err} should name {file}");
    let left: Vec<_> = std::fs::read_dir(target.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing is left half-restored: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_files_fail_the_restore_with_the_file_named() {
    let (root, job, handle) = damaged_setup().await;
    let sst = handle.shared[0].path.clone();
    let on_disk = root.path().join(&sst);
    let original = std::fs::read(&on_disk).unwrap();

    let mut flipped = original.clone();
    flipped[original.len() / 2] ^= 0x01;
    std::fs::write(&on_disk, &flipped).unwrap();
    expect_restore_failure(&handle, &job, ErrorKind::Corrupt, &sst).await;

    std::fs::write(&on_disk, &original[..original.len() - 1]).unwrap();
    expect_restore_failure(&handle, &job, ErrorKind::Corrupt, &sst).await;

    std::fs::remove_file(&on_disk).unwrap();
    expect_restore_failure(&handle, &job, ErrorKind::NotFound, &sst).await;

    // A private file too.
    std::fs::write(&on_disk, &original).unwrap();
    let manifest = handle
        .private
        .iter()
        .find(|f| f.local_name.starts_with("MANIFEST"))
        .unwrap();
    std::fs::write(root.path().join(&manifest.path), b"garbage").unwrap();
    expect_restore_failure(&handle, &job, ErrorKind::Corrupt, &manifest.path).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_checks_layout_and_target() {
    let (_root, job, handle) = damaged_setup().await;
    let dir = tempfile::tempdir().unwrap();
    let other = BackendOptions::for_subtask(dir.path().join("a"), 1, PAR, MAX_PAR).unwrap();
    let err = RocksStateBackend::restore(other, &handle, &job)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible);
    let other = BackendOptions::new(dir.path().join("b"), handle.key_group_range, 256);
    let err = RocksStateBackend::restore(other, &handle, &job)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible);
    assert!(err.to_string().contains("max parallelism 128"), "{err}");
    let busy = dir.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("x"), b"x").unwrap();
    let err = RocksStateBackend::restore(options(&busy), &handle, &job)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(
        busy.join("x").exists(),
        "an occupied directory is left alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_uploads_leave_the_backend_working() {
    let inner = CheckpointStorage::open("memory://failing").unwrap();
    let failing = Arc::new(GatedStore::new(inner.store().clone()));
    // Puts from the third on fail: the first two land and must be cleaned up.
    let puts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = puts.clone();
    failing.fail(
        Match::op(Op::Put)
            .path_matches(move |_| counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 2),
        u64::MAX,
    );
    // Without retries, so that the injected failures reach the upload.
    let job = CheckpointStorage::from_store(failing.clone(), "memory://failing").with_options(
        rockstate::StorageOptions {
            retries: 0,
            ..Default::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let backend = open(&dir.path().join("db"), &ManualClock::new(0));
    let w = register(&backend);
    let keys = owned_keys(100);
    let mut model = Contents::default();
    apply(&w, &mut model, &keys, 1);

    let err = backend
        .snapshot(1)
        .unwrap()
        .upload(&job, "counter", 0)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        puts.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "the upload failed at an injected failure"
    );
    backend.notify_checkpoint_aborted(1);
    assert!(
        job.list("")
            .await
            .unwrap()
            .iter()
            .all(|o| o.path.starts_with("_epochs/")),
        "files of the failed attempt are removed"
    );

    // Processing continues, and the next checkpoint succeeds once the store recovers.
    apply(&w, &mut model, &keys[..20], 2);
    failing.clear_rules();
    let h2 = checkpoint(&backend, &job, 2).await;
    assert_eq!(h2.uploaded_bytes, h2.total_size());
    let target = tempfile::tempdir().unwrap();
    let restored = restore(&h2, &job, &target.path().join("db")).await;
    assert_eq!(read_all(&register(&restored)), model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_timestamps_survive_checkpoint_and_restore() {
    let job = CheckpointStorage::open("memory://ttl")
        .unwrap()
        .child("job")
        .unwrap();
    let clock = ManualClock::new(1_000);
    let dir = tempfile::tempdir().unwrap();
    let backend = open(&dir.path().join("db"), &clock);
    let ttl = std::time::Duration::from_secs(10);
    let v = backend
        .register(ValueStateDescriptor::<String, u64>::new("v").with_ttl(ttl))
        .unwrap();
    let keys = owned_keys(2);
    v.put(&keys[0], &1).unwrap();
    clock.advance(std::time::Duration::from_secs(5));
    v.put(&keys[1], &2).unwrap();
    let handle = checkpoint(&backend, &job, 1).await;

    let target = tempfile::tempdir().unwrap();
    let restored = RocksStateBackend::builder(options(&target.path().join("db")))
        .clock(clock.clone())
        .restore(&handle, &job)
        .await
        .unwrap();
    let v = restored
        .register(ValueStateDescriptor::<String, u64>::new("v").with_ttl(ttl))
        .unwrap();
    assert_eq!(v.get(&keys[0]).unwrap(), Some(1));
    clock.advance(std::time::Duration::from_secs(5));
    assert_eq!(
        v.get(&keys[0]).unwrap(),
        None,
        "expires on its original schedule"
    );
    assert_eq!(v.get(&keys[1]).unwrap(), Some(2));
    let err = restored
        .register(ValueStateDescriptor::<String, u64>::new("v"))
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Incompatible,
        "TTL setting is restored too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_files_are_reused_only_in_the_same_directory() {
    let root = CheckpointStorage::open("memory://two-jobs").unwrap();
    let (job_a, job_b) = (root.child("a").unwrap(), root.child("b").unwrap());
    let dir = tempfile::tempdir().unwrap();
    let backend = open(&dir.path().join("db"), &ManualClock::new(0));
    let w = register(&backend);
    let mut model = Contents::default();
    apply(&w, &mut model, &owned_keys(50), 1);
    let h1 = checkpoint(&backend, &job_a, 1).await;
    // Checkpointing into another job's directory uploads everything there.
    let other = checkpoint(&backend, &job_b, 2).await;
    assert_eq!(other.uploaded_bytes, other.total_size());
    let target = tempfile::tempdir().unwrap();
    let restored = restore(&h1, &job_a, &target.path().join("db")).await;
    let in_b = checkpoint(&restored, &job_b, 5).await;
    assert_eq!(
        in_b.uploaded_bytes,
        in_b.total_size(),
        "job a's files do not exist in b"
    );
    let last = tempfile::tempdir().unwrap();
    let again = restore(&in_b, &job_b, &last.path().join("db")).await;
    assert_eq!(read_all(&register(&again)), model);
}
