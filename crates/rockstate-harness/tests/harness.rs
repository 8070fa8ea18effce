//! The harness: a keyed job on threads with checkpoints, crashes and restarts. A run that
//! crashes and resumes from its latest checkpoint ends in the same state as one that never
//! failed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rockstate::checkpoint::{sweep, SweepOptions};
use rockstate::{
    CheckpointCoordinator, CheckpointStorage, CoordinatorOptions, ListState, ListStateDescriptor,
    MapState, MapStateDescriptor, OperatorSpec, RocksStateBackend, ValueState,
    ValueStateDescriptor,
};
use rockstate_harness::{Harness, HarnessConfig, Operator, OperatorFactory, Source, StartFrom};

const KEYS: u64 = 300;

struct Events {
    partitions: u32,
    per_partition: u64,
}

impl Source for Events {
    type Key = String;
    type Value = u64;
    fn partitions(&self) -> u32 {
        self.partitions
    }
    fn record(&self, partition: u32, offset: u64) -> Option<(String, u64)> {
        if offset >= self.per_partition {
            return None;
        }
        let x = (u64::from(partition) << 32 | offset).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Some((format!("user-{}", (x >> 20) % KEYS), (x >> 8) % 1000))
    }
}

struct Counter {
    count: ValueState<String, u64>,
    recent: ListState<String, u64>,
    histogram: MapState<String, u8, u64>,
}

impl Operator<String, u64> for Counter {
    fn process(&mut self, key: &String, value: u64) -> rockstate::Result<()> {
        let n = self.count.get(key)?.unwrap_or(0);
        self.count.put(key, &(n + 1))?;
        let mut recent = self.recent.get(key)?;
        recent.push(value);
        let keep = recent.len().saturating_sub(8);
        self.recent.update(key, &recent[keep..])?;
        let bucket = (value / 100) as u8;
        let c = self.histogram.get(key, &bucket)?.unwrap_or(0);
        self.histogram.put(key, &bucket, &(c + 1))
    }
}

fn factory() -> OperatorFactory<String, u64> {
    Arc::new(|backend: &RocksStateBackend| {
        Ok(Box::new(Counter {
            count: backend.register(ValueStateDescriptor::new("count"))?,
            recent: backend.register(ListStateDescriptor::new("recent"))?,
            histogram: backend.register(MapStateDescriptor::new("histogram"))?,
        }) as Box<dyn Operator<String, u64>>)
    })
}

type Digest = BTreeMap<String, (u64, Vec<u64>, Vec<(u8, u64)>)>;

fn digest(backends: &[RocksStateBackend]) -> Digest {
    let mut out = Digest::new();
    for b in backends {
        let count = b
            .register(ValueStateDescriptor::<String, u64>::new("count"))
            .unwrap();
        let recent = b
            .register(ListStateDescriptor::<String, u64>::new("recent"))
            .unwrap();
        let hist = b
            .register(MapStateDescriptor::<String, u8, u64>::new("histogram"))
            .unwrap();
        for entry in count.all_keys().unwrap() {
            let (key, ()) = entry.unwrap();
            let h = hist.iter(&key).unwrap().map(|e| e.unwrap()).collect();
            let value = (
                count.get(&key).unwrap().unwrap(),
                recent.get(&key).unwrap(),
                h,
            );
            assert!(
                out.insert(key, value).is_none(),
                "a key lives in one subtask only"
            );
        }
    }
    out
}

fn config(local: &Path, interval: u64) -> HarnessConfig {
    HarnessConfig {
        job_id: "job".into(),
        operator_uid: "counter".into(),
        parallelism: 2,
        max_parallelism: 32,
        local_root: local.to_path_buf(),
        checkpoint_interval: interval,
        memory_budget: 32 << 20,
        rocksdb_statistics: false,
        coordinator: CoordinatorOptions {
            num_retained: 2,
            ..Default::default()
        },
    }
}

fn source() -> Events {
    Events {
        partitions: 3,
        per_partition: 1_000,
    }
}

/// A harness over [`source`] from empty state, a checkpoint every 250 records.
fn start_empty(
    local: &Path,
    dir: &CheckpointStorage,
    factory: OperatorFactory<String, u64>,
) -> Harness<Events> {
    Harness::start(config(local, 250), dir, source(), factory, StartFrom::Empty).unwrap()
}

fn uninterrupted() -> Digest {
    let local = tempfile::tempdir().unwrap();
    let dir = CheckpointStorage::open("memory://harness-reference").unwrap();
    let h = start_empty(local.path(), &dir, factory());
    let done = h.finish().unwrap();
    assert_eq!(done.events, 3_000);
    digest(&done.backends)
}

