//! Real snapshots for the hostile-input tests: a checkpoint, canonical savepoints (plain
//! and LZ4 blocks) and a native savepoint of the same state, taken by real backends.

use std::path::{Path, PathBuf};

use rockstate::checkpoint::{
    AckOutcome, CheckpointCoordinator, CoordinatorOptions, OperatorSpec, OperatorState,
    Redistribution,
};
use rockstate::savepoint::Compression;
use rockstate::{
    BackendOptions, CheckpointMetadata, CheckpointStorage, ErrorKind, KeyedStateHandle,
    ListStateDescriptor, MapStateDescriptor, RocksStateBackend, SavepointFormat, SubtaskSnapshot,
    ValueStateDescriptor,
};

// ---------------------------------------------------------------------------------------
// Real snapshots.

pub const UID: &str = "counter";
pub const SOURCE_UID: &str = "source";
pub const MAX_PAR: u32 = 16;
pub const KEYS: u32 = 40;

pub fn specs(p: u32) -> Vec<OperatorSpec> {
    [UID, SOURCE_UID]
        .iter()
        .map(|uid| OperatorSpec {
            uid: uid.to_string(),
            parallelism: p,
            max_parallelism: MAX_PAR,
        })
        .collect()
}

pub fn fill(backend: &RocksStateBackend, subtask: u32, p: u32, round: u64) {
    let rockstate::testing::fixtures::DemoStates {
        count,
        recent,
        histogram: hist,
    } = rockstate::testing::fixtures::DemoStates::register(backend);
    for key in 0..KEYS {
        if rockstate::subtask_for_key(&key, p, MAX_PAR).unwrap() != subtask {
            continue;
        }
        if round > 0 && key % 3 != 0 {
            continue;
        }
        count.put(&key, &(u64::from(key) * 3 + round)).unwrap();
        recent.add(&key, &format!("r{key}-{round}")).unwrap();
        hist.put(&key, &(key as u8 % 4), &u64::from(key)).unwrap();
    }
}

/// Reads every state of `backend` through its typed handles. Damaged entries may fail
/// with a typed error; nothing may panic.
pub fn read_back(backend: &RocksStateBackend, subtask: u32, p: u32) -> Vec<rockstate::Error> {
    let mut errors = Vec::new();
    let mut keep = |r: rockstate::Result<()>| {
        if let Err(e) = r {
            errors.push(e);
        }
    };
    let count = backend.register(ValueStateDescriptor::<u32, u64>::new("count"));
    let recent = backend.register(ListStateDescriptor::<u32, String>::new("recent"));
    let hist = backend.register(MapStateDescriptor::<u32, u8, u64>::new("histogram"));
    match count {
        Ok(count) => keep((|| {
            for key in count.all_keys()? {
                let (key, ()) = key?;
                count.get(&key)?;
            }
            Ok(())
        })()),
        Err(e) => keep(Err(e)),
    }
    match recent {
        Ok(recent) => keep((|| {
            for key in recent.all_keys()? {
                let (key, ()) = key?;
                recent.get(&key)?;
            }
            Ok(())
        })()),
        Err(e) => keep(Err(e)),
    }
    match hist {
        Ok(hist) => keep((|| {
            for key in hist.all_keys()? {
                let (key, ()) = key?;
                for entry in hist.iter(&key)? {
                    entry?;
                }
            }
            Ok(())
        })()),
        Err(e) => keep(Err(e)),
    }
    for key in 0..KEYS {
        if rockstate::subtask_for_key(&key, p, MAX_PAR).unwrap() != subtask {
            continue;
        }
        keep(
            backend
                .register(ValueStateDescriptor::<u32, u64>::new("count"))
                .and_then(|s| s.get(&key).map(drop)),
        );
    }
    keep(backend.for_each_entry(|_, _, _| {}));
    errors
}

/// A job with real snapshots in a local directory:
/// `<root>/store/job` (checkpoints) and `<root>/store/savepoints`.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub job: CheckpointStorage,
    pub savepoints: CheckpointStorage,
    /// The retained checkpoint: shared files of two checkpoints, private files, and
    /// operator state of a second operator.
    pub checkpoint_id: u64,
    pub checkpoint: Vec<u8>,
    /// Its subtask 0 handle.
    pub handle: KeyedStateHandle,
    /// A canonical savepoint with uncompressed blocks: its folder and `_metadata`.
    pub plain_folder: CheckpointStorage,
    pub plain: Vec<u8>,
    /// A canonical savepoint with LZ4 blocks.
    pub lz4_folder: CheckpointStorage,
    pub lz4: Vec<u8>,
    /// The `_metadata` of a native savepoint.
    pub native: Vec<u8>,
}

impl Fixture {
    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    pub fn decoded(bytes: &[u8]) -> CheckpointMetadata {
        CheckpointMetadata::decode(bytes, "fixture").unwrap()
    }

    /// The data file of subtask 0 of a canonical savepoint: relative path and bytes.
    pub fn data_file(folder: &CheckpointStorage, meta: &[u8]) -> (String, Vec<u8>) {
        let meta = Self::decoded(meta);
        let (_, keyed) = meta.keyed().next().unwrap();
        let rel = keyed.files()[0].path.clone();
        (rel.clone(), std::fs::read(local(folder).join(rel)).unwrap())
    }
}

