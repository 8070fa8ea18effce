//! Corruption of every file kind — a shared SST, a private RocksDB file, `_metadata`, a
//! canonical savepoint section — is detected by `rockstate verify` (exit 3 naming the file)
//! and by restore (an error naming the file), and resuming from the latest checkpoint
//! falls back to the previous one when the newest cannot be restored.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{command, run_env, Run, NO_ENV};

fn rockstate(args: &[&str]) -> Run {
    run_env(args, NO_ENV)
}

/// Runs the demo job; `extra` selects where it starts and where savepoints go.
fn demo(root: &Path, job: &str, extra: &[&str]) -> Run {
    let checkpoints = root.join("checkpoints");
    let local = root.join("local");
    let mut args = vec![
        "demo",
        "--checkpoint-dir",
        checkpoints.to_str().unwrap(),
        "--job-id",
        job,
        "--local-dir",
        local.to_str().unwrap(),
        // Not a multiple of the interval: the final checkpoint uploads new files.
        "--events",
        "32000",
        "--keys",
        "1000",
        "--checkpoint-interval",
        "5000",
        "--retained",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    rockstate(&args)
}

/// A finished job with two retained checkpoints; returns (job dir, newest, previous, digest).
fn finished_job(root: &Path) -> (PathBuf, String, String, String) {
    let out = demo(root, "job", &[]);
    assert!(out.status.success(), "{}", out.context());
    let digest = out.json()["state_digest"].as_str().unwrap().to_string();
    let job = root.join("checkpoints").join("job");
    let listing = json_of(&rockstate(&[
        "checkpoints",
        job.to_str().unwrap(),
        "--json",
    ]));
    let urls: Vec<String> = listing["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "completed")
        .map(|c| c["url"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(urls.len(), 2, "{listing}");
    (job, urls[1].clone(), urls[0].clone(), digest)
}

/// The last JSON line of a run.
fn json_of(run: &Run) -> serde_json::Value {
    run.json()
}

fn url_path(url: &str) -> PathBuf {
    PathBuf::from(url.strip_prefix("file://").unwrap_or(url))
}

/// The files of a snapshot, as (path relative to its root, role, uploaded_by).
fn files(url: &str) -> Vec<(String, String, u64)> {
    let doc = json_of(&rockstate(&["inspect", url, "--json"]));
    let mut out = Vec::new();
    for op in doc["operators"].as_array().unwrap() {
        for sub in op["subtasks"].as_array().unwrap() {
            for f in sub["keyed"]["files"].as_array().into_iter().flatten() {
                out.push((
                    f["path"].as_str().unwrap().to_string(),
                    f["role"].as_str().unwrap().to_string(),
                    f["uploaded_by"].as_u64().unwrap(),
                ));
            }
        }
    }
    out
}

fn flip_byte(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(file, bytes).unwrap();
}

/// `verify` exits 3 and names `file`; restoring the snapshot as a new job fails naming it.
fn assert_detected(root: &Path, snapshot: &str, file: &str) {
    let verify = rockstate(&["verify", snapshot]);
    assert_eq!(verify.status.code(), Some(3), "{}", verify.context());
    assert!(
        verify.stdout.as_str().contains(file),
        "verify does not name {file}\n{}",
        verify.context()
    );
    // As on another machine: intact local copies of the files would be taken instead.
    std::fs::remove_dir_all(root.join("local")).unwrap();
    let restore = demo(root, "restored", &["--from", snapshot]);
    assert_eq!(restore.status.code(), Some(2), "{}", restore.context());
    let stderr = restore.stderr.as_str();
    assert!(
        stderr.contains(file),
        "restore does not name {file}\n{}",
        restore.context()
    );
}

/// `--resume` skips the damaged newest checkpoint, restores the previous one, and ends in
/// the reference state.
fn assert_falls_back(root: &Path, previous: &str, digest: &str) {
    let resumed = demo(root, "job", &["--resume", "--parallelism", "3"]);
    assert!(resumed.status.success(), "{}", resumed.context());
    let doc = resumed.json();
    assert_eq!(doc["restored_from"].as_str(), Some(previous), "{doc}");
    assert_eq!(doc["state_digest"].as_str(), Some(digest), "{doc}");
}

#[test]
fn a_damaged_shared_file_is_detected_and_resume_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let (job, newest, previous, digest) = finished_job(dir.path());
    let id: u64 = newest.rsplit("chk-").next().unwrap().parse().unwrap();
    let (path, _, _) = files(&newest)
        .into_iter()
        .find(|(_, role, by)| role == "shared" && *by == id)
        .expect("the newest checkpoint uploaded a shared file");
    flip_byte(&job.join(&path));
    assert_detected(dir.path(), &newest, &path);
    assert_falls_back(dir.path(), &previous, &digest);
}

#[test]
fn a_damaged_private_file_is_detected_and_resume_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let (job, newest, previous, digest) = finished_job(dir.path());
    let (path, _, _) = files(&newest)
        .into_iter()
        .find(|(path, role, _)| role == "private" && path.contains("MANIFEST"))
        .expect("a private MANIFEST");
    flip_byte(&job.join(&path));
    assert_detected(dir.path(), &newest, &path);
    assert_falls_back(dir.path(), &previous, &digest);
}

#[test]
fn a_truncated_metadata_is_detected_and_resume_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let (_job, newest, previous, digest) = finished_job(dir.path());
    let metadata = url_path(&newest).join("_metadata");
    let bytes = std::fs::read(&metadata).unwrap();
    std::fs::write(&metadata, &bytes[..bytes.len() / 2]).unwrap();
    let verify = rockstate(&["verify", &newest]);
    assert_eq!(verify.status.code(), Some(3), "{}", verify.context());
    assert!(verify.stdout.as_str().contains("_metadata"));
    let inspect = rockstate(&["inspect", &newest]);
    assert_eq!(inspect.status.code(), Some(2), "{}", inspect.context());
    assert!(inspect.stderr.as_str().contains("_metadata"));
    assert_falls_back(dir.path(), &previous, &digest);
}

#[test]
fn a_damaged_savepoint_section_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (job, _, _, _) = finished_job(dir.path());
    // A savepoint taken from the finished job, as a stop-with-savepoint of a resumed run.
    let savepoints = dir.path().join("savepoints");
    let child = command(
        &[
            "demo",
            "--checkpoint-dir",
            dir.path().join("checkpoints").to_str().unwrap(),
            "--job-id",
            "job",
            "--local-dir",
            dir.path().join("local").to_str().unwrap(),
            "--events",
            "30000000",
            "--keys",
            "1000",
            "--resume",
            "--savepoint-dir",
            savepoints.to_str().unwrap(),
            "--json",
        ],
        NO_ENV,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = Run::from_output(child.wait_with_output().unwrap(), None);
    assert!(out.status.success(), "{}", out.context());
    let savepoint = out.json()["savepoint"].as_str().unwrap().to_string();
    drop(job);
    let (path, role, _) = files(&savepoint).into_iter().next().unwrap();
    assert_eq!(role, "data");
    // A byte inside the key-group sections, past the header.
    flip_byte(&url_path(&savepoint).join(&path));
    assert_detected(dir.path(), &savepoint, &path);
}