#[test]
fn crashes_and_restarts_end_in_the_same_state() {
    let expected = uninterrupted();
    assert_eq!(expected.values().map(|v| v.0).sum::<u64>(), 3_000);

    for (run, crash_points) in [vec![700u64], vec![260, 1_100, 2_900], vec![1]]
        .into_iter()
        .enumerate()
    {
        let root = tempfile::tempdir().unwrap();
        let dir = CheckpointStorage::open(root.path().to_str().unwrap()).unwrap();
        let local = tempfile::tempdir().unwrap();
        let mut from = StartFrom::Empty;
        for point in &crash_points {
            let mut h =
                Harness::start(config(local.path(), 250), &dir, source(), factory(), from).unwrap();
            h.run(*point).unwrap();
            // Give some uploads time to be in flight or done, then crash.
            std::thread::sleep(Duration::from_millis(20));
            h.crash();
            from = StartFrom::Latest;
        }
        let h = Harness::start(
            config(local.path(), 250),
            &dir,
            source(),
            factory(),
            StartFrom::Latest,
        )
        .unwrap();
        let restored_from = h.restored_from();
        let done = h.finish().unwrap();
        assert_eq!(
            digest(&done.backends),
            expected,
            "run {run}: crashes at {crash_points:?}, resumed from {restored_from:?}"
        );
        drop(done);

        // The crashes left orphans at most; the sweep removes them and keeps what the
        // retained checkpoints reference.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let job = dir.child("job").unwrap();
        let options = SweepOptions {
            grace: Duration::ZERO,
            dry_run: false,
        };
        rt.block_on(sweep(&job, &options, u64::MAX / 2)).unwrap();
        let stored: BTreeSet<String> = rt
            .block_on(job.list(""))
            .unwrap()
            .into_iter()
            .map(|o| o.path)
            .collect();
        let specs = ["source", "counter"]
            .map(|uid| OperatorSpec {
                uid: uid.into(),
                parallelism: 2,
                max_parallelism: 32,
            })
            .to_vec();
        let coordinator = rt
            .block_on(CheckpointCoordinator::start(
                job.clone(),
                "job",
                specs,
                config(local.path(), 0).coordinator,
            ))
            .unwrap();
        let referenced: BTreeSet<&str> = coordinator
            .retained()
            .flat_map(|m| m.referenced_paths())
            .collect();
        for path in &referenced {
            assert!(
                stored.contains(*path),
                "run {run}: {path} missing after the sweep"
            );
        }
        for path in stored.iter().filter(|p| p.starts_with("shared/")) {
            assert!(
                referenced.contains(path.as_str()),
                "run {run}: orphan {path} survived the sweep"
            );
        }
    }
}

#[test]
fn restarting_from_an_older_checkpoint_than_the_retained_ones() {
    let expected = uninterrupted();
    let root = tempfile::tempdir().unwrap();
    let dir = CheckpointStorage::open(root.path().to_str().unwrap()).unwrap();
    let local = tempfile::tempdir().unwrap();
    let mut h = Harness::start(
        config(local.path(), 0),
        &dir,
        source(),
        factory(),
        StartFrom::Empty,
    )
    .unwrap();
    h.run(600).unwrap();
    let older = h.checkpoint_now().unwrap();
    h.run(900).unwrap();
    h.checkpoint_now().unwrap();
    h.crash();
    // Fewer retained checkpoints now: starting the coordinator subsumes the older one,
    // which must be restored first, and its files must not be reused afterwards.
    let mut cfg = config(local.path(), 250);
    cfg.coordinator.num_retained = 1;
    let h = Harness::start(
        cfg,
        &dir,
        source(),
        factory(),
        StartFrom::Checkpoint(Box::new(older.clone())),
    )
    .unwrap();
    assert_eq!(h.restored_from(), Some(older.checkpoint_id));
    let done = h.finish().unwrap();
    assert_eq!(digest(&done.backends), expected);
}

