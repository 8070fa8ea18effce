//! Savepoint operations and the canonical format: trigger, dispose, retention, damaged
//! files, and a savepoint checked into `fixtures/` that must keep restoring.

use std::path::{Path, PathBuf};

use rockstate::checkpoint::{AckOutcome, CheckpointCoordinator, CoordinatorOptions, OperatorSpec};
use rockstate::savepoint::canonical::DataFileReader;
use rockstate::savepoint::{dispose_savepoint, read_savepoint, Compression};
use rockstate::{
    BackendOptions, CheckpointStorage, ErrorKind, ListStateDescriptor, MapStateDescriptor,
    RestoreOptions, RestoreSource, RocksStateBackend, SavepointFormat, SubtaskSnapshot,
    ValueStateDescriptor,
};

const MAX_PAR: u32 = 16;
const UID: &str = "counter";

fn spec(p: u32) -> Vec<OperatorSpec> {
    vec![OperatorSpec {
        uid: UID.into(),
        parallelism: p,
        max_parallelism: MAX_PAR,
    }]
}

fn fill(backend: &RocksStateBackend, subtask: u32, p: u32) {
    let rockstate::testing::fixtures::DemoStates {
        count,
        recent,
        histogram: hist,
    } = rockstate::testing::fixtures::DemoStates::register(backend);
    for key in 0..40u32 {
        if rockstate::subtask_for_key(&key, p, MAX_PAR).unwrap() != subtask {
            continue;
        }
        count.put(&key, &(u64::from(key) * 3)).unwrap();
        recent.add(&key, &format!("r{key}")).unwrap();
        recent.add(&key, &format!("s{key}")).unwrap();
        hist.put(&key, &(key as u8 % 4), &u64::from(key)).unwrap();
    }
}

/// What `fill` wrote, read back from restored backends.
fn check_filled(backends: &[RocksStateBackend]) {
    let p = backends.len() as u32;
    let mut keys = 0;
    for (i, backend) in backends.iter().enumerate() {
        let count = backend
            .register(ValueStateDescriptor::<u32, u64>::new("count"))
            .unwrap();
        let recent = backend
            .register(ListStateDescriptor::<u32, String>::new("recent"))
            .unwrap();
        let hist = backend
            .register(MapStateDescriptor::<u32, u8, u64>::new("histogram"))
            .unwrap();
        for key in 0..40u32 {
            if rockstate::subtask_for_key(&key, p, MAX_PAR).unwrap() != i as u32 {
                continue;
            }
            keys += 1;
            assert_eq!(count.get(&key).unwrap(), Some(u64::from(key) * 3));
            assert_eq!(
                recent.get(&key).unwrap(),
                vec![format!("r{key}"), format!("s{key}")]
            );
            assert_eq!(
                hist.get(&key, &(key as u8 % 4)).unwrap(),
                Some(u64::from(key))
            );
        }
        assert_eq!(count.all_keys().unwrap().count() as u32, {
            (0..40u32)
                .filter(|k| rockstate::subtask_for_key(k, p, MAX_PAR).unwrap() == i as u32)
                .count() as u32
        });
        assert_eq!(backend.entries_outside_range().unwrap(), 0);
    }
    assert_eq!(keys, 40);
}

struct Job {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    job: CheckpointStorage,
    savepoints: CheckpointStorage,
    coordinator: CheckpointCoordinator,
    backends: Vec<RocksStateBackend>,
}

async fn job(p: u32, options: CoordinatorOptions) -> Job {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let store = CheckpointStorage::open(root.join("store").to_str().unwrap()).unwrap();
    let job = store.child("job").unwrap();
    let savepoints = store.child("savepoints").unwrap();
    let coordinator = CheckpointCoordinator::start(job.clone(), "job", spec(p), options)
        .await
        .unwrap();
    let backends = (0..p)
        .map(|i| {
            let o = BackendOptions::for_subtask(root.join(format!("local-{i}")), i, p, MAX_PAR)
                .unwrap();
            let b = RocksStateBackend::open(o).unwrap();
            fill(&b, i, p);
            b
        })
        .collect();
    Job {
        _tmp: tmp,
        root,
        job,
        savepoints,
        coordinator,
        backends,
    }
}

