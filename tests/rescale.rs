//! Restoring at another parallelism from checkpoints, native and canonical savepoints,
//! for every state kind, compared key by key with a model: each key's state is in exactly
//! one new subtask and nowhere else, and the union equals what was snapshotted.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rockstate::checkpoint::{AckOutcome, CheckpointCoordinator, CoordinatorOptions, OperatorSpec};
use rockstate::savepoint::Compression;
use rockstate::testing::checks::columns_with_compactions_off;
use rockstate::testing::SeededRng;
use rockstate::{
    AggregateFunction, AggregatingStateDescriptor, BackendOptions, CaptureHold, CheckpointMetadata,
    CheckpointStorage, ErrorKind, ListStateDescriptor, MapStateDescriptor, ReducingStateDescriptor,
    RescaleStrategy, RestoreMode, RestoreOptions, RestoreSource, RocksStateBackend,
    SavepointFormat, StorageOptions, SubtaskSnapshot, ValueStateDescriptor,
};

const MAX_PAR: u32 = 128;
const UID: &str = "op";
const KEYS: u64 = 600;

struct Count;

impl AggregateFunction for Count {
    type In = u64;
    type Acc = (u64, u64);
    type Out = u64;
    fn create_accumulator(&self) -> (u64, u64) {
        (0, 0)
    }
    fn add(&self, input: u64, acc: (u64, u64)) -> (u64, u64) {
        (acc.0 + input, acc.1 + 1)
    }
    fn get_result(&self, acc: &(u64, u64)) -> u64 {
        acc.0 * 1000 + acc.1
    }
}

/// What every state should hold, by key (namespace 0 unless stated).
#[derive(Debug, Default, Clone, PartialEq)]
struct Model {
    value: BTreeMap<(u64, u32), u64>,
    list: BTreeMap<u64, Vec<u32>>,
    map: BTreeMap<u64, BTreeMap<u32, u64>>,
    sum: BTreeMap<u64, u64>,
    count: BTreeMap<u64, u64>,
}

struct States {
    value: rockstate::ValueState<u64, u64, u32>,
    list: rockstate::ListState<u64, u32>,
    map: rockstate::MapState<u64, u32, u64>,
    sum: rockstate::ReducingState<u64, u64>,
    count: rockstate::AggregatingState<u64, Count>,
}

fn states(backend: &RocksStateBackend) -> States {
    States {
        value: backend
            .register(ValueStateDescriptor::<u64, u64, u32>::new("value"))
            .unwrap(),
        list: backend
            .register(ListStateDescriptor::<u64, u32>::new("list"))
            .unwrap(),
        map: backend
            .register(MapStateDescriptor::<u64, u32, u64>::new("map"))
            .unwrap(),
        sum: backend
            .register(ReducingStateDescriptor::<u64, u64>::new("sum", |a, b| {
                a + b
            }))
            .unwrap(),
        count: backend
            .register(AggregatingStateDescriptor::<u64, Count>::new(
                "count", Count,
            ))
            .unwrap(),
    }
}

fn owner(key: u64, parallelism: u32) -> u32 {
    rockstate::subtask_for_key(&key, parallelism, MAX_PAR).unwrap()
}

/// Writes random operations for every key into its owner and the model; `round` changes
/// what is written, so that later rounds overwrite and delete earlier data.
fn write_round(backends: &[RocksStateBackend], model: &mut Model, seed: u64) {
    write_round_where(backends, model, seed, |_| true)
}

/// [`write_round`] for the keys `keep` accepts only.
fn write_round_where(
    backends: &[RocksStateBackend],
    model: &mut Model,
    seed: u64,
    keep: impl Fn(u64) -> bool,
) {
    let p = backends.len() as u32;
    let handles: Vec<States> = backends.iter().map(states).collect();
    let mut rng = SeededRng::new(seed);
    for key in (0..KEYS).filter(|&k| keep(k)) {
        let s = &handles[owner(key, p) as usize];
        let ns = rng.below(3) as u32;
        match rng.below(10) {
            0 => {
                s.value.with_namespace(&ns).unwrap().clear(&key).unwrap();
                model.value.remove(&(key, ns));
            }
            _ => {
                let v = rng.next_u64();
                s.value.with_namespace(&ns).unwrap().put(&key, &v).unwrap();
                model.value.insert((key, ns), v);
            }
        }
        let e = rng.below(1000) as u32;
        s.list.add(&key, &e).unwrap();
        model.list.entry(key).or_default().push(e);
        let uk = rng.below(4) as u32;
        if rng.chance(0.2) {
            s.map.remove(&key, &uk).unwrap();
            model.map.entry(key).or_default().remove(&uk);
        } else {
            s.map.put(&key, &uk, &key).unwrap();
            model.map.entry(key).or_default().insert(uk, key);
        }
        let n = rng.range(1, 99);
        s.sum.add(&key, n).unwrap();
        *model.sum.entry(key).or_default() += n;
        s.count.add(&key, n).unwrap();
        let c = model.count.entry(key).or_insert(0);
        *c = (*c / 1000 + n) * 1000 + (*c % 1000 + 1);
    }
    model.map.retain(|_, m| !m.is_empty());
    for b in backends {
        b.flush().unwrap();
    }
}

fn open_subtasks(root: &Path, p: u32) -> Vec<RocksStateBackend> {
    (0..p)
        .map(|i| {
            let options =
                BackendOptions::for_subtask(root.join(format!("old-{p}-{i}")), i, p, MAX_PAR)
                    .unwrap();
            RocksStateBackend::open(options).unwrap()
        })
        .collect()
}

/// Checks that the new subtasks hold exactly the model, each only its own keys.
fn check(backends: &[RocksStateBackend], model: &Model, what: &str) {
    let p = backends.len() as u32;
    let mut seen = Model::default();
    for (i, backend) in backends.iter().enumerate() {
        assert_eq!(
            backend.entries_outside_range().unwrap(),
            0,
            "{what}: subtask {i} holds entries outside its key groups"
        );
        let s = states(backend);
        for key in s.list.all_keys().unwrap() {
            let (key, ()) = key.unwrap();
            assert_eq!(owner(key, p), i as u32, "{what}: key {key} in subtask {i}");
            seen.list.insert(key, s.list.get(&key).unwrap());
        }
        for item in s.value.all_keys().unwrap() {
            let (key, ns) = item.unwrap();
            let v = s
                .value
                .with_namespace(&ns)
                .unwrap()
                .get(&key)
                .unwrap()
                .unwrap();
            seen.value.insert((key, ns), v);
        }
        for item in s.map.all_keys().unwrap() {
            let (key, ()) = item.unwrap();
            let entries = s.map.iter(&key).unwrap().map(|e| e.unwrap()).collect();
            seen.map.insert(key, entries);
        }
        for item in s.sum.all_keys().unwrap() {
            let (key, ()) = item.unwrap();
            seen.sum.insert(key, s.sum.get(&key).unwrap().unwrap());
        }
        for item in s.count.all_keys().unwrap() {
            let (key, ()) = item.unwrap();
            seen.count.insert(key, s.count.get(&key).unwrap().unwrap());
        }
    }
    assert_eq!(seen.value, model.value, "{what}: value state");
    assert_eq!(seen.list, model.list, "{what}: list state");
    assert_eq!(seen.map, model.map, "{what}: map state");
    assert_eq!(seen.sum, model.sum, "{what}: reducing state");
    assert_eq!(seen.count, model.count, "{what}: aggregating state");
}

fn spec(p: u32) -> Vec<OperatorSpec> {
    vec![OperatorSpec {
        uid: UID.into(),
        parallelism: p,
        max_parallelism: MAX_PAR,
    }]
}

/// Takes a checkpoint (`format` `None`) or a savepoint of every backend.
async fn snapshot(
    coordinator: &mut CheckpointCoordinator,
    backends: &[RocksStateBackend],
    job: &CheckpointStorage,
    savepoints: &CheckpointStorage,
    format: Option<SavepointFormat>,
) -> (RestoreSource, CheckpointMetadata) {
    let (id, folder) = match format {
        Some(format) => {
            let t = coordinator
                .trigger_savepoint(Some(savepoints), format)
                .unwrap();
            (t.checkpoint_id, Some((t.folder, format)))
        }
        None => (coordinator.trigger().unwrap(), None),
    };
    let mut completed = None;
    for (i, backend) in backends.iter().enumerate() {
        let pending = backend.snapshot(id).unwrap();
        let keyed = match &folder {
            Some((folder, format)) => pending
                .write_savepoint(folder, UID, i as u32, *format, Compression::Lz4)
                .await
                .unwrap(),
            None => pending.upload(job, UID, i as u32).await.unwrap().into(),
        };
        let ack = SubtaskSnapshot {
            keyed: Some(keyed),
            ..Default::default()
        };
        if let AckOutcome::Completed(meta) = coordinator
            .acknowledge(id, UID, i as u32, ack)
            .await
            .unwrap()
        {
            completed = Some(*meta);
        }
    }
    let meta = completed.expect("all acknowledged");
    for b in backends {
        b.notify_checkpoint_complete(id);
    }
    let source = match folder {
        Some((folder, _)) => RestoreSource::open_folder(&folder).await.unwrap(),
        None => RestoreSource::checkpoint(job, meta.clone()),
    };
    (source, meta)
}

