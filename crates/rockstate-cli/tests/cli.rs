//! End-to-end tests of the `rockstate` binary, run as child processes: crash and resume,
//! stop with a savepoint, verification of damaged snapshots, listings, error reporting,
//! the orphan sweep, and the same over S3.

mod common;

use common::*;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use object_store::ObjectStoreExt;
use serde_json::Value;

/// Parameters of every demo run whose digest is compared with the reference.
const EVENTS: u64 = 60_000;
const KEYS: u64 = 2_000;
const INTERVAL: u64 = 5_000;
const SEED: u64 = 7;

/// Asserts the error contract: nothing on stdout, exactly one line on stderr starting
/// with `rockstate: `, and exit 7 when it says something was not found, else 2.
fn assert_error_line(run: &Run, what: &str) {
    let expected = if run.stderr.starts_with("rockstate: not found:") {
        7
    } else {
        2
    };
    assert_eq!(
        run.code(),
        Some(expected),
        "{what}: exit code\n{}",
        run.context()
    );
    assert!(
        run.stdout.trim().is_empty(),
        "{what}: stdout\n{}",
        run.context()
    );
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "{what}: stderr lines\n{}", run.context());
    assert!(
        lines[0].starts_with("rockstate: "),
        "{what}: stderr prefix\n{}",
        run.context()
    );
}

/// Parses a `checkpoint N completed...` line of the demo's stderr.
fn checkpoint_line(line: &str) -> Option<u64> {
    let rest = line.trim().strip_prefix("checkpoint ")?;
    let (id, tail) = rest.split_once(' ')?;
    if tail.starts_with("completed") {
        id.parse().ok()
    } else {
        None
    }
}

/// How an interrupted run is stopped.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// SIGKILL, through `Child::kill`.
    Kill,
    /// Any other signal, through `kill(2)`.
    Signal(libc::c_int),
}

/// A run stopped from outside.
struct Interrupted {
    run: Run,
    /// Checkpoint ids announced on stderr before the stop was sent.
    seen: Vec<u64>,
}

