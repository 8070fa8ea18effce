//! Numbers read from storage never overflow the arithmetic they are used in.
//!
//! What each test proves:
//! - `recorded_sizes_never_overflow_a_sum`: recorded file sizes are added without
//!   overflow.
//! - `checkpoint_ids_from_directory_names_never_overflow`: a `chk-N` folder with an id
//!   near `u64::MAX` is refused instead of overflowing the next checkpoint id.

mod common;

use common::snapshots::*;
use rockstate::checkpoint::{CheckpointCoordinator, CoordinatorOptions};
use rockstate::{KeyedSnapshot, RestoreSource};

// ---------------------------------------------------------------------------------------
// 4. Numbers read from storage used in arithmetic.

/// Recorded sizes come from `_metadata`: adding them up must not overflow. Two files
/// recorded with `u64::MAX` bytes each are accepted by the decoder (sizes are checked
/// against the stored objects later), then summed with `Iterator::sum`, which panics on
/// overflow in a build with overflow checks and wraps otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_sizes_never_overflow_a_sum() {
    use futures::FutureExt;
    let f = fixture(1).await;
    let mut meta = Fixture::decoded(&f.checkpoint);
    for op in &mut meta.operators {
        for s in &mut op.subtasks {
            if let Some(KeyedSnapshot::Files(h)) = &mut s.keyed {
                h.shared[0].size = u64::MAX;
                h.shared[1].size = u64::MAX;
                h.private[0].size = u64::MAX;
            }
        }
    }
    let folder = local(&f.job).join(format!("chk-{}", f.checkpoint_id));
    std::fs::write(folder.join("_metadata"), meta.encode().unwrap()).unwrap();
    let mut failures = Vec::new();

    let source = RestoreSource::open(folder.to_str().unwrap()).await.unwrap();
    match std::panic::AssertUnwindSafe(source.verify(|_| {}))
        .catch_unwind()
        .await
    {
        Ok(report) => {
            // The three files do not have the recorded sizes.
            let report = report.unwrap();
            assert_eq!(report.bad.len(), 3, "{report:?}");
        }
        Err(_) => failures.push("RestoreSource::verify panicked"),
    }

    let coordinator = CheckpointCoordinator::start(
        f.job.clone(),
        "job",
        specs(1),
        CoordinatorOptions::default(),
    )
    .await
    .unwrap();
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        coordinator.registry().stats()
    }))
    .is_err()
    {
        failures.push("SharedStateRegistry::stats panicked");
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// Checkpoint ids come from directory names: `chk-18446744073709551615` (u64::MAX) in a
/// job directory, even empty of `_metadata`, makes the coordinator compute the next id as
/// `highest + 1`, which overflows (a panic with overflow checks, ids starting again at 0
/// without). One below makes the next `trigger` overflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_ids_from_directory_names_never_overflow() {
    use futures::FutureExt;
    let mut failures = Vec::new();
    for id in [u64::MAX, u64::MAX - 1] {
        let f = fixture(1).await;
        let dir = local(&f.job).join(format!("chk-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("part"), b"an incomplete checkpoint").unwrap();
        let started = std::panic::AssertUnwindSafe(CheckpointCoordinator::start(
            f.job.clone(),
            "job",
            specs(1),
            CoordinatorOptions::default(),
        ))
        .catch_unwind()
        .await;
        let mut coordinator = match started {
            Err(_) => {
                failures.push(format!("start with chk-{id} panicked"));
                continue;
            }
            // Refusing the directory is fine too.
            Ok(Err(e)) => {
                assert!(is_typed(e.kind()), "{e}");
                continue;
            }
            Ok(Ok(c)) => c,
        };
        // No id may repeat or go backwards: either no new id, or a new, higher one.
        let triggered =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| coordinator.trigger()));
        match triggered {
            Err(_) => failures.push(format!("trigger after chk-{id} panicked")),
            Ok(Ok(new)) => assert!(new > id, "chk-{id} exists, new checkpoint {new}"),
            Ok(Err(_)) => {}
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}