async fn restore_all(
    source: &RestoreSource,
    root: &Path,
    p: u32,
    options: &RestoreOptions,
) -> rockstate::Result<Vec<RocksStateBackend>> {
    let mut out = Vec::new();
    for i in 0..p {
        let opts = BackendOptions::for_subtask(root.join(format!("new-{p}-{i}")), i, p, MAX_PAR)?;
        out.push(
            RocksStateBackend::builder(opts)
                .restore_operator(source, UID, options)
                .await?,
        );
    }
    Ok(out)
}

/// Builds `from` subtasks with two rounds of writes and returns the snapshot source.
async fn prepare(
    tmp: &Path,
    from: u32,
    format: Option<SavepointFormat>,
) -> (RestoreSource, Model, CheckpointStorage) {
    let store = CheckpointStorage::open(tmp.join("store").to_str().unwrap()).unwrap();
    prepare_in(&store, tmp, from, format).await
}

/// Like [`prepare`], with the snapshots in `store`.
async fn prepare_in(
    store: &CheckpointStorage,
    tmp: &Path,
    from: u32,
    format: Option<SavepointFormat>,
) -> (RestoreSource, Model, CheckpointStorage) {
    let savepoints = store.child("savepoints").unwrap();
    let (job, mut coordinator) = coordinated(store, "job", from).await;
    let backends = open_subtasks(tmp, from);
    let mut model = Model::default();
    write_round(&backends, &mut model, 1);
    if format.is_none() {
        // A first checkpoint, so that the second one references shared files.
        snapshot(&mut coordinator, &backends, &job, &savepoints, None).await;
    }
    write_round(&backends, &mut model, 2);
    let (source, _) = snapshot(&mut coordinator, &backends, &job, &savepoints, format).await;
    (source, model, job)
}

const PAIRS: [(u32, u32); 4] = [(4, 3), (3, 4), (4, 1), (1, 4)];

