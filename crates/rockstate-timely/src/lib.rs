//! Keyed rockstate state inside [timely dataflow](https://docs.rs/timely): each timely
//! worker is one subtask, checkpoints follow timely epochs, and acknowledgements travel
//! through the checkpoint storage, so jobs run in one process or in many.
//!
//! # Model
//!
//! * **Subtasks.** Worker `i` of `n` (over all processes) is subtask `i` of every
//!   operator, and owns the key groups of subtask `i` at parallelism `n`. The keyed
//!   operator ([`KeyedState::keyed_state`]) exchanges records by
//!   `subtask_for_key_group(key_group_for(key))`, so routing and state ownership agree.
//! * **Epochs are checkpoints.** Timestamps are `u64` epochs, starting at
//!   [`WorkerJob::first_epoch`] and advanced one at a time by the sources. Records of an
//!   epoch are applied once the operator's input frontier has passed the epoch (all its
//!   records have arrived), sorted by `(key, value)`: the state after every epoch is a
//!   function of the records, whatever the worker count or arrival order. Right after
//!   applying epoch `e`, every worker snapshots its backends for checkpoint `e` (the
//!   synchronous part: a flush and hard links), and uploads in the background while the
//!   dataflow goes on.
//! * **Operator state.** Sources record their positions for an epoch with
//!   [`WorkerJob::set_operator_state`] before advancing past it; each checkpoint carries
//!   them, and a restart hands every worker its share ([`WorkerJob::operator_state`]).
//!
//! # Acknowledgement through storage
//!
//! Completion must be decided across processes. Rather than a timely channel (which would
//! need a cycle in the dataflow, and dies with the processes), the checkpoint storage
//! itself carries the protocol:
//!
//! 1. When its uploads for checkpoint `e` are done, worker `i` writes
//!    `chk-e/_acks/<run>/worker-i` with create-if-absent: its handles and operator state,
//!    CRC-checked. A worker that cannot snapshot writes a declining record instead.
//! 2. Worker 0 runs the [`CheckpointCoordinator`](rockstate::checkpoint::CheckpointCoordinator)
//!    on a task. It polls the acknowledgements of the checkpoints in flight and, once all
//!    `n` are there, writes `chk-e/_metadata` (create-if-absent): its presence is the
//!    commit, exactly as for every other rockstate checkpoint. Retention and shared-file
//!    deletion stay with this single coordinator.
//! 3. Every worker polls `_metadata` of the checkpoints it acknowledged and only then
//!    calls `notify_checkpoint_complete`: shared files are reused only once their
//!    checkpoint is confirmed (DESIGN rule 1). A checkpoint that lost a worker never gets
//!    `_metadata`; it times out and its files are swept.
//!
//! `<run>` is a random number drawn by worker 0 at start, and checkpoint ids continue
//! above every `chk-N` in storage, so acknowledgements of a crashed run are never
//! mistaken for new ones. Worker 0 also chooses the snapshot every worker restores and
//! tells them through a small dataflow, so all workers agree.
//!
//! # Example
//!
//! See `examples/timely_wordcount.rs` for a complete job, and [`demo`] for the job behind
//! `rockstate demo --engine timely`.

pub mod demo;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::{InputHandleVec, StreamVec};
use timely::worker::Worker;

use rockstate::checkpoint::{
    redistribute, CoordinatorOptions, OperatorSpec, OperatorState, RestoredPoint, StartPoint,
    SubtaskSnapshot, WriterEpoch,
};
use rockstate::keygroup;
use rockstate::restore::{RestoreMode, RestoreOptions, RestoreSource};
use rockstate::runtime::start::{self, StartRequest};
use rockstate::snapshot::KeyedSnapshot;
use rockstate::storage::CheckpointStorage;
use rockstate::{BackendOptions, RocksStateBackend, SharedResources};
use rockstate::{Error, Result};

use rockstate::runtime::acks::{
    self as protocol, AckRecord, CoordinatorTask, FromCoordinator, ToCoordinator,
};

/// Where a job starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Empty state.
    Empty,
    /// The job's newest completed checkpoint (empty state when there is none).
    Latest,
    /// A checkpoint or savepoint folder (any job's, any parallelism).
    Snapshot {
        /// Its URL.
        url: String,
        /// Ownership, rescale strategy, non-restored state policy.
        options: RestoreOptions,
    },
}

/// Settings of a job on timely, shared by all workers of a process.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// The checkpoint directory; the job's checkpoints go to `<dir>/<job id>/`.
    pub checkpoint_dir: CheckpointStorage,
    /// The job id.
    pub job_id: String,
    /// Number of key groups (fixed for the life of the state).
    pub max_parallelism: u32,
    /// Local scratch space of this process's workers (`worker-<index>/` each, emptied at
    /// start). It must be new, empty, or one rockstate used before (marked with a
    /// `.rockstate-scratch` file): a directory holding other files is refused.
    pub local_root: PathBuf,
    /// Memory shared by the RocksDB instances of this process.
    pub memory_budget: usize,
    /// Where the job starts.
    pub start: Start,
    /// Whether epochs are checkpointed; without, state is only local.
    pub checkpoints: bool,
    /// Retention and timeout of the coordinator (worker 0).
    pub coordinator: CoordinatorOptions,
    /// How often acknowledgements and completions are looked for in storage.
    pub poll_interval: Duration,
    /// Snapshots a worker may have uploading at once; see [`WorkerJob::can_advance`].
    pub max_uploads: usize,
}