/// Starts the binary, waits until stderr announced `after` completed checkpoints, waits
/// `pause_ms` more, then stops it with `stop` and collects its output.
fn interrupt(args: &[String], env: Env, after: usize, pause_ms: u64, stop: Stop) -> Interrupted {
    let mut child = command(args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the rockstate binary");
    let mut reader = BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut stderr = String::new();
    let mut seen = Vec::new();
    let mut line = String::new();
    while seen.len() < after {
        line.clear();
        if reader.read_line(&mut line).expect("read stderr") == 0 {
            break;
        }
        seen.extend(checkpoint_line(&line));
        stderr.push_str(&line);
    }
    std::thread::sleep(Duration::from_millis(pause_ms));
    match stop {
        Stop::Kill => child.kill().expect("SIGKILL"),
        Stop::Signal(signal) => {
            let pid = libc::pid_t::try_from(child.id()).expect("pid");
            // SAFETY: kill(2) with the pid of a child that has not been reaped yet.
            let rc = unsafe { libc::kill(pid, signal) };
            assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
        }
    }
    reader.read_to_string(&mut stderr).expect("read stderr");
    let output = child.wait_with_output().expect("wait for rockstate");
    let run = Run::from_output(output, Some(stderr));
    Interrupted { run, seen }
}

/// Asserts that an interrupted run died of SIGKILL (and so did not finish on its own).
fn assert_killed(killed: &Interrupted) {
    assert_eq!(
        killed.run.status.signal(),
        Some(libc::SIGKILL),
        "the job was not killed mid-run (it saw checkpoints {:?})\n{}",
        killed.seen,
        killed.run.context()
    );
}

// ---------------------------------------------------------------------------------------
// Demo runs
// ---------------------------------------------------------------------------------------

/// A canonical path for a new temporary directory (URLs printed by the binary use it).
fn temp_root() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonicalize tempdir");
    (dir, root)
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// Arguments of a demo run with the shared parameters, its local RocksDB state in a fresh
/// folder under `root`, plus `extra`.
fn demo_args(checkpoint_dir: &str, job_id: &str, root: &Path, extra: &[&str]) -> Vec<String> {
    static NEXT_LOCAL: AtomicUsize = AtomicUsize::new(0);
    let local = root.join(format!(
        "local-{job_id}-{}",
        NEXT_LOCAL.fetch_add(1, Ordering::Relaxed)
    ));
    let mut args: Vec<String> = [
        "demo",
        "--checkpoint-dir",
        checkpoint_dir,
        "--job-id",
        job_id,
        "--local-dir",
        path_str(&local),
        "--events",
        &EVENTS.to_string(),
        "--keys",
        &KEYS.to_string(),
        "--checkpoint-interval",
        &INTERVAL.to_string(),
        "--seed",
        &SEED.to_string(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The outcome of an uninterrupted run (parallelism 2) with the shared parameters.
struct Reference {
    digest: String,
    entries: u64,
}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let (_dir, root) = temp_root();
        let checkpoints = root.join("checkpoints");
        let run = run(&demo_args(
            path_str(&checkpoints),
            "reference",
            &root,
            &["--parallelism", "2"],
        ));
        run.expect(0);
        let doc = run.json();
        assert_eq!(doc["stopped_by"], "end", "{}", run.context());
        assert_eq!(doc["events_processed"], EVENTS, "{}", run.context());
        assert_eq!(doc["events_total"], EVENTS, "{}", run.context());
        assert_eq!(doc["parallelism"], 2);
        assert_eq!(doc["max_parallelism"], 128);
        assert!(doc["restored_from"].is_null(), "{}", run.context());
        assert!(doc["savepoint"].is_null(), "{}", run.context());
        assert!(doc["checkpoints_completed"].as_u64().unwrap() >= 1);
        assert!(doc["last_checkpoint"].is_string(), "{}", run.context());
        let digest = doc["state_digest"].as_str().unwrap().to_string();
        assert_eq!(digest.len(), 32, "digest {digest:?}");
        assert!(digest.chars().all(|c| c.is_ascii_hexdigit()), "{digest:?}");
        let entries = doc["state_entries"].as_u64().unwrap();
        assert!(entries > 0);
        // The job reads back what it wrote, three states per event: most reads are
        // answered from memory, which holds every key of this small state.
        let lookups = doc["value_cache_lookups"].as_u64().unwrap();
        let hits = doc["value_cache_hits"].as_u64().unwrap();
        assert_eq!(lookups, 3 * EVENTS, "{}", run.context());
        assert!(hits > lookups / 2, "{}", run.context());
        assert_eq!(doc["value_cache_evictions"], 0, "{}", run.context());
        assert_eq!(doc["value_cache_pauses"], 0, "{}", run.context());
        Reference { digest, entries }
    })
}

/// Asserts that a finished run ended with the reference state.
fn assert_reference_state(run: &Run) -> Value {
    let reference = reference();
    run.expect(0);
    let doc = run.json();
    assert_eq!(doc["stopped_by"], "end", "{}", run.context());
    assert_eq!(doc["events_total"], EVENTS, "{}", run.context());
    assert_eq!(
        doc["state_digest"].as_str(),
        Some(reference.digest.as_str()),
        "state differs from the uninterrupted run\n{}",
        run.context()
    );
    assert_eq!(
        doc["state_entries"].as_u64(),
        Some(reference.entries),
        "{}",
        run.context()
    );
    doc
}

/// The id of a `.../chk-N` URL.
fn checkpoint_id(url: &str) -> u64 {
    url.trim_end_matches('/')
        .rsplit_once("/chk-")
        .and_then(|(_, id)| id.parse().ok())
        .unwrap_or_else(|| panic!("not a checkpoint URL: {url:?}"))
}

/// The local path of a `file://` URL.
fn url_path(url: &str) -> PathBuf {
    PathBuf::from(
        url.strip_prefix("file://")
            .unwrap_or_else(|| panic!("not a file URL: {url:?}")),
    )
}

/// `rockstate latest`, which must find a checkpoint.
fn latest(job: &str, env: Env) -> String {
    let run = run_env(&["latest", job], env);
    run.expect(0);
    let url = run.line().to_string();
    assert!(!url.contains('\n'), "{}", run.context());
    checkpoint_id(&url);
    url
}

fn assert_sound(url: &str, env: Env) {
    let run = run_env(&["verify", url, "--json"], env);
    run.expect(0);
    let doc = run.json();
    assert_eq!(doc["sound"], true, "{}", run.context());
    assert!(doc["files"].as_u64().unwrap() > 1, "{}", run.context());
    assert_eq!(doc["bad"], Value::Array(vec![]), "{}", run.context());
}

/// A file of a snapshot, as `inspect --json` lists it.
#[derive(Debug, Clone)]
struct SnapshotFile {
    path: String,
    role: String,
    size: u64,
}

fn inspect(url: &str, env: Env) -> Value {
    let run = run_env(&["inspect", url, "--json"], env);
    run.expect(0);
    run.json()
}

fn snapshot_files(doc: &Value) -> Vec<SnapshotFile> {
    let mut files = Vec::new();
    for op in doc["operators"].as_array().expect("operators") {
        for sub in op["subtasks"].as_array().expect("subtasks") {
            if sub["keyed"].is_null() {
                continue;
            }
            for f in sub["keyed"]["files"].as_array().expect("files") {
                files.push(SnapshotFile {
                    path: f["path"].as_str().unwrap().to_string(),
                    role: f["role"].as_str().unwrap().to_string(),
                    size: f["size"].as_u64().unwrap(),
                });
            }
        }
    }
    files
}

/// All files under `dir`, relative to it.
fn list_files(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                let rel = path.strip_prefix(base).unwrap();
                out.insert(rel.to_str().unwrap().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

use rockstate::testing::SeededRng as Rng;

// ---------------------------------------------------------------------------------------
// Crash and resume
// ---------------------------------------------------------------------------------------

#[test]
fn kill_9_and_resume_at_other_parallelism_is_exactly_once() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let job = checkpoints.join("crashy");
    let job_url = path_str(&job);
    let mut rng = Rng::new(0x5eed_0001);
    let mut previous: Option<u64> = None;
    // Killed once at parallelism 2 from scratch, then again after resuming at parallelism 1.
    for (round, extra) in [
        vec!["--parallelism", "2"],
        vec!["--resume", "--parallelism", "1"],
    ]
    .into_iter()
    .enumerate()
    {
        let after = if round == 0 {
            rng.range(1, 4)
        } else {
            rng.range(1, 2)
        } as usize;
        let pause = rng.range(0, 20);
        let killed = interrupt(
            &demo_args(cp, "crashy", &root, &extra),
            NO_ENV,
            after,
            pause,
            Stop::Kill,
        );
        assert_killed(&killed);
        assert_eq!(killed.seen.len(), after, "{}", killed.run.context());

        let url = latest(job_url, NO_ENV);
        let id = checkpoint_id(&url);
        let newest_seen = *killed.seen.iter().max().unwrap();
        assert!(
            id >= newest_seen,
            "latest {url} is older than announced checkpoint {newest_seen}"
        );
        if let Some(previous) = previous {
            assert!(id > previous, "no progress after resuming: {url}");
        }
        previous = Some(id);
        assert!(url_path(&url).join("_metadata").is_file(), "{url}");
        let verify = run(&["verify", &url]);
        verify.expect(0);
        assert!(verify.stdout.contains("sound"), "{}", verify.context());
    }

    let url = latest(job_url, NO_ENV);
    let resumed = run(&demo_args(
        cp,
        "crashy",
        &root,
        &["--resume", "--parallelism", "3"],
    ));
    let doc = assert_reference_state(&resumed);
    assert_eq!(doc["restored_from"].as_str(), Some(url.as_str()));
    assert_eq!(doc["parallelism"], 3);
    assert!(
        doc["events_processed"].as_u64().unwrap() < EVENTS,
        "the resumed job replayed everything\n{}",
        resumed.context()
    );
    assert!(doc["savepoint"].is_null());
    let last = doc["last_checkpoint"].as_str().expect("last checkpoint");
    assert_eq!(latest(job_url, NO_ENV), last);
    assert!(checkpoint_id(last) > checkpoint_id(&url));
    assert_sound(last, NO_ENV);
}

// ---------------------------------------------------------------------------------------
// Stop with a savepoint
// ---------------------------------------------------------------------------------------

/// Stops a fresh job with `signal` after its first checkpoint; returns the stopped run's
/// JSON.
/// Runs job `job_id`, stops it with `signal` after a native savepoint into `savepoints`;
/// returns the run's JSON and the savepoint's URL.
fn native_savepoint(
    signal: libc::c_int,
    checkpoint_dir: &str,
    job_id: &str,
    root: &Path,
    savepoints: &Path,
) -> (Value, String) {
    let (_stopped, doc) = stop_with(
        signal,
        &demo_args(
            checkpoint_dir,
            job_id,
            root,
            &[
                "--savepoint-dir",
                path_str(savepoints),
                "--savepoint-format",
                "native",
            ],
        ),
    );
    let savepoint = doc["savepoint"].as_str().expect("savepoint").to_string();
    (doc, savepoint)
}

fn stop_with(signal: libc::c_int, args: &[String]) -> (Interrupted, Value) {
    let stopped = interrupt(args, NO_ENV, 1, 0, Stop::Signal(signal));
    stopped.run.expect(0);
    let doc = stopped.run.json();
    assert_eq!(doc["stopped_by"], "signal", "{}", stopped.run.context());
    let processed = doc["events_processed"].as_u64().unwrap();
    assert!(
        processed > 0 && processed < EVENTS,
        "{}",
        stopped.run.context()
    );
    assert!(doc["restored_from"].is_null());
    (stopped, doc)
}

#[test]
fn sigterm_with_savepoint_dir_writes_a_savepoint_that_restores_at_parallelism_1() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let savepoints = root.join("savepoints");
    let (stopped, doc) = stop_with(
        libc::SIGTERM,
        &demo_args(
            cp,
            "first",
            &root,
            &[
                "--parallelism",
                "2",
                "--savepoint-dir",
                path_str(&savepoints),
            ],
        ),
    );
    let savepoint = doc["savepoint"]
        .as_str()
        .unwrap_or_else(|| panic!("no savepoint\n{}", stopped.run.context()))
        .to_string();
    let folder = url_path(&savepoint);
    assert!(
        folder.starts_with(&savepoints),
        "{savepoint} is not in {savepoints:?}"
    );
    assert!(folder.join("_metadata").is_file());
    assert!(
        stopped.run.stderr.contains(&savepoint),
        "{}",
        stopped.run.context()
    );

    let info = inspect(&savepoint, NO_ENV);
    assert_eq!(info["kind"], "savepoint", "{info}");
    assert_eq!(info["format"], "canonical", "{info}");
    assert_eq!(info["job_id"], "first", "{info}");
    assert_eq!(info["url"].as_str(), Some(savepoint.as_str()));
    let counter = info["operators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|op| op["uid"] == "counter")
        .unwrap_or_else(|| panic!("no counter operator: {info}"));
    assert_eq!(counter["parallelism"], 2);
    assert_eq!(counter["max_parallelism"], 128);
    let mut next_group = 0;
    for sub in counter["subtasks"].as_array().unwrap() {
        let keyed = &sub["keyed"];
        assert_eq!(keyed["layout"], "canonical", "{info}");
        assert_eq!(keyed["key_groups"][0], next_group, "{info}");
        next_group = keyed["key_groups"][1].as_u64().unwrap() + 1;
    }
    assert_eq!(next_group, 128, "key groups not covered: {info}");
    assert!(snapshot_files(&info).iter().all(|f| f.role == "data"));
    assert_sound(&savepoint, NO_ENV);

    let restored = run(&demo_args(
        cp,
        "second",
        &root,
        &["--from", &savepoint, "--parallelism", "1"],
    ));
    let restored_doc = assert_reference_state(&restored);
    assert_eq!(restored_doc["restored_from"].as_str(), Some(&*savepoint));
    assert_eq!(
        restored_doc["events_processed"].as_u64().unwrap()
            + doc["events_processed"].as_u64().unwrap(),
        EVENTS,
        "events before the savepoint plus after it\n{}",
        restored.context()
    );

    // The restored job does not depend on the savepoint: it can be disposed of.
    let disposed = run(&["savepoint", "dispose", &savepoint]);
    disposed.expect(0);
    assert!(!folder.exists(), "{}", disposed.context());
    assert_sound(
        &latest(path_str(&checkpoints.join("second")), NO_ENV),
        NO_ENV,
    );
}

#[test]
fn sigint_native_savepoint_restores_at_parallelism_3() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let savepoints = root.join("savepoints");
    let (doc, savepoint) = native_savepoint(libc::SIGINT, cp, "native", &root, &savepoints);
    let info = inspect(&savepoint, NO_ENV);
    assert_eq!(info["kind"], "savepoint", "{info}");
    assert_eq!(info["format"], "native", "{info}");
    assert_sound(&savepoint, NO_ENV);

    let restored = run(&demo_args(
        cp,
        "native-3",
        &root,
        &["--from", &savepoint, "--parallelism", "3"],
    ));
    let restored_doc = assert_reference_state(&restored);
    assert_eq!(restored_doc["restored_from"].as_str(), Some(&*savepoint));
    assert_eq!(
        restored_doc["events_processed"].as_u64().unwrap()
            + doc["events_processed"].as_u64().unwrap(),
        EVENTS
    );
}

#[test]
fn sigterm_without_savepoint_dir_keeps_the_latest_checkpoint() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let job = checkpoints.join("plain");
    let (stopped, doc) = stop_with(libc::SIGTERM, &demo_args(cp, "plain", &root, &[]));
    assert!(doc["savepoint"].is_null(), "{}", stopped.run.context());
    let last = doc["last_checkpoint"]
        .as_str()
        .unwrap_or_else(|| panic!("no checkpoint kept\n{}", stopped.run.context()))
        .to_string();
    assert_eq!(latest(path_str(&job), NO_ENV), last);
    assert_sound(&last, NO_ENV);

    let resumed = run(&demo_args(cp, "plain", &root, &["--resume"]));
    let resumed_doc = assert_reference_state(&resumed);
    assert_eq!(resumed_doc["restored_from"].as_str(), Some(&*last));
    assert!(resumed_doc["events_processed"].as_u64().unwrap() < EVENTS);
}

// ---------------------------------------------------------------------------------------
// verify
// ---------------------------------------------------------------------------------------

/// The one `BAD` line of a text `verify` output; it must name `path`.
fn assert_bad_line(run: &Run, path: &str) {
    let bad: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("BAD "))
        .collect();
    assert_eq!(bad.len(), 1, "{}", run.context());
    assert!(
        bad[0].contains(&format!("/{path}: ")),
        "BAD line does not name {path}\n{}",
        run.context()
    );
}

/// The one entry of a JSON `verify` output's `bad` list; its URL must end with `path`.
fn assert_bad_entry(run: &Run, path: &str, kind: &str) {
    let doc = run.json();
    assert_eq!(doc["sound"], false, "{}", run.context());
    let bad = doc["bad"].as_array().expect("bad");
    assert_eq!(bad.len(), 1, "{}", run.context());
    assert!(
        bad[0]["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/{path}")),
        "{}",
        run.context()
    );
    assert_eq!(bad[0]["kind"], kind, "{}", run.context());
}