async fn rescale_every_pair(format: Option<SavepointFormat>, strategy: RescaleStrategy) {
    for (from, to) in PAIRS {
        let tmp = tempfile::tempdir().unwrap();
        let (source, model, _) = prepare(tmp.path(), from, format).await;
        let options = RestoreOptions {
            strategy,
            ..Default::default()
        };
        let restored = restore_all(&source, tmp.path(), to, &options)
            .await
            .unwrap();
        check(
            &restored,
            &model,
            &format!("{format:?} {from}->{to} {strategy:?}"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_rescales_by_ingestion() {
    rescale_every_pair(None, RescaleStrategy::Ingest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_rescales_by_iteration() {
    rescale_every_pair(None, RescaleStrategy::IterateAndWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_savepoint_rescales() {
    rescale_every_pair(Some(SavepointFormat::Native), RescaleStrategy::Ingest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canonical_savepoint_rescales() {
    rescale_every_pair(Some(SavepointFormat::Canonical), RescaleStrategy::Ingest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_parallelism_restores_from_every_kind() {
    for format in [
        None,
        Some(SavepointFormat::Native),
        Some(SavepointFormat::Canonical),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (source, model, _) = prepare(tmp.path(), 3, format).await;
        let restored = restore_all(&source, tmp.path(), 3, &RestoreOptions::default())
            .await
            .unwrap();
        check(&restored, &model, &format!("{format:?} 3->3"));
    }
}

/// A rescaled backend's first checkpoint references the unchanged SST files it ingested
/// (Claim, same job directory) instead of uploading them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_checkpoint_after_rescale_uploads_only_new_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (source, model, job) = prepare(tmp.path(), 4, None).await;
    first_checkpoint_uploads_only_new_files(tmp.path(), source, model, job, None).await;
}

/// A checkpoint at 2 in `store`'s child `job-2`, of subtasks restored 4->2 from the
/// snapshots of [`prepare_in`]: the source, the model and that job.
async fn at_two_after_four(
    store: &CheckpointStorage,
    tmp: &Path,
) -> (RestoreSource, Model, CheckpointStorage) {
    let (source, model, _) = prepare_in(store, tmp, 4, None).await;
    let two = restore_all(&source, &tmp.join("at-two"), 2, &RestoreOptions::default())
        .await
        .unwrap();
    let (job, mut coordinator) = coordinated(store, "job-2", 2).await;
    let (at_two, _) = snapshot(&mut coordinator, &two, &job, &job, None).await;
    drop(two);
    (at_two, model, job)
}

/// [`at_two_after_four`] in a new in-memory store `name`, with the temporary directory
/// its subtasks ran in: that directory, the store, the source, the model and the job.
async fn at_two_in_memory(
    name: &str,
) -> (
    tempfile::TempDir,
    CheckpointStorage,
    RestoreSource,
    Model,
    CheckpointStorage,
) {
    let tmp = tempfile::tempdir().unwrap();
    let store = CheckpointStorage::open(&format!("memory://{name}")).unwrap();
    let (at_two, model, job) = at_two_after_four(&store, tmp.path()).await;
    (tmp, store, at_two, model, job)
}

/// New subtask 1 of 3, restored alone from the checkpoint of [`at_two_after_four`] in
/// `store`, opens no base: it reads no source's MANIFEST (a base is opened as stored,
/// with its MANIFEST; an ingested source is not opened at all).
async fn subtask_one_of_three_opens_no_base(
    store: &CheckpointStorage,
    at_two: &RestoreSource,
    tmp: &Path,
) {
    let (gated, source) = logged(store, at_two.metadata());
    let alone = restore_subtask(&tmp.join("alone"), &source, 1).await;
    drop(alone);
    let manifests: Vec<String> = gated
        .requests()
        .into_iter()
        .filter(|r| r.op == rockstate::testing::Op::Get && r.path.contains("/MANIFEST-"))
        .map(|r| r.path)
        .collect();
    assert!(manifests.is_empty(), "a base was opened: {manifests:?}");
}

/// The same from a store other than local files, of a checkpoint taken at 2 after a
/// rescale 4->2, where new subtask 1 of 3 opens no base (its largest source's files of
/// old subtask 3 lie wholly outside its range): every file it ingests is recognised as a
/// copy of a stored one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_checkpoint_after_a_rescale_without_a_base_uploads_only_new_files() {
    let (tmp, store, at_two, model, job) = at_two_in_memory("claim-without-a-base").await;
    subtask_one_of_three_opens_no_base(&store, &at_two, tmp.path()).await;
    // New subtask 1 itself references what it ingested: had it fallen back to reading
    // and writing its sources, it would reference nothing. (Its compactions are held
    // until its snapshot, so that none rewrites those files first.)
    let held = tmp.path().join("new-3-1");
    let referenced =
        first_checkpoint_uploads_only_new_files(tmp.path(), at_two, model, job, Some(&held)).await;
    assert!(referenced[1] > 0, "{referenced:?}");
}

/// A rescale whose largest source's list of files cannot be read opens that source as
/// its base (which needs no list) instead of failing: new subtask 1 of 3 of the
/// checkpoint of [`at_two_after_four`], which otherwise ingests its largest source,
/// reads its MANIFEST; every new subtask holds the model's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescale_opens_its_largest_source_as_stored_when_its_list_cannot_be_read() {
    largest_list_unusable(false).await;
}

/// The same when the list's bytes are damaged (same size, another CRC32): the list,
/// read into memory to decide, is refused (by its CRC32, or else as a list that does
/// not match its snapshot's files), and the source is opened as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescale_opens_its_largest_source_as_stored_when_its_list_is_damaged() {
    largest_list_unusable(true).await;
}

/// New subtask 1 of 3 of the checkpoint of [`at_two_after_four`], whose largest source's
/// list cannot be read (every GET fails) or is `damaged`, opens that source as its base
/// (reads its MANIFEST); every new subtask holds the model's data.
async fn largest_list_unusable(damaged: bool) {
    use rockstate::testing::{Match, Op};
    let (tmp, store, at_two, model, job) = at_two_in_memory("unreadable-list").await;
    // The largest source of new subtask 1 of 3 (key groups 43..=85) is old subtask 1.
    let largest = old_subtask_from(at_two.metadata(), 64);
    let list = largest
        .private
        .iter()
        .find(|f| f.local_name == "SST-LIST")
        .unwrap();
    let (gated, source) = logged(&store, at_two.metadata());
    if damaged {
        let mut bytes = job
            .read_small(&list.path, list.size)
            .await
            .unwrap()
            .to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x5a;
        job.put(&list.path, bytes.into()).await.unwrap();
    } else {
        gated.fail(
            Match::op(Op::Get).path_is(format!("job-2/{}", list.path)),
            u64::MAX,
        );
    }
    let alone = restore_subtask(&tmp.path().join("alone"), &source, 1).await;
    drop(alone);
    let manifests: Vec<String> = gated
        .requests()
        .into_iter()
        .filter(|r| r.op == Op::Get && r.path.contains("/MANIFEST-"))
        .map(|r| r.path)
        .collect();
    assert!(!manifests.is_empty(), "no base was opened");
    let restored = restore_three(&tmp.path().join("at-three"), &source).await;
    check(
        &restored,
        &model,
        "2->3, the largest source's list unusable",
    );
}

/// Restores `source` at 3 (Claim) and checks that the first checkpoint uploads no copy of
/// a restored file and references some; returns how many files each subtask referenced.
/// Compactions of the backends under `held` stay paused until the snapshots.
async fn first_checkpoint_uploads_only_new_files(
    tmp: &Path,
    source: RestoreSource,
    model: Model,
    job: CheckpointStorage,
    held: Option<&Path>,
) -> Vec<u64> {
    let options = RestoreOptions {
        mode: RestoreMode::Claim,
        ..Default::default()
    };
    if let Some(held) = held {
        rockstate::testing::checks::refuse_compaction_resumes(held, true);
    }
    let restored = restore_all(&source, tmp, 3, &options).await.unwrap();
    check(&restored, &model, "claim, rescaled to 3");
    if let Some(held) = held {
        // The snapshot resumes them (before taking its files).
        rockstate::testing::checks::refuse_compaction_resumes(held, false);
    }
    let id = source.metadata().checkpoint_id + 1;
    let restored_files: std::collections::BTreeSet<(u64, u32)> = source
        .metadata()
        .handles()
        .flat_map(|(_, h)| h.files())
        .map(|f| (f.size, f.crc32))
        .collect();
    let mut referenced = vec![0u64; restored.len()];
    for (i, backend) in restored.iter().enumerate() {
        let handle = backend
            .snapshot(id)
            .unwrap()
            .upload(&job, UID, i as u32)
            .await
            .unwrap();
        handle.validate().unwrap();
        for f in &handle.shared {
            if f.uploaded_by < id {
                referenced[i] += 1;
            } else {
                // New content only (the clipping flush, compactions), never a copy of a
                // restored file.
                assert!(
                    !restored_files.contains(&(f.size, f.crc32)),
                    "subtask {i} uploaded {} again",
                    f.local_name
                );
            }
        }
    }
    assert!(referenced.iter().sum::<u64>() > 0, "nothing was reused");
    referenced
}

/// The live SST files of the state columns of the database in `dir` (opened read-only
/// beside its backend), each as the key groups of its first and last key.
fn state_file_bounds(dir: &Path) -> Vec<(String, i32, u16, u16)> {
    let opts = rocksdb::Options::default();
    let columns = rocksdb::DB::list_cf(&opts, dir).unwrap();
    let db = rocksdb::DB::open_cf_for_read_only(&opts, dir, &columns, false).unwrap();
    let group = |key: &Option<Vec<u8>>| {
        let key = key.as_deref().expect("a file with bounds");
        u16::from_be_bytes([key[0], key[1]])
    };
    db.live_files()
        .unwrap()
        .into_iter()
        .filter(|f| f.column_family_name.starts_with("state/"))
        .map(|f| (f.name, f.level, group(&f.start_key), group(&f.end_key)))
        .collect()
}

/// A rescale of a checkpoint taken after an earlier rescale (4->2, whose subtasks hold
/// each old subtask's files apart) ingests no file of another source that lies wholly
/// outside the new range: none is there before any compaction runs (in this layout, the
/// files it would ingest land at level 0, which no range deletion drops). The data is
/// the model's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescale_ingests_no_file_wholly_outside_its_range() {
    let tmp = tempfile::tempdir().unwrap();
    let (source, model, _) = prepare(tmp.path(), 4, None).await;
    let two = restore_all(
        &source,
        &tmp.path().join("at-two"),
        2,
        &RestoreOptions::default(),
    )
    .await
    .unwrap();
    let store = CheckpointStorage::open(tmp.path().join("store").to_str().unwrap()).unwrap();
    let (job, mut coordinator) = coordinated(&store, "job-2", 2).await;
    let (at_two, _) = snapshot(&mut coordinator, &two, &job, &job, None).await;
    drop(two);
    let (restored, release) = restore_held_at_three(tmp.path(), &at_two).await;
    let mut files = 0;
    let mut problems = Vec::new();
    for (i, b) in restored.iter().enumerate() {
        if columns_with_compactions_off(b.local_dir()).is_empty() {
            problems.push(format!("subtask {i} resumed its compactions while held"));
        }
        let range = b.key_group_range();
        for (name, level, first, last) in state_file_bounds(b.local_dir()) {
            files += 1;
            let below = last < range.start();
            // The middle subtask's base is old subtask 1 (it shares more key groups with
            // it): a file below its range could only come from the other source.
            if i == 1 && below {
                problems.push(format!(
                    "subtask 1 ({range}) ingested {name} (level {level}) of key groups \
                     [{first}, {last}]"
                ));
            }
        }
    }
    drop(release);
    assert_eq!(problems, Vec::<String>::new());
    assert!(files > 0);
    check(&restored, &model, "4->2->3");
    checkpoint_at_three_restores_at_two(tmp.path(), restored, &model, "4->2->3->2").await;
}

/// The same from a store other than local files, where new subtask 1 opens no base (its
/// largest source's files of old subtask 3 lie wholly outside its range) and the others
/// open one of which nothing lies outside: no subtask holds a file wholly outside its
/// range, of any source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescale_without_a_base_ingests_no_file_wholly_outside_its_range() {
    let (tmp, store, at_two, model, _) = at_two_in_memory("no-base-bounds").await;
    subtask_one_of_three_opens_no_base(&store, &at_two, tmp.path()).await;
    let (restored, release) = restore_held_at_three(tmp.path(), &at_two).await;
    let mut files = 0;
    let mut problems = Vec::new();
    for (i, b) in restored.iter().enumerate() {
        // Held, no compaction could have removed a file ingested wrongly.
        if columns_with_compactions_off(b.local_dir()).is_empty() {
            problems.push(format!("subtask {i} resumed its compactions while held"));
        }
        let range = b.key_group_range();
        for (name, level, first, last) in state_file_bounds(b.local_dir()) {
            files += 1;
            if last < range.start() || first > range.end() {
                problems.push(format!(
                    "{range} ingested {name} (level {level}) of key groups [{first}, {last}]"
                ));
            }
        }
    }
    drop(release);
    assert_eq!(problems, Vec::<String>::new());
    assert!(files > 0);
    check(&restored, &model, "4->2->3 without a base");
    checkpoint_at_three_restores_at_two(tmp.path(), restored, &model, "4->2->3->2, no base").await;
}

/// Restores `source` at 3 with the work each rescale leaves to the background held, and
/// returns the backends with the guards that let it go. Bind the guards after the
/// backends, so that they drop first even when an assertion fails (a backend's drop waits
/// for that work).
async fn restore_held_at_three(
    root: &Path,
    source: &RestoreSource,
) -> (Vec<RocksStateBackend>, Vec<CaptureHold>) {
    let mut restored = Vec::new();
    for i in 0..3 {
        let dir = root.join(format!("held-{i}"));
        let opts = BackendOptions::for_subtask(dir, i, 3, MAX_PAR).unwrap();
        restored.push(
            RocksStateBackend::builder(opts)
                .hold_captures_from_open()
                .restore_operator(source, UID, &RestoreOptions::default())
                .await
                .unwrap(),
        );
    }
    let release = restored
        .iter()
        .map(|b| b.hold_snapshot_captures())
        .collect();
    (restored, release)
}

/// A rescaled backend is handed over as soon as its data is in place; the flush of its
/// range deletions and the resumption of its compactions follow in the background. A
/// backend dropped at once still waits for that: its directory reopens with the right
/// data, and RocksDB's options file shows every column's compactions running again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compactions_resume_in_the_background_after_a_rescale() {
    let tmp = tempfile::tempdir().unwrap();
    let (source, model, _) = prepare(tmp.path(), 2, None).await;
    let restored = restore_all(&source, tmp.path(), 3, &RestoreOptions::default())
        .await
        .unwrap();
    let dirs: Vec<_> = restored
        .iter()
        .map(|b| b.local_dir().to_path_buf())
        .collect();
    drop(restored);
    let mut reopened = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        assert_eq!(
            columns_with_compactions_off(dir),
            Vec::<String>::new(),
            "subtask {i}"
        );
        let options = BackendOptions::for_subtask(dir, i as u32, 3, MAX_PAR).unwrap();
        reopened.push(RocksStateBackend::open(options).unwrap());
    }
    check(&reopened, &model, "2->3, reopened");
}

/// Takes a checkpoint of the three rescaled `restored` backends through a coordinator,
/// checks that every column's compactions then run, and restores it at 2 against `model`.
async fn checkpoint_at_three_restores_at_two(
    tmp: &Path,
    restored: Vec<RocksStateBackend>,
    model: &Model,
    what: &str,
) {
    let store = CheckpointStorage::open(tmp.join("store").to_str().unwrap()).unwrap();
    let (job, mut coordinator) = coordinated(&store, "job-3", 3).await;
    let (at_three, _) = snapshot(&mut coordinator, &restored, &job, &job, None).await;
    for (i, b) in restored.iter().enumerate() {
        assert_eq!(
            columns_with_compactions_off(b.local_dir()),
            Vec::<String>::new(),
            "{what}: subtask {i}"
        );
    }
    drop(restored);
    let back = restore_all(&at_three, tmp, 2, &RestoreOptions::default())
        .await
        .unwrap();
    check(&back, model, what);
}

/// While the work a rescale leaves to the background is held, the backend is already in
/// use: its compactions are still off, and it reads and writes as the model says. Once
/// released, a checkpoint of the three (each snapshot waits for that work) restores at 2
/// with everything written, and compactions run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescaled_backend_is_in_use_before_its_compactions_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let (source, mut model, _) = prepare(tmp.path(), 2, None).await;
    let (restored, release) = restore_held_at_three(tmp.path(), &source).await;
    for (i, b) in restored.iter().enumerate() {
        assert!(
            !columns_with_compactions_off(b.local_dir()).is_empty(),
            "subtask {i} resumed its compactions while held"
        );
    }
    check(&restored, &model, "2->3, held");
    write_round(&restored, &mut model, 3);
    check(&restored, &model, "2->3, written while held");
    drop(release);
    checkpoint_at_three_restores_at_two(tmp.path(), restored, &model, "2->3->2").await;
}

/// Compactions a rescale could not resume in the background stay paused, and are not
/// lost track of: the next snapshot tries again before it takes anything and, while
/// RocksDB refuses, fails saying which column, with the data untouched and the backend
/// still usable. Once they can be resumed, the next snapshot does so and completes, and
/// its checkpoint restores with everything written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compactions_a_rescale_could_not_resume_are_resumed_by_the_next_snapshot() {
    use rockstate::testing::checks::refuse_compaction_resumes;
    let tmp = tempfile::tempdir().unwrap();
    let (source, mut model, _) = prepare(tmp.path(), 2, None).await;
    refuse_compaction_resumes(tmp.path(), true);
    let restored = restore_all(&source, tmp.path(), 3, &RestoreOptions::default())
        .await
        .unwrap();
    for (i, b) in restored.iter().enumerate() {
        // The snapshot waits for the background work, which was refused too.
        let e = tokio::task::block_in_place(|| b.snapshot(1)).unwrap_err();
        let paused = columns_with_compactions_off(b.local_dir());
        assert!(
            !paused.is_empty(),
            "subtask {i}: compactions on although refused"
        );
        assert!(
            paused.iter().any(|c| e
                .to_string()
                .contains(&format!("resume compactions of {c}"))),
            "subtask {i}: the error names no paused column ({paused:?}): {e}"
        );
        // It failed before taking anything: nothing staged beside the directory.
        let mut name = b.local_dir().file_name().unwrap().to_os_string();
        name.push(".snapshots");
        let staged = b.local_dir().with_file_name(name);
        assert!(
            std::fs::read_dir(&staged).map_or(true, |mut d| d.next().is_none()),
            "subtask {i}: a snapshot was staged in {}",
            staged.display()
        );
    }
    check(&restored, &model, "2->3, compactions refused");
    write_round(&restored, &mut model, 5);
    check(&restored, &model, "2->3, written with compactions refused");
    refuse_compaction_resumes(tmp.path(), false);
    checkpoint_at_three_restores_at_two(
        tmp.path(),
        restored,
        &model,
        "2->3->2 after a refused resumption",
    )
    .await;
}

/// A rescale by iterate-and-write opens each other source as a copy to read: every such
/// copy is marked scratch when it closes (no flush, sync or clean mark) and is removed;
/// the new backends' own directories are not closed that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iterate_and_write_sources_are_closed_as_scratch() {
    use rockstate::testing::checks::{scratch_closes_under, watch_scratch_closes};
    let tmp = tempfile::tempdir().unwrap();
    let (source, model, _) = prepare(tmp.path(), 2, None).await;
    let root = tmp.path().join("iterated");
    std::fs::create_dir_all(&root).unwrap();
    watch_scratch_closes(&root);
    let options = RestoreOptions {
        strategy: RescaleStrategy::IterateAndWrite,
        ..RestoreOptions::default()
    };
    let restored = restore_all(&source, &root, 3, &options).await.unwrap();
    check(&restored, &model, "2->3 by iterate and write");
    // Only new subtask 1 (43..=85) reads another source: old subtask 0, beside its base.
    let closed = scratch_closes_under(&root);
    assert_eq!(closed.len(), 1, "{closed:?}");
    let name = closed[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(name.contains(".rescale-"), "{name}");
    assert!(!closed[0].exists(), "{name} left behind");
    for b in &restored {
        assert!(!closed.contains(&b.local_dir().to_path_buf()));
    }
}

/// A runtime of two workers and a single blocking thread.
fn one_blocking_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A rescale never holds a blocking thread while it waits for work that needs one: with a
/// single blocking thread in the runtime, a rescale that ingests another source (its
/// base opens while the other source is fetched) still completes.
#[test]
fn a_rescale_completes_with_one_blocking_thread() {
    let runtime = one_blocking_thread();
    let tmp = tempfile::tempdir().unwrap();
    let outcome = runtime.block_on(async {
        let (source, model, _) = prepare(tmp.path(), 2, None).await;
        let options = RestoreOptions::default();
        let rescale = restore_all(&source, tmp.path(), 3, &options);
        let restored = tokio::time::timeout(std::time::Duration::from_secs(120), rescale)
            .await
            .map_err(|_| "the rescale did not complete")?
            .unwrap();
        check(&restored, &model, "2->3 with one blocking thread");
        drop(restored);
        Ok::<_, &str>(())
    });
    // A rescale stuck on the blocking thread is let go of rather than waited for.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    outcome.unwrap();
}

/// A rescale whose other source cannot be fetched (a stored file changed) fails with the
/// typed error while its base is already opening, and leaves nothing behind: neither the
/// backend's directory nor the downloaded sources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescale_whose_other_source_is_corrupt_fails_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (source, _, _) = prepare(tmp.path(), 2, None).await;
    // New subtask 1 of 3 (key groups 43..=85) is built on old subtask 1 (64..=127) and
    // ingests old subtask 0 (0..=63): one of old subtask 0's files is changed in place.
    let (_, other) = source
        .metadata()
        .handles()
        .find(|(_, h)| h.key_group_range.start() == 0)
        .unwrap();
    let file = other
        .files()
        .filter(|f| f.local_name.ends_with(".sst"))
        .max_by_key(|f| f.size)
        .unwrap();
    let stored = tmp.path().join("store").join("job").join(&file.path);
    let mut bytes = std::fs::read(&stored).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::remove_file(&stored).unwrap();
    std::fs::write(&stored, &bytes).unwrap();
    let err = failed_middle_rescale(tmp.path(), &source).await;
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
}

/// Restores new subtask 1 of 3 from a 2-subtask `source` (its base is old subtask 1, and
/// it takes old subtask 0's key groups 43..=63), expecting it to fail once its base is
/// open: checks that the base was closed as a scratch copy (no flush, sync or clean
/// mark) and that nothing is left of it or of the other source, and returns the error.
async fn failed_middle_rescale(tmp: &Path, source: &RestoreSource) -> rockstate::Error {
    use rockstate::testing::checks::{scratch_closes_under, watch_scratch_closes};
    let root = tmp.join("new");
    watch_scratch_closes(&root);
    let dir = root.join("subtask-1");
    let opts = BackendOptions::for_subtask(&dir, 1, 3, MAX_PAR).unwrap();
    let err = RocksStateBackend::builder(opts)
        .restore_operator(source, UID, &RestoreOptions::default())
        .await
        .unwrap_err();
    assert_eq!(
        scratch_closes_under(&root),
        vec![dir.clone()],
        "the failed build is closed as a scratch copy ({err})"
    );
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    err
}

/// A checkpoint at parallelism 2 (in `store`'s child `job`) whose subtasks hold the state
/// `odd` with two value types, each with a key.
async fn incompatible_checkpoint(
    tmp: &Path,
    store: &CheckpointStorage,
) -> (RestoreSource, CheckpointMetadata) {
    let (job, mut coordinator) = coordinated(store, "job", 2).await;
    let backends = open_subtasks(tmp, 2);
    let mut model = Model::default();
    write_round(&backends, &mut model, 1);
    let numbers = backends[0]
        .register(ValueStateDescriptor::<u64, u64>::new("odd"))
        .unwrap();
    let words = backends[1]
        .register(ValueStateDescriptor::<u64, String>::new("odd"))
        .unwrap();
    // Key groups 0..=63 and 64..=127: some key of each.
    let key_in = |range: std::ops::RangeInclusive<u16>| {
        (0u64..)
            .find(|k| range.contains(&(rockstate::key_group_for(k, MAX_PAR).unwrap())))
            .unwrap()
    };
    numbers.put(&key_in(0..=63), &7).unwrap();
    words.put(&key_in(64..=127), &"seven".to_string()).unwrap();
    let snapshot = snapshot(&mut coordinator, &backends, &job, &job, None).await;
    drop((numbers, words));
    drop(backends);
    snapshot
}

/// A rescale whose base fails to open (here: its states and the other source's disagree)
/// starts no further transfer of the other source, fetched while the base opens: the one
/// in flight finishes, and the rest are never requested. (Iterate-and-write opens a base
/// from any store; by ingestion from this store the states are checked before any
/// fetch, see the next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescale_whose_base_fails_stops_fetching_the_other_source() {
    use rockstate::testing::checks::{scratch_closes_under, watch_scratch_closes};
    use rockstate::testing::{GatedStore, Match, Op};
    let tmp = tempfile::tempdir().unwrap();
    let top = CheckpointStorage::open("memory://base-fails").unwrap();
    let (_, meta) = incompatible_checkpoint(tmp.path(), &top).await;
    // Old subtask 0 is the other source of new subtask 1 of 3 (its base is old subtask 1).
    let other: std::collections::BTreeSet<String> = meta
        .handles()
        .map(|(_, h)| h)
        .find(|h| h.key_group_range.start() == 0)
        .unwrap()
        .files()
        .map(|f| format!("job/{}", f.path))
        .collect();
    assert!(other.len() >= 3, "{other:?}");
    let gated = Arc::new(GatedStore::new(top.store().clone()));
    // One transfer at a time, so that the gate holds the other source's first.
    let job = CheckpointStorage::from_store(gated.clone(), "gated://base-fails")
        .with_options(StorageOptions {
            transfer_concurrency: 1,
            ..StorageOptions::default()
        })
        .child("job")
        .unwrap();
    let source = RestoreSource::checkpoint(&job, meta);
    let wanted = other.clone();
    let gate = gated.gate(Match::op(Op::Get).path_matches(move |p| wanted.contains(p)));
    let root = tmp.path().join("new");
    watch_scratch_closes(&root);
    let dir = root.join("subtask-1");
    let opts = BackendOptions::for_subtask(&dir, 1, 3, MAX_PAR).unwrap();
    let mut rescale = tokio::spawn(async move {
        RocksStateBackend::builder(opts)
            .restore_operator(
                &source,
                UID,
                &RestoreOptions {
                    strategy: RescaleStrategy::IterateAndWrite,
                    ..RestoreOptions::default()
                },
            )
            .await
    });
    let limit = Duration::from_secs(60);
    // Either the other source's first transfer arrives at the gate (almost always: it
    // starts as soon as the base is fetched, long before the base has opened), or the
    // base failed first and the rescale ends without any.
    let ended_first = tokio::time::timeout(limit, async {
        tokio::select! {
            _ = gate.wait_arrived() => None,
            ended = &mut rescale => Some(ended),
        }
    })
    .await
    .expect("neither a transfer of the other source nor the end of the rescale");
    let ended = match ended_first {
        Some(ended) => ended,
        None => {
            // The base fails while the transfer is held: its backend is closed as a
            // scratch copy (after the other side was told to stop).
            tokio::time::timeout(limit, async {
                while scratch_closes_under(&root).is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the base was not closed");
            gate.release();
            tokio::time::timeout(limit, rescale)
                .await
                .expect("the rescale did not end")
        }
    };
    let err = ended.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible, "{err}");
    let requested: std::collections::BTreeSet<String> = gated
        .requests()
        .into_iter()
        .filter(|r| r.op == Op::Get && other.contains(&r.path))
        .map(|r| r.path)
        .collect();
    // One transfer at a time: at most the one held was requested, of all the files.
    assert!(
        requested.len() <= 1,
        "{} of the other source's {} files were requested",
        requested.len(),
        other.len()
    );
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// By ingestion from a store other than local files, sources whose states disagree fail
/// a rescale before any of their files is fetched (even the largest source's list, which
/// decides whether it is opened as a base), and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescale_without_a_base_checks_the_sources_states_before_fetching() {
    use rockstate::testing::{GatedStore, Op};
    let tmp = tempfile::tempdir().unwrap();
    let top = CheckpointStorage::open("memory://no-base").unwrap();
    let (_, meta) = incompatible_checkpoint(tmp.path(), &top).await;
    let gated = Arc::new(GatedStore::new(top.store().clone()));
    let job = CheckpointStorage::from_store(gated.clone(), "gated://no-base")
        .child("job")
        .unwrap();
    let source = RestoreSource::checkpoint(&job, meta);
    let root = tmp.path().join("new");
    let opts = BackendOptions::for_subtask(root.join("subtask-1"), 1, 3, MAX_PAR).unwrap();
    let err = RocksStateBackend::builder(opts)
        .restore_operator(&source, UID, &RestoreOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible, "{err}");
    let fetched: Vec<String> = gated
        .requests()
        .into_iter()
        .filter(|r| r.op == Op::Get && !r.path.ends_with("_metadata"))
        .map(|r| r.path)
        .collect();
    assert!(fetched.is_empty(), "fetched: {fetched:?}");
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Restores can run on tasks of their own (a runtime restores its subtasks side by side):
/// their futures are `Send`, for a restore at the same parallelism from a handle, and for
/// one by operator that rescales.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_run_on_spawned_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let (source, model, job) = prepare(tmp.path(), 2, None).await;
    let handles: Vec<_> = source
        .metadata()
        .handles()
        .map(|(_, h)| h.clone())
        .collect();
    let mut tasks = Vec::new();
    for (i, handle) in handles.into_iter().enumerate() {
        let dir = tmp.path().join(format!("same-{i}"));
        let opts = BackendOptions::for_subtask(dir, i as u32, 2, MAX_PAR).unwrap();
        let job = job.clone();
        tasks.push(tokio::spawn(async move {
            RocksStateBackend::builder(opts)
                .restore(&handle, &job)
                .await
        }));
    }
    let mut same = Vec::new();
    for task in tasks {
        same.push(task.await.unwrap().unwrap());
    }
    check(&same, &model, "2->2 on spawned tasks");
    let source = Arc::new(source);
    let mut tasks = Vec::new();
    for i in 0..3 {
        let dir = tmp.path().join(format!("rescaled-{i}"));
        let opts = BackendOptions::for_subtask(dir, i, 3, MAX_PAR).unwrap();
        let source = source.clone();
        tasks.push(tokio::spawn(async move {
            RocksStateBackend::builder(opts)
                .restore_operator(&source, UID, &RestoreOptions::default())
                .await
        }));
    }
    let mut rescaled = Vec::new();
    for task in tasks {
        rescaled.push(task.await.unwrap().unwrap());
    }
    check(&rescaled, &model, "2->3 on spawned tasks");
}

/// A checkpoint whose subtasks hold one state name with two different value types (as a
/// job whose subtasks ran different versions of its code would leave): a rescale that
/// merges the two fails with `Incompatible` naming the state, its base (already open) is
/// closed as a scratch copy, and nothing is left of the new directory or the sources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescale_of_sources_with_incompatible_states_fails_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = CheckpointStorage::open(tmp.path().join("store").to_str().unwrap()).unwrap();
    let (source, _) = incompatible_checkpoint(tmp.path(), &store).await;
    // New subtask 1 of 3 (43..=85) opens old subtask 1 and adds old subtask 0's states.
    let err = failed_middle_rescale(tmp.path(), &source).await;
    assert_eq!(err.kind(), ErrorKind::Incompatible, "{err}");
    assert!(err.to_string().contains("odd"), "{err}");
    let root = tmp.path().join("new");
    // Subtasks that take one old subtask alone restore as usual.
    for i in [0, 2] {
        let opts =
            BackendOptions::for_subtask(root.join(format!("subtask-{i}")), i, 3, MAX_PAR).unwrap();
        RocksStateBackend::builder(opts)
            .restore_operator(&source, UID, &RestoreOptions::default())
            .await
            .unwrap();
    }
}

