//! Acknowledgements through checkpoint storage, for runtimes whose subtasks live in
//! several processes: every worker writes an acknowledgement file per checkpoint
//! ([`AckRecord`] at [`ack_path`]), one coordinating task ([`CoordinatorTask`], run by
//! one worker) collects them and commits the checkpoint, and every worker learns which
//! checkpoints completed from storage ([`newest_completed`]). No RPC is needed: it works
//! across processes and machines on any store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::checkpoint::discovery;
use crate::checkpoint::status::RunState;
use crate::checkpoint::{
    AckOutcome, CheckpointCoordinator, CoordinatorOptions, OperatorSpec, SubtaskSnapshot,
    WriterEpoch,
};
use crate::clock::SystemClock;
use crate::codec;
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::control::{self, Command};
use crate::storage::CheckpointStorage;

const ACK_MAGIC: &[u8; 8] = b"RKSTACK\0";
/// Version 3 records the structure of the states' types.
const ACK_VERSION: u32 = 3;
/// Acknowledgements hold handles of a few operators: a generous bound on their size.
const MAX_ACK_LEN: u64 = 64 << 20;

/// What one worker reports for one checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AckRecord {
    /// The checkpoint acknowledged.
    pub checkpoint_id: u64,
    /// The run (attempt) that wrote it: acknowledgements of other runs are ignored.
    pub run: u64,
    /// The worker that wrote it.
    pub worker: u32,
    /// How many workers the run has.
    pub workers: u32,
    /// The oldest checkpoint whose files this worker's snapshots reused (0: none
    /// confirmed yet, so it may still adopt any completed checkpoint).
    pub base: u64,
    /// Set when the worker could not snapshot or upload: the checkpoint cannot complete.
    pub declined: Option<String>,
    /// `(operator uid, snapshot)` of the worker's subtask of each operator.
    pub snapshots: Vec<(String, SubtaskSnapshot)>,
    /// The longest synchronous pause of the worker's snapshots, in µs.
    pub sync_us: u64,
}

impl AckRecord {
    /// `magic ‖ version ‖ payload ‖ CRC32 of everything before it`.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = ACK_MAGIC.to_vec();
        out.extend(codec::encode_versioned(ACK_VERSION, self)?);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        Ok(out)
    }

    /// Errors: `Corrupt` for a bad magic, CRC or payload; `Incompatible` for a newer
    /// version.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        let Some((body, crc)) = bytes.split_last_chunk::<4>() else {
            return Err(Error::corrupt(what, "too short for an acknowledgement"));
        };
        if !body.starts_with(ACK_MAGIC) {
            return Err(Error::corrupt(
                what,
                "bad magic (not a rockstate acknowledgement)",
            ));
        }
        if crc32fast::hash(body) != u32::from_be_bytes(*crc) {
            return Err(Error::corrupt(what, "CRC32 mismatch"));
        }
        let (_, record) =
            crate::format::decode_versioned_states(&body[ACK_MAGIC.len()..], ACK_VERSION, 3, what)?;
        Ok(record)
    }
}

/// The folder of a run's acknowledgements of one checkpoint.
pub fn ack_dir(checkpoint_id: u64, run: u64) -> String {
    format!("chk-{checkpoint_id}/_acks/{run:016x}")
}

/// The acknowledgement of `worker`.
pub fn ack_path(checkpoint_id: u64, run: u64, worker: u32) -> String {
    format!("{}/worker-{worker}", ack_dir(checkpoint_id, run))
}

/// Messages from worker 0's thread to the coordinating task.
#[derive(Debug)]
pub enum ToCoordinator {
    /// Worker 0 snapshotted this epoch: the checkpoint is in flight.
    Trigger(u64),
    /// Stop: pending checkpoints are aborted, completed ones retained.
    Shutdown,
}

/// What the coordinating task reports to worker 0's thread.
#[derive(Debug)]
pub enum FromCoordinator {
    /// The checkpoint completed.
    Completed(u64),
    /// The checkpoint failed, with the reason.
    Failed(u64, String),
    /// The task stopped on an error it cannot recover from.
    Stopped(Error),
}

