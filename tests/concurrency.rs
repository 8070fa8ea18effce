//! Concurrency on one job directory, with the schedule under control: the orphan sweep
//! beside a live job, writes whose reply lies, restores from other directories and from
//! older checkpoints. Interleavings are decided by holding and releasing storage
//! requests at [`GatedStore`](rockstate::testing::GatedStore) gates, never by sleeps. Ends
//! with a seeded randomized schedule of a coordinator, two subtasks, a concurrent sweep
//! and ambiguous commits.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::memory::InMemory;
use object_store::ObjectStore;
use rockstate::checkpoint::{sweep, SweepOptions};
use rockstate::testing::checks::{assert_whole_on_storage, stored};
use rockstate::testing::{GatedStore, Lie, Match, Op, SeededRng};
use rockstate::{
    AckOutcome, BackendOptions, CheckpointCoordinator, CheckpointMetadata, CheckpointStorage,
    CoordinatorOptions, ErrorKind, OperatorSpec, RestoreMode, RestoreOptions, RestoreSource,
    RocksStateBackend, StartPoint, StorageOptions, SubtaskSnapshot, ValueState,
    ValueStateDescriptor,
};

const UID: &str = "counter";
const MAX_PAR: u32 = 16;
const JOB: &str = "job";

fn spec(parallelism: u32) -> Vec<OperatorSpec> {
    vec![OperatorSpec {
        uid: UID.into(),
        parallelism,
        max_parallelism: MAX_PAR,
    }]
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A time at which every object is older than any grace period.
const FAR_FUTURE_MS: u64 = u64::MAX / 2;

/// How long a job step may wait for a held sweep before the sweep is let go on.
const STALL: Duration = Duration::from_secs(5);

/// One in-memory store seen through two gated wrappers: `live` for the job (coordinator
/// and subtasks), `other` for a second actor (the sweep, a second writer). `plain` reads
/// the store directly, for assertions.
struct Bed {
    live: Arc<GatedStore>,
    other: Arc<GatedStore>,
    job: CheckpointStorage,
    job_other: CheckpointStorage,
    plain: CheckpointStorage,
    /// The whole store, ungated.
    top: CheckpointStorage,
}

fn bed() -> Bed {
    let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let live = Arc::new(GatedStore::new(inner.clone()));
    let other = Arc::new(GatedStore::new(inner.clone()));
    // Retries back off briefly: failures here are injected, not load.
    let job = CheckpointStorage::from_store(live.clone(), "gated://live")
        .with_options(StorageOptions {
            retry_backoff: Duration::from_millis(1),
            ..StorageOptions::default()
        })
        .child(JOB)
        .unwrap();
    // The second actor issues one request at a time, so that its gate sees them in a
    // fixed order.
    let job_other = CheckpointStorage::from_store(other.clone(), "gated://other")
        .with_options(StorageOptions {
            transfer_concurrency: 1,
            ..StorageOptions::default()
        })
        .child(JOB)
        .unwrap();
    let top = CheckpointStorage::from_store(inner, "memory://plain");
    let plain = top.child(JOB).unwrap();
    Bed {
        live,
        other,
        job,
        job_other,
        plain,
        top,
    }
}

struct Subtask {
    backend: RocksStateBackend,
    state: ValueState<u64, u64>,
    keys: Vec<u64>,
}

fn keys_of(subtask: u32, parallelism: u32, n: usize) -> Vec<u64> {
    (0..)
        .filter(|k| rockstate::subtask_for_key(k, parallelism, MAX_PAR).unwrap() == subtask)
        .take(n)
        .collect()
}

fn attach(backend: RocksStateBackend, subtask: u32, parallelism: u32) -> Subtask {
    let state = backend
        .register(ValueStateDescriptor::<u64, u64>::new("v"))
        .unwrap();
    Subtask {
        backend,
        state,
        keys: keys_of(subtask, parallelism, 400),
    }
}

fn subtasks(dir: &Path, parallelism: u32) -> Vec<Subtask> {
    (0..parallelism)
        .map(|i| {
            let options =
                BackendOptions::for_subtask(dir.join(format!("s{i}")), i, parallelism, MAX_PAR)
                    .unwrap();
            attach(RocksStateBackend::open(options).unwrap(), i, parallelism)
        })
        .collect()
}

/// Writes `value` to the keys `from..from + n` (wrapping) of every subtask and flushes,
/// so that the next snapshot has a new SST file.
fn write(subs: &[Subtask], from: usize, n: usize, value: u64) {
    for s in subs {
        for i in 0..n {
            let k = s.keys[(from + i) % s.keys.len()];
            s.state.put(&k, &value).unwrap();
        }
        s.backend.flush().unwrap();
    }
}

async fn snapshot(s: &Subtask, job: &CheckpointStorage, id: u64, i: u32) -> SubtaskSnapshot {
    rockstate::testing::fixtures::snapshot_subtask(&s.backend, job, UID, i, id).await
}

async fn start(
    job: &CheckpointStorage,
    parallelism: u32,
    num_retained: usize,
) -> CheckpointCoordinator {
    CheckpointCoordinator::start(
        job.clone(),
        JOB,
        spec(parallelism),
        CoordinatorOptions {
            num_retained,
            ..CoordinatorOptions::default()
        },
    )
    .await
    .unwrap()
}

/// Acknowledges every subtask's snapshot of checkpoint `id`; returns the last outcome.
async fn acknowledge_all(
    coord: &mut CheckpointCoordinator,
    snaps: Vec<SubtaskSnapshot>,
    id: u64,
) -> rockstate::Result<AckOutcome> {
    let mut last = None;
    for (i, snap) in snaps.into_iter().enumerate() {
        last = Some(coord.acknowledge(id, UID, i as u32, snap).await);
    }
    last.expect("at least one subtask")
}

/// Takes one checkpoint of every subtask, which must complete; notifies the subtasks.
async fn checkpoint(
    coord: &mut CheckpointCoordinator,
    subs: &[Subtask],
    job: &CheckpointStorage,
) -> CheckpointMetadata {
    let id = coord.trigger().expect("no checkpoint in flight");
    let mut snaps = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        snaps.push(snapshot(s, job, id, i as u32).await);
    }
    match acknowledge_all(coord, snaps, id).await {
        Ok(AckOutcome::Completed(meta)) => {
            for s in subs {
                s.backend.notify_checkpoint_complete(id);
            }
            *meta
        }
        other => panic!("checkpoint {id} did not complete: {other:?}"),
    }
}