/// NoClaim from a savepoint folder: the first checkpoint copies the restored files into
/// the job's own `shared/` inside the store (hard links for local files), never
/// referencing the savepoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_claim_copies_restored_files_without_uploading() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let (source, model, _) = prepare(tmp.path(), 2, Some(SavepointFormat::Native)).await;
    let restored = restore_all(&source, tmp.path(), 2, &RestoreOptions::default())
        .await
        .unwrap();
    check(&restored, &model, "native 2->2");
    let store_dir = tmp.path().join("store");
    let job2 = CheckpointStorage::open(store_dir.to_str().unwrap())
        .unwrap()
        .child("job2")
        .unwrap();
    let mut copied = 0;
    for (i, backend) in restored.iter().enumerate() {
        let handle = backend
            .snapshot(1)
            .unwrap()
            .upload(&job2, UID, i as u32)
            .await
            .unwrap();
        for f in &handle.shared {
            assert_eq!(f.uploaded_by, 1, "a restored file referenced in place");
            let inode = std::fs::metadata(store_dir.join("job2").join(&f.path))
                .unwrap()
                .ino();
            let from_savepoint = source
                .metadata()
                .handles()
                .flat_map(|(_, h)| h.files())
                .filter(|s| s.local_name == f.local_name)
                .any(|s| {
                    let p =
                        Path::new(source.root().url().trim_start_matches("file://")).join(&s.path);
                    std::fs::metadata(p).unwrap().ino() == inode
                });
            if from_savepoint {
                copied += 1;
            }
        }
    }
    assert!(copied > 0, "no file was copied inside the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_savepoint_folder_restores() {
    for format in [SavepointFormat::Canonical, SavepointFormat::Native] {
        let tmp = tempfile::tempdir().unwrap();
        let (source, model, _) = prepare(tmp.path(), 2, Some(format)).await;
        let old = Path::new(source.root().url().trim_start_matches("file://")).to_path_buf();
        let moved = tmp.path().join("elsewhere").join("renamed-savepoint");
        std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
        std::fs::rename(&old, &moved).unwrap();
        assert!(RestoreSource::open(old.to_str().unwrap()).await.is_err());
        let source = RestoreSource::open(moved.to_str().unwrap()).await.unwrap();
        let restored = restore_all(&source, tmp.path(), 3, &RestoreOptions::default())
            .await
            .unwrap();
        check(&restored, &model, &format!("moved {format:?} 2->3"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_mapping_and_max_parallelism_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let (source, _, _) = prepare(tmp.path(), 2, Some(SavepointFormat::Canonical)).await;
    let other = vec![OperatorSpec {
        uid: "renamed".into(),
        parallelism: 2,
        max_parallelism: MAX_PAR,
    }];
    let err = source.check_operators(&other, false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let msg = err.to_string();
    assert!(msg.contains("\"op\"") && msg.contains("renamed"), "{msg}");
    source.check_operators(&other, true).unwrap();

    let wrong_max = vec![OperatorSpec {
        uid: UID.into(),
        parallelism: 2,
        max_parallelism: 256,
    }];
    let err = source.check_operators(&wrong_max, false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible, "{err}");
    let opts = BackendOptions::for_subtask(tmp.path().join("x"), 0, 2, 256).unwrap();
    let err = RocksStateBackend::builder(opts)
        .restore_operator(&source, UID, &RestoreOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible, "{err}");
    assert!(err.to_string().contains("max parallelism"), "{err}");

    // A uid the snapshot does not know (a misspelt one) is refused, naming what it holds.
    let opts = BackendOptions::for_subtask(tmp.path().join("y"), 0, 2, MAX_PAR).unwrap();
    let err = RocksStateBackend::builder(opts.clone())
        .restore_operator(&source, "countr", &RestoreOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(
        err.to_string().contains("countr") && err.to_string().contains(UID),
        "{err}"
    );
    // Declared new to the job, it starts empty.
    let new_operator = RestoreOptions {
        allow_new_operator: true,
        ..RestoreOptions::default()
    };
    let fresh = RocksStateBackend::builder(opts)
        .restore_operator(&source, "new-operator", &new_operator)
        .await
        .unwrap();
    assert!(fresh.states().is_empty());
}

/// The first key group of subtask 1 of 3.
const SPLIT: u16 = 43;

/// A checkpoint taken at 2 in local-file storage under `root`, each of whose subtasks
/// holds, per state, one file of the key groups below [`SPLIT`] and one of those from
/// it on (two flushes, too few files for a compaction): old subtask 0 (key groups 0-63)
/// is the other source of new subtask 1 of 3 (43-85), which needs only its second
/// file. Returns the model, the store and the checkpoint.
async fn checkpoint_at_two_in_halves(
    root: &Path,
) -> (Model, CheckpointStorage, CheckpointMetadata) {
    let store = CheckpointStorage::open(root.join("store").to_str().unwrap()).unwrap();
    let (job, mut coordinator) = coordinated(&store, "job-2", 2).await;
    let backends = open_subtasks(root, 2);
    let group = |key: u64| rockstate::subtask_for_key(&key, MAX_PAR, MAX_PAR).unwrap() as u16;
    let mut model = Model::default();
    write_round_where(&backends, &mut model, 1, |k| group(k) < SPLIT);
    write_round_where(&backends, &mut model, 2, |k| group(k) >= SPLIT);
    let (_, meta) = snapshot(&mut coordinator, &backends, &job, &job, None).await;
    drop(backends);
    (model, store, meta)
}

/// The handle of old subtask 0 in `meta`.
fn old_subtask_zero(meta: &CheckpointMetadata) -> rockstate::KeyedStateHandle {
    old_subtask_from(meta, 0)
}

/// The handle in `meta` of the old subtask whose key groups start at `start`.
fn old_subtask_from(meta: &CheckpointMetadata, start: u16) -> rockstate::KeyedStateHandle {
    meta.handles()
        .map(|(_, h)| h)
        .find(|h| h.key_group_range.start() == start)
        .unwrap()
        .clone()
}

/// `meta` read through a store that logs every request.
fn logged(
    store: &CheckpointStorage,
    meta: &CheckpointMetadata,
) -> (Arc<rockstate::testing::GatedStore>, RestoreSource) {
    let gated = Arc::new(rockstate::testing::GatedStore::new(store.store().clone()));
    let job = CheckpointStorage::from_store(gated.clone(), "gated://store")
        .child("job-2")
        .unwrap();
    (gated, RestoreSource::checkpoint(&job, meta.clone()))
}

/// The paths `gated` was asked to read of those in `of`.
fn read_of(
    gated: &rockstate::testing::GatedStore,
    of: &std::collections::BTreeSet<String>,
) -> std::collections::BTreeSet<String> {
    gated
        .requests()
        .into_iter()
        .filter(|r| r.op == rockstate::testing::Op::Get && of.contains(&r.path))
        .map(|r| r.path)
        .collect()
}

/// The job `name` in `store`, with a coordinator for `parallelism` subtasks.
async fn coordinated(
    store: &CheckpointStorage,
    name: &str,
    parallelism: u32,
) -> (CheckpointStorage, CheckpointCoordinator) {
    let job = store.child(name).unwrap();
    let coordinator = CheckpointCoordinator::start(
        job.clone(),
        name,
        spec(parallelism),
        CoordinatorOptions::default(),
    )
    .await
    .unwrap();
    (job, coordinator)
}

/// Restores subtask `i` of 3 from `source` into `root`.
async fn restore_subtask(root: &Path, source: &RestoreSource, i: u32) -> RocksStateBackend {
    let opts = BackendOptions::for_subtask(root.join(format!("sub-{i}")), i, 3, MAX_PAR).unwrap();
    RocksStateBackend::builder(opts)
        .restore_operator(source, UID, &RestoreOptions::default())
        .await
        .unwrap()
}

/// Restores every subtask of 3 from `source` into `root`.
async fn restore_three(root: &Path, source: &RestoreSource) -> Vec<RocksStateBackend> {
    let mut restored = Vec::new();
    for i in 0..3 {
        restored.push(restore_subtask(root, source, i).await);
    }
    restored
}

/// Restores new subtask `subtask` of 3 from the checkpoint of
/// [`checkpoint_at_two_in_halves`] through a logging store and checks that of old
/// subtask 0 it read its list and exactly the SST files whose first and last key groups
/// `fetched` accepts (one file per state on each side of [`SPLIT`]); then that all three
/// subtasks hold the model's data, and that a checkpoint of them restores at 2.
async fn fetches_of_old_subtask_zero(subtask: u32, fetched: impl Fn(u16, u16) -> bool) {
    let tmp = tempfile::tempdir().unwrap();
    let (model, store, meta) = checkpoint_at_two_in_halves(tmp.path()).await;
    let source = old_subtask_zero(&meta);
    let list = source
        .private
        .iter()
        .find(|f| f.local_name == "SST-LIST")
        .unwrap_or_else(|| panic!("no list among {:?}", source.private));
    // The key groups of its SST files, from a copy of its stored files.
    let copy = tmp.path().join("copy-of-0");
    std::fs::create_dir_all(&copy).unwrap();
    for f in source.files() {
        let stored = tmp.path().join("store/job-2").join(&f.path);
        std::fs::copy(stored, copy.join(&f.local_name)).unwrap();
    }
    let path_of: BTreeMap<String, String> = source
        .files()
        .map(|f| (f.local_name.clone(), format!("job-2/{}", f.path)))
        .collect();
    let bounds = state_file_bounds(&copy);
    let mut expected: std::collections::BTreeSet<String> = bounds
        .iter()
        .filter(|(_, _, first, last)| fetched(*first, *last))
        .map(|(name, ..)| path_of[name.trim_start_matches('/')].clone())
        .collect();
    assert_eq!(expected.len() * 2, bounds.len(), "{bounds:?}");
    expected.insert(format!("job-2/{}", list.path));
    let (gated, restore_from) = logged(&store, &meta);
    let all = path_of.values().cloned().collect();
    let alone = restore_subtask(&tmp.path().join("alone"), &restore_from, subtask).await;
    assert_eq!(read_of(&gated, &all), expected);
    drop(alone);
    let restored = restore_three(&tmp.path().join("at-three"), &restore_from).await;
    check(&restored, &model, "2->3, fetched in part");
    checkpoint_at_three_restores_at_two(tmp.path(), restored, &model, "2->3->2").await;
}

/// A rescale fetches, of a source whose key groups it takes in part, only the SST files
/// that may hold keys of its new range, as the list of files the snapshot carries
/// describes them: not the others, nor the source's MANIFEST (it is never opened). New
/// subtask 1 of 3 needs, of old subtask 0, the files from [`SPLIT`] on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescale_fetches_of_another_source_only_the_files_it_ingests() {
    fetches_of_old_subtask_zero(1, |first, _| first >= SPLIT).await;
}

/// From a store other than local files, a rescale fetches of no source more than the
/// SST files that may hold keys of its new range, also of the source sharing the most
/// key groups with it when a quarter of that source lies outside the range (it is then
/// not opened as stored, so neither its files outside the range nor its MANIFEST are
/// needed). New subtask 0 of 3 needs, of old subtask 0 (its only source, a third of
/// which lies above its range), the files below [`SPLIT`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescale_fetches_of_its_largest_source_only_the_files_it_ingests() {
    fetches_of_old_subtask_zero(0, |_, last| last < SPLIT).await;
}

/// From a store other than local files, a rescale whose largest source would leave
/// little out (here nothing: new subtask 2 of 3 needs every file of old subtask 1) opens
/// it as a base, fetched whole with its MANIFEST, rather than ingest and sync all of it.
/// The data is the model's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescale_opens_as_its_base_a_source_it_needs_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, store, meta) = checkpoint_at_two_in_halves(tmp.path()).await;
    let one = meta
        .handles()
        .map(|(_, h)| h)
        .find(|h| h.key_group_range.start() > 0)
        .unwrap()
        .clone();
    let all: std::collections::BTreeSet<String> =
        one.files().map(|f| format!("job-2/{}", f.path)).collect();
    let (gated, source) = logged(&store, &meta);
    let alone = restore_subtask(&tmp.path().join("alone"), &source, 2).await;
    let read = read_of(&gated, &all);
    // Every file, the list included (read to decide).
    assert_eq!(read, all);
    assert!(read.iter().any(|p| p.contains("/MANIFEST-")), "{read:?}");
    drop(alone);
    let restored = restore_three(&tmp.path().join("at-three"), &source).await;
    check(&restored, &model, "2->3, a base where nothing is left out");
}

/// `rockstate_restore_bytes_total` of one restore (the counter, recorded on this thread).
#[derive(Default)]
struct RestoreBytes(Arc<std::sync::atomic::AtomicU64>);

impl metrics::CounterFn for RestoreBytes {
    fn increment(&self, value: u64) {
        self.0
            .fetch_add(value, std::sync::atomic::Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0
            .fetch_max(value, std::sync::atomic::Ordering::Relaxed);
    }
}

impl metrics::Recorder for RestoreBytes {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        if key.name() == "rockstate_restore_bytes_total" {
            metrics::Counter::from_arc(Arc::new(RestoreBytes(self.0.clone())))
        } else {
            metrics::Counter::noop()
        }
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// `rockstate_restore_bytes_total` counts the bytes a restore fetched: of a source it
/// fetches in part, the files it read, not the whole snapshot.
#[test]
fn the_restore_byte_counter_counts_the_bytes_fetched() {
    let tmp = tempfile::tempdir().unwrap();
    // One thread, so that every count of the restore reaches the recorder of this thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (model, store, meta) = rt.block_on(checkpoint_at_two_in_halves(tmp.path()));
    let size_of: BTreeMap<String, u64> = meta
        .operators
        .iter()
        .flat_map(|o| &o.subtasks)
        .filter_map(|s| match &s.keyed {
            Some(rockstate::KeyedSnapshot::Files(h)) => Some(h),
            _ => None,
        })
        .flat_map(|h| h.files())
        .map(|f| (format!("job-2/{}", f.path), f.size))
        .collect();
    let all = size_of.keys().cloned().collect();
    let (gated, source) = logged(&store, &meta);
    let recorder = RestoreBytes::default();
    let restored = metrics::with_local_recorder(&recorder, || {
        rt.block_on(restore_subtask(&tmp.path().join("alone"), &source, 1))
    });
    let fetched: u64 = read_of(&gated, &all).iter().map(|p| size_of[p]).sum();
    let whole: u64 = size_of.values().sum();
    assert!(fetched < whole, "fetched {fetched} of {whole}");
    assert_eq!(
        recorder.0.load(std::sync::atomic::Ordering::Relaxed),
        fetched
    );
    let restore_at_three = |i| {
        let opts = BackendOptions::for_subtask(
            tmp.path().join(format!("at-three/sub-{i}")),
            i,
            3,
            MAX_PAR,
        )
        .unwrap();
        rt.block_on(RocksStateBackend::builder(opts).restore_operator(
            &source,
            UID,
            &RestoreOptions::default(),
        ))
        .unwrap()
    };
    drop(restored);
    let restored: Vec<_> = (0..3).map(restore_at_three).collect();
    check(&restored, &model, "2->3 on one thread");
}

/// Calls `f` with every file snapshot's handle in `meta`.
fn each_file_handle(
    meta: &mut CheckpointMetadata,
    mut f: impl FnMut(&mut rockstate::KeyedStateHandle),
) {
    for operator in &mut meta.operators {
        for subtask in &mut operator.subtasks {
            if let Some(rockstate::KeyedSnapshot::Files(h)) = &mut subtask.keyed {
                f(h);
            }
        }
    }
}

/// A snapshot without a list of its files (taken before snapshots carried one) still
/// rescales by ingestion: every file of the other source is fetched, and its files are
/// listed from its MANIFEST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_without_a_list_of_its_files_rescales() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, store, mut meta) = checkpoint_at_two_in_halves(tmp.path()).await;
    each_file_handle(&mut meta, |h| {
        let before = h.private.len();
        h.private.retain(|f| f.local_name != "SST-LIST");
        assert_eq!(h.private.len() + 1, before);
    });
    let other: std::collections::BTreeSet<String> = old_subtask_zero(&meta)
        .files()
        .map(|f| format!("job-2/{}", f.path))
        .collect();
    let (gated, source) = logged(&store, &meta);
    let alone = restore_subtask(&tmp.path().join("alone"), &source, 1).await;
    assert_eq!(read_of(&gated, &other), other);
    drop(alone);
    let restored = restore_three(&tmp.path().join("at-three"), &source).await;
    check(&restored, &model, "2->3 without lists");
}

/// A list of files whose recorded size is beyond any real list (the handle is data from
/// storage, and a rescale holds the list in memory) is not fetched: every file of the
/// other source is, and the data is the model's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_recorded_larger_than_any_list_is_not_fetched() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, store, mut meta) = checkpoint_at_two_in_halves(tmp.path()).await;
    each_file_handle(&mut meta, |h| {
        let list = h.private.iter_mut().find(|f| f.local_name == "SST-LIST");
        list.unwrap().size = 1 << 40;
    });
    let other = old_subtask_zero(&meta);
    let files: std::collections::BTreeSet<String> = other
        .files()
        .filter(|f| f.local_name != "SST-LIST")
        .map(|f| format!("job-2/{}", f.path))
        .collect();
    let list = other
        .files()
        .find(|f| f.local_name == "SST-LIST")
        .map(|f| format!("job-2/{}", f.path))
        .unwrap();
    let (gated, source) = logged(&store, &meta);
    let alone = restore_subtask(&tmp.path().join("alone"), &source, 1).await;
    let all = files.iter().cloned().chain([list]).collect();
    assert_eq!(read_of(&gated, &all), files);
    drop(alone);
    let restored = restore_three(&tmp.path().join("at-three"), &source).await;
    check(&restored, &model, "2->3, list too large");
}

/// A source fetched in part whose ingestion is refused is iterated instead: the rest of
/// its files is fetched first, and the data is the model's. The runtime has one
/// blocking thread, which the fetch must not wait for.
#[test]
fn a_source_fetched_in_part_whose_ingestion_is_refused_is_fetched_whole_and_iterated() {
    use rockstate::testing::checks::refuse_ingestions;
    let runtime = one_blocking_thread();
    let tmp = tempfile::tempdir().unwrap();
    let refused = tmp.path().join("at-three").join("sub-1");
    let outcome = runtime.block_on(async {
        let (model, store, meta) = checkpoint_at_two_in_halves(tmp.path()).await;
        let other: std::collections::BTreeSet<String> = old_subtask_zero(&meta)
            .files()
            .map(|f| format!("job-2/{}", f.path))
            .collect();
        let (gated, source) = logged(&store, &meta);
        refuse_ingestions(&refused, true);
        let root = tmp.path().join("at-three");
        let one =
            tokio::time::timeout(Duration::from_secs(120), restore_subtask(&root, &source, 1))
                .await
                .map_err(|_| "the rescale did not complete")?;
        refuse_ingestions(&refused, false);
        // Subtask 1 read all of the other source: its list, and then every other file.
        assert_eq!(read_of(&gated, &other), other);
        let restored = vec![
            restore_subtask(&root, &source, 0).await,
            one,
            restore_subtask(&root, &source, 2).await,
        ];
        check(&restored, &model, "2->3, ingestion refused");
        drop(restored);
        Ok::<_, &str>(())
    });
    refuse_ingestions(&refused, false);
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome.unwrap();
}

/// How often `gated` was asked to read each stored SST file.
fn sst_reads(gated: &rockstate::testing::GatedStore) -> BTreeMap<String, usize> {
    let mut reads = BTreeMap::new();
    for r in gated.requests() {
        if r.op == rockstate::testing::Op::Get && r.path.ends_with(".sst") {
            *reads.entry(r.path).or_insert(0) += 1;
        }
    }
    reads
}

/// The stored SST files `gated` was asked to read more than once.
fn read_again(gated: &rockstate::testing::GatedStore) -> Vec<(String, usize)> {
    sst_reads(gated)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect()
}

/// Restores every subtask of 3 from `source` into `root`, side by side on tasks of their
/// own, as a runtime does.
async fn restore_three_side_by_side(
    root: &Path,
    source: Arc<RestoreSource>,
) -> Vec<RocksStateBackend> {
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let (source, root) = (source.clone(), root.to_path_buf());
            tokio::spawn(async move { restore_subtask(&root, &source, i).await })
        })
        .collect();
    let mut restored = Vec::new();
    for task in tasks {
        restored.push(task.await.unwrap());
    }
    restored
}

