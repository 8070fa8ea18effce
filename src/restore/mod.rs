//! Restoring a backend from a checkpoint or savepoint, at the same or another
//! parallelism.
//!
//! - Same key-group range, RocksDB files: every file of the handle is fetched in
//!   parallel into a fresh directory beside the backend's and checked for size and CRC32,
//!   and only then moved into place and opened. Files already on this machine are not
//!   downloaded: SST files of a local-file store are hard-linked and read through once
//!   for the check, and files of an earlier run's directory
//!   ([`BackendBuilder::reuse_local_files`]) are taken when their name, size and CRC32
//!   match.
//! - Another range, RocksDB files (checkpoints, native savepoints): the old subtask with
//!   the largest overlap is the base; the other overlapping subtasks' SST files are
//!   ingested as they are (their keys never overlap the base's: key groups are disjoint),
//!   then everything outside the new range is removed with range deletions. Iterating and
//!   writing is the fallback ([`RescaleStrategy`]).
//! - Canonical savepoints: only the sections of the new range's key groups are read and
//!   written.
//!
//! A restore that fails leaves no local state behind. Restored SST files are remembered
//! with the remote files they are copies of, so the first checkpoint afterwards does not
//! upload them again: it references them (same job directory, [`RestoreMode::Claim`]) or
//! copies them inside the store ([`RestoreMode::NoClaim`]).
//!
//! Offline access: [`SavepointReader`] reads any snapshot without a job, and
//! [`SavepointWriter`] writes a canonical savepoint from data (bootstrap), or from what a
//! reader read, filtered and changed (transform).

mod reader;
mod rescale;
mod source;
mod verify;
mod writer;

pub use reader::{KeyedStateReader, SavepointReader};
pub use source::{RescaleStrategy, RestoreMode, RestoreOptions, RestoreSource};
pub use verify::{BadFile, VerifyReport};
pub(crate) use writer::remove_written;
pub use writer::{OperatorWriter, SavepointWriter};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::StreamExt;

use crate::backend::{BackendBuilder, RocksStateBackend};
use crate::engine::OpenMode;
use crate::error::{Error, Result};
use crate::format::{KeyedSnapshot, KeyedStateHandle};
use crate::storage::{CheckedLinks, CheckpointStorage};
use rescale::blocking;

pub(crate) fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    dir.with_file_name(name)
}

pub(crate) async fn is_empty_or_missing(dir: &Path) -> Result<bool> {
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

/// Written into a backend directory while a restore builds it in place; a directory
/// holding it was left by an interrupted restore, and the next restore empties it.
pub(crate) const RESTORING_MARKER: &str = "ROCKSTATE-RESTORING";

/// Checks that a restore may write `dir`: missing, empty, or left by an interrupted
/// restore (then it is removed).
///
/// Errors: `InvalidArgument` when it holds other files; I/O errors.
pub(crate) async fn ensure_empty(dir: &Path) -> Result<()> {
    if tokio::fs::try_exists(dir.join(RESTORING_MARKER))
        .await
        .unwrap_or(false)
    {
        remove_dir_if_exists(dir).await?;
    }
    if !is_empty_or_missing(dir).await? {
        return Err(Error::invalid(format!(
            "cannot restore into {}: the directory is not empty",
            dir.display()
        )));
    }
    Ok(())
}

pub(crate) async fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", dir.display()), e)),
    }
}

/// Removes `dir` from a `Drop` (blocking, best effort): a failure other than "not there"
/// is logged, naming `what` the directory was.
pub(crate) fn remove_dir_quietly(dir: &Path, what: &str) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove {what}");
        }
    }
}

/// Files of earlier runs on this machine that a restore may take instead of downloading
/// them, by file name.
#[derive(Debug, Default)]
pub(crate) struct LocalFiles {
    by_name: std::collections::HashMap<String, Vec<(PathBuf, u64)>>,
    /// The directory the last file taken came from. A snapshot's files usually all lie in
    /// one earlier directory, while other directories hold files of the same name and
    /// often the same size (other subtasks' databases number their files alike): trying
    /// it first spares reading those whole only to find their checksum differs.
    matched_dir: parking_lot::Mutex<Option<PathBuf>>,
    /// The directories scanned, in order.
    dirs: Vec<PathBuf>,
}

