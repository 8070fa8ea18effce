//! A small in-process driver for tests, benchmarks and the demo: one source with several
//! partitions feeding one keyed operator of `parallelism` subtasks on threads, with
//! checkpoints through a [`CheckpointCoordinator`]. It is a test aid, not a stream
//! processor.
//!
//! Records are routed by key group, exactly as state is partitioned. Checkpoints are
//! aligned: the driver (the only producer) puts a barrier into every subtask's queue at
//! the same position of the stream, and acknowledges the source's partition offsets as
//! operator state of the operator `source`. Each subtask snapshots when it reaches the
//! barrier and uploads in the background while it keeps processing. Restarting from a
//! checkpoint restores every subtask and resumes the source at the checkpointed offsets,
//! so a job that crashes and restarts ends in the same state as one that never failed.
//!
//! The driver hands records to a subtask in batches, each sorted by key group and key
//! (stably: records of one key keep their order). Keyed state sees the same sequence per
//! key; records of different keys may be applied in another order than the source's,
//! as with any parallel upstream. Sorted batches touch RocksDB's memtables and blocks in
//! key order, which makes the state accesses markedly cheaper.

pub mod demo;
mod source;
mod subtask;

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

pub use source::{Source, SourcePosition};
use subtask::{Message, SubtaskContext};

use rockstate::checkpoint::status::RunState;
use rockstate::checkpoint::{
    CheckpointCoordinator, CheckpointMetadata, CoordinatorOptions, OperatorSpec, SavepointTrigger,
    StartPoint, SubtaskSnapshot,
};
use rockstate::clock::SystemClock;
use rockstate::keygroup;
use rockstate::runtime::control::{self, Answer, Command};
use rockstate::runtime::local_dir;
use rockstate::runtime::start::{self, StartCandidate};
use rockstate::savepoint::SavepointFormat;
use rockstate::storage::CheckpointStorage;
use rockstate::{BackendOptions, RestoreOptions, RocksStateBackend, SharedResources};
use rockstate::{Error, Result};

/// Records handed to a subtask at once.
const BATCH_RECORDS: usize = 2048;
/// Batches queued per subtask before the driver waits: with the batch being filled, at
/// most about 6 000 records lie between a trigger and the subtask, so a barrier reaches
/// it soon and checkpoints keep the requested interval instead of being skipped while
/// an earlier one waits behind a long queue.
const QUEUE_BATCHES: usize = 2;

/// A record with its sort key (key group, then serialized key).
type Keyed<K, V> = (Vec<u8>, K, V);

/// The records of a batch sorted by key group and serialized key; records of one key keep
/// their order (the sort is stable).
fn in_key_order<K, V>(mut batch: Vec<Keyed<K, V>>) -> Vec<(K, V)> {
    batch.sort_by(|a, b| a.0.cmp(&b.0));
    batch.into_iter().map(|(_, k, v)| (k, v)).collect()
}

/// The uid under which the harness records source offsets.
pub const SOURCE_UID: &str = "source";

/// A keyed operator: called for every record of the keys its subtask owns.
pub trait Operator<K, V>: Send {
    /// Processes one record.
    fn process(&mut self, key: &K, value: V) -> Result<()>;
}

/// Builds a subtask's operator on its backend (registering its states).
pub type OperatorFactory<K, V> =
    Arc<dyn Fn(&RocksStateBackend) -> Result<Box<dyn Operator<K, V>>> + Send + Sync>;

/// Settings of a harness run.
#[derive(Debug, Clone)]
pub struct HarnessConfig {
    /// The job id (its checkpoint directory is `<checkpoint dir>/<job id>`).
    pub job_id: String,
    /// The keyed operator's uid.
    pub operator_uid: String,
    /// Number of subtasks.
    pub parallelism: u32,
    /// Number of key groups.
    pub max_parallelism: u32,
    /// Scratch space for the subtasks' RocksDB directories, emptied at start. It must be
    /// new, empty, or one rockstate used before (marked with a `.rockstate-scratch`
    /// file): a directory holding other files is refused, never emptied.
    pub local_root: PathBuf,
    /// Records between checkpoints (0: only explicit ones). When the previous checkpoint
    /// is still in flight, the next is tried again every quarter of the interval.
    pub checkpoint_interval: u64,
    /// Memory shared by all subtasks.
    pub memory_budget: usize,
    /// Whether the subtasks' RocksDB instances keep statistics counters (block cache
    /// hits and misses, stall time, in the metrics); see
    /// [`BackendOptions::statistics`](rockstate::BackendOptions::statistics).
    pub rocksdb_statistics: bool,
    /// Coordinator settings.
    pub coordinator: CoordinatorOptions,
}

