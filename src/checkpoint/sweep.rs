//! The orphan sweep: deletes files that no completed checkpoint references.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use crate::checkpoint::coordinator::delete_all;
use crate::checkpoint::discovery::{self, parse_checkpoint_dir};
use crate::error::Result;
use crate::storage::{CheckpointStorage, StoredObject};

/// Settings of [`sweep`].
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Files younger than this are kept: they may belong to a checkpoint in flight
    /// (default 1 hour). Keep it longer than the coordinator's checkpoint timeout: a
    /// checkpoint older than its timeout can no longer complete.
    pub grace: Duration,
    /// Report what would be deleted without deleting it.
    pub dry_run: bool,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(3600),
            dry_run: false,
        }
    }
}

/// What a sweep found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepReport {
    /// Orphans deleted (or, in a dry run, that would be deleted).
    pub orphans: Vec<StoredObject>,
    /// Their total size.
    pub orphan_bytes: u64,
    /// Files kept because a completed checkpoint references them.
    pub referenced: usize,
    /// Orphans kept because they are younger than the grace period.
    pub too_young: usize,
    /// Checkpoints whose `_metadata` could not be read; while there are any, nothing under
    /// `shared/` is deleted (their references are unknown).
    pub unreadable: Vec<(u64, String)>,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// Sweeps the job directory `job`: files under `shared/` that no completed checkpoint
/// references, and files of incomplete `chk-N/` folders, older than the grace period.
/// `now_ms` is the current time in ms since the Unix epoch.
///
/// Errors: storage errors; the sweep deletes nothing when it cannot list or read
/// everything it needs.
pub async fn sweep(
    job: &CheckpointStorage,
    options: &SweepOptions,
    now_ms: u64,
) -> Result<SweepReport> {
    let found = discovery::scan(job).await?;
    let mut referenced: BTreeSet<String> = BTreeSet::new();
    for meta in &found.completed {
        referenced.insert(discovery::metadata_path(meta.checkpoint_id));
        referenced.extend(meta.referenced_paths().map(str::to_string));
    }
    let unreadable_ids: BTreeSet<u64> = found.unreadable.iter().map(|(id, _)| *id).collect();
    // Saturating: a grace longer than the clock's age keeps everything.
    let grace_ms = i64::try_from(options.grace.as_millis()).unwrap_or(i64::MAX);
    let cutoff = i64::try_from(now_ms)
        .unwrap_or(i64::MAX)
        .saturating_sub(grace_ms);
    let mut report = SweepReport {
        unreadable: found.unreadable.clone(),
        dry_run: options.dry_run,
        ..SweepReport::default()
    };
    for object in job.list("").await? {
        if referenced.contains(&object.path) {
            report.referenced += 1;
            continue;
        }
        let top = object.path.split('/').next().unwrap_or_default();
        let candidate = if top == "shared" {
            unreadable_ids.is_empty()
        } else if let Some(id) = parse_checkpoint_dir(top) {
            !unreadable_ids.contains(&id) && !found.completed.iter().any(|m| m.checkpoint_id == id)
        } else {
            false
        };
        if !candidate {
            continue;
        }
        if object.last_modified_ms > cutoff {
            report.too_young += 1;
            continue;
        }
        report.orphan_bytes += object.size;
        report.orphans.push(object);
    }
    if !options.dry_run {
        let paths = report.orphans.iter().map(|o| o.path.clone()).collect();
        delete_all(job, paths).await?;
    }
    Ok(report)
}
