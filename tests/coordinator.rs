//! Checkpoint coordinator: completion, retention, resume from latest, sweep, and a seeded
//! randomized test of concurrent, aborted and delayed checkpoints with coordinator restarts.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::collect;
use rockstate::checkpoint::{redistribute, sweep, OperatorState, Redistribution, SweepOptions};
use rockstate::testing::SeededRng;
use rockstate::{
    AckOutcome, BackendOptions, CheckpointCoordinator, CheckpointMetadata, CheckpointStorage,
    CoordinatorOptions, ErrorKind, KeyedStateHandle, ManualClock, OperatorSpec, RocksStateBackend,
    SubtaskSnapshot, ValueState, ValueStateDescriptor,
};

const UID: &str = "counter";
const MAX_PAR: u32 = 16;

fn spec(parallelism: u32) -> Vec<OperatorSpec> {
    vec![OperatorSpec {
        uid: UID.into(),
        parallelism,
        max_parallelism: MAX_PAR,
    }]
}

/// The directory of job "job" in the in-memory store `name`.
fn job_storage(name: &str) -> CheckpointStorage {
    CheckpointStorage::open(&format!("memory://{name}"))
        .unwrap()
        .child("job")
        .unwrap()
}

/// A coordinator with default options for `parallelism` subtasks of the operator.
async fn start(job: &CheckpointStorage, parallelism: u32) -> CheckpointCoordinator {
    CheckpointCoordinator::start(
        job.clone(),
        "job",
        spec(parallelism),
        CoordinatorOptions::default(),
    )
    .await
    .unwrap()
}

struct Subtask {
    backend: RocksStateBackend,
    state: ValueState<u64, u64>,
    keys: Vec<u64>,
}

fn subtasks(dir: &Path, parallelism: u32) -> Vec<Subtask> {
    (0..parallelism)
        .map(|i| {
            let options =
                BackendOptions::for_subtask(dir.join(format!("s{i}")), i, parallelism, MAX_PAR)
                    .unwrap();
            let backend = RocksStateBackend::open(options).unwrap();
            let state = backend
                .register(ValueStateDescriptor::<u64, u64>::new("v"))
                .unwrap();
            let keys = (0..)
                .filter(|k| rockstate::subtask_for_key(k, parallelism, MAX_PAR).unwrap() == i)
                .take(200)
                .collect();
            Subtask {
                backend,
                state,
                keys,
            }
        })
        .collect()
}

async fn snapshot(s: &Subtask, job: &CheckpointStorage, id: u64, i: u32) -> SubtaskSnapshot {
    rockstate::testing::fixtures::snapshot_subtask(&s.backend, job, UID, i, id).await
}

/// Every file referenced by `metas` exists in storage.
async fn assert_referenced_files_exist(
    job: &CheckpointStorage,
    metas: &[CheckpointMetadata],
    when: &str,
) {
    let stored: BTreeSet<String> = job
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.path)
        .collect();
    for meta in metas {
        for path in meta.referenced_paths() {
            assert!(
                stored.contains(path),
                "{when}: checkpoint {} references missing {path}",
                meta.checkpoint_id
            );
        }
    }
}

fn shared_paths(metas: &[CheckpointMetadata]) -> BTreeSet<String> {
    metas
        .iter()
        .flat_map(|m| {
            m.handles()
                .flat_map(|(_, h)| h.shared.iter().map(|f| f.path.clone()))
        })
        .collect()
}