impl LocalFiles {
    /// Lists the regular files directly inside `dirs` (missing directories are skipped).
    pub(crate) async fn scan(dirs: &[PathBuf]) -> Result<Self> {
        let dirs = dirs.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut files = Self {
                dirs: dirs.clone(),
                ..Self::default()
            };
            for dir in &dirs {
                let entries = match std::fs::read_dir(dir) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
                };
                for entry in entries {
                    let entry =
                        entry.map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
                    // Links are not followed: only files the earlier run wrote count.
                    let Ok(meta) = entry.metadata() else { continue };
                    if !meta.is_file() {
                        continue;
                    }
                    if let Some(name) = entry.file_name().to_str() {
                        files
                            .by_name
                            .entry(name.to_string())
                            .or_default()
                            .push((entry.path(), meta.len()));
                    }
                }
            }
            Ok(files)
        })
        .await
        .map_err(|e| Error::Internal(format!("scan task failed: {e}")))?
    }

    /// Prefers the directory holding most of a snapshot's `files` by name and size (its
    /// manifest and options files are named uniquely per database), before any is read.
    fn prefer_dir_of<'f>(&self, files: impl IntoIterator<Item = &'f crate::format::StateFile>) {
        let mut counts: std::collections::HashMap<&Path, usize> = Default::default();
        for file in files {
            if let Some(found) = self.by_name.get(&file.local_name) {
                for (path, size) in found {
                    if *size == file.size {
                        if let Some(dir) = path.parent() {
                            *counts.entry(dir).or_default() += 1;
                        }
                    }
                }
            }
        }
        // Ties go to the directory listed first.
        let best = counts
            .into_iter()
            .max_by_key(|(dir, n)| (*n, std::cmp::Reverse(self.rank(dir))))
            .map(|(dir, _)| dir.to_path_buf());
        if best.is_some() {
            *self.matched_dir.lock() = best;
        }
    }

    /// The position of `dir` in the scan (for ties).
    fn rank(&self, dir: &Path) -> usize {
        self.dirs
            .iter()
            .position(|d| d == dir)
            .unwrap_or(usize::MAX)
    }

    /// Local files that may be `name` with `size` bytes (their content is not checked
    /// yet), those in the directory of the last file taken first.
    fn candidates(&self, name: &str, size: u64) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = self
            .by_name
            .get(name)
            .into_iter()
            .flatten()
            .filter(|(_, s)| *s == size)
            .map(|(p, _)| p.clone())
            .collect();
        if let Some(dir) = self.matched_dir.lock().as_deref() {
            // Stable: the scan's order otherwise.
            found.sort_by_key(|p| p.parent() != Some(dir));
        }
        found
    }

    /// Puts a local copy of `file` at `target` if one of the candidates matches its size
    /// and CRC32; returns whether it did. A candidate that does not match is skipped.
    async fn take(&self, file: &crate::format::StateFile, target: &Path) -> Result<bool> {
        let candidates = self.candidates(&file.local_name, file.size);
        if candidates.is_empty() {
            return Ok(false);
        }
        let (target, info, link) = (
            target.to_path_buf(),
            file.info(),
            file.local_name.ends_with(".sst"),
        );
        let taken = tokio::task::spawn_blocking(move || {
            for candidate in candidates {
                let url = candidate.display().to_string();
                match crate::storage::link_or_copy_checked(
                    &candidate, &target, &info, &url, link, None,
                ) {
                    Ok(true) => return Ok(Some(candidate)),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(file = %url, error = %e.report(), "local file not reused");
                        crate::storage::remove_local(&target)?;
                    }
                }
            }
            Ok(None)
        })
        .await
        .map_err(|e| Error::Internal(format!("reuse task failed: {e}")))??;
        match taken {
            Some(path) => {
                *self.matched_dir.lock() = path.parent().map(Path::to_path_buf);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Fetches every file of `handle` that its database is opened with (not the list of its
/// SST files, see [`crate::engine::sst_list`]) into `dir`, at most `concurrency` at
/// once: from `reuse` when a local file matches, else from `job`. Once `cancel` is set, no further transfer
/// starts and the fetch fails. Every transfer finishes (or fails) before this returns, so
/// the directory can be removed.
pub(crate) async fn download_all(
    handle: &KeyedStateHandle,
    job: &CheckpointStorage,
    dir: &Path,
    reuse: &LocalFiles,
    checked: Option<&Arc<CheckedLinks>>,
    cancel: Option<&AtomicBool>,
) -> Result<()> {
    download_files(database_files(handle), job, dir, reuse, checked, cancel).await
}

/// The files of `handle` that its database is opened with: all but the list of its SST
/// files.
pub(crate) fn database_files(handle: &KeyedStateHandle) -> Vec<&crate::format::StateFile> {
    handle
        .files()
        .filter(|f| f.local_name != crate::engine::sst_list::SST_LIST_NAME)
        .collect()
}

/// [`download_all`] for some of a snapshot's `files`.
pub(crate) async fn download_files(
    files: Vec<&crate::format::StateFile>,
    job: &CheckpointStorage,
    dir: &Path,
    reuse: &LocalFiles,
    checked: Option<&Arc<CheckedLinks>>,
    cancel: Option<&AtomicBool>,
) -> Result<()> {
    fetch_files(files, job, dir, reuse, checked, cancel, false).await
}

/// [`download_files`] for files RocksDB is to ingest: RocksDB syncs every file it
/// ingests, so each SST file transferred (or linked from a copy another restore of the
/// source fetched) is synced as soon as it is in place, beside the transfers still
/// running, rather than all of them one after the other in the ingestion. (Files
/// linked from local-file storage or taken from a local directory are not synced here.)
pub(crate) async fn download_for_ingestion(
    files: Vec<&crate::format::StateFile>,
    job: &CheckpointStorage,
    dir: &Path,
    reuse: &LocalFiles,
    checked: Option<&Arc<CheckedLinks>>,
    cancel: Option<&AtomicBool>,
) -> Result<()> {
    let sync = job.local_dir().is_none();
    fetch_files(files, job, dir, reuse, checked, cancel, sync).await
}

async fn fetch_files(
    files: Vec<&crate::format::StateFile>,
    job: &CheckpointStorage,
    dir: &Path,
    reuse: &LocalFiles,
    checked: Option<&Arc<CheckedLinks>>,
    cancel: Option<&AtomicBool>,
    sync: bool,
) -> Result<()> {
    let concurrency = job.options().transfer_concurrency.max(1);
    reuse.prefer_dir_of(files.iter().copied());
    // By position, not by reference: a stream mapping references through a closure makes
    // the future of a restore impossible to spawn (the compiler cannot prove it `Send`
    // for every lifetime), which a runtime restoring subtasks side by side needs.
    let mut downloads = futures::stream::iter(0..files.len())
        .map(|i| download_one(files[i], job, dir, reuse, checked, cancel, sync))
        .buffer_unordered(concurrency);
    let mut first = None;
    while let Some(result) = downloads.next().await {
        if let Err(e) = result {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// One file of [`download_all`].
async fn download_one(
    file: &crate::format::StateFile,
    job: &CheckpointStorage,
    dir: &Path,
    reuse: &LocalFiles,
    checked: Option<&Arc<CheckedLinks>>,
    cancel: Option<&AtomicBool>,
    sync: bool,
) -> Result<()> {
    // Checked when the transfer is about to start (the stream takes the next file only
    // then, and polls it at once): transfers already started finish, no other starts.
    // (A download waiting for another restore's fetch of the same file checks again.)
    if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
        return Err(Error::Internal(format!(
            "the fetch of {} was cancelled",
            file.local_name
        )));
    }
    let target = dir.join(&file.local_name);
    if reuse.take(file, &target).await? {
        crate::storage::count_restored(file.size);
        return Ok(());
    }
    job.download_file_checked(&file.path, &target, &file.info(), checked, cancel)
        .await?;
    // Only SST files are ingested (the other files of a source without a list of its
    // SST files are read to list them, never ingested).
    if sync && file.local_name.ends_with(".sst") {
        tokio::task::spawn_blocking(move || {
            std::fs::File::open(&target)
                .and_then(|f| f.sync_data())
                .map_err(|e| Error::io(format!("sync {}", target.display()), e))
        })
        .await
        .map_err(|e| Error::Internal(format!("sync task failed: {e}")))??;
    }
    Ok(())
}

/// Replaces `dir` with the fully written and checked `incoming`.
///
/// Nothing is synced to disk: a restored directory is scratch space. After a machine
/// crash it is never opened as it is; a restart restores again, reusing only files whose
/// size and CRC32 are checked again.
pub(crate) async fn move_into_place(incoming: &Path, dir: &Path) -> Result<()> {
    remove_dir_if_exists(dir).await?;
    tokio::fs::rename(incoming, dir).await.map_err(|e| {
        Error::io(
            format!("move {} to {}", incoming.display(), dir.display()),
            e,
        )
    })
}

impl BackendBuilder {
    /// Restores subtask state of the operator `operator_uid` from `source` into this
    /// builder's empty local directory, for the builder's key-group range, whatever the
    /// parallelism the snapshot was taken at. An operator absent from the snapshot is
    /// refused unless [`RestoreOptions::allow_new_operator`] (then it starts empty); check
    /// the whole job with [`RestoreSource::check_operators`] first. The future is `Send`:
    /// a runtime may restore each subtask on a task of its own.
    ///
    /// Errors: `InvalidArgument` listing the snapshot's operators when it has no `operator_uid`
    /// (and `allow_new_operator` is off); `Incompatible` when the max parallelism differs
    /// or the snapshot's states disagree; `InvalidArgument` when the local directory is not empty;
    /// `NotFound`/`Corrupt` naming the file when a file is missing or damaged (nothing is
    /// left behind locally); storage and engine errors.
    pub async fn restore_operator(
        self,
        source: &RestoreSource,
        operator_uid: &str,
        options: &RestoreOptions,
    ) -> Result<RocksStateBackend> {
        self.options.validate()?;
        ensure_empty(&self.options.local_dir).await?;
        let Some(op) = source.metadata().operator(operator_uid) else {
            if options.allow_new_operator {
                return blocking(move || self.open()).await;
            }
            let known: Vec<&str> = source
                .metadata()
                .operators
                .iter()
                .map(|o| o.uid.as_str())
                .collect();
            // Not `NotFound`: that means "this snapshot is damaged, try an older one".
            return Err(Error::invalid(format!(
                "no operator {operator_uid:?} in {} (it holds {known:?}; set allow_new_operator for an operator new to the job)",
                source.location()
            )));
        };
        source.check_max_parallelism(op, self.options.max_parallelism)?;
        let started = std::time::Instant::now();
        let range = self.options.key_group_range;
        let overlapping: Vec<&KeyedSnapshot> = op
            .subtasks
            .iter()
            .filter_map(|s| s.keyed.as_ref())
            .filter(|k| k.key_group_range().intersect(&range).is_some())
            .collect();
        let files: Vec<&KeyedStateHandle> =
            overlapping.iter().filter_map(|k| k.as_files()).collect();
        let canonical: Vec<&KeyedSnapshot> = overlapping
            .iter()
            .copied()
            .filter(|k| k.as_files().is_none())
            .collect();
        let restored = if overlapping.is_empty() {
            blocking(move || self.open()).await
        } else if !canonical.is_empty() {
            if !files.is_empty() {
                return Err(Error::corrupt(
                    source.location(),
                    format!("operator {operator_uid:?} mixes canonical and file snapshots"),
                ));
            }
            self.restore_canonical(source, &op.states, &canonical).await
        } else if files.len() == 1 && files[0].key_group_range == range {
            self.restore_files(files[0], source.root(), options.mode)
                .await
        } else {
            self.rescale_files(source, &files, options).await
        };
        // The bytes it fetched were counted per file, once checked (`count_restored`).
        if restored.is_ok() {
            metrics::histogram!(crate::telemetry::RESTORE_DURATION)
                .record(crate::telemetry::seconds(started.elapsed()));
        }
        restored.map_err(|e| e.for_operator(operator_uid))
    }

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
        self.restore_files(handle, job, RestoreMode::Claim).await
    }

    pub(crate) async fn restore_files(
        self,
        handle: &KeyedStateHandle,
        job: &CheckpointStorage,
        mode: RestoreMode,
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
        ensure_empty(&dir).await?;
        let incoming = sibling(&dir, ".restoring");
        remove_dir_if_exists(&incoming).await?;
        tokio::fs::create_dir_all(&incoming)
            .await
            .map_err(|e| Error::io(format!("create {}", incoming.display()), e))?;
        let fetched = match LocalFiles::scan(&self.reuse).await {
            Ok(reuse) => download_all(handle, job, &incoming, &reuse, None, None).await,
            Err(e) => Err(e),
        };
        if let Err(e) = fetched {
            if let Err(cleanup) = remove_dir_if_exists(&incoming).await {
                tracing::warn!(dir = %incoming.display(), error = %cleanup.report(), "cannot remove a failed restore");
            }
            return Err(e);
        }
        move_into_place(&incoming, &dir).await?;

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
        let files = handle
            .files()
            .filter(|f| f.local_name.ends_with(".sst"))
            .map(|f| (f.local_name.clone(), f.clone()))
            .collect();
        seed(&backend, handle.checkpoint_id, job, files, mode);
        Ok(backend)
    }
}

/// Records which local SST files are copies of which stored files, so the next
/// checkpoint neither uploads nor (in `NoClaim` mode) references them.
pub(crate) fn seed(
    backend: &RocksStateBackend,
    checkpoint_id: u64,
    root: &CheckpointStorage,
    files: crate::engine::tracker::FileSet,
    mode: RestoreMode,
) {
    if !backend.options.incremental {
        return;
    }
    let uploaded = crate::engine::tracker::Uploaded {
        root: root.url().to_string(),
        files,
        in_place: mode == RestoreMode::Claim,
        source: Some(root.clone()),
    };
    backend.core.tracker.lock().seed(checkpoint_id, uploaded);
}

impl RocksStateBackend {
    /// Restores `handle` from `job` into a new backend with `options` (own memory, system
    /// clock). See [`BackendBuilder::restore`].
    pub async fn restore(
        options: crate::engine::BackendOptions,
        handle: &KeyedStateHandle,
        job: &CheckpointStorage,
    ) -> Result<Self> {
        Self::builder(options).restore(handle, job).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::StateFile;

    fn stored(name: &str, content: &[u8]) -> StateFile {
        StateFile {
            local_name: name.into(),
            path: format!("shared/{name}"),
            size: content.len() as u64,
            crc32: crc32fast::hash(content),
            uploaded_by: 1,
        }
    }

    /// Two earlier directories hold files of the same names and sizes; only the second
    /// holds this snapshot's. Every file is still taken from the right one, and once one
    /// was, the others are looked for in that directory first.
    #[tokio::test]
    async fn the_directory_that_matched_is_tried_first() {
        let root = tempfile::tempdir().unwrap();
        let (other, own, target) = (
            root.path().join("a-other"),
            root.path().join("b-own"),
            root.path().join("target"),
        );
        for dir in [&other, &own, &target] {
            std::fs::create_dir(dir).unwrap();
        }
        for name in ["1.sst", "2.sst"] {
            std::fs::write(other.join(name), b"another subtask's").unwrap();
            std::fs::write(own.join(name), b"this subtask's ..").unwrap();
        }
        let files = LocalFiles::scan(&[other.clone(), own.clone()])
            .await
            .unwrap();
        let first = stored("1.sst", b"this subtask's ..");
        assert_eq!(
            files.candidates("1.sst", first.size)[0].parent(),
            Some(other.as_path())
        );
        assert!(files.take(&first, &target.join("1.sst")).await.unwrap());
        assert_eq!(
            std::fs::read(target.join("1.sst")).unwrap(),
            b"this subtask's ..",
            "the matching file is the one taken"
        );
        let second = stored("2.sst", b"this subtask's ..");
        assert_eq!(
            files.candidates("2.sst", second.size)[0].parent(),
            Some(own.as_path()),
            "the directory that matched comes first"
        );
        assert!(files.take(&second, &target.join("2.sst")).await.unwrap());
        // A file that only the other directory holds is still found there.
        std::fs::write(other.join("3.sst"), b"only here").unwrap();
        let files_again = LocalFiles::scan(&[other.clone(), own.clone()])
            .await
            .unwrap();
        *files_again.matched_dir.lock() = Some(own.clone());
        let third = stored("3.sst", b"only here");
        assert!(files_again
            .take(&third, &target.join("3.sst"))
            .await
            .unwrap());
        assert_eq!(*files_again.matched_dir.lock(), Some(other.clone()));
    }

    /// Before anything is read, the directory holding most of a snapshot's files by name
    /// and size is preferred: its manifest is named like no other database's.
    #[tokio::test]
    async fn the_directory_holding_most_of_a_snapshot_is_preferred() {
        let root = tempfile::tempdir().unwrap();
        let (other, own) = (root.path().join("a-other"), root.path().join("b-own"));
        for dir in [&other, &own] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join("1.sst"), b"same size").unwrap();
        }
        std::fs::write(other.join("MANIFEST-000005"), b"m5").unwrap();
        std::fs::write(own.join("MANIFEST-000007"), b"m7").unwrap();
        let files = LocalFiles::scan(&[other.clone(), own.clone()])
            .await
            .unwrap();
        let snapshot = [
            stored("1.sst", b"same size"),
            stored("MANIFEST-000007", b"m7"),
        ];
        files.prefer_dir_of(&snapshot);
        assert_eq!(
            files.candidates("1.sst", 9)[0].parent(),
            Some(own.as_path())
        );
        // A tie goes to the directory scanned first.
        files.prefer_dir_of(&snapshot[..1]);
        assert_eq!(
            files.candidates("1.sst", 9)[0].parent(),
            Some(other.as_path())
        );
        // Nothing in common: the preference stays (here the directory scanned second).
        files.prefer_dir_of(&snapshot);
        files.prefer_dir_of(&[stored("9.sst", b"x")]);
        assert_eq!(
            files.candidates("1.sst", 9)[0].parent(),
            Some(own.as_path())
        );
    }
}