/// Where a run starts: the start request every runtime plans with
/// ([`plan_start`](rockstate::runtime::start::plan_start)).
pub use rockstate::runtime::start::StartRequest as StartFrom;

/// A completed savepoint.
#[derive(Debug, Clone)]
pub struct Savepoint {
    /// The savepoint folder's URL (restore with [`RestoreSource::open`](rockstate::RestoreSource::open)).
    pub url: String,
    /// Its metadata.
    pub metadata: CheckpointMetadata,
}

/// A stop asked through a control request ([`Harness::poll_control`]): the final
/// savepoint, when one was asked for, is already taken. Hand it to
/// [`Harness::stop_on_request`].
#[derive(Debug)]
pub struct StopRequest {
    id: String,
    /// The final savepoint.
    pub savepoint: Option<Savepoint>,
}

/// Progress shared between the driver and the upload tasks.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub completed: Vec<u64>,
    /// Bytes uploaded by each completed checkpoint, in the order of `completed`.
    pub uploaded: Vec<u64>,
    pub latest: Option<CheckpointMetadata>,
    pub failed: Vec<(u64, String)>,
    pub error: Option<Error>,
    /// An error that stops the job (a newer writer fenced this one).
    pub fatal: Option<Error>,
    pub savepoints: Vec<CheckpointMetadata>,
    /// Longest synchronous snapshot phase of any subtask.
    pub max_sync: std::time::Duration,
}

pub(crate) type SharedProgress = Arc<(Mutex<Progress>, Condvar)>;

/// A running job.
pub struct Harness<S: Source> {
    config: HarnessConfig,
    source: S,
    position: SourcePosition,
    senders: Vec<SyncSender<Message<S::Key, S::Value>>>,
    /// Records not yet handed to each subtask, each with its sort key (key group and
    /// serialized key): handing them over in batches wakes a subtask thread once per
    /// batch instead of once per record.
    batches: Vec<Vec<Keyed<S::Key, S::Value>>>,
    /// The keys of batches the subtasks have processed, sent back to be dropped on this
    /// thread, which allocated them: a key freed on another thread costs glibc's
    /// allocator more (the demo job: 1.01-1.03x the events/s, a quarter less system time).
    /// Drained before every send, so it holds at most the batches in flight.
    spent: Receiver<Vec<S::Key>>,
    threads: Vec<JoinHandle<Result<RocksStateBackend>>>,
    coordinator: Arc<tokio::sync::Mutex<CheckpointCoordinator>>,
    /// `None` only after [`crash`](Self::crash) took it.
    runtime: Option<tokio::runtime::Runtime>,
    /// Keeps the status document up to date while the job runs.
    status_task: Option<StatusTask>,
    progress: SharedProgress,
    restored_from: Option<(u64, String)>,
    events: u64,
    since_checkpoint: u64,
}

/// What a finished run leaves: the subtasks' backends and the last checkpoint.
pub struct Finished {
    /// One backend per subtask, in subtask order.
    pub backends: Vec<RocksStateBackend>,
    /// The checkpoint taken at the end of the run.
    pub last_checkpoint: Option<CheckpointMetadata>,
    /// Records processed by this run.
    pub events: u64,
    /// Checkpoints completed by this run, in order.
    pub completed: Vec<u64>,
    /// Bytes uploaded by each of `completed` (new files; files of earlier checkpoints are
    /// referenced, not uploaded again).
    pub uploaded: Vec<u64>,
}

