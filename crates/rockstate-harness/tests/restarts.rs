//! Restores and retention with the thread harness, with the schedule under control:
//! resuming before the first checkpoint after a restore, restores from other directories
//! staying incremental, rollbacks surviving crashes, and the checkpoints a coordinator
//! keeps for its restore point.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rockstate::testing::fixtures::block_on;
use rockstate::{
    CheckpointMetadata, CheckpointStorage, CoordinatorOptions, RestoreOptions, RestoreSource,
    SavepointFormat,
};
use rockstate_harness::demo::{Counter, DemoSource, DEMO_UID};
use rockstate_harness::{Harness, HarnessConfig, StartFrom};

// ---------------------------------------------------------------------------------------
// Harness-based tests
// ---------------------------------------------------------------------------------------

fn harness_config(job_id: &str, local: &Path, num_retained: usize) -> HarnessConfig {
    HarnessConfig {
        job_id: job_id.into(),
        operator_uid: DEMO_UID.into(),
        parallelism: 2,
        max_parallelism: 128,
        local_root: local.to_path_buf(),
        checkpoint_interval: 0,
        memory_budget: 32 << 20,
        rocksdb_statistics: false,
        coordinator: CoordinatorOptions {
            num_retained,
            ..CoordinatorOptions::default()
        },
    }
}

fn demo_source() -> DemoSource {
    DemoSource::new(11, 20_000, 200_000).unwrap()
}

/// Fraction of a checkpoint's size that it uploaded (or copied) itself.
fn uploaded_fraction(meta: &CheckpointMetadata) -> f64 {
    meta.uploaded_bytes() as f64 / meta.total_size().max(1) as f64
}

/// Job B starts from a savepoint of job A in a directory that still holds B's older
/// checkpoints, and crashes before its first checkpoint completes; then B resumes from
/// the latest.
///
/// Proves: resuming restores the savepoint again (the restore point of the current
/// timeline), never B's abandoned checkpoints and never an empty state.
#[test]
fn resuming_before_the_first_checkpoint_after_a_restore_restores_it_again() {
    let root = tempfile::tempdir().unwrap();
    let storage =
        CheckpointStorage::open(&root.path().join("checkpoints").display().to_string()).unwrap();
    let local = tempfile::tempdir().unwrap();
    let mut b = Harness::start(
        harness_config("b", &local.path().join("b0"), 1),
        &storage,
        demo_source(),
        Counter::factory(),
        StartFrom::Empty,
    )
    .unwrap();
    b.run(30_000).unwrap();
    let old = b.checkpoint_now().unwrap();
    b.cancel().unwrap();

    let mut a = Harness::start(
        harness_config("a", &local.path().join("a"), 1),
        &storage,
        demo_source(),
        Counter::factory(),
        StartFrom::Empty,
    )
    .unwrap();
    a.run(70_000).unwrap();
    let savepoints = storage.child("savepoints").unwrap();
    let savepoint = a
        .savepoint(Some(&savepoints), SavepointFormat::Native)
        .unwrap();
    a.cancel().unwrap();

    let source = block_on(RestoreSource::open(&savepoint.url)).unwrap();
    let mut restored = Harness::start(
        harness_config("b", &local.path().join("b1"), 1),
        &storage,
        demo_source(),
        Counter::factory(),
        StartFrom::Snapshot {
            source: Box::new(source),
            options: RestoreOptions::default(),
        },
    )
    .unwrap();
    restored.run(5_000).unwrap();
    restored.crash();

    let job_b = storage.child("b").unwrap();
    assert!(
        block_on(job_b.latest_completed()).unwrap().is_none(),
        "checkpoint {} belongs to the abandoned timeline",
        old.checkpoint_id
    );
    let resumed = Harness::start(
        harness_config("b", &local.path().join("b2"), 1),
        &storage,
        demo_source(),
        Counter::factory(),
        StartFrom::Latest,
    )
    .unwrap();
    assert_eq!(
        resumed.restored_location(),
        Some(savepoint.url.as_str()),
        "resuming must restore the savepoint again"
    );
    assert_eq!(resumed.position().offsets().iter().sum::<u64>(), 70_000);
    let finished = resumed.finish().unwrap();
    assert!(finished.last_checkpoint.is_some());
}

