//! `CheckpointCoordinator`: checkpoint ids, acknowledgements, completion, retention.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::checkpoint::discovery;
use crate::checkpoint::metadata::{
    CheckpointMetadata, OperatorSnapshot, SnapshotKind, SubtaskSnapshot,
};
use crate::checkpoint::registry::SharedStateRegistry;
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::hash;
use crate::keygroup;
use crate::savepoint::SavepointFormat;
use crate::storage::CheckpointStorage;

/// Settings of a [`CheckpointCoordinator`].
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// Completed checkpoints kept (default 1); older ones are subsumed and deleted.
    pub num_retained: usize,
    /// Checkpoints in flight at once (default 1); `trigger` returns `None` beyond it.
    pub max_concurrent: usize,
    /// A checkpoint not acknowledged by every subtask within this time is aborted by
    /// [`abort_expired`](CheckpointCoordinator::abort_expired) (default 10 minutes).
    pub timeout: Duration,
    /// Where savepoints go when a trigger names no directory (default none).
    pub savepoints_dir: Option<String>,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        Self {
            num_retained: 1,
            max_concurrent: 1,
            timeout: Duration::from_secs(600),
            savepoints_dir: None,
        }
    }
}

/// An operator taking part in checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorSpec {
    /// Stable uid.
    pub uid: String,
    /// Number of subtasks.
    pub parallelism: u32,
    /// Number of key groups.
    pub max_parallelism: u32,
}

/// What an acknowledgement led to.
#[derive(Debug)]
pub enum AckOutcome {
    /// Other subtasks still have to acknowledge.
    Pending,
    /// This was the last acknowledgement: the checkpoint is complete. Notify every subtask
    /// (`notify_checkpoint_complete`).
    Completed(Box<CheckpointMetadata>),
    /// The checkpoint was already aborted, subsumed or past its timeout; the snapshot's new
    /// files were deleted.
    Discarded,
}

/// A savepoint in flight: where its subtasks write, and in which format.
#[derive(Debug, Clone)]
pub struct SavepointTrigger {
    /// The savepoint's id (drawn from the checkpoint ids).
    pub checkpoint_id: u64,
    /// The savepoint's own folder; every file and `_metadata` go there.
    pub folder: CheckpointStorage,
    /// Canonical or native.
    pub format: SavepointFormat,
}

struct Pending {
    triggered_at_ms: u64,
    /// Set for savepoints.
    savepoint: Option<SavepointTrigger>,
    /// The latest completed checkpoint when this one was triggered: subtasks may reference
    /// its files (or older confirmed ones), so they are kept while this one is pending.
    base: u64,
    acks: BTreeMap<(usize, u32), SubtaskSnapshot>,
}

/// Coordinates the checkpoints of one job. Not internally synchronised: share it behind a
/// mutex (its methods are async and only await storage).
pub struct CheckpointCoordinator {
    job: CheckpointStorage,
    job_id: String,
    operators: Vec<OperatorSpec>,
    options: CoordinatorOptions,
    clock: Arc<dyn Clock>,
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
    retained: VecDeque<CheckpointMetadata>,
    registry: SharedStateRegistry,
    /// Checkpoints at or above it are kept: subtasks may reuse their files.
    reuse_floor: u64,
}

