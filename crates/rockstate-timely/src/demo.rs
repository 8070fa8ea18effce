//! The demo job ([`rockstate_harness::demo`]) on timely dataflow: the same stream, the same `counter`
//! operator, and the same final [`StateDigest`] as on the built-in harness.
//!
//! Each worker reads the source partitions it owns (partition `j` goes to worker
//! `j % workers` on a fresh start; a restart hands out the checkpointed offsets
//! round-robin). Epoch `k` of a run carries, from every partition, the offsets below
//! `boundary + (k + 1) * block`, where `block` is the checkpoint interval divided over
//! the partitions. Records carry `(offset, partition)`, and the keyed operator applies an
//! epoch sorted by key and then by them, so every key sees its records in the order of
//! the harness (offset, then partition): the final state does not depend on the worker
//! count, on timing, or on restarts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use timely::dataflow::operators::Probe;
use timely::dataflow::{InputHandleVec, ProbeHandle};

use super::{all_gather, JobConfig, KeyedState, TimelyJob, WorkerJob, WorkerReport};
use rockstate::checkpoint::{OperatorState, Redistribution};
use rockstate::StateDigest;
use rockstate::{Error, Result};
use rockstate_harness::demo::{Counter, DemoSource, DEMO_PARTITIONS, DEMO_UID};
use rockstate_harness::{Operator, Source, SOURCE_UID};

const OFFSETS: &str = "offsets";
const BOUNDARY: &str = "boundary";
/// Records per partition and epoch when checkpoints are off.
const UNCHECKPOINTED_BLOCK: u64 = 16_384;
/// Records sent between two steps of the worker.
const SEND_BATCH: u64 = 4_096;

/// A demo run on timely.
#[derive(Debug, Clone)]
pub struct DemoRun {
    /// The stream.
    pub source: DemoSource,
    /// Records between checkpoints over the whole job (0: no checkpoints).
    pub checkpoint_interval: u64,
    /// The job's settings (`checkpoints` is set from the interval).
    pub job: JobConfig,
    /// Records per second over the whole job, as from a live source (0: as fast as
    /// possible).
    pub rate: u64,
}

/// What a demo run did, over all workers of all processes.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Number of workers.
    pub workers: u32,
    /// Records processed by this run.
    pub events: u64,
    /// Digest of the `counter` state at the end.
    pub digest: StateDigest,
    /// Checkpoints completed by this run (as worker 0 saw them).
    pub checkpoints_completed: u64,
    /// The final checkpoint, when it completed.
    pub last_checkpoint: Option<u64>,
    /// The checkpoint or savepoint restored (its URL).
    pub restored_from: Option<String>,
    /// Checkpoints that failed (worker 0's coordinator).
    pub checkpoints_failed: u64,
    /// Longest synchronous snapshot pause of any worker.
    pub max_sync: Duration,
    /// Mean synchronous pause per snapshot over all workers.
    pub mean_sync: Duration,
    /// Wall time of this process's part.
    pub elapsed: Duration,
    /// This process's workers' own reports.
    pub local: Vec<WorkerReport>,
    /// Whether the job ended early on a stop request (`rockstate stop`, a signal).
    pub stopped: bool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Contribution {
    events: u64,
    digest: StateDigest,
    completed: u64,
    failed: u64,
    last_checkpoint: Option<u64>,
    snapshots: u64,
    max_sync_us: u64,
    total_sync_us: u64,
    stopped: bool,
}