impl Job {
    /// Takes a checkpoint (`None`) or a savepoint into `dir`.
    async fn take(
        &mut self,
        savepoint: Option<(Option<&CheckpointStorage>, SavepointFormat)>,
    ) -> rockstate::Result<(u64, Option<CheckpointStorage>)> {
        let (id, folder) = match savepoint {
            Some((dir, format)) => {
                let t = self.coordinator.trigger_savepoint(dir, format)?;
                (t.checkpoint_id, Some((t.folder, format)))
            }
            None => (self.coordinator.trigger().unwrap(), None),
        };
        for (i, b) in self.backends.iter().enumerate() {
            let pending = b.snapshot(id)?;
            let keyed = match &folder {
                Some((f, format)) => {
                    pending
                        .write_savepoint(f, UID, i as u32, *format, Compression::Lz4)
                        .await?
                }
                None => pending.upload(&self.job, UID, i as u32).await?.into(),
            };
            let ack = SubtaskSnapshot {
                keyed: Some(keyed),
                ..Default::default()
            };
            let outcome = self.coordinator.acknowledge(id, UID, i as u32, ack).await?;
            if i + 1 == self.backends.len() {
                assert!(matches!(outcome, AckOutcome::Completed(_)));
            }
        }
        for b in &self.backends {
            b.notify_checkpoint_complete(id);
        }
        Ok((id, folder.map(|(f, _)| f)))
    }
}

fn local(storage: &CheckpointStorage) -> PathBuf {
    PathBuf::from(storage.url().trim_start_matches("file://"))
}

