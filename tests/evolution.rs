//! State schema evolution: the recorded structure of state types decides compatibility,
//! declared migrations convert stored values on registration, and state written by an
//! earlier program version (checked in under `fixtures/program-v1`) restores through
//! them, from a checkpoint and from both savepoint formats, at any parallelism.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rockstate::checkpoint::{AckOutcome, CheckpointCoordinator, CoordinatorOptions, OperatorSpec};
use rockstate::savepoint::Compression;
use rockstate::{
    BackendOptions, CheckpointStorage, ErrorKind, ListStateDescriptor, ManualClock,
    MapStateDescriptor, ReducingStateDescriptor, RestoreOptions, RestoreSource, RocksStateBackend,
    SavepointFormat, SubtaskSnapshot, ValueStateDescriptor,
};
use serde::{Deserialize, Serialize};

const MAX_PAR: u32 = 16;
const UID: &str = "counter";

/// The types of the earlier program version.
mod v1 {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Order {
        pub amount: u32,
        pub note: String,
    }
}

/// The current program's order: a field added, one widened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    amount: u64,
    note: String,
    currency: String,
}

fn upgrade(o: v1::Order) -> Order {
    Order {
        amount: u64::from(o.amount) * 100,
        note: o.note,
        currency: "EUR".into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Point {
    x: u32,
    y: u32,
}

/// `Point` with its two fields of one type swapped.
mod swapped {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Point {
        pub y: u32,
        pub x: u32,
    }
}

/// `Point` moved and renamed: the same structure.
mod moved {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Position {
        pub x: u32,
        pub y: u32,
    }
}

fn owned(key: u32, p: u32, subtask: u32) -> bool {
    rockstate::subtask_for_key(&key, p, MAX_PAR).unwrap() == subtask
}

fn backend(dir: &Path, subtask: u32, p: u32) -> RocksStateBackend {
    let o = BackendOptions::for_subtask(
        dir.join(format!("local-{p}-{subtask}")),
        subtask,
        p,
        MAX_PAR,
    )
    .unwrap();
    RocksStateBackend::open(o).unwrap()
}

async fn restore(source: &RestoreSource, root: &Path, p: u32) -> Vec<RocksStateBackend> {
    restore_with(source, root, p, ManualClock::new(0)).await
}

async fn restore_with(
    source: &RestoreSource,
    root: &Path,
    p: u32,
    clock: ManualClock,
) -> Vec<RocksStateBackend> {
    let mut out = Vec::new();
    for i in 0..p {
        let dir = root.join(format!("restored-{p}-{i}-{:x}", rand::random::<u32>()));
        let o = BackendOptions::for_subtask(dir, i, p, MAX_PAR).unwrap();
        out.push(
            RocksStateBackend::builder(o)
                .clock(clock.clone())
                .restore_operator(source, UID, &RestoreOptions::default())
                .await
                .unwrap(),
        );
    }
    out
}

/// A job of `backends.len()` subtasks of operator `UID`, checkpointing into `root/job`.
struct Job {
    job: CheckpointStorage,
    savepoints: CheckpointStorage,
    coordinator: CheckpointCoordinator,
}

impl Job {
    async fn start(root: &Path, p: u32) -> Job {
        let store = CheckpointStorage::open(root.join("store").to_str().unwrap()).unwrap();
        let job = store.child("job").unwrap();
        let spec = vec![OperatorSpec {
            uid: UID.into(),
            parallelism: p,
            max_parallelism: MAX_PAR,
        }];
        let coordinator =
            CheckpointCoordinator::start(job.clone(), "job", spec, CoordinatorOptions::default())
                .await
                .unwrap();
        Job {
            savepoints: store.child("savepoints").unwrap(),
            job,
            coordinator,
        }
    }

    /// A checkpoint (`None`) or a savepoint of `backends`; returns what to restore from
    /// and the metadata.
    async fn take(
        &mut self,
        backends: &[RocksStateBackend],
        savepoint: Option<SavepointFormat>,
    ) -> (RestoreSource, rockstate::CheckpointMetadata) {
        let (id, folder) = match savepoint {
            Some(format) => {
                let t = self
                    .coordinator
                    .trigger_savepoint(Some(&self.savepoints), format)
                    .unwrap();
                (t.checkpoint_id, Some((t.folder, format)))
            }
            None => (self.coordinator.trigger().unwrap(), None),
        };
        let mut done = None;
        for (i, b) in backends.iter().enumerate() {
            let pending = b.snapshot(id).unwrap();
            let keyed = match &folder {
                Some((f, format)) => pending
                    .write_savepoint(f, UID, i as u32, *format, Compression::Lz4)
                    .await
                    .unwrap(),
                None => pending
                    .upload(&self.job, UID, i as u32)
                    .await
                    .unwrap()
                    .into(),
            };
            let ack = SubtaskSnapshot {
                keyed: Some(keyed),
                ..Default::default()
            };
            if let AckOutcome::Completed(meta) = self
                .coordinator
                .acknowledge(id, UID, i as u32, ack)
                .await
                .unwrap()
            {
                done = Some(*meta);
            }
        }
        for b in backends {
            b.notify_checkpoint_complete(id);
        }
        let meta = done.expect("the last acknowledgement completes it");
        let source = match folder {
            Some((f, _)) => RestoreSource::open_folder(&f).await.unwrap(),
            None => RestoreSource::open_folder(&self.job.child(&format!("chk-{id}")).unwrap())
                .await
                .unwrap(),
        };
        (source, meta)
    }
}

/// Swapping two fields of one type changes the structure: registration fails with
/// `Incompatible` naming both structures, before any value is read, on the same backend
/// and after a restore; the stored values are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_fields_of_one_type_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path(), 0, 1);
    let points = b
        .register(ValueStateDescriptor::<u32, Point>::new("points"))
        .unwrap();
    points.put(&1, &Point { x: 1, y: 2 }).unwrap();

    let err = b
        .register(ValueStateDescriptor::<u32, swapped::Point>::new("points"))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("x: u32, y: u32") && text.contains("y: u32, x: u32"),
        "{text}"
    );

    let mut job = Job::start(tmp.path(), 1).await;
    let (source, meta) = job.take(std::slice::from_ref(&b), None).await;
    let recorded = &meta.operators[0].states[0];
    assert_eq!(recorded.value_type.name, "Point");
    assert!(recorded.value_type.schema.is_some());
    let restored = restore(&source, tmp.path(), 1).await;
    let err = restored[0]
        .register(ValueStateDescriptor::<u32, swapped::Point>::new("points"))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible, "{err}");
    let points = restored[0]
        .register(ValueStateDescriptor::<u32, Point>::new("points"))
        .unwrap();
    assert_eq!(points.get(&1).unwrap(), Some(Point { x: 1, y: 2 }));
}

