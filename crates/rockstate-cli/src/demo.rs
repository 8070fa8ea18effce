//! `rockstate demo`: the demo job on the in-process harness.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use rockstate::runtime::control::{self, Command as ControlCommand};
use rockstate::{
    CheckpointStorage, CoordinatorOptions, Error, RestoreMode, RestoreOptions, RestoreSource,
};
use rockstate_harness::demo::{Counter, DemoSource, DEMO_UID};
use rockstate_harness::{Finished, Harness, HarnessConfig, StartFrom};
use serde_json::json;

use crate::common::exit;
use crate::format;
use crate::progress::Progress;
use crate::snapshots::print_json;

pub const HELP: &str = "\
The job: a deterministic stream of --events records over --keys keys (seeded by --seed,
split into 8 source partitions whose offsets are checkpointed as operator state) flows
into the keyed operator \"counter\", which keeps per key a count (ValueState), the last 8
values (ListState) and a histogram (MapState), on --parallelism subtasks with an
incremental checkpoint every --checkpoint-interval records.

Exactly once: a run killed at any moment (even kill -9) and resumed with --resume, at the
same or another parallelism, ends with the same state_digest as an uninterrupted run with
the same --seed, --keys and --events.

On SIGTERM or SIGINT the job stops with a savepoint when --savepoint-dir is set (its URL is
printed) and otherwise stops, keeping its latest checkpoint. With --engine timely a signal to
any one process stops every process of the job (through a stop request in its storage; needs
checkpoints). A second signal ends the process at once (exit 130); the job then resumes from
its latest checkpoint.

While it runs, from another shell: `rockstate status JOB`, `rockstate savepoint trigger JOB`,
`rockstate stop JOB [--savepoint DIR]` (JOB is <checkpoint dir>/<job id>).

Examples:
  rockstate demo --events 2000000 --parallelism 2
  rockstate demo --resume --parallelism 3
  rockstate demo --from ./savepoints/savepoint-demo-1a2b3c4d5e6f --job-id demo-2

