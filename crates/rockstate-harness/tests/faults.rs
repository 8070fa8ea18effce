//! Fault runs: the demo job on a store where about 10% of requests fail (and some are
//! delayed, and some small puts leave a truncated object behind). Checkpoints fail and
//! recover, the job keeps processing, no completed checkpoint ever references a missing or
//! damaged file, and once the faults stop, the orphan sweep leaves exactly the files the
//! completed checkpoints reference. The job's final state equals an uninterrupted run's.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use object_store::local::LocalFileSystem;
use rockstate::checkpoint::{sweep, SweepOptions};
use rockstate::testing::{Faults, FaultyStore, Op};
use rockstate::{CheckpointStorage, CoordinatorOptions, RestoreSource, StateDigest};
use rockstate_harness::demo::{state_digest, Counter, DemoSource, DEMO_UID};
use rockstate_harness::{Harness, HarnessConfig, StartFrom};

/// Events of a run with failing requests: enough checkpoints (one every 1 500 events)
/// that some complete although each fails on any write that lands only in part.
const EVENTS: u64 = 400_000;

/// Events of the run with hung requests (paced).
const HUNG_EVENTS: u64 = 60_000;

fn source(events: u64) -> DemoSource {
    DemoSource::new(5, 1_500, events).unwrap()
}

fn config(local: &std::path::Path, parallelism: u32) -> HarnessConfig {
    HarnessConfig {
        job_id: "faulty".into(),
        operator_uid: DEMO_UID.into(),
        parallelism,
        max_parallelism: 128,
        local_root: local.to_path_buf(),
        checkpoint_interval: 1_500,
        memory_budget: 32 << 20,
        rocksdb_statistics: false,
        coordinator: CoordinatorOptions {
            num_retained: 2,
            timeout: Duration::from_secs(20),
            ..CoordinatorOptions::default()
        },
    }
}

fn reference(events: u64) -> StateDigest {
    let local = tempfile::tempdir().unwrap();
    let storage = CheckpointStorage::open("memory://faults-reference").unwrap();
    let h = Harness::start(
        config(local.path(), 2),
        &storage,
        source(events),
        Counter::factory(),
        StartFrom::Empty,
    )
    .unwrap();
    state_digest(&h.finish().unwrap().backends).unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn faulty_run(seed: u64) {
    let expected = reference(EVENTS);
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let inner = Arc::new(LocalFileSystem::new_with_prefix(&store_dir).unwrap());
    let faulty = Arc::new(
        FaultyStore::new(inner.clone(), seed)
            .with_all(Faults {
                fail: 0.10,
                delay: 0.05,
                ..Faults::default()
            })
            .with(
                Op::Put,
                Faults {
                    fail: 0.07,
                    partial: 0.03,
                    delay: 0.05,
                    ..Faults::default()
                },
            ),
    );
    faulty.arm(false);
    let storage = CheckpointStorage::from_store(faulty.clone(), "faulty://store");
    let mut h = Harness::start(
        config(&dir.path().join("local"), 3),
        &storage,
        source(EVENTS),
        Counter::factory(),
        StartFrom::Empty,
    )
    .unwrap();
    faulty.arm(true);
    // The job keeps processing through failing checkpoints.
    let mut processed = 0;
    loop {
        let n = h.run(500).unwrap();
        processed += n;
        if n == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(processed, EVENTS);
    let completed = h.completed_checkpoints();
    let failed = h.failed_checkpoints();
    let injected = faulty.injected();
    eprintln!(
        "seed {seed}: {} checkpoints completed, {} failed; injected {injected:?}",
        completed.len(),
        failed.len()
    );
    assert!(!failed.is_empty(), "no checkpoint failed: {injected:?}");
    assert!(!completed.is_empty(), "no checkpoint completed: {failed:?}");
    assert!(injected.partial > 0, "{injected:?}");

    // Faults stop; the job finishes with a final checkpoint.
    faulty.arm(false);
    let finished = h.finish().unwrap();
    assert_eq!(state_digest(&finished.backends).unwrap(), expected);
    drop(finished);

    // Every completed checkpoint is sound, read through an honest view of the store.
    let honest = CheckpointStorage::from_store(inner, "file://store");
    let job = honest.child("faulty").unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listing = job.checkpoints().await.unwrap();
        assert!(listing.unreadable.is_empty(), "{:?}", listing.unreadable);
        assert!(!listing.completed.is_empty());
        let mut referenced = BTreeSet::new();
        for meta in &listing.completed {
            let source = RestoreSource::checkpoint(&job, meta.clone());
            let report = source.verify(|_| {}).await.unwrap();
            assert!(
                report.is_sound(),
                "checkpoint {} references bad files: {:?}",
                meta.checkpoint_id,
                report.bad
            );
            referenced.insert(format!("chk-{}/_metadata", meta.checkpoint_id));
            referenced.extend(meta.referenced_paths().map(str::to_string));
        }
        // The sweep leaves exactly what completed checkpoints reference.
        let options = SweepOptions {
            grace: Duration::ZERO,
            dry_run: false,
        };
        let report = sweep(&job, &options, now_ms() + 1_000).await.unwrap();
        eprintln!(
            "sweep: {} orphans ({} bytes) deleted",
            report.orphans.len(),
            report.orphan_bytes
        );
        let left: BTreeSet<String> = job
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.path)
            .filter(|p| !p.starts_with("_epochs/") && p != "_status.json")
            .collect();
        assert_eq!(left, referenced, "files left besides the referenced ones");
    });
}