/// Runs the demo on timely with `timely` (threads, processes, addresses). Blocks until
/// this process's workers are done; every process returns the same totals.
///
/// Errors: the first error of a local worker; `Internal` when timely cannot start (for
/// example an address in use) or a worker panicked.
pub fn run(timely: timely::Config, mut run: DemoRun) -> Result<DemoReport> {
    run.job.checkpoints = run.checkpoint_interval > 0;
    let job = TimelyJob::new(run.job.clone())?;
    let failed = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let source = run.source;
    let interval = run.checkpoint_interval;
    let rate = run.rate;
    let guards = timely::execute(timely, move |worker| {
        let result = run_worker(worker, &job, source, interval, rate, &failed);
        if result.is_err() {
            failed.store(true, Ordering::SeqCst);
        }
        result
    })
    .map_err(|e| Error::Internal(format!("cannot start timely: {e}")))?;
    let mut local = Vec::new();
    let mut totals: Option<Vec<Contribution>> = None;
    let mut first_error = None;
    for joined in guards.join() {
        match joined {
            Ok(Ok((all, report))) => {
                local.push(report);
                totals.get_or_insert(all);
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(panic) => {
                first_error.get_or_insert(Error::Internal(format!("a worker failed: {panic}")));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let all = totals.ok_or_else(|| Error::Internal("no worker ran".into()))?;
    let mut digest = StateDigest::new();
    for c in &all {
        digest.merge(&c.digest);
    }
    let snapshots: u64 = all.iter().map(|c| c.snapshots).sum();
    let total_sync: u64 = all.iter().map(|c| c.total_sync_us).sum();
    let restored_from = local
        .first()
        .and_then(|r: &(WorkerReport, Option<String>)| r.1.clone());
    Ok(DemoReport {
        workers: all.len() as u32,
        events: all.iter().map(|c| c.events).sum(),
        digest,
        checkpoints_completed: all[0].completed,
        last_checkpoint: all[0].last_checkpoint,
        restored_from,
        checkpoints_failed: all[0].failed,
        max_sync: Duration::from_micros(all.iter().map(|c| c.max_sync_us).max().unwrap_or(0)),
        mean_sync: Duration::from_micros(total_sync.checked_div(snapshots).unwrap_or(0)),
        elapsed: started.elapsed(),
        local: local.into_iter().map(|(r, _)| r).collect(),
        stopped: all.iter().any(|c| c.stopped),
    })
}

type WorkerOutcome = (Vec<Contribution>, (WorkerReport, Option<String>));

fn run_worker(
    worker: &mut timely::worker::Worker,
    job: &Arc<TimelyJob>,
    source: DemoSource,
    interval: u64,
    rate: u64,
    failed: &AtomicBool,
) -> Result<WorkerOutcome> {
    let w = job.worker(worker)?;
    let restored = w.operator_state(SOURCE_UID)?;
    let (mut partitions, boundary) = assignment(&w, &restored)?;
    let mut input: InputHandleVec<u64, (String, (u64, u32, u64))> = InputHandleVec::new();
    let probe = ProbeHandle::new();
    worker.dataflow::<u64, _, _>(|scope| -> Result<()> {
        input
            .to_stream(scope)
            .keyed_state(
                &w,
                DEMO_UID,
                Counter::new,
                |counter, key, (_, _, value), _out: &mut Vec<()>| counter.process(key, value),
            )?
            .probe_with(&probe);
        Ok(())
    })?;
    let block = if interval == 0 {
        UNCHECKPOINTED_BLOCK
    } else {
        (interval / u64::from(DEMO_PARTITIONS)).max(1)
    };
    let longest = (0..DEMO_PARTITIONS)
        .map(|p| source.partition_len(p))
        .max()
        .unwrap_or(0);
    let epochs = longest.saturating_sub(boundary).div_ceil(block).max(1);
    let first = w.first_epoch();
    let last = first + epochs - 1;
    w.set_final_epoch(last);
    input.advance_to(first);
    let step = |worker: &mut timely::worker::Worker| -> Result<()> {
        if failed.load(Ordering::SeqCst) {
            return Err(Error::Internal(
                "another worker of this process failed".into(),
            ));
        }
        w.step(worker)
    };
    let mut events = 0u64;
    let started = Instant::now();
    // This worker's share of the rate.
    let rate = rate.div_ceil(u64::from(w.peers()));
    // Set once the workers agreed to stop after this epoch (a stop was asked).
    let mut stop_after: Option<u64> = None;
    for k in 0..epochs {
        let epoch = first + k;
        if stop_after.is_some_and(|last| epoch > last) {
            break;
        }
        let end = boundary.saturating_add((k + 1).saturating_mul(block));
        for (partition, offset) in partitions.iter_mut() {
            let stop = end.min(source.partition_len(*partition));
            while *offset < stop {
                let batch_end = stop.min(*offset + SEND_BATCH);
                for o in *offset..batch_end {
                    if let Some((key, value)) = source.record(*partition, o) {
                        input.send((key, (o, *partition, value)));
                    }
                }
                events += batch_end - *offset;
                *offset = batch_end;
                step(worker)?;
                throttle(rate, events, started, &mut || step(worker))?;
            }
        }
        w.set_operator_state(SOURCE_UID, epoch, position(&partitions, end))?;
        input.advance_to(epoch + 1);
        // Keep at most two epochs ahead of the keyed operator, and the uploads bounded.
        while !w.can_advance() || probe.less_than(&epoch.saturating_sub(1)) {
            if stop_after.is_none() && w.stop_requested() {
                break;
            }
            step(worker)?;
        }
        if stop_after.is_none() && w.stop_requested() {
            stop_after = Some(w.agree_on_stop(worker, epoch)?);
        }
    }
    drop(input);
    let report = w.finish(worker)?;
    let mut digest = StateDigest::new();
    for (uid, backend) in w.backends() {
        digest.add_backend(&uid, &backend)?;
    }
    let mine = Contribution {
        events,
        digest,
        completed: report.completed.len() as u64,
        failed: report.failed.len() as u64,
        last_checkpoint: report.last_checkpoint,
        snapshots: report.snapshots,
        max_sync_us: report.max_sync.as_micros() as u64,
        total_sync_us: report.total_sync.as_micros() as u64,
        stopped: stop_after.is_some(),
    };
    let bytes = serde_json::to_vec(&mine)
        .map_err(|e| Error::Internal(format!("encode the worker's totals: {e}")))?;
    let all = all_gather(worker, bytes)
        .iter()
        .map(|b| serde_json::from_slice::<Contribution>(b))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Internal(format!("decode a worker's totals: {e}")))?;
    Ok((all, (report, w.restored_location())))
}

/// Holds a source to `rate` records per second (0: no limit), stepping meanwhile.
fn throttle(
    rate: u64,
    sent: u64,
    started: Instant,
    step: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    if rate == 0 {
        return Ok(());
    }
    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
    while started.elapsed() < due {
        step()?;
        std::thread::sleep((due - started.elapsed().min(due)).min(Duration::from_millis(5)));
    }
    Ok(())
}

/// This worker's partitions with their offsets, and the common epoch boundary.
fn assignment(w: &WorkerJob, restored: &OperatorState) -> Result<(Vec<(u32, u64)>, u64)> {
    let what = "source offsets of the restored checkpoint";
    if w.restored_from().is_none() || restored.lists.is_empty() {
        let parts = (0..DEMO_PARTITIONS)
            .filter(|p| p % w.peers() == w.index())
            .map(|p| (p, 0))
            .collect();
        return Ok((parts, 0));
    }
    let mut parts = Vec::new();
    for entry in restored.get(OFFSETS) {
        let bytes: [u8; 12] = entry
            .as_slice()
            .try_into()
            .map_err(|_| Error::corrupt(what, format!("entry of {} bytes", entry.len())))?;
        let p = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if p >= DEMO_PARTITIONS {
            return Err(Error::corrupt(what, format!("partition {p}")));
        }
        let mut o = [0u8; 8];
        o.copy_from_slice(&bytes[4..]);
        parts.push((p, u64::from_be_bytes(o)));
    }
    let mut boundary = 0;
    for entry in restored.get(BOUNDARY) {
        let bytes: [u8; 8] = entry
            .as_slice()
            .try_into()
            .map_err(|_| Error::corrupt(what, format!("boundary of {} bytes", entry.len())))?;
        boundary = boundary.max(u64::from_be_bytes(bytes));
    }
    Ok((parts, boundary))
}

/// The source's operator state: its partitions' offsets (split on rescale) and the epoch
/// boundary reached (given to every worker).
fn position(partitions: &[(u32, u64)], boundary: u64) -> OperatorState {
    let mut state = OperatorState::default();
    let offsets = partitions
        .iter()
        .map(|(p, o)| {
            let mut entry = p.to_be_bytes().to_vec();
            entry.extend_from_slice(&o.to_be_bytes());
            entry
        })
        .collect();
    state.put(OFFSETS, Redistribution::Split, offsets);
    state.put(
        BOUNDARY,
        Redistribution::Union,
        vec![boundary.to_be_bytes().to_vec()],
    );
    state
}