impl std::fmt::Debug for CheckpointCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointCoordinator")
            .field("job", &self.job.url())
            .field("next_id", &self.next_id)
            .field("pending", &self.pending.keys().collect::<Vec<_>>())
            .field(
                "retained",
                &self
                    .retained
                    .iter()
                    .map(|m| m.checkpoint_id)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Ids go up to 2^63: a folder name claiming more is damage, not history.
const MAX_CHECKPOINT_ID: u64 = 1 << 63;

/// The id after the highest one found in the job directory.
fn next_id(job: &CheckpointStorage, highest: u64) -> Result<u64> {
    if highest >= MAX_CHECKPOINT_ID {
        return Err(Error::corrupt(
            job.url_of(&format!("chk-{highest}")),
            format!("checkpoint id above {MAX_CHECKPOINT_ID}; remove or rename the folder"),
        ));
    }
    Ok(highest + 1)
}

/// Deletes paths; see [`CheckpointStorage::delete_many`].
pub(crate) async fn delete_all(job: &CheckpointStorage, paths: Vec<String>) -> Result<()> {
    job.delete_many(paths).await
}

impl CheckpointCoordinator {
    /// Starts coordinating `operators` of job `job_id`, whose checkpoint directory is `job`.
    ///
    /// Recovers from what storage holds: the newest `num_retained` completed checkpoints
    /// are retained (unreadable ones skipped with a warning), the registry is rebuilt from
    /// them, surplus older checkpoints left by a crash are subsumed, and ids continue above
    /// every `chk-N` found.
    pub async fn start(
        job: CheckpointStorage,
        job_id: &str,
        operators: Vec<OperatorSpec>,
        options: CoordinatorOptions,
    ) -> Result<Self> {
        Self::start_with_clock(job, job_id, operators, options, Arc::new(SystemClock)).await
    }

    /// Like [`start`](Self::start) with a given clock (timeouts and timestamps).
    pub async fn start_with_clock(
        job: CheckpointStorage,
        job_id: &str,
        operators: Vec<OperatorSpec>,
        options: CoordinatorOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        if options.num_retained == 0 || options.max_concurrent == 0 {
            return Err(Error::invalid(
                "num_retained and max_concurrent must be at least 1",
            ));
        }
        let mut uids = BTreeSet::new();
        for op in &operators {
            keygroup::validate_parallelism(op.parallelism, op.max_parallelism)?;
            if !uids.insert(op.uid.as_str()) {
                return Err(Error::invalid(format!(
                    "operator uid {:?} appears twice",
                    op.uid
                )));
            }
        }
        let found = discovery::scan(&job).await?;
        let mut completed = found.completed;
        let registry = SharedStateRegistry::rebuild(completed.iter());
        let surplus = completed.len().saturating_sub(options.num_retained);
        let subsumed: Vec<CheckpointMetadata> = completed.drain(..surplus).collect();
        let retained: VecDeque<CheckpointMetadata> = completed.into();
        let next_id = next_id(&job, found.highest_id)?;
        let mut coordinator = Self {
            job,
            job_id: job_id.to_string(),
            operators,
            options,
            clock,
            next_id,
            pending: BTreeMap::new(),
            retained,
            registry,
            reuse_floor: u64::MAX,
        };
        for old in subsumed {
            coordinator.discard_completed(&old).await?;
        }
        coordinator.release_unused().await?;
        Ok(coordinator)
    }

    /// The job's checkpoint directory.
    pub fn job_storage(&self) -> &CheckpointStorage {
        &self.job
    }

    /// The retained completed checkpoints, oldest first.
    pub fn retained(&self) -> impl Iterator<Item = &CheckpointMetadata> {
        self.retained.iter()
    }

    /// The newest completed checkpoint.
    pub fn latest_completed(&self) -> Option<&CheckpointMetadata> {
        self.retained.back()
    }

    /// Ids of the checkpoints in flight.
    pub fn pending_ids(&self) -> Vec<u64> {
        self.pending.keys().copied().collect()
    }

    /// The shared-state registry (for inspection).
    pub fn registry(&self) -> &SharedStateRegistry {
        &self.registry
    }

    /// Starts a new checkpoint and returns its id, or `None` when `max_concurrent`
    /// checkpoints are already in flight. The runtime then has every subtask snapshot
    /// with this id and acknowledge.
    pub fn trigger(&mut self) -> Option<u64> {
        if self.pending.len() >= self.options.max_concurrent {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        let base = self.retained.back().map_or(0, |m| m.checkpoint_id);
        self.pending.insert(
            id,
            Pending {
                triggered_at_ms: self.clock.now_millis(),
                savepoint: None,
                base,
                acks: BTreeMap::new(),
            },
        );
        Some(id)
    }

    /// Keeps every completed checkpoint with id `floor` or above, and the shared files
    /// they use, even beyond `num_retained`: for runtimes whose subtasks learn of
    /// completions late, `floor` is the oldest checkpoint a subtask may still reuse files
    /// of (the lowest last-confirmed checkpoint over all subtasks; 0 while one has not
    /// confirmed any). Takes effect at the next completion. The default keeps nothing
    /// beyond what pending checkpoints need.
    pub fn set_reuse_floor(&mut self, floor: u64) {
        self.reuse_floor = floor;
    }

    /// Starts checkpoint `checkpoint_id`, chosen by the runtime (for example its epoch),
    /// instead of the next id. Ids must grow: later [`trigger`](Self::trigger) calls
    /// continue above it. Not limited by `max_concurrent`: a runtime whose ids come from
    /// its own clock bounds the checkpoints in flight itself.
    ///
    /// Errors: `InvalidArgument` when the id is pending already, or not above the newest
    /// retained checkpoint.
    pub fn trigger_with_id(&mut self, checkpoint_id: u64) -> Result<()> {
        let newest = self.retained.back().map_or(0, |m| m.checkpoint_id);
        if checkpoint_id <= newest || checkpoint_id >= MAX_CHECKPOINT_ID {
            return Err(Error::invalid(format!(
                "checkpoint id {checkpoint_id} is not above the newest completed checkpoint {newest}"
            )));
        }
        if self.pending.contains_key(&checkpoint_id) {
            return Err(Error::invalid(format!(
                "checkpoint {checkpoint_id} is already in flight"
            )));
        }
        self.next_id = self.next_id.max(checkpoint_id + 1);
        self.pending.insert(
            checkpoint_id,
            Pending {
                triggered_at_ms: self.clock.now_millis(),
                savepoint: None,
                base: newest,
                acks: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Starts a savepoint in a new folder `savepoint-<job>-<random>` of `dir`, or of the
    /// configured `savepoints_dir` when `dir` is `None`. Savepoints are not limited by
    /// `max_concurrent`. Every subtask then writes its savepoint into the returned folder
    /// ([`PendingSnapshot::write_savepoint`](crate::PendingSnapshot::write_savepoint))
    /// and acknowledges as for a checkpoint; the last acknowledgement writes the folder's
    /// `_metadata`. Savepoints are never deleted by retention: see
    /// [`dispose_savepoint`](crate::savepoint::dispose_savepoint).
    ///
    /// Errors: `InvalidArgument` when neither `dir` nor `savepoints_dir` is given, or the
    /// configured URL is bad.
    pub fn trigger_savepoint(
        &mut self,
        dir: Option<&CheckpointStorage>,
        format: SavepointFormat,
    ) -> Result<SavepointTrigger> {
        let parent = match (dir, &self.options.savepoints_dir) {
            (Some(dir), _) => dir.clone(),
            (None, Some(url)) => CheckpointStorage::open(url)?,
            (None, None) => {
                return Err(Error::invalid(
                    "no savepoint directory: give one, or set the coordinator's savepoints_dir",
                ))
            }
        };
        let folder = parent.child(&crate::savepoint::folder_name(&self.job_id))?;
        let id = self.next_id;
        self.next_id += 1;
        let trigger = SavepointTrigger {
            checkpoint_id: id,
            folder,
            format,
        };
        self.pending.insert(
            id,
            Pending {
                triggered_at_ms: self.clock.now_millis(),
                savepoint: Some(trigger.clone()),
                base: u64::MAX,
                acks: BTreeMap::new(),
            },
        );
        Ok(trigger)
    }

    fn operator_index(&self, uid: &str) -> Result<usize> {
        self.operators
            .iter()
            .position(|o| o.uid == uid)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown operator uid {uid:?}; this job has {:?}",
                    self.operators.iter().map(|o| &o.uid).collect::<Vec<_>>()
                ))
            })
    }

    fn check_ack(
        &self,
        checkpoint_id: u64,
        op_index: usize,
        subtask: u32,
        snapshot: &SubtaskSnapshot,
    ) -> Result<()> {
        let op = &self.operators[op_index];
        if subtask >= op.parallelism {
            return Err(Error::invalid(format!(
                "operator {:?} has {} subtasks, got an acknowledgement from subtask {subtask}",
                op.uid, op.parallelism
            )));
        }
        if let Some(handle) = &snapshot.keyed {
            handle.validate()?;
            let expected =
                keygroup::key_group_range_for_subtask(subtask, op.parallelism, op.max_parallelism)?;
            if handle.checkpoint_id() != checkpoint_id
                || handle.max_parallelism() != op.max_parallelism
                || handle.key_group_range() != expected
            {
                return Err(Error::invalid(format!(
                    "operator {:?} subtask {subtask}: handle of checkpoint {} for key groups {} of {} does not match checkpoint {checkpoint_id}, key groups {expected} of {}",
                    op.uid, handle.checkpoint_id(), handle.key_group_range(), handle.max_parallelism(), op.max_parallelism
                )));
            }
        }
        Ok(())
    }

    /// Files a subtask snapshot wrote for this checkpoint (new shared and private files).
    fn written_files(snapshot: &SubtaskSnapshot) -> Vec<String> {
        snapshot
            .keyed
            .iter()
            .flat_map(|h| h.written_files())
            .map(|f| f.path.clone())
            .collect()
    }

    /// Records subtask `subtask` of `operator_uid` as done with `checkpoint_id`. The last
    /// acknowledgement completes the checkpoint: `_metadata` is written (create-if-absent),
    /// older pending checkpoints are aborted, and subsumed checkpoints are deleted.
    ///
    /// Errors: `InvalidArgument` for an unknown operator, subtask or mismatching handle
    /// (the acknowledgement is ignored); `NotFound` when the checkpoint references a
    /// shared file that is no longer registered (the checkpoint is aborted);
    /// `AlreadyExists` or storage errors when `_metadata` cannot be written (the
    /// checkpoint is dropped, its files left for the sweep).
    pub async fn acknowledge(
        &mut self,
        checkpoint_id: u64,
        operator_uid: &str,
        subtask: u32,
        snapshot: SubtaskSnapshot,
    ) -> Result<AckOutcome> {
        let op_index = self.operator_index(operator_uid)?;
        self.check_ack(checkpoint_id, op_index, subtask, &snapshot)?;
        let Some(pending) = self.pending.get_mut(&checkpoint_id) else {
            tracing::info!(
                checkpoint_id,
                operator_uid,
                subtask,
                "late acknowledgement discarded"
            );
            // Never touch what a completed checkpoint may own: a retried or duplicate
            // acknowledgement of one arrives here too.
            let completed = self
                .retained
                .iter()
                .any(|m| m.checkpoint_id >= checkpoint_id);
            if !completed {
                // Only what a checkpoint writes here: a late savepoint's paths belong to
                // its own folder.
                let written = Self::written_files(&snapshot)
                    .into_iter()
                    .filter(|p| p.starts_with("shared/") || p.starts_with("chk-"))
                    .collect();
                let orphans = self.unowned(written);
                if let Err(e) = delete_all(&self.job, orphans).await {
                    tracing::warn!(checkpoint_id, error = %e, "cannot delete the files of a late acknowledgement (the sweep will)");
                }
            }
            return Ok(AckOutcome::Discarded);
        };
        let age = self
            .clock
            .now_millis()
            .saturating_sub(pending.triggered_at_ms);
        if u128::from(age) >= self.options.timeout.as_millis() {
            // Too late to complete: the orphan sweep may already consider its files old.
            pending.acks.insert((op_index, subtask), snapshot);
            self.abort(checkpoint_id, "timed out").await?;
            self.subsume_and_release().await;
            return Ok(AckOutcome::Discarded);
        }
        if pending.acks.contains_key(&(op_index, subtask)) {
            return Err(Error::invalid(format!(
                "checkpoint {checkpoint_id}: operator {operator_uid:?} subtask {subtask} acknowledged twice"
            )));
        }
        pending.acks.insert((op_index, subtask), snapshot);
        let expected: usize = self.operators.iter().map(|o| o.parallelism as usize).sum();
        if pending.acks.len() < expected {
            return Ok(AckOutcome::Pending);
        }
        let pending = self
            .pending
            .remove(&checkpoint_id)
            .expect("pending checkpoint present");
        self.complete(checkpoint_id, pending).await
    }

    async fn complete(&mut self, checkpoint_id: u64, pending: Pending) -> Result<AckOutcome> {
        let mut acks = pending.acks;
        let mut operators = Vec::with_capacity(self.operators.len());
        for (i, op) in self.operators.iter().enumerate() {
            let subtasks: Vec<SubtaskSnapshot> = (0..op.parallelism)
                .map(|s| acks.remove(&(i, s)).unwrap_or_default())
                .collect();
            let mut states = Vec::new();
            for handle in subtasks.iter().filter_map(|s| s.keyed.as_ref()) {
                for meta in handle.states() {
                    if !states
                        .iter()
                        .any(|m: &crate::StateMeta| m.name == meta.name)
                    {
                        states.push(meta.clone());
                    }
                }
            }
            operators.push(OperatorSnapshot {
                uid: op.uid.clone(),
                uid_hash: hash::operator_uid_hash(&op.uid),
                parallelism: op.parallelism,
                max_parallelism: op.max_parallelism,
                states,
                subtasks,
            });
        }
        let kind = match pending.savepoint.as_ref().map(|s| s.format) {
            None => SnapshotKind::Checkpoint,
            Some(SavepointFormat::Canonical) => SnapshotKind::SavepointCanonical,
            Some(SavepointFormat::Native) => SnapshotKind::SavepointNative,
        };
        let meta = CheckpointMetadata {
            checkpoint_id,
            kind,
            job_id: self.job_id.clone(),
            triggered_at_ms: pending.triggered_at_ms,
            completed_at_ms: self.clock.now_millis(),
            operators,
        };
        if let Some(savepoint) = &pending.savepoint {
            let written = meta
                .keyed()
                .flat_map(|(_, h)| h.files())
                .map(|f| f.path.clone())
                .collect();
            let stored = savepoint
                .folder
                .put_if_absent(discovery::METADATA_FILE, meta.encode()?.into())
                .await;
            if let Err(e) = stored {
                tracing::warn!(checkpoint_id, folder = %savepoint.folder.url(), error = %e, "savepoint failed");
                if let Err(cleanup) = delete_all(&savepoint.folder, written).await {
                    tracing::warn!(error = %cleanup, "cannot remove the files of a failed savepoint");
                }
                return Err(e);
            }
            tracing::info!(checkpoint_id, folder = %savepoint.folder.url(), "savepoint completed");
            return Ok(AckOutcome::Completed(Box::new(meta)));
        }
        if let Err(e) = self.registry.check(&meta) {
            tracing::warn!(checkpoint_id, error = %e, "checkpoint fails: it references an unregistered file");
            if let Err(cleanup) = self.delete_checkpoint_files(&meta).await {
                tracing::warn!(checkpoint_id, error = %cleanup, "cannot delete the files of a failed checkpoint (the sweep will)");
            }
            return Err(e);
        }
        let bytes = meta.encode()?;
        let path = discovery::metadata_path(checkpoint_id);
        crate::crashpoint::hit("metadata");
        if let Err(e) = self.job.put_if_absent(&path, bytes.clone().into()).await {
            if e.kind() == crate::ErrorKind::AlreadyExists {
                return Err(e);
            }
            // The write may have happened even though the call failed: look.
            match self.job.read_small(&path, bytes.len() as u64).await {
                Ok(stored) if stored[..] == bytes[..] => {
                    tracing::warn!(checkpoint_id, error = %e, "metadata write reported an error but is stored");
                }
                _ => {
                    if let Err(cleanup) = self.job.delete(&path).await {
                        tracing::warn!(checkpoint_id, error = %cleanup, "cannot remove a possibly written _metadata");
                    }
                    return Err(e);
                }
            }
        }
        crate::crashpoint::hit("committed");
        // Committed. What follows is cleanup: its failures are logged, never reported as a
        // failed checkpoint, and retried on the next completion or by the sweep.
        // Checked before the commit, with `&mut self` held since: cannot fail now.
        self.registry.add(&meta);
        self.retained.push_back(meta.clone());
        let older: Vec<u64> = self
            .pending
            .range(..checkpoint_id)
            .map(|(id, _)| *id)
            .collect();
        for id in older {
            if let Err(e) = self.abort(id, "a newer checkpoint completed first").await {
                tracing::warn!(checkpoint = id, error = %e, "cleanup of an aborted checkpoint failed");
            }
        }
        self.subsume_and_release().await;
        Ok(AckOutcome::Completed(Box::new(meta)))
    }

    /// Paths that no retained checkpoint and no registry entry owns.
    fn unowned(&self, paths: Vec<String>) -> Vec<String> {
        let owned: BTreeSet<&str> = self
            .retained
            .iter()
            .flat_map(|m| m.referenced_paths())
            .collect();
        paths
            .into_iter()
            .filter(|p| !self.registry.contains(p) && !owned.contains(p.as_str()))
            .collect()
    }

    /// The oldest checkpoint whose files a pending checkpoint's subtasks (or, with a
    /// reuse floor, any subtask) may reuse.
    fn lowest_pending_base(&self) -> u64 {
        self.pending
            .values()
            .map(|p| p.base)
            .min()
            .unwrap_or(u64::MAX)
            .min(self.reuse_floor)
    }

    /// Subsumes retained checkpoints beyond `num_retained` (keeping any that a pending
    /// checkpoint's subtasks may still reuse files of), then deletes shared files nothing
    /// uses. A checkpoint stays retained until its deletion succeeded. Errors are logged.
    async fn subsume_and_release(&mut self) {
        let lowest_base = self.lowest_pending_base();
        while self.retained.len() > self.options.num_retained {
            let Some(old) = self.retained.front() else {
                break;
            };
            if old.checkpoint_id >= lowest_base {
                break;
            }
            match self.discard_completed(old).await {
                Ok(()) => {
                    self.retained.pop_front();
                }
                Err(e) => {
                    tracing::warn!(checkpoint = old.checkpoint_id, error = %e, "cannot delete a subsumed checkpoint yet");
                    break;
                }
            }
        }
        if let Err(e) = self.release_unused().await {
            tracing::warn!(error = %e, "cannot delete unused shared files yet (the sweep will)");
        }
    }

    /// Deletes what a checkpoint wrote itself: new shared files and private files.
    async fn delete_checkpoint_files(&self, meta: &CheckpointMetadata) -> Result<()> {
        let paths = meta
            .operators
            .iter()
            .flat_map(|op| op.subtasks.iter())
            .flat_map(Self::written_files)
            .collect();
        delete_all(&self.job, self.unowned(paths)).await
    }

    /// Deletes a subsumed checkpoint: `_metadata` first (so it no longer counts as
    /// completed), then its private files. Shared files go through the registry.
    async fn discard_completed(&self, meta: &CheckpointMetadata) -> Result<()> {
        self.job
            .delete(&discovery::metadata_path(meta.checkpoint_id))
            .await?;
        crate::crashpoint::hit("retention");
        let private: Vec<String> = meta
            .handles()
            .flat_map(|(_, h)| h.private.iter().map(|f| f.path.clone()))
            .collect();
        delete_all(&self.job, private).await
    }

    /// Rule 2: deletes shared files no retained (and no pending checkpoint's base) uses.
    async fn release_unused(&mut self) -> Result<()> {
        let lowest_retained = self.retained.front().map_or(u64::MAX, |m| m.checkpoint_id);
        let lowest_base = self.lowest_pending_base();
        let gone = self
            .registry
            .release_below(lowest_retained.min(lowest_base));
        if !gone.is_empty() {
            tracing::debug!(
                files = gone.len(),
                "deleting shared files no checkpoint uses"
            );
        }
        delete_all(&self.job, gone).await
    }

    async fn abort(&mut self, checkpoint_id: u64, reason: &str) -> Result<()> {
        let Some(pending) = self.pending.remove(&checkpoint_id) else {
            return Ok(());
        };
        tracing::info!(checkpoint_id, reason, "checkpoint aborted");
        let paths: Vec<String> = pending
            .acks
            .values()
            .flat_map(Self::written_files)
            .collect();
        let deleted = match &pending.savepoint {
            // A savepoint's folder holds nothing any checkpoint owns.
            Some(savepoint) => delete_all(&savepoint.folder, paths).await,
            None => delete_all(&self.job, self.unowned(paths)).await,
        };
        // The checkpoint is aborted either way; what could not be deleted is unreferenced
        // and left to the orphan sweep.
        if let Err(e) = deleted {
            tracing::warn!(checkpoint_id, error = %e, "cannot delete the files of an aborted checkpoint (the sweep will)");
        }
        Ok(())
    }

    /// A subtask could not snapshot: aborts the checkpoint and deletes the files its
    /// acknowledged subtasks wrote. Tell the subtasks (`notify_checkpoint_aborted`).
    pub async fn decline(&mut self, checkpoint_id: u64, reason: &str) -> Result<()> {
        self.abort(checkpoint_id, reason).await?;
        self.subsume_and_release().await;
        Ok(())
    }

    /// Aborts every pending checkpoint older than the timeout; returns their ids.
    pub async fn abort_expired(&mut self) -> Result<Vec<u64>> {
        let now = self.clock.now_millis();
        let timeout = self.options.timeout.as_millis() as u64;
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.triggered_at_ms) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.abort(*id, "timed out").await?;
        }
        if !expired.is_empty() {
            self.subsume_and_release().await;
        }
        Ok(expired)
    }

    /// Stops coordinating: pending checkpoints are aborted. Retained checkpoints stay
    /// (retain-on-cancel, so the job can resume from the latest) unless `discard` asks to
    /// delete them and every shared file.
    pub async fn shutdown(&mut self, discard: bool) -> Result<()> {
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            self.abort(id, "coordinator shut down").await?;
        }
        if discard {
            while let Some(old) = self.retained.pop_front() {
                self.discard_completed(&old).await?;
            }
            let gone = self.registry.release_below(u64::MAX);
            delete_all(&self.job, gone).await?;
        }
        Ok(())
    }
}