With --json the last line of stdout is one JSON object: job_id, parallelism,
max_parallelism, events_processed, events_total, checkpoints_completed,
upload_mean_bytes and upload_max_bytes (bytes uploaded per completed checkpoint; harness
engine), last_checkpoint, restored_from, savepoint, stopped_by (\"end\", \"signal\" or \"request\": `rockstate stop`), state_digest, state_entries,
elapsed_ms, and (harness engine) value_cache_lookups, value_cache_hits, value_cache_evictions
and value_cache_pauses: the point reads of every subtask, those answered from memory, and the
times kept values were let go (a pause: the state then kept none for a while), summed over the
subtasks' backends at the end (a subtask restored after a failure counts from its restore).";

/// Records handed to the harness between checks for a stop signal.
const CHUNK: u64 = 2_000;
/// How often the job directory is looked at for control requests.
const CONTROL_POLL: Duration = Duration::from_millis(500);

/// Flags of `rockstate demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where checkpoints go: the job's directory is `<URL>/<job id>`.
    #[arg(long, default_value = "./rockstate-demo", value_name = "URL")]
    checkpoint_dir: String,
    /// The job id.
    #[arg(long, default_value = "demo", value_name = "ID")]
    job_id: String,
    /// Number of subtasks.
    #[arg(long, default_value_t = 2, value_name = "N")]
    parallelism: u32,
    /// Number of key groups, fixed for the life of the state.
    #[arg(long, default_value_t = 128, value_name = "M")]
    max_parallelism: u32,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000, value_name = "K")]
    keys: u64,
    /// Length of the stream, in records.
    #[arg(long, default_value_t = 1_000_000, value_name = "E")]
    events: u64,
    /// Records between checkpoints (0: only the final one).
    #[arg(long, default_value_t = 50_000, value_name = "EVENTS")]
    checkpoint_interval: u64,
    /// Records per second, as from a live source (0: as fast as possible).
    #[arg(long, default_value_t = 0, value_name = "EVENTS")]
    rate: u64,
    /// Seed of the stream.
    #[arg(long, default_value_t = 42, value_name = "S")]
    seed: u64,
    /// Resumes from the job's latest completed checkpoint (starts empty when it has none).
    #[arg(long, conflicts_with = "from")]
    resume: bool,
    /// Starts from a given checkpoint or savepoint folder (of any job and parallelism).
    #[arg(long, value_name = "URL")]
    from: Option<String>,
    /// With --from: the job takes ownership of the snapshot's files (references them in
    /// place when they are in its own directory) instead of copying them.
    #[arg(long, requires = "from")]
    claim: bool,
    /// Drops state of operators the job does not have instead of refusing to start.
    #[arg(long)]
    allow_non_restored_state: bool,
    /// Where savepoints go: the default directory of `rockstate savepoint trigger`, and
    /// (harness) where the final savepoint goes when the job is stopped by SIGTERM or
    /// SIGINT.
    #[arg(long, value_name = "URL")]
    savepoint_dir: Option<String>,
    /// Format of that savepoint.
    #[arg(long, value_enum, default_value = "canonical")]
    savepoint_format: crate::args::FormatArg,
    /// Directory for the subtasks' local RocksDB state (default: a temporary directory,
    /// removed at exit). It must be new, empty, or one a previous run used (rockstate
    /// marks it with a .rockstate-scratch file); only then is it emptied at start. A
    /// directory holding other files is refused and left as it is.
    #[arg(long, value_name = "DIR")]
    local_dir: Option<PathBuf>,
    /// Checkpoints the job keeps (at least 1).
    #[arg(long, default_value_t = 2, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    retained: u32,
    /// How often the job's status document (`rockstate status`) is rewritten when
    /// nothing changed, e.g. `10s`; a status not refreshed for three of these is stale.
    #[arg(long, default_value = "10s", value_parser = format::parse_duration, value_name = "INTERVAL")]
    status_interval: std::time::Duration,
    /// Serves metrics in the Prometheus text format at http://ADDR/metrics while the job
    /// runs (checkpoints, sync pauses, bytes, restores, RocksDB's own figures), e.g.
    /// `127.0.0.1:9184`. RocksDB then also keeps its statistics counters (block cache
    /// hits and misses, stall time), which cost about 4% of the job's events/s.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Prints one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// What runs the job: the built-in harness (threads in this process) or timely
    /// dataflow (workers in one or more processes, which are then the subtasks:
    /// --parallelism is ignored).
    #[arg(long, value_enum, default_value = "harness")]
    engine: Engine,
    /// (timely) Worker threads in this process.
    #[arg(long, value_name = "THREADS", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// (timely) Number of processes.
    #[arg(long, value_name = "PROCESSES", value_parser = clap::value_parser!(u32).range(1..))]
    processes: Option<u32>,
    /// (timely) This process's index, from 0.
    #[arg(long, value_name = "INDEX")]
    process: Option<u32>,
    /// (timely) A file with one host:port per line, in process order (default:
    /// localhost:2101, localhost:2102, ...).
    #[arg(long, value_name = "HOSTFILE")]
    hostfile: Option<PathBuf>,
}

/// The timely flags, with their defaults (1 thread, 1 process, process 0).
struct TimelyFlags {
    threads: u32,
    processes: u32,
    process: u32,
}

impl DemoArgs {
    fn timely(&self) -> TimelyFlags {
        TimelyFlags {
            threads: self.threads.unwrap_or(1),
            processes: self.processes.unwrap_or(1),
            process: self.process.unwrap_or(0),
        }
    }

    /// Refuses timely flags given to the harness engine, where they would be ignored.
    fn refuse_timely_flags(&self) -> rockstate::Result<()> {
        let given: Vec<&str> = [
            ("--threads", self.threads.is_some()),
            ("--processes", self.processes.is_some()),
            ("--process", self.process.is_some()),
            ("--hostfile", self.hostfile.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(flag, _)| flag)
        .collect();
        if given.is_empty() {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "{} only apply to --engine timely (the harness runs --parallelism subtasks in this process)",
            given.join(", ")
        )))
    }
}