/// Two subtasks and a coordinator retaining one checkpoint: checkpoint 1 completed, and
/// the snapshots of checkpoint 2 uploaded, not acknowledged yet.
async fn second_in_flight(
    bed: &Bed,
    dir: &Path,
) -> (
    Vec<Subtask>,
    CheckpointCoordinator,
    u64,
    Vec<SubtaskSnapshot>,
) {
    let subs = subtasks(dir, 2);
    let mut coord = start(&bed.job, 2, 1).await;
    write(&subs, 0, 300, 1);
    checkpoint(&mut coord, &subs, &bed.job).await;
    write(&subs, 5, 30, 2);
    let id = coord.trigger().unwrap();
    let mut snaps = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        snaps.push(snapshot(s, &bed.job, id, i as u32).await);
    }
    (subs, coord, id, snaps)
}

/// Every completed checkpoint of the job directory is whole.
async fn assert_every_completed_checkpoint_whole(job: &CheckpointStorage, when: &str) {
    for meta in job.checkpoints().await.unwrap().completed {
        assert_whole_on_storage(job, &meta, when).await;
    }
}

/// Waits until `gate` holds a request, failing the test after a minute.
async fn arrived(gate: &rockstate::testing::Gate, what: &str) -> String {
    tokio::time::timeout(Duration::from_secs(60), gate.wait_arrived())
        .await
        .unwrap_or_else(|_| panic!("{what} never came"))
}

fn sweep_now(grace: Duration) -> SweepOptions {
    SweepOptions {
        grace,
        dry_run: false,
    }
}

// ---------------------------------------------------------------------------------------
// 1. The sweep beside a live job
// ---------------------------------------------------------------------------------------

/// `rockstate gc` from cron beside a running job. The sweep lists the `chk-*` folders,
/// then reads `chk-C/_metadata` of the latest checkpoint C; before that read is answered,
/// the job completes D (which reuses C's shared files) and retention deletes C. The sweep
/// then finds no completed checkpoint in the view it listed and deletes D's files.
///
/// Proves: a sweep decides what to delete from a view it has validated; every file of
/// the latest completed checkpoint survives a concurrent sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_beside_a_live_job_keeps_the_latest_checkpoints_files() {
    let bed = bed();
    let dir = tempfile::tempdir().unwrap();
    let subs = subtasks(dir.path(), 2);
    let mut coord = start(&bed.job, 2, 1).await;
    write(&subs, 0, 300, 1);
    let c = checkpoint(&mut coord, &subs, &bed.job).await;

    let gate = bed
        .other
        .gate(Match::op(Op::Get).path_ends_with(format!("chk-{}/_metadata", c.checkpoint_id)));
    let sweeper = tokio::spawn({
        let job = bed.job_other.clone();
        async move { sweep(&job, &sweep_now(Duration::ZERO), FAR_FUTURE_MS).await }
    });
    arrived(&gate, "the sweep's read of the latest _metadata").await;
    let listed_first = bed.other.requests();
    assert!(
        listed_first.iter().any(|r| r.op == Op::List),
        "the sweep lists before it reads: {listed_first:?}"
    );

    // While the sweep's read is held: D completes and subsumes C. (Should the job wait
    // for the sweep, the sweep goes on after a while: no interleaving to test then.)
    write(&subs, 10, 20, 2);
    let job_step = checkpoint(&mut coord, &subs, &bed.job);
    tokio::pin!(job_step);
    let (d, waited) = tokio::select! {
        d = &mut job_step => (d, false),
        () = tokio::time::sleep(STALL) => {
            gate.release();
            (job_step.await, true)
        }
    };
    let reused = d
        .handles()
        .flat_map(|(_, h)| h.shared.iter())
        .filter(|f| f.uploaded_by == c.checkpoint_id)
        .count();
    assert!(
        reused > 0,
        "D reuses none of C's files: the race is not set up"
    );
    if !waited {
        assert!(
            !stored(&bed.plain)
                .await
                .contains_key(&format!("chk-{}/_metadata", c.checkpoint_id)),
            "retention did not delete C"
        );
    }

    gate.release();
    let report = sweeper.await.unwrap();
    eprintln!("sweep: {report:?}");
    assert_whole_on_storage(&bed.plain, &d, "after a sweep that raced with D").await;
    assert_eq!(
        bed.plain
            .latest_completed()
            .await
            .unwrap()
            .map(|m| m.checkpoint_id),
        Some(d.checkpoint_id)
    );
}

