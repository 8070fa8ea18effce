//! Soak test, ignored by default and run on demand:
//! `ROCKSTATE_SOAK_SECS=180 cargo nextest run --release --features testing --test soak
//! --run-ignored only --no-capture` (60 s without the variable). Eight subtasks write
//! continuously (the demo job over an endless stream) with a checkpoint triggered every
//! second, for the given time (and at most `ROCKSTATE_SOAK_EVENTS` events, default 2^40).
//! It prints checkpoints completed and failed, the longest sync pause, and the files in
//! `shared/` against the files the retained checkpoints reference. It asserts that no
//! checkpoint failed, that the latest checkpoint verifies, and that once the job stops and
//! the sweep runs, `shared/` holds exactly the referenced files.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rockstate::{CheckpointStorage, CoordinatorOptions, RestoreSource};
use rockstate_harness::demo::{Counter, DemoSource, DEMO_UID};
use rockstate_harness::{Harness, HarnessConfig, StartFrom};

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
#[ignore = "a load test of minutes: ROCKSTATE_SOAK_SECS=180 cargo nextest run --release --features testing --test soak --run-ignored only --no-capture"]
fn soak_eight_subtasks_checkpointing_every_second() {
    let secs = env("ROCKSTATE_SOAK_SECS").unwrap_or(60);
    let events = env("ROCKSTATE_SOAK_EVENTS").unwrap_or(1 << 40);
    let dir = tempfile::tempdir().unwrap();
    let storage = CheckpointStorage::open(dir.path().join("store").to_str().unwrap()).unwrap();
    let config = HarnessConfig {
        job_id: "soak".into(),
        operator_uid: DEMO_UID.into(),
        parallelism: 8,
        max_parallelism: 128,
        local_root: dir.path().join("local"),
        checkpoint_interval: 0,
        memory_budget: 256 << 20,
        rocksdb_statistics: false,
        coordinator: CoordinatorOptions {
            num_retained: 3,
            ..CoordinatorOptions::default()
        },
    };
    let source = DemoSource::new(3, 1_000_000, events).unwrap();
    let mut h = Harness::start(
        config,
        &storage,
        source,
        Counter::factory(),
        StartFrom::Empty,
    )
    .unwrap();
    let started = Instant::now();
    let mut next = Duration::from_secs(1);
    let mut processed = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        let n = h.run(5_000).unwrap();
        processed += n;
        if n == 0 {
            break;
        }
        if started.elapsed() >= next {
            next += Duration::from_secs(1);
            h.trigger().unwrap();
        }
    }
    let completed = h.completed_checkpoints().len();
    let failed = h.failed_checkpoints();
    let max_sync = h.max_sync_pause();
    let finished = h.cancel().unwrap();
    drop(finished);

    let job = storage.child("soak").unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listing = job.checkpoints().await.unwrap();
        let referenced: BTreeSet<String> = listing
            .completed
            .iter()
            .flat_map(|m| m.referenced_paths().map(str::to_string))
            .filter(|p| p.starts_with("shared/"))
            .collect();
        let shared: BTreeSet<String> = job
            .list("shared")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.path)
            .collect();
        let latest = listing.completed.last().expect("a completed checkpoint");
        let report = RestoreSource::checkpoint(&job, latest.clone())
            .verify(|_| {})
            .await
            .unwrap();
        eprintln!(
            "soak: {secs} s, {processed} events ({:.0}/s), {completed} checkpoints completed, {} failed, max sync pause {max_sync:?}; shared/ holds {} files, retained checkpoints reference {}; latest chk-{} ({} files, {} bytes) sound: {}",
            processed as f64 / started.elapsed().as_secs_f64(),
            failed.len(),
            shared.len(),
            referenced.len(),
            latest.checkpoint_id,
            report.files,
            report.bytes,
            report.is_sound()
        );
        assert!(report.is_sound(), "{:?}", report.bad);
        assert!(failed.is_empty(), "{failed:?}");
        // Files of the checkpoint in flight when the job stopped are orphans: the sweep
        // removes them and nothing else.
        let options = rockstate::checkpoint::SweepOptions {
            grace: Duration::ZERO,
            dry_run: false,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let swept = rockstate::checkpoint::sweep(&job, &options, now + 1_000)
            .await
            .unwrap();
        let left: BTreeSet<String> = job
            .list("shared")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.path)
            .collect();
        eprintln!(
            "soak: the sweep deleted {} orphans ({} bytes); shared/ now holds {} files",
            swept.orphans.len(),
            swept.orphan_bytes,
            left.len()
        );
        assert_eq!(left, referenced, "shared/ after the sweep");
    });
}