/// Engines of `rockstate demo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// The in-process harness.
    Harness,
    /// Timely dataflow.
    Timely,
}

/// `--claim` and `--allow-non-restored-state` as restore options.
fn restore_options(args: &DemoArgs) -> RestoreOptions {
    RestoreOptions {
        mode: if args.claim {
            RestoreMode::Claim
        } else {
            RestoreMode::NoClaim
        },
        allow_non_restored_state: args.allow_non_restored_state,
        ..RestoreOptions::default()
    }
}

/// A fresh start must not overwrite a job that already has checkpoints.
fn refuse_existing(
    runtime: &tokio::runtime::Runtime,
    job: &CheckpointStorage,
    job_id: &str,
) -> rockstate::Result<()> {
    match runtime.block_on(job.latest_completed())? {
        Some(meta) => Err(Error::invalid(format!(
            "job {job_id:?} already has checkpoint {} in {}: pass --resume to continue it, --from URL to start from a snapshot, or another --job-id",
            meta.checkpoint_id,
            job.url()
        ))),
        None => Ok(()),
    }
}

/// For a timely job: on the first SIGTERM or SIGINT, writes `command` (a stop) as a
/// control request into the job's storage and records its id in `asked`; the job's
/// coordinator, in whichever process it runs, makes every worker stop. A second signal,
/// or a signal when checkpoints are off (nothing coordinates), ends the process at once
/// (exit 130).
fn watch_signals_timely(
    runtime: &tokio::runtime::Runtime,
    job: CheckpointStorage,
    coordinated: bool,
    command: ControlCommand,
    asked: Arc<parking_lot::Mutex<Option<String>>>,
) -> rockstate::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let _guard = runtime.enter();
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| Error::io("watch for SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("watch for SIGINT", e))?;
    runtime.spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if !coordinated {
            eprintln!("rockstate: stopped by a signal (no checkpoints to keep)");
            std::process::exit(130);
        }
        eprintln!("stop signal received: asking every process of the job to stop");
        match control::submit(&job, command, Duration::from_secs(600)).await {
            Ok(id) => *asked.lock() = Some(id),
            Err(e) => {
                eprintln!(
                    "rockstate: cannot ask the job to stop: {}",
                    crate::common::one_line(&e.report().to_string())
                );
                std::process::exit(130);
            }
        }
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!(
            "rockstate: second stop signal: ending at once; resume from the latest checkpoint"
        );
        std::process::exit(130);
    });
    Ok(())
}

/// Sets `stop` on the first SIGTERM or SIGINT.
fn watch_signals(
    runtime: &tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
) -> rockstate::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let _guard = runtime.enter();
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| Error::io("watch for SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("watch for SIGINT", e))?;
    runtime.spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop.store(true, Ordering::SeqCst);
        // A second signal does not wait for the savepoint: the job ends at once, as after
        // a crash, and resumes from its latest checkpoint.
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("rockstate: second stop signal, exiting without a savepoint");
        std::process::exit(130);
    });
    Ok(())
}

/// Prints the checkpoints completed since the last call.
fn report_checkpoints<S: rockstate_harness::Source>(
    harness: &Harness<S>,
    reported: &mut usize,
    progress: &Progress,
) where
    S::Key: serde::Serialize + Send + 'static,
    S::Value: Send + 'static,
{
    let completed = harness.completed_checkpoints();
    if completed.len() <= *reported {
        return;
    }
    let latest = harness.latest_checkpoint();
    for id in &completed[*reported..] {
        let detail = latest
            .as_ref()
            .filter(|m| m.checkpoint_id == *id)
            .map(|m| {
                format!(
                    ": {} in total, {} uploaded",
                    format::bytes(m.total_size()),
                    format::bytes(m.uploaded_bytes())
                )
            })
            .unwrap_or_default();
        progress.println(&format!("checkpoint {id} completed{detail}"));
    }
    *reported = completed.len();
}