/// Settings of the coordinating task.
pub struct CoordinatorTask {
    /// The writer epoch worker 0 claimed for this run.
    pub epoch: WriterEpoch,
    /// The job directory.
    pub job: CheckpointStorage,
    /// The job id recorded in `_metadata`.
    pub job_id: String,
    /// The job's operators.
    pub operators: Vec<OperatorSpec>,
    /// Retention and timeouts.
    pub options: CoordinatorOptions,
    /// The run (attempt): acknowledgements of other runs are ignored.
    pub run: u64,
    /// How many workers acknowledge each checkpoint.
    pub workers: u32,
    /// How often the acknowledgement folder is listed.
    pub poll: Duration,
    /// A local directory (of the runtime's scratch space) where savepoints asked through
    /// control requests are assembled from completed checkpoints.
    pub scratch: std::path::PathBuf,
    /// Memory of the temporary backends those savepoints are assembled with.
    pub memory_budget: usize,
}

/// How often the task looks for control requests.
const CONTROL_POLL: Duration = Duration::from_millis(500);

/// A stop asked through a control request, answered when the job ends.
struct AwaitedStop {
    request: String,
    savepoint_dir: Option<String>,
    format: crate::format::SavepointFormat,
}

/// A savepoint asked through a control request, made from the first checkpoint that
/// completes after `after`.
struct AwaitedSavepoint {
    request: String,
    after: u64,
    dir: Option<String>,
    format: crate::format::SavepointFormat,
    /// After this (ms since the Unix epoch) the client no longer waits.
    expires_ms: u64,
}

/// A savepoint being written from checkpoint `checkpoint` (held against retention).
struct Building {
    request: String,
    checkpoint: u64,
    handle: tokio::task::JoinHandle<Result<String>>,
}

/// The result of a savepoint's thread.
fn joined(result: std::result::Result<Result<String>, tokio::task::JoinError>) -> Result<String> {
    result
        .map_err(|e| Error::Internal(format!("the savepoint task failed: {e}")))
        .and_then(|r| r)
}

/// The control requests the task carries.
#[derive(Default)]
struct ControlState {
    savepoints: Vec<AwaitedSavepoint>,
    stops: Vec<AwaitedStop>,
    /// Whether the stop was announced to the workers.
    announced: bool,
    /// Answers to write (kept until written).
    answers: Vec<(String, control::Answer)>,
    /// Savepoints being written.
    building: Vec<Building>,
}

