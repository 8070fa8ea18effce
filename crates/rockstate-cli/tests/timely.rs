//! The demo job on timely dataflow: several processes talking over TCP, one killed with
//! SIGKILL mid-run, the job resumed by a different number of processes; and a run whose
//! storage delays every write, checking that no worker reuses files of a checkpoint
//! before it is confirmed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{run_env, Run, BIN};
use object_store::local::LocalFileSystem;
use rockstate::testing::{Faults, FaultyStore, Op};
use rockstate::CheckpointStorage;
use rockstate_harness::demo::DemoSource;
use rockstate_timely::{demo, JobConfig, Start};

const EVENTS: &str = "600000";
const KEYS: &str = "2000";
const SEED: &str = "7";
const INTERVAL: &str = "10000";

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn hostfile(dir: &Path, name: &str, processes: usize) -> String {
    let path = dir.join(name);
    let lines: Vec<String> = free_ports(processes)
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path.display().to_string()
}

/// `rockstate demo --engine timely` as process `index` of `processes`.
#[allow(clippy::too_many_arguments)]
fn spawn_worker_process(
    checkpoint_dir: &str,
    hosts: &str,
    threads: u32,
    processes: u32,
    index: u32,
    resume: bool,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "demo",
        "--engine",
        "timely",
        "--threads",
        &threads.to_string(),
        "--processes",
        &processes.to_string(),
        "--process",
        &index.to_string(),
        "--hostfile",
        hosts,
        "--checkpoint-dir",
        checkpoint_dir,
        "--events",
        EVENTS,
        "--keys",
        KEYS,
        "--seed",
        SEED,
        "--checkpoint-interval",
        INTERVAL,
        "--json",
    ]);
    if resume {
        cmd.arg("--resume");
    }
    cmd.args(extra);
    cmd.env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("cannot start rockstate")
}

/// Waits for `child` (killing it at the deadline); fails the test when its stderr shows
/// a panic, unless `peer_killed` (a process whose peer was killed under it).
fn wait_with_deadline(mut child: Child, limit: Duration, peer_killed: bool) -> Run {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    if peer_killed {
        Run::unchecked(output, None)
    } else {
        Run::from_output(output, None)
    }
}

