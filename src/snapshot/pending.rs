//! `PendingSnapshot`: a staged RocksDB checkpoint waiting to be uploaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use parking_lot::Mutex;

use crate::clock::Clock;
use crate::engine::tracker::{SnapshotTracker, Uploaded};
use crate::engine::{new_uid, BackendCore, BackendOptions, Cut, OpenMode, SharedResources};
use crate::error::{Error, Result};
use crate::format::handle::{CanonicalHandle, KeyedSnapshot};
use crate::format::handle::{KeyedStateHandle, StateFile};
use crate::format::StateMeta;
use crate::format::{Compression, SavepointFormat};
use crate::hash;
use crate::keygroup::KeyGroupRange;
use crate::savepoint::canonical;
use crate::storage::CheckpointStorage;

/// A local directory removed when dropped: staged snapshots never outlive their use.
/// Async code removes it with [`remove`](Self::remove) instead, off the runtime's threads.
#[derive(Debug)]
pub(crate) struct StagingDir {
    path: PathBuf,
    removed: bool,
}

impl StagingDir {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            removed: false,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directory without blocking the async runtime.
    pub(crate) async fn remove(mut self) {
        if let Err(e) = tokio::fs::remove_dir_all(&self.path).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.path.display(), error = %e, "cannot remove staging directory");
            }
        }
        self.removed = true;
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.path.display(), error = %e, "cannot remove staging directory");
            }
        }
    }
}

/// A file of a staged checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct StagedFile {
    pub name: String,
    pub size: u64,
}

/// The files of a snapshot being taken on a thread of its own ([`start_capture`]).
pub(crate) enum Capture {
    /// The thread has not answered yet.
    Running(tokio::sync::oneshot::Receiver<Result<(Vec<StagedFile>, Duration)>>),
    /// The files are staged (also when the synchronous phase took them itself).
    Taken,
    /// The files could not be taken: the snapshot can never be uploaded.
    Failed(Error),
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Capture::Running(_) => f.write_str("Running"),
            Capture::Taken => f.write_str("Taken"),
            Capture::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
        }
    }
}

/// Starts taking the files of `cut` into `target` as soon as the flush the synchronous
/// phase started is done, on a thread of its own: the capture must not wait for the
/// upload queue, or later writes would be flushed first. A capture nobody waits for any
/// more removes what it staged.
pub(crate) fn start_capture(core: Arc<BackendCore>, cut: Cut, target: PathBuf) -> Result<Capture> {
    let (tx, result) = tokio::sync::oneshot::channel();
    let counted = core.captures.start();
    let spawned = std::thread::Builder::new()
        .name("rockstate-capture".into())
        .spawn(move || {
            // Declared after the count, so dropped before it even by a panic.
            let counted = counted;
            let core = core;
            let started = Instant::now();
            let taken = wait_and_capture(&core, cut, &target).map(|f| (f, started.elapsed()));
            // The database is let go of, and what nobody waits for any more is removed,
            // before the capture counts as finished: a backend being dropped waits for
            // that, and its directory is then free to reopen.
            drop(core);
            if tx.send(taken).is_err() {
                if let Err(e) = std::fs::remove_dir_all(&target) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(dir = %target.display(), error = %e, "cannot remove staging directory");
                    }
                }
            }
            drop(counted);
        });
    if let Err(e) = spawned {
        // The thread's closure, and the count it held, are dropped.
        return Err(Error::io("start a snapshot capture thread", e));
    }
    Ok(Capture::Running(result))
}

fn wait_and_capture(core: &BackendCore, cut: Cut, target: &Path) -> Result<Vec<StagedFile>> {
    let started = Instant::now();
    loop {
        // Read before the check: a flush finishing in between wakes the wait at once.
        let seen = core.seals.flushes();
        if !core.flush_pending(&cut)? {
            break;
        }
        if started.elapsed() > CAPTURE_LIMIT {
            core.flush_later_in_sync();
            return Err(Error::Busy(format!(
                "the flush of {} has not finished after {CAPTURE_LIMIT:?}",
                core.dir().display()
            )));
        }
        core.seals.wait_for_flush(seen, Duration::from_millis(20));
    }
    core.capture_into(cut, target)?;
    list_captured(core, target)
}