/// Moving a type to another module and renaming it keeps its state: the structure is
/// what counts, not the Rust path. A changed key type is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_and_renamed_type_keeps_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path(), 0, 1);
    let points = b
        .register(ValueStateDescriptor::<u32, Point>::new("points"))
        .unwrap();
    points.put(&7, &Point { x: 3, y: 4 }).unwrap();
    let mut job = Job::start(tmp.path(), 1).await;
    let (source, _) = job
        .take(std::slice::from_ref(&b), Some(SavepointFormat::Canonical))
        .await;
    let mut found = 0;
    for restored in restore(&source, tmp.path(), 2).await {
        let positions = restored
            .register(ValueStateDescriptor::<u32, moved::Position>::new("points"))
            .unwrap();
        if restored
            .key_group_range()
            .contains(rockstate::key_group_for(&7u32, MAX_PAR).unwrap())
        {
            assert_eq!(
                positions.get(&7).unwrap(),
                Some(moved::Position { x: 3, y: 4 })
            );
            found += 1;
        }
        let err = restored
            .register(ValueStateDescriptor::<u64, moved::Position>::new("points"))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Incompatible, "{err}");
    }
    assert_eq!(found, 1, "exactly one subtask owns the key");
}

/// Value, list, map and reducing state migrate on registration: every value converted,
/// write times kept (values expire when they would have), the first checkpoint after it
/// restores at another parallelism with the new types, and the next one is incremental.
/// A conversion that fails leaves the state as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_migrations_convert_every_kind_of_state() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000);
    let p = 2;
    let backends: Vec<RocksStateBackend> = (0..p)
        .map(|i| {
            let o = BackendOptions::for_subtask(tmp.path().join(format!("a-{i}")), i, p, MAX_PAR)
                .unwrap();
            RocksStateBackend::builder(o)
                .clock(clock.clone())
                .open()
                .unwrap()
        })
        .collect();
    let ttl = Duration::from_secs(100);
    for (i, b) in backends.iter().enumerate() {
        let orders = b
            .register(ValueStateDescriptor::<u32, v1::Order>::new("orders").with_ttl(ttl))
            .unwrap();
        let sizes = b
            .register(ListStateDescriptor::<u32, u32>::new("sizes"))
            .unwrap();
        let notes = b
            .register(MapStateDescriptor::<u32, String, u32>::new("notes"))
            .unwrap();
        let totals = b
            .register(ReducingStateDescriptor::<u32, u32>::new(
                "totals",
                |a, b| a + b,
            ))
            .unwrap();
        for key in (0..200u32).filter(|k| owned(*k, p, i as u32)) {
            if key == 5 {
                clock.advance(Duration::from_secs(60));
            }
            orders
                .put(
                    &key,
                    &v1::Order {
                        amount: key,
                        note: format!("n{key}"),
                    },
                )
                .unwrap();
            sizes.add(&key, &key).unwrap();
            sizes.add(&key, &(key + 1)).unwrap();
            notes.put(&key, &format!("a{key}"), &key).unwrap();
            totals.add(&key, key).unwrap();
        }
    }

    // A conversion that fails part-way changes nothing: the state still reads as before.
    let before = backends[0]
        .register(ValueStateDescriptor::<u32, v1::Order>::new("orders").with_ttl(ttl))
        .unwrap();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let err = backends[0]
        .register(
            ValueStateDescriptor::<u32, Order>::new("orders")
                .with_ttl(ttl)
                .with_fallible_migration(1, move |o: v1::Order| {
                    if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 40 {
                        Err(format!("order {} has no currency", o.amount))
                    } else {
                        Ok(upgrade(o))
                    }
                }),
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("has no currency"), "{err}");
    assert!(calls.load(std::sync::atomic::Ordering::SeqCst) > 40);
    // A handle taken before the refused migration still works: nothing changed.
    let first = (0..200u32).find(|k| owned(*k, p, 0)).unwrap();
    assert_eq!(before.get(&first).unwrap().unwrap().amount, first);
    drop(before);
    let old = backends[0]
        .register(ValueStateDescriptor::<u32, v1::Order>::new("orders").with_ttl(ttl))
        .unwrap();
    for key in (0..200u32).filter(|k| owned(*k, p, 0)) {
        assert_eq!(old.get(&key).unwrap().unwrap().amount, key);
    }
    let bad = backends[1]
        .register(
            ValueStateDescriptor::<u32, Order>::new("orders")
                .with_ttl(ttl)
                .with_migration(2, upgrade),
        )
        .unwrap_err();
    assert_eq!(
        bad.kind(),
        ErrorKind::Incompatible,
        "a migration of another version: {bad}"
    );
    let failing = backends[1]
        .register(
            MapStateDescriptor::<u32, String, String>::new("notes")
                .with_migration(1, |_: Vec<u8>| String::new()),
        )
        .unwrap_err();
    assert_eq!(failing.kind(), ErrorKind::Incompatible, "{failing}");

    let mut job = Job::start(tmp.path(), p).await;
    for (i, b) in backends.iter().enumerate() {
        let orders = b
            .register(
                ValueStateDescriptor::<u32, Order>::new("orders")
                    .with_ttl(ttl)
                    .with_migration(1, upgrade),
            )
            .unwrap();
        let sizes = b
            .register(
                ListStateDescriptor::<u32, u64>::new("sizes")
                    .with_migration(1, |v: u32| u64::from(v) << 32),
            )
            .unwrap();
        let notes = b
            .register(
                MapStateDescriptor::<u32, String, i64>::new("notes")
                    .with_migration(1, |v: u32| -i64::from(v)),
            )
            .unwrap();
        let totals = b
            .register(
                ReducingStateDescriptor::<u32, u64>::new("totals", |a, b| a + b)
                    .with_migration(1, |v: u32| u64::from(v)),
            )
            .unwrap();
        let key = (0..200u32).find(|k| owned(*k, p, i as u32)).unwrap();
        assert_eq!(orders.get(&key).unwrap().unwrap().currency, "EUR");
        assert_eq!(sizes.get(&key).unwrap()[1], u64::from(key + 1) << 32);
        assert_eq!(
            notes.get(&key, &format!("a{key}")).unwrap(),
            Some(-i64::from(key))
        );
        totals.add(&key, 1).unwrap();
        assert_eq!(totals.get(&key).unwrap(), Some(u64::from(key) + 1));
    }
    // Registering again is a no-op: the record now describes the new types.
    for b in &backends {
        b.register(ValueStateDescriptor::<u32, Order>::new("orders").with_ttl(ttl))
            .unwrap();
    }
    // Write times were kept: the values written before the clock moved expire first.
    clock.advance(Duration::from_secs(50));
    // A handle of the type before the migration is refused: it would write old values.
    let stale = old
        .get(&(0..200u32).find(|k| owned(*k, p, 0)).unwrap())
        .unwrap_err();
    assert_eq!(stale.kind(), ErrorKind::InvalidArgument, "{stale}");
    let (first, meta) = job.take(&backends, None).await;
    for s in &meta.operators[0].states {
        assert!(s.value_type.schema.is_some(), "{s}");
    }
    let restored = restore_with(&first, tmp.path(), 3, clock.clone()).await;
    let mut live = 0;
    let mut expired = 0;
    for (i, b) in restored.iter().enumerate() {
        let orders = b
            .register(ValueStateDescriptor::<u32, Order>::new("orders").with_ttl(ttl))
            .unwrap();
        let sizes = b
            .register(ListStateDescriptor::<u32, u64>::new("sizes"))
            .unwrap();
        for key in (0..200u32).filter(|k| owned(*k, 3, i as u32)) {
            match orders.get(&key).unwrap() {
                Some(o) => {
                    assert_eq!(
                        o,
                        upgrade(v1::Order {
                            amount: key,
                            note: format!("n{key}")
                        })
                    );
                    live += 1;
                }
                None => expired += 1,
            }
            assert_eq!(
                sizes.get(&key).unwrap(),
                vec![u64::from(key) << 32, u64::from(key + 1) << 32]
            );
        }
    }
    assert_eq!(live + expired, 200);
    assert!(live > 0 && expired > 0, "live {live}, expired {expired}");

    // The job goes on incremental: the next checkpoint reuses the migrated files.
    backends[0]
        .register(ListStateDescriptor::<u32, u64>::new("sizes"))
        .unwrap()
        .add(&(0..200u32).find(|k| owned(*k, p, 0)).unwrap(), &9)
        .unwrap();
    let (_, next) = job.take(&backends, None).await;
    let handle = next.operators[0].subtasks[1]
        .keyed
        .as_ref()
        .and_then(|k| k.as_files())
        .unwrap();
    assert!(handle.incremental);
    assert!(!handle.shared.is_empty());
    assert!(
        handle.new_shared().next().is_none(),
        "an unchanged subtask uploads no new shared file"
    );
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/program-v1")
        .join(name)
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