pub fn local(storage: &CheckpointStorage) -> PathBuf {
    storage.local_dir().expect("a local storage").to_path_buf()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub struct Live {
    pub coordinator: CheckpointCoordinator,
    pub backends: Vec<RocksStateBackend>,
    pub job: CheckpointStorage,
}

impl Live {
    pub async fn take(
        &mut self,
        savepoint: Option<(&CheckpointStorage, SavepointFormat, Compression)>,
    ) -> (u64, Option<CheckpointStorage>, Vec<u8>) {
        let (id, folder) = match savepoint {
            Some((dir, format, _)) => {
                let t = self
                    .coordinator
                    .trigger_savepoint(Some(dir), format)
                    .unwrap();
                (t.checkpoint_id, Some(t.folder))
            }
            None => (self.coordinator.trigger().unwrap(), None),
        };
        let mut outcome = None;
        for (i, b) in self.backends.iter().enumerate() {
            let i = i as u32;
            let pending = b.snapshot(id).unwrap();
            let keyed = match (&folder, savepoint) {
                (Some(f), Some((_, format, compression))) => pending
                    .write_savepoint(f, UID, i, format, compression)
                    .await
                    .unwrap(),
                _ => pending.upload(&self.job, UID, i).await.unwrap().into(),
            };
            let keyed = SubtaskSnapshot {
                keyed: Some(keyed),
                ..Default::default()
            };
            self.coordinator
                .acknowledge(id, UID, i, keyed)
                .await
                .unwrap();
            let mut operator_state = OperatorState::default();
            operator_state.put(
                "offsets",
                Redistribution::Split,
                vec![vec![i as u8; 3], b"tail".to_vec()],
            );
            operator_state.put("watermarks", Redistribution::Union, vec![vec![7; 8]]);
            let source = SubtaskSnapshot {
                keyed: None,
                operator_state,
            };
            outcome = Some(
                self.coordinator
                    .acknowledge(id, SOURCE_UID, i, source)
                    .await
                    .unwrap(),
            );
        }
        assert!(matches!(outcome, Some(AckOutcome::Completed(_))));
        for b in &self.backends {
            b.notify_checkpoint_complete(id);
        }
        let meta_file = match &folder {
            Some(f) => local(f).join("_metadata"),
            None => local(&self.job).join(format!("chk-{id}/_metadata")),
        };
        (id, folder, std::fs::read(meta_file).unwrap())
    }
}

/// Takes two checkpoints (the second incremental on the first) and three savepoints of a
/// job with `p` subtasks. The backends are closed before returning.
pub async fn fixture(p: u32) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let store = CheckpointStorage::open(root.join("store").to_str().unwrap()).unwrap();
    let job = store.child("job").unwrap();
    let savepoints = store.child("savepoints").unwrap();
    let coordinator =
        CheckpointCoordinator::start(job.clone(), "job", specs(p), CoordinatorOptions::default())
            .await
            .unwrap();
    let backends = (0..p)
        .map(|i| {
            let o = BackendOptions::for_subtask(root.join(format!("local-{i}")), i, p, MAX_PAR)
                .unwrap();
            let b = RocksStateBackend::open(o).unwrap();
            fill(&b, i, p, 0);
            b
        })
        .collect();
    let mut live = Live {
        coordinator,
        backends,
        job: job.clone(),
    };
    live.take(None).await;
    for (i, b) in live.backends.iter().enumerate() {
        fill(b, i as u32, p, 1);
    }
    let (checkpoint_id, _, checkpoint) = live.take(None).await;
    let (_, plain_folder, plain) = live
        .take(Some((
            &savepoints,
            SavepointFormat::Canonical,
            Compression::None,
        )))
        .await;
    let (_, lz4_folder, lz4) = live
        .take(Some((
            &savepoints,
            SavepointFormat::Canonical,
            Compression::Lz4,
        )))
        .await;
    let (_, _, native) = live
        .take(Some((
            &savepoints,
            SavepointFormat::Native,
            Compression::Lz4,
        )))
        .await;
    for b in live.backends.drain(..) {
        b.close().unwrap();
    }
    let handle = Fixture::decoded(&checkpoint)
        .handles()
        .next()
        .unwrap()
        .1
        .clone();
    Fixture {
        tmp,
        job,
        savepoints,
        checkpoint_id,
        checkpoint,
        handle,
        plain_folder: plain_folder.unwrap(),
        plain,
        lz4_folder: lz4_folder.unwrap(),
        lz4,
        native,
    }
}

/// Whether `path` is a plain relative path inside its root, checked independently of the
/// crate: no absolute path, no empty, `.` or `..` segment, no backslash or control
/// character.
pub fn is_inside_root(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path.split('/').all(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.len() <= 255
                && !s.chars().any(|c| c == '\\' || c.is_control())
        })
}

pub fn is_typed(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Corrupt
            | ErrorKind::Incompatible
            | ErrorKind::InvalidArgument
            | ErrorKind::NotFound
    )
}