/// A job crashes, restarts from its latest checkpoint at another parallelism (rescale
/// through the checkpoint's files), then stops with a savepoint and resumes from it at a
/// third parallelism; it ends in the same state as a run that never stopped.
#[test]
fn rescaled_restarts_and_savepoints_end_in_the_same_state() {
    use rockstate::{RestoreOptions, RestoreSource, SavepointFormat};
    use rockstate_harness::StartFrom;
    let expected = uninterrupted();
    for format in [SavepointFormat::Canonical, SavepointFormat::Native] {
        let root = tempfile::tempdir().unwrap();
        let dir =
            CheckpointStorage::open(root.path().join("checkpoints").to_str().unwrap()).unwrap();
        let savepoints =
            CheckpointStorage::open(root.path().join("savepoints").to_str().unwrap()).unwrap();
        let local = tempfile::tempdir().unwrap();
        let mut cfg = config(local.path(), 250);
        cfg.parallelism = 4;
        let mut h = Harness::start(cfg, &dir, source(), factory(), StartFrom::Empty).unwrap();
        h.run(1_100).unwrap();
        h.checkpoint_now().unwrap();
        h.run(100).unwrap();
        h.crash();

        let mut cfg = config(local.path(), 250);
        cfg.parallelism = 3;
        let mut h = Harness::start(cfg, &dir, source(), factory(), StartFrom::Latest).unwrap();
        assert!(h.restored_from().is_some());
        h.run(700).unwrap();
        let (savepoint, done) = h.stop_with_savepoint(Some(&savepoints), format).unwrap();
        drop(done);
        assert!(savepoint.metadata.is_savepoint());

        let source_snapshot = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(RestoreSource::open(&savepoint.url))
            .unwrap();
        let mut cfg = config(local.path(), 250);
        cfg.parallelism = 1;
        cfg.job_id = "job-from-savepoint".into();
        let h = Harness::start(
            cfg,
            &dir,
            source(),
            factory(),
            StartFrom::Snapshot {
                source: Box::new(source_snapshot),
                options: RestoreOptions::default(),
            },
        )
        .unwrap();
        let done = h.finish().unwrap();
        assert_eq!(digest(&done.backends), expected, "{format:?}");
    }
}

/// A factory that registers a state with another type than the snapshot recorded fails
/// with an error naming the operator, the state and both types.
#[test]
fn incompatible_state_after_restore_names_operator_state_and_types() {
    let root = tempfile::tempdir().unwrap();
    let dir = CheckpointStorage::open(root.path().to_str().unwrap()).unwrap();
    let local = tempfile::tempdir().unwrap();
    let mut h = Harness::start(
        config(local.path(), 0),
        &dir,
        source(),
        factory(),
        StartFrom::Empty,
    )
    .unwrap();
    h.run(300).unwrap();
    h.checkpoint_now().unwrap();
    h.crash();
    let wrong: OperatorFactory<String, u64> = Arc::new(|backend: &RocksStateBackend| {
        backend.register(ValueStateDescriptor::<String, String>::new("count"))?;
        unreachable!("registration must fail")
    });
    let err = match Harness::start(
        config(local.path(), 0),
        &dir,
        source(),
        wrong,
        StartFrom::Latest,
    ) {
        Ok(_) => panic!("an incompatible state was accepted"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), rockstate::ErrorKind::Incompatible);
    let msg = err.to_string();
    for part in ["counter", "count", "value=u64", "value=String"] {
        assert!(msg.contains(part), "{part} missing from: {msg}");
    }
}

/// An operator that fails after some records.
struct Failing {
    seen: u64,
}

impl Operator<String, u64> for Failing {
    fn process(&mut self, _key: &String, _value: u64) -> rockstate::Result<()> {
        self.seen += 1;
        if self.seen > 200 {
            return Err(rockstate::Error::operator(
                "counter",
                "the record is poisoned",
            ));
        }
        Ok(())
    }
}

/// The first subtask's operator fails after 200 records; the other runs on. Each records,
/// when it is dropped (its subtask stopping), what the job's status said then.
struct Watched {
    fails: bool,
    records: u64,
    job: CheckpointStorage,
    seen: Seen,
}

/// Per dropped operator: whether it was the failing one, and the status it saw.
type Seen = Arc<std::sync::Mutex<Vec<(bool, Option<rockstate::checkpoint::status::RunState>)>>>;