// ---------------------------------------------------------------------------------------
// 2. Copies that look old
// ---------------------------------------------------------------------------------------

/// Sets the modification time of every file under `dir` to `age` ago.
fn age_files(dir: &Path, age: Duration) {
    let when = SystemTime::now() - age;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            age_files(&path, age);
        } else {
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(when)
                .unwrap();
        }
    }
}

/// A job restored (`NoClaim`) from a checkpoint of another job directory on local files:
/// its first checkpoint copies the unchanged SSTs into its own `shared/` as hard links,
/// which keep the source's modification time (two hours ago). The sweep runs, with the
/// default one-hour grace, after the upload and before the checkpoint completes: the
/// copies look like old orphans.
///
/// Proves: the sweep never deletes files of a checkpoint in flight because of an age it
/// cannot vouch for; the checkpoint completes whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_restored_files_are_not_swept_as_old() {
    let root = tempfile::tempdir().unwrap();
    let checkpoints =
        CheckpointStorage::open(&root.path().join("checkpoints").display().to_string()).unwrap();
    let job_a = checkpoints.child("a").unwrap();
    let job_b = checkpoints.child("b").unwrap();
    let local = tempfile::tempdir().unwrap();

    let subs = subtasks(&local.path().join("a"), 1);
    write(&subs, 0, 400, 1);
    let mut coord_a =
        CheckpointCoordinator::start(job_a.clone(), "a", spec(1), CoordinatorOptions::default())
            .await
            .unwrap();
    let from = checkpoint(&mut coord_a, &subs, &job_a).await;
    drop(coord_a);
    age_files(
        &root.path().join("checkpoints/a"),
        Duration::from_secs(2 * 3600),
    );

    let source = RestoreSource::checkpoint(&job_a, from);
    let options = BackendOptions::for_subtask(local.path().join("b"), 0, 1, MAX_PAR).unwrap();
    let backend = RocksStateBackend::builder(options)
        .restore_operator(
            &source,
            UID,
            &RestoreOptions {
                mode: RestoreMode::NoClaim,
                ..RestoreOptions::default()
            },
        )
        .await
        .unwrap();
    let b = vec![attach(backend, 0, 1)];
    write(&b, 0, 10, 2);

    let mut coord_b =
        CheckpointCoordinator::start(job_b.clone(), "b", spec(1), CoordinatorOptions::default())
            .await
            .unwrap();
    // The hazard: the files the first checkpoint copies are two hours old.
    let old_sources = {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(root.path().join("checkpoints/a/shared"))
            .unwrap()
            .filter(|e| {
                let meta = e.as_ref().unwrap().metadata().unwrap();
                now_ms() as i64 - meta.mtime() * 1000 > 3600 * 1000
            })
            .count()
    };
    assert!(
        old_sources > 0,
        "no source looks old: the hazard is not set up"
    );
    let id = coord_b.trigger().unwrap();
    let snap = snapshot(&b[0], &job_b, id, 0).await;
    let copied = snap
        .keyed
        .as_ref()
        .unwrap()
        .as_files()
        .unwrap()
        .shared
        .iter()
        .filter(|f| f.uploaded_by == id)
        .count();
    assert!(copied > 0, "the first checkpoint copied nothing");

    let report = sweep(&job_b, &SweepOptions::default(), now_ms())
        .await
        .unwrap();
    eprintln!("sweep: {report:?}");
    let outcome = coord_b.acknowledge(id, UID, 0, snap).await;
    let meta = match outcome {
        Ok(AckOutcome::Completed(meta)) => *meta,
        other => panic!("the first checkpoint after the restore did not complete: {other:?}"),
    };
    assert_whole_on_storage(&job_b, &meta, "after a sweep during the first checkpoint").await;
}

// ---------------------------------------------------------------------------------------
// 3. Ambiguous commits
// ---------------------------------------------------------------------------------------

