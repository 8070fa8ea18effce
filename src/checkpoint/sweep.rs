//! The orphan sweep: deletes files that no completed checkpoint references.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use crate::checkpoint::discovery::{self, parse_checkpoint_dir};
use crate::error::{Error, ErrorKind, Result};
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

/// Views of the job directory a sweep tries before it gives up without deleting.
const VIEW_ATTEMPTS: u32 = 8;

/// Why a view of the job directory cannot be acted on: the listing taken after the
/// checkpoints were read shows a `_metadata` or an epoch that was not classified, or
/// lacks one that was (a checkpoint completed, or was retired, in between).
fn stale_view(found: &discovery::JobCheckpoints, objects: &[StoredObject]) -> Option<String> {
    let classified: BTreeSet<u64> = found
        .completed
        .iter()
        .chain(&found.abandoned)
        .map(|m| m.checkpoint_id)
        .chain(found.unreadable.iter().map(|(id, _)| *id))
        .collect();
    let mut listed = BTreeSet::new();
    let mut epochs = BTreeSet::new();
    for object in objects {
        let mut parts = object.path.splitn(2, '/');
        let (top, rest) = (parts.next().unwrap_or_default(), parts.next());
        if top == super::epoch::EPOCHS_DIR {
            epochs.insert(object.path.clone());
        } else if rest == Some(crate::format::METADATA_FILE) {
            if let Some(id) = parse_checkpoint_dir(top) {
                listed.insert(id);
            }
        }
    }
    if let Some(id) = listed.difference(&classified).next() {
        return Some(format!(
            "checkpoint {id} completed while the sweep read the others"
        ));
    }
    if let Some(id) = classified.difference(&listed).next() {
        return Some(format!(
            "checkpoint {id} was retired while the sweep read the others"
        ));
    }
    let read: BTreeSet<String> = found
        .epochs
        .iter()
        .map(|e| super::epoch::epoch_path(*e))
        .collect();
    if epochs != read {
        return Some("a writer claimed the job directory during the sweep".into());
    }
    None
}

/// Sweeps the job directory `job`: files under `shared/` that no checkpoint references,
/// and files of incomplete `chk-N/` folders, older than the grace period.
/// `now_ms` is the current time in ms since the Unix epoch.
///
/// Safe beside a running job: it reads every `_metadata`, then lists the directory, and
/// acts only when that listing shows exactly the checkpoints (and writer epochs) it read;
/// otherwise it reads again (up to 8 times) and, when the directory keeps changing,
/// deletes nothing and fails with `Unavailable`. Files a checkpoint in flight writes are
/// younger than the grace period: keep the grace longer than the checkpoint timeout.
/// Files of checkpoints of abandoned timelines are kept too (the job's own writer
/// retires them).
///
/// Errors: storage errors; the sweep deletes nothing when it cannot list or read
/// everything it needs.
pub async fn sweep(
    job: &CheckpointStorage,
    options: &SweepOptions,
    now_ms: u64,
) -> Result<SweepReport> {
    let mut reason = String::new();
    for attempt in 0..VIEW_ATTEMPTS {
        let found = discovery::scan(job).await?;
        let objects = job.list("").await?;
        match stale_view(&found, &objects) {
            None => return sweep_view(job, options, now_ms, found, objects).await,
            Some(why) => {
                tracing::info!(attempt, reason = %why, "the job directory changed during the sweep; reading it again");
                reason = why;
                tokio::time::sleep(std::time::Duration::from_millis(20 << attempt.min(6))).await;
            }
        }
    }
    Err(Error::storage_failed(
        "sweep",
        job.url(),
        ErrorKind::Unavailable,
        format!("the job directory kept changing ({reason}); nothing was deleted, try again"),
    ))
}

async fn sweep_view(
    job: &CheckpointStorage,
    options: &SweepOptions,
    now_ms: u64,
    found: discovery::JobCheckpoints,
    objects: Vec<StoredObject>,
) -> Result<SweepReport> {
    let mut referenced: BTreeSet<String> = BTreeSet::new();
    for meta in found.completed.iter().chain(&found.abandoned) {
        referenced.insert(crate::format::metadata_path(meta.checkpoint_id));
        referenced.extend(meta.referenced_paths().map(str::to_string));
    }
    let kept: BTreeSet<u64> = found
        .completed
        .iter()
        .chain(&found.abandoned)
        .map(|m| m.checkpoint_id)
        .collect();
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
    for object in objects {
        if referenced.contains(&object.path) {
            report.referenced += 1;
            continue;
        }
        let top = object.path.split('/').next().unwrap_or_default();
        let candidate = if top == "shared" {
            unreadable_ids.is_empty()
        } else if let Some(id) = parse_checkpoint_dir(top) {
            !unreadable_ids.contains(&id) && !kept.contains(&id)
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
        job.delete_many(paths).await?;
    }
    Ok(report)
}