impl Operator<String, u64> for Watched {
    fn process(&mut self, _key: &String, _value: u64) -> rockstate::Result<()> {
        self.records += 1;
        if self.fails && self.records > 200 {
            return Err(rockstate::Error::operator(
                "counter",
                "the record is poisoned",
            ));
        }
        Ok(())
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The status task publishes `running` soon after the start: the subtask waits
        // for a status to exist (it may be still running itself), then reports it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            let status = runtime
                .block_on(rockstate::checkpoint::status::read_status(
                    &self.job,
                    u64::MAX / 2,
                ))
                .unwrap()
                .map(|view| view.status.state);
            if status.is_some() || std::time::Instant::now() > deadline {
                break status;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        self.seen.lock().unwrap().push((self.fails, status));
    }
}

/// A failed job's status says so only once none of its subtasks runs any more: whoever
/// restarts the job on seeing it never meets the old threads still at work.
#[test]
fn a_failed_status_is_written_once_every_subtask_stopped() {
    use rockstate::checkpoint::status::{read_status, RunState};
    let local = tempfile::tempdir().unwrap();
    let dir = CheckpointStorage::open("memory://status-after-threads").unwrap();
    let job = dir.child("job").unwrap();
    let seen: Seen = Arc::default();
    let (watch, watched_job) = (seen.clone(), job.clone());
    let factory: OperatorFactory<String, u64> = Arc::new(move |backend: &RocksStateBackend| {
        Ok(Box::new(Watched {
            fails: backend.key_group_range().start() == 0,
            records: 0,
            job: watched_job.clone(),
            seen: watch.clone(),
        }) as Box<dyn Operator<String, u64>>)
    });
    let mut h = start_empty(local.path(), &dir, factory);
    assert!(
        h.run(u64::MAX).is_err(),
        "the operator's error ends the run"
    );
    drop(h);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "both operators were dropped: {seen:?}");
    // The subtask that ran on stopped while the job still said it was running.
    assert!(
        seen.contains(&(false, Some(RunState::Running))),
        "a subtask still ran after the status said failed: {seen:?}"
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let view = runtime
        .block_on(read_status(&job, u64::MAX / 2))
        .unwrap()
        .expect("a status");
    assert_eq!(view.status.state, RunState::Failed);
}

/// The status of a job whose operator failed says so once the harness is dropped, and
/// of one that finished says stopped; neither turns stale by age.
#[test]
fn the_status_says_how_the_job_ended() {
    use rockstate::checkpoint::status::{read_status, RunState};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for (name, failing) in [("failed", true), ("finished", false)] {
        let local = tempfile::tempdir().unwrap();
        let dir = CheckpointStorage::open(&format!("memory://status-{name}")).unwrap();
        let factory: OperatorFactory<String, u64> = if failing {
            Arc::new(|_: &RocksStateBackend| {
                Ok(Box::new(Failing { seen: 0 }) as Box<dyn Operator<String, u64>>)
            })
        } else {
            factory()
        };
        let mut h = start_empty(local.path(), &dir, factory);
        // An error of `run` leaves the harness to be dropped; `finish` reports a
        // subtask's error too.
        let failed = match h.run(u64::MAX) {
            Err(_) => {
                drop(h);
                true
            }
            Ok(_) => h.finish().is_err(),
        };
        assert_eq!(failed, failing, "{name}");
        let expected = if failing {
            RunState::Failed
        } else {
            RunState::Stopped
        };
        let job = dir.child("job").unwrap();
        let view = runtime
            .block_on(read_status(&job, u64::MAX / 2))
            .unwrap()
            .expect("a status");
        assert_eq!(view.status.state, expected, "{name}");
        assert_eq!(view.stale, None, "{name}");
    }
}

/// Counts records; once `total` records were processed across the job, makes RocksDB
/// refuse every later write under `refused` (the job's local directories).
struct RefusingAfter {
    count: ValueState<String, u64>,
    seen: Arc<std::sync::atomic::AtomicU64>,
    total: u64,
    refused: std::path::PathBuf,
}

impl Operator<String, u64> for RefusingAfter {
    fn process(&mut self, key: &String, _value: u64) -> rockstate::Result<()> {
        let n = self.count.get(key)?.unwrap_or(0);
        self.count.put(key, &(n + 1))?;
        let seen = self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if seen == self.total {
            rockstate::testing::checks::refuse_writes(&self.refused, true);
        }
        Ok(())
    }
}

/// Writes RocksDB refuses when a snapshot applies them (the last records' writes, still
/// buffered at the final checkpoint) are lost: the job fails with that reason instead of
/// declining the checkpoint and ending as if its state were whole.
#[test]
fn buffered_writes_lost_at_a_snapshot_fail_the_job() {
    let local = tempfile::tempdir().unwrap();
    let dir = CheckpointStorage::open("memory://harness-lost-writes").unwrap();
    let source = Events {
        partitions: 3,
        per_partition: 30,
    };
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let refused = local.path().to_path_buf();
    let factory: OperatorFactory<String, u64> = Arc::new(move |backend: &RocksStateBackend| {
        Ok(Box::new(RefusingAfter {
            count: backend.register(ValueStateDescriptor::new("count"))?,
            seen: seen.clone(),
            // Fewer writes than a buffer holds: none was applied before the snapshot.
            total: 90,
            refused: refused.clone(),
        }) as Box<dyn Operator<String, u64>>)
    });
    let h = Harness::start(
        config(local.path(), 0),
        &dir,
        source,
        factory,
        StartFrom::Empty,
    )
    .unwrap();
    let result = h.finish();
    rockstate::testing::checks::refuse_writes(local.path(), false);
    let err = match result {
        Ok(done) => panic!(
            "the job ended although its writes were lost (completed {:?})",
            done.completed
        ),
        Err(e) => e,
    };
    assert!(
        err.report().to_string().contains("lost"),
        "{}",
        err.report()
    );
}