/// The conditional put of `chk-N/_metadata` lands, and the reply says `AlreadyExists`
/// (what a client's own retry of a request that landed gets back). The `_metadata` is
/// this coordinator's own.
///
/// Proves: an ambiguous commit whose `_metadata` is ours counts as completed (the
/// coordinator reads it back), and nothing it references is lost; later checkpoints go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_answered_already_exists_is_recognised_as_ours() {
    let bed = bed();
    let dir = tempfile::tempdir().unwrap();
    let (subs, mut coord, id, snaps) = second_in_flight(&bed, dir.path()).await;
    bed.live.lie(
        Match::op(Op::Put).path_ends_with(format!("chk-{id}/_metadata")),
        Lie::AppliedThenAlreadyExists,
        1,
    );
    let outcome = acknowledge_all(&mut coord, snaps, id).await;
    assert_eq!(bed.live.rules_left(), 0, "the lie was not told");
    let on_storage = bed
        .plain
        .checkpoints()
        .await
        .unwrap()
        .completed
        .into_iter()
        .find(|m| m.checkpoint_id == id)
        .unwrap_or_else(|| panic!("checkpoint {id} has no _metadata after an ambiguous commit"));
    assert_whole_on_storage(&bed.plain, &on_storage, "after an ambiguous commit").await;
    match &outcome {
        Ok(AckOutcome::Completed(meta)) => assert_eq!(meta.checkpoint_id, id),
        other => panic!("checkpoint {id}, whose _metadata this coordinator stored, is not counted as completed: {other:?}"),
    }
    assert_eq!(coord.latest_completed().map(|m| m.checkpoint_id), Some(id));
    for s in &subs {
        s.backend.notify_checkpoint_complete(id);
    }
    write(&subs, 50, 30, 3);
    checkpoint(&mut coord, &subs, &bed.job).await;
    assert_every_completed_checkpoint_whole(&bed.plain, "after the next checkpoint").await;
}

/// The conditional put of `chk-N/_metadata` lands and is answered with a transient error;
/// the retries fail, and so do the reads that would tell whether it landed. The
/// `_metadata` is in doubt.
///
/// Proves: a `_metadata` in doubt is never deleted, nor anything it references; once
/// storage recovers, the next checkpoint completes and every completed checkpoint is
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_doubt_is_never_deleted() {
    let bed = bed();
    let dir = tempfile::tempdir().unwrap();
    let (subs, mut coord, id, snaps) = second_in_flight(&bed, dir.path()).await;
    let metadata = format!("chk-{id}/_metadata");
    // The first put lands and is answered 5xx; the retries and the reads fail.
    bed.live.lie(
        Match::op(Op::Put).path_ends_with(metadata.as_str()),
        Lie::AppliedThenError,
        1,
    );
    bed.live
        .fail(Match::op(Op::Put).path_ends_with(metadata.as_str()), 3);
    bed.live
        .fail(Match::op(Op::Get).path_ends_with(metadata.as_str()), 8);
    let outcome = acknowledge_all(&mut coord, snaps, id).await;
    eprintln!("outcome: {outcome:?}");
    bed.live.clear_rules();
    let deletes: Vec<_> = bed
        .live
        .requests()
        .into_iter()
        .filter(|r| r.op == Op::Delete && r.path.ends_with(&metadata))
        .collect();
    assert!(
        deletes.is_empty(),
        "the coordinator deleted a _metadata in doubt: {deletes:?}"
    );
    let on_storage = bed
        .plain
        .checkpoints()
        .await
        .unwrap()
        .completed
        .into_iter()
        .find(|m| m.checkpoint_id == id)
        .unwrap_or_else(|| panic!("{metadata}, stored by the first put, is gone"));
    assert_whole_on_storage(&bed.plain, &on_storage, "after a commit in doubt").await;

    match outcome {
        Ok(AckOutcome::Completed(_)) => {
            for s in &subs {
                s.backend.notify_checkpoint_complete(id);
            }
        }
        _ => {
            for s in &subs {
                s.backend.notify_checkpoint_aborted(id);
            }
        }
    }
    write(&subs, 50, 30, 3);
    checkpoint(&mut coord, &subs, &bed.job).await;
    assert_every_completed_checkpoint_whole(&bed.plain, "after the next checkpoint").await;
}

/// The first `_metadata` put of checkpoint C lands and is answered 5xx, and every retry
/// and read-back fails for longer than the coordinator tries: C is in doubt. A retried
/// acknowledgement of C arrives. Then the faults stop and checkpoint D completes, with
/// one checkpoint retained.
///
/// Proves: an acknowledgement of a checkpoint in doubt deletes nothing; once D completes,
/// C is read back and, being stored, is retired like any subsumed checkpoint (its
/// `_metadata` first): no completed checkpoint ever references a missing file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_doubt_is_settled_by_the_next_completion() {
    let bed = bed();
    let dir = tempfile::tempdir().unwrap();
    let (subs, mut coord, id, snaps) = second_in_flight(&bed, dir.path()).await;
    let retried = snaps[1].clone();
    let metadata = format!("chk-{id}/_metadata");
    let rule = || Match::op(Op::Put).path_ends_with(metadata.as_str());
    bed.live.lie(rule(), Lie::AppliedThenError, 1);
    bed.live.fail(rule(), 1_000);
    bed.live
        .fail(Match::op(Op::Get).path_ends_with(metadata.as_str()), 1_000);
    let outcome = acknowledge_all(&mut coord, snaps, id).await;
    match &outcome {
        Err(e) => assert_eq!(e.kind(), ErrorKind::InDoubt, "{e}"),
        Ok(other) => panic!("checkpoint {id} should be in doubt: {other:?}"),
    }
    bed.live.clear_rules();
    let seen = bed.live.requests().len();
    assert!(matches!(
        coord.acknowledge(id, UID, 1, retried).await.unwrap(),
        AckOutcome::Discarded
    ));
    let deletes: Vec<_> = bed.live.requests()[seen..]
        .iter()
        .filter(|r| r.op == Op::Delete)
        .cloned()
        .collect();
    assert!(
        deletes.is_empty(),
        "a retried acknowledgement of a checkpoint in doubt deleted {deletes:?}"
    );
    let stored_c = bed
        .plain
        .checkpoints()
        .await
        .unwrap()
        .completed
        .into_iter()
        .find(|m| m.checkpoint_id == id)
        .expect("the first put stored it");
    assert_whole_on_storage(&bed.plain, &stored_c, "while in doubt").await;
    for s in &subs {
        s.backend.notify_checkpoint_aborted(id);
    }

    write(&subs, 50, 30, 3);
    let d = checkpoint(&mut coord, &subs, &bed.job).await;
    assert_every_completed_checkpoint_whole(&bed.plain, "after the next checkpoint").await;
    let latest = bed.plain.latest_completed().await.unwrap().unwrap();
    assert_eq!(latest.checkpoint_id, d.checkpoint_id);
    assert_eq!(
        coord
            .retained()
            .map(|m| m.checkpoint_id)
            .collect::<Vec<_>>(),
        vec![d.checkpoint_id],
        "the settled checkpoint is subsumed like any other"
    );
}

