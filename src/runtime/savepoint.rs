//! Savepoints written from a completed snapshot instead of from running subtasks: for
//! runtimes whose subtasks cannot take a savepoint at a moment of their choosing (the
//! timely adapter, whose workers in several processes snapshot every epoch as a
//! checkpoint), and for turning a retained checkpoint into a self-contained savepoint
//! offline.
//!
//! Every subtask of every operator is restored, one at a time, into a scratch directory
//! (with every file CRC-checked on the way, as any restore), snapshotted, and written into
//! the new savepoint folder in the chosen format; operator state is carried over as is.
//! The savepoint holds the state of the snapshot it was made from, as reads saw it when
//! that snapshot completed (values whose time to live had passed then are left out, as
//! in every canonical savepoint), so a job that resumes from it resumes from that
//! snapshot's position.

use std::path::Path;

use crate::backend::BackendOptions;
use crate::error::{Error, Result};
use crate::format::{
    folder_name, CheckpointMetadata, Compression, SavepointFormat, SnapshotKind, METADATA_FILE,
};
use crate::restore::{RestoreOptions, RestoreSource};
use crate::storage::CheckpointStorage;

/// Writes a savepoint of `source` (a completed checkpoint or another savepoint) into a new
/// folder of `parent`, named after `job_id`, in `format`; returns the folder and its
/// metadata. `scratch` is a local directory for the restores (created, and emptied of what
/// this call put there); `memory_budget` is the memory of each temporary backend.
///
/// The savepoint keeps the snapshot's id and its operators' parallelism; it restores at
/// any parallelism like every savepoint.
///
/// Errors: the restore's errors (a missing or damaged file of `source`, named);
/// storage errors writing the savepoint (its files are then removed, best effort);
/// local I/O errors. Nothing of `source` is changed.
pub async fn savepoint_from_snapshot(
    source: &RestoreSource,
    parent: &CheckpointStorage,
    job_id: &str,
    format: SavepointFormat,
    scratch: &Path,
    memory_budget: usize,
) -> Result<(CheckpointStorage, CheckpointMetadata)> {
    let folder = parent.child(&folder_name(job_id))?;
    // A fresh random name; should it ever exist, nothing is written there (and so nothing
    // of it is removed on a failure).
    if !folder.list("").await?.is_empty() {
        return Err(Error::AlreadyExists(folder.url().to_string()));
    }
    // Everything local goes into a directory of this call's own, removed at the end.
    let work = scratch.join(format!("savepoint-{:016x}", rand::random::<u64>()));
    let written = write(source, &folder, job_id, format, &work, memory_budget).await;
    if let Err(e) = crate::restore::remove_dir_if_exists(&work).await {
        tracing::warn!(dir = %work.display(), error = %e.report(), "cannot remove a savepoint's scratch directory");
    }
    match written {
        Ok(meta) => Ok((folder, meta)),
        Err(e) => {
            crate::restore::remove_written(&folder, &e).await;
            Err(e)
        }
    }
}

async fn write(
    source: &RestoreSource,
    folder: &CheckpointStorage,
    job_id: &str,
    format: SavepointFormat,
    scratch: &Path,
    memory_budget: usize,
) -> Result<CheckpointMetadata> {
    let original = source.metadata();
    let started = crate::clock::Clock::now_millis(&crate::clock::SystemClock);
    let mut meta = original.clone();
    meta.kind = match format {
        SavepointFormat::Canonical => SnapshotKind::SavepointCanonical,
        SavepointFormat::Native => SnapshotKind::SavepointNative,
    };
    meta.job_id = job_id.to_string();
    meta.triggered_at_ms = started;
    for op in &mut meta.operators {
        for (index, subtask) in op.subtasks.iter_mut().enumerate() {
            let Some(keyed) = &subtask.keyed else {
                continue;
            };
            let dir = scratch.join(format!("{}-{index}", super::operator_dir_name(&op.uid)));
            let mut options =
                BackendOptions::new(&dir, keyed.key_group_range(), keyed.max_parallelism());
            options.memory_budget = memory_budget;
            // The snapshot's own time: entries are kept or left out (time to live) as reads
            // at that time would see them, whenever the savepoint is made.
            let backend = crate::RocksStateBackend::builder(options)
                .clock(crate::clock::ManualClock::new(original.completed_at_ms))
                .restore_operator(source, &op.uid, &RestoreOptions::default())
                .await?;
            // Removed once its savepoint is written: closed without flush or sync.
            // (Marking it changes RocksDB's options: file work, off the async threads.)
            let backend = tokio::task::spawn_blocking(move || {
                backend.core.mark_scratch();
                backend
            })
            .await
            .map_err(|e| Error::Internal(format!("mark a temporary backend: {e}")))?;
            let subtask_id = u32::try_from(index)
                .map_err(|_| Error::corrupt(source.location(), "too many subtasks"))?;
            // The snapshot's synchronous phase is blocking RocksDB work (it may also wait
            // for an earlier capture): off the async threads.
            let id = original.checkpoint_id;
            let (backend, pending) = tokio::task::spawn_blocking(move || {
                let pending = backend.snapshot(id);
                (backend, pending)
            })
            .await
            .map_err(|e| Error::Internal(format!("snapshot a temporary backend: {e}")))?;
            let written = match pending {
                Ok(pending) => {
                    pending
                        .write_savepoint(
                            folder,
                            &op.uid,
                            subtask_id,
                            format,
                            Compression::default(),
                        )
                        .await
                }
                Err(e) => Err(e),
            };
            // Dropping it waits for its snapshot's capture: blocking work.
            tokio::task::spawn_blocking(move || drop(backend))
                .await
                .map_err(|e| Error::Internal(format!("close a temporary backend: {e}")))?;
            crate::restore::remove_dir_if_exists(&dir).await?;
            subtask.keyed = Some(written?);
        }
    }
    meta.completed_at_ms = crate::clock::Clock::now_millis(&crate::clock::SystemClock);
    let bytes = meta.encode()?;
    // A write that lands and still reports an error is read back, not taken for failed.
    crate::checkpoint::commit(folder, METADATA_FILE, meta.checkpoint_id, &bytes, None).await?;
    tracing::info!(from = %source.location(), folder = %folder.url(), ?format, "savepoint written from a snapshot");
    Ok(meta)
}