/// The new subtasks of a rescale that one process restores from one source, from a store
/// other than local files, fetch each stored SST file once: a file several of them need
/// (here the 2->3 of a checkpoint taken at 2 after 4->2, where the new outer subtasks
/// open their source as stored and the middle one ingests parts of both) is fetched by
/// the first that needs it and linked by the others, whether they restore one after the
/// other or side by side. (Compactions stay held, so that no restored database has
/// removed a file before another needs it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_subtasks_restored_from_one_source_fetch_each_stored_file_once() {
    use rockstate::testing::checks::refuse_compaction_resumes;
    let (tmp, store, at_two, model, _) = at_two_in_memory("fetched-once").await;
    let held = tmp.path().join("held");
    refuse_compaction_resumes(&held, true);

    let (gated, source) = logged(&store, at_two.metadata());
    let (restored_before, _) = rockstate::storage::transfer_totals();
    let fetched_before = rockstate::storage::fetched_total();
    let restored = restore_three(&held.join("in-turn"), &source).await;
    let restored_bytes = rockstate::storage::transfer_totals().0 - restored_before;
    let fetched_bytes = rockstate::storage::fetched_total() - fetched_before;
    check(&restored, &model, "2->3 in turn, files shared");
    drop(restored);
    let reads = sst_reads(&gated);
    assert!(reads.len() >= 4, "{reads:?}");
    let again = read_again(&gated);
    assert!(
        again.is_empty(),
        "fetched more than once in turn: {again:?}"
    );
    // The bytes counted as read from storage are those of the files requested; the
    // links count as restored only. (The counters are the process's: `make test` runs
    // every test in a process of its own.)
    let sizes: BTreeMap<String, u64> = at_two
        .metadata()
        .handles()
        .flat_map(|(_, h)| h.files())
        .map(|f| (format!("job-2/{}", f.path), f.size))
        .collect();
    let requested: u64 = gated
        .requests()
        .iter()
        .filter(|r| r.op == rockstate::testing::Op::Get)
        .filter_map(|r| sizes.get(&r.path))
        .sum();
    assert_eq!(fetched_bytes, requested);
    assert!(
        restored_bytes > fetched_bytes,
        "{restored_bytes} {fetched_bytes}"
    );

    let (gated, source) = logged(&store, at_two.metadata());
    let restored = restore_three_side_by_side(&held.join("side-by-side"), Arc::new(source)).await;
    check(&restored, &model, "2->3 side by side, files shared");
    drop(restored);
    let again = read_again(&gated);
    assert!(
        again.is_empty(),
        "fetched more than once side by side: {again:?}"
    );
    refuse_compaction_resumes(&held, false);
}