// ---------------------------------------------------------------------------------------
// Randomized schedules
// ---------------------------------------------------------------------------------------

/// A wall-clock time (ms) after every object written so far and not after any object
/// written later: the in-memory store stamps objects with the wall clock, in ms.
async fn mark() -> u64 {
    tokio::time::sleep(Duration::from_millis(2)).await;
    now_ms()
}

/// A sweep in progress on the second actor's storage; every request it makes is held
/// until the schedule releases it.
struct Sweeper {
    gate: rockstate::testing::Gate,
    task: tokio::task::JoinHandle<rockstate::Result<rockstate::checkpoint::SweepReport>>,
}

/// Waits until the sweep holds its next request at the gate, or ends (then it is
/// removed).
async fn sweep_settles(sweeper: &mut Option<Sweeper>) {
    let Some(s) = sweeper.as_mut() else { return };
    let ended = tokio::select! {
        result = &mut s.task => Some(result.expect("the sweep task panicked")),
        _ = s.gate.wait_arrived() => None,
    };
    if let Some(result) = ended {
        if let Err(e) = result {
            eprintln!("sweep failed: {e}");
        }
        *sweeper = None;
    }
}

/// Objects beside the job directory that nothing may touch.
const NEIGHBOURS: [&str; 2] = ["jobx/shared/n.sst", "other/job/chk-1/_metadata"];

fn inside_job(path: &str) -> bool {
    path == JOB || path.starts_with(&format!("{JOB}/"))
}

/// The invariants, checked after every step:
/// - every file of every completed checkpoint exists with its recorded size;
/// - a `_metadata` the store accepted disappears only once a newer checkpoint completed;
/// - no request touches anything outside the job directory, and its neighbours are intact.
async fn check_invariants(bed: &Bed, landed: &BTreeSet<u64>, when: &str) {
    let completed = bed.plain.checkpoints().await.unwrap().completed;
    for meta in &completed {
        assert_whole_on_storage(&bed.plain, meta, when).await;
    }
    let newest = completed.last().map_or(0, |m| m.checkpoint_id);
    let stored = stored(&bed.plain).await;
    for id in landed {
        let path = format!("chk-{id}/_metadata");
        if stored.contains_key(&path) || newest > *id {
            continue;
        }
        let deleted_by: Vec<&str> = [("the job", &bed.live), ("the sweep", &bed.other)]
            .into_iter()
            .filter(|(_, store)| {
                store
                    .requests()
                    .iter()
                    .any(|r| r.op == Op::Delete && r.path == format!("{JOB}/{path}"))
            })
            .map(|(who, _)| who)
            .collect();
        panic!(
            "{when}: the _metadata of checkpoint {id} was stored and is gone (deleted by {deleted_by:?}), while no newer checkpoint completed (newest: {newest})"
        );
    }
    for (who, store) in [("job", &bed.live), ("sweep", &bed.other)] {
        for r in store.requests() {
            assert!(
                inside_job(&r.path) && r.from.as_deref().is_none_or(inside_job),
                "{when}: the {who} touched {r:?}, outside the job directory"
            );
        }
    }
    for path in NEIGHBOURS {
        assert!(
            bed.top.size_of(path).await.is_ok(),
            "{when}: {path}, beside the job directory, is gone"
        );
    }
}

/// The state of one randomized schedule.
struct Schedule {
    seed: u64,
    rng: SeededRng,
    bed: Bed,
    subs: Vec<Subtask>,
    options: CoordinatorOptions,
    coord: CheckpointCoordinator,
    /// Checkpoints in flight and when they were triggered (ms).
    triggered: BTreeMap<u64, u64>,
    /// Snapshots uploaded and not acknowledged yet.
    unacked: Vec<(u64, u32, SubtaskSnapshot)>,
    snapshotted: BTreeSet<(u64, u32)>,
    /// Completion notices not delivered yet.
    undelivered: Vec<(u64, u32)>,
    /// Checkpoints whose `_metadata` the store accepted.
    landed: BTreeSet<u64>,
    sweeper: Option<Sweeper>,
    version: u64,
    /// A coordinator a restart left running: a stale writer of an older epoch.
    zombie: Option<CheckpointCoordinator>,
    /// Checkpoints a rollback abandoned: never "latest" again.
    abandoned: BTreeSet<u64>,
}