/// Serves the metrics at `addr` (from a thread of the exporter's own).
fn serve_metrics(addr: Option<std::net::SocketAddr>) -> rockstate::Result<()> {
    let Some(addr) = addr else {
        return Ok(());
    };
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| Error::invalid(format!("cannot serve metrics on {addr}: {e}")))?;
    rockstate::telemetry::describe();
    eprintln!("metrics at http://{addr}/metrics");
    Ok(())
}

pub fn run(args: DemoArgs) -> rockstate::Result<u8> {
    serve_metrics(args.metrics_addr)?;
    if args.engine == Engine::Timely {
        return timely_engine(args);
    }
    args.refuse_timely_flags()?;
    rockstate::keygroup::validate_parallelism(args.parallelism, args.max_parallelism)?;
    let source = DemoSource::new(args.seed, args.keys, args.events)?;
    let runtime = crate::common::runtime()?;
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(&runtime, stop.clone())?;

    // The snapshot to start from is opened before anything is created: a bad --from
    // leaves no directory behind.
    let from = args
        .from
        .as_deref()
        .map(|url| runtime.block_on(RestoreSource::open(url)))
        .transpose()?;
    let storage = CheckpointStorage::open(&args.checkpoint_dir)?;
    let job = storage.child(&args.job_id)?;
    let savepoint_dir = args
        .savepoint_dir
        .as_deref()
        .map(CheckpointStorage::open)
        .transpose()?;
    let start = if args.resume {
        StartFrom::Latest
    } else if let Some(source) = from {
        StartFrom::Snapshot {
            source: Box::new(source),
            options: restore_options(&args),
        }
    } else {
        refuse_existing(&runtime, &job, &args.job_id)?;
        StartFrom::Empty
    };

    let temp;
    let local_root = match &args.local_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("rockstate-demo-")
                .tempdir()
                .map_err(|e| Error::io("create a temporary directory", e))?;
            temp.path().to_path_buf()
        }
    };
    let config = HarnessConfig {
        job_id: args.job_id.clone(),
        operator_uid: DEMO_UID.into(),
        parallelism: args.parallelism,
        max_parallelism: args.max_parallelism,
        local_root,
        checkpoint_interval: args.checkpoint_interval,
        memory_budget: 64 << 20,
        rocksdb_statistics: args.metrics_addr.is_some(),
        coordinator: CoordinatorOptions {
            num_retained: args.retained as usize,
            // Also where `rockstate savepoint trigger JOB` (no directory) puts savepoints.
            savepoints_dir: args.savepoint_dir.clone(),
            status_heartbeat: args.status_interval,
            ..CoordinatorOptions::default()
        },
    };
    let started = Instant::now();
    // A progress line while a large state is restored.
    let restore_total = match &start {
        StartFrom::Latest => runtime
            .block_on(job.latest_completed())?
            .map_or(0, |m| m.total_size()),
        StartFrom::Snapshot { source, .. } => source.metadata().total_size(),
        _ => 0,
    };
    let mut harness = crate::progress::while_transferring(
        "restore",
        restore_total,
        crate::progress::Transfer::Restored,
        || Harness::start(config, &storage, source, Counter::factory(), start),
    )?;
    let restored_from = harness.restored_location().map(str::to_string);
    let already: u64 = harness.position().offsets().iter().sum();
    eprintln!(
        "job {:?}: {} subtasks, {} key groups, {} of {} events left, checkpoints in {}{}",
        args.job_id,
        args.parallelism,
        args.max_parallelism,
        args.events.saturating_sub(already),
        args.events,
        job.url(),
        restored_from
            .as_deref()
            .map(|u| format!(", restored from {u}"))
            .unwrap_or_default()
    );
    let progress = Progress::items("events", args.events);
    progress.set(already);
    let mut reported = 0;
    let mut signalled = false;
    let mut requested_stop = None;
    let mut polled = Instant::now();
    let mut ran = 0u64;
    loop {
        if stop.load(Ordering::SeqCst) {
            signalled = true;
            break;
        }
        let chunk = if args.rate == 0 {
            CHUNK
        } else {
            CHUNK.min(args.rate / 20).max(1)
        };
        let n = harness.run(chunk)?;
        ran += n;
        if args.rate > 0 {
            // A live source: records arrive at --rate.
            let due = Duration::from_secs_f64(ran as f64 / args.rate as f64);
            let early = due.saturating_sub(started.elapsed());
            std::thread::sleep(early.min(Duration::from_millis(100)));
        }
        progress.set(harness.position().offsets().iter().sum());
        report_checkpoints(&harness, &mut reported, &progress);
        // Requests of `rockstate savepoint trigger` and `rockstate stop`.
        if polled.elapsed() >= CONTROL_POLL {
            polled = Instant::now();
            if let Some(stop) = harness.poll_control()? {
                requested_stop = Some(stop);
                break;
            }
        }
        if n < chunk {
            break;
        }
    }
    let mut savepoint = None;
    let stopped_by = if requested_stop.is_some() {
        "request"
    } else if signalled {
        "signal"
    } else {
        "end"
    };
    let finished: Finished = if let Some(request) = requested_stop {
        progress.println("stop requested");
        let (sp, finished) = harness.stop_on_request(request)?;
        if let Some(sp) = sp {
            progress.println(&format!("savepoint written to {}", sp.url));
            savepoint = Some(sp.url);
        }
        finished
    } else if signalled {
        progress.println("stop signal received");
        match &savepoint_dir {
            Some(dir) => {
                let format = crate::args::savepoint_format(args.savepoint_format);
                let estimate = harness.latest_checkpoint().map_or(0, |m| m.total_size());
                let (sp, finished) = crate::progress::while_transferring(
                    "savepoint",
                    estimate,
                    crate::progress::Transfer::Stored,
                    || harness.stop_with_savepoint(Some(dir), format),
                )?;
                progress.println(&format!("savepoint written to {}", sp.url));
                savepoint = Some(sp.url);
                finished
            }
            None => harness.cancel()?,
        }
    } else {
        harness.finish()?
    };
    progress.finish();
    for id in finished.completed.iter().skip(reported) {
        eprintln!("checkpoint {id} completed");
    }
    let digest = rockstate_harness::demo::state_digest(&finished.backends)?;
    let last_checkpoint = finished
        .last_checkpoint
        .as_ref()
        .map(|m| job.url_of(&format!("chk-{}", m.checkpoint_id)));
    let elapsed = started.elapsed();
    let mut cache = rockstate::ValueCacheStats::default();
    for backend in &finished.backends {
        let stats = backend.value_cache_stats();
        cache.lookups += stats.lookups;
        cache.hits += stats.hits;
        cache.evictions += stats.evictions;
        cache.pauses += stats.pauses;
    }
    for backend in finished.backends {
        backend.close()?;
    }
    let upload_max = finished.uploaded.iter().copied().max().unwrap_or(0);
    let upload_mean = finished.uploaded.iter().sum::<u64>() / finished.uploaded.len().max(1) as u64;
    if args.json {
        print_json(&json!({
            "job_id": args.job_id,
            "parallelism": args.parallelism,
            "max_parallelism": args.max_parallelism,
            "events_processed": finished.events,
            "events_total": args.events,
            "checkpoints_completed": finished.completed.len(),
            "upload_mean_bytes": upload_mean,
            "upload_max_bytes": upload_max,
            "last_checkpoint": last_checkpoint,
            "restored_from": restored_from,
            "savepoint": savepoint,
            "stopped_by": stopped_by,
            "state_digest": digest.to_string(),
            "state_entries": digest.entries,
            "elapsed_ms": elapsed.as_millis() as u64,
            "value_cache_lookups": cache.lookups,
            "value_cache_hits": cache.hits,
            "value_cache_evictions": cache.evictions,
            "value_cache_pauses": cache.pauses,
        }));
    } else {
        println!(
            "processed {} events in {:.1} s ({:.0} events/s), {} checkpoints completed{}",
            finished.events,
            elapsed.as_secs_f64(),
            finished.events as f64 / elapsed.as_secs_f64().max(1e-3),
            finished.completed.len(),
            match stopped_by {
                "end" => String::new(),
                by => format!(", stopped by {by}"),
            }
        );
        if let Some(url) = &last_checkpoint {
            println!("latest checkpoint: {url}");
        }
        if let Some(url) = &savepoint {
            println!("savepoint: {url}");
        }
        println!("state digest: {digest} ({} entries)", digest.entries);
    }
    Ok(exit::OK)
}