#[test]
fn verify_lists_each_damaged_or_missing_file() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let job = checkpoints.join("damaged");
    run(&demo_args(cp, "damaged", &root, &[])).expect(0);
    let url = latest(path_str(&job), NO_ENV);
    assert_sound(&url, NO_ENV);
    let info = inspect(&url, NO_ENV);
    assert_eq!(info["kind"], "checkpoint");
    assert_eq!(info["format"], "incremental");
    let files = snapshot_files(&info);
    assert_eq!(info["files"].as_u64(), Some(files.len() as u64));
    let shared: Vec<&SnapshotFile> = files
        .iter()
        .filter(|f| f.role == "shared" && f.size > 0)
        .collect();
    assert!(shared.len() >= 2, "{info}");
    for f in &files {
        assert_eq!(
            fs::metadata(job.join(&f.path)).unwrap().len(),
            f.size,
            "{f:?}"
        );
    }

    let mut rng = Rng::new(0x5eed_0003);
    let first = rng.range(0, shared.len() as u64 - 1) as usize;
    let victim = shared[first];
    let victim_path = job.join(&victim.path);
    let original = fs::read(&victim_path).unwrap();

    // One flipped byte.
    let mut damaged = original.clone();
    let offset = rng.range(0, damaged.len() as u64 - 1) as usize;
    damaged[offset] ^= 0x5a;
    fs::write(&victim_path, &damaged).unwrap();
    let text = run(&["verify", &url]);
    text.expect(3);
    assert_bad_line(&text, &victim.path);
    let json = run(&["verify", &url, "--json"]);
    json.expect(3);
    assert_bad_entry(&json, &victim.path, "Corrupt");
    // Starting from it fails cleanly, naming the file. (`--resume` falls back to an older
    // checkpoint: tests/corruption.rs.)
    let resumed = run(&demo_args(cp, "from-damaged", &root, &["--from", &url]));
    assert_error_line(&resumed, "resume from a damaged checkpoint");
    assert!(
        resumed.stderr.contains(&victim.path),
        "{}",
        resumed.context()
    );

    // Repaired, it is sound again.
    fs::write(&victim_path, &original).unwrap();
    assert_sound(&url, NO_ENV);

    // One missing file.
    let gone = shared[(first + 1) % shared.len()];
    fs::remove_file(job.join(&gone.path)).unwrap();
    let text = run(&["verify", &url]);
    text.expect(3);
    assert_bad_line(&text, &gone.path);
    let json = run(&["verify", &url, "--json"]);
    json.expect(3);
    assert_bad_entry(&json, &gone.path, "NotFound");

    // A truncated `_metadata`.
    let metadata = url_path(&url).join("_metadata");
    let bytes = fs::read(&metadata).unwrap();
    fs::write(&metadata, &bytes[..bytes.len() / 2]).unwrap();
    let text = run(&["verify", &url]);
    text.expect(3);
    assert!(
        text.stdout
            .lines()
            .any(|l| l.starts_with("BAD ") && l.contains("/_metadata")),
        "{}",
        text.context()
    );
    let json = run(&["verify", &url, "--json"]);
    json.expect(3);
    let doc = json.json();
    assert_eq!(doc["sound"], false, "{}", json.context());
    let bad = doc["bad"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{}", json.context());
    assert!(
        bad[0]["url"].as_str().unwrap().ends_with("/_metadata"),
        "{}",
        json.context()
    );
    assert_error_line(&run(&["inspect", &url]), "inspect a truncated _metadata");
}

// ---------------------------------------------------------------------------------------
// latest and checkpoints
// ---------------------------------------------------------------------------------------

#[test]
fn latest_and_checkpoints_after_a_crash() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let job = checkpoints.join("listed");
    let job_url = path_str(&job);

    // Nothing yet: an empty job directory, then one with only an incomplete checkpoint.
    fs::create_dir_all(&job).unwrap();
    for step in ["empty", "only incomplete"] {
        let none = run(&["latest", job_url]);
        none.expect(1);
        assert!(none.stdout.trim().is_empty(), "{step}\n{}", none.context());
        let lines: Vec<&str> = none.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{step}\n{}", none.context());
        assert!(
            lines[0].starts_with("rockstate: no completed checkpoint"),
            "{}",
            none.context()
        );
        fs::create_dir_all(job.join("chk-1")).unwrap();
    }
    fs::remove_dir(job.join("chk-1")).unwrap();

    let mut rng = Rng::new(0x5eed_0004);
    let after = rng.range(1, 4) as usize;
    let killed = interrupt(
        &demo_args(cp, "listed", &root, &["--resume"]),
        NO_ENV,
        after,
        rng.range(0, 20),
        Stop::Kill,
    );
    assert_killed(&killed);
    let url = latest(job_url, NO_ENV);
    assert!(url.starts_with("file:///"), "{url}");
    assert!(checkpoint_id(&url) >= *killed.seen.iter().max().unwrap());

    let listing = run(&["checkpoints", job_url, "--json"]);
    listing.expect(0);
    let doc = listing.json();
    assert_eq!(
        doc["job"].as_str(),
        url.rsplit_once('/').map(|(job, _)| job)
    );
    let rows = doc["checkpoints"].as_array().unwrap();
    let completed: Vec<&Value> = rows.iter().filter(|r| r["status"] == "completed").collect();
    assert!(!completed.is_empty(), "{}", listing.context());
    let ids: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "unsorted: {ids:?}");
    for row in &completed {
        let id = row["id"].as_u64().unwrap();
        assert_eq!(
            row["url"].as_str().map(checkpoint_id),
            Some(id),
            "{}",
            listing.context()
        );
        assert!(row["total_bytes"].as_u64().unwrap() > 0, "{row}");
        assert!(row["uploaded_bytes"].as_u64().unwrap() > 0, "{row}");
        assert!(row["uploaded_bytes"].as_u64() <= row["total_bytes"].as_u64());
        assert!(row["files"].as_u64().unwrap() > 0, "{row}");
        assert!(row["completed_at_ms"].as_u64() >= row["triggered_at_ms"].as_u64());
    }
    assert_eq!(
        completed.last().unwrap()["url"].as_str(),
        Some(url.as_str()),
        "latest is not the newest completed checkpoint\n{}",
        listing.context()
    );
    for id in &killed.seen {
        // Announced checkpoints are either listed or already subsumed by newer ones.
        assert!(
            ids.contains(id) || completed.iter().all(|r| r["id"].as_u64().unwrap() > *id),
            "announced checkpoint {id} is missing\n{}",
            listing.context()
        );
    }

    // A kill during an upload leaves an incomplete checkpoint of its own.
    let incomplete = rows.iter().filter(|r| r["status"] == "incomplete").count();

    // An empty folder is an incomplete checkpoint, unreadable metadata is reported as such,
    // and neither is the latest.
    fs::create_dir_all(job.join("chk-999")).unwrap();
    fs::create_dir_all(job.join("chk-1000")).unwrap();
    fs::write(job.join("chk-1000/_metadata"), b"not a metadata file").unwrap();
    let listing = run(&["checkpoints", job_url, "--json"]);
    listing.expect(0);
    let rows = listing.json()["checkpoints"].as_array().unwrap().clone();
    let row = |id: u64| rows.iter().find(|r| r["id"] == id).cloned();
    assert_eq!(
        row(999),
        Some(serde_json::json!({"id": 999, "status": "incomplete"})),
        "{}",
        listing.context()
    );
    let unreadable = row(1000).unwrap_or_else(|| panic!("{}", listing.context()));
    assert_eq!(unreadable["status"], "unreadable");
    assert!(!unreadable["error"].as_str().unwrap().is_empty());
    assert_eq!(
        rows.iter().filter(|r| r["status"] == "completed").count(),
        completed.len()
    );
    let text = run(&["checkpoints", job_url]);
    text.expect(0);
    assert!(
        text.stdout.contains(&format!(
            "{} completed, {} incomplete, 1 unreadable",
            completed.len(),
            incomplete + 1
        )),
        "{}",
        text.context()
    );
    assert_eq!(latest(job_url, NO_ENV), url);
}

// ---------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------

