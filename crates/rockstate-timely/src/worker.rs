//! One worker's part of a job: its subtask backends, snapshots, acknowledgements through
//! storage and the confirmations it waits for.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use timely::worker::Worker;

use rockstate::checkpoint::{
    redistribute, CoordinatorOptions, OperatorSpec, OperatorState, SubtaskSnapshot,
};
use rockstate::clock::Clock;
use rockstate::keygroup;
use rockstate::restore::RestoreSource;
use rockstate::snapshot::KeyedSnapshot;
use rockstate::RocksStateBackend;
use rockstate::{Error, Result};

use rockstate::runtime::acks::{
    self as protocol, AckRecord, CoordinatorTask, FromCoordinator, ToCoordinator,
};
use rockstate::runtime::control;

use crate::exchange::*;
use crate::job::*;

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

pub(crate) struct KeyedEntry {
    pub(crate) uid: String,
    pub(crate) backend: Rc<RocksStateBackend>,
    pub(crate) finished: bool,
}

pub(crate) struct OperatorStateEntry {
    pub(crate) restored: OperatorState,
    pub(crate) by_epoch: BTreeMap<u64, OperatorState>,
}

/// A checkpoint whose acknowledgement is being assembled.
pub(crate) struct Building {
    pub(crate) waiting: usize,
    /// The oldest last-confirmed checkpoint of the snapshots (0: none).
    pub(crate) base: u64,
    pub(crate) snapshots: Vec<(String, SubtaskSnapshot)>,
    pub(crate) declined: Option<String>,
    /// The longest synchronous pause of this worker's snapshots.
    pub(crate) sync: Duration,
}

pub(crate) enum WorkerEvent {
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
    StopPolled(Result<Option<control::StopNotice>>),
}

pub(crate) struct CoordinatorLink {
    pub(crate) tx: tokio::sync::mpsc::UnboundedSender<ToCoordinator>,
    pub(crate) rx: Receiver<FromCoordinator>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

pub(crate) struct WorkerState {
    pub(crate) index: u32,
    pub(crate) peers: u32,
    pub(crate) plan: Plan,
    pub(crate) restore: Option<RestoreSource>,
    pub(crate) local: PathBuf,
    pub(crate) operators: Vec<OperatorSpec>,
    pub(crate) keyed: Vec<KeyedEntry>,
    pub(crate) operator_states: BTreeMap<String, OperatorStateEntry>,
    pub(crate) building: BTreeMap<u64, Building>,
    pub(crate) uploads: usize,
    /// Acknowledgements being written.
    pub(crate) writing: usize,
    /// Acknowledged, completion not yet seen (newest few).
    pub(crate) acked: BTreeSet<u64>,
    pub(crate) polling: bool,
    pub(crate) last_poll: Instant,
    pub(crate) events_tx: Sender<WorkerEvent>,
    pub(crate) events_rx: Receiver<WorkerEvent>,
    pub(crate) coordinator: Option<CoordinatorLink>,
    pub(crate) sealed: bool,
    /// A failed restore of one of this worker's operators, reported at the first step.
    pub(crate) restore_error: Option<Error>,
    /// Whether the workers agreed that every one restored.
    pub(crate) restore_agreed: bool,
    /// Where this worker's previous run's files were set aside; removed once the
    /// workers agreed on the restore.
    pub(crate) previous: PathBuf,
    /// The directories set aside, which restores may take files from.
    pub(crate) reuse: Vec<PathBuf>,
    pub(crate) final_epoch: Option<u64>,
    /// A stop announced by the coordinator ([`WorkerJob::stop_requested`]).
    pub(crate) stop: Option<control::StopNotice>,
    pub(crate) stop_polling: bool,
    pub(crate) last_stop_poll: Option<Instant>,
    /// Whether this worker proposed its last epoch for a stop.
    pub(crate) proposed: bool,
    pub(crate) error: Option<Error>,
    pub(crate) report: WorkerReport,
}

/// How often a worker looks for a stop announced by the coordinator.
const STOP_POLL: Duration = Duration::from_millis(500);

/// Acknowledged checkpoints whose completion a worker still looks for.
pub(crate) const MAX_AWAITED: usize = 8;

/// One worker's part of a job: restored state, operator state, checkpoints in flight.
/// Build the dataflow with it, then drive it with [`step`](Self::step) and
/// [`finish`](Self::finish).
pub struct WorkerJob {
    pub(crate) job: Arc<TimelyJob>,
    pub(crate) state: Rc<RefCell<WorkerState>>,
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