#[test]
fn ten_percent_failing_requests_seed_1() {
    faulty_run(1);
}

#[test]
fn ten_percent_failing_requests_seed_2() {
    faulty_run(0x5eed_0002);
}

/// Puts that hang for longer than the checkpoint timeout: the checkpoints they belong to
/// time out and are aborted, processing goes on, later checkpoints complete, and the job
/// ends in the reference state with every completed checkpoint sound.
#[test]
fn hung_requests_time_checkpoints_out_without_stopping_the_job() {
    let expected = reference(HUNG_EVENTS);
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let inner = Arc::new(LocalFileSystem::new_with_prefix(&store_dir).unwrap());
    let faulty = Arc::new(
        FaultyStore::new(inner.clone(), 0x4a4e)
            .with(
                Op::Put,
                Faults {
                    hang: 0.02,
                    ..Faults::default()
                },
            )
            .with_times(Duration::from_millis(1), Duration::from_millis(1_500)),
    );
    let storage = CheckpointStorage::from_store(faulty.clone(), "faulty://store");
    let mut config = config(&dir.path().join("local"), 2);
    config.coordinator.timeout = Duration::from_millis(500);
    let mut h = Harness::start(
        config,
        &storage,
        source(HUNG_EVENTS),
        Counter::factory(),
        StartFrom::Empty,
    )
    .unwrap();
    // Paced, so that checkpoints are triggered after the hung ones time out.
    while h.run(500).unwrap() > 0 {
        std::thread::sleep(Duration::from_millis(30));
    }
    let failed = h.failed_checkpoints();
    let injected = faulty.injected();
    eprintln!(
        "{} checkpoints completed, failed: {failed:?}; injected {injected:?}",
        h.completed_checkpoints().len()
    );
    assert!(injected.hung > 0, "{injected:?}");
    assert!(
        failed.iter().any(|(_, why)| why.contains("timed out")),
        "{failed:?}"
    );
    assert!(!h.completed_checkpoints().is_empty());
    faulty.arm(false);
    let finished = h.finish().unwrap();
    assert_eq!(state_digest(&finished.backends).unwrap(), expected);
    drop(finished);
    let honest = CheckpointStorage::from_store(inner, "file://store");
    let job = honest.child("faulty").unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        for meta in job.checkpoints().await.unwrap().completed {
            let report = RestoreSource::checkpoint(&job, meta)
                .verify(|_| {})
                .await
                .unwrap();
            assert!(report.is_sound(), "{:?}", report.bad);
        }
    });
}