impl<S: Source> Harness<S>
where
    S::Key: Serialize + Send + 'static,
    S::Value: Send + 'static,
{
    /// Starts the job: restores (or creates) every subtask's backend, the coordinator and
    /// the source position.
    ///
    /// Errors: `Incompatible` when the checkpoint's parallelism or max parallelism differs
    /// from the configuration (restoring at another parallelism needs rescaling); storage,
    /// restore and engine errors.
    pub fn start(
        config: HarnessConfig,
        checkpoint_dir: &CheckpointStorage,
        source: S,
        factory: OperatorFactory<S::Key, S::Value>,
        from: StartFrom,
    ) -> Result<Self> {
        keygroup::validate_parallelism(config.parallelism, config.max_parallelism)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the harness runtime", e))?;
        let job = checkpoint_dir.child(&config.job_id)?;
        // Candidates, best first. Resuming from the latest checkpoint falls back to older
        // completed ones when a newer one cannot be restored (a damaged or missing file).
        let plan = runtime.block_on(start::plan_start(&job, from))?;
        // Refuses a directory holding someone else's files before anything is restored.
        // What the previous run left is set aside: a restore takes the files that are
        // still there and match the snapshot instead of downloading them.
        let reuse = local_dir::set_aside(&config.local_root)?;
        let p = config.parallelism;
        let operators = vec![
            OperatorSpec {
                uid: SOURCE_UID.into(),
                parallelism: p,
                max_parallelism: config.max_parallelism,
            },
            OperatorSpec {
                uid: config.operator_uid.clone(),
                parallelism: p,
                max_parallelism: config.max_parallelism,
            },
        ];
        let resources = SharedResources::new(config.memory_budget)?;
        // Restore every subtask before the coordinator starts: the coordinator claims the
        // job directory for what was restored.
        let restore_all = |restore: Option<&StartCandidate>| {
            local_dir::reset(&config.local_root)?;
            if let Some(c) = restore {
                c.source
                    .check_operators(&operators, c.options.allow_non_restored_state)?;
            }
            let position = match restore {
                Some(c) if c.source.metadata().operator(SOURCE_UID).is_some() => {
                    SourcePosition::from_checkpoint(c.source.metadata(), source.partitions())?
                }
                _ => SourcePosition::start(source.partitions()),
            };
            // The job's operators were checked against the snapshot above.
            let restore_options = restore.map(|c| RestoreOptions {
                allow_new_operator: true,
                ..c.options
            });
            let mut restores = Vec::new();
            let mut backends = Vec::new();
            for i in 0..p {
                let mut options = BackendOptions::for_subtask(
                    config.local_root.join(format!("subtask-{i}")),
                    i,
                    p,
                    config.max_parallelism,
                )?;
                // Each batch is applied sorted by key group and key.
                options.writes_in_key_order = true;
                options.statistics = config.rocksdb_statistics;
                let builder = RocksStateBackend::builder(options)
                    .shared_resources(resources.clone())
                    .reuse_local_files(reuse.iter().cloned());
                match (restore, &restore_options) {
                    (Some(c), Some(options)) => restores.push(builder.restore_operator(
                        &c.source,
                        &config.operator_uid,
                        options,
                    )),
                    _ => backends.push(builder.open()?),
                }
            }
            // Subtasks restore side by side; every one finishes before a failure is
            // reported, so nothing still writes into the directory afterwards.
            let mut first = None;
            for restored in runtime.block_on(futures::future::join_all(restores)) {
                match restored {
                    Ok(backend) => backends.push(backend),
                    Err(e) => {
                        first.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first {
                for backend in backends {
                    if let Err(close) = backend.close() {
                        tracing::warn!(error = %close.report(), "cannot close a restored subtask");
                    }
                }
                return Err(e);
            }
            Ok::<_, Error>((position, backends))
        };
        let mut restore = None;
        let mut started = None;
        let mut newest_error = None;
        for candidate in plan.candidates {
            match restore_all(Some(&candidate)) {
                Ok(done) => {
                    started = Some(done);
                    restore = Some(candidate);
                    break;
                }
                Err(e) if plan.fallback && start::falls_back(&e) => {
                    tracing::warn!(checkpoint = %candidate.source.location(), error = %e.report(), "cannot restore this checkpoint; trying an older one");
                    newest_error.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        let (position, backends) = match started {
            Some(done) => done,
            // No completed checkpoint restores: the newest one's reason.
            None => match newest_error {
                Some(e) => return Err(e),
                None => restore_all(None)?,
            },
        };
        local_dir::remove(&config.local_root.join(local_dir::PREVIOUS_RUN))?;
        let progress: SharedProgress = Arc::default();
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..p {
            let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_BATCHES);
            senders.push(tx);
            receivers.push(rx);
        }
        let start_point = restore
            .as_ref()
            .map_or(StartPoint::Fresh, |c| c.start_point.clone());
        let coordinator = runtime.block_on(CheckpointCoordinator::start_at(
            job.clone(),
            &config.job_id,
            operators,
            config.coordinator.clone(),
            Arc::new(SystemClock),
            start_point,
        ))?;
        // A checkpoint of this job's own directory stays retained by the coordinator's
        // claim until newer ones complete: the subtasks may reuse its files in place.
        let own = restore
            .as_ref()
            .filter(|c| matches!(c.start_point, StartPoint::Checkpoint(_)))
            .map(|c| c.source.metadata().clone());
        let coordinator = Arc::new(tokio::sync::Mutex::new(coordinator));
        // Every operator is built before any thread starts: a factory that fails leaves
        // no thread behind holding a backend.
        let operators = backends
            .iter()
            .map(|backend| factory(backend).map_err(|e| e.for_operator(&config.operator_uid)))
            .collect::<Result<Vec<_>>>()?;
        let mut threads = Vec::new();
        let (spent_tx, spent) = std::sync::mpsc::channel();
        for (i, ((rx, backend), operator)) in receivers
            .into_iter()
            .zip(backends)
            .zip(operators)
            .enumerate()
        {
            let ctx = SubtaskContext {
                index: i as u32,
                operator_uid: config.operator_uid.clone(),
                job_id: config.job_id.clone(),
                job: job.clone(),
                coordinator: coordinator.clone(),
                runtime: runtime.handle().clone(),
                peers: senders.clone(),
                progress: progress.clone(),
                spent: spent_tx.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("subtask-{i}"))
                .spawn(move || subtask::run(ctx, backend, operator, rx));
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    // The threads already running stop and release their backends.
                    let _ = stop_threads(senders, threads);
                    return Err(Error::io("spawn a subtask thread", e));
                }
            }
        }
        let restored_from = restore.as_ref().map(|c| {
            (
                c.source.metadata().checkpoint_id,
                c.source.location().to_string(),
            )
        });
        if let Some(meta) = own {
            progress.0.lock().latest = Some(meta);
        }
        let status_task = Some(spawn_status_task(&runtime, coordinator.clone()));
        Ok(Self {
            config,
            source,
            position,
            batches: (0..p).map(|_| Vec::new()).collect(),
            spent,
            senders,
            threads,
            coordinator,
            runtime: Some(runtime),
            status_task,
            progress,
            restored_from,
            events: 0,
            since_checkpoint: 0,
        })
    }

    fn check_errors(&self) -> Result<()> {
        let progress = self.progress.0.lock();
        if let Some(e) = &progress.fatal {
            return Err(e.clone());
        }
        match &progress.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn send(&self, subtask: usize, message: Message<S::Key, S::Value>) -> Result<()> {
        // At most the batches in flight (processed since the last drain) wait here.
        while let Ok(keys) = self.spent.try_recv() {
            drop(keys);
        }
        self.senders[subtask].send(message).map_err(|_| {
            let failed = self.progress.0.lock().error.clone();
            failed.unwrap_or_else(|| Error::Internal(format!("subtask {subtask} stopped")))
        })
    }

    /// Processes up to `max_events` more records (fewer at the end of the source), taking
    /// checkpoints every `checkpoint_interval` records. Returns the number processed.
    pub fn run(&mut self, max_events: u64) -> Result<u64> {
        let mut done = 0;
        while done < max_events {
            let Some((key, value)) = self.position.next(&self.source) else {
                break;
            };
            let mut order = rockstate::codec::encode_key(&key)?;
            let kg = keygroup::key_group_for_bytes(&order, self.config.max_parallelism);
            let subtask = keygroup::subtask_for_key_group(
                kg,
                self.config.parallelism,
                self.config.max_parallelism,
            )?;
            order.splice(0..0, kg.to_be_bytes());
            let batch = &mut self.batches[subtask as usize];
            batch.push((order, key, value));
            if batch.len() >= BATCH_RECORDS {
                let full = std::mem::replace(batch, Vec::with_capacity(BATCH_RECORDS));
                self.send(subtask as usize, Message::Records(in_key_order(full)))?;
            }
            done += 1;
            self.events += 1;
            self.since_checkpoint += 1;
            let interval = self.config.checkpoint_interval;
            if interval > 0 && self.since_checkpoint >= interval {
                self.since_checkpoint = 0;
                if self.trigger()?.is_none() {
                    // The previous checkpoint is still in flight: try again after a
                    // quarter of the interval rather than skipping a whole one.
                    self.since_checkpoint = interval - (interval / 4).max(1);
                }
            }
        }
        self.flush()?;
        self.check_errors()?;
        Ok(done)
    }

    /// Hands every buffered record to its subtask.
    fn flush(&mut self) -> Result<()> {
        for subtask in 0..self.batches.len() {
            if !self.batches[subtask].is_empty() {
                let batch = std::mem::take(&mut self.batches[subtask]);
                self.send(subtask, Message::Records(in_key_order(batch)))?;
            }
        }
        Ok(())
    }

    /// Aborts checkpoints past the coordinator's timeout and tells the subtasks.
    fn expire(&self) -> Result<()> {
        let coordinator = self.coordinator.clone();
        let expired = self
            .runtime()
            .block_on(async move { coordinator.lock().await.abort_expired().await })?;
        for id in expired {
            tracing::warn!(checkpoint = id, "checkpoint timed out");
            {
                let (lock, cvar) = &*self.progress;
                lock.lock().failed.push((id, "timed out".into()));
                cvar.notify_all();
            }
            for i in 0..self.senders.len() {
                self.send(i, Message::Aborted(id))?;
            }
        }
        Ok(())
    }

    /// Triggers a checkpoint at the current position; `None` when too many are in flight.
    pub fn trigger(&mut self) -> Result<Option<u64>> {
        Ok(self.trigger_snapshot(None)?.map(|(id, _)| id))
    }

    fn trigger_snapshot(
        &mut self,
        savepoint: Option<(Option<CheckpointStorage>, SavepointFormat)>,
    ) -> Result<Option<(u64, Option<SavepointTrigger>)>> {
        // Every record before the barrier reaches its subtask before the barrier.
        self.flush()?;
        self.check_errors()?;
        self.expire()?;
        let position = self.position.clone();
        let p = self.config.parallelism;
        let coordinator = self.coordinator.clone();
        let (id, last_completed, target) = self.runtime().block_on(async move {
            let mut coord = coordinator.lock().await;
            let last = coord.latest_completed().map(|m| m.checkpoint_id);
            let (id, target) = match savepoint {
                Some((dir, format)) => {
                    let trigger = coord.trigger_savepoint(dir.as_ref(), format)?;
                    (trigger.checkpoint_id, Some(trigger))
                }
                None => match coord.trigger() {
                    Ok(id) => (id, None),
                    Err(Error::Busy(_)) => return Ok::<_, Error>((None, last, None)),
                    Err(e) => return Err(e),
                },
            };
            for (i, state) in position.to_operator_state(p).into_iter().enumerate() {
                let snapshot = SubtaskSnapshot {
                    keyed: None,
                    operator_state: state,
                };
                if let Err(e) = coord.acknowledge(id, SOURCE_UID, i as u32, snapshot).await {
                    coord.decline(id, &e.to_string()).await?;
                    return Err(e);
                }
            }
            Ok((Some(id), last, target))
        })?;
        if let Some(id) = id {
            for i in 0..self.senders.len() {
                self.send(
                    i,
                    Message::Barrier {
                        id,
                        last_completed,
                        savepoint: target.clone(),
                    },
                )?;
            }
        }
        Ok(id.map(|id| (id, target)))
    }

    /// Takes a savepoint at the current position into a new folder of `dir` (of the
    /// coordinator's `savepoints_dir` when `None`) and waits until it completes.
    ///
    /// Errors: `InvalidArgument` when there is no savepoint directory; the failure reason
    /// when the savepoint fails; a subtask's error.
    pub fn savepoint(
        &mut self,
        dir: Option<&CheckpointStorage>,
        format: SavepointFormat,
    ) -> Result<Savepoint> {
        let (id, target) = self
            .trigger_snapshot(Some((dir.cloned(), format)))?
            .ok_or_else(|| Error::Internal("savepoint not triggered".into()))?;
        let url = target
            .map(|t| t.folder.url().to_string())
            .unwrap_or_default();
        let metadata = self.wait_for(id, |p| {
            p.savepoints.iter().find(|m| m.checkpoint_id == id).cloned()
        })?;
        Ok(Savepoint { url, metadata })
    }

    /// Takes a savepoint (see [`savepoint`](Self::savepoint)), then stops without
    /// processing more records. The coordinator keeps its checkpoints.
    pub fn stop_with_savepoint(
        mut self,
        dir: Option<&CheckpointStorage>,
        format: SavepointFormat,
    ) -> Result<(Savepoint, Finished)> {
        let savepoint = self.savepoint(dir, format)?;
        let backends = self.stop_threads()?;
        self.shut_down_coordinator()?;
        let last_checkpoint = self.latest_checkpoint();
        Ok((
            savepoint,
            Finished {
                backends,
                last_checkpoint,
                events: self.events,
                completed: self.completed_checkpoints(),
                uploaded: self.progress.0.lock().uploaded.clone(),
            },
        ))
    }

    /// Waits until `done` finds the result of snapshot `id`, or it fails.
    fn wait_for<T>(&mut self, id: u64, done: impl Fn(&Progress) -> Option<T>) -> Result<T> {
        loop {
            {
                let (lock, cvar) = &*self.progress;
                let mut progress = lock.lock();
                if let Some(e) = &progress.fatal {
                    return Err(e.clone());
                }
                if let Some(e) = &progress.error {
                    return Err(e.clone());
                }
                if let Some((_, reason)) = progress.failed.iter().find(|(f, _)| *f == id) {
                    return Err(Error::Internal(format!("snapshot {id} failed: {reason}")));
                }
                if let Some(result) = done(&progress) {
                    return Ok(result);
                }
                cvar.wait_for(&mut progress, std::time::Duration::from_secs(1));
            }
            // Outside the lock: upload tasks need it to report progress.
            self.expire()?;
        }
    }

    /// Triggers a checkpoint (once the ones in flight are done) and waits until it
    /// completes or fails.
    ///
    /// Errors: the failure reason when the checkpoint fails; a subtask's error.
    pub fn checkpoint_now(&mut self) -> Result<CheckpointMetadata> {
        let wait = std::time::Duration::from_millis(20);
        let id = loop {
            if let Some(id) = self.trigger()? {
                break id;
            }
            let (lock, cvar) = &*self.progress;
            cvar.wait_for(&mut lock.lock(), wait);
        };
        self.wait_for(id, |p| {
            p.latest.as_ref().filter(|m| m.checkpoint_id >= id).cloned()
        })
    }

    /// Records processed by this run.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// The source's position.
    pub fn position(&self) -> &SourcePosition {
        &self.position
    }

    /// Checkpoints completed by this run, in order.
    pub fn completed_checkpoints(&self) -> Vec<u64> {
        self.progress.0.lock().completed.clone()
    }

    /// The longest synchronous snapshot phase (the pause in processing) of any subtask.
    pub fn max_sync_pause(&self) -> std::time::Duration {
        self.progress.0.lock().max_sync
    }

    /// Checkpoints of this run that failed or timed out, with the reason.
    pub fn failed_checkpoints(&self) -> Vec<(u64, String)> {
        self.progress.0.lock().failed.clone()
    }

    /// The newest completed checkpoint (restored or taken).
    pub fn latest_checkpoint(&self) -> Option<CheckpointMetadata> {
        self.progress.0.lock().latest.clone()
    }

    /// The checkpoint this run started from.
    pub fn restored_from(&self) -> Option<u64> {
        self.restored_from.as_ref().map(|(id, _)| *id)
    }

    /// The URL of the checkpoint or savepoint folder this run started from.
    pub fn restored_location(&self) -> Option<&str> {
        self.restored_from.as_ref().map(|(_, url)| url.as_str())
    }

    fn stop_threads(&mut self) -> Result<Vec<RocksStateBackend>> {
        stop_threads(
            std::mem::take(&mut self.senders),
            std::mem::take(&mut self.threads),
        )
    }

    /// Processes the rest of the source, takes a final checkpoint, and stops. The
    /// coordinator keeps its latest checkpoint (retain on cancel).
    pub fn finish(mut self) -> Result<Finished> {
        while self.run(u64::MAX)? > 0 {}
        let last = self.checkpoint_now()?;
        let backends = self.stop_threads()?;
        self.shut_down_coordinator()?;
        Ok(Finished {
            backends,
            last_checkpoint: Some(last),
            events: self.events,
            completed: self.completed_checkpoints(),
            uploaded: self.progress.0.lock().uploaded.clone(),
        })
    }

    /// Stops without processing more records or taking another checkpoint: snapshots in
    /// flight are aborted, the coordinator keeps its completed checkpoints (the job
    /// resumes from the latest one), and the subtasks' backends are returned.
    pub fn cancel(mut self) -> Result<Finished> {
        // Records counted as processed reach their subtasks before the stop.
        if let Err(e) = self.flush() {
            tracing::debug!(error = %e.report(), "cannot hand over the last records");
        }
        let backends = self.stop_threads()?;
        self.shut_down_coordinator()?;
        Ok(Finished {
            backends,
            last_checkpoint: self.latest_checkpoint(),
            events: self.events,
            completed: self.completed_checkpoints(),
            uploaded: self.progress.0.lock().uploaded.clone(),
        })
    }

    /// Stops the way a crash would: uploads in flight are abandoned, the coordinator is
    /// not shut down, nothing is checkpointed. Local directories are left behind.
    pub fn crash(mut self) {
        self.stop_status();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        if let Err(e) = self.stop_threads() {
            tracing::debug!(error = %e.report(), "subtask error while crashing");
        }
    }

    /// Carries out the control requests other processes wrote into the job directory
    /// ([`rockstate::runtime::control`]): savepoints are taken and answered here; a stop
    /// (after its savepoint, when asked for) is returned for the driver to end the run
    /// with [`stop_on_request`](Self::stop_on_request). Call it now and then between
    /// [`run`](Self::run) calls; each call lists the job's control folder once.
    ///
    /// Errors: `Fenced` when a newer writer owns the job (its requests are not ours to
    /// answer). Other failures are logged and the run goes on (the request's client
    /// times out); a savepoint that fails is answered as failed.
    pub fn poll_control(&mut self) -> Result<Option<StopRequest>> {
        match self.carry_out_requests() {
            Err(e) if e.kind() != rockstate::ErrorKind::Fenced => {
                tracing::warn!(error = %e.report(), "cannot serve control requests now");
                Ok(None)
            }
            other => other,
        }
    }

    fn carry_out_requests(&mut self) -> Result<Option<StopRequest>> {
        let coordinator = self.coordinator.clone();
        let job = self
            .runtime()
            .block_on(async move { coordinator.lock().await.job_storage().clone() });
        let requests = self.runtime().block_on(control::pending(&job))?;
        for request in requests {
            let coordinator = self.coordinator.clone();
            let taken = request.clone();
            let accepted = self.runtime().block_on(async move {
                control::accept(&mut *coordinator.lock().await, &taken).await
            })?;
            if !accepted {
                continue;
            }
            match request.command {
                Command::Savepoint { dir, format } => {
                    let taken = self.savepoint_to(dir.as_deref(), format);
                    let answer = match &taken {
                        Ok(savepoint) => Answer::Savepoint {
                            url: savepoint.url.clone(),
                        },
                        Err(e) => Answer::failed(e),
                    };
                    self.answer_control(&request.id, &answer)?;
                    if let Err(e) = taken {
                        if e.kind() == rockstate::ErrorKind::Fenced {
                            return Err(e);
                        }
                        tracing::warn!(request = %request.id, error = %e.report(), "requested savepoint failed");
                    }
                }
                Command::Stop {
                    savepoint_dir,
                    format,
                } => {
                    let savepoint = match savepoint_dir {
                        Some(dir) => match self.savepoint_to(Some(&dir), format) {
                            Ok(savepoint) => Some(savepoint),
                            Err(e) => {
                                // The job keeps running: a stop asked with a savepoint
                                // happens only with one.
                                self.answer_control(&request.id, &Answer::failed(&e))?;
                                if e.kind() == rockstate::ErrorKind::Fenced {
                                    return Err(e);
                                }
                                continue;
                            }
                        },
                        None => None,
                    };
                    return Ok(Some(StopRequest {
                        id: request.id,
                        savepoint,
                    }));
                }
            }
        }
        Ok(None)
    }

    /// Ends the run for a stop request: stops the subtasks without taking another
    /// checkpoint (as [`cancel`](Self::cancel)), answers the request with the final
    /// savepoint's URL, and shuts the coordinator down.
    ///
    /// Errors: a subtask's error; `Fenced`; storage errors.
    pub fn stop_on_request(mut self, stop: StopRequest) -> Result<(Option<Savepoint>, Finished)> {
        if let Err(e) = self.flush() {
            tracing::debug!(error = %e.report(), "cannot hand over the last records");
        }
        let backends = self.stop_threads()?;
        let answer = Answer::Stopped {
            savepoint: stop.savepoint.as_ref().map(|s| s.url.clone()),
        };
        self.answer_control(&stop.id, &answer)?;
        self.shut_down_coordinator()?;
        let finished = Finished {
            backends,
            last_checkpoint: self.latest_checkpoint(),
            events: self.events,
            completed: self.completed_checkpoints(),
            uploaded: self.progress.0.lock().uploaded.clone(),
        };
        Ok((stop.savepoint, finished))
    }

    /// A savepoint under the directory `dir` (a URL), or the configured one.
    fn savepoint_to(&mut self, dir: Option<&str>, format: SavepointFormat) -> Result<Savepoint> {
        let dir = dir.map(CheckpointStorage::open).transpose()?;
        self.savepoint(dir.as_ref(), format)
    }

    fn answer_control(&self, id: &str, answer: &Answer) -> Result<()> {
        let coordinator = self.coordinator.clone();
        let (id, answer) = (id.to_string(), answer.clone());
        self.runtime().block_on(async move {
            control::answer(&mut *coordinator.lock().await, &id, &answer).await
        })
    }

    /// Ends coordination at the end of a run: the status task stops, pending checkpoints
    /// are aborted (completed ones kept), and the status says the job stopped.
    fn shut_down_coordinator(&mut self) -> Result<()> {
        self.stop_status();
        let coordinator = self.coordinator.clone();
        self.runtime().block_on(async move {
            let mut coordinator = coordinator.lock().await;
            coordinator.shutdown(false).await?;
            publish_final(&mut coordinator, RunState::Stopped).await;
            Ok(())
        })
    }

    /// Stops the task that keeps the status document up to date.
    fn stop_status(&mut self) {
        if let (Some(task), Some(runtime)) = (self.status_task.take(), &self.runtime) {
            task.stop(runtime);
        }
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .as_ref()
            .expect("the runtime is taken only by crash, which consumes the harness")
    }
}

/// How often the status task looks whether the status document is due.
const STATUS_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps the job's status document up to date (see
/// [`CheckpointCoordinator::publish_status`]) until aborted or fenced.
fn spawn_status_task(
    runtime: &tokio::runtime::Runtime,
    coordinator: Arc<tokio::sync::Mutex<CheckpointCoordinator>>,
) -> StatusTask {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = runtime.spawn(async move {
        loop {
            let published = coordinator
                .lock()
                .await
                .publish_status(RunState::Running)
                .await;
            match published {
                Err(e) if e.kind() == rockstate::ErrorKind::Fenced => break,
                Err(e) => tracing::warn!(error = %e.report(), "cannot write the job's status"),
                Ok(_) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(STATUS_POLL) => {}
                _ = &mut stopped => break,
            }
        }
    });
    StatusTask { stop, task }
}

/// The task keeping the status document up to date, and how to stop it.
struct StatusTask {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusTask {
    /// Stops the task after its write in progress, if any (so that no write of it lands
    /// after the final status).
    fn stop(self, runtime: &tokio::runtime::Runtime) {
        let _ = self.stop.send(());
        let _ = runtime.block_on(self.task);
    }
}

/// Writes the status document of a coordinator that stopped (best effort: the status
/// turns stale by itself when this write fails).
async fn publish_final(coordinator: &mut CheckpointCoordinator, state: RunState) {
    if let Err(e) = coordinator.publish_status(state).await {
        tracing::debug!(error = %e.report(), "cannot write the job's final status");
    }
}

/// A harness dropped without `finish`, `cancel` or `crash` (an error ended the run)
/// stops its subtask threads and waits for them, so that no thread still uses RocksDB
/// when the process exits; the coordinator is not shut down, as after a crash, and the
/// status says the job failed, once no subtask runs any more (whoever restarts the job
/// on seeing it must not meet the old threads at work).
impl<S: Source> Drop for Harness<S> {
    fn drop(&mut self) {
        // Still running: no finish, cancel, stop or crash ended the job; an error did.
        let status_task = self.status_task.take();
        let senders = std::mem::take(&mut self.senders);
        let threads = std::mem::take(&mut self.threads);
        if let Err(e) = stop_threads(senders, threads) {
            tracing::debug!(error = %e.report(), "subtask error while dropping the harness");
        }
        if let (Some(task), Some(runtime)) = (status_task, &self.runtime) {
            task.stop(runtime);
            let coordinator = self.coordinator.clone();
            // Bounded: a store that does not answer must not hold up the process's exit.
            // The timer is made inside the runtime (it needs its context).
            let published = runtime.block_on(async move {
                tokio::time::timeout(std::time::Duration::from_secs(5), async move {
                    publish_final(&mut *coordinator.lock().await, RunState::Failed).await
                })
                .await
            });
            if published.is_err() {
                tracing::debug!("the failed job's status was not written in time");
            }
        }
    }
}

fn stop_threads<K, V>(
    senders: Vec<SyncSender<Message<K, V>>>,
    threads: Vec<JoinHandle<Result<RocksStateBackend>>>,
) -> Result<Vec<RocksStateBackend>> {
    for tx in senders {
        // A subtask that already stopped has reported why through the progress.
        let _ = tx.send(Message::Stop);
    }
    let mut backends = Vec::new();
    let mut first = None;
    for thread in threads {
        match thread.join() {
            Ok(Ok(backend)) => backends.push(backend),
            Ok(Err(e)) => {
                first.get_or_insert(e);
            }
            Err(_) => {
                first.get_or_insert(Error::Internal("a subtask thread panicked".into()));
            }
        }
    }
    first.map_or(Ok(backends), Err)
}