/// A file an earlier restore of the source fetched is fetched again when its copy is
/// gone (the earlier restore's directory removed) or no longer the file checked (another
/// file now under its name): the later restores succeed with the model's data, and no
/// copy is taken on trust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_copy_that_is_gone_or_replaced_is_fetched_again() {
    use rockstate::testing::checks::refuse_compaction_resumes;
    let (tmp, store, at_two, model, _) = at_two_in_memory("copy-gone").await;
    let held = tmp.path().join("held");
    refuse_compaction_resumes(&held, true);
    let (gated, source) = logged(&store, at_two.metadata());
    // New subtask 0 opens old subtask 0 as stored: every file of it lies in its directory
    // under its stored name.
    let first = restore_subtask(&held.join("first"), &source, 0).await;
    let dir = first.local_dir().to_path_buf();
    first.close().unwrap();
    let old_zero = old_subtask_zero(at_two.metadata());
    // Its copies of stored files (not the file its range deletions were flushed to).
    let ssts: Vec<(std::path::PathBuf, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            let stored = old_zero
                .files()
                .find(|f| f.local_name == name && name.ends_with(".sst"))?;
            Some((p, format!("job-2/{}", stored.path)))
        })
        .collect();
    assert!(ssts.len() >= 2, "{ssts:?}");
    // One copy replaced by another file of the same size, the others removed.
    let ((replaced, _), removed) = ssts.split_first().unwrap();
    let size = std::fs::metadata(replaced).unwrap().len() as usize;
    std::fs::remove_file(replaced).unwrap();
    std::fs::write(replaced, vec![7u8; size]).unwrap();
    for (path, _) in removed {
        std::fs::remove_file(path).unwrap();
    }
    let before = sst_reads(&gated);
    let restored = vec![
        restore_subtask(&held.join("again"), &source, 0).await,
        restore_subtask(&held.join("again"), &source, 1).await,
        restore_subtask(&held.join("again"), &source, 2).await,
    ];
    check(&restored, &model, "2->3 after the copies went");
    let after = sst_reads(&gated);
    for (_, stored) in &ssts {
        assert_eq!(before.get(stored), Some(&1), "{stored}: {before:?}");
        assert!(
            after.get(stored).copied().unwrap_or(0) > 1,
            "{stored} was not fetched again: {after:?}"
        );
    }
    refuse_compaction_resumes(&held, false);
}