const PARALLELISM: u32 = 2;

impl Schedule {
    async fn new(seed: u64, dir: &Path) -> Self {
        let mut rng = SeededRng::new(seed);
        let bed = bed();
        for path in NEIGHBOURS {
            bed.top.put_if_absent(path, "n".into()).await.unwrap();
        }
        let options = CoordinatorOptions {
            num_retained: 1 + rng.index(2),
            max_concurrent: 2,
            ..CoordinatorOptions::default()
        };
        let coord =
            CheckpointCoordinator::start(bed.job.clone(), JOB, spec(PARALLELISM), options.clone())
                .await
                .unwrap();
        Self {
            seed,
            rng,
            bed,
            subs: subtasks(dir, PARALLELISM),
            options,
            coord,
            triggered: BTreeMap::new(),
            unacked: Vec::new(),
            snapshotted: BTreeSet::new(),
            undelivered: Vec::new(),
            landed: BTreeSet::new(),
            sweeper: None,
            version: 0,
            zombie: None,
            abandoned: BTreeSet::new(),
        }
    }

    fn write(&mut self) {
        let s = &self.subs[self.rng.index(self.subs.len())];
        self.version += 1;
        for _ in 0..20 {
            let k = s.keys[self.rng.index(s.keys.len())];
            s.state.put(&k, &self.version).unwrap();
        }
        if self.rng.percent(80) {
            s.backend.flush().unwrap();
        }
    }

    async fn trigger(&mut self) {
        let at = mark().await;
        if let Ok(id) = self.coord.trigger() {
            self.triggered.insert(id, at);
        }
    }

    async fn snapshot(&mut self, id: u64, i: u32) {
        if self.snapshotted.insert((id, i)) {
            let snap = snapshot(&self.subs[i as usize], &self.bed.job, id, i).await;
            self.unacked.push((id, i, snap));
        }
    }