/// Registers the current program's states on `b` (migrating, dropping `legacy`) and
/// checks every key of the fixture it owns; returns the number of keys checked.
fn check_program_v2(b: &RocksStateBackend, subtask: u32, p: u32) -> usize {
    let orders = b
        .register(ValueStateDescriptor::<u32, Order>::new("orders").with_migration(1, upgrade))
        .unwrap();
    let sizes = b
        .register(
            ListStateDescriptor::<u32, u64>::new("sizes").with_migration(1, |v: u32| u64::from(v)),
        )
        .unwrap();
    let notes = b
        .register(
            MapStateDescriptor::<u32, String, i64>::new("notes")
                .with_migration(1, |v: u32| i64::from(v)),
        )
        .unwrap();
    let count = b
        .register(ValueStateDescriptor::<u32, u64>::new("count"))
        .unwrap();
    let recent = b
        .register(ListStateDescriptor::<u32, String>::new("recent"))
        .unwrap();
    let histogram = b
        .register(MapStateDescriptor::<u32, u8, u64>::new("histogram"))
        .unwrap();
    b.drop_state("legacy").unwrap();
    let mut checked = 0;
    for key in (0..40u32).filter(|k| owned(*k, p, subtask)) {
        assert_eq!(
            orders.get(&key).unwrap(),
            Some(upgrade(v1::Order {
                amount: key * 10,
                note: format!("n{key}")
            }))
        );
        assert_eq!(
            sizes.get(&key).unwrap(),
            vec![u64::from(key), u64::from(key) + 1]
        );
        assert_eq!(
            notes.get(&key, &format!("b{key}")).unwrap(),
            Some(i64::from(key * 2))
        );
        assert_eq!(count.get(&key).unwrap(), Some(u64::from(key) * 3));
        assert_eq!(
            recent.get(&key).unwrap(),
            vec![format!("r{key}"), format!("s{key}")]
        );
        assert_eq!(
            histogram.get(&key, &(key as u8 % 4)).unwrap(),
            Some(u64::from(key))
        );
        checked += 1;
    }
    let names: Vec<String> = b.states().into_iter().map(|s| s.name).collect();
    assert!(!names.contains(&"legacy".to_string()), "{names:?}");
    checked
}