#[test]
fn bad_paths_and_urls_fail_with_one_line() {
    let (_dir, root) = temp_root();
    let missing = root.join("missing");
    let missing_job = missing.join("job");
    let missing_url = format!("file://{}", path_str(&missing_job));
    for target in [path_str(&missing_job), missing_url.as_str()] {
        let commands: [Vec<&str>; 7] = [
            vec!["checkpoints", target],
            vec!["checkpoints", target, "--json"],
            vec!["latest", target],
            vec!["inspect", target],
            vec!["verify", target],
            vec!["gc", target, "--grace", "0s"],
            vec!["savepoint", "dispose", target],
        ];
        for args in commands {
            assert_error_line(&run(&args), &format!("{args:?}"));
            assert!(!missing.exists(), "{args:?} created {missing:?}");
        }
    }

    // Directories that are not snapshots.
    let empty = root.join("empty");
    fs::create_dir_all(&empty).unwrap();
    let other = root.join("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("notes.txt"), b"hello").unwrap();
    for dir in [&empty, &other] {
        for cmd in ["inspect", "verify"] {
            let args = [cmd, path_str(dir)];
            assert_error_line(&run(&args), &format!("{args:?}"));
        }
    }
    assert_eq!(
        list_files(&other),
        BTreeSet::from(["notes.txt".to_string()])
    );

    // Unreadable `_metadata`.
    let garbage = root.join("garbage/chk-1");
    fs::create_dir_all(&garbage).unwrap();
    let mut rng = Rng::new(0x5eed_0005);
    let noise: Vec<u8> = (0..200).map(|_| rng.next_u64() as u8).collect();
    fs::write(garbage.join("_metadata"), &noise).unwrap();
    for target in [garbage.clone(), garbage.join("_metadata")] {
        let args = ["inspect", path_str(&target)];
        assert_error_line(&run(&args), &format!("{args:?}"));
    }
    let verify = run(&["verify", path_str(&garbage)]);
    verify.expect(3);

    // Unsupported scheme.
    let ftp = "ftp://x/y";
    let commands: [Vec<&str>; 6] = [
        vec!["checkpoints", ftp],
        vec!["latest", ftp],
        vec!["inspect", ftp],
        vec!["verify", ftp],
        vec!["gc", ftp],
        vec!["savepoint", "dispose", ftp],
    ];
    for args in commands {
        let run = run(&args);
        assert_error_line(&run, &format!("{args:?}"));
        assert!(run.stderr.contains("ftp"), "{}", run.context());
    }

    // Bad flags outside `demo`.
    for args in [
        vec!["verify", path_str(&empty), "--frobnicate"],
        vec!["no-such-command"],
        vec!["gc", path_str(&empty), "--grace", "soon"],
        vec!["gc", path_str(&empty), "--grace", "5 fortnights"],
    ] {
        assert_error_line(&run(&args), &format!("{args:?}"));
    }
}

#[test]
fn bad_demo_flags_fail_with_one_line_and_change_nothing() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let job = checkpoints.join("existing");
    let job_url = path_str(&job);

    // A small job with checkpoints.
    let mut args = demo_args(cp, "existing", &root, &[]);
    let events = args.iter().position(|a| a == "--events").unwrap();
    args[events + 1] = "6000".into();
    let interval = args
        .iter()
        .position(|a| a == "--checkpoint-interval")
        .unwrap();
    args[interval + 1] = "2000".into();
    run(&args).expect(0);
    let url = latest(job_url, NO_ENV);
    let before = list_files(&job);
    let chk = url_path(&url);
    let chk_metadata = fs::read(chk.join("_metadata")).unwrap();

    let missing = root.join("missing");
    let missing_url = format!("file://{}", path_str(&missing.join("sp")));
    let missing_path = missing.join("chk-3");
    let fresh_cp = root.join("fresh");
    let fresh = path_str(&fresh_cp);
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "unknown flag",
            demo_args(fresh, "x", &root, &["--no-such-flag"]),
        ),
        (
            "--claim without --from",
            demo_args(fresh, "x", &root, &["--claim"]),
        ),
        (
            "a timely flag with the harness engine",
            demo_args(fresh, "x", &root, &["--threads", "2"]),
        ),
        (
            "timely flags with the harness engine",
            demo_args(fresh, "x", &root, &["--processes", "2", "--process", "1"]),
        ),
        (
            "parallelism 0",
            demo_args(fresh, "x", &root, &["--parallelism", "0"]),
        ),
        (
            "parallelism above max parallelism",
            demo_args(
                fresh,
                "x",
                &root,
                &["--parallelism", "300", "--max-parallelism", "128"],
            ),
        ),
        ("no keys", {
            let mut a = demo_args(fresh, "x", &root, &[]);
            let keys = a.iter().position(|x| x == "--keys").unwrap();
            a[keys + 1] = "0".into();
            a
        }),
        (
            "--from a missing path",
            demo_args(fresh, "x", &root, &["--from", path_str(&missing_path)]),
        ),
        (
            "--from a missing file URL",
            demo_args(fresh, "x", &root, &["--from", &missing_url]),
        ),
        (
            "--from an unsupported scheme",
            demo_args(fresh, "x", &root, &["--from", "ftp://x/y"]),
        ),
        (
            "--checkpoint-dir with an unsupported scheme",
            demo_args("ftp://x/y", "x", &root, &[]),
        ),
        (
            "--resume with another max parallelism",
            demo_args(
                cp,
                "existing",
                &root,
                &["--resume", "--max-parallelism", "64"],
            ),
        ),
        (
            "start again without --resume",
            demo_args(cp, "existing", &root, &[]),
        ),
        (
            "--resume and --from",
            demo_args(cp, "existing", &root, &["--resume", "--from", &url]),
        ),
        (
            "job id with a slash",
            demo_args(cp, "../existing", &root, &[]),
        ),
    ];
    for (what, args) in &cases {
        assert_error_line(&run(args), what);
        assert!(!missing.exists(), "{what}: created {missing:?}");
    }

    // Disposing of a checkpoint as a savepoint is refused and leaves it intact.
    for target in [url.clone(), path_str(&chk).to_string(), job_url.to_string()] {
        let args = ["savepoint", "dispose", target.as_str()];
        assert_error_line(&run(&args), &format!("{args:?}"));
    }
    assert_eq!(list_files(&job), before, "the job directory changed");
    assert_eq!(fs::read(chk.join("_metadata")).unwrap(), chk_metadata);
    assert_eq!(latest(job_url, NO_ENV), url);
    assert_sound(&url, NO_ENV);
}

// ---------------------------------------------------------------------------------------
// gc
// ---------------------------------------------------------------------------------------

fn gc(job: &str, extra: &[&str], env: Env) -> Value {
    let mut args = vec!["gc", job, "--json"];
    args.extend_from_slice(extra);
    let run = run_env(&args, env);
    run.expect(0);
    let doc = run.json();
    assert!(doc["unreadable"].as_array().unwrap().is_empty(), "{doc}");
    doc
}