/// The timely cluster configuration of the flags.
fn timely_config(args: &DemoArgs) -> rockstate::Result<timely::Config> {
    let t = args.timely();
    if t.process >= t.processes {
        return Err(Error::invalid(format!(
            "--process {} is not below --processes {}",
            t.process, t.processes
        )));
    }
    let communication = if t.processes == 1 {
        timely::CommunicationConfig::Process(t.threads as usize)
    } else {
        let addresses: Vec<String> = match &args.hostfile {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| Error::io(format!("read the host file {}", path.display()), e))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
            None => (0..t.processes)
                .map(|i| format!("localhost:{}", 2101 + i))
                .collect(),
        };
        if addresses.len() < t.processes as usize {
            return Err(Error::invalid(format!(
                "the host file lists {} addresses for {} processes",
                addresses.len(),
                t.processes
            )));
        }
        timely::CommunicationConfig::Cluster {
            threads: t.threads as usize,
            process: t.process as usize,
            addresses: addresses[..t.processes as usize].to_vec(),
            report: false,
            zerocopy: false,
        }
    };
    Ok(timely::Config {
        communication,
        worker: timely::WorkerConfig::default(),
    })
}

/// `rockstate demo --engine timely`.
fn timely_engine(args: DemoArgs) -> rockstate::Result<u8> {
    use rockstate_timely::{demo as timely_demo, JobConfig, Start};

    let config = timely_config(&args)?;
    let t = args.timely();
    let workers = t.threads * t.processes;
    rockstate::keygroup::validate_parallelism(workers, args.max_parallelism)?;
    let source = DemoSource::new(args.seed, args.keys, args.events)?;
    let runtime = crate::common::runtime()?;
    if let Some(url) = &args.from {
        runtime.block_on(RestoreSource::open(url))?;
    }
    let storage = CheckpointStorage::open(&args.checkpoint_dir)?;
    let job = storage.child(&args.job_id)?;
    let start = if args.resume {
        Start::Latest
    } else if let Some(url) = &args.from {
        Start::Snapshot {
            url: url.clone(),
            options: restore_options(&args),
        }
    } else {
        // Worker 0 decides where the job starts; only its process checks (another
        // process may start after the first checkpoint completed).
        if t.process == 0 {
            refuse_existing(&runtime, &job, &args.job_id)?;
        }
        Start::Empty
    };
    // A stop signal asks the whole job (every process) to stop, through a stop request
    // in its storage, after a savepoint when --savepoint-dir is set.
    let savepoint_dir = args
        .savepoint_dir
        .clone()
        .map(|dir| crate::args::directory_url(Some(dir)))
        .transpose()?
        .flatten();
    let asked: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    watch_signals_timely(
        &runtime,
        job.clone(),
        args.checkpoint_interval > 0,
        ControlCommand::Stop {
            savepoint_dir: savepoint_dir.clone(),
            format: crate::args::savepoint_format(args.savepoint_format),
        },
        asked.clone(),
    )?;
    let temp;
    let local_root = match &args.local_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("rockstate-demo-")
                .tempdir()
                .map_err(|e| Error::io("create a temporary directory", e))?;
            temp.path().to_path_buf()
        }
    };
    let mut job_config = JobConfig::new(storage, &args.job_id, local_root);
    job_config.max_parallelism = args.max_parallelism;
    job_config.memory_budget = 64 << 20;
    job_config.rocksdb_statistics = args.metrics_addr.is_some();
    job_config.start = start;
    job_config.coordinator.num_retained = args.retained as usize;
    job_config.coordinator.status_heartbeat = args.status_interval;
    job_config.coordinator.savepoints_dir = savepoint_dir;
    eprintln!(
        "job {:?} on timely: process {} of {}, {} workers in all, {} key groups, checkpoints in {}",
        args.job_id,
        t.process,
        t.processes,
        workers,
        args.max_parallelism,
        job.url()
    );
    let report = timely_demo::run(
        config,
        timely_demo::DemoRun {
            rate: args.rate,
            source,
            checkpoint_interval: args.checkpoint_interval,
            job: job_config,
        },
    )?;
    // This process asked for the stop: its answer holds the savepoint.
    let mut savepoint = None;
    let mut stopped_by = if report.stopped { "request" } else { "end" };
    let request = asked.lock().take();
    if let Some(id) = request {
        stopped_by = "signal";
        // The job ended on its own before it took the request: nobody will answer.
        // A savepoint of a large state takes a while.
        let wait = if report.stopped {
            Duration::from_secs(600)
        } else {
            Duration::from_secs(2)
        };
        match runtime.block_on(control::wait_for_answer(
            &job,
            &id,
            wait,
            Duration::from_millis(200),
        ))? {
            control::Outcome::Answered(control::Answer::Stopped { savepoint: url }) => {
                if let Some(url) = &url {
                    eprintln!("savepoint written to {url}");
                }
                savepoint = url;
            }
            control::Outcome::Answered(control::Answer::Failed { message, .. }) => {
                return Err(Error::Internal(format!(
                    "the job stopped, but its savepoint failed: {}",
                    crate::common::one_line(&message)
                )));
            }
            other => tracing::warn!(?other, "no answer to this process's stop request"),
        }
    }
    let last_checkpoint = report
        .last_checkpoint
        .map(|id| job.url_of(&format!("chk-{id}")));
    let elapsed = report.elapsed;
    let rate = report.events as f64 / elapsed.as_secs_f64().max(1e-3);
    if args.json {
        print_json(&json!({
            "job_id": args.job_id,
            "engine": "timely",
            "parallelism": report.workers,
            "processes": t.processes,
            "process": t.process,
            "max_parallelism": args.max_parallelism,
            "events_processed": report.events,
            "events_total": args.events,
            "checkpoints_completed": report.checkpoints_completed,
            "checkpoints_failed": report.checkpoints_failed,
            "last_checkpoint": last_checkpoint,
            "restored_from": report.restored_from,
            "savepoint": savepoint,
            "stopped_by": stopped_by,
            "state_digest": report.digest.to_string(),
            "state_entries": report.digest.entries,
            "events_per_second": rate.round(),
            "max_sync_pause_us": report.max_sync.as_micros() as u64,
            "mean_sync_pause_us": report.mean_sync.as_micros() as u64,
            "elapsed_ms": elapsed.as_millis() as u64,
        }));
    } else {
        println!(
            "processed {} events on {} workers in {:.1} s ({:.0} events/s), {} checkpoints completed",
            report.events,
            report.workers,
            elapsed.as_secs_f64(),
            rate,
            report.checkpoints_completed,
        );
        if let Some(url) = &last_checkpoint {
            println!("latest checkpoint: {url}");
        }
        println!(
            "state digest: {} ({} entries)",
            report.digest, report.digest.entries
        );
    }
    Ok(exit::OK)
}