/// State written by an earlier program version in the formats of an earlier rockstate
/// (no recorded structures) restores from its checkpoint and from both savepoint formats
/// at parallelism 1, 2 and 3, with `orders`, `sizes` and `notes` migrated, `legacy`
/// dropped and the rest as it was. Without the migration the changed states are
/// refused; a savepoint of the restored job records the new structures and restores
/// without any migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_program_version_restores_through_migrations() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("fixtures");
    copy_dir(&fixture(""), &copy);
    let sources = [
        copy.join("job/chk-3"),
        copy.join("savepoint-canonical"),
        copy.join("savepoint-native"),
    ];
    for (n, path) in sources.iter().enumerate() {
        let source = RestoreSource::open(path.to_str().unwrap()).await.unwrap();
        let recorded = &source.metadata().operators[0].states;
        assert!(recorded.iter().all(|s| s.value_type.schema.is_none()));
        for p in [1, 2, 3] {
            let backends = restore(&source, tmp.path(), p).await;
            let unmigrated = backends[0]
                .register(ValueStateDescriptor::<u32, Order>::new("orders"))
                .unwrap_err();
            assert_eq!(unmigrated.kind(), ErrorKind::Incompatible, "{unmigrated}");
            let checked: usize = backends
                .iter()
                .enumerate()
                .map(|(i, b)| check_program_v2(b, i as u32, p))
                .sum();
            assert_eq!(checked, 40, "source {n} at parallelism {p}");
            if n == 1 && p == 3 {
                let mut job = Job::start(&tmp.path().join("again"), p).await;
                let (again, meta) = job.take(&backends, Some(SavepointFormat::Native)).await;
                let states = &meta.operators[0].states;
                assert_eq!(states.len(), 6, "{states:?}");
                assert!(states.iter().all(|s| s.value_type.schema.is_some()));
                for (i, b) in restore(&again, tmp.path(), 2).await.iter().enumerate() {
                    let orders = b
                        .register(ValueStateDescriptor::<u32, Order>::new("orders"))
                        .unwrap();
                    for key in (0..40u32).filter(|k| owned(*k, 2, i as u32)) {
                        assert_eq!(orders.get(&key).unwrap().unwrap().currency, "EUR");
                    }
                }
            }
        }
    }
}