async fn restore(
    source: &RestoreSource,
    root: &Path,
    p: u32,
) -> rockstate::Result<Vec<RocksStateBackend>> {
    let mut out = Vec::new();
    for i in 0..p {
        let dir = root.join(format!("restored-{p}-{i}-{:x}", rand::random::<u32>()));
        let o = BackendOptions::for_subtask(dir, i, p, MAX_PAR)?;
        out.push(
            RocksStateBackend::builder(o)
                .restore_operator(source, UID, &RestoreOptions::default())
                .await?,
        );
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_need_a_directory_and_survive_retention() {
    let mut j = job(2, CoordinatorOptions::default()).await;
    let err = j
        .coordinator
        .trigger_savepoint(None, SavepointFormat::Canonical)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("savepoint"), "{err}");

    let (_, folder) = j
        .take(Some((
            Some(&j.savepoints.clone()),
            SavepointFormat::Canonical,
        )))
        .await
        .unwrap();
    let folder = folder.unwrap();
    // Checkpoints after it subsume one another; the savepoint stays.
    for _ in 0..3 {
        j.take(None).await.unwrap();
    }
    let source = RestoreSource::open_folder(&folder).await.unwrap();
    assert_eq!(
        source.metadata().kind,
        rockstate::checkpoint::SnapshotKind::SavepointCanonical
    );
    // Self-contained: nothing under the job directory.
    for (_, keyed) in source.metadata().keyed() {
        for f in keyed.files() {
            assert!(local(&folder).join(&f.path).exists());
        }
    }
    check_filled(&restore(&source, &j.root, 3).await.unwrap());

    // The configured directory is used when none is given.
    let mut configured = job(
        1,
        CoordinatorOptions {
            savepoints_dir: Some(local(&j.savepoints).display().to_string()),
            ..Default::default()
        },
    )
    .await;
    let (_, folder) = configured
        .take(Some((None, SavepointFormat::Native)))
        .await
        .unwrap();
    assert!(local(&folder.unwrap()).starts_with(local(&j.savepoints)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispose_deletes_the_savepoint_folder_and_nothing_else() {
    let mut j = job(2, CoordinatorOptions::default()).await;
    let sp = j.savepoints.clone();
    let (_, a) = j
        .take(Some((Some(&sp), SavepointFormat::Native)))
        .await
        .unwrap();
    let (_, b) = j
        .take(Some((Some(&sp), SavepointFormat::Canonical)))
        .await
        .unwrap();
    let (checkpoint, _) = j.take(None).await.unwrap();
    let (a, b) = (a.unwrap(), b.unwrap());
    std::fs::write(local(&sp).join("unrelated.txt"), b"keep").unwrap();

    dispose_savepoint(&a).await.unwrap();
    assert!(!local(&a).join("_metadata").exists());
    assert!(
        a.list("").await.unwrap().is_empty(),
        "files left in {}",
        a.url()
    );
    read_savepoint(&b).await.unwrap();
    assert!(local(&sp).join("unrelated.txt").exists());

    // A checkpoint folder or a folder without _metadata is refused and left alone.
    let chk = j.job.child(&format!("chk-{checkpoint}")).unwrap();
    let err = dispose_savepoint(&chk).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(local(&chk).join("_metadata").exists());
    let err = dispose_savepoint(&sp).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(local(&sp).join("unrelated.txt").exists());
}

/// Every kind of damage to a canonical data file is a typed error naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_canonical_files_are_typed_errors() {
    let mut j = job(2, CoordinatorOptions::default()).await;
    let sp = j.savepoints.clone();
    let (_, folder) = j
        .take(Some((Some(&sp), SavepointFormat::Canonical)))
        .await
        .unwrap();
    let folder = folder.unwrap();
    let source = RestoreSource::open_folder(&folder).await.unwrap();
    let (_, keyed) = source.metadata().keyed().next().unwrap();
    let rel = keyed.files()[0].path.clone();
    let file = local(&folder).join(&rel);
    let original = std::fs::read(&file).unwrap();
    let reader = DataFileReader::open(&folder, &rel, original.len() as u64)
        .await
        .unwrap();
    let header_end = reader.sections()[0].offset as usize;
    let busy = reader
        .sections()
        .iter()
        .position(|s| s.len > 0)
        .expect("a non-empty section");
    let section = reader.sections()[busy];

    let mut cases: Vec<(&str, Vec<u8>, ErrorKind)> = Vec::new();
    let mut flipped = original.clone();
    flipped[(section.offset + section.len / 2) as usize] ^= 0x40;
    cases.push(("flipped section byte", flipped, ErrorKind::Corrupt));
    let mut header = original.clone();
    header[header_end - 6] ^= 0x01;
    cases.push(("flipped header byte", header, ErrorKind::Corrupt));
    let mut magic = original.clone();
    magic[0] = b'X';
    cases.push(("wrong magic", magic, ErrorKind::Corrupt));
    let mut version = original.clone();
    version[11] = 9;
    cases.push(("unknown version", version, ErrorKind::Incompatible));
    cases.push((
        "truncated",
        original[..original.len() - 10].to_vec(),
        ErrorKind::Corrupt,
    ));
    for (what, bytes, kind) in cases {
        std::fs::write(&file, &bytes).unwrap();
        let err = match restore(&source, &j.root, 2).await {
            Ok(_) => panic!("{what}: restored"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), kind, "{what}: {err}");
        if kind == ErrorKind::Corrupt {
            assert!(err.to_string().contains("state.rkss"), "{what}: {err}");
        }
        // Same-length damage is also caught by a reader that is handed the right size.
        if bytes.len() == original.len() && what == "flipped section byte" {
            let reader = DataFileReader::open(&folder, &rel, bytes.len() as u64)
                .await
                .unwrap();
            let kg = reader.header().key_group_range.start() + busy as u16;
            let err = reader.read_key_group(kg, |_| Ok(())).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt);
            assert!(
                err.to_string().contains(&format!("key group {kg}")),
                "{err}"
            );
        }
    }
    std::fs::write(&file, &original).unwrap();
    check_filled(&restore(&source, &j.root, 1).await.unwrap());
    let leftovers: Vec<_> = std::fs::read_dir(&j.root)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".restoring") || n.contains(".rescale"))
        .collect();
    assert!(leftovers.is_empty(), "failed restores left {leftovers:?}");

    std::fs::remove_file(&file).unwrap();
    let err = restore(&source, &j.root, 2).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let missing = RestoreSource::open(
        j.root
            .join("store/savepoints/savepoint-nothing-here")
            .to_str()
            .unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
}

/// A canonical savepoint written by this version, checked in. Its restore must keep
/// working: changing the format needs a new version and a reader for this one.
/// `ROCKSTATE_BLESS=1` writes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_in_canonical_savepoint_restores() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/savepoint-canonical-v1");
    if std::env::var_os("ROCKSTATE_BLESS").is_some() {
        let mut j = job(2, CoordinatorOptions::default()).await;
        let sp = j.savepoints.clone();
        let (_, folder) = j
            .take(Some((Some(&sp), SavepointFormat::Canonical)))
            .await
            .unwrap();
        let _ = std::fs::remove_dir_all(&fixture);
        std::fs::rename(local(&folder.unwrap()), &fixture).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    // Restore from a copy: restoring never writes into the savepoint, but the fixture
    // must stay pristine whatever happens.
    let copy = tmp.path().join("copied-savepoint");
    copy_dir(&fixture, &copy);
    let source = RestoreSource::open(copy.to_str().unwrap()).await.unwrap();
    assert_eq!(source.metadata().checkpoint_id, 1);
    for p in [1, 2, 3] {
        check_filled(&restore(&source, tmp.path(), p).await.unwrap());
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Savepoints made from a completed checkpoint (what the timely adapter does for a
/// savepoint asked of a running job), in both formats, and from a damaged checkpoint.
///
/// Proves: the savepoint holds the checkpoint's state and restores at another
/// parallelism; the scratch directory is left empty; a checkpoint with a missing file
/// gives `NotFound` naming it, and leaves no savepoint folder behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_made_from_a_checkpoint_restore_anywhere() {
    use rockstate::runtime::savepoint_from_snapshot;
    let mut j = job(2, CoordinatorOptions::default()).await;
    let (id, _) = j.take(None).await.unwrap();
    let source = RestoreSource::open_folder(&j.job.child(&format!("chk-{id}")).unwrap())
        .await
        .unwrap();
    let scratch = j.root.join("scratch");
    for (format, p) in [
        (SavepointFormat::Canonical, 3),
        (SavepointFormat::Native, 1),
    ] {
        let (folder, meta) =
            savepoint_from_snapshot(&source, &j.savepoints, "job", format, &scratch, 16 << 20)
                .await
                .unwrap();
        assert!(meta.is_savepoint());
        assert_eq!(meta.checkpoint_id, id);
        assert_eq!(read_savepoint(&folder).await.unwrap(), meta);
        // The operator state (source positions) is carried over unchanged.
        for (op, original) in meta.operators.iter().zip(&source.metadata().operators) {
            for (a, b) in op.subtasks.iter().zip(&original.subtasks) {
                assert_eq!(a.operator_state, b.operator_state);
            }
        }
        let restored = restore(
            &RestoreSource::open_folder(&folder).await.unwrap(),
            &j.root,
            p,
        )
        .await
        .unwrap();
        check_filled(&restored);
        assert!(
            std::fs::read_dir(&scratch).map_or(true, |mut d| d.next().is_none()),
            "scratch space left behind"
        );
    }
    let folders_before = j.savepoints.list_dirs("").await.unwrap();

    // A shared file of the checkpoint goes missing.
    let shared = source.metadata().handles().next().unwrap().1.shared[0]
        .path
        .clone();
    std::fs::remove_file(local(&j.job).join(&shared)).unwrap();
    let e = savepoint_from_snapshot(
        &source,
        &j.savepoints,
        "job",
        SavepointFormat::Canonical,
        &scratch,
        16 << 20,
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains(&shared), "{e}");
    let folders_after = j.savepoints.list_dirs("").await.unwrap();
    let left: Vec<_> = folders_after
        .iter()
        .filter(|f| !folders_before.contains(f))
        .collect();
    for folder in left {
        let files = j.savepoints.child(folder).unwrap().list("").await.unwrap();
        assert!(files.is_empty(), "{folder} keeps {files:?}");
    }
}

/// Reading snapshots offline: a canonical savepoint, a native one and a checkpoint of a
/// job at parallelism 2 are opened without the job; the keyed state of every key group is
/// read typed through the job's descriptors and raw, and the operator state per subtask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_read_offline_typed_and_raw() {
    use rockstate::restore::SavepointReader;
    let mut j = job(2, CoordinatorOptions::default()).await;
    let dir = j.savepoints.clone();
    let (_, canonical) = j
        .take(Some((Some(&dir), SavepointFormat::Canonical)))
        .await
        .unwrap();
    let (_, native) = j
        .take(Some((Some(&dir), SavepointFormat::Native)))
        .await
        .unwrap();
    let (id, _) = j.take(None).await.unwrap();
    let checkpoint = j.job.url_of(&format!("chk-{id}"));
    let scratch = j.root.join("reader");
    for url in [
        canonical.unwrap().url().to_string(),
        native.unwrap().url().to_string(),
        checkpoint,
    ] {
        let reader = SavepointReader::open(&url, &scratch).await.unwrap();
        assert_eq!(reader.metadata().operators[0].parallelism, 2);
        let e = reader.keyed_state("nope").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains("counter"), "{e}");
        let keyed = reader.keyed_state(UID).await.unwrap();
        let names: Vec<String> = keyed.states().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["count", "histogram", "recent"], "{url}");
        let count = keyed
            .register(ValueStateDescriptor::<u32, u64>::new("count"))
            .unwrap();
        let mut keys = 0;
        for key in count.all_keys().unwrap() {
            let (key, ()) = key.unwrap();
            assert_eq!(count.get(&key).unwrap(), Some(u64::from(key) * 3), "{url}");
            keys += 1;
        }
        assert_eq!(keys, 40, "{url}");
        // Types other than the recorded ones are refused.
        assert_eq!(
            keyed
                .register(ValueStateDescriptor::<String, u64>::new("count"))
                .unwrap_err()
                .kind(),
            ErrorKind::Incompatible
        );
        let mut raw = std::collections::BTreeMap::<String, usize>::new();
        keyed
            .for_each_raw(|state, _, _| *raw.entry(state.to_string()).or_default() += 1)
            .unwrap();
        assert_eq!(raw["count"], 40, "{url}");
        assert_eq!(raw["recent"], 40, "{url}");
        assert_eq!(reader.operator_states(UID).unwrap().len(), 2);
        drop(count);
        keyed.close().unwrap();
    }
    assert!(
        std::fs::read_dir(&scratch).map_or(true, |mut d| d.next().is_none()),
        "the readers' folders are removed"
    );
}