    /// Whether a stop was asked (`rockstate stop`, or a signal to any process of the job):
    /// sources should then call [`agree_on_stop`](Self::agree_on_stop) at their next epoch
    /// boundary and stop after the epoch it returns. Only with checkpoints on.
    pub fn stop_requested(&self) -> bool {
        self.state.borrow().stop.is_some()
    }

    /// Agrees with every other worker on the job's last epoch, once a stop was asked:
    /// this worker has fully sent every epoch up to `sent`; the answer is the highest such
    /// epoch of all workers (or the final epoch of a worker whose input already ended:
    /// declare it with [`set_final_epoch`](Self::set_final_epoch)). Sources send every
    /// epoch up to the answer, then end as usual ([`finish`](Self::finish)); it becomes
    /// the declared final epoch. Steps the worker while it waits. Storage failures are
    /// retried until the coordinator's checkpoint timeout.
    ///
    /// Errors: see [`step`](Self::step); `Unavailable` when the workers do not agree
    /// within the checkpoint timeout (a worker died or cannot reach the storage): the job
    /// then fails, and resumes from its latest checkpoint.
    pub fn agree_on_stop(&self, worker: &mut Worker, sent: u64) -> Result<u64> {
        let (run, index, peers) = {
            let s = self.state.borrow();
            (s.plan.run, s.index, s.peers)
        };
        let job = self.job.job.clone();
        let deadline = Instant::now() + self.job.config.coordinator.timeout;
        let mut proposed = false;
        let mut checked: Option<Instant> = None;
        loop {
            worker.step_or_park(Some(Duration::from_millis(1)));
            self.poll(worker)?;
            if checked.is_some_and(|at| at.elapsed() < self.job.config.poll_interval) {
                continue;
            }
            checked = Some(Instant::now());
            let attempt = self.job.runtime.block_on(async {
                if !proposed {
                    control::propose_final(&job, run, index, sent).await?;
                    proposed = true;
                    self.state.borrow_mut().proposed = true;
                }
                control::agreed_final(&job, run, peers).await
            });
            match attempt {
                Ok(Some(last)) => {
                    tracing::info!(worker = index, last, "the workers agreed on the last epoch");
                    self.set_final_epoch(last);
                    return Ok(last);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(worker = index, error = %e.report(), "cannot agree on the last epoch yet")
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Busy(format!(
                    "the workers did not agree on the last epoch within {:?} (a worker is gone or cannot reach the storage)",
                    self.job.config.coordinator.timeout
                )));
            }
        }
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
        self.propose_end();
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
            if !s.acked.contains(&last) && s.index != 0 {
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

    /// A worker whose input ended proposes its declared final epoch for a stop that other
    /// workers may be agreeing on, so that they never wait for it.
    fn propose_end(&self) {
        let mut s = self.state.borrow_mut();
        if s.proposed || !self.job.config.checkpoints {
            return;
        }
        let Some(last) = s.final_epoch else {
            return;
        };
        s.proposed = true;
        let (job, run, index) = (self.job.job.clone(), s.plan.run, s.index);
        if let Err(e) = self
            .job
            .runtime
            .block_on(control::propose_final(&job, run, index, last))
        {
            tracing::warn!(error = %e.report(), "cannot record this worker's last epoch");
        }
    }

    /// At the first step: every worker learns whether every other one restored its
    /// state. A worker that could not restore makes every worker fail (with its reason)
    /// instead of leaving them waiting for it.
    pub(crate) fn agree_on_restore(&self, worker: &mut Worker) -> Result<()> {
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

    pub(crate) fn poll(&self, worker: &mut Worker) -> Result<()> {
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
        let stop_due = s.last_stop_poll.is_none_or(|at| at.elapsed() >= STOP_POLL);
        if self.job.config.checkpoints && s.stop.is_none() && !s.stop_polling && stop_due {
            s.stop_polling = true;
            s.last_stop_poll = Some(Instant::now());
            let job = self.job.job.clone();
            let tx = s.events_tx.clone();
            let run = s.plan.run;
            self.job.runtime.spawn(async move {
                let found = control::stop_notice(&job, run).await;
                let _ = tx.send(WorkerEvent::StopPolled(found));
            });
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
    pub(crate) fn register(&mut self, uid: &str) -> Result<()> {
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

    pub(crate) fn add_operator(&mut self, uid: &str, max_parallelism: u32) {
        self.operators.push(OperatorSpec {
            uid: uid.to_string(),
            parallelism: self.peers,
            max_parallelism,
        });
    }

    /// First step: the operator list is final; check the restored snapshot against it
    /// and start the coordinator on worker 0.
    pub(crate) fn seal(&mut self, job: &TimelyJob) -> Result<()> {
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
                scratch: job.config.local_root.join("savepoint-scratch"),
                memory_budget: job.config.memory_budget,
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

    pub(crate) fn drain_coordinator(&mut self, rx: &Receiver<FromCoordinator>) {
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
    pub(crate) fn operator_snapshots(&mut self, id: u64) -> Vec<(String, SubtaskSnapshot)> {
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
    pub(crate) fn snapshot(&mut self, job: &TimelyJob, op: usize, id: u64) {
        if !self.building.contains_key(&id) {
            let snapshots = self.operator_snapshots(id);
            self.building.insert(
                id,
                Building {
                    waiting: self.keyed.len(),
                    base: u64::MAX,
                    snapshots,
                    declined: None,
                    sync: Duration::ZERO,
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
        backend.record_metrics(&job.config.job_id, &uid, self.index);
        match backend.snapshot(id) {
            Ok(pending) => {
                let pause = pending.sync_duration();
                if let Some(building) = self.building.get_mut(&id) {
                    building.sync = building.sync.max(pause);
                }
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
            Err(e) if backend.has_lost_writes() => {
                // Writes were lost: the checkpoint is declined and the worker fails (the
                // job restarts from a checkpoint) instead of going on.
                tracing::error!(checkpoint_id = id, operator = %uid, error = %e.report(), "snapshot failed: state writes were lost");
                self.uploaded(job, id, &uid, Err(e.clone()));
                self.error.get_or_insert(e);
            }
            Err(e) => {
                tracing::warn!(checkpoint_id = id, operator = %uid, error = %e.report(), "snapshot failed");
                self.uploaded(job, id, &uid, Err(e));
            }
        }
    }

    pub(crate) fn uploaded(
        &mut self,
        job: &TimelyJob,
        id: u64,
        uid: &str,
        result: Result<KeyedSnapshot>,
    ) {
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
            sync_us: u64::try_from(building.sync.as_micros()).unwrap_or(u64::MAX),
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

    pub(crate) fn handle(&mut self, job: &TimelyJob, event: WorkerEvent) {
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
            WorkerEvent::StopPolled(found) => {
                self.stop_polling = false;
                match found {
                    Ok(Some(notice)) => {
                        if self.stop.is_none() {
                            tracing::info!(request = %notice.request, worker = self.index, "stop announced");
                        }
                        self.stop = Some(notice);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e.report(), "cannot look for a stop"),
                }
            }
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
    pub(crate) fn completed(&mut self, id: u64) {
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

impl TimelyJob {
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
            stop: None,
            stop_polling: false,
            last_stop_poll: None,
            proposed: false,
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
}