/// The largest source's list decides whether a rescale opens a base, not another
/// source's. In a checkpoint taken at 2 after 4->2 whose subtask 1 was then compacted
/// into files spanning its whole range, new subtask 1 of 3 (key groups 43..=85) needs
/// every file of its largest source, old subtask 1, and opens it as stored (it reads its
/// MANIFEST), although the list of old subtask 0, still in halves, would leave out a
/// quarter of that source's bytes (`subtask_one_of_three_opens_no_base` without the
/// compaction). Every new subtask holds the model's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_sources_list_decides_whether_a_rescale_opens_a_base() {
    let tmp = tempfile::tempdir().unwrap();
    let store = CheckpointStorage::open("memory://largest-decides").unwrap();
    let (source, model, _) = prepare_in(&store, tmp.path(), 4, None).await;
    // Old subtask 0 stays in halves: its compactions are held until its snapshot.
    let zero = tmp.path().join("at-two").join("new-2-0");
    rockstate::testing::checks::refuse_compaction_resumes(&zero, true);
    let two = restore_all(
        &source,
        &tmp.path().join("at-two"),
        2,
        &RestoreOptions::default(),
    )
    .await
    .unwrap();
    rockstate::testing::checks::compact_states(&two[1]);
    let below: Vec<_> = state_file_bounds(&zero)
        .into_iter()
        .filter(|(_, _, _, last)| *last < 43)
        .collect();
    assert!(!below.is_empty(), "no file of old subtask 0 lies below 43");
    rockstate::testing::checks::refuse_compaction_resumes(&zero, false);
    let (job, mut coordinator) = coordinated(&store, "job-2", 2).await;
    let (at_two, _) = snapshot(&mut coordinator, &two, &job, &job, None).await;
    drop(two);
    let manifest_of = |start: u16| {
        let handle = old_subtask_from(at_two.metadata(), start);
        let manifest = handle
            .files()
            .find(|f| f.local_name.starts_with("MANIFEST-"))
            .unwrap();
        format!("job-2/{}", manifest.path)
    };
    let (gated, source) = logged(&store, at_two.metadata());
    let alone_root = tmp.path().join("alone");
    rockstate::testing::checks::watch_scratch_closes(&alone_root);
    let alone = restore_subtask(&alone_root, &source, 1).await;
    drop(alone);
    // Opened as stored, not read into a new database after a refused ingestion (which
    // reads the source's MANIFEST too, from a copy closed as scratch).
    let scratch = rockstate::testing::checks::scratch_closes_under(&alone_root);
    assert!(scratch.is_empty(), "sources iterated: {scratch:?}");
    let read: Vec<String> = gated
        .requests()
        .into_iter()
        .filter(|r| r.op == rockstate::testing::Op::Get && r.path.contains("/MANIFEST-"))
        .map(|r| r.path)
        .collect();
    assert_eq!(read, vec![manifest_of(64)], "old subtask 1 is the base");
    let restored = restore_three(&tmp.path().join("at-three"), &source).await;
    check(&restored, &model, "2->3, old subtask 1 compacted");
}