    /// Acknowledges `self.unacked[index]`; the commit it may lead to is ambiguous at times.
    async fn acknowledge(&mut self, index: usize, when: &str) {
        let (id, i, snap) = self.unacked.remove(index);
        let metadata = format!("chk-{id}/_metadata");
        let lie = match self.rng.below(10) {
            0 | 1 => Some(Lie::AppliedThenAlreadyExists),
            2 | 3 => Some(Lie::AppliedThenError),
            _ => None,
        };
        let rule = || Match::op(Op::Put).path_ends_with(metadata.as_str());
        if let Some(lie) = lie {
            self.bed.live.lie(rule(), lie, 1);
            if lie == Lie::AppliedThenError {
                // Retries and read-backs fail too, a few times.
                let puts = self.rng.below(5);
                let gets = self.rng.below(10);
                self.bed.live.fail(rule(), puts);
                self.bed
                    .live
                    .fail(Match::op(Op::Get).path_ends_with(metadata.as_str()), gets);
            }
        }
        let seen = self.bed.live.requests().len();
        let outcome = self.coord.acknowledge(id, UID, i, snap).await;
        self.bed.live.clear_rules();
        let put = self.bed.live.requests()[seen..]
            .iter()
            .any(|r| r.op == Op::Put && r.path.ends_with(&metadata));
        if (lie.is_some() && put) || matches!(outcome, Ok(AckOutcome::Completed(_))) {
            self.landed.insert(id);
        }
        match outcome {
            Ok(AckOutcome::Completed(meta)) => {
                for s in 0..PARALLELISM {
                    self.undelivered.push((meta.checkpoint_id, s));
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("{when}: checkpoint {id} failed: {e}");
                if !self.coord.pending_ids().contains(&id) {
                    for s in &self.subs {
                        s.backend.notify_checkpoint_aborted(id);
                    }
                }
            }
        }
    }

    fn deliver(&mut self, index: usize) {
        let (id, s) = self.undelivered.remove(index);
        self.subs[s as usize].backend.notify_checkpoint_complete(id);
    }

    async fn decline_oldest(&mut self) {
        if let Some(id) = self.coord.pending_ids().first().copied() {
            self.coord.decline(id, "declined").await.unwrap();
            for s in &self.subs {
                s.backend.notify_checkpoint_aborted(id);
            }
        }
    }

    /// Drives the oldest checkpoint in flight (triggering one if none is) to its end:
    /// every subtask snapshots and acknowledges, in a random order; most notices arrive.
    async fn finish_checkpoint(&mut self, when: &str) {
        if self.coord.pending_ids().is_empty() {
            self.trigger().await;
        }
        let Some(id) = self.coord.pending_ids().first().copied() else {
            return;
        };
        for i in 0..PARALLELISM {
            self.snapshot(id, i).await;
        }
        while let Some(index) = self.unacked.iter().position(|(a, _, _)| *a == id) {
            let others = self.unacked.iter().filter(|(a, _, _)| *a == id).count();
            let pick = self.rng.index(others);
            let index = self
                .unacked
                .iter()
                .enumerate()
                .filter(|(_, (a, _, _))| *a == id)
                .nth(pick)
                .map_or(index, |(n, _)| n);
            self.acknowledge(index, when).await;
        }
        let mut n = 0;
        while n < self.undelivered.len() {
            if self.rng.percent(70) {
                self.deliver(n);
            } else {
                n += 1;
            }
        }
    }

    /// Starts a sweep, whose every request waits at a gate, and lets it reach its first
    /// request.
    async fn start_sweep(&mut self) {
        let at = mark().await;
        let now = self.triggered.values().copied().min().unwrap_or(at).min(at) - 1;
        let gate = self.bed.other.gate_persistent(Match::any());
        let job = self.bed.job_other.clone();
        let task = tokio::spawn(async move { sweep(&job, &sweep_now(Duration::ZERO), now).await });
        self.sweeper = Some(Sweeper { gate, task });
        sweep_settles(&mut self.sweeper).await;
    }

    /// Lets the sweep's held request run, until its next one (or its end).
    async fn step_sweep(&mut self) {
        if let Some(s) = &self.sweeper {
            s.gate.release();
        }
        sweep_settles(&mut self.sweeper).await;
    }

    /// A restarted coordinator forgets the snapshots in flight, as a runtime does when it
    /// fails over; their files are orphans.
    ///
    /// Sometimes the old coordinator keeps running as a stale writer (see
    /// [`zombie_step`](Self::zombie_step)).
    async fn restart(&mut self) {
        self.unacked.clear();
        self.snapshotted.clear();
        self.triggered.clear();
        let old = std::mem::replace(
            &mut self.coord,
            CheckpointCoordinator::start(
                self.bed.job.clone(),
                JOB,
                spec(PARALLELISM),
                self.options.clone(),
            )
            .await
            .unwrap(),
        );
        if self.rng.percent(50) {
            self.zombie = Some(old);
        }
    }

    async fn step(&mut self, when: &str) {
        let pending = self.coord.pending_ids();
        self.triggered.retain(|id, _| pending.contains(id));
        let action = self.rng.below(28);
        match action {
            24 | 25 => return self.zombie_step(when).await,
            26 => return self.rollback(when).await,
            27 => return self.restart().await,
            _ => {}
        }
        if (15..=19).contains(&action) {
            match self.sweeper {
                None if self.rng.percent(50) => self.start_sweep().await,
                None => {}
                Some(_) => self.step_sweep().await,
            }
            return;
        }
        // A job step runs while the sweep holds a request. Should the job wait for the
        // sweep (it may, to keep out of its way), the sweep is let go on, request by
        // request, until the step ends.
        let mut sweeper = self.sweeper.take();
        {
            let job = self.job_step(action, pending, when);
            tokio::pin!(job);
            loop {
                tokio::select! {
                    () = &mut job => break,
                    () = tokio::time::sleep(STALL), if sweeper.is_some() => {
                        eprintln!("{when}: the job waits for the sweep; releasing it");
                        if let Some(s) = &sweeper {
                            s.gate.release();
                        }
                        sweep_settles(&mut sweeper).await;
                    }
                }
            }
        }
        self.sweeper = sweeper;
    }

    async fn job_step(&mut self, action: u64, pending: Vec<u64>, when: &str) {
        match action {
            0..=3 | 23 => self.write(),
            4 | 5 => self.trigger().await,
            6..=8 => {
                if !pending.is_empty() {
                    let id = pending[self.rng.index(pending.len())];
                    let i = self.rng.below(u64::from(PARALLELISM)) as u32;
                    self.snapshot(id, i).await;
                }
            }
            9..=11 => {
                if !self.unacked.is_empty() {
                    let index = self.rng.index(self.unacked.len());
                    self.acknowledge(index, when).await;
                }
            }
            12 | 13 => {
                if !self.undelivered.is_empty() {
                    let index = self.rng.index(self.undelivered.len());
                    self.deliver(index);
                }
            }
            14 => self.decline_oldest().await,
            20 | 21 => self.finish_checkpoint(when).await,
            _ => {
                if self.rng.percent(30) {
                    self.restart().await;
                }
            }
        }
    }

    async fn check(&self, when: &str) {
        check_invariants(&self.bed, &self.landed, when).await;
        if let Some(latest) = self.bed.plain.latest_completed().await.unwrap() {
            assert!(
                !self.abandoned.contains(&latest.checkpoint_id),
                "{when}: latest is checkpoint {}, of an abandoned timeline",
                latest.checkpoint_id
            );
        }
    }

    /// The stale writer acts: it commits a checkpoint, declines, expires or discards
    /// everything. It must be fenced, and must neither write a `_metadata` nor delete.
    async fn zombie_step(&mut self, when: &str) {
        let Some(zombie) = self.zombie.as_mut() else {
            return;
        };
        let seen = self.bed.live.requests().len();
        let outcome = match self.rng.below(4) {
            0 => match zombie.trigger() {
                Ok(id) => {
                    let mut last = Ok(AckOutcome::Pending);
                    for i in 0..PARALLELISM {
                        last = zombie
                            .acknowledge(id, UID, i, SubtaskSnapshot::default())
                            .await;
                    }
                    last.map(|_| ())
                }
                Err(_) => Ok(()),
            },
            1 => match zombie.pending_ids().first().copied() {
                Some(id) => zombie.decline(id, "zombie").await,
                None => Ok(()),
            },
            2 => zombie.abort_expired().await.map(|_| ()),
            _ => zombie.shutdown(true).await,
        };
        if let Err(e) = &outcome {
            assert_eq!(e.kind(), ErrorKind::Fenced, "{when}: the stale writer: {e}");
        }
        for r in &self.bed.live.requests()[seen..] {
            assert!(
                r.op != Op::Delete && !(r.op == Op::Put && r.path.ends_with("/_metadata")),
                "{when}: the stale writer wrote or deleted: {r:?} (its outcome: {outcome:?})"
            );
        }
    }

    /// The job goes back to its oldest retained checkpoint (a rollback): every newer one
    /// is abandoned. The subtasks upload afresh, as restored backends would.
    async fn rollback(&mut self, when: &str) {
        let completed = self.bed.plain.checkpoints().await.unwrap().completed;
        if completed.len() < 2 {
            return;
        }
        let to = completed[0].checkpoint_id;
        self.unacked.clear();
        self.snapshotted.clear();
        self.triggered.clear();
        self.undelivered.clear();
        let old = std::mem::replace(
            &mut self.coord,
            CheckpointCoordinator::start_at(
                self.bed.job.clone(),
                JOB,
                spec(PARALLELISM),
                self.options.clone(),
                Arc::new(rockstate::SystemClock),
                StartPoint::Checkpoint(to),
            )
            .await
            .unwrap(),
        );
        if self.rng.percent(50) {
            self.zombie = Some(old);
        }
        for s in &self.subs {
            s.backend.discard_reusable_files();
        }
        let newer: Vec<u64> = self.landed.iter().copied().filter(|id| *id > to).collect();
        for id in newer {
            self.landed.remove(&id);
            self.abandoned.insert(id);
        }
        let latest = self.bed.plain.latest_completed().await.unwrap();
        assert_eq!(
            latest.map(|m| m.checkpoint_id),
            Some(to),
            "{when}: after the rollback to checkpoint {to}"
        );
    }

    /// The sweep finishes, completions are delivered, one clean checkpoint, a last sweep.
    async fn quiesce(&mut self) {
        let seed = self.seed;
        if let Some(s) = self.sweeper.take() {
            s.gate.open();
            if let Err(e) = s.task.await.unwrap() {
                eprintln!("seed {seed}: sweep failed: {e}");
            }
        }
        self.check(&format!("seed {seed} after the last sweep"))
            .await;
        while !self.undelivered.is_empty() {
            self.deliver(0);
        }
        for id in self.coord.pending_ids() {
            self.coord.decline(id, "quiesce").await.unwrap();
            for s in &self.subs {
                s.backend.notify_checkpoint_aborted(id);
            }
        }
        self.unacked.clear();
        mark().await;
        let id = self.coord.trigger().unwrap();
        let mut snaps = Vec::new();
        for (i, s) in self.subs.iter().enumerate() {
            snaps.push(snapshot(s, &self.bed.job, id, i as u32).await);
        }
        match acknowledge_all(&mut self.coord, snaps, id).await {
            Ok(AckOutcome::Completed(_)) => {
                self.landed.insert(id);
                for s in &self.subs {
                    s.backend.notify_checkpoint_complete(id);
                }
            }
            other => panic!("seed {seed}: once faults stop, a checkpoint completes: {other:?}"),
        }
        self.check(&format!("seed {seed} end")).await;
        let now = mark().await - 1;
        sweep(&self.bed.job_other, &sweep_now(Duration::ZERO), now)
            .await
            .unwrap();
        self.check(&format!("seed {seed} after a final sweep"))
            .await;
    }
}

/// One schedule: a coordinator (restarted now and then, sometimes leaving the old one
/// running as a stale writer that must be fenced, sometimes rolled back to its oldest
/// retained checkpoint), two subtasks snapshotting and
/// acknowledging in any order with late completion notices, ambiguous `_metadata` commits
/// (stored then answered `AlreadyExists`, or stored then answered with errors while
/// retries and read-backs fail), and sweeps whose every request is held and released at
/// points the seed chooses, interleaved with the job's steps. The invariants are checked
/// after every step.
///
/// The sweeps run with grace 0 at a `now` just before the oldest checkpoint in flight was
/// triggered: files of checkpoints in flight are what the grace period protects (see
/// [`SweepOptions::grace`]); every other file is protected only by the references of
/// completed checkpoints.
async fn schedule(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut schedule = Schedule::new(seed, dir.path()).await;
    for step in 0..50 {
        let when = format!("seed {seed} step {step}");
        schedule.step(&when).await;
        schedule.check(&when).await;
    }
    schedule.quiesce().await;
}

/// Seeded randomized schedules (`ROCKSTATE_SCHEDULES`, default 1000; `ROCKSTATE_SEED`
/// replays one): see [`schedule`].
///
/// Proves: under any interleaving of the job, concurrent sweeps and ambiguous commits,
/// no completed checkpoint ever references a missing file, no stored `_metadata` is lost
/// before it is subsumed, and nothing outside the job directory is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_schedules_keep_every_completed_checkpoint_whole() {
    let seeds: Vec<u64> = match std::env::var("ROCKSTATE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(seed) => vec![seed],
        None => {
            let n = std::env::var("ROCKSTATE_SCHEDULES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            (0..n).collect()
        }
    };
    for seed in seeds {
        schedule(seed).await;
    }
}