fn orphan_paths(doc: &Value) -> BTreeSet<String> {
    doc["orphans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["path"].as_str().unwrap().to_string())
        .collect()
}

/// Sets a file's modification time `age` in the past.
fn age(path: &Path, age: Duration) {
    let file = fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
}

#[test]
fn gc_deletes_orphans_after_a_crash_and_keeps_every_referenced_file() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let job = checkpoints.join("swept");
    let job_url = path_str(&job);
    let mut rng = Rng::new(0x5eed_0006);
    let after = rng.range(1, 4) as usize;
    let killed = interrupt(
        &demo_args(cp, "swept", &root, &[]),
        NO_ENV,
        after,
        rng.range(0, 20),
        Stop::Kill,
    );
    assert_killed(&killed);
    let url = latest(job_url, NO_ENV);

    // Everything the completed checkpoints reference.
    let listing = run(&["checkpoints", job_url, "--json"]);
    listing.expect(0);
    let mut referenced = BTreeSet::new();
    for row in listing.json()["checkpoints"].as_array().unwrap() {
        if row["status"] != "completed" {
            continue;
        }
        let chk = row["url"].as_str().unwrap();
        referenced.insert(format!("chk-{}/_metadata", row["id"]));
        referenced.extend(
            snapshot_files(&inspect(chk, NO_ENV))
                .into_iter()
                .map(|f| f.path),
        );
    }
    let shared = referenced
        .iter()
        .find(|p| p.starts_with("shared/"))
        .expect("a shared file")
        .clone();

    // Leftovers of uploads in flight, two hours old: a shared file and an incomplete
    // checkpoint folder.
    let stray_shared = "shared/00000000000000000000000000000000.sst".to_string();
    fs::copy(job.join(&shared), job.join(&stray_shared)).unwrap();
    let stray_chk = format!(
        "chk-{}/counter/0/MANIFEST-000005",
        checkpoint_id(&url) + 1000
    );
    fs::create_dir_all(job.join(&stray_chk).parent().unwrap()).unwrap();
    fs::write(job.join(&stray_chk), b"partial upload").unwrap();
    for stray in [&stray_shared, &stray_chk] {
        age(&job.join(stray), Duration::from_secs(2 * 3600));
    }
    let before = list_files(&job);

    // Younger than the grace period: kept.
    let young = gc(job_url, &["--dry-run", "--grace", "1d"], NO_ENV);
    assert!(orphan_paths(&young).is_empty(), "{young}");
    assert!(young["too_young"].as_u64().unwrap() >= 2, "{young}");

    let dry = gc(job_url, &["--dry-run", "--grace", "0s"], NO_ENV);
    assert_eq!(dry["dry_run"], true);
    let orphans = orphan_paths(&dry);
    assert!(orphans.contains(&stray_shared), "{dry}");
    assert!(orphans.contains(&stray_chk), "{dry}");
    for orphan in &orphans {
        assert!(
            !referenced.contains(orphan),
            "referenced file {orphan} listed as an orphan"
        );
        assert!(before.contains(orphan), "{orphan} does not exist");
    }
    let sizes: u64 = dry["orphans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["size"].as_u64().unwrap())
        .sum();
    assert_eq!(dry["orphan_bytes"].as_u64(), Some(sizes));
    assert_eq!(dry["referenced"].as_u64(), Some(referenced.len() as u64));
    assert_eq!(list_files(&job), before, "a dry run deleted files");

    let swept = gc(job_url, &["--grace", "0s"], NO_ENV);
    assert_eq!(swept["dry_run"], false);
    assert_eq!(orphan_paths(&swept), orphans);
    let after_sweep = list_files(&job);
    assert_eq!(
        after_sweep,
        before.difference(&orphans).cloned().collect(),
        "the sweep deleted something else or left orphans"
    );
    assert!(referenced.is_subset(&after_sweep));
    let again = gc(job_url, &["--dry-run", "--grace", "0s"], NO_ENV);
    assert!(orphan_paths(&again).is_empty(), "{again}");

    assert_eq!(latest(job_url, NO_ENV), url);
    assert_sound(&url, NO_ENV);
    let resumed = run(&demo_args(cp, "swept", &root, &["--resume"]));
    let doc = assert_reference_state(&resumed);
    assert_eq!(doc["restored_from"].as_str(), Some(url.as_str()));
}

#[test]
fn gc_with_a_huge_grace_keeps_young_files() {
    let (_dir, root) = temp_root();
    let job = root.join("job");
    fs::create_dir_all(job.join("shared")).unwrap();
    fs::write(job.join("shared/fresh.sst"), b"in flight").unwrap();
    for grace in ["106751991168d", "200000000000d"] {
        let run = run(&[
            "gc",
            path_str(&job),
            "--dry-run",
            "--grace",
            grace,
            "--json",
        ]);
        match run.code() {
            Some(0) => assert!(
                orphan_paths(&run.json()).is_empty(),
                "--grace {grace}\n{}",
                run.context()
            ),
            _ => assert_error_line(&run, grace),
        }
    }
}

// ---------------------------------------------------------------------------------------
// S3
// ---------------------------------------------------------------------------------------

#[test]
fn crash_resume_and_listings_on_s3() {
    let server = rockstate::testing::s3::S3Server::start("rockstate-cli");
    let env: &[(&str, &str)] = &[
        ("AWS_ENDPOINT", server.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    let (_dir, root) = temp_root();
    let cp = format!("s3://{}/runs", server.bucket);
    let job = format!("{cp}/remote");

    let none = run_env(&["latest", &format!("{cp}/nothing")], env);
    none.expect(1);

    let mut rng = Rng::new(0x5eed_0007);
    let after = rng.range(1, 4) as usize;
    let killed = interrupt(
        &demo_args(&cp, "remote", &root, &[]),
        env,
        after,
        rng.range(0, 20),
        Stop::Kill,
    );
    assert_killed(&killed);

    let url = latest(&job, env);
    assert!(url.starts_with(&format!("{job}/chk-")), "{url}");
    assert!(checkpoint_id(&url) >= *killed.seen.iter().max().unwrap());
    assert_sound(&url, env);
    let info = inspect(&url, env);
    assert_eq!(info["kind"], "checkpoint");
    assert_eq!(info["format"], "incremental");
    assert!(snapshot_files(&info).iter().any(|f| f.role == "shared"));

    let listing = run_env(&["checkpoints", &job, "--json"], env);
    listing.expect(0);
    let doc = listing.json();
    assert_eq!(doc["job"].as_str(), Some(job.as_str()));
    let completed: Vec<Value> = doc["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "completed")
        .cloned()
        .collect();
    assert!(!completed.is_empty(), "{}", listing.context());
    for row in &completed {
        assert!(row["total_bytes"].as_u64().unwrap() > 0, "{row}");
        assert!(row["files"].as_u64().unwrap() > 0, "{row}");
    }
    assert_eq!(
        completed.last().unwrap()["url"].as_str(),
        Some(url.as_str())
    );
    let dry = gc(&job, &["--dry-run", "--grace", "0s"], env);
    assert_eq!(dry["dry_run"], true);

    let resumed = run_env(
        &demo_args(&cp, "remote", &root, &["--resume", "--parallelism", "3"]),
        env,
    );
    let doc = assert_reference_state(&resumed);
    assert_eq!(doc["restored_from"].as_str(), Some(url.as_str()));
    let last = doc["last_checkpoint"].as_str().unwrap();
    assert!(last.starts_with(&format!("{job}/chk-")), "{last}");
    assert_eq!(latest(&job, env), last);
    assert_sound(last, env);

    // State read on S3 without a job: the dump of `count` has as many entries as
    // `state ls` counts, and `state get` finds one of them.
    let listed = run_env(&["state", "ls", last, "--json"], env);
    listed.expect(0);
    let counted = listed.json()["operators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|op| op["uid"] == "counter")
        .and_then(|op| {
            op["states"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == "count")
        })
        .map(|s| s["entries"].as_u64().unwrap())
        .unwrap();
    let dumped = run_env(
        &[
            "state",
            "dump",
            last,
            "--operator",
            "counter",
            "--state",
            "count",
        ],
        env,
    );
    dumped.expect(0);
    assert_eq!(
        dumped.stdout.lines().count() as u64,
        counted,
        "{}",
        dumped.context()
    );
    let first: Value = serde_json::from_str(dumped.stdout.lines().next().unwrap()).unwrap();
    let key = first["key"].as_str().unwrap();
    let got = run_env(
        &[
            "state",
            "get",
            last,
            "--operator",
            "counter",
            "--state",
            "count",
            "--key",
            key,
        ],
        env,
    );
    got.expect(0);
    let line: Value = serde_json::from_str(got.stdout.trim()).unwrap();
    assert_eq!(line, first, "{}", got.context());

    // Damage on S3 is found too: one byte of a shared file flipped through the server.
    let victim = snapshot_files(&inspect(last, env))
        .into_iter()
        .find(|f| f.role == "shared" && f.size > 0)
        .expect("a shared file");
    let storage = server.storage("runs/remote");
    let location = object_store::path::Path::from(format!("runs/remote/{}", victim.path));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let original = runtime
        .block_on(storage.read_range(&victim.path, 0..victim.size))
        .unwrap();
    let mut damaged = original.to_vec();
    let offset = rng.range(0, victim.size - 1) as usize;
    damaged[offset] ^= 0x5a;
    let put = |bytes: Vec<u8>| {
        runtime
            .block_on(storage.store().put(&location, bytes.clone().into()))
            .unwrap();
        let stored = runtime
            .block_on(storage.read_range(&victim.path, 0..victim.size))
            .unwrap();
        assert_eq!(
            stored.as_ref(),
            bytes.as_slice(),
            "the object was not replaced"
        );
    };
    put(damaged);
    let text = run_env(&["verify", last], env);
    text.expect(3);
    assert_bad_line(&text, &victim.path);
    let json = run_env(&["verify", last, "--json"], env);
    json.expect(3);
    assert_bad_entry(&json, &victim.path, "Corrupt");
    put(original.to_vec());
    assert_sound(last, env);
}

#[test]
fn storage_errors_on_s3_are_one_line() {
    let server = rockstate::testing::s3::S3Server::start("rockstate-cli-errors");
    let env: &[(&str, &str)] = &[
        ("AWS_ENDPOINT", server.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    for args in [
        vec!["latest", "s3://no-such-bucket/job"],
        vec!["checkpoints", "s3://no-such-bucket/job"],
        vec!["status", "s3://no-such-bucket/job"],
    ] {
        let run = run_env(&args, env);
        assert_error_line(&run, &format!("{args:?}"));
        // Exit 7 (not found), naming the cause: no retry can help.
        assert_eq!(run.code(), Some(7), "{}", run.context());
        assert!(
            run.stderr.contains("bucket does not exist"),
            "{}",
            run.context()
        );
    }
    // Nothing listens at the endpoint: the store client's own retries, then exit 6
    // (transient: try again), without a second round of retries on top.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let unreachable: Vec<(&str, &str)> = env
        .iter()
        .map(|(k, v)| {
            if *k == "AWS_ENDPOINT" {
                (*k, endpoint.as_str())
            } else {
                (*k, *v)
            }
        })
        .collect();
    let run = run_env(&["latest", "s3://bucket/job"], &unreachable);
    assert_eq!(run.code(), Some(6), "{}", run.context());
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.context());
    assert!(run.stderr.contains("retries"), "{}", run.context());
}

// ---------------------------------------------------------------------------------------
// Concurrent actors on one job directory
// ---------------------------------------------------------------------------------------

/// Runs `rockstate gc JOB` (default grace) in a loop until `child` exits; returns the
/// child's run and the number of sweeps. Every sweep must succeed, or find no directory
/// yet, or report that the directory kept changing (nothing deleted).
fn gc_beside(child: std::process::Child, job: &str) -> (Run, usize) {
    let output = std::thread::scope(|scope| {
        let waiter = scope.spawn(move || child.wait_with_output().expect("wait for rockstate"));
        let mut sweeps = 0;
        while !waiter.is_finished() {
            let sweep = run(&["gc", job, "--json"]);
            if sweep.code() == Some(0) {
                sweeps += 1;
            } else {
                // Before the job created its directory, or while it kept changing.
                assert!(
                    sweep.stderr.contains("kept changing") || sweep.stderr.contains("no directory"),
                    "gc beside the job failed\n{}",
                    sweep.context()
                );
            }
        }
        (waiter.join().expect("waiter"), sweeps)
    });
    let (output, sweeps) = output;
    (Run::from_output(output, None), sweeps)
}

/// Every retained checkpoint of `job` verifies sound.
fn assert_all_sound(job: &str) {
    let listing = run(&["checkpoints", job, "--json"]);
    listing.expect(0);
    let mut completed = 0;
    for row in listing.json()["checkpoints"].as_array().unwrap() {
        if row["status"] == "completed" {
            assert_sound(row["url"].as_str().unwrap(), NO_ENV);
            completed += 1;
        }
    }
    assert!(completed >= 1, "{}", listing.context());
}

#[test]
fn gc_in_a_loop_beside_a_running_job_keeps_every_checkpoint_sound() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let savepoints = root.join("savepoints");

    // A native savepoint whose files are two hours old: copies of them by hard link
    // must not look old to the sweep.
    let (_doc, savepoint) = native_savepoint(libc::SIGTERM, cp, "old", &root, &savepoints);
    for file in list_files(&url_path(&savepoint)) {
        age(
            &url_path(&savepoint).join(file),
            Duration::from_secs(2 * 3600),
        );
    }

    for (job_id, extra) in [
        ("restored", vec!["--from", savepoint.as_str()]),
        ("plain", vec![]),
    ] {
        let job = checkpoints.join(job_id);
        let job_url = path_str(&job).to_string();
        let mut args = demo_args(cp, job_id, &root, &extra);
        args.extend(["--retained".to_string(), "1".to_string()]);
        let child = command(&args, NO_ENV)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rockstate");
        let (finished, sweeps) = gc_beside(child, &job_url);
        assert_reference_state(&finished);
        assert!(sweeps >= 1, "{job_id}: no sweep ran beside the job");
        assert_all_sound(&job_url);
        // The latest checkpoint restores to the same state.
        let resumed = run(&demo_args(cp, job_id, &root, &["--resume"]));
        assert_reference_state(&resumed);
    }
}

/// `demo_args` with `events` events instead of the shared count.
fn demo_args_with_events(
    checkpoint_dir: &str,
    job_id: &str,
    root: &Path,
    events: u64,
    extra: &[&str],
) -> Vec<String> {
    let mut args = demo_args(checkpoint_dir, job_id, root, extra);
    let at = args.iter().position(|a| a == "--events").unwrap() + 1;
    args[at] = events.to_string();
    args
}

#[test]
fn a_second_writer_fences_the_first_which_fails_with_one_line() {
    // Long enough that the first writer is still committing when the second one starts.
    const LONG: u64 = 400_000;
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let uninterrupted = run(&demo_args_with_events(cp, "reference", &root, LONG, &[]));
    uninterrupted.expect(0);
    let reference = uninterrupted.json()["state_digest"].clone();
    let assert_reference = |run: &Run| {
        run.expect(0);
        let doc = run.json();
        assert_eq!(doc["stopped_by"], "end", "{}", run.context());
        assert_eq!(doc["state_digest"], reference, "{}", run.context());
    };
    // A job killed after its first checkpoint: both runs resume it.
    let killed = interrupt(
        &demo_args_with_events(cp, "twice", &root, LONG, &[]),
        NO_ENV,
        1,
        0,
        Stop::Kill,
    );
    assert_killed(&killed);

    // Both keep ten checkpoints: the first writer does not retire the checkpoint the
    // second one is restoring before the second claims the directory.
    let mut first = command(
        &demo_args_with_events(cp, "twice", &root, LONG, &["--resume", "--retained", "10"]),
        NO_ENV,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start the first writer");
    // Once the first writer is committing, the second one claims the job directory.
    let mut reader = BufReader::new(first.stderr.take().unwrap());
    let mut first_stderr = String::new();
    let mut line = String::new();
    while checkpoint_line(&line).is_none() {
        line.clear();
        if reader.read_line(&mut line).expect("read stderr") == 0 {
            break;
        }
        first_stderr.push_str(&line);
    }
    let second = command(
        &demo_args_with_events(cp, "twice", &root, LONG, &["--resume", "--retained", "10"]),
        NO_ENV,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start the second writer");
    reader
        .read_to_string(&mut first_stderr)
        .expect("read stderr");
    let first_out = first.wait_with_output().expect("wait for the first writer");
    let first_run = Run::from_output(first_out, Some(first_stderr));
    let second_out = second
        .wait_with_output()
        .expect("wait for the second writer");
    let second_run = Run::from_output(second_out, None);
    // The survivor ends in the uninterrupted run's state; the first writer was fenced
    // and says so in one line.
    assert_reference(&second_run);
    assert_eq!(first_run.code(), Some(2), "{}", first_run.context());
    let last = first_run
        .stderr
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or_default();
    assert!(
        last.starts_with("rockstate: ") && last.contains("fenced"),
        "the first writer did not stop with a one-line fencing error\n{}",
        first_run.context()
    );
    let job = checkpoints.join("twice");
    assert_all_sound(path_str(&job));
    let resumed = run(&demo_args_with_events(
        cp,
        "twice",
        &root,
        LONG,
        &["--resume"],
    ));
    assert_reference(&resumed);
}

// ---------------------------------------------------------------------------------------
// The demo's local directory
// ---------------------------------------------------------------------------------------

/// `rockstate demo --local-dir DIR` with a DIR that holds a user's file.
///
/// Proves: the demo never deletes what it did not create (it either refuses the
/// directory with a one-line error or leaves the file alone).
#[test]
fn the_demo_keeps_a_users_files_in_its_local_dir() {
    let root = tempfile::tempdir().unwrap();
    let local = root.path().join("mine");
    std::fs::create_dir_all(&local).unwrap();
    let precious = local.join("notes.txt");
    std::fs::write(&precious, "do not delete").unwrap();
    let checkpoints = root.path().join("checkpoints").display().to_string();
    let out = run_env(
        &[
            "demo",
            "--checkpoint-dir",
            &checkpoints,
            "--job-id",
            "local-dir",
            "--local-dir",
            &local.display().to_string(),
            "--events",
            "2000",
            "--keys",
            "100",
            "--checkpoint-interval",
            "1000",
            "--json",
        ],
        &[],
    );
    assert!(
        precious.exists(),
        "the demo deleted a user's file in --local-dir\n{}",
        out.context()
    );
    if !out.status.success() {
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "{}", out.context());
    }
}

// ---------------------------------------------------------------------------------------
// Control requests: `savepoint trigger` and `stop` against a running job
// ---------------------------------------------------------------------------------------

/// A demo job runs (long enough to be stopped from outside); another process asks it for
/// a savepoint, then for a stop with a savepoint.
///
/// Proves: `rockstate savepoint trigger` prints the URL of a savepoint the running job
/// took (and that verifies), into the given directory or, without one, the job's own
/// `--savepoint-dir`; the job keeps running, `rockstate stop --savepoint` ends it
/// after a final savepoint whose URL both print, and the job reports `stopped_by:
/// request`; no request or answer is left in the job directory.
#[test]
fn savepoint_trigger_and_stop_reach_a_running_job() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let job = checkpoints.join("remote");
    let savepoints = root.join("savepoints");
    // A live source: the shared 60 000 records at 3 000 a second would take 20 s.
    let mut child = command(
        &demo_args(
            cp,
            "remote",
            &root,
            &[
                "--parallelism",
                "2",
                "--savepoint-dir",
                path_str(&savepoints),
                "--rate",
                "3000",
            ],
        ),
        NO_ENV,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start the demo");
    // Wait for the first completed checkpoint: the job is running.
    let mut reader = BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut stderr = String::new();
    let mut line = String::new();
    while checkpoint_line(&line).is_none() {
        line.clear();
        assert!(
            reader.read_line(&mut line).expect("read stderr") > 0,
            "the demo ended early: {stderr}"
        );
        stderr.push_str(&line);
    }
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        rest
    });

    let trigger = run(&[
        "savepoint",
        "trigger",
        path_str(&job),
        path_str(&savepoints),
        "--wait",
        "120s",
    ]);
    trigger.expect(0);
    let first = trigger.line().to_string();
    assert!(url_path(&first).starts_with(&savepoints), "{first}");
    run(&["verify", &first]).expect(0);
    assert_eq!(inspect(&first, NO_ENV)["kind"], "savepoint");
    // Without a directory: the job's own savepoint directory.
    let own = run(&["savepoint", "trigger", path_str(&job), "--wait", "120s"]);
    own.expect(0);
    assert!(
        url_path(own.line()).starts_with(&savepoints),
        "{}",
        own.context()
    );
    assert_ne!(own.line(), first);

    let stop = run(&[
        "stop",
        path_str(&job),
        "--savepoint",
        path_str(&savepoints),
        "--format",
        "native",
        "--wait",
        "120s",
    ]);
    stop.expect(0);
    let last = stop.line().to_string();
    assert_ne!(first, last);
    run(&["verify", &last]).expect(0);
    assert_eq!(inspect(&last, NO_ENV)["format"], "native");

    let output = child.wait_with_output().expect("wait for the demo");
    stderr.push_str(&drain.join().unwrap());
    let demo = Run::from_output(output, Some(stderr));
    demo.expect(0);
    let doc = demo.json();
    assert_eq!(doc["stopped_by"], "request", "{}", demo.context());
    assert_eq!(
        doc["savepoint"].as_str(),
        Some(last.as_str()),
        "{}",
        demo.context()
    );
    let control = job.join("_control");
    let left: Vec<_> = fs::read_dir(&control)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {control:?}: {left:?}");
    // The live savepoint and the final one restore at another parallelism and end in the
    // uninterrupted run's state.
    for (url, p, id) in [(&first, "3", "from-live"), (&last, "1", "from-final")] {
        let restored = run(&demo_args(
            cp,
            id,
            &root,
            &["--from", url, "--parallelism", p],
        ));
        assert_reference_state(&restored);
    }
}

/// A request to a job directory where no job runs.
///
/// Proves: the CLI waits `--wait`, exits 4 with one line saying no job answered, and
/// withdraws its request (a `withdrawn` claim replaces it), so a job started later never
/// acts on it.
#[test]
fn a_request_no_job_answers_is_withdrawn() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    run(&demo_args(cp, "idle", &root, &[])).expect(0);
    let job = checkpoints.join("idle");
    // The job finished: its status says so, and a request is refused at once.
    let finished = run(&["savepoint", "trigger", path_str(&job), "--wait", "60s"]);
    assert_eq!(finished.code(), Some(4), "{}", finished.context());
    assert!(
        finished.stderr.contains("is not running"),
        "{}",
        finished.context()
    );
    // A job that died without a word leaves a status that says it runs: the request is
    // written, and withdrawn when nobody answers.
    fs::remove_file(job.join("_status.json")).unwrap();
    let trigger = run(&["savepoint", "trigger", path_str(&job), "--wait", "1s"]);
    assert_eq!(trigger.code(), Some(4), "{}", trigger.context());
    let lines: Vec<&str> = trigger
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "{}", trigger.context());
    assert!(
        lines[0].contains("no job answered"),
        "{}",
        trigger.context()
    );
    let stop = run(&["stop", path_str(&job), "--wait", "500ms"]);
    assert_eq!(stop.code(), Some(4), "{}", stop.context());
    // Only the withdrawals remain (kept an hour, so that a job that listed a request
    // just before cannot take it): no request a job could act on.
    let control = job.join("_control");
    let left: Vec<PathBuf> = fs::read_dir(&control)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(left.len(), 2, "{left:?}");
    for path in &left {
        assert_eq!(
            path.extension().and_then(|e| e.to_str()),
            Some("claim"),
            "{left:?}"
        );
        assert_eq!(fs::read_to_string(path).unwrap(), "withdrawn");
    }
}

/// Every command's `--json` output, and `latest` and `checkpoints` given the checkpoint
/// directory instead of a job directory.
///
/// Proves: each JSON document carries `schema_version` 1 (demo, latest, checkpoints,
/// inspect, verify, gc, key-group); pointed at a directory that holds job directories,
/// `latest` and `checkpoints` fail with one line naming the jobs instead of answering
/// "none".
#[test]
fn json_outputs_are_versioned_and_a_parent_directory_is_named() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let demo = run(&demo_args(cp, "versioned", &root, &[]));
    demo.expect(0);
    let job = checkpoints.join("versioned");
    let latest = run(&["latest", path_str(&job), "--json"]);
    latest.expect(0);
    let url = latest.json()["latest"].as_str().unwrap().to_string();
    let docs = [
        demo.json(),
        latest.json(),
        run(&["checkpoints", path_str(&job), "--json"]).json(),
        run(&["inspect", &url, "--json"]).json(),
        run(&["verify", &url, "--json"]).json(),
        run(&["gc", path_str(&job), "--dry-run", "--json"]).json(),
        run(&["key-group", "user-1", "--parallelism", "4", "--json"]).json(),
    ];
    for doc in &docs {
        assert_eq!(doc["schema_version"], 1, "{doc}");
    }
    for command in ["latest", "checkpoints"] {
        let parent = run(&[command, cp]);
        assert_error_line(&parent, command);
        assert!(
            parent.stderr.contains("versioned") && parent.stderr.contains("job directories"),
            "{}",
            parent.context()
        );
    }
}

/// Reads `status --json` of `job` until `done` holds for it (at most 120 s).
fn wait_for_status(job: &Path, what: &str, done: impl Fn(&Run, &Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let status = run(&["status", path_str(job), "--json"]);
        if status.stdout.trim().starts_with('{') {
            let doc = status.json();
            if done(&status, &doc) {
                return doc;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not reached in time; last status:\n{}",
            status.context()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `rockstate status` of a running job, then of the same job after kill -9.
///
/// Proves: the status shows the writer, completed checkpoints with their sync and async
/// parts and bytes, and is fresh while the job runs (exit 0); once the process is gone it
/// turns stale (exit 5) after three status intervals; a directory where no job ran exits
/// 1, a missing one 7.
#[test]
fn status_follows_a_running_job_and_turns_stale_after_a_crash() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let job = checkpoints.join("watched");
    let mut child = command(
        &demo_args(
            cp,
            "watched",
            &root,
            &["--rate", "3000", "--status-interval", "300ms"],
        ),
        NO_ENV,
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("start the demo");
    let doc = wait_for_status(&job, "two completed checkpoints", |run, doc| {
        run.code() == Some(0) && doc["status"]["completed"].as_u64().unwrap_or(0) >= 2
    });
    assert_eq!(doc["stale"], false, "{doc}");
    assert_eq!(doc["status"]["state"], "running", "{doc}");
    assert!(doc["schema_version"].is_number(), "{doc}");
    let last = &doc["status"]["recent"][0];
    assert_eq!(last["outcome"], "completed", "{doc}");
    assert!(
        last["sync_ms"].is_number() && last["async_ms"].is_number(),
        "{doc}"
    );
    assert!(last["bytes_uploaded"].as_u64().unwrap() > 0, "{doc}");
    let text = run(&["status", path_str(&job)]);
    text.expect(0);
    assert!(text.stdout.contains(": running"), "{}", text.context());
    assert!(
        text.stdout.contains("last completed:"),
        "{}",
        text.context()
    );

    child.kill().expect("kill -9 the demo");
    child.wait().unwrap();
    let doc = wait_for_status(&job, "a stale status", |run, doc| {
        run.code() == Some(5) && doc["stale"] == true
    });
    assert!(
        doc["stale_reason"]
            .as_str()
            .unwrap()
            .contains("not refreshed"),
        "{doc}"
    );
    let text = run(&["status", path_str(&job)]);
    assert_eq!(text.code(), Some(5), "{}", text.context());
    assert!(text.stdout.contains("STALE"), "{}", text.context());

    let missing = run(&["status", path_str(&root.join("nothing-here"))]);
    assert_eq!(missing.code(), Some(7), "{}", missing.context());
    fs::create_dir_all(root.join("empty")).unwrap();
    let none = run(&["status", path_str(&root.join("empty"))]);
    assert_eq!(none.code(), Some(1), "{}", none.context());
}

/// `-h` and `--help` print help for the tool and every command (no command uses `-h`
/// for anything else), and the exit codes are documented in the top-level help.
#[test]
fn help_is_short_and_long_everywhere() {
    let commands: &[&[&str]] = &[
        &[],
        &["demo"],
        &["checkpoints"],
        &["latest"],
        &["status"],
        &["inspect"],
        &["verify"],
        &["savepoint"],
        &["savepoint", "trigger"],
        &["savepoint", "dispose"],
        &["stop"],
        &["gc"],
        &["bench"],
        &["key-group"],
        &["completions"],
        &["man"],
        &["state"],
        &["state", "ls"],
    ];
    for command in commands {
        for flag in ["-h", "--help"] {
            let mut args: Vec<&str> = command.to_vec();
            args.push(flag);
            let help = run(&args);
            help.expect(0);
            assert!(
                help.stdout.contains("Usage:"),
                "{args:?}\n{}",
                help.context()
            );
        }
    }
    // Completions and the manual page come from the same definition.
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        script.expect(0);
        assert!(
            script.stdout.contains("status"),
            "{shell}\n{}",
            script.context()
        );
    }
    let man = run(&["man"]);
    man.expect(0);
    assert!(man.stdout.contains(".TH rockstate 1"), "{}", man.context());
    assert!(man.stdout.contains("savepoint"), "{}", man.context());
    // A misspelt command or flag: one line, with clap's suggestion kept.
    let typo = run(&["stauts", "./job"]);
    assert_error_line(&typo, "a misspelt command");
    assert!(typo.stderr.contains("'status'"), "{}", typo.context());
    let typo = run(&["status", "./job", "--wacth", "1s"]);
    assert_error_line(&typo, "a misspelt flag");
    assert!(typo.stderr.contains("--watch"), "{}", typo.context());
    let top = run(&["--help"]);
    for code in [
        "0  success",
        "1  nothing to show",
        "2  bad input",
        "4  ",
        "5  ",
        "6  storage failed",
        "7  not found",
    ] {
        assert!(
            top.stdout.contains(code),
            "exit code {code:?} undocumented\n{}",
            top.context()
        );
    }
}

/// One HTTP GET of `path` on `addr`: the response body, or `None` while nothing listens.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The value of the sample `name{labels}` (labels as printed) in a Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The binary allocates through jemalloc, which serves the process's `malloc` too
/// (RocksDB's allocations): asked through its environment variable, it prints its
/// statistics banner at exit. A build that fell back to the system allocator prints none.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[test]
fn the_binary_allocates_through_jemalloc() {
    let run = run_env(&["--version"], &[("MALLOC_CONF", "stats_print:true")]);
    run.expect(0);
    assert!(
        run.stderr.contains("jemalloc statistics"),
        "no jemalloc statistics at exit:\n{}",
        run.context()
    );
}

/// `rockstate demo --metrics-addr` serves the metrics in the Prometheus text format.
///
/// Proves: scraped over HTTP while the job runs, the checkpoint counter moves between
/// two scrapes, the bytes uploaded, sync pauses and RocksDB's per-subtask figures are
/// there with their labels and help texts; an address in use is refused with one line.
#[test]
fn the_metrics_endpoint_is_scraped_while_the_job_runs() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = command(
        &demo_args(
            cp,
            "scraped",
            &root,
            &["--rate", "3000", "--metrics-addr", &addr],
        ),
        NO_ENV,
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("start the demo");
    let completed = r#"rockstate_checkpoints_completed_total{job="scraped"}"#;
    let scrape_until = |what: &str, done: &dyn Fn(&str) -> bool| -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Some(page) = http_get(&addr, "/metrics") {
                if done(&page) {
                    return page;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not scraped in time"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let first = scrape_until("a completed checkpoint", &|p| {
        sample(p, completed).is_some_and(|n| n >= 1.0)
    });
    let before = sample(&first, completed).unwrap();
    let second = scrape_until("another completed checkpoint", &|p| {
        sample(p, completed).is_some_and(|n| n > before)
    });
    for series in [
        r#"rockstate_checkpoint_uploaded_bytes_total{job="scraped"}"#,
        r#"rockstate_checkpoint_last_uploaded_bytes{job="scraped"}"#,
        r#"rockstate_checkpoint_duration_seconds_count{job="scraped"}"#,
        "rockstate_snapshot_sync_seconds_count",
        r#"rockstate_rocksdb_memtable_bytes{job="scraped",operator="counter",subtask="0"}"#,
        r#"rockstate_rocksdb_estimated_keys{job="scraped",operator="counter",subtask="1"}"#,
        r#"rockstate_rocksdb_block_cache_hits_total{job="scraped",operator="counter",subtask="0"}"#,
        r#"rockstate_value_cache_lookups_total{job="scraped",operator="counter",subtask="1"}"#,
        r#"rockstate_value_cache_hits_total{job="scraped",operator="counter",subtask="0"}"#,
        r#"rockstate_value_cache_bytes{job="scraped",operator="counter",subtask="1"}"#,
    ] {
        assert!(
            sample(&second, series).is_some_and(|v| v > 0.0),
            "{series} missing or zero in:\n{second}"
        );
    }
    assert!(
        second.contains("# HELP rockstate_checkpoints_completed_total checkpoints committed"),
        "{second}"
    );
    // The port is taken now: a second job cannot serve there.
    let taken = run(&demo_args(cp, "second", &root, &["--metrics-addr", &addr]));
    assert_error_line(&taken, "metrics address in use");
    assert!(
        taken.stderr.contains("cannot serve metrics"),
        "{}",
        taken.context()
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `rockstate state ls` reads a snapshot without a job.
///
/// Proves: the demo's three states are listed with their kinds and types, and their entry
/// counts add up to the entries the job itself counted at its last checkpoint; a missing
/// snapshot exits 7.
#[test]
fn state_ls_counts_what_the_job_wrote() {
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let run_doc = run(&demo_args(path_str(&checkpoints), "listed", &root, &[]));
    run_doc.expect(0);
    let doc = run_doc.json();
    let last = doc["last_checkpoint"].as_str().unwrap().to_string();
    let listed = run(&["state", "ls", &last, "--json"]);
    listed.expect(0);
    let ls = listed.json();
    let counter = ls["operators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|op| op["uid"] == "counter")
        .expect("the counter operator");
    let states = counter["states"].as_array().unwrap();
    let kinds: Vec<(&str, &str)> = states
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [("count", "value"), ("histogram", "map"), ("recent", "list")]
    );
    let total: u64 = states.iter().map(|s| s["entries"].as_u64().unwrap()).sum();
    assert_eq!(total, doc["state_entries"].as_u64().unwrap(), "{ls}");
    let text = run(&["state", "ls", &last]);
    text.expect(0);
    assert!(text.stdout.contains("histogram"), "{}", text.context());
    let missing = run(&["state", "ls", path_str(&root.join("nothing"))]);
    assert_eq!(missing.code(), Some(7), "{}", missing.context());
}

/// `rockstate state dump` decodes the demo's three states into JSON through the
/// recorded type structures, with no program types: every entry equals what the job's
/// own descriptors read from the same checkpoint. `state get` finds one key's entries
/// (exit 1 for a key that has none), and `key-group --like` hashes a key in the recorded
/// key type, as the library does.
#[test]
fn state_dump_and_get_decode_what_the_job_wrote() {
    use std::collections::BTreeMap;
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let run_doc = run(&demo_args(path_str(&checkpoints), "dumped", &root, &[]));
    run_doc.expect(0);
    let last = run_doc.json()["last_checkpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let dump = |state: &str| -> Vec<serde_json::Value> {
        let out = run(&[
            "state",
            "dump",
            &last,
            "--operator",
            "counter",
            "--state",
            state,
        ]);
        out.expect(0);
        out.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let counts: BTreeMap<String, u64> = dump("count")
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_string(),
                e["value"].as_u64().unwrap(),
            )
        })
        .collect();
    let recent: BTreeMap<String, Vec<u64>> = dump("recent")
        .iter()
        .map(|e| {
            let values = e["value"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap());
            (e["key"].as_str().unwrap().to_string(), values.collect())
        })
        .collect();
    let mut histogram: BTreeMap<(String, u8), u64> = BTreeMap::new();
    for e in dump("histogram") {
        let bucket = e["user_key"].as_u64().unwrap() as u8;
        histogram.insert(
            (e["key"].as_str().unwrap().to_string(), bucket),
            e["value"].as_u64().unwrap(),
        );
    }

    // The same checkpoint read through the job's descriptors.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let scratch = root.join("scratch");
    let keyed = rt.block_on(async {
        rockstate::restore::SavepointReader::open(&last, &scratch)
            .await
            .unwrap()
            .keyed_state("counter")
            .await
            .unwrap()
    });
    let count = keyed
        .register(rockstate::ValueStateDescriptor::<String, u64>::new("count"))
        .unwrap();
    let list = keyed
        .register(rockstate::ListStateDescriptor::<String, u64>::new("recent"))
        .unwrap();
    let map = keyed
        .register(rockstate::MapStateDescriptor::<String, u8, u64>::new(
            "histogram",
        ))
        .unwrap();
    let mut keys = 0;
    let mut entries = 0;
    for key in count.all_keys().unwrap() {
        let (key, ()) = key.unwrap();
        keys += 1;
        assert_eq!(counts.get(&key).copied(), count.get(&key).unwrap(), "{key}");
        assert_eq!(
            recent.get(&key).cloned().unwrap_or_default(),
            list.get(&key).unwrap()
        );
        for entry in map.iter(&key).unwrap() {
            let (bucket, n) = entry.unwrap();
            assert_eq!(
                histogram.get(&(key.clone(), bucket)),
                Some(&n),
                "{key}/{bucket}"
            );
            entries += 1;
        }
    }
    assert_eq!(keys, counts.len());
    assert!(keys > 100, "{keys} keys");
    assert_eq!(entries, histogram.len());

    let (key, n) = counts.iter().next().unwrap();
    let got = run(&[
        "state",
        "get",
        &last,
        "--operator",
        "counter",
        "--state",
        "count",
        "--key",
        key,
    ]);
    got.expect(0);
    let line: serde_json::Value = serde_json::from_str(got.stdout.trim()).unwrap();
    assert_eq!(line["value"].as_u64(), Some(*n), "{}", got.context());
    let kg = run(&[
        "key-group",
        key,
        "--like",
        &last,
        "--operator",
        "counter",
        "--state",
        "count",
        "--json",
    ]);
    kg.expect(0);
    let max = kg.json()["max_parallelism"].as_u64().unwrap() as u32;
    assert_eq!(
        kg.json()["key_group"],
        rockstate::key_group_for(key, max).unwrap()
    );
    assert_eq!(line["key_group"], kg.json()["key_group"]);
    let none = run(&[
        "state",
        "get",
        &last,
        "--operator",
        "counter",
        "--state",
        "count",
        "--key",
        "no-such-key",
    ]);
    assert_eq!(none.code(), Some(1), "{}", none.context());
    let wrong = run(&[
        "state",
        "get",
        &last,
        "--operator",
        "counter",
        "--state",
        "histogram-x",
        "--key",
        "a",
    ]);
    assert_eq!(wrong.code(), Some(2), "{}", wrong.context());
    let limited = run(&[
        "state",
        "dump",
        &last,
        "--operator",
        "counter",
        "--state",
        "count",
        "--limit",
        "3",
    ]);
    limited.expect(0);
    assert_eq!(limited.stdout.lines().count(), 3);
}

/// A checkpoint of a running demo rewritten offline by `SavepointWriter` (every state of
/// the keyed operator copied raw, the source's offsets carried over, one operator renamed
/// and back) resumes to the uninterrupted run's state on the harness at parallelism 3 and
/// on timely with two workers.
#[test]
fn a_savepoint_rewritten_offline_resumes_on_both_engines() {
    use rockstate::restore::{SavepointReader, SavepointWriter};
    let (_dir, root) = temp_root();
    let checkpoints = root.join("checkpoints");
    let cp = path_str(&checkpoints);
    let first = run(&demo_args_with_events(
        cp,
        "partial",
        &root,
        EVENTS / 2,
        &[],
    ));
    first.expect(0);
    let partial = first.json()["last_checkpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let savepoints =
        rockstate::CheckpointStorage::open(path_str(&root.join("savepoints"))).unwrap();
    let written = rt.block_on(async {
        let reader = SavepointReader::open(&partial, root.join("read"))
            .await
            .unwrap();
        let max = reader.metadata().operators[0].max_parallelism;
        let mut writer = SavepointWriter::new(max, root.join("write")).unwrap();
        let uids: Vec<String> = reader
            .metadata()
            .operators
            .iter()
            .map(|o| o.uid.clone())
            .collect();
        for uid in uids {
            let op = writer.operator(&uid).unwrap();
            let has_keyed = reader
                .metadata()
                .operator(&uid)
                .unwrap()
                .subtasks
                .iter()
                .any(|s| s.keyed.is_some());
            if has_keyed {
                let keyed = reader.keyed_state(&uid).await.unwrap();
                let copied = op
                    .copy_keyed_state(&keyed, |_| true, |_, _, _| true)
                    .unwrap();
                assert!(copied > 0);
                keyed.close().unwrap();
            }
            let states = reader.operator_states(&uid).unwrap();
            *op.operator_state_mut() = rockstate::format::redistribute(&states, 1)
                .unwrap()
                .remove(0);
        }
        let (folder, _) = writer.write(&savepoints, "rewritten").await.unwrap();
        folder.url().to_string()
    });
    let harness = run(&demo_args(
        cp,
        "from-written",
        &root,
        &["--from", &written, "--parallelism", "3"],
    ));
    assert_reference_state(&harness);
    let timely = run(&demo_args(
        cp,
        "from-written-timely",
        &root,
        &["--from", &written, "--engine", "timely", "--threads", "2"],
    ));
    assert_reference_state(&timely);
}

/// `rockstate key-group` hashes keys of the common key types as the library does.
#[test]
fn key_group_takes_typed_keys() {
    let check = |key: &str, key_type: &str, expected: u16| {
        let run = run(&[
            "key-group",
            key,
            "--key-type",
            key_type,
            "--max-parallelism",
            "128",
            "--json",
        ]);
        run.expect(0);
        let doc = run.json();
        assert_eq!(doc["key_group"], expected, "{key} as {key_type}: {doc}");
        assert_eq!(doc["key_type"], key_type);
    };
    check(
        "user-42",
        "string",
        rockstate::key_group_for("user-42", 128).unwrap(),
    );
    check(
        "1234567",
        "u64",
        rockstate::key_group_for(&1_234_567u64, 128).unwrap(),
    );
    check("-5", "i32", rockstate::key_group_for(&-5i32, 128).unwrap());
    check("7", "u32", rockstate::key_group_for(&7u32, 128).unwrap());
    check(
        "true",
        "bool",
        rockstate::key_group_for(&true, 128).unwrap(),
    );
    let bad = run(&["key-group", "x", "--key-type", "u64"]);
    assert_error_line(&bad, "a key that is not a u64");
}
