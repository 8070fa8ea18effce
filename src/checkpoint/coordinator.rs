//! `CheckpointCoordinator`: checkpoint ids, acknowledgements, completion, retention.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::checkpoint::discovery;
use crate::checkpoint::epoch::{Epochs, RestoredPoint, WriterEpoch};
use crate::checkpoint::registry::SharedStateRegistry;
use crate::checkpoint::status::{self, InFlight, RunState, StatusTracker};
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, ErrorKind, Result};
use crate::format::metadata::{
    CheckpointMetadata, OperatorSnapshot, SnapshotKind, SubtaskSnapshot,
};
use crate::format::SavepointFormat;
use crate::hash;
use crate::keygroup;
use crate::storage::CheckpointStorage;
use crate::telemetry;

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
    /// How often an unchanged status document is rewritten (default 10 s); a status not
    /// refreshed for three of these is stale. See [`status`].
    pub status_heartbeat: Duration,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        Self {
            num_retained: 1,
            max_concurrent: 1,
            timeout: Duration::from_secs(600),
            savepoints_dir: None,
            status_heartbeat: status::DEFAULT_HEARTBEAT,
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

/// What the job's state was started from, as the coordinator records it when it claims
/// the job directory (see [`WriterEpoch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPoint {
    /// Continue the current timeline from its newest completed checkpoint (or from
    /// nothing when it has none).
    Latest,
    /// The job restored this completed checkpoint of its own directory: it is kept
    /// until newer checkpoints complete, and checkpoints taken after it by earlier runs
    /// are abandoned.
    Checkpoint(u64),
    /// The job started from this snapshot (URL) of another directory, or from a
    /// savepoint: every earlier checkpoint of the directory is abandoned, and until the
    /// first checkpoint completes, resuming the latest restores this snapshot again.
    External(String),
    /// The job started empty: every earlier checkpoint of the directory is abandoned.
    Fresh,
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
    /// This writer's claim on the job directory.
    epoch: WriterEpoch,
    /// Set once a newer writer is found: nothing is committed or deleted any more.
    fenced: Option<(u64, u64)>,
    /// Checkpoints whose `_metadata` write got no definite answer: their files stay
    /// registered (they may be complete) until a newer checkpoint completes.
    in_doubt: BTreeMap<u64, CheckpointMetadata>,
    /// Checkpoints of abandoned timelines, deleted once one of this timeline completes.
    abandoned: Vec<CheckpointMetadata>,
    /// What the status document ([`status`]) reports.
    status: StatusTracker,
    /// Completed checkpoints held against retention ([`hold`](Self::hold)), with counts.
    holds: BTreeMap<u64, usize>,
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

/// Checks a coordinator's settings and operators.
fn validate(options: &CoordinatorOptions, operators: &[OperatorSpec]) -> Result<()> {
    if options.num_retained == 0 || options.max_concurrent == 0 {
        return Err(Error::invalid(
            "num_retained and max_concurrent must be at least 1",
        ));
    }
    let mut uids = BTreeSet::new();
    for op in operators {
        keygroup::validate_parallelism(op.parallelism, op.max_parallelism)?;
        if !uids.insert(op.uid.as_str()) {
            return Err(Error::invalid(format!(
                "operator uid {:?} appears twice",
                op.uid
            )));
        }
    }
    Ok(())
}

/// Records a completed checkpoint or savepoint in the metrics ([`telemetry`]).
fn record_completion(job_id: &str, meta: &CheckpointMetadata, now_ms: u64) {
    let job = job_id.to_string();
    if meta.is_savepoint() {
        metrics::counter!(telemetry::SAVEPOINTS_COMPLETED, "job" => job).increment(1);
        return;
    }
    let uploaded = meta.uploaded_bytes();
    let duration = Duration::from_millis(now_ms.saturating_sub(meta.triggered_at_ms));
    metrics::counter!(telemetry::CHECKPOINTS_COMPLETED, "job" => job.clone()).increment(1);
    metrics::histogram!(telemetry::CHECKPOINT_DURATION, "job" => job.clone())
        .record(telemetry::seconds(duration));
    metrics::counter!(telemetry::CHECKPOINT_UPLOADED, "job" => job.clone()).increment(uploaded);
    metrics::counter!(telemetry::CHECKPOINT_REUSED, "job" => job.clone())
        .increment(meta.total_size().saturating_sub(uploaded));
    metrics::gauge!(telemetry::CHECKPOINT_LAST_UPLOADED, "job" => job).set(uploaded as f64);
}

/// Rounds of "write, then read back" before a `_metadata` write is declared in doubt.
const COMMIT_ROUNDS: u32 = 6;

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
        Self::start_at(job, job_id, operators, options, clock, StartPoint::Latest).await
    }

    /// Starts coordinating after the job's state was started from `start`.
    ///
    /// First claims the job directory: a new writer epoch (see [`WriterEpoch`]) fences
    /// every older writer before its next commit or delete, and records `start`, so that
    /// checkpoints of timelines nobody continues (taken after the restored one by an
    /// earlier run) are abandoned: "latest" never returns them, and this coordinator
    /// deletes them once a checkpoint of its own completes. Then it recovers from what storage holds: the newest `num_retained`
    /// completed checkpoints of the timeline are retained (the restored one among them),
    /// the registry is rebuilt from them, older ones are subsumed, and ids continue above
    /// every `chk-N` found after the claim. Abandoned checkpoints are deleted once a
    /// checkpoint of the new timeline completes.
    ///
    /// Errors: `InvalidArgument` for bad options or operators; `NotFound` when the
    /// restored checkpoint is gone (another process retired it); `Fenced` when a newer
    /// writer claimed the directory meanwhile; storage errors.
    pub async fn start_at(
        job: CheckpointStorage,
        job_id: &str,
        operators: Vec<OperatorSpec>,
        options: CoordinatorOptions,
        clock: Arc<dyn Clock>,
        start: StartPoint,
    ) -> Result<Self> {
        validate(&options, &operators)?;
        let before = discovery::scan(&job).await?;
        let mut external = None;
        let restored = match start {
            StartPoint::Fresh => None,
            StartPoint::External(url) => {
                external = Some(url);
                None
            }
            StartPoint::Latest => match before.completed.last() {
                Some(m) => Some(RestoredPoint {
                    checkpoint_id: m.checkpoint_id,
                    epoch: m.writer_epoch,
                }),
                // Nothing completed since a restore from elsewhere: that restore stands.
                None => {
                    external = Epochs::list(&job).await?.newest_external().await?;
                    None
                }
            },
            StartPoint::Checkpoint(id) => {
                let meta = before
                    .completed
                    .iter()
                    .chain(&before.abandoned)
                    .find(|m| m.checkpoint_id == id)
                    .ok_or_else(|| {
                        Error::NotFound(format!(
                            "checkpoint {id} of {} (restored, but no longer complete)",
                            job.url()
                        ))
                    })?;
                Some(RestoredPoint {
                    checkpoint_id: id,
                    epoch: meta.writer_epoch,
                })
            }
        };
        let epoch = WriterEpoch::claim(&job, restored, external, clock.now_millis()).await?;
        Self::start_claimed(job, job_id, operators, options, clock, epoch).await
    }

    /// Starts coordinating under an epoch the runtime claimed itself (see
    /// [`WriterEpoch::claim`]), for runtimes that must know the epoch before the
    /// coordinator runs. See [`start_at`](Self::start_at).
    ///
    /// Errors: see [`start_at`](Self::start_at).
    pub async fn start_claimed(
        job: CheckpointStorage,
        job_id: &str,
        operators: Vec<OperatorSpec>,
        options: CoordinatorOptions,
        clock: Arc<dyn Clock>,
        epoch: WriterEpoch,
    ) -> Result<Self> {
        validate(&options, &operators)?;
        let restored = epoch.record().restored_from;
        // Read again under the claim: the timeline now follows this writer's start, and
        // ids continue above every checkpoint folder that exists after the claim.
        let found = discovery::scan(&job).await?;
        epoch.check().await?;
        if let Some(r) = restored {
            if !found
                .completed
                .iter()
                .any(|m| m.checkpoint_id == r.checkpoint_id)
            {
                return Err(Error::NotFound(format!(
                    "checkpoint {} of {} was retired while this job started; another process may be running it",
                    r.checkpoint_id,
                    job.url()
                )));
            }
        }
        let mut completed = found.completed;
        let surplus = completed.len().saturating_sub(options.num_retained);
        let subsumed: Vec<CheckpointMetadata> = completed.drain(..surplus).collect();
        let registry = SharedStateRegistry::rebuild(completed.iter());
        let retained: VecDeque<CheckpointMetadata> = completed.into();
        let next_id = next_id(&job, found.highest_id)?;
        let mut status = StatusTracker::new(clock.now_millis());
        status.heartbeat = options.status_heartbeat.max(Duration::from_millis(100));
        let mut coordinator = Self {
            job,
            job_id: job_id.to_string(),
            operators,
            options,
            clock,
            status,
            holds: BTreeMap::new(),
            next_id,
            pending: BTreeMap::new(),
            retained,
            registry,
            reuse_floor: u64::MAX,
            epoch,
            fenced: None,
            in_doubt: BTreeMap::new(),
            abandoned: found.abandoned,
        };
        for old in subsumed {
            coordinator.discard_completed(&old).await?;
        }
        coordinator.release_unused().await?;
        Ok(coordinator)
    }

    /// Deletes the checkpoints of abandoned timelines, once a checkpoint of this one has
    /// completed: until then their folders keep the ids above the restored checkpoint
    /// taken, so that no later start hands out an id twice.
    async fn retire_abandoned(&mut self) -> Result<()> {
        while let Some(abandoned) = self.abandoned.first().cloned() {
            tracing::info!(
                checkpoint = abandoned.checkpoint_id,
                "deleting a checkpoint of an abandoned timeline"
            );
            self.discard_completed(&abandoned).await?;
            let shared = abandoned
                .handles()
                .flat_map(|(_, h)| h.shared.iter().map(|f| f.path.clone()))
                .collect();
            let unowned = self.unowned(shared);
            self.delete_paths(unowned).await?;
            self.abandoned.remove(0);
        }
        Ok(())
    }

    /// This coordinator's writer epoch.
    pub fn writer_epoch(&self) -> u64 {
        self.epoch.epoch()
    }

    /// Fails with `Fenced` when a newer writer has claimed the job directory (checked
    /// in storage; once fenced, always fenced).
    pub async fn check_writer(&mut self) -> Result<()> {
        if let Some((ours, newer)) = self.fenced {
            return Err(Error::Fenced {
                job: self.job.url().to_string(),
                ours,
                newer,
            });
        }
        match self.epoch.check().await {
            Err(Error::Fenced { job, ours, newer }) => {
                tracing::error!(job = %job, ours, newer, "a newer writer claimed the job directory; this one stops committing and deleting");
                self.fenced = Some((ours, newer));
                Err(Error::Fenced { job, ours, newer })
            }
            other => other,
        }
    }

    /// Deletes paths of the job directory, after checking that this writer still owns it.
    async fn delete_paths(&mut self, paths: Vec<String>) -> Result<()> {
        if paths.is_empty() {
            return Ok(());
        }
        self.check_writer().await?;
        delete_all(&self.job, paths).await
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

    /// Starts a new checkpoint and returns its id. The runtime then has every subtask
    /// snapshot with this id and acknowledge.
    ///
    /// Errors: `Unavailable` ([`Error::Busy`]) when `max_concurrent` checkpoints are
    /// already in flight: trigger again once one completes, fails or expires.
    pub fn trigger(&mut self) -> Result<u64> {
        if self.pending.len() >= self.options.max_concurrent {
            return Err(Error::Busy(format!(
                "{} checkpoint(s) of job {:?} in flight, the most allowed (max_concurrent)",
                self.pending.len(),
                self.job_id
            )));
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
        self.status.changed();
        Ok(id)
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
        self.status.changed();
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
        let folder = parent.child(&crate::format::folder_name(&self.job_id))?;
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
        self.status.changed();
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
        if let Some((ours, newer)) = self.fenced {
            return Err(Error::Fenced {
                job: self.job.url().to_string(),
                ours,
                newer,
            });
        }
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
                .any(|m| m.checkpoint_id >= checkpoint_id)
                || self.in_doubt.contains_key(&checkpoint_id);
            if !completed {
                // Only what a checkpoint writes here: a late savepoint's paths belong to
                // its own folder.
                let written = Self::written_files(&snapshot)
                    .into_iter()
                    .filter(|p| p.starts_with("shared/") || p.starts_with("chk-"))
                    .collect();
                let orphans = self.unowned(written);
                match self.delete_paths(orphans).await {
                    Err(e) if e.kind() == ErrorKind::Fenced => return Err(e),
                    Err(e) => {
                        tracing::warn!(checkpoint_id, error = %e.report(), "cannot delete the files of a late acknowledgement (the sweep will)")
                    }
                    Ok(()) => {}
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
            self.subsume_and_release().await?;
            return Ok(AckOutcome::Discarded);
        }
        if pending.acks.contains_key(&(op_index, subtask)) {
            return Err(Error::invalid(format!(
                "checkpoint {checkpoint_id}: operator {operator_uid:?} subtask {subtask} acknowledged twice"
            )));
        }
        pending.acks.insert((op_index, subtask), snapshot);
        self.status.changed();
        let expected: usize = self.operators.iter().map(|o| o.parallelism as usize).sum();
        if pending.acks.len() < expected {
            return Ok(AckOutcome::Pending);
        }
        let pending = self
            .pending
            .remove(&checkpoint_id)
            .expect("pending checkpoint present");
        let (triggered_ms, savepoint) = (pending.triggered_at_ms, pending.savepoint.is_some());
        let outcome = self.complete(checkpoint_id, pending).await;
        let now = self.clock.now_millis();
        match &outcome {
            Ok(AckOutcome::Completed(meta)) => {
                self.status.completed(meta, now);
                record_completion(&self.job_id, meta, now);
            }
            Ok(_) => {}
            Err(e) => self.status.ended(
                checkpoint_id,
                savepoint,
                status::Outcome::Failed,
                &e.to_string(),
                triggered_ms,
                now,
            ),
        }
        if outcome.is_err() {
            metrics::counter!(telemetry::CHECKPOINTS_FAILED, "job" => self.job_id.clone())
                .increment(1);
        }
        outcome
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
                        .any(|m: &crate::format::StateMeta| m.name == meta.name)
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
            writer_epoch: self.epoch.epoch(),
        };
        if let Some(savepoint) = &pending.savepoint {
            return self.complete_savepoint(meta, savepoint).await;
        }
        if let Err(e) = self.registry.check(&meta) {
            tracing::warn!(checkpoint_id, error = %e.report(), "checkpoint fails: it references an unregistered file");
            if let Err(cleanup) = self.delete_checkpoint_files(&meta).await {
                if cleanup.kind() == ErrorKind::Fenced {
                    return Err(cleanup);
                }
                tracing::warn!(checkpoint_id, error = %cleanup.report(), "cannot delete the files of a failed checkpoint (the sweep will)");
            }
            return Err(e);
        }
        let bytes = meta.encode()?;
        let path = crate::format::metadata_path(checkpoint_id);
        self.check_writer().await?;
        crate::crashpoint::hit("metadata");
        let committed = commit(&self.job, &path, checkpoint_id, &bytes, Some(&self.epoch)).await;
        if let Err(Error::Fenced { ours, newer, .. }) = &committed {
            self.fenced = Some((*ours, *newer));
        }
        match committed {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::InDoubt => {
                // It may be complete: keep every file it references, and let its files
                // be reused (a runtime that sees the `_metadata` confirms it), until a
                // newer checkpoint completes. The job goes on with later checkpoints.
                tracing::warn!(checkpoint_id, error = %e.report(), "checkpoint in doubt; its files are kept");
                self.registry.add(&meta);
                self.in_doubt.insert(checkpoint_id, meta);
                return Err(e);
            }
            Err(e) => {
                // Definitely not committed as ours (another object holds the name).
                tracing::warn!(checkpoint_id, error = %e.report(), "cannot commit the checkpoint");
                if let Err(cleanup) = self.delete_checkpoint_files(&meta).await {
                    tracing::warn!(checkpoint_id, error = %cleanup.report(), "cannot delete the files of a failed checkpoint (the sweep will)");
                }
                return Err(e);
            }
        }
        crate::crashpoint::hit("committed");
        // Committed. What follows is cleanup: its failures are logged, never reported as a
        // failed checkpoint, and retried on the next completion or by the sweep.
        // Checked before the commit, with `&mut self` held since: cannot fail now.
        self.registry.add(&meta);
        self.retained.push_back(meta.clone());
        // A writer fenced during the cleanup below still committed this checkpoint: it
        // is reported completed, and the writer's next call fails with `Fenced`.
        if let Err(e) = self.after_commit(checkpoint_id).await {
            tracing::warn!(checkpoint_id, error = %e.report(), "stopped cleaning up after a commit");
        }
        Ok(AckOutcome::Completed(Box::new(meta)))
    }

    /// Cleanup after checkpoint `checkpoint_id` committed: settles older checkpoints in
    /// doubt, aborts older pending ones, retires abandoned timelines, applies retention.
    /// Errors other than `Fenced` are logged and retried at the next completion.
    async fn after_commit(&mut self, checkpoint_id: u64) -> Result<()> {
        self.settle_in_doubt(checkpoint_id).await;
        let older: Vec<u64> = self
            .pending
            .range(..checkpoint_id)
            .map(|(id, _)| *id)
            .collect();
        for id in older {
            if let Err(e) = self.abort(id, "a newer checkpoint completed first").await {
                if e.kind() == ErrorKind::Fenced {
                    return Err(e);
                }
                tracing::warn!(checkpoint = id, error = %e.report(), "cleanup of an aborted checkpoint failed");
            }
        }
        match self.retire_abandoned().await {
            Err(e) if e.kind() == ErrorKind::Fenced => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e.report(), "cannot delete checkpoints of an abandoned timeline yet")
            }
            Ok(()) => {}
        }
        self.subsume_and_release().await
    }

    /// Once a newer checkpoint completed, reads back every older checkpoint in doubt: one
    /// whose `_metadata` is stored (ours) is completed, and retained like any other until
    /// retention subsumes it (its `_metadata` first); one that is not stored is dropped
    /// (its files become unused). One that cannot be read stays in doubt.
    async fn settle_in_doubt(&mut self, completed: u64) {
        let older: Vec<u64> = self
            .in_doubt
            .range(..completed)
            .map(|(id, _)| *id)
            .collect();
        for id in older {
            match discovery::read_metadata(&self.job, id).await {
                Ok(Some(stored)) if Some(&stored) == self.in_doubt.get(&id) => {
                    tracing::info!(
                        checkpoint_id = id,
                        "a checkpoint in doubt is stored: completed"
                    );
                    if let Some(meta) = self.in_doubt.remove(&id) {
                        let at = self
                            .retained
                            .iter()
                            .position(|m| m.checkpoint_id > id)
                            .unwrap_or(self.retained.len());
                        self.retained.insert(at, meta);
                    }
                }
                Ok(Some(_)) => {
                    tracing::warn!(
                        checkpoint_id = id,
                        "another _metadata holds a checkpoint in doubt; it is not ours"
                    );
                    self.in_doubt.remove(&id);
                }
                Ok(None) => {
                    tracing::info!(checkpoint_id = id, "a checkpoint in doubt is not stored");
                    self.in_doubt.remove(&id);
                }
                Err(e) => {
                    tracing::warn!(checkpoint_id = id, error = %e.report(), "a checkpoint stays in doubt");
                }
            }
        }
    }

    async fn complete_savepoint(
        &mut self,
        meta: CheckpointMetadata,
        savepoint: &SavepointTrigger,
    ) -> Result<AckOutcome> {
        let checkpoint_id = meta.checkpoint_id;
        let written = meta
            .keyed()
            .flat_map(|(_, h)| h.files())
            .map(|f| f.path.clone())
            .collect();
        let bytes = meta.encode()?;
        match commit(
            &savepoint.folder,
            crate::format::METADATA_FILE,
            checkpoint_id,
            &bytes,
            None,
        )
        .await
        {
            Ok(()) => {
                tracing::info!(checkpoint_id, folder = %savepoint.folder.url(), "savepoint completed");
                Ok(AckOutcome::Completed(Box::new(meta)))
            }
            // Its `_metadata` may be stored: a savepoint in doubt keeps its files.
            Err(e) if e.kind() == ErrorKind::InDoubt => {
                tracing::warn!(checkpoint_id, folder = %savepoint.folder.url(), error = %e.report(), "savepoint in doubt; its files are kept");
                Err(e)
            }
            Err(e) => {
                tracing::warn!(checkpoint_id, folder = %savepoint.folder.url(), error = %e.report(), "savepoint failed");
                if let Err(cleanup) = delete_all(&savepoint.folder, written).await {
                    tracing::warn!(error = %cleanup.report(), "cannot remove the files of a failed savepoint");
                }
                Err(e)
            }
        }
    }

    /// Paths that no retained or in-doubt checkpoint and no registry entry owns.
    fn unowned(&self, paths: Vec<String>) -> Vec<String> {
        let owned: BTreeSet<&str> = self
            .retained
            .iter()
            .chain(self.in_doubt.values())
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
            .min(self.in_doubt.keys().next().copied().unwrap_or(u64::MAX))
            .min(self.holds.keys().next().copied().unwrap_or(u64::MAX))
    }

    /// Keeps the retained checkpoint `checkpoint_id`, and every file it references, from
    /// retention until [`release`](Self::release): for work that reads it while the job
    /// goes on (a savepoint made from it). Holds nest.
    ///
    /// Errors: `NotFound` when it is not a retained checkpoint.
    pub fn hold(&mut self, checkpoint_id: u64) -> Result<()> {
        if !self
            .retained
            .iter()
            .any(|m| m.checkpoint_id == checkpoint_id)
        {
            return Err(Error::NotFound(format!(
                "checkpoint {checkpoint_id} of {} is not retained",
                self.job.url()
            )));
        }
        *self.holds.entry(checkpoint_id).or_insert(0) += 1;
        Ok(())
    }

    /// Ends one [`hold`](Self::hold) of `checkpoint_id`; retention catches up.
    ///
    /// Errors: `Fenced`; storage errors of the retention that catches up.
    pub async fn release(&mut self, checkpoint_id: u64) -> Result<()> {
        if let Some(count) = self.holds.get_mut(&checkpoint_id) {
            *count -= 1;
            if *count == 0 {
                self.holds.remove(&checkpoint_id);
            }
        }
        self.subsume_and_release().await
    }

    /// Subsumes retained checkpoints beyond `num_retained` (keeping any that a pending
    /// checkpoint's subtasks may still reuse files of), then deletes shared files nothing
    /// uses. A checkpoint stays retained until its deletion succeeded. Errors are logged,
    /// except `Fenced`, which is returned.
    async fn subsume_and_release(&mut self) -> Result<()> {
        let lowest_base = self.lowest_pending_base();
        while self.retained.len() > self.options.num_retained {
            let Some(old) = self.retained.front().cloned() else {
                break;
            };
            if old.checkpoint_id >= lowest_base {
                break;
            }
            match self.discard_completed(&old).await {
                Ok(()) => {
                    self.retained.pop_front();
                }
                Err(e) if e.kind() == ErrorKind::Fenced => return Err(e),
                Err(e) => {
                    tracing::warn!(checkpoint = old.checkpoint_id, error = %e.report(), "cannot delete a subsumed checkpoint yet");
                    break;
                }
            }
        }
        match self.release_unused().await {
            Err(e) if e.kind() == ErrorKind::Fenced => Err(e),
            Err(e) => {
                tracing::warn!(error = %e.report(), "cannot delete unused shared files yet (the sweep will)");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Deletes what a checkpoint wrote itself: new shared and private files.
    async fn delete_checkpoint_files(&mut self, meta: &CheckpointMetadata) -> Result<()> {
        let paths = meta
            .operators
            .iter()
            .flat_map(|op| op.subtasks.iter())
            .flat_map(Self::written_files)
            .collect();
        let unowned = self.unowned(paths);
        self.delete_paths(unowned).await
    }

    /// Deletes a subsumed checkpoint: `_metadata` first (so it no longer counts as
    /// completed), then its private files. Shared files go through the registry.
    async fn discard_completed(&mut self, meta: &CheckpointMetadata) -> Result<()> {
        self.check_writer().await?;
        self.job
            .delete(&crate::format::metadata_path(meta.checkpoint_id))
            .await?;
        crate::crashpoint::hit("retention");
        let private: Vec<String> = meta
            .handles()
            .flat_map(|(_, h)| h.private.iter().map(|f| f.path.clone()))
            .collect();
        self.delete_paths(private).await
    }

    /// Rule 2: deletes shared files no retained (and no pending checkpoint's base) uses.
    async fn release_unused(&mut self) -> Result<()> {
        let lowest_retained = self.retained.front().map_or(u64::MAX, |m| m.checkpoint_id);
        let lowest_base = self.lowest_pending_base();
        let floor = lowest_retained.min(lowest_base);
        if self.registry.count_below(floor) == 0 {
            return Ok(());
        }
        // Checked before the registry forgets anything: a fenced writer keeps its view.
        self.check_writer().await?;
        let gone = self.registry.release_below(floor);
        tracing::debug!(
            files = gone.len(),
            "deleting shared files no checkpoint uses"
        );
        delete_all(&self.job, gone).await
    }

    async fn abort(&mut self, checkpoint_id: u64, reason: &str) -> Result<()> {
        self.abort_as(checkpoint_id, reason, status::Outcome::Aborted)
            .await
    }

    async fn abort_as(
        &mut self,
        checkpoint_id: u64,
        reason: &str,
        outcome: status::Outcome,
    ) -> Result<()> {
        let Some(pending) = self.pending.remove(&checkpoint_id) else {
            return Ok(());
        };
        tracing::info!(checkpoint_id, reason, "checkpoint aborted");
        let counter = match outcome {
            status::Outcome::Failed => telemetry::CHECKPOINTS_FAILED,
            _ => telemetry::CHECKPOINTS_ABORTED,
        };
        metrics::counter!(counter, "job" => self.job_id.clone()).increment(1);
        self.status.ended(
            checkpoint_id,
            pending.savepoint.is_some(),
            outcome,
            reason,
            pending.triggered_at_ms,
            self.clock.now_millis(),
        );
        let paths: Vec<String> = pending
            .acks
            .values()
            .flat_map(Self::written_files)
            .collect();
        let deleted = match &pending.savepoint {
            // A savepoint's folder holds nothing any checkpoint owns.
            Some(savepoint) => delete_all(&savepoint.folder, paths).await,
            None => {
                let unowned = self.unowned(paths);
                self.delete_paths(unowned).await
            }
        };
        // The checkpoint is aborted either way; what could not be deleted is unreferenced
        // and left to the orphan sweep.
        match deleted {
            Err(e) if e.kind() == ErrorKind::Fenced => Err(e),
            Err(e) => {
                tracing::warn!(checkpoint_id, error = %e.report(), "cannot delete the files of an aborted checkpoint (the sweep will)");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// A subtask could not snapshot: aborts the checkpoint and deletes the files its
    /// acknowledged subtasks wrote. Tell the subtasks (`notify_checkpoint_aborted`).
    pub async fn decline(&mut self, checkpoint_id: u64, reason: &str) -> Result<()> {
        self.abort_as(checkpoint_id, reason, status::Outcome::Failed)
            .await?;
        self.subsume_and_release().await
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
            self.subsume_and_release().await?;
        }
        Ok(expired)
    }

    /// Notes the synchronous pause of one subtask's snapshot for checkpoint
    /// `checkpoint_id`, for the status document (its longest pause is reported).
    pub fn note_sync_pause(&mut self, checkpoint_id: u64, pause: Duration) {
        self.status.note_sync(checkpoint_id, pause);
    }

    /// The status document as it would be written now (see [`status`]).
    pub fn status(&self, state: RunState) -> status::JobStatus {
        let now = self.clock.now_millis();
        let expected: usize = self.operators.iter().map(|o| o.parallelism as usize).sum();
        let in_flight = self
            .pending
            .iter()
            .map(|(id, p)| InFlight {
                id: *id,
                savepoint: p.savepoint.is_some(),
                triggered_ms: p.triggered_at_ms,
                age_ms: now.saturating_sub(p.triggered_at_ms),
                acknowledged: u32::try_from(p.acks.len()).unwrap_or(u32::MAX),
                expected: u32::try_from(expected).unwrap_or(u32::MAX),
            })
            .collect();
        self.status.document(
            &self.job_id,
            self.epoch.epoch(),
            &self.epoch.record().writer,
            state,
            now,
            self.retained.back().map(|m| m.checkpoint_id),
            in_flight,
        )
    }

    /// Writes the job's status document (`_status.json` in the job directory) when
    /// something changed since the last write, `state` differs, or a heartbeat passed;
    /// `Ok(false)` when nothing was due. Runtimes call it from their polling loop (it is
    /// cheap when nothing is due) and once with the final state when they stop. It first
    /// checks that this coordinator still owns the job directory.
    ///
    /// Errors: `Fenced` when a newer writer owns the job; storage errors.
    pub async fn publish_status(&mut self, state: RunState) -> Result<bool> {
        let now = self.clock.now_millis();
        if !self.status.due(state, now) {
            return Ok(false);
        }
        let document = self.status(state).encode()?;
        self.check_writer().await?;
        self.job.put(status::STATUS_FILE, document).await?;
        self.status.published(state, now);
        Ok(true)
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
            self.retire_abandoned().await?;
            while let Some(old) = self.retained.pop_front() {
                self.discard_completed(&old).await?;
            }
            while let Some((_, doubt)) = self.in_doubt.pop_first() {
                self.discard_completed(&doubt).await?;
            }
            let gone = self.registry.release_below(u64::MAX);
            self.delete_paths(gone).await?;
        }
        Ok(())
    }
}

/// Writes a `_metadata` with create-if-absent until its fate is definite: `Ok` when the
/// stored object is exactly `bytes` (written now, or by an attempt whose answer was lost),
/// `AlreadyExists` when another object holds the name. A write that fails without a
/// definite answer is read back and, when absent, written again; when no round gives an
/// answer, `InDoubt` (the object may or may not be stored; it is never deleted).
pub(crate) async fn commit(
    storage: &CheckpointStorage,
    path: &str,
    checkpoint_id: u64,
    bytes: &[u8],
    writer: Option<&WriterEpoch>,
) -> Result<()> {
    let mut last = String::new();
    for round in 0..COMMIT_ROUNDS {
        if round > 0 {
            let wait = storage
                .options()
                .retry_backoff
                .saturating_mul(1 << round.min(10));
            tokio::time::sleep(wait).await;
            // Writing again is a new commit: only while this writer owns the directory.
            if let Some(writer) = writer {
                writer.check().await?;
            }
        }
        match storage.put_if_absent(path, bytes.to_vec().into()).await {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Err(e),
            Err(e) => {
                tracing::warn!(checkpoint_id, round, error = %e.report(), "metadata write has no definite answer; reading it back");
                last = e.to_string();
            }
        }
        match storage.read_small(path, bytes.len() as u64 + 1).await {
            Ok(stored) if stored[..] == bytes[..] => {
                tracing::warn!(
                    checkpoint_id,
                    "metadata write reported an error but is stored"
                );
                return Ok(());
            }
            Ok(_) => {
                return Err(Error::AlreadyExists(format!(
                    "{} (another object holds it)",
                    storage.url_of(path)
                )))
            }
            // Larger than ours: another object.
            Err(e) if e.kind() == ErrorKind::Corrupt => {
                return Err(Error::AlreadyExists(format!(
                    "{} (another object holds it)",
                    storage.url_of(path)
                )))
            }
            // Not stored: the next round writes it again.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => last = e.to_string(),
        }
    }
    Err(Error::InDoubt {
        checkpoint_id,
        path: storage.url_of(path),
        detail: last,
    })
}