impl JobConfig {
    /// Defaults: max parallelism 128, 256 MiB, start from the latest checkpoint,
    /// checkpoints on, 2 retained, a 60 s timeout, polling every 50 ms, 2 uploads.
    pub fn new(checkpoint_dir: CheckpointStorage, job_id: &str, local_root: PathBuf) -> Self {
        Self {
            checkpoint_dir,
            job_id: job_id.to_string(),
            max_parallelism: 128,
            local_root,
            memory_budget: 256 << 20,
            start: Start::Latest,
            checkpoints: true,
            coordinator: CoordinatorOptions {
                num_retained: 2,
                max_concurrent: 1,
                timeout: Duration::from_secs(60),
                savepoints_dir: None,
            },
            poll_interval: Duration::from_millis(50),
            max_uploads: 2,
        }
    }
}

/// A job's process-wide part: configuration, the async runtime for uploads, and the
/// memory shared by its RocksDB instances. Build it once, before `timely::execute`, and
/// call [`worker`](Self::worker) in every worker.
pub struct TimelyJob {
    config: JobConfig,
    job: CheckpointStorage,
    runtime: tokio::runtime::Runtime,
    resources: SharedResources,
    /// The writer epoch worker 0 claimed, until its coordinator takes it.
    claimed: parking_lot::Mutex<Option<WriterEpoch>>,
}

impl std::fmt::Debug for TimelyJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimelyJob")
            .field("job", &self.job.url())
            .finish()
    }
}