/// The digest of an uninterrupted run of the same stream on the harness, in one process.
fn reference_digest(dir: &Path) -> String {
    let url = dir.join("reference").display().to_string();
    let out = run_env(
        &[
            "demo",
            "--checkpoint-dir",
            &url,
            "--events",
            EVENTS,
            "--keys",
            KEYS,
            "--seed",
            SEED,
            "--checkpoint-interval",
            "0",
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", out.context());
    out.json()["state_digest"].as_str().unwrap().to_string()
}

/// Two processes of two workers; process 1 is killed once a checkpoint completed;
/// three processes of one worker resume from the latest checkpoint.
fn kill_one_process_then_resume_on_three(dir: &Path, checkpoint_dir: &str, env: &[(&str, &str)]) {
    let job = format!("{checkpoint_dir}/demo");
    let hosts = hostfile(dir, "hosts-2", 2);
    let p0 = spawn_worker_process(checkpoint_dir, &hosts, 2, 2, 0, false, env, &[]);
    let p1 = spawn_worker_process(checkpoint_dir, &hosts, 2, 2, 1, false, env, &[]);
    // Wait for a completed checkpoint, then kill process 1.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let latest = run_env(&["latest", &job], env);
        if latest.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint completed in time");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut p1 = p1;
    unsafe {
        libc::kill(p1.id() as i32, libc::SIGKILL);
    }
    let _ = p1.wait();
    // Process 0 loses its peer and stops (or is stopped).
    let out0 = wait_with_deadline(p0, Duration::from_secs(30), true);
    assert!(
        !out0.status.success(),
        "process 0 finished although its peer was killed:\n{}",
        out0.context()
    );

    let hosts = hostfile(dir, "hosts-3", 3);
    let children: Vec<Child> = (0..3)
        .map(|i| spawn_worker_process(checkpoint_dir, &hosts, 1, 3, i, true, env, &[]))
        .collect();
    let outputs: Vec<Run> = children
        .into_iter()
        .map(|c| wait_with_deadline(c, Duration::from_secs(300), false))
        .collect();
    let expected = reference_digest(dir);
    for (i, out) in outputs.iter().enumerate() {
        assert!(out.status.success(), "process {i}: {}", out.context());
        let report = out.json();
        assert_eq!(report["parallelism"], 3, "{report}");
        assert_eq!(
            report["state_digest"].as_str().unwrap(),
            expected,
            "process {i} ends in another state than an uninterrupted run: {report}"
        );
        assert!(
            report["restored_from"].as_str().is_some(),
            "process {i} did not resume: {report}"
        );
        let processed = report["events_processed"].as_u64().unwrap();
        assert!(
            processed < EVENTS.parse::<u64>().unwrap(),
            "the resumed run replayed everything: {report}"
        );
        assert!(report["last_checkpoint"].as_str().is_some(), "{report}");
    }
    // The final checkpoint is sound.
    let latest = run_env(&["latest", &job], env);
    let url = latest.line().to_string();
    let verify = run_env(&["verify", &url], env);
    assert!(verify.status.success(), "{}", verify.context());
}

#[test]
fn processes_killed_and_resumed_on_local_files() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = dir.path().join("checkpoints").display().to_string();
    kill_one_process_then_resume_on_three(dir.path(), &checkpoints, &[]);
}

#[test]
fn processes_killed_and_resumed_on_s3() {
    let server = rockstate::testing::s3::S3Server::start("rockstate-timely");
    let env = [
        ("AWS_ENDPOINT", server.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    let dir = tempfile::tempdir().unwrap();
    kill_one_process_then_resume_on_three(dir.path(), "s3://rockstate-timely/jobs", &env);
}

/// Every write to storage waits up to 250 ms, so completions reach the workers late and
/// several checkpoints are in flight at once. No snapshot may reference a shared file
/// uploaded by a checkpoint that its worker had not seen completed.
#[test]
fn workers_reuse_only_files_of_confirmed_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let inner = Arc::new(LocalFileSystem::new_with_prefix(&store_dir).unwrap());
    let faulty = FaultyStore::new(inner.clone(), 0x7171)
        .with(
            Op::Put,
            Faults {
                delay: 1.0,
                ..Faults::default()
            },
        )
        .with_times(Duration::from_millis(250), Duration::from_millis(1));
    let storage = CheckpointStorage::from_store(Arc::new(faulty), "faulty://store");
    let mut job = JobConfig::new(storage.clone(), "delayed", dir.path().join("local"));
    job.start = Start::Empty;
    // Keep every completed checkpoint, to inspect them afterwards.
    job.coordinator.num_retained = 10_000;
    // Every write waits 250 ms: on a loaded machine the final checkpoint can take longer
    // than the default timeout, and the test is about which files are reused, not speed.
    job.coordinator.timeout = Duration::from_secs(600);
    job.max_uploads = 4;
    let report = demo::run(
        timely::Config::process(3),
        demo::DemoRun {
            rate: 0,
            source: DemoSource::new(3, 3_000, 240_000).unwrap(),
            checkpoint_interval: 4_000,
            job,
        },
    )
    .unwrap();
    assert!(report.checkpoints_completed >= 5, "{report:?}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let found = runtime
        .block_on(storage.child("delayed").unwrap().checkpoints())
        .unwrap();
    let completed: BTreeMap<u64, _> = found
        .completed
        .iter()
        .map(|m| (m.checkpoint_id, m))
        .collect();
    // (checkpoint, worker) -> newest checkpoint confirmed to that worker when it
    // snapshotted.
    let mut bases = BTreeMap::new();
    for worker in &report.local {
        for (id, uid, base) in &worker.bases {
            assert_eq!(uid, "counter");
            bases.insert((*id, worker.index), *base);
        }
    }
    let mut lagging = 0;
    let mut reused = 0;
    for (id, meta) in &completed {
        let op = meta.operator("counter").unwrap();
        for (subtask, snapshot) in op.subtasks.iter().enumerate() {
            let handle = snapshot.keyed.as_ref().unwrap().as_files().unwrap();
            let base = bases[&(*id, subtask as u32)];
            if let Some(b) = base {
                assert!(
                    completed.contains_key(&b) || found.completed.is_empty(),
                    "worker {subtask} based checkpoint {id} on {b}, which never completed"
                );
                if b + 1 < *id {
                    lagging += 1;
                }
            }
            for file in handle.shared.iter() {
                if file.uploaded_by == *id {
                    continue;
                }
                reused += 1;
                let b = base.unwrap_or_else(|| {
                    panic!(
                        "checkpoint {id}, worker {subtask}: reuses {} (of checkpoint {}) without any confirmed checkpoint",
                        file.path, file.uploaded_by
                    )
                });
                assert!(
                    file.uploaded_by <= b,
                    "checkpoint {id}, worker {subtask}: reuses {} of checkpoint {}, but only checkpoint {b} was confirmed",
                    file.path,
                    file.uploaded_by
                );
            }
        }
    }
    assert!(reused > 0, "no file was reused: the check proves nothing");
    assert!(
        lagging > 0,
        "completions were never late: the delays did not open the window under test"
    );
    // Workers learned of a completion only after its _metadata existed.
    for worker in &report.local {
        for (id, learned_ms) in &worker.learned {
            if let Some(meta) = completed.get(id) {
                assert!(
                    *learned_ms >= meta.completed_at_ms,
                    "worker {} learned of checkpoint {id} before it completed",
                    worker.index
                );
            }
        }
    }
    let seen: BTreeSet<u64> = report
        .local
        .iter()
        .flat_map(|w| w.completed.clone())
        .collect();
    assert!(seen.contains(&report.last_checkpoint.unwrap()));
}

/// Waits until the job in `job` has a completed checkpoint.
fn wait_for_checkpoint(job: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !run_env(&["latest", job], &[]).status.success() {
        assert!(Instant::now() < deadline, "no checkpoint completed in time");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The digest of a harness run at `parallelism` started from the savepoint `url`.
fn digest_from(dir: &Path, url: &str, job_id: &str, parallelism: &str) -> String {
    let out = run_env(
        &[
            "demo",
            "--checkpoint-dir",
            &dir.join("restored").display().to_string(),
            "--job-id",
            job_id,
            "--from",
            url,
            "--parallelism",
            parallelism,
            "--events",
            EVENTS,
            "--keys",
            KEYS,
            "--seed",
            SEED,
            "--checkpoint-interval",
            "0",
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", out.context());
    let report = out.json();
    assert_eq!(report["restored_from"].as_str(), Some(url), "{report}");
    report["state_digest"].as_str().unwrap().to_string()
}

/// A two-process timely job operated from other processes while it runs: a savepoint
/// triggered through its storage, then `stop --savepoint`; then a second run stopped by
/// SIGTERM to one of its processes.
///
/// Proves: the savepoints are made while the job runs (it goes on), both processes stop
/// on the request at the same epoch (exit 0, `stopped_by` "request"), the signalled
/// process prints the final savepoint, and every savepoint restored on the harness at
/// another parallelism ends in the digest of an uninterrupted run.
#[test]
fn a_two_process_job_takes_savepoints_and_stops_on_request_and_on_signal() {
    let dir = tempfile::tempdir().unwrap();
    let savepoints = dir.path().join("savepoints");
    let sp = savepoints.display().to_string();
    // A live source: 600 000 records at 20 000 a second would take 30 s.
    let extra = ["--rate", "20000", "--savepoint-dir", sp.as_str()];
    let expected = reference_digest(dir.path());

    let cp = dir.path().join("requests").display().to_string();
    let job = format!("{cp}/demo");
    let hosts = hostfile(dir.path(), "hosts-requests", 2);
    let p0 = spawn_worker_process(&cp, &hosts, 1, 2, 0, false, &[], &extra);
    let p1 = spawn_worker_process(&cp, &hosts, 1, 2, 1, false, &[], &extra);
    wait_for_checkpoint(&job);
    // Two requests at once: both answered, one savepoint each (written one after the other).
    let (trigger, other) = std::thread::scope(|scope| {
        let a = scope.spawn(|| run_env(&["savepoint", "trigger", &job, "--wait", "120s"], &[]));
        let b = scope.spawn(|| run_env(&["savepoint", "trigger", &job, "--wait", "120s"], &[]));
        (a.join().unwrap(), b.join().unwrap())
    });
    trigger.expect(0);
    other.expect(0);
    assert_ne!(trigger.line(), other.line());
    run_env(&["verify", other.line()], &[]).expect(0);
    let first = trigger.line().to_string();
    assert!(first.contains("/savepoints/savepoint-demo-"), "{first}");
    run_env(&["verify", &first], &[]).expect(0);
    let stop = run_env(
        &[
            "stop",
            &job,
            "--savepoint",
            &sp,
            "--format",
            "native",
            "--wait",
            "120s",
        ],
        &[],
    );
    stop.expect(0);
    let last = stop.line().to_string();
    assert_ne!(first, last);
    for (i, child) in [p0, p1].into_iter().enumerate() {
        let out = wait_with_deadline(child, Duration::from_secs(120), false);
        assert!(out.status.success(), "process {i}: {}", out.context());
        let report = out.json();
        assert_eq!(report["stopped_by"], "request", "process {i}: {report}");
        assert!(
            report["events_processed"].as_u64().unwrap() < EVENTS.parse::<u64>().unwrap(),
            "process {i} ran to the end: {report}"
        );
    }
    assert_eq!(
        digest_from(dir.path(), &first, "from-trigger", "3"),
        expected
    );
    assert_eq!(digest_from(dir.path(), &last, "from-stop", "1"), expected);
    // And on timely again, on one process of three workers.
    let out = run_env(
        &[
            "demo",
            "--engine",
            "timely",
            "--threads",
            "3",
            "--checkpoint-dir",
            &dir.path().join("restored").display().to_string(),
            "--job-id",
            "timely-from-stop",
            "--from",
            &last,
            "--events",
            EVENTS,
            "--keys",
            KEYS,
            "--seed",
            SEED,
            "--checkpoint-interval",
            INTERVAL,
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", out.context());
    assert_eq!(out.json()["state_digest"].as_str(), Some(expected.as_str()));
    // Every request was answered and cleaned up by its client; only the workers'
    // agreement on the last epoch stays, for the next run to remove.
    let control = Path::new(&job).join("_control");
    let left: Vec<_> = std::fs::read_dir(&control)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.iter().all(|name| name == "stop"),
        "left in {control:?}: {left:?}"
    );

    let cp = dir.path().join("signal").display().to_string();
    let job = format!("{cp}/demo");
    let hosts = hostfile(dir.path(), "hosts-signal", 2);
    let p0 = spawn_worker_process(&cp, &hosts, 1, 2, 0, false, &[], &extra);
    let p1 = spawn_worker_process(&cp, &hosts, 1, 2, 1, false, &[], &extra);
    wait_for_checkpoint(&job);
    unsafe {
        libc::kill(p1.id() as i32, libc::SIGTERM);
    }
    let out1 = wait_with_deadline(p1, Duration::from_secs(120), false);
    let out0 = wait_with_deadline(p0, Duration::from_secs(120), false);
    assert!(out0.status.success(), "{}", out0.context());
    assert!(out1.status.success(), "{}", out1.context());
    assert_eq!(out0.json()["stopped_by"], "request", "{}", out0.context());
    let report = out1.json();
    assert_eq!(report["stopped_by"], "signal", "{report}");
    let url = report["savepoint"]
        .as_str()
        .expect("the signalled process names the savepoint");
    assert!(url.contains("/savepoints/"), "{url}");
    assert_eq!(digest_from(dir.path(), url, "from-signal", "2"), expected);
}