/// Lists the files `core` just hard-linked into `target`, and adds to them the list of
/// their SST files as RocksDB describes them ([`crate::engine::sst_list`]).
pub(crate) fn list_captured(core: &BackendCore, target: &Path) -> Result<Vec<StagedFile>> {
    let mut files = list_staged(target)?;
    // Described by RocksDB after the links: a file compacted away in between leaves the
    // snapshot without a list (a rescale then reads its MANIFEST), never with a wrong one.
    let staged: Vec<(String, u64)> = files.iter().map(|f| (f.name.clone(), f.size)).collect();
    let listed = core
        .live_files()
        .and_then(|live| crate::engine::sst_list::write(target, &staged, &live));
    match listed {
        Ok(Some(size)) => {
            files.push(StagedFile {
                name: crate::engine::sst_list::SST_LIST_NAME.to_string(),
                size,
            });
            files.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(None) => {
            tracing::debug!(dir = %target.display(), "the files changed while they were listed; the snapshot has no list of them");
        }
        // The list only spares a rescale work: the snapshot goes on without it.
        Err(e) => {
            tracing::warn!(dir = %target.display(), error = %e.report(), "cannot list a snapshot's files; it has no list of them");
        }
    }
    Ok(files)
}

/// The result of a snapshot's synchronous phase: the point it stands for, and once
/// [`capture`](Self::capture) ran, a consistent, immutable copy (hard links) of the
/// backend's files at that point. The backend keeps processing meanwhile.
///
/// Dropping it without uploading removes the staged files; the checkpoint is then simply
/// never acknowledged.
#[derive(Debug)]
pub struct PendingSnapshot {
    pub(crate) checkpoint_id: u64,
    /// Before `staging`: fields drop in order, so a capture thread still running learns
    /// that nobody waits (and removes what it staged) before the directory is removed.
    pub(crate) capture: Capture,
    pub(crate) staging: StagingDir,
    pub(crate) files: Vec<StagedFile>,
    pub(crate) reusable: Uploaded,
    pub(crate) incremental: bool,
    pub(crate) backend_uid: String,
    pub(crate) key_group_range: KeyGroupRange,
    pub(crate) max_parallelism: u32,
    pub(crate) states: Vec<StateMeta>,
    pub(crate) tracker: Arc<Mutex<SnapshotTracker>>,
    pub(crate) sync_duration: Duration,
    pub(crate) capture_duration: Duration,
    pub(crate) resources: SharedResources,
    pub(crate) clock: Arc<dyn Clock>,
}

enum Placement {
    Shared,
    Private,
}

enum Action {
    Upload(Placement),
    /// Copy this earlier file inside the store.
    Copy(StateFile),
}

/// How long [`PendingSnapshot::capture`] waits for the flush of its synchronous phase.
const CAPTURE_LIMIT: Duration = Duration::from_secs(600);

/// The name of a canonical savepoint's data file inside its subtask folder.
pub(crate) const CANONICAL_FILE: &str = "state.rkss";

impl PendingSnapshot {
    /// The checkpoint id.
    pub fn checkpoint_id(&self) -> u64 {
        self.checkpoint_id
    }

    /// How long the synchronous phase took: the time processing was held up.
    pub fn sync_duration(&self) -> Duration {
        self.sync_duration
    }

    /// How long taking the files took after the synchronous phase (waiting for the flush
    /// it started, then hard links); zero before [`capture`](Self::capture) ran or when
    /// the synchronous phase took the files itself.
    pub fn capture_duration(&self) -> Duration {
        self.capture_duration
    }

    /// Number of staged files and their total size; both zero until the files are taken
    /// ([`capture`](Self::capture)).
    pub fn staged_size(&self) -> (usize, u64) {
        (self.files.len(), self.files.iter().map(|f| f.size).sum())
    }

    /// Waits for the snapshot's files: a thread started by the synchronous phase takes
    /// them once the flush it started is done (hard links into the staging directory,
    /// checked to hold nothing written after the synchronous phase). Does not block the
    /// async runtime. [`upload`](Self::upload) and
    /// [`write_savepoint`](Self::write_savepoint) call it first; once it failed, every
    /// later call (and so every upload) returns the same error.
    ///
    /// Errors: `Busy` (retryable; the checkpoint fails and the backend's next snapshot
    /// flushes in its synchronous phase) when data written after the synchronous phase
    /// may have reached the files first, or when the flush has not finished within 10
    /// minutes; engine and local I/O errors.
    pub async fn capture(&mut self) -> Result<()> {
        let answer = match &mut self.capture {
            Capture::Taken => return Ok(()),
            Capture::Failed(e) => return Err(e.clone()),
            // Awaited by reference: a caller that stops waiting can wait again later.
            Capture::Running(result) => result.await,
        };
        match answer {
            Ok(Ok((files, took))) => {
                self.files = files;
                self.capture_duration = took;
                self.capture = Capture::Taken;
                Ok(())
            }
            Ok(Err(e)) => {
                self.capture = Capture::Failed(e.clone());
                Err(e)
            }
            Err(_) => {
                let e =
                    Error::Internal("the snapshot capture thread ended without an answer".into());
                self.capture = Capture::Failed(e.clone());
                Err(e)
            }
        }
    }

    /// Uploads the snapshot into `job` (the job's checkpoint directory) for subtask
    /// `subtask` of the operator `operator_uid`, and returns its handle.
    ///
    /// New SST files go to `shared/<unique>.sst` (incremental) and the rest to
    /// `chk-<id>/<uid hash>/<subtask>/<unique>/`. At most `transfer_concurrency` files move at once.
    /// The handle's shared files become reusable by later snapshots only once
    /// [`notify_checkpoint_complete`](crate::RocksStateBackend::notify_checkpoint_complete)
    /// confirms the checkpoint, and only by snapshots uploaded to the same directory.
    /// After a restore from elsewhere (or in `NoClaim` mode), files that are unchanged
    /// copies of restored ones are copied inside the store instead of uploaded when the
    /// store allows it.
    ///
    /// Errors: storage and local I/O errors. On failure the files this call uploaded are
    /// deleted (best effort; the orphan sweep catches the rest) and nothing is recorded.
    pub async fn upload(
        mut self,
        job: &CheckpointStorage,
        operator_uid: &str,
        subtask: u32,
    ) -> Result<KeyedStateHandle> {
        self.capture().await?;
        // A folder of its own per upload: two writers that happen to use the same
        // checkpoint id (a stale process beside a new one) never overwrite each other's
        // private files, which large multipart uploads would do unconditionally.
        let private_dir = format!(
            "chk-{}/{}/{subtask}/{}",
            self.checkpoint_id,
            hash::operator_uid_hash(operator_uid),
            &new_uid()[..16]
        );
        let incremental = self.incremental;
        let (handle, staging) = self.transfer(job, &private_dir, incremental, true).await?;
        staging.remove().await;
        Ok(handle)
    }

    /// Writes this snapshot as subtask `subtask`'s part of a savepoint into the savepoint
    /// folder `folder` (from [`SavepointTrigger`](crate::checkpoint::SavepointTrigger)),
    /// under `<uid hash>/<subtask>/`. Native: every RocksDB file is copied. Canonical:
    /// the consistent copy is scanned key group by key group into one data file
    /// (compressed with `compression`), then uploaded. Nothing is recorded for reuse by
    /// checkpoints.
    ///
    /// Errors: storage, engine and local I/O errors; files already written are deleted.
    pub async fn write_savepoint(
        mut self,
        folder: &CheckpointStorage,
        operator_uid: &str,
        subtask: u32,
        format: SavepointFormat,
        compression: Compression,
    ) -> Result<KeyedSnapshot> {
        self.capture().await?;
        let dir = format!("{}/{subtask}", hash::operator_uid_hash(operator_uid));
        match format {
            SavepointFormat::Native => {
                let (handle, staging) = self.transfer(folder, &dir, false, false).await?;
                staging.remove().await;
                Ok(KeyedSnapshot::Files(handle))
            }
            SavepointFormat::Canonical => self.write_canonical(folder, &dir, compression).await,
        }
    }

    async fn write_canonical(
        self,
        folder: &CheckpointStorage,
        dir: &str,
        compression: Compression,
    ) -> Result<KeyedSnapshot> {
        let staged = self.staging.path().to_path_buf();
        let data_file = PathBuf::from(format!("{}.canonical", staged.display()));
        let mut options = BackendOptions::new(&staged, self.key_group_range, self.max_parallelism);
        options.incremental = false;
        let resources = self.resources.clone();
        let clock = self.clock.clone();
        let checkpoint_id = self.checkpoint_id;
        let out = data_file.clone();
        let written = tokio::task::spawn_blocking(move || {
            let core = crate::engine::open_core(&options, &resources, clock, OpenMode::Restored)?;
            // The staged copy is removed once rewritten.
            core.mark_scratch();
            canonical::write_file(&core, checkpoint_id, compression, &out)
        })
        .await
        .map_err(|e| Error::Internal(format!("savepoint task failed: {e}")))?;
        let rel = format!("{dir}/{CANONICAL_FILE}");
        let uploaded = match written {
            Ok(written) => match folder.upload_file(&data_file, &rel).await {
                // The stored bytes must be the ones written (and checksummed) above.
                Ok(info) if info == written.info => Ok((info, written)),
                Ok(info) => {
                    if let Err(e) = folder.delete(&rel).await {
                        tracing::warn!(path = %folder.url_of(&rel), error = %e.report(), "cannot remove a mismatching savepoint file");
                    }
                    Err(Error::corrupt(
                        format!("savepoint file {}", folder.url_of(&rel)),
                        format!(
                            "stored {} bytes with CRC32 {:08x}, written {} bytes with {:08x}",
                            info.size, info.crc32, written.info.size, written.info.crc32
                        ),
                    ))
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = tokio::fs::remove_file(&data_file).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %data_file.display(), error = %e, "cannot remove a savepoint data file");
            }
        }
        self.staging.remove().await;
        let (info, written) = uploaded?;
        Ok(KeyedSnapshot::Canonical(CanonicalHandle {
            checkpoint_id,
            key_group_range: self.key_group_range,
            max_parallelism: self.max_parallelism,
            states: self.states,
            file: StateFile {
                local_name: CANONICAL_FILE.to_string(),
                path: rel,
                size: info.size,
                crc32: info.crc32,
                uploaded_by: checkpoint_id,
            },
            entries: written.entries,
        }))
    }

    /// Moves the staged files into `target`: SSTs of an incremental snapshot to
    /// `shared/` (or referenced, or copied), the rest to `private_dir`. `record` makes
    /// the shared files reusable once the checkpoint is confirmed.
    async fn transfer(
        self,
        target: &CheckpointStorage,
        private_dir: &str,
        incremental: bool,
        record: bool,
    ) -> Result<(KeyedStateHandle, StagingDir)> {
        let mut reused = Vec::new();
        let mut jobs = Vec::new();
        let same_root = self.reusable.root == target.url();
        let copy_source = self
            .reusable
            .source
            .clone()
            .filter(|source| target.can_copy_from(source));
        for file in &self.files {
            let is_sst = file.name.ends_with(".sst");
            if is_sst && incremental {
                let previous = self
                    .reusable
                    .files
                    .get(&file.name)
                    .filter(|prev| prev.size == file.size);
                let dest = format!("shared/{}.sst", new_uid());
                match previous {
                    Some(prev)
                        if same_root
                            && self.reusable.in_place
                            && prev.path.starts_with("shared/") =>
                    {
                        reused.push(StateFile {
                            local_name: file.name.clone(),
                            ..prev.clone()
                        })
                    }
                    Some(prev) if copy_source.is_some() => {
                        jobs.push((file.clone(), dest, Action::Copy(prev.clone())))
                    }
                    _ => jobs.push((file.clone(), dest, Action::Upload(Placement::Shared))),
                }
            } else {
                jobs.push((
                    file.clone(),
                    format!("{private_dir}/{}", file.name),
                    Action::Upload(Placement::Private),
                ));
            }
        }
        let started = Instant::now();
        let staging = self.staging.path().to_path_buf();
        let checkpoint_id = self.checkpoint_id;
        // Futures own what they use (no borrowed captures), so the upload can run on any
        // runtime task.
        let results: Vec<Result<(StateFile, Placement, bool)>> = futures::stream::iter(jobs)
            .map(|(file, rel, action)| {
                let target = target.clone();
                let local = staging.join(&file.name);
                let copy_source = copy_source.clone();
                async move {
                    let (info, placement, copied) = match (action, copy_source) {
                        (Action::Copy(prev), Some(source)) => {
                            match target.copy_from(&source, &prev.path, &rel).await {
                                Ok(()) => (prev.info(), Placement::Shared, true),
                                // Gone from the source since the restore: send ours.
                                Err(e) if e.kind() == crate::error::ErrorKind::NotFound => {
                                    tracing::info!(file = %source.url_of(&prev.path), "restored file is gone; uploading the local copy");
                                    (target.upload_file(&local, &rel).await?, Placement::Shared, false)
                                }
                                Err(e) => return Err(e),
                            }
                        }
                        (Action::Upload(placement), _) => {
                            (target.upload_file(&local, &rel).await?, placement, false)
                        }
                        (Action::Copy(_), None) => (
                            target.upload_file(&local, &rel).await?,
                            Placement::Shared,
                            false,
                        ),
                    };
                    crate::crashpoint::hit("upload");
                    Ok((
                        StateFile {
                            local_name: file.name,
                            path: rel,
                            size: info.size,
                            crc32: info.crc32,
                            uploaded_by: checkpoint_id,
                        },
                        placement,
                        copied,
                    ))
                }
            })
            .buffer_unordered(target.options().transfer_concurrency.max(1))
            .collect()
            .await;

        let mut shared = reused;
        let mut private = Vec::new();
        let mut written = Vec::new();
        let mut uploaded_bytes = 0;
        let mut copied_bytes = 0u64;
        let mut first_error = None;
        for result in results {
            match result {
                Ok((file, placement, copied)) => {
                    if copied {
                        copied_bytes += file.size;
                    } else {
                        uploaded_bytes += file.size;
                    }
                    written.push(file.path.clone());
                    match placement {
                        Placement::Shared => shared.push(file),
                        Placement::Private => private.push(file),
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(error) = first_error {
            if let Err(e) = target.delete_many(written).await {
                tracing::warn!(checkpoint = self.checkpoint_id, error = %e.report(), "cleanup after a failed upload was incomplete");
            }
            tracing::warn!(checkpoint = self.checkpoint_id, error = %error.report(), "snapshot upload failed");
            self.staging.remove().await;
            return Err(error);
        }
        shared.sort_by(|a, b| a.local_name.cmp(&b.local_name));
        private.sort_by(|a, b| a.local_name.cmp(&b.local_name));
        if incremental && record {
            let files = shared
                .iter()
                .map(|f| (f.local_name.clone(), f.clone()))
                .collect::<BTreeMap<_, _>>();
            let uploaded = Uploaded {
                root: target.url().to_string(),
                files,
                in_place: true,
                source: Some(target.clone()),
            };
            self.tracker.lock().uploaded(self.checkpoint_id, uploaded);
        }
        tracing::debug!(
            checkpoint = self.checkpoint_id,
            uploaded_bytes,
            copied_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot uploaded"
        );
        let handle = KeyedStateHandle {
            backend_uid: self.backend_uid,
            checkpoint_id: self.checkpoint_id,
            key_group_range: self.key_group_range,
            max_parallelism: self.max_parallelism,
            incremental,
            shared,
            private,
            states: self.states,
            uploaded_bytes: uploaded_bytes + copied_bytes,
        };
        Ok((handle, self.staging))
    }
}

/// Lists the files of a staged checkpoint.
fn list_staged(dir: &Path) -> Result<Vec<StagedFile>> {
    let err = |e| Error::io(format!("list {}", dir.display()), e);
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let meta = entry.metadata().map_err(err)?;
        if !meta.is_file() {
            continue;
        }
        let name = entry.file_name().into_string().map_err(|n| {
            Error::Internal(format!("non UTF-8 file name {n:?} in {}", dir.display()))
        })?;
        files.push(StagedFile {
            name,
            size: meta.len(),
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}