/// A new uid for an operator and a state the program no longer has are explicit steps of
/// a restore, never accidents.
///
/// Proves: a snapshot restored under another uid fails until the operator is renamed on
/// the source (unknown or taken names are refused); after the rename every key restores
/// at another parallelism; a dropped state is gone from the backend and from the next
/// snapshot, the others stay; dropping an unknown state is `NotFound`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_renames_and_state_drops_are_explicit() {
    let mut j = job(2, CoordinatorOptions::default()).await;
    let dir = j.savepoints.clone();
    let (_, folder) = j
        .take(Some((Some(&dir), SavepointFormat::Native)))
        .await
        .unwrap();
    let mut source = RestoreSource::open_folder(&folder.unwrap()).await.unwrap();
    let options = |i: u32| {
        BackendOptions::for_subtask(
            j.root
                .join(format!("renamed-{i}-{:x}", rand::random::<u32>())),
            i,
            3,
            MAX_PAR,
        )
        .unwrap()
    };
    let e = RocksStateBackend::builder(options(0))
        .restore_operator(&source, "renamed", &RestoreOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(
        source.rename_operator("nope", "x").unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        source.rename_operator(UID, UID).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    source.rename_operator(UID, "renamed").unwrap();
    let mut restored = Vec::new();
    for i in 0..3 {
        restored.push(
            RocksStateBackend::builder(options(i))
                .restore_operator(&source, "renamed", &RestoreOptions::default())
                .await
                .unwrap(),
        );
    }
    check_filled(&restored);
    let stale = restored[0]
        .register(MapStateDescriptor::<u32, u8, u64>::new("histogram"))
        .unwrap();
    for backend in &restored {
        assert!(backend.drop_state("histogram").unwrap());
        assert!(!backend.drop_state("histogram").unwrap(), "idempotent");
        let names: Vec<String> = backend.states().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["count", "recent"]);
    }
    // A handle of the dropped state is refused, also once the name is registered again.
    let owned = |subtask: u32| {
        (0..40u32)
            .find(|k| rockstate::subtask_for_key(k, 3, MAX_PAR).unwrap() == subtask)
            .unwrap()
    };
    let k = owned(0);
    let e = stale.get(&k, &0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("dropped"), "{e}");
    let again = restored[0]
        .register(MapStateDescriptor::<u32, u8, u64>::new("histogram"))
        .unwrap();
    assert_eq!(
        again.get(&k, &(k as u8 % 4)).unwrap(),
        None,
        "a new, empty state"
    );
    assert!(
        stale.get(&k, &0).is_err(),
        "still refused after the name came back"
    );
    drop(again);
    restored[0].drop_state("histogram").unwrap();
    let pending = restored[0].snapshot(99).unwrap();
    let keyed = pending
        .write_savepoint(
            &dir.child("after-drop").unwrap(),
            "renamed",
            0,
            SavepointFormat::Canonical,
            Compression::Lz4,
        )
        .await
        .unwrap();
    let names: Vec<&str> = keyed.states().iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["count", "recent"]);
}