impl TimelyJob {
    /// Prepares a job.
    ///
    /// Errors: `InvalidArgument` for a bad job id, max parallelism or memory budget; I/O
    /// errors starting the runtime.
    pub fn new(config: JobConfig) -> Result<Arc<Self>> {
        keygroup::validate_parallelism(1, config.max_parallelism)?;
        let job = config.checkpoint_dir.child(&config.job_id)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rockstate-io")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the upload runtime", e))?;
        let resources = SharedResources::new(config.memory_budget)?;
        Ok(Arc::new(Self {
            config,
            job,
            runtime,
            resources,
            claimed: parking_lot::Mutex::new(None),
        }))
    }

    /// The job's checkpoint directory.
    pub fn job_storage(&self) -> &CheckpointStorage {
        &self.job
    }

    /// Joins the job from a timely worker: agrees with the other workers on where to start
    /// (worker 0 decides), then restores this worker's operator state lazily as operators
    /// are built. Every worker must call it, before building its dataflows.
    ///
    /// Errors: storage errors of worker 0's decision (every worker fails alike); local
    /// I/O errors.
    pub fn worker(self: &Arc<Self>, worker: &mut Worker) -> Result<WorkerJob> {
        let index = worker.index() as u32;
        let peers = worker.peers() as u32;
        keygroup::validate_parallelism(peers, self.config.max_parallelism)?;
        let mine = if index == 0 {
            serde_json::to_vec(&self.plan().map_err(|e| e.to_string()))
                .map_err(|e| Error::Internal(format!("encode the start plan: {e}")))?
        } else {
            Vec::new()
        };
        let all = all_gather(worker, mine);
        let plan: std::result::Result<Plan, String> = serde_json::from_slice(&all[0])
            .map_err(|e| Error::Internal(format!("decode the start plan: {e}")))?;
        let plan = plan.map_err(|e| Error::Internal(format!("worker 0 could not start: {e}")))?;
        // Refuses a local root holding someone else's files; empties only this worker's
        // own folder in it.
        // What this worker's previous run left is set aside: a restore takes the files
        // that are still there and match the snapshot instead of downloading them.
        let local = self.config.local_root.join(format!("worker-{index}"));
        let previous = self.config.local_root.join(format!(
            "worker-{index}{}",
            rockstate::runtime::local_dir::PREVIOUS_RUN
        ));
        let mut reuse = Vec::new();
        let prepared = rockstate::runtime::local_dir::take(&self.config.local_root)
            .and_then(|()| rockstate::runtime::local_dir::set_aside_one(&local, &previous))
            .map(|dirs| reuse = dirs)
            .and_then(|()| match &plan.restore {
                None => Ok(None),
                Some(r) => self
                    .runtime
                    .block_on(async {
                        match r.own_checkpoint {
                            Some(id) => {
                                RestoreSource::open_folder(&self.job.child(&format!("chk-{id}"))?)
                                    .await
                            }
                            None => RestoreSource::open(&r.url).await,
                        }
                    })
                    .map(Some),
            });
        // Every worker learns whether every other one could prepare: one that returned
        // alone would leave the others waiting for it forever.
        let others = agree(worker, prepared.as_ref().err(), "start");
        let restore = prepared?;
        others?;
        let (events_tx, events_rx) = channel();
        let state = WorkerState {
            index,
            peers,
            plan,
            restore,
            local,
            previous,
            reuse,
            operators: Vec::new(),
            keyed: Vec::new(),
            operator_states: BTreeMap::new(),
            building: BTreeMap::new(),
            uploads: 0,
            writing: 0,
            acked: BTreeSet::new(),
            polling: false,
            last_poll: Instant::now(),
            events_tx,
            events_rx,
            coordinator: None,
            sealed: false,
            restore_error: None,
            restore_agreed: false,
            final_epoch: None,
            error: None,
            report: WorkerReport {
                index,
                ..WorkerReport::default()
            },
        };
        Ok(WorkerJob {
            job: self.clone(),
            state: Rc::new(RefCell::new(state)),
        })
    }

    /// Worker 0's decision: what to restore, the first epoch, the run number. Uses the
    /// same start planning as every runtime; since one worker's failed restore would
    /// stall all others, every candidate is first checked for missing or mis-sized files
    /// and skipped (for an older one, when resuming from the latest) when it has any.
    /// With checkpoints on, it then claims the job directory for the chosen start.
    fn plan(&self) -> Result<Plan> {
        self.runtime.block_on(async {
            let request = match &self.config.start {
                Start::Empty => StartRequest::Empty,
                Start::Latest => StartRequest::Latest,
                Start::Snapshot { url, options } => StartRequest::Snapshot {
                    source: Box::new(RestoreSource::open(url).await?),
                    options: *options,
                },
            };
            let plan = start::plan_start(&self.job, request).await?;
            let chosen = start::first_whole(plan).await?;
            let epoch = if self.config.checkpoints {
                let restored = chosen.as_ref().and_then(|c| match c.start_point {
                    StartPoint::Checkpoint(id) => Some(RestoredPoint {
                        checkpoint_id: id,
                        epoch: c.source.metadata().writer_epoch,
                    }),
                    _ => None,
                });
                let external = chosen.as_ref().and_then(|c| match &c.start_point {
                    StartPoint::External(url) => Some(url.clone()),
                    _ => None,
                });
                let now = rockstate::clock::SystemClock.now_millis();
                let claimed = WriterEpoch::claim(&self.job, restored, external, now).await?;
                let number = claimed.epoch();
                *self.claimed.lock() = Some(claimed);
                number
            } else {
                0
            };
            // Epochs continue above every checkpoint folder that exists after the claim.
            let found = self.job.checkpoints().await?;
            let restore = chosen.map(|c| PlanRestore {
                own_checkpoint: match c.start_point {
                    StartPoint::Checkpoint(id) => Some(id),
                    _ => None,
                },
                url: c.source.location().to_string(),
                options: c.options,
            });
            Ok(Plan {
                first_epoch: found.highest_id.saturating_add(1).max(1),
                run: rand::random(),
                epoch,
                restore,
            })
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlanRestore {
    /// Set for a checkpoint of this job (opened through the job's own storage).
    own_checkpoint: Option<u64>,
    url: String,
    #[serde(with = "restore_options")]
    options: RestoreOptions,
}

/// `RestoreOptions` as `(claim, allow_non_restored_state)`; the strategy is the default.
mod restore_options {
    use super::*;

    pub fn serialize<S: serde::Serializer>(
        o: &RestoreOptions,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        (o.mode == RestoreMode::Claim, o.allow_non_restored_state).serialize(s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<RestoreOptions, D::Error> {
        let (claim, allow) = <(bool, bool)>::deserialize(d)?;
        Ok(RestoreOptions {
            mode: if claim {
                RestoreMode::Claim
            } else {
                RestoreMode::NoClaim
            },
            allow_non_restored_state: allow,
            ..RestoreOptions::default()
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Plan {
    first_epoch: u64,
    run: u64,
    /// The writer epoch worker 0 claimed (0 without checkpoints): workers confirm only
    /// checkpoints committed under it.
    epoch: u64,
    restore: Option<PlanRestore>,
}

/// Every worker contributes `mine`; every worker gets all contributions, in worker order.
/// Steps the worker (other dataflows too) until they are in.
pub fn all_gather(worker: &mut Worker, mine: Vec<u8>) -> Vec<Vec<u8>> {
    use timely::dataflow::operators::vec::Broadcast;
    let peers = worker.peers();
    type Received = Rc<RefCell<Vec<(u64, Vec<u8>)>>>;
    let received: Received = Rc::default();
    let sink = received.clone();
    let mut input: InputHandleVec<u64, (u64, Vec<u8>)> = InputHandleVec::new();
    worker.dataflow::<u64, _, _>(|scope| {
        input
            .to_stream(scope)
            .broadcast()
            .sink(Pipeline, "Gather", move |(data, _frontier)| {
                data.for_each(|_, batch| sink.borrow_mut().extend(batch.drain(..)));
            });
    });
    input.send((worker.index() as u64, mine));
    input.close();
    while received.borrow().len() < peers {
        worker.step_or_park(Some(Duration::from_millis(1)));
    }
    let mut all = received.take();
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, bytes)| bytes).collect()
}

/// Every worker tells every other one whether it could `what` (its failure, if any):
/// `Err` naming the first worker that could not, on every worker alike.
fn agree(worker: &mut Worker, mine: Option<&impl ToString>, what: &str) -> Result<()> {
    let mine = mine.map(ToString::to_string);
    let bytes = serde_json::to_vec(&mine)
        .map_err(|e| Error::Internal(format!("encode an outcome: {e}")))?;
    for (i, bytes) in all_gather(worker, bytes).iter().enumerate() {
        let theirs: Option<String> = serde_json::from_slice(bytes)
            .map_err(|e| Error::Internal(format!("decode an outcome: {e}")))?;
        if let Some(reason) = theirs {
            return Err(Error::Internal(format!(
                "worker {i} could not {what}: {reason}"
            )));
        }
    }
    Ok(())
}

/// What a worker did, for reports and tests.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    /// The worker's index.
    pub index: u32,
    /// Checkpoints this worker learned were completed (worker 0: every completion), in
    /// order.
    pub completed: Vec<u64>,
    /// Checkpoints worker 0's coordinator failed, with the reason (worker 0 only).
    pub failed: Vec<(u64, String)>,
    /// The final checkpoint, when it completed.
    pub last_checkpoint: Option<u64>,
    /// Snapshots taken (one per keyed operator and epoch).
    pub snapshots: u64,
    /// Longest and total synchronous snapshot pause.
    pub max_sync: Duration,
    /// Sum of all synchronous snapshot pauses.
    pub total_sync: Duration,
    /// Per snapshot: `(checkpoint id, operator uid, last confirmed checkpoint when it was
    /// taken)`: the newest checkpoint whose files it could reuse.
    pub bases: Vec<(u64, String, Option<u64>)>,
    /// When (ms since the Unix epoch) this worker learned of each completion.
    pub learned: Vec<(u64, u64)>,
}

struct KeyedEntry {
    uid: String,
    backend: Rc<RocksStateBackend>,
    finished: bool,
}

struct OperatorStateEntry {
    restored: OperatorState,
    by_epoch: BTreeMap<u64, OperatorState>,
}

/// A checkpoint whose acknowledgement is being assembled.
struct Building {
    waiting: usize,
    /// The oldest last-confirmed checkpoint of the snapshots (0: none).
    base: u64,
    snapshots: Vec<(String, SubtaskSnapshot)>,
    declined: Option<String>,
}

enum WorkerEvent {
    Uploaded {
        id: u64,
        uid: String,
        result: Result<KeyedSnapshot>,
    },
    Acknowledged {
        id: u64,
        result: Result<()>,
    },
    Polled(Result<Option<u64>>),
}

struct CoordinatorLink {
    tx: tokio::sync::mpsc::UnboundedSender<ToCoordinator>,
    rx: Receiver<FromCoordinator>,
    task: tokio::task::JoinHandle<()>,
}

struct WorkerState {
    index: u32,
    peers: u32,
    plan: Plan,
    restore: Option<RestoreSource>,
    local: PathBuf,
    operators: Vec<OperatorSpec>,
    keyed: Vec<KeyedEntry>,
    operator_states: BTreeMap<String, OperatorStateEntry>,
    building: BTreeMap<u64, Building>,
    uploads: usize,
    /// Acknowledgements being written.
    writing: usize,
    /// Acknowledged, completion not yet seen (newest few).
    acked: BTreeSet<u64>,
    polling: bool,
    last_poll: Instant,
    events_tx: Sender<WorkerEvent>,
    events_rx: Receiver<WorkerEvent>,
    coordinator: Option<CoordinatorLink>,
    sealed: bool,
    /// A failed restore of one of this worker's operators, reported at the first step.
    restore_error: Option<Error>,
    /// Whether the workers agreed that every one restored.
    restore_agreed: bool,
    /// Where this worker's previous run's files were set aside; removed once the
    /// workers agreed on the restore.
    previous: PathBuf,
    /// The directories set aside, which restores may take files from.
    reuse: Vec<PathBuf>,
    final_epoch: Option<u64>,
    error: Option<Error>,
    report: WorkerReport,
}

/// Acknowledged checkpoints whose completion a worker still looks for.
const MAX_AWAITED: usize = 8;

/// One worker's part of a job: restored state, operator state, checkpoints in flight.
/// Build the dataflow with it, then drive it with [`step`](Self::step) and
/// [`finish`](Self::finish).
pub struct WorkerJob {
    job: Arc<TimelyJob>,
    state: Rc<RefCell<WorkerState>>,
}

impl std::fmt::Debug for WorkerJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.borrow();
        f.debug_struct("WorkerJob")
            .field("index", &s.index)
            .field("peers", &s.peers)
            .field("first_epoch", &s.plan.first_epoch)
            .finish()
    }
}

impl WorkerJob {
    /// This worker's index (its subtask index).
    pub fn index(&self) -> u32 {
        self.state.borrow().index
    }

    /// Number of workers over all processes (the parallelism).
    pub fn peers(&self) -> u32 {
        self.state.borrow().peers
    }

    /// The first epoch of this run: sources must start at it (`advance_to`). It is above
    /// every checkpoint id the job directory has seen.
    pub fn first_epoch(&self) -> u64 {
        self.state.borrow().plan.first_epoch
    }

    /// The checkpoint or savepoint this run restored, if any.
    pub fn restored_from(&self) -> Option<u64> {
        self.state
            .borrow()
            .restore
            .as_ref()
            .map(|s| s.metadata().checkpoint_id)
    }

    /// Where the restored checkpoint or savepoint is, if any.
    pub fn restored_location(&self) -> Option<String> {
        self.state
            .borrow()
            .plan
            .restore
            .as_ref()
            .map(|r| match r.own_checkpoint {
                Some(id) => self.job.job.url_of(&format!("chk-{id}")),
                None => r.url.clone(),
            })
    }

    /// Registers non-keyed operator `uid` (for example a source) and returns this
    /// worker's share of its restored state (empty on a fresh start). Lists are
    /// redistributed as they were declared when the parallelism changed.
    ///
    /// Errors: `InvalidArgument` for a uid registered twice; `Corrupt` for inconsistent
    /// restored lists.
    pub fn operator_state(&self, uid: &str) -> Result<OperatorState> {
        let mut s = self.state.borrow_mut();
        s.register(uid)?;
        let restored = match s.restore.as_ref().and_then(|r| r.metadata().operator(uid)) {
            Some(op) => {
                let old: Vec<OperatorState> = op
                    .subtasks
                    .iter()
                    .map(|t| t.operator_state.clone())
                    .collect();
                redistribute(&old, s.peers)?.swap_remove(s.index as usize)
            }
            None => OperatorState::default(),
        };
        s.operator_states.insert(
            uid.to_string(),
            OperatorStateEntry {
                restored: restored.clone(),
                by_epoch: BTreeMap::new(),
            },
        );
        Ok(restored)
    }

    /// Records operator `uid`'s state as of the end of `epoch`. Call it before advancing
    /// the source past `epoch`; an epoch without a record keeps the previous one.
    ///
    /// Errors: `InvalidArgument` for an unregistered uid.
    pub fn set_operator_state(&self, uid: &str, epoch: u64, state: OperatorState) -> Result<()> {
        let mut s = self.state.borrow_mut();
        let entry = s
            .operator_states
            .get_mut(uid)
            .ok_or_else(|| Error::invalid(format!("operator {uid:?} is not registered")))?;
        entry.by_epoch.insert(epoch, state);
        Ok(())
    }

    /// Declares the last epoch of the job, the same on every worker. The final checkpoint
    /// is taken at it when the input ends. Without it, a worker takes its final snapshot
    /// at the newest epoch it has seen, which may differ between workers if sources end
    /// at different epochs (that last checkpoint then never completes).
    pub fn set_final_epoch(&self, epoch: u64) {
        self.state.borrow_mut().final_epoch = Some(epoch);
    }

    /// Whether sources may start another epoch: false while this worker has
    /// `max_uploads` snapshots uploading (keep stepping until it turns true).
    pub fn can_advance(&self) -> bool {
        self.state.borrow().uploads < self.job.config.max_uploads.max(1)
    }

    /// The keyed backends of this worker, by operator uid (for inspection, digests).
    pub fn backends(&self) -> Vec<(String, Rc<RocksStateBackend>)> {
        self.state
            .borrow()
            .keyed
            .iter()
            .map(|k| (k.uid.clone(), k.backend.clone()))
            .collect()
    }

    /// What this worker did so far.
    pub fn report(&self) -> WorkerReport {
        self.state.borrow().report.clone()
    }

    /// Runs the worker once and handles finished uploads, acknowledgements and
    /// completions.
    ///
    /// Errors: the first failure of a keyed operator (state access), a restore mismatch
    /// (unknown operators in the snapshot), or of the coordinator. Checkpoint failures
    /// are not errors: they are logged and the next epoch tries again.
    pub fn step(&self, worker: &mut Worker) -> Result<()> {
        worker.step();
        self.poll(worker)
    }

    /// Closes out the job after the inputs are closed: steps until every keyed operator
    /// applied its last epoch and, with checkpoints on, until the final checkpoint
    /// completed or the coordinator timeout passed. Returns the worker's report.
    ///
    /// Errors: see [`step`](Self::step).
    pub fn finish(&self, worker: &mut Worker) -> Result<WorkerReport> {
        let timeout = self.job.config.coordinator.timeout;
        let mut deadline: Option<Instant> = None;
        loop {
            worker.step_or_park(Some(Duration::from_millis(1)));
            self.poll(worker)?;
            let s = self.state.borrow();
            let drained =
                s.keyed.iter().all(|k| k.finished) && s.building.is_empty() && s.writing == 0;
            if !drained {
                continue;
            }
            if !self.job.config.checkpoints {
                break;
            }
            let Some(last) = s.report.bases.last().map(|b| b.0) else {
                break;
            };
            if s.report.completed.contains(&last)
                || s.report.failed.iter().any(|(id, _)| *id == last)
            {
                break;
            }
            if s.acked.is_empty() && s.index != 0 {
                // Its acknowledgement could not be written: nothing to wait for.
                break;
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
            if Instant::now() >= deadline {
                tracing::warn!(
                    checkpoint_id = last,
                    "the final checkpoint did not complete in time"
                );
                break;
            }
        }
        let link = self.state.borrow_mut().coordinator.take();
        if let Some(link) = link {
            let _ = link.tx.send(ToCoordinator::Shutdown);
            if let Err(e) = self.job.runtime.block_on(link.task) {
                self.state
                    .borrow_mut()
                    .error
                    .get_or_insert(Error::Internal(format!(
                        "the checkpoint coordinator failed: {e}"
                    )));
            }
            self.state.borrow_mut().drain_coordinator(&link.rx);
        }
        let mut s = self.state.borrow_mut();
        if let Some(e) = s.error.take() {
            return Err(e);
        }
        let last = s.report.bases.last().map(|b| b.0);
        s.report.last_checkpoint = last.filter(|id| s.report.completed.contains(id));
        Ok(s.report.clone())
    }

    /// At the first step: every worker learns whether every other one restored its
    /// state. A worker that could not restore makes every worker fail (with its reason)
    /// instead of leaving them waiting for it.
    fn agree_on_restore(&self, worker: &mut Worker) -> Result<()> {
        let mine = {
            let mut s = self.state.borrow_mut();
            if !s.reuse.is_empty() {
                s.reuse.clear();
                if let Err(e) = rockstate::runtime::local_dir::remove(&s.previous) {
                    tracing::warn!(dir = %s.previous.display(), error = %e.report(), "cannot remove the previous run's files");
                }
            }
            if s.restore_agreed || s.plan.restore.is_none() {
                return Ok(());
            }
            s.restore_error.as_ref().map(|e| e.to_string())
        };
        // Outside the state's borrow: gathering steps the worker's dataflows.
        let others = agree(worker, mine.as_ref(), "restore its state");
        let mut s = self.state.borrow_mut();
        s.restore_agreed = true;
        if let Some(e) = s.restore_error.take() {
            return Err(e);
        }
        others
    }

    fn poll(&self, worker: &mut Worker) -> Result<()> {
        self.agree_on_restore(worker)?;
        let mut s = self.state.borrow_mut();
        if !s.sealed {
            s.seal(&self.job)?;
        }
        if let Some(e) = s.error.take() {
            return Err(e);
        }
        while let Ok(event) = s.events_rx.try_recv() {
            s.handle(&self.job, event);
        }
        if let Some(link) = s.coordinator.take() {
            s.drain_coordinator(&link.rx);
            s.coordinator = Some(link);
        }
        if let Some(e) = s.error.take() {
            return Err(e);
        }
        let due = s.last_poll.elapsed() >= self.job.config.poll_interval;
        if !s.acked.is_empty() && !s.polling && due {
            s.polling = true;
            s.last_poll = Instant::now();
            let ids: Vec<u64> = s.acked.iter().copied().collect();
            let job = self.job.job.clone();
            let tx = s.events_tx.clone();
            let epoch = s.plan.epoch;
            self.job.runtime.spawn(async move {
                let found = protocol::newest_completed(&job, ids, epoch).await;
                let _ = tx.send(WorkerEvent::Polled(found));
            });
        }
        Ok(())
    }
}

impl WorkerState {
    fn register(&mut self, uid: &str) -> Result<()> {
        if self.sealed {
            return Err(Error::invalid(format!(
                "operator {uid:?} registered after the job started"
            )));
        }
        if self.operators.iter().any(|o| o.uid == uid) {
            return Err(Error::invalid(format!(
                "operator uid {uid:?} appears twice"
            )));
        }
        Ok(())
    }

    fn add_operator(&mut self, uid: &str, max_parallelism: u32) {
        self.operators.push(OperatorSpec {
            uid: uid.to_string(),
            parallelism: self.peers,
            max_parallelism,
        });
    }

    /// First step: the operator list is final; check the restored snapshot against it
    /// and start the coordinator on worker 0.
    fn seal(&mut self, job: &TimelyJob) -> Result<()> {
        self.sealed = true;
        for uid in self.operator_states.keys() {
            if !self.operators.iter().any(|o| &o.uid == uid) {
                self.operators.push(OperatorSpec {
                    uid: uid.clone(),
                    parallelism: self.peers,
                    max_parallelism: job.config.max_parallelism,
                });
            }
        }
        if self.keyed.is_empty() {
            return Err(Error::invalid(
                "a job on timely needs at least one keyed operator (keyed_state)",
            ));
        }
        if let (Some(source), Some(plan)) = (&self.restore, &self.plan.restore) {
            source.check_operators(&self.operators, plan.options.allow_non_restored_state)?;
        }
        if self.index == 0 && job.config.checkpoints {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (events_tx, events_rx) = channel();
            let epoch = job.claimed.lock().take().ok_or_else(|| {
                Error::Internal("worker 0 started without claiming the job directory".into())
            })?;
            let task = CoordinatorTask {
                epoch,
                job: job.job.clone(),
                job_id: job.config.job_id.clone(),
                operators: self.operators.clone(),
                options: CoordinatorOptions {
                    max_concurrent: usize::MAX,
                    ..job.config.coordinator.clone()
                },
                run: self.plan.run,
                workers: self.peers,
                poll: job.config.poll_interval,
            };
            let handle = job.runtime.spawn(task.run(rx, events_tx));
            self.coordinator = Some(CoordinatorLink {
                tx,
                rx: events_rx,
                task: handle,
            });
        }
        Ok(())
    }

    fn drain_coordinator(&mut self, rx: &Receiver<FromCoordinator>) {
        while let Ok(event) = rx.try_recv() {
            match event {
                FromCoordinator::Completed(id) => {
                    tracing::info!(checkpoint_id = id, "checkpoint completed");
                    if !self.report.completed.contains(&id) {
                        self.report.completed.push(id);
                        self.report.completed.sort_unstable();
                    }
                }
                FromCoordinator::Failed(id, reason) => {
                    tracing::warn!(checkpoint_id = id, reason, "checkpoint failed");
                    self.report.failed.push((id, reason));
                }
                // `Fenced` stays `Fenced`: the runtime must stop, another process owns
                // the job directory.
                FromCoordinator::Stopped(e) if e.kind() == rockstate::ErrorKind::Fenced => {
                    self.error.get_or_insert(e);
                }
                FromCoordinator::Stopped(reason) => {
                    self.error.get_or_insert(Error::Internal(format!(
                        "the checkpoint coordinator stopped: {reason}"
                    )));
                }
            }
        }
    }

    /// The operator states to acknowledge for checkpoint `id`.
    fn operator_snapshots(&mut self, id: u64) -> Vec<(String, SubtaskSnapshot)> {
        let mut out = Vec::new();
        for (uid, entry) in &mut self.operator_states {
            let state = match entry.by_epoch.range(..=id).next_back() {
                Some((&epoch, state)) => {
                    let state = state.clone();
                    // Older records are no longer needed: later checkpoints take this one
                    // or newer.
                    entry.by_epoch = entry.by_epoch.split_off(&epoch);
                    state
                }
                None => entry.restored.clone(),
            };
            out.push((
                uid.clone(),
                SubtaskSnapshot {
                    keyed: None,
                    operator_state: state,
                },
            ));
        }
        out
    }

    /// Snapshots keyed operator `op` for checkpoint `id` and starts its upload.
    fn snapshot(&mut self, job: &TimelyJob, op: usize, id: u64) {
        if !self.building.contains_key(&id) {
            let snapshots = self.operator_snapshots(id);
            self.building.insert(
                id,
                Building {
                    waiting: self.keyed.len(),
                    base: u64::MAX,
                    snapshots,
                    declined: None,
                },
            );
            if let Some(link) = &self.coordinator {
                let _ = link.tx.send(ToCoordinator::Trigger(id));
            }
        }
        let backend = self.keyed[op].backend.clone();
        let uid = self.keyed[op].uid.clone();
        let base = backend.last_confirmed_checkpoint();
        if let Some(building) = self.building.get_mut(&id) {
            building.base = building.base.min(base.unwrap_or(0));
        }
        self.report.bases.push((id, uid.clone(), base));
        self.report.snapshots += 1;
        match backend.snapshot(id) {
            Ok(pending) => {
                let pause = pending.sync_duration();
                self.report.max_sync = self.report.max_sync.max(pause);
                self.report.total_sync += pause;
                self.uploads += 1;
                let storage = job.job.clone();
                let tx = self.events_tx.clone();
                let subtask = self.index;
                job.runtime.spawn(async move {
                    let result =
                        rockstate::runtime::store_snapshot(pending, &storage, &uid, subtask, None)
                            .await;
                    let _ = tx.send(WorkerEvent::Uploaded { id, uid, result });
                });
            }
            Err(e) => {
                tracing::warn!(checkpoint_id = id, operator = %uid, error = %e.report(), "snapshot failed");
                self.uploaded(job, id, &uid, Err(e));
            }
        }
    }

    fn uploaded(&mut self, job: &TimelyJob, id: u64, uid: &str, result: Result<KeyedSnapshot>) {
        let Some(building) = self.building.get_mut(&id) else {
            return;
        };
        building.waiting = building.waiting.saturating_sub(1);
        match result {
            Ok(keyed) => building.snapshots.push((
                uid.to_string(),
                SubtaskSnapshot {
                    keyed: Some(keyed),
                    operator_state: OperatorState::default(),
                },
            )),
            Err(e) => {
                building
                    .declined
                    .get_or_insert(format!("operator {uid:?}: {e}"));
            }
        }
        if building.waiting > 0 {
            return;
        }
        let Some(building) = self.building.remove(&id) else {
            return;
        };
        let record = AckRecord {
            checkpoint_id: id,
            run: self.plan.run,
            worker: self.index,
            workers: self.peers,
            base: if building.base == u64::MAX {
                0
            } else {
                building.base
            },
            snapshots: if building.declined.is_some() {
                Vec::new()
            } else {
                building.snapshots
            },
            declined: building.declined,
        };
        let storage = job.job.clone();
        let tx = self.events_tx.clone();
        let path = protocol::ack_path(id, self.plan.run, self.index);
        self.writing += 1;
        job.runtime.spawn(async move {
            let result = match record.encode() {
                Ok(bytes) => storage.put_if_absent(&path, bytes.into()).await,
                Err(e) => Err(e),
            };
            let _ = tx.send(WorkerEvent::Acknowledged { id, result });
        });
    }

    fn handle(&mut self, job: &TimelyJob, event: WorkerEvent) {
        match event {
            WorkerEvent::Uploaded { id, uid, result } => {
                self.uploads = self.uploads.saturating_sub(1);
                if let Err(e) = &result {
                    tracing::warn!(checkpoint_id = id, operator = %uid, error = %e.report(), "upload failed");
                }
                self.uploaded(job, id, &uid, result);
            }
            WorkerEvent::Acknowledged { id, result } => match result.map(|()| {
                self.writing = self.writing.saturating_sub(1);
            }) {
                Ok(()) => {
                    self.acked.insert(id);
                    while self.acked.len() > MAX_AWAITED {
                        self.acked.pop_first();
                    }
                }
                Err(e) => {
                    self.writing = self.writing.saturating_sub(1);
                    tracing::warn!(checkpoint_id = id, error = %e.report(), "cannot acknowledge");
                }
            },
            WorkerEvent::Polled(found) => {
                self.polling = false;
                match found {
                    Ok(Some(id)) => self.completed(id),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e.report(), "cannot look for completed checkpoints")
                    }
                }
            }
        }
    }

    /// Checkpoint `id` has `_metadata`: its files (and those of older ones it subsumed)
    /// may be reused.
    fn completed(&mut self, id: u64) {
        for keyed in &self.keyed {
            keyed.backend.notify_checkpoint_complete(id);
        }
        self.acked.retain(|a| *a > id);
        if !self.report.completed.contains(&id) {
            self.report.completed.push(id);
            self.report.completed.sort_unstable();
        }
        let now = rockstate::clock::SystemClock.now_millis();
        self.report.learned.push((id, now));
    }
}

use rockstate::clock::Clock;

/// Keyed, checkpointed state on a timely stream of `(key, value)` records.
///
/// An epoch's records are buffered until the epoch is complete: sources bound memory by
/// keeping few epochs in flight (probe the output, and see [`WorkerJob::can_advance`]).
pub trait KeyedState<'scope, K, V> {
    /// Adds keyed operator `uid`: records are routed to the worker owning their key group;
    /// `build` registers the states on this worker's backend (restored when the job
    /// restored), and `logic` handles each record with them, pushing outputs (emitted at
    /// the record's epoch). Records of an epoch are handled once the epoch is complete,
    /// sorted by `(key, value)`; then the backend is snapshotted for checkpoint `epoch`.
    ///
    /// Errors: restore errors of this worker's backend; `InvalidArgument` for a uid used
    /// twice or registered after the job started. Errors of `logic` stop the worker at
    /// its next [`WorkerJob::step`].
    fn keyed_state<S, O, B, L>(
        self,
        job: &WorkerJob,
        uid: &str,
        build: B,
        logic: L,
    ) -> Result<StreamVec<'scope, u64, O>>
    where
        S: 'static,
        O: timely::ExchangeData,
        B: FnOnce(&RocksStateBackend) -> Result<S>,
        L: FnMut(&mut S, &K, V, &mut Vec<O>) -> Result<()> + 'static;
}

impl<'scope, K, V> KeyedState<'scope, K, V> for StreamVec<'scope, u64, (K, V)>
where
    K: timely::ExchangeData + Serialize + Ord,
    V: timely::ExchangeData + Ord,
{
    fn keyed_state<S, O, B, L>(
        self,
        job: &WorkerJob,
        uid: &str,
        build: B,
        mut logic: L,
    ) -> Result<StreamVec<'scope, u64, O>>
    where
        S: 'static,
        O: timely::ExchangeData,
        B: FnOnce(&RocksStateBackend) -> Result<S>,
        L: FnMut(&mut S, &K, V, &mut Vec<O>) -> Result<()> + 'static,
    {
        let max_parallelism = job.job.config.max_parallelism;
        let (index, peers, first_epoch, op) = {
            let mut s = job.state.borrow_mut();
            s.register(uid)?;
            let options = BackendOptions::for_subtask(
                s.local.join(rockstate::runtime::operator_dir_name(uid)),
                s.index,
                s.peers,
                max_parallelism,
            )?;
            let builder = RocksStateBackend::builder(options.clone())
                .shared_resources(job.job.resources.clone())
                .reuse_local_files(s.reuse.iter().cloned());
            let backend = match (&s.restore, &s.plan.restore) {
                (Some(source), Some(plan)) => {
                    // The job's operators were checked against the snapshot by worker 0.
                    let restored = job.job.runtime.block_on(builder.restore_operator(
                        source,
                        uid,
                        &RestoreOptions {
                            allow_new_operator: true,
                            ..plan.options
                        },
                    ));
                    match restored {
                        Ok(backend) => backend,
                        // Reported to every worker at the first step: returning here
                        // would leave the other workers waiting for this one forever.
                        Err(e) => {
                            tracing::error!(operator = uid, error = %e.report(), "cannot restore this worker's state");
                            s.restore_error.get_or_insert(e);
                            RocksStateBackend::builder(options)
                                .shared_resources(job.job.resources.clone())
                                .open()?
                        }
                    }
                }
                _ => builder.open()?,
            };
            s.add_operator(uid, max_parallelism);
            s.keyed.push(KeyedEntry {
                uid: uid.to_string(),
                backend: Rc::new(backend),
                finished: false,
            });
            (s.index, s.peers, s.plan.first_epoch, s.keyed.len() - 1)
        };
        let mut user = {
            let s = job.state.borrow();
            build(&s.keyed[op].backend).map_err(|e| e.for_operator(uid))?
        };
        let state = job.state.clone();
        let shared = job.job.clone();
        let route = move |(key, _): &(K, V)| -> u64 {
            rockstate::key_group_for(key, max_parallelism)
                .and_then(|kg| keygroup::subtask_for_key_group(kg, peers, max_parallelism))
                .map_or(0, u64::from)
        };
        let uid = uid.to_string();
        let stream = self.unary_frontier::<CapacityContainerBuilder<Vec<O>>, _, _, _>(
            Exchange::new(route),
            &format!("KeyedState({uid})"),
            move |capability, _info| {
                let mut capability = Some(capability);
                let mut stash: BTreeMap<u64, Vec<(K, V)>> = BTreeMap::new();
                let mut next = first_epoch;
                let mut seen = first_epoch.saturating_sub(1);
                let mut failed = false;
                move |(input, frontier), output| {
                    input.for_each(|cap, data| {
                        if let Some(time) = cap.least() {
                            stash.entry(*time).or_default().append(data);
                        }
                    });
                    if failed {
                        stash.clear();
                        return;
                    }
                    if let Some(t) = frontier.frontier().first() {
                        seen = seen.max(*t);
                    }
                    let closed = frontier.is_empty();
                    let last = {
                        let declared = state.borrow().final_epoch;
                        let stashed = stash.keys().next_back().copied().unwrap_or(0);
                        declared.unwrap_or(0).max(stashed).max(seen)
                    };
                    if let Some(&early) = stash.keys().next().filter(|t| **t < next) {
                        let e = Error::invalid(format!(
                            "operator {uid:?} got records of epoch {early}, before the first epoch {next} of this run"
                        ));
                        state.borrow_mut().error.get_or_insert(e);
                        failed = true;
                        return;
                    }
                    while (closed && next <= last) || (!closed && !frontier.less_equal(&next)) {
                        let mut records = stash.remove(&next).unwrap_or_default();
                        records.sort_unstable();
                        let mut out = Vec::new();
                        for (key, value) in records {
                            let kg = rockstate::key_group_for(&key, max_parallelism)
                                .and_then(|kg| {
                                    keygroup::subtask_for_key_group(kg, peers, max_parallelism)
                                });
                            let result = match kg {
                                Ok(owner) if owner == index => {
                                    logic(&mut user, &key, value, &mut out)
                                }
                                Ok(owner) => Err(Error::Internal(format!(
                                    "record for subtask {owner} reached worker {index}"
                                ))),
                                Err(e) => Err(e),
                            };
                            if let Err(e) = result {
                                state
                                    .borrow_mut()
                                    .error
                                    .get_or_insert(e.for_operator(&uid));
                                failed = true;
                                return;
                            }
                        }
                        if !out.is_empty() {
                            if let Some(cap) = capability.as_ref() {
                                let cap = cap.delayed(&next);
                                output.session(&cap).give_iterator(out.into_iter());
                            }
                        }
                        if shared.config.checkpoints {
                            state.borrow_mut().snapshot(&shared, op, next);
                        }
                        next += 1;
                    }
                    if closed {
                        capability = None;
                        state.borrow_mut().keyed[op].finished = true;
                    } else if let Some(cap) = capability.as_mut() {
                        if *cap.time() < next {
                            cap.downgrade(&next);
                        }
                    }
                }
            },
        );
        Ok(stream)
    }
}