async fn stored_under(job: &CheckpointStorage, prefix: &str) -> BTreeSet<String> {
    job.list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.path)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_exactly_what_no_retained_checkpoint_uses() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_storage("retention");
    let subs = subtasks(dir.path(), 2);
    let options = CoordinatorOptions {
        num_retained: 2,
        ..Default::default()
    };
    let mut coord = CheckpointCoordinator::start(job.clone(), "job", spec(2), options)
        .await
        .unwrap();
    for round in 0..6u64 {
        for s in &subs {
            for k in s.keys.iter().skip(round as usize * 20).take(40) {
                s.state.put(k, &round).unwrap();
            }
            s.backend.flush().unwrap();
        }
        let id = coord.trigger().unwrap();
        let mut completed = None;
        for (i, s) in subs.iter().enumerate() {
            let snap = snapshot(s, &job, id, i as u32).await;
            if let AckOutcome::Completed(meta) =
                coord.acknowledge(id, UID, i as u32, snap).await.unwrap()
            {
                completed = Some(meta);
            }
        }
        assert_eq!(completed.unwrap().checkpoint_id, id);
        for s in &subs {
            s.backend.notify_checkpoint_complete(id);
        }
        let retained: Vec<CheckpointMetadata> = coord.retained().cloned().collect();
        assert!(retained.len() <= 2);
        assert_eq!(
            stored_under(&job, "shared").await,
            shared_paths(&retained),
            "round {round}"
        );
        let dirs: BTreeSet<String> = job.list_dirs("").await.unwrap().into_iter().collect();
        let expected: BTreeSet<String> = retained
            .iter()
            .map(|m| format!("chk-{}", m.checkpoint_id))
            .chain(["shared".to_string(), "_epochs".to_string()])
            .collect();
        assert_eq!(dirs, expected);
        assert_referenced_files_exist(&job, &retained, "retention").await;
    }
    // Retain on cancel: shutting down keeps the latest; discarding deletes everything.
    coord.shutdown(false).await.unwrap();
    assert!(job.latest_completed().await.unwrap().is_some());
    let mut coord = start(&job, 2).await;
    assert_eq!(
        coord.retained().count(),
        1,
        "surplus checkpoints are subsumed on start"
    );
    assert_referenced_files_exist(
        &job,
        &coord.retained().cloned().collect::<Vec<_>>(),
        "restart",
    )
    .await;
    coord.shutdown(true).await.unwrap();
    assert!(data_files(&job).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_storage("acks");
    let subs = subtasks(dir.path(), 2);
    let mut coord = start(&job, 2).await;
    let id = coord.trigger().unwrap();
    let busy = coord
        .trigger()
        .expect_err("max one concurrent checkpoint by default");
    assert_eq!(busy.kind(), ErrorKind::Unavailable, "{busy}");
    let snap0 = snapshot(&subs[0], &job, id, 0).await;
    let err = coord
        .acknowledge(id, "other", 0, snap0.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("counter"), "{err}");
    let err = coord
        .acknowledge(id, UID, 1, snap0.clone())
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::InvalidArgument,
        "wrong key groups for subtask 1"
    );
    assert!(matches!(
        coord.acknowledge(id, UID, 0, snap0.clone()).await.unwrap(),
        AckOutcome::Pending
    ));
    assert!(coord.acknowledge(id, UID, 0, snap0).await.is_err(), "twice");
    coord.decline(id, "subtask 1 failed").await.unwrap();
    assert!(
        job.list("shared").await.unwrap().is_empty(),
        "aborted files deleted"
    );
    let late = snapshot(&subs[1], &job, id, 1).await;
    assert!(matches!(
        coord.acknowledge(id, UID, 1, late).await.unwrap(),
        AckOutcome::Discarded
    ));
    assert!(
        data_files(&job).await.is_empty(),
        "late acknowledgement's files deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_abort_and_operator_state_travels_in_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_storage("timeouts");
    let subs = subtasks(dir.path(), 2);
    let clock = ManualClock::new(0);
    let options = CoordinatorOptions {
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let mut coord = CheckpointCoordinator::start_with_clock(
        job.clone(),
        "job",
        spec(2),
        options,
        Arc::new(clock.clone()),
    )
    .await
    .unwrap();
    let id = coord.trigger().unwrap();
    clock.advance(Duration::from_secs(4));
    assert!(coord.abort_expired().await.unwrap().is_empty());
    clock.advance(Duration::from_secs(1));
    assert_eq!(coord.abort_expired().await.unwrap(), vec![id]);

    // An acknowledgement arriving after the timeout never completes the checkpoint, even
    // before anyone aborted it.
    let late = coord.trigger().unwrap();
    let snap = snapshot(&subs[0], &job, late, 0).await;
    clock.advance(Duration::from_secs(6));
    assert!(matches!(
        coord.acknowledge(late, UID, 0, snap).await.unwrap(),
        AckOutcome::Discarded
    ));
    assert!(coord.pending_ids().is_empty());
    assert!(data_files(&job).await.is_empty(), "its files are deleted");

    let id = coord.trigger().unwrap();
    for (i, s) in subs.iter().enumerate() {
        let mut snap = snapshot(s, &job, id, i as u32).await;
        snap.operator_state
            .put("offsets", Redistribution::Split, vec![vec![i as u8]]);
        coord.acknowledge(id, UID, i as u32, snap).await.unwrap();
    }
    let latest = job.latest_completed().await.unwrap().unwrap();
    assert_eq!(latest.checkpoint_id, id);
    let states: Vec<OperatorState> = latest.operators[0]
        .subtasks
        .iter()
        .map(|s| s.operator_state.clone())
        .collect();
    let three = redistribute(&states, 3).unwrap();
    let all: Vec<Vec<u8>> = three
        .iter()
        .flat_map(|s| s.get("offsets").to_vec())
        .collect();
    assert_eq!(all, vec![vec![0], vec![1]]);
}

/// Writes a `chk-N` the way a crash would leave it, on top of a completed checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_latest_after_crashes_and_damage() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_storage("resume");
    let subs = subtasks(dir.path(), 1);
    let options = CoordinatorOptions {
        num_retained: 2,
        ..Default::default()
    };
    let mut coord = CheckpointCoordinator::start(job.clone(), "job", spec(1), options.clone())
        .await
        .unwrap();
    let mut completed = Vec::new();
    for round in 0..2u64 {
        for k in &subs[0].keys {
            subs[0].state.put(k, &round).unwrap();
        }
        let id = coord.trigger().unwrap();
        let snap = snapshot(&subs[0], &job, id, 0).await;
        coord.acknowledge(id, UID, 0, snap).await.unwrap();
        subs[0].backend.notify_checkpoint_complete(id);
        completed.push(id);
    }
    drop(coord);
    assert_eq!(
        job.latest_completed().await.unwrap().unwrap().checkpoint_id,
        completed[1]
    );

    // Crash mid-upload: some files of checkpoint 3, no _metadata.
    subs[0].state.put(&subs[0].keys[0], &99).unwrap();
    let partial = snapshot(&subs[0], &job, 3, 0).await;
    let handle = partial.keyed.unwrap().as_files().unwrap().clone();
    job.delete(&handle.private[0].path).await.unwrap();
    assert_eq!(
        job.latest_completed().await.unwrap().unwrap().checkpoint_id,
        completed[1]
    );
    // Crash between the uploads and _metadata: every file of checkpoint 4, no _metadata.
    let full = snapshot(&subs[0], &job, 4, 0).await;
    assert_eq!(
        job.latest_completed().await.unwrap().unwrap().checkpoint_id,
        completed[1]
    );

    // A damaged newest _metadata: resume falls back to the previous checkpoint.
    let path = format!("chk-{}/_metadata", completed[1]);
    let mut bytes = job.read_small(&path, 1 << 20).await.unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    job.delete(&path).await.unwrap();
    job.put_if_absent(&path, bytes.into()).await.unwrap();
    let latest = job.latest_completed().await.unwrap().unwrap();
    assert_eq!(latest.checkpoint_id, completed[0]);

    // The job restores from it.
    let handle0: &KeyedStateHandle = latest.handles().next().unwrap().1;
    let target = tempfile::tempdir().unwrap();
    let options0 = BackendOptions::for_subtask(target.path().join("db"), 0, 1, MAX_PAR).unwrap();
    let restored = RocksStateBackend::restore(options0, handle0, &job)
        .await
        .unwrap();
    let v = restored
        .register(ValueStateDescriptor::<u64, u64>::new("v"))
        .unwrap();
    assert_eq!(v.get(&subs[0].keys[5]).unwrap(), Some(0));
    assert_eq!(collect(v.all_keys().unwrap()).len(), 200);

    // A restarted coordinator continues above every id seen, and the sweep removes the
    // leftovers of the crashed checkpoints but not the damaged one's shared files.
    let mut coord = CheckpointCoordinator::start(job.clone(), "job", spec(1), options)
        .await
        .unwrap();
    assert!(coord.trigger().unwrap() > 4);
    let report = sweep(
        &job,
        &SweepOptions {
            grace: Duration::ZERO,
            dry_run: false,
        },
        u64::MAX / 2,
    )
    .await
    .unwrap();
    assert_eq!(report.unreadable.len(), 1);
    let dirs = job.list_dirs("").await.unwrap();
    assert!(
        !dirs.contains(&"chk-3".to_string()) && !dirs.contains(&"chk-4".to_string()),
        "{dirs:?}"
    );
    for f in full.keyed.unwrap().as_files().unwrap().new_shared() {
        assert!(
            job.read_small(&f.path, u64::MAX).await.is_ok(),
            "shared files are kept while a _metadata is unreadable"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_respects_grace_and_dry_run() {
    let job = job_storage("sweep");
    job.put_if_absent("shared/orphan.sst", "xx".into())
        .await
        .unwrap();
    job.put_if_absent("chk-7/abc/0/CURRENT", "x".into())
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let report = sweep(&job, &SweepOptions::default(), now).await.unwrap();
    assert_eq!(
        (report.orphans.len(), report.too_young),
        (0, 2),
        "younger than an hour"
    );
    let later = now + 2 * 3600 * 1000;
    let dry = sweep(
        &job,
        &SweepOptions {
            dry_run: true,
            ..Default::default()
        },
        later,
    )
    .await
    .unwrap();
    assert_eq!(dry.orphans.len(), 2);
    assert_eq!(dry.orphan_bytes, 3);
    assert_eq!(data_files(&job).await.len(), 2, "dry run deletes nothing");
    sweep(&job, &SweepOptions::default(), later).await.unwrap();
    assert!(data_files(&job).await.is_empty());
}

/// One randomized schedule: two concurrent checkpoints, acknowledgements in any order,
/// declines, timeouts, delayed completion notifications and coordinator restarts.
async fn schedule(seed: u64) {
    let mut rng = SeededRng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let job = CheckpointStorage::open(&format!("memory://schedule-{seed}"))
        .unwrap()
        .child("job")
        .unwrap();
    let parallelism = 2;
    let subs = subtasks(dir.path(), parallelism);
    let options = CoordinatorOptions {
        num_retained: rng.range(1, 2) as usize,
        max_concurrent: 2,
        ..Default::default()
    };
    let mut coord =
        CheckpointCoordinator::start(job.clone(), "job", spec(parallelism), options.clone())
            .await
            .unwrap();
    // Snapshots taken but not yet acknowledged, and completions not yet delivered.
    let mut unacked: Vec<(u64, u32, SubtaskSnapshot)> = Vec::new();
    let mut snapshotted: BTreeSet<(u64, u32)> = BTreeSet::new();
    let mut undelivered: Vec<(u64, u32)> = Vec::new();
    let mut version = 0u64;
    for step in 0..60 {
        match rng.below(11) {
            0 | 1 | 10 => {
                let s = &subs[rng.below(u64::from(parallelism)) as usize];
                version += 1;
                for _ in 0..20 {
                    let k = s.keys[rng.index(s.keys.len())];
                    s.state.put(&k, &version).unwrap();
                }
                if rng.chance(0.8) {
                    s.backend.flush().unwrap();
                }
            }
            2 => {
                let _ = coord.trigger();
                let _ = coord.trigger();
            }
            3 | 4 => {
                let pending = coord.pending_ids();
                if pending.is_empty() {
                    continue;
                }
                let id = pending[rng.index(pending.len())];
                let i = rng.below(u64::from(parallelism)) as u32;
                if snapshotted.insert((id, i)) {
                    let snap = snapshot(&subs[i as usize], &job, id, i).await;
                    unacked.push((id, i, snap));
                }
            }
            5 | 6 => {
                if unacked.is_empty() {
                    continue;
                }
                let (id, i, snap) = unacked.remove(rng.index(unacked.len()));
                match coord.acknowledge(id, UID, i, snap).await {
                    Ok(AckOutcome::Completed(meta)) => {
                        for s in 0..parallelism {
                            undelivered.push((meta.checkpoint_id, s));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => assert_eq!(
                        e.kind(),
                        ErrorKind::NotFound,
                        "seed {seed} step {step}: {e}"
                    ),
                }
            }
            7 => {
                if !undelivered.is_empty() {
                    let (id, s) = undelivered.remove(rng.index(undelivered.len()));
                    subs[s as usize].backend.notify_checkpoint_complete(id);
                }
            }
            8 => {
                let pending = coord.pending_ids();
                if let Some(id) = pending.first() {
                    coord.decline(*id, "declined").await.unwrap();
                    for s in &subs {
                        s.backend.notify_checkpoint_aborted(*id);
                    }
                }
            }
            _ => {
                if rng.chance(0.3) {
                    // A coordinator restart discards the snapshots in flight, as a runtime
                    // does when it fails over; their files are left for the sweep.
                    unacked.clear();
                    snapshotted.clear();
                    drop(coord);
                    coord = CheckpointCoordinator::start(
                        job.clone(),
                        "job",
                        spec(parallelism),
                        options.clone(),
                    )
                    .await
                    .unwrap();
                }
            }
        }
        let retained: Vec<CheckpointMetadata> = coord.retained().cloned().collect();
        assert_referenced_files_exist(&job, &retained, &format!("seed {seed} step {step}")).await;
    }
    // Quiesce: deliver everything, finish with one clean checkpoint, sweep.
    for (id, s) in undelivered.drain(..) {
        subs[s as usize].backend.notify_checkpoint_complete(id);
    }
    for id in coord.pending_ids() {
        coord.decline(id, "quiesce").await.unwrap();
        for s in &subs {
            s.backend.notify_checkpoint_aborted(id);
        }
    }
    let id = coord.trigger().unwrap();
    for (i, s) in subs.iter().enumerate() {
        let snap = snapshot(s, &job, id, i as u32).await;
        coord.acknowledge(id, UID, i as u32, snap).await.unwrap();
        s.backend.notify_checkpoint_complete(id);
    }
    let retained: Vec<CheckpointMetadata> = coord.retained().cloned().collect();
    assert_referenced_files_exist(&job, &retained, &format!("seed {seed} end")).await;
    sweep(
        &job,
        &SweepOptions {
            grace: Duration::ZERO,
            dry_run: false,
        },
        u64::MAX / 2,
    )
    .await
    .unwrap();
    assert_eq!(
        stored_under(&job, "shared").await,
        shared_paths(&retained),
        "seed {seed}: leak"
    );
    assert_referenced_files_exist(&job, &retained, &format!("seed {seed} after sweep")).await;
    // The latest checkpoint restores to the live state of every subtask.
    let latest = job.latest_completed().await.unwrap().unwrap();
    for (_, handle) in latest.handles() {
        let i = handle.key_group_range.start() as usize * parallelism as usize / MAX_PAR as usize;
        let target = tempfile::tempdir().unwrap();
        let o =
            BackendOptions::for_subtask(target.path().join("db"), i as u32, parallelism, MAX_PAR)
                .unwrap();
        let restored = RocksStateBackend::restore(o, handle, &job).await.unwrap();
        let v = restored
            .register(ValueStateDescriptor::<u64, u64>::new("v"))
            .unwrap();
        let live: BTreeMap<u64, u64> = subs[i]
            .keys
            .iter()
            .filter_map(|k| subs[i].state.get(k).unwrap().map(|x| (*k, x)))
            .collect();
        let got: BTreeMap<u64, u64> = subs[i]
            .keys
            .iter()
            .filter_map(|k| v.get(k).unwrap().map(|x| (*k, x)))
            .collect();
        assert_eq!(got, live, "seed {seed}: restored subtask {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_schedules_never_lose_or_leak_files() {
    let schedules: u64 = std::env::var("ROCKSTATE_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for seed in 0..schedules {
        schedule(seed).await;
    }
}

/// The race behind Flink's FLINK-25395: a subtask whose completion notice is late reuses
/// files of a checkpoint that a newer completion already subsumed. The checkpoint must fail
/// (rule 3) rather than complete referencing a deleted file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_of_subsumed_files_fails_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_storage("late-notice");
    let subs = subtasks(dir.path(), 1);
    let s = &subs[0];
    let options = CoordinatorOptions {
        max_concurrent: 2,
        ..Default::default()
    };
    let mut coord = CheckpointCoordinator::start(job.clone(), "job", spec(1), options)
        .await
        .unwrap();
    let write = |v: u64| {
        for k in &s.keys {
            s.state.put(k, &v).unwrap();
        }
        s.backend.flush().unwrap();
    };

    write(1);
    let c1 = coord.trigger().unwrap();
    let snap = snapshot(s, &job, c1, 0).await;
    coord.acknowledge(c1, UID, 0, snap).await.unwrap();
    s.backend.notify_checkpoint_complete(c1);

    write(2);
    let c2 = coord.trigger().unwrap();
    let c3 = coord.trigger().unwrap();
    let snap3 = snapshot(s, &job, c3, 0).await;
    let snap2 = snapshot(s, &job, c2, 0).await;
    assert!(matches!(
        coord.acknowledge(c2, UID, 0, snap2).await.unwrap(),
        AckOutcome::Completed(_)
    ));
    s.backend.notify_checkpoint_complete(c2);
    assert!(matches!(
        coord.acknowledge(c3, UID, 0, snap3).await.unwrap(),
        AckOutcome::Completed(_)
    ));
    // The notice of c3 is late: the subtask still reuses c2's files, which c3 subsumed.

    let c4 = coord.trigger().unwrap();
    let snap4 = snapshot(s, &job, c4, 0).await;
    let err = coord.acknowledge(c4, UID, 0, snap4).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    s.backend.notify_checkpoint_aborted(c4);
    let retained: Vec<CheckpointMetadata> = coord.retained().cloned().collect();
    assert_eq!(retained.last().unwrap().checkpoint_id, c3);
    assert_referenced_files_exist(&job, &retained, "after the failed checkpoint").await;

    // Once the notice arrives, checkpoints succeed again.
    s.backend.notify_checkpoint_complete(c3);
    let c5 = coord.trigger().unwrap();
    let snap5 = snapshot(s, &job, c5, 0).await;
    assert!(matches!(
        coord.acknowledge(c5, UID, 0, snap5).await.unwrap(),
        AckOutcome::Completed(_)
    ));
    let retained: Vec<CheckpointMetadata> = coord.retained().cloned().collect();
    assert_referenced_files_exist(&job, &retained, "after recovery").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_acknowledgement_never_deletes_committed_files() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_storage("repeat");
    let subs = subtasks(dir.path(), 1);
    let mut coord = start(&job, 1).await;
    let id = coord.trigger().unwrap();
    let snap = snapshot(&subs[0], &job, id, 0).await;
    coord.acknowledge(id, UID, 0, snap.clone()).await.unwrap();
    assert!(matches!(
        coord.acknowledge(id, UID, 0, snap).await.unwrap(),
        AckOutcome::Discarded
    ));
    let retained: Vec<CheckpointMetadata> = coord.retained().cloned().collect();
    assert_referenced_files_exist(&job, &retained, "after a repeated acknowledgement").await;
}

/// Every object of the job directory but the writer epoch records, which outlive every
/// checkpoint (they fence older writers).
async fn data_files(job: &CheckpointStorage) -> Vec<String> {
    job.list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.path)
        .filter(|p| !p.starts_with("_epochs/"))
        .collect()
}

/// The status document a coordinator keeps in its job directory.
///
/// Proves: it is written when something changed and not otherwise before a heartbeat;
/// it shows checkpoints in flight with their acknowledgements, completions with their
/// sync and async parts and bytes, failures with their reason; a reader calls it stale
/// when it is not refreshed for three heartbeats or when a newer writer claimed the job
/// directory, whose old writer then cannot overwrite it; a stopped job's status never
/// turns stale by age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_document_follows_checkpoints_and_turns_stale() {
    use rockstate::checkpoint::status::{read_status, Outcome, RunState};
    let dir = tempfile::tempdir().unwrap();
    let job = job_storage("status");
    let t0 = 1_800_000_000_000;
    let clock = Arc::new(ManualClock::new(t0));
    let mut coordinator = CheckpointCoordinator::start_with_clock(
        job.clone(),
        "job",
        spec(2),
        CoordinatorOptions::default(),
        clock.clone(),
    )
    .await
    .unwrap();
    assert!(read_status(&job, t0).await.unwrap().is_none());
    assert!(coordinator.publish_status(RunState::Running).await.unwrap());
    assert!(!coordinator.publish_status(RunState::Running).await.unwrap());

    let tasks = subtasks(dir.path(), 2);
    for (i, s) in tasks.iter().enumerate() {
        s.state.put(&s.keys[0], &(i as u64 + 1)).unwrap();
    }
    let id = coordinator.trigger().unwrap();
    // Changes are written at most once a second.
    assert!(!coordinator.publish_status(RunState::Running).await.unwrap());
    clock.advance(Duration::from_secs(1));
    assert!(coordinator.publish_status(RunState::Running).await.unwrap());
    let view = read_status(&job, t0).await.unwrap().unwrap();
    assert_eq!(view.stale, None);
    assert_eq!(view.status.in_flight.len(), 1);
    assert_eq!(
        (
            view.status.in_flight[0].id,
            view.status.in_flight[0].acknowledged,
            view.status.in_flight[0].expected
        ),
        (id, 0, 2)
    );

    clock.advance(Duration::from_millis(250));
    coordinator.note_sync_pause(id, Duration::from_millis(12));
    coordinator.note_sync_pause(id, Duration::from_millis(30));
    for (i, s) in tasks.iter().enumerate() {
        let snap = snapshot(s, &job, id, i as u32).await;
        coordinator
            .acknowledge(id, UID, i as u32, snap)
            .await
            .unwrap();
    }
    let failed = coordinator.trigger().unwrap();
    clock.advance(Duration::from_millis(50));
    coordinator
        .decline(failed, "disk full on subtask 1")
        .await
        .unwrap();
    clock.advance(Duration::from_secs(1));
    assert!(coordinator.publish_status(RunState::Running).await.unwrap());
    let view = read_status(&job, clock_now(&clock)).await.unwrap().unwrap();
    let status = &view.status;
    assert_eq!((status.completed, status.failed, status.aborted), (1, 1, 0));
    assert_eq!(status.last_completed_id, Some(id));
    assert!(status.in_flight.is_empty());
    assert_eq!(status.recent[0].id, failed);
    assert_eq!(status.recent[0].outcome, Outcome::Failed);
    assert_eq!(
        status.recent[0].reason.as_deref(),
        Some("disk full on subtask 1")
    );
    let done = status.last_completed().unwrap();
    assert_eq!(done.id, id);
    assert_eq!(
        (done.duration_ms, done.sync_ms, done.async_ms),
        (1_250, Some(30), Some(1_220))
    );
    assert!(done.bytes_uploaded > 0);
    assert_eq!(status.bytes_uploaded, done.bytes_uploaded);

    // Not refreshed: stale after three heartbeats (10 s each), not before.
    let updated = status.updated_ms;
    assert_eq!(
        read_status(&job, updated + 29_000)
            .await
            .unwrap()
            .unwrap()
            .stale,
        None
    );
    let late = read_status(&job, updated + 31_000).await.unwrap().unwrap();
    assert!(late.stale.unwrap().contains("not refreshed"));
    // A heartbeat rewrites an unchanged status.
    clock.advance(Duration::from_secs(10));
    assert!(coordinator.publish_status(RunState::Running).await.unwrap());

    // A newer writer: the old status is stale at once, and the old writer cannot
    // overwrite it any more.
    let mut newer = start(&job, 2).await;
    let view = read_status(&job, clock_now(&clock)).await.unwrap().unwrap();
    assert!(
        view.stale.unwrap().contains("replaced"),
        "{:?}",
        view.status
    );
    let e = coordinator
        .publish_status(RunState::Failed)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fenced);
    assert_eq!(
        read_status(&job, clock_now(&clock))
            .await
            .unwrap()
            .unwrap()
            .status
            .state,
        RunState::Running
    );
    assert!(newer.publish_status(RunState::Running).await.unwrap());
    newer.shutdown(false).await.unwrap();
    assert!(newer.publish_status(RunState::Stopped).await.unwrap());
    let view = read_status(&job, u64::MAX / 2).await.unwrap().unwrap();
    assert_eq!((view.stale, view.status.state), (None, RunState::Stopped));
    assert_eq!(view.status.writer_epoch, view.current_epoch);
    for s in tasks {
        s.backend.close().unwrap();
    }
}

fn clock_now(clock: &ManualClock) -> u64 {
    use rockstate::clock::Clock;
    clock.now_millis()
}

/// A hold keeps a completed checkpoint and its files from retention while something reads
/// it (a savepoint made from it while the job goes on); releasing it lets retention catch
/// up. Only retained checkpoints can be held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_checkpoint_outlives_retention_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_storage("hold");
    let mut coordinator = start(&job, 2).await;
    let tasks = subtasks(dir.path(), 2);
    let backends: Vec<RocksStateBackend> = tasks.into_iter().map(|t| t.backend).collect();
    let first =
        rockstate::testing::fixtures::checkpoint_once(&mut coordinator, &job, UID, &backends).await;
    coordinator.hold(first.checkpoint_id).unwrap();
    assert_eq!(
        coordinator
            .hold(first.checkpoint_id + 100)
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    let mut later = Vec::new();
    for _ in 0..3 {
        later.push(
            rockstate::testing::fixtures::checkpoint_once(&mut coordinator, &job, UID, &backends)
                .await,
        );
    }
    let retained: Vec<u64> = coordinator.retained().map(|m| m.checkpoint_id).collect();
    assert!(retained.contains(&first.checkpoint_id), "{retained:?}");
    assert_referenced_files_exist(&job, std::slice::from_ref(&first), "held").await;
    coordinator.release(first.checkpoint_id).await.unwrap();
    let retained: Vec<u64> = coordinator.retained().map(|m| m.checkpoint_id).collect();
    assert_eq!(retained, vec![later[2].checkpoint_id]);
    assert!(stored_under(&job, &format!("chk-{}", first.checkpoint_id))
        .await
        .is_empty());
    assert_referenced_files_exist(&job, &later[2..], "after release").await;
    for b in backends {
        b.close().unwrap();
    }
}