impl CoordinatorTask {
    /// Runs until `Shutdown` or until worker 0 goes away.
    pub async fn run(
        self,
        mut rx: UnboundedReceiver<ToCoordinator>,
        events: Sender<FromCoordinator>,
    ) {
        let mut coordinator = match CheckpointCoordinator::start_claimed(
            self.job.clone(),
            &self.job_id,
            self.operators.clone(),
            self.options.clone(),
            Arc::new(SystemClock),
            self.epoch.clone(),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                let _ = events.send(FromCoordinator::Stopped(e));
                return;
            }
        };
        // Per checkpoint in flight: the workers whose acknowledgement was read.
        let mut pending: BTreeMap<u64, BTreeSet<u32>> = BTreeMap::new();
        // Per worker: the newest base it reported. Until every worker reported one, any
        // completed checkpoint may still be adopted by some worker.
        let mut bases: BTreeMap<u32, u64> = BTreeMap::new();
        coordinator.set_reuse_floor(0);
        let mut control = ControlState::default();
        let mut last_control: Option<tokio::time::Instant> = None;
        let mut final_state = RunState::Failed;
        control::clear_other_stops(&self.job, self.run).await;
        // Savepoints of an earlier run of this process left their scratch files.
        if let Err(e) = crate::restore::remove_dir_if_exists(&self.scratch).await {
            tracing::warn!(error = %e.report(), "cannot empty the savepoint scratch directory");
        }
        loop {
            let shutdown = tokio::select! {
                message = rx.recv() => match message {
                    Some(ToCoordinator::Trigger(id)) => {
                        match coordinator.trigger_with_id(id) {
                            Ok(()) => {
                                pending.insert(id, BTreeSet::new());
                            }
                            Err(e) => {
                                let _ = events.send(FromCoordinator::Failed(id, e.to_string()));
                            }
                        }
                        false
                    }
                    Some(ToCoordinator::Shutdown) => {
                        final_state = RunState::Stopped;
                        true
                    }
                    // Worker 0 went away without saying goodbye: it failed.
                    None => true,
                },
                () = tokio::time::sleep(self.poll) => false,
            };
            if shutdown {
                break;
            }
            for id in pending.keys().copied().collect::<Vec<_>>() {
                let collected = self
                    .collect(&mut coordinator, id, &mut pending, &mut bases, &events)
                    .await;
                match collected {
                    Err(e) if e.kind() == ErrorKind::Fenced => {
                        return self.fenced(e, &mut control, &events).await;
                    }
                    Err(e) => {
                        tracing::warn!(checkpoint_id = id, error = %e.report(), "cannot read acknowledgements yet")
                    }
                    Ok(()) => {}
                }
            }
            let mut reported = BTreeSet::new();
            match coordinator.abort_expired().await {
                Ok(expired) => {
                    for id in expired {
                        reported.insert(id);
                        let _ = events.send(FromCoordinator::Failed(id, "timed out".into()));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Fenced => {
                    return self.fenced(e, &mut control, &events).await;
                }
                Err(e) => tracing::warn!(error = %e.report(), "cannot abort expired checkpoints"),
            }
            // Checkpoints the coordinator no longer tracks (aborted, subsumed): their
            // acknowledgements are of no use.
            let live: BTreeSet<u64> = coordinator.pending_ids().into_iter().collect();
            let gone: Vec<u64> = pending
                .keys()
                .copied()
                .filter(|id| !live.contains(id))
                .collect();
            for id in gone {
                pending.remove(&id);
                // Worker 0 learns of every checkpoint's end, so that it never waits for
                // one the coordinator dropped (a newer one completed first).
                if !reported.contains(&id) {
                    let _ = events.send(FromCoordinator::Failed(
                        id,
                        "aborted: a newer checkpoint completed first".into(),
                    ));
                }
                self.remove_acks(id).await;
            }
            if last_control.is_none_or(|at| at.elapsed() >= CONTROL_POLL) {
                last_control = Some(tokio::time::Instant::now());
                let served = match self.take_requests(&mut coordinator, &mut control).await {
                    Ok(()) => self.send_answers(&mut coordinator, &mut control).await,
                    Err(e) => Err(e),
                };
                match served {
                    Err(e) if e.kind() == ErrorKind::Fenced => {
                        return self.fenced(e, &mut control, &events).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.report(), "cannot serve control requests now")
                    }
                    Ok(()) => {}
                }
            }
            if !control.savepoints.is_empty() || !control.building.is_empty() {
                self.make_savepoints(&mut coordinator, &mut control, false)
                    .await;
                if let Err(e) = self
                    .finish_builds(&mut coordinator, &mut control, false)
                    .await
                {
                    return self.fenced(e, &mut control, &events).await;
                }
                if let Err(e) = self.send_answers(&mut coordinator, &mut control).await {
                    if e.kind() == ErrorKind::Fenced {
                        return self.fenced(e, &mut control, &events).await;
                    }
                }
            }
            match coordinator.publish_status(RunState::Running).await {
                Err(e) if e.kind() == ErrorKind::Fenced => {
                    return self.fenced(e, &mut control, &events).await;
                }
                Err(e) => tracing::warn!(error = %e.report(), "cannot write the job's status"),
                Ok(_) => {}
            }
        }
        // The job ends: savepoints asked for are made from its final checkpoint, and stops
        // are answered. A job whose worker 0 failed makes none.
        if final_state == RunState::Failed {
            let failed =
                Error::Internal("the job failed before it could carry out the request".into());
            for wanted in control.savepoints.drain(..) {
                control
                    .answers
                    .push((wanted.request, control::Answer::failed(&failed)));
            }
            for stop in control.stops.drain(..) {
                control
                    .answers
                    .push((stop.request, control::Answer::failed(&failed)));
            }
        }
        loop {
            if let Err(e) = self
                .finish_builds(&mut coordinator, &mut control, true)
                .await
            {
                tracing::warn!(error = %e.report(), "savepoints asked of the job");
            }
            if control.savepoints.is_empty() {
                break;
            }
            self.make_savepoints(&mut coordinator, &mut control, true)
                .await;
        }
        self.answer_stops(&mut coordinator, &mut control).await;
        for attempt in 0..3 {
            match self.send_answers(&mut coordinator, &mut control).await {
                Err(e) if e.kind() != ErrorKind::Fenced && attempt < 2 => {
                    tokio::time::sleep(CONTROL_POLL).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e.report(), "control requests left unanswered");
                    break;
                }
                Ok(()) => break,
            }
        }
        // Without a stop, nobody waits for this run's proposals: they go. After a stop,
        // a worker may still be reading the agreement: the next run removes them.
        if !control.announced {
            control::clear_stops(&self.job, self.run).await;
        }
        if let Err(e) = coordinator.shutdown(false).await {
            tracing::warn!(error = %e.report(), "coordinator shutdown");
        }
        if let Err(e) = coordinator.publish_status(final_state).await {
            tracing::debug!(error = %e.report(), "cannot write the job's final status");
        }
        for id in pending.into_keys() {
            self.remove_acks(id).await;
        }
    }

    /// Ends the task on an error it cannot go on with (`Fenced`): savepoints being written
    /// are waited for (their threads must not outlive the runtime; a fenced writer does
    /// not answer them), then worker 0 is told.
    async fn fenced(
        &self,
        error: Error,
        control: &mut ControlState,
        events: &Sender<FromCoordinator>,
    ) {
        for build in control.building.drain(..) {
            if let Err(e) = joined(build.handle.await) {
                tracing::debug!(request = %build.request, error = %e.report(), "savepoint of a fenced writer");
            }
        }
        let _ = events.send(FromCoordinator::Stopped(error));
    }

    /// Takes the job's new control requests, recording each before anything else can
    /// fail: savepoints wait for the next checkpoint to complete; a stop is announced to
    /// the workers (again at every poll until that succeeds) and answered when the job
    /// ends.
    async fn take_requests(
        &self,
        coordinator: &mut CheckpointCoordinator,
        control: &mut ControlState,
    ) -> Result<()> {
        for request in control::pending(&self.job).await? {
            if !control::accept(coordinator, &request).await? {
                continue;
            }
            match request.command {
                Command::Savepoint { dir, format } => {
                    let after = coordinator
                        .pending_ids()
                        .into_iter()
                        .max()
                        .into_iter()
                        .chain(coordinator.latest_completed().map(|m| m.checkpoint_id))
                        .max()
                        .unwrap_or(0);
                    tracing::info!(request = %request.id, after, "savepoint asked; it is made from the next checkpoint");
                    control.savepoints.push(AwaitedSavepoint {
                        request: request.id,
                        after,
                        dir,
                        format,
                        expires_ms: request.expires_ms,
                    });
                }
                Command::Stop {
                    savepoint_dir,
                    format,
                } => {
                    tracing::info!(request = %request.id, "stop asked; the workers agree on the last epoch");
                    control.stops.push(AwaitedStop {
                        request: request.id,
                        savepoint_dir,
                        format,
                    });
                }
            }
        }
        self.announce(coordinator, control).await
    }

    /// Announces the stop asked for, unless done already.
    async fn announce(
        &self,
        coordinator: &mut CheckpointCoordinator,
        control: &mut ControlState,
    ) -> Result<()> {
        let Some(first) = control.stops.first() else {
            return Ok(());
        };
        if control.announced {
            return Ok(());
        }
        let notice = control::StopNotice {
            request: first.request.clone(),
        };
        control::announce_stop(coordinator, self.run, &notice).await?;
        control.announced = true;
        Ok(())
    }

    /// Writes the answers not written yet; those that fail stay for the next try.
    async fn send_answers(
        &self,
        coordinator: &mut CheckpointCoordinator,
        control: &mut ControlState,
    ) -> Result<()> {
        let mut first_error = None;
        for (id, answer) in std::mem::take(&mut control.answers) {
            if let Err(e) = control::answer(coordinator, &id, &answer).await {
                if e.kind() == ErrorKind::Fenced {
                    return Err(e);
                }
                tracing::warn!(request = %id, error = %e.report(), "cannot answer a control request yet");
                first_error.get_or_insert(e);
                control.answers.push((id, answer));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Makes the awaited savepoints whose checkpoint has completed and queues their
    /// answers; at the end of the job (`last`), the rest are answered as failed. A request
    /// whose client stopped waiting is answered as expired, without a savepoint.
    async fn make_savepoints(
        &self,
        coordinator: &mut CheckpointCoordinator,
        control: &mut ControlState,
        last: bool,
    ) {
        let latest = coordinator.latest_completed().map(|m| m.checkpoint_id);
        let now = crate::clock::Clock::now_millis(&SystemClock);
        let mut index = 0;
        while index < control.savepoints.len() {
            let wanted = &control.savepoints[index];
            let expired = now > wanted.expires_ms;
            // One savepoint is written at a time (each restores the whole state into
            // local scratch space); the others wait for a later checkpoint.
            let ready = latest.filter(|id| *id > wanted.after);
            let busy = !control.building.is_empty();
            if !expired && (busy || (ready.is_none() && !last)) {
                index += 1;
                continue;
            }
            let wanted = control.savepoints.remove(index);
            let started = match ready {
                _ if expired => Err(Error::Busy(
                    "the request expired before a checkpoint completed: its client stopped waiting"
                        .into(),
                )),
                Some(id) => match coordinator.hold(id) {
                    Ok(()) => match self.start_savepoint(coordinator, id, &wanted).await {
                        Ok(handle) => Ok((id, handle)),
                        Err(e) => {
                            if let Err(e) = coordinator.release(id).await {
                                tracing::warn!(checkpoint_id = id, error = %e.report(), "retention after a savepoint");
                            }
                            Err(e)
                        }
                    },
                    Err(e) => Err(e),
                },
                None => Err(Error::NotFound(
                    "the job ended before a checkpoint completed after the request".into(),
                )),
            };
            match started {
                Ok((checkpoint, handle)) => control.building.push(Building {
                    request: wanted.request,
                    checkpoint,
                    handle,
                }),
                Err(e) => {
                    tracing::warn!(request = %wanted.request, error = %e.report(), "requested savepoint failed");
                    control
                        .answers
                        .push((wanted.request, control::Answer::failed(&e)));
                }
            }
        }
    }

    /// Queues the answers of the stop requests of a job that ended: with a savepoint of
    /// its final checkpoint when one was asked for (one savepoint answers every such
    /// request).
    async fn answer_stops(
        &self,
        coordinator: &mut CheckpointCoordinator,
        control: &mut ControlState,
    ) {
        let stops = std::mem::take(&mut control.stops);
        let wanted = stops.iter().find_map(|s| {
            s.savepoint_dir.as_ref().map(|dir| AwaitedSavepoint {
                request: s.request.clone(),
                after: 0,
                dir: Some(dir.clone()),
                format: s.format,
                expires_ms: u64::MAX,
            })
        });
        let latest = coordinator.latest_completed().map(|m| m.checkpoint_id);
        let savepoint = match (wanted, latest) {
            (None, _) => None,
            (Some(wanted), Some(id)) => {
                let agreed = control::agreed_final(&self.job, self.run, self.workers)
                    .await
                    .ok()
                    .flatten();
                if agreed.is_some_and(|last| last > id) {
                    tracing::warn!(
                        checkpoint_id = id,
                        last_epoch = agreed,
                        "the final checkpoint did not complete: the stop's savepoint holds an earlier one"
                    );
                }
                Some(self.savepoint_of(coordinator, id, &wanted).await)
            }
            (Some(_), None) => Some(Err(Error::NotFound(
                "the job stopped without a completed checkpoint to make its savepoint from".into(),
            ))),
        };
        for stop in stops {
            let answer = match (&savepoint, &stop.savepoint_dir) {
                (Some(Err(e)), Some(_)) => control::Answer::failed(e),
                (Some(Ok(url)), Some(_)) => control::Answer::Stopped {
                    savepoint: Some(url.clone()),
                },
                _ => control::Answer::Stopped { savepoint: None },
            };
            control.answers.push((stop.request, answer));
        }
    }

    /// Starts writing a savepoint of completed checkpoint `id` for a request, on a
    /// thread of its own (the restores it runs are long, and their futures are not `Send`);
    /// the caller holds the checkpoint against retention until it is done.
    async fn start_savepoint(
        &self,
        coordinator: &CheckpointCoordinator,
        id: u64,
        wanted: &AwaitedSavepoint,
    ) -> Result<tokio::task::JoinHandle<Result<String>>> {
        let parent =
            match (&wanted.dir, &self.options.savepoints_dir) {
                (Some(dir), _) | (None, Some(dir)) => CheckpointStorage::open(dir)?,
                (None, None) => return Err(Error::invalid(
                    "no savepoint directory: give one, or start the job with a savepoint directory",
                )),
            };
        let source = crate::restore::RestoreSource::open_folder(
            &coordinator.job_storage().child(&format!("chk-{id}"))?,
        )
        .await?;
        let (job_id, format, budget) = (self.job_id.clone(), wanted.format, self.memory_budget);
        let scratch = self.scratch.clone();
        let runtime = tokio::runtime::Handle::current();
        Ok(tokio::task::spawn_blocking(move || {
            runtime
                .block_on(crate::runtime::savepoint_from_snapshot(
                    &source, &parent, &job_id, format, &scratch, budget,
                ))
                .map(|(folder, _)| folder.url().to_string())
        }))
    }

    /// Writes a savepoint of completed checkpoint `id` for a request and waits for it.
    async fn savepoint_of(
        &self,
        coordinator: &mut CheckpointCoordinator,
        id: u64,
        wanted: &AwaitedSavepoint,
    ) -> Result<String> {
        coordinator.hold(id)?;
        let made = match self.start_savepoint(coordinator, id, wanted).await {
            Ok(handle) => joined(handle.await),
            Err(e) => Err(e),
        };
        if let Err(e) = coordinator.release(id).await {
            tracing::warn!(checkpoint_id = id, error = %e.report(), "retention after a savepoint");
        }
        made
    }

    /// Answers the savepoints whose writing ended (all of them, waiting, when `wait`).
    async fn finish_builds(
        &self,
        coordinator: &mut CheckpointCoordinator,
        control: &mut ControlState,
        wait: bool,
    ) -> Result<()> {
        let mut index = 0;
        while index < control.building.len() {
            if !wait && !control.building[index].handle.is_finished() {
                index += 1;
                continue;
            }
            let build = control.building.remove(index);
            let made = joined(build.handle.await);
            let answer = match &made {
                Ok(url) => control::Answer::Savepoint { url: url.clone() },
                Err(e) => {
                    tracing::warn!(request = %build.request, error = %e.report(), "requested savepoint failed");
                    control::Answer::failed(e)
                }
            };
            control.answers.push((build.request, answer));
            match coordinator.release(build.checkpoint).await {
                Err(e) if e.kind() == ErrorKind::Fenced => return Err(e),
                Err(e) => {
                    tracing::warn!(checkpoint_id = build.checkpoint, error = %e.report(), "retention after a savepoint")
                }
                Ok(()) => {}
            }
        }
        Ok(())
    }

    /// Reads the new acknowledgements of checkpoint `id` and hands them to the coordinator.
    async fn collect(
        &self,
        coordinator: &mut CheckpointCoordinator,
        id: u64,
        pending: &mut BTreeMap<u64, BTreeSet<u32>>,
        bases: &mut BTreeMap<u32, u64>,
        events: &Sender<FromCoordinator>,
    ) -> Result<()> {
        let dir = ack_dir(id, self.run);
        let listed = self.job.list(&dir).await?;
        for object in listed {
            let Some(seen) = pending.get_mut(&id) else {
                return Ok(());
            };
            let Some(worker) = control::worker_of(&object.path) else {
                continue;
            };
            if seen.contains(&worker) {
                continue;
            }
            let rel = format!("{dir}/worker-{worker}");
            let bytes = self.job.read_small(&rel, MAX_ACK_LEN).await?;
            seen.insert(worker);
            let outcome = match AckRecord::decode(&bytes, &self.job.url_of(&rel)) {
                Ok(record) => {
                    if record.worker == worker && worker < self.workers {
                        let base = bases.entry(worker).or_insert(0);
                        *base = (*base).max(record.base);
                        if bases.len() == self.workers as usize {
                            let floor = bases.values().copied().min().unwrap_or(0);
                            coordinator.set_reuse_floor(floor);
                        }
                    }
                    self.acknowledge(coordinator, id, worker, record).await
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(Some(AckOutcome::Completed(_))) => {
                    pending.remove(&id);
                    let _ = events.send(FromCoordinator::Completed(id));
                    self.remove_acks(id).await;
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Fenced => return Err(e),
                Err(e) => {
                    tracing::warn!(checkpoint_id = id, worker, error = %e.report(), "checkpoint fails");
                    if let Err(e) = coordinator.decline(id, &e.to_string()).await {
                        if e.kind() == ErrorKind::Fenced {
                            return Err(e);
                        }
                        tracing::warn!(checkpoint_id = id, error = %e.report(), "cannot abort");
                    }
                    pending.remove(&id);
                    let _ = events.send(FromCoordinator::Failed(id, e.to_string()));
                    self.remove_acks(id).await;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Feeds one worker's record to the coordinator; `Ok(None)` when it completes nothing.
    async fn acknowledge(
        &self,
        coordinator: &mut CheckpointCoordinator,
        id: u64,
        worker: u32,
        record: AckRecord,
    ) -> Result<Option<AckOutcome>> {
        if record.checkpoint_id != id
            || record.run != self.run
            || record.worker != worker
            || record.workers != self.workers
        {
            return Err(Error::invalid(format!(
                "acknowledgement of worker {worker} for checkpoint {id} names checkpoint {}, run {:016x}, worker {} of {} (expected run {:016x} of {} workers)",
                record.checkpoint_id, record.run, record.worker, record.workers, self.run, self.workers
            )));
        }
        if let Some(reason) = record.declined {
            return Err(Error::Internal(format!(
                "worker {worker} declined: {reason}"
            )));
        }
        coordinator.note_sync_pause(id, Duration::from_micros(record.sync_us));
        let mut last = None;
        for (uid, snapshot) in record.snapshots {
            last = Some(coordinator.acknowledge(id, &uid, worker, snapshot).await?);
        }
        Ok(last)
    }

    /// Deletes a checkpoint's acknowledgements (best effort: the sweep removes leftovers).
    async fn remove_acks(&self, id: u64) {
        let dir = ack_dir(id, self.run);
        let removed = async {
            let paths = self
                .job
                .list(&dir)
                .await?
                .into_iter()
                .map(|o| o.path)
                .collect();
            self.job.delete_many(paths).await
        };
        if let Err(e) = removed.await {
            tracing::debug!(checkpoint_id = id, error = %e.report(), "cannot remove acknowledgements (the sweep will)");
        }
    }
}

/// The newest of `ids` (tried newest first) whose `_metadata` exists and was committed by
/// the coordinator of writer epoch `epoch`: a `_metadata` of another writer (a stale
/// process of the same job) is never confirmed, since this run's coordinator does not
/// protect its files.
pub async fn newest_completed(
    job: &CheckpointStorage,
    ids: Vec<u64>,
    epoch: u64,
) -> Result<Option<u64>> {
    for id in ids.into_iter().rev() {
        match discovery::read_metadata(job, id).await {
            Ok(Some(meta)) if meta.checkpoint_id == id && meta.writer_epoch == epoch => {
                return Ok(Some(id))
            }
            Ok(Some(meta)) => {
                tracing::warn!(
                    checkpoint_id = id,
                    writer_epoch = meta.writer_epoch,
                    epoch,
                    "a checkpoint of another writer is not confirmed"
                );
            }
            Ok(None) => {}
            Err(e) if e.kind() == ErrorKind::Corrupt => {
                tracing::warn!(checkpoint_id = id, error = %e.report(), "an unreadable checkpoint is not confirmed");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_round_trip_and_damage_is_detected() {
        let record = AckRecord {
            checkpoint_id: 7,
            run: 0xabc,
            worker: 1,
            workers: 4,
            base: 3,
            declined: None,
            snapshots: vec![("source".into(), SubtaskSnapshot::default())],
            sync_us: 1_500,
        };
        let bytes = record.encode().unwrap();
        let back = AckRecord::decode(&bytes, "ack").unwrap();
        assert_eq!(back.checkpoint_id, 7);
        assert_eq!(back.snapshots.len(), 1);
        for cut in 0..bytes.len() {
            let e = AckRecord::decode(&bytes[..cut], "ack").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "cut at {cut}");
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x41;
            assert!(AckRecord::decode(&bad, "ack").is_err(), "flip at {i}");
        }
        assert_eq!(
            ack_path(7, 0xabc, 1),
            "chk-7/_acks/0000000000000abc/worker-1"
        );
    }
}
