//! The timely adapter restarting from damaged checkpoints: falling back to an older one,
//! and stopping every worker when one cannot restore.

use std::collections::BTreeSet;
use std::time::Duration;

use rockstate::testing::fixtures::block_on;
use rockstate::CheckpointStorage;
use rockstate_harness::demo::{DemoSource, DEMO_UID};
use rockstate_timely::{demo, JobConfig, Start};

// ---------------------------------------------------------------------------------------
// 8. Timely: resume falls back to an older checkpoint
// ---------------------------------------------------------------------------------------

/// A two-worker timely job whose newest checkpoint lost a shared file (uploaded by that
/// checkpoint alone). Resuming with `Start::Latest` runs in a thread with a deadline.
///
/// Proves: the timely adapter falls back to the previous checkpoint, as the harness does,
/// finishes (no hang), and ends in the same state as the uninterrupted run.
#[test]
fn timely_resume_falls_back_from_a_damaged_newest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let storage =
        CheckpointStorage::open(&dir.path().join("checkpoints").display().to_string()).unwrap();
    let source = DemoSource::new(3, 1_000, 40_000).unwrap();
    let run = |start: Start| {
        let mut job = JobConfig::new(storage.clone(), "lost", dir.path().join("local"));
        job.start = start;
        demo::DemoRun {
            rate: 0,
            source,
            checkpoint_interval: 4_000,
            job,
        }
    };
    let first = demo::run(timely::Config::process(2), run(Start::Empty)).unwrap();
    let job = storage.child("lost").unwrap();
    let completed = block_on(job.checkpoints()).unwrap().completed;
    assert!(completed.len() >= 2, "{completed:?}");
    let newest = completed[completed.len() - 1].clone();
    let previous = completed[completed.len() - 2].clone();
    let kept: BTreeSet<&str> = previous.referenced_paths().collect();
    let lost = newest
        .handles()
        .flat_map(|(_, h)| h.shared.iter())
        .find(|f| !kept.contains(f.path.as_str()))
        .expect("the newest checkpoint has a shared file of its own")
        .path
        .clone();
    block_on(job.delete(&lost)).unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    let resume = run(Start::Latest);
    std::thread::spawn(move || {
        let _ = tx.send(demo::run(timely::Config::process(2), resume));
    });
    let report = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(result) => result.unwrap_or_else(|e| {
            panic!(
                "resuming from a checkpoint that lost {lost} failed instead of falling back: {e}"
            )
        }),
        Err(_) => {
            panic!("resuming from a checkpoint that lost {lost} did not finish within 120 s (hang)")
        }
    };
    let restored = report.restored_from.clone().unwrap_or_default();
    assert!(
        restored.ends_with(&format!("chk-{}", previous.checkpoint_id)),
        "restored from {restored:?}, expected checkpoint {}",
        previous.checkpoint_id
    );
    assert_eq!(
        report.digest, first.digest,
        "the resumed job ends in another state"
    );
}

/// A 2-worker timely job whose newest checkpoint has a shared file of worker 1 damaged in
/// place (same size, so the planner's size check passes); the job resumes from the latest.
///
/// Proves: the worker whose restore fails (CRC) makes every worker fail with its reason,
/// promptly; no worker is left waiting for it.
#[test]
fn a_timely_worker_that_cannot_restore_stops_every_worker() {
    let dir = tempfile::tempdir().unwrap();
    let storage =
        CheckpointStorage::open(&dir.path().join("checkpoints").display().to_string()).unwrap();
    let source = DemoSource::new(3, 1_000, 40_000).unwrap();
    let run = |start: Start| {
        let mut job = JobConfig::new(storage.clone(), "damaged", dir.path().join("local"));
        job.start = start;
        demo::DemoRun {
            rate: 0,
            source,
            checkpoint_interval: 4_000,
            job,
        }
    };
    demo::run(timely::Config::process(2), run(Start::Empty)).unwrap();
    let job = storage.child("damaged").unwrap();
    let newest = block_on(job.latest_completed()).unwrap().unwrap();
    let op = newest.operator(DEMO_UID).unwrap();
    let handle = op.subtasks[1]
        .keyed
        .as_ref()
        .and_then(|k| k.as_files())
        .unwrap();
    let damaged = handle.shared.first().expect("worker 1 has a shared file");
    let path = dir.path().join("checkpoints/damaged").join(&damaged.path);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    // On another machine: the workers' own intact copies would be reused instead.
    std::fs::remove_dir_all(dir.path().join("local")).unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    let resume = run(Start::Latest);
    std::thread::spawn(move || {
        let _ = tx.send(demo::run(timely::Config::process(2), resume));
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(report)) => panic!("resumed from a damaged file: {:?}", report.restored_from),
        Ok(Err(e)) => {
            let message = e.to_string();
            assert!(
                message.contains(&damaged.path) || message.contains("could not restore"),
                "{message}"
            );
        }
        Err(_) => panic!("a worker that could not restore left the others waiting (hang)"),
    }
}
