//! Restoring a backend from a snapshot.
//!
//! Same key-group range: every file of the handle is downloaded in parallel into a fresh
//! directory beside the backend's, checked for size and CRC32 and synced to disk, and only
//! then moved into place and opened. A restore that fails leaves no local state behind. The restored checkpoint's shared files are seeded as confirmed, so
//! the next checkpoint uploads only new SST files.

use std::path::{Path, PathBuf};

use futures::StreamExt;

use crate::backend::{BackendBuilder, OpenMode, RocksStateBackend};
use crate::error::{Error, Result};
use crate::snapshot::KeyedStateHandle;
use crate::storage::CheckpointStorage;

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    dir.with_file_name(name)
}

async fn is_empty_or_missing(dir: &Path) -> Result<bool> {
    match tokio::fs::read_dir(dir).await {
        Ok(mut entries) => Ok(entries
            .next_entry()
            .await
            .map_err(|e| Error::io(format!("read {}", dir.display()), e))?
            .is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(Error::io(format!("read {}", dir.display()), e)),
    }
}

async fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", dir.display()), e)),
    }
}

/// Downloads every file of `handle` into `dir`, at most `concurrency` at once. Every
/// download finishes (or fails) before this returns, so the directory can be removed.
async fn download_all(
    handle: &KeyedStateHandle,
    job: &CheckpointStorage,
    dir: &Path,
) -> Result<()> {
    let concurrency = job.options().transfer_concurrency.max(1);
    let mut downloads = futures::stream::iter(handle.files())
        .map(|file| async move {
            job.download_file(&file.path, &dir.join(&file.local_name), &file.info())
                .await
        })
        .buffer_unordered(concurrency);
    let mut first = None;
    while let Some(result) = downloads.next().await {
        if let Err(e) = result {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Makes a directory's entries (a rename, new files) durable.
async fn sync_dir(dir: &Path) -> Result<()> {
    let path = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&path).and_then(|f| f.sync_all()))
        .await
        .map_err(|e| Error::Internal(format!("sync task failed: {e}")))?
        .map_err(|e| Error::io(format!("sync {}", dir.display()), e))
}

impl BackendBuilder {
    /// Restores the snapshot `handle`, stored under `job` (the job's checkpoint directory),
    /// into this builder's empty local directory and opens it.
    ///
    /// Errors: `Incompatible` when the handle's max parallelism or key-group range differ
    /// from the options; `InvalidArgument` when the local directory is not empty;
    /// `NotFound`/`Corrupt` naming the file when a file is missing, truncated or damaged (no
    /// local state is left behind); storage and engine errors otherwise.
    pub async fn restore(
        self,
        handle: &KeyedStateHandle,
        job: &CheckpointStorage,
    ) -> Result<RocksStateBackend> {
        self.options.validate()?;
        handle.validate()?;
        let dir = self.options.local_dir.clone();
        let layout_error = |detail: String| Error::IncompatibleLayout {
            dir: dir.display().to_string(),
            detail,
        };
        if handle.max_parallelism != self.options.max_parallelism {
            return Err(layout_error(format!(
                "checkpoint {} has max parallelism {}, the backend {}",
                handle.checkpoint_id, handle.max_parallelism, self.options.max_parallelism
            )));
        }
        if handle.key_group_range != self.options.key_group_range {
            return Err(layout_error(format!(
                "checkpoint {} holds key groups {}, the backend owns {}",
                handle.checkpoint_id, handle.key_group_range, self.options.key_group_range
            )));
        }
        let has = |prefix: &str| {
            handle
                .private
                .iter()
                .any(|f| f.local_name.starts_with(prefix))
        };
        if !has("CURRENT") || !has("MANIFEST-") {
            return Err(Error::corrupt(
                format!("checkpoint {}", handle.checkpoint_id),
                "the handle lists no CURRENT or MANIFEST file",
            ));
        }
        if !is_empty_or_missing(&dir).await? {
            return Err(Error::invalid(format!(
                "cannot restore into {}: the directory is not empty",
                dir.display()
            )));
        }
        let incoming = sibling(&dir, ".restoring");
        remove_dir_if_exists(&incoming).await?;
        tokio::fs::create_dir_all(&incoming)
            .await
            .map_err(|e| Error::io(format!("create {}", incoming.display()), e))?;
        let downloaded = match download_all(handle, job, &incoming).await {
            Ok(()) => sync_dir(&incoming).await,
            Err(e) => Err(e),
        };
        if let Err(e) = downloaded {
            if let Err(cleanup) = remove_dir_if_exists(&incoming).await {
                tracing::warn!(dir = %incoming.display(), error = %cleanup, "cannot remove a failed restore");
            }
            return Err(e);
        }
        remove_dir_if_exists(&dir).await?;
        tokio::fs::rename(&incoming, &dir).await.map_err(|e| {
            Error::io(
                format!("move {} to {}", incoming.display(), dir.display()),
                e,
            )
        })?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent).await?;
        }

        let checkpoint_id = handle.checkpoint_id;
        let expected: Vec<String> = handle.states.iter().map(|m| m.name.clone()).collect();
        let target = dir.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let result = self.open_as(OpenMode::Restored).and_then(|backend| {
                let stored = backend.states();
                match expected.iter().find(|n| !stored.iter().any(|s| &s.name == *n)) {
                    Some(missing) => Err(Error::corrupt(
                        format!("checkpoint {checkpoint_id}"),
                        format!("state \"{missing}\" is listed but not in the restored files"),
                    )),
                    None => Ok(backend),
                }
            });
            if result.is_err() {
                // Leave nothing half-restored behind (a backend, if any, is closed first).
                if let Err(e) = std::fs::remove_dir_all(&target) {
                    tracing::warn!(dir = %target.display(), error = %e, "cannot remove a failed restore");
                }
            }
            result
        })
        .await
        .map_err(|e| Error::Internal(format!("restore task failed: {e}")))?;
        let backend = opened?;
        if handle.incremental {
            let files = handle
                .shared
                .iter()
                .map(|f| (f.local_name.clone(), f.clone()))
                .collect();
            let uploaded = crate::snapshot::tracker::Uploaded {
                root: job.url().to_string(),
                files,
            };
            backend
                .core
                .tracker
                .lock()
                .seed(handle.checkpoint_id, uploaded);
        }
        Ok(backend)
    }
}

impl RocksStateBackend {
    /// Restores `handle` from `job` into a new backend with `options` (own memory, system
    /// clock). See [`BackendBuilder::restore`].
    pub async fn restore(
        options: crate::BackendOptions,
        handle: &KeyedStateHandle,
        job: &CheckpointStorage,
    ) -> Result<Self> {
        Self::builder(options).restore(handle, job).await
    }
}