/// The same on S3: a checkpoint taken at 2 after 4->2, restored at 3 side by side as a
/// runtime does (compactions held, as above), fetches each stored SST file once and
/// holds the model's data; a checkpoint of the new subtasks restores at 2 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescale_from_s3_fetches_each_stored_file_once() {
    let server = rockstate::testing::s3::S3Server::start("rockstate-rescale");
    let store = server.storage("checkpoints");
    let tmp = tempfile::tempdir().unwrap();
    let (at_two, model, _) = at_two_after_four(&store, tmp.path()).await;
    // Every request logged (the store is the bucket's: the storage's prefix is added).
    let gated = Arc::new(rockstate::testing::GatedStore::new(store.store().clone()));
    let job = CheckpointStorage::from_store(gated.clone(), "gated://bucket")
        .child("checkpoints")
        .and_then(|c| c.child("job-2"))
        .unwrap();
    let source = Arc::new(RestoreSource::checkpoint(&job, at_two.metadata().clone()));
    let root = tmp.path().join("at-three");
    // Held, so that no restored database compacts a file away before another needs it.
    rockstate::testing::checks::refuse_compaction_resumes(&root, true);
    let restored = restore_three_side_by_side(&root, source).await;
    check(&restored, &model, "2->3 from S3, side by side");
    let again = read_again(&gated);
    assert!(again.is_empty(), "fetched more than once: {again:?}");
    rockstate::testing::checks::refuse_compaction_resumes(&root, false);
    let (job, mut coordinator) = coordinated(&store, "job-3", 3).await;
    let (at_three, _) = snapshot(&mut coordinator, &restored, &job, &job, None).await;
    drop(restored);
    let back = restore_all(
        &at_three,
        &tmp.path().join("back"),
        2,
        &RestoreOptions::default(),
    )
    .await
    .unwrap();
    check(&back, &model, "3->2 from S3");
}

/// A damaged list of a source that is not the largest (same size, another CRC32) does
/// not fail the rescale: the list only spares fetches, so that source is fetched whole
/// and listed from its MANIFEST, every file of it checked as usual. New subtask 1 of 3
/// of the checkpoint of [`at_two_after_four`] ingests old subtask 0 (43..=63 of it) and
/// holds the model's data, as do the other new subtasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_list_of_another_source_fetches_that_source_whole() {
    let (tmp, store, at_two, model, job) = at_two_in_memory("damaged-other-list").await;
    let other = old_subtask_zero(at_two.metadata());
    let list = other
        .private
        .iter()
        .find(|f| f.local_name == "SST-LIST")
        .unwrap();
    let mut bytes = job
        .read_small(&list.path, list.size)
        .await
        .unwrap()
        .to_vec();
    bytes[0] ^= 0x5a;
    job.put(&list.path, bytes.into()).await.unwrap();
    let (gated, source) = logged(&store, at_two.metadata());
    let restored = restore_three(&tmp.path().join("at-three"), &source).await;
    check(&restored, &model, "2->3, another source's list damaged");
    // Old subtask 0 was read through its MANIFEST, fetched whole.
    let manifest = other
        .files()
        .find(|f| f.local_name.starts_with("MANIFEST-"))
        .unwrap();
    let reads = gated.requests();
    assert!(
        reads
            .iter()
            .any(|r| r.op == rockstate::testing::Op::Get
                && r.path == format!("job-2/{}", manifest.path)),
        "old subtask 0 was not fetched whole"
    );
}