// ---------------------------------------------------------------------------------------
// 4. Restores from another directory stay incremental
// ---------------------------------------------------------------------------------------

/// Job A takes nine checkpoints; job B restores A's latest (or a native savepoint of A)
/// into its own directory, where ids start at 1, below the restored id.
///
/// Proves: after a restore from another directory, checkpoints are incremental again
/// from the second one on (the first may copy everything): a few small writes upload a
/// small fraction of the state.
#[test]
fn restores_from_another_directory_stay_incremental() {
    let storage = CheckpointStorage::open("memory://incremental-after-restore").unwrap();
    let local = tempfile::tempdir().unwrap();
    let mut a = Harness::start(
        harness_config("a", &local.path().join("a"), 2),
        &storage,
        demo_source(),
        Counter::factory(),
        StartFrom::Empty,
    )
    .unwrap();
    let mut own = Vec::new();
    for round in 0..9 {
        a.run(if round < 8 { 20_000 } else { 2_000 }).unwrap();
        own.push(a.checkpoint_now().unwrap());
    }
    eprintln!(
        "job A uploaded: {:?}",
        own.iter()
            .map(|m| format!("{:.0}%", uploaded_fraction(m) * 100.0))
            .collect::<Vec<_>>()
    );
    // In the same store, so that restores can copy inside it.
    let savepoints = storage.child("savepoints").unwrap();
    let savepoint = a
        .savepoint(Some(&savepoints), SavepointFormat::Native)
        .unwrap();
    let latest = own.last().unwrap().clone();
    assert_eq!(latest.checkpoint_id, 9);
    a.cancel().unwrap();
    let a_fraction = uploaded_fraction(&latest);

    let job_a = storage.child("a").unwrap();
    let folder = savepoints
        .child(savepoint.url.rsplit('/').next().unwrap())
        .unwrap();
    let sources = [
        ("checkpoint", RestoreSource::checkpoint(&job_a, latest)),
        (
            "native savepoint",
            block_on(RestoreSource::open_folder(&folder)).unwrap(),
        ),
    ];
    let mut failures = Vec::new();
    for (n, (what, source)) in sources.into_iter().enumerate() {
        let job_id = format!("b{n}");
        let mut b = Harness::start(
            harness_config(&job_id, &local.path().join(&job_id), 2),
            &storage,
            demo_source(),
            Counter::factory(),
            StartFrom::Snapshot {
                source: Box::new(source),
                options: RestoreOptions::default(),
            },
        )
        .unwrap();
        b.run(2_000).unwrap();
        let first = b.checkpoint_now().unwrap();
        b.run(2_000).unwrap();
        let second = b.checkpoint_now().unwrap();
        b.cancel().unwrap();
        let fraction = uploaded_fraction(&second);
        eprintln!(
            "{what}: first checkpoint uploaded {:.0}%, second {:.0}% (job A's own: {:.0}%)",
            uploaded_fraction(&first) * 100.0,
            fraction * 100.0,
            a_fraction * 100.0
        );
        // SST files the second checkpoint has in common with the first (same local file,
        // same size): unchanged since, they must be referenced, not sent again.
        let mut resent = Vec::new();
        let mut compacted = false;
        for (i, (_, handle)) in second.handles().enumerate() {
            let before = first.handles().nth(i).unwrap().1;
            let earlier: BTreeMap<&str, u64> = before
                .shared
                .iter()
                .map(|f| (f.local_name.as_str(), f.size))
                .collect();
            let now: BTreeSet<&str> = handle
                .shared
                .iter()
                .map(|f| f.local_name.as_str())
                .collect();
            compacted |= earlier.keys().any(|name| !now.contains(name));
            resent.extend(
                handle
                    .new_shared()
                    .filter(|f| earlier.get(f.local_name.as_str()) == Some(&f.size))
                    .map(|f| (f.local_name.clone(), f.size)),
            );
        }
        if !resent.is_empty() {
            failures.push(format!(
                "restored from a {what} of another directory: the second checkpoint ({}) sent {} unchanged SST file(s) again ({} of {} bytes uploaded, {:.0}%): incremental checkpoints are off",
                second.checkpoint_id,
                resent.len(),
                second.uploaded_bytes(),
                second.total_size(),
                fraction * 100.0
            ));
        } else if !compacted && fraction >= 0.5 {
            // Without a compaction in between, a few writes are a small part of the state.
            failures.push(format!(
                "restored from a {what}: the second checkpoint uploaded {:.0}% of its size",
                fraction * 100.0
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 5. Rollback to an older checkpoint
// ---------------------------------------------------------------------------------------

/// Runs job `job_id` from empty state through three checkpoints (two retained); returns
/// them.
fn three_checkpoints(
    storage: &CheckpointStorage,
    job_id: &str,
    local: &Path,
) -> Vec<CheckpointMetadata> {
    let mut h = Harness::start(
        harness_config(job_id, local, 2),
        storage,
        demo_source(),
        Counter::factory(),
        StartFrom::Empty,
    )
    .unwrap();
    let mut taken = Vec::new();
    for _ in 0..3 {
        h.run(10_000).unwrap();
        taken.push(h.checkpoint_now().unwrap());
    }
    h.cancel().unwrap();
    taken
}

/// Checkpoints 1..3 completed; the job is started again from checkpoint 2 of its own
/// directory (a rollback) and crashes before any new checkpoint completes.
///
/// Proves: a rollback starts a new timeline; "latest" never returns checkpoint 3 of the
/// abandoned one, so a resume after the crash continues from 2.
#[test]
fn a_rollback_is_not_undone_by_a_crash() {
    let storage = CheckpointStorage::open("memory://rollback-crash").unwrap();
    let local = tempfile::tempdir().unwrap();
    let taken = three_checkpoints(&storage, "job", local.path());
    let job = storage.child("job").unwrap();
    let two = taken[1].clone();
    let mut h = Harness::start(
        harness_config("job", local.path(), 2),
        &storage,
        demo_source(),
        Counter::factory(),
        StartFrom::Checkpoint(Box::new(two.clone())),
    )
    .unwrap();
    assert_eq!(h.restored_from(), Some(two.checkpoint_id));
    h.run(5_000).unwrap();
    h.crash();
    let latest = block_on(job.latest_completed()).unwrap().unwrap();
    assert_eq!(
        latest.checkpoint_id, two.checkpoint_id,
        "after a rollback to checkpoint {} and a crash, latest is checkpoint {} of the abandoned timeline",
        two.checkpoint_id, latest.checkpoint_id
    );
    let resumed = Harness::start(
        harness_config("job", local.path(), 2),
        &storage,
        demo_source(),
        Counter::factory(),
        StartFrom::Latest,
    )
    .unwrap();
    assert_eq!(resumed.restored_from(), Some(two.checkpoint_id));
    resumed.crash();
}

/// Checkpoints 1..3 completed (2 and 3 retained); the job restarts from checkpoint 2 with
/// one checkpoint retained. Its coordinator starts after the restore.
///
/// Proves: the coordinator of a rolled-back job never deletes the checkpoint it was
/// restored from.
#[test]
fn a_coordinator_keeps_the_older_checkpoint_it_restored() {
    let storage = CheckpointStorage::open("memory://rollback-keep").unwrap();
    let local = tempfile::tempdir().unwrap();
    let taken = three_checkpoints(&storage, "job", local.path());
    let job = storage.child("job").unwrap();
    let two = taken[1].clone();
    let h = Harness::start(
        harness_config("job", local.path(), 1),
        &storage,
        demo_source(),
        Counter::factory(),
        StartFrom::Checkpoint(Box::new(two.clone())),
    )
    .unwrap();
    block_on(rockstate::testing::checks::assert_whole_on_storage(
        &job,
        &two,
        "after starting from checkpoint 2 with one retained",
    ));
    h.crash();
}
