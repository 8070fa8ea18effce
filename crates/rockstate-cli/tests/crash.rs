//! Crash tests: the demo job is killed with SIGKILL at seeded points inside its checkpoint
//! machinery (crash points of the `testing` feature: state writes, the sync phase, between
//! file uploads, between the uploads and `_metadata`, right after `_metadata`, in the
//! middle of retention deletes), again and again, resuming each time at a seeded
//! parallelism. After every kill the latest completed checkpoint must verify (every file
//! present with its size and CRC32), and the job, resumed to the end, must hold exactly the
//! state of an uninterrupted run.
//!
//! `make test` runs 4 chains of 30 kills (120 kill points).
//! `ROCKSTATE_CRASH_KILLS=N` sets the kills per chain.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::OnceLock;

use common::{run_env, Run};

const EVENTS: u64 = 40_000;
const KEYS: u64 = 1_500;
const INTERVAL: u64 = 4_000;
const SEED: u64 = 11;

/// Crash points with the largest pass count drawn for each.
const POINTS: [(&str, u64); 6] = [
    ("record", 20_000),
    ("sync", 12),
    ("upload", 60),
    ("metadata", 8),
    ("committed", 8),
    ("retention", 6),
];

use rockstate::testing::SeededRng as Rng;

/// Runs the binary, with a crash schedule when `crash` is set.
fn rockstate(args: &[&str], crash: Option<&str>) -> Run {
    match crash {
        Some(at) => run_env(args, &[("ROCKSTATE_CRASH_AT", at)]),
        None => run_env(args, &[]),
    }
}

fn demo(root: &Path, job: &str, parallelism: u64, crash: Option<&str>) -> Run {
    let checkpoints = root.join("checkpoints");
    let local = root.join(format!("local-{job}"));
    let parallelism = parallelism.to_string();
    let (events, keys, interval, seed) = (
        EVENTS.to_string(),
        KEYS.to_string(),
        INTERVAL.to_string(),
        SEED.to_string(),
    );
    rockstate(
        &[
            "demo",
            "--checkpoint-dir",
            checkpoints.to_str().unwrap(),
            "--job-id",
            job,
            "--local-dir",
            local.to_str().unwrap(),
            "--events",
            &events,
            "--keys",
            &keys,
            "--checkpoint-interval",
            &interval,
            "--seed",
            &seed,
            "--parallelism",
            &parallelism,
            "--resume",
            "--json",
        ],
        crash,
    )
}

/// The digest of an uninterrupted run.
fn reference() -> String {
    static DIGEST: OnceLock<String> = OnceLock::new();
    DIGEST
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let out = demo(dir.path(), "reference", 2, None);
            assert!(out.status.success(), "{}", out.context());
            out.json()["state_digest"].as_str().unwrap().to_string()
        })
        .clone()
}

/// After a kill: the latest completed checkpoint, if any, is sound.
fn assert_latest_sound(root: &Path, job: &str, after: &str) {
    let job_dir = root.join("checkpoints").join(job);
    let latest = rockstate(&["latest", job_dir.to_str().unwrap()], None);
    match latest.status.code() {
        Some(1) => {}                      // killed before its first checkpoint completed
        Some(2) if !job_dir.exists() => {} // killed before the job directory existed
        Some(0) => {
            let url = latest.line().to_string();
            let verify = rockstate(&["verify", &url], None);
            assert!(
                verify.status.success(),
                "latest checkpoint {url} is not sound after a kill at {after}\n{}",
                verify.context()
            );
        }
        _ => panic!(
            "latest failed after a kill at {after}\n{}",
            latest.context()
        ),
    }
}

/// Kills jobs `kills` times at seeded crash points, resuming each time; every job that
/// reaches the end of its stream (or is resumed to it) must hold the reference state.
fn chain(seed: u64, points: &[(&str, u64)]) {
    let kills: usize = std::env::var("ROCKSTATE_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let expected = reference();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut rng = Rng::new(seed);
    let mut segment = 0;
    let mut killed = 0;
    let mut job = format!("job-{segment}");
    let mut trail = Vec::new();
    let mut finished_in_a_row = 0;
    while killed < kills {
        let (point, max) = points[rng.below(points.len() as u64) as usize];
        let at = format!("{point}:{}", 1 + rng.below(max));
        let parallelism = 1 + rng.below(3);
        let out = demo(root, &job, parallelism, Some(&at));
        trail.push(format!("{job} p={parallelism} {at}"));
        match out.status.signal() {
            Some(9) => {
                assert!(
                    out.stderr.contains("crash point"),
                    "killed by someone else\n{}",
                    out.context()
                );
                killed += 1;
                finished_in_a_row = 0;
                assert_latest_sound(root, &job, &at);
            }
            Some(other) => panic!("signal {other}\n{}", out.context()),
            None => {
                // The point was not reached that often: the job ran to its end.
                assert!(out.status.success(), "{trail:?}\n{}", out.context());
                assert_eq!(
                    out.json()["state_digest"].as_str(),
                    Some(expected.as_str()),
                    "job {job} ended in another state; runs: {trail:?}"
                );
                segment += 1;
                job = format!("job-{segment}");
                finished_in_a_row += 1;
                assert!(
                    finished_in_a_row < 10,
                    "10 runs in a row were never killed: is the binary built with the \
                     `testing` feature? runs: {trail:?}"
                );
            }
        }
    }
    let out = demo(root, &job, 1 + rng.below(3), None);
    assert!(out.status.success(), "{}", out.context());
    assert_eq!(
        out.json()["state_digest"].as_str(),
        Some(expected.as_str()),
        "resumed job ended in another state; runs: {trail:?}"
    );
}

#[test]
fn kills_in_every_checkpoint_phase_a() {
    chain(0x9e37_79b9, &POINTS);
}

#[test]
fn kills_in_every_checkpoint_phase_b() {
    chain(0x85eb_ca6b, &POINTS);
}

#[test]
fn kills_between_uploads_and_metadata() {
    chain(0xc2b2_ae35, &POINTS[1..5]);
}

#[test]
fn kills_during_retention_and_state_writes() {
    chain(0x27d4_eb2f, &[POINTS[0], POINTS[5], POINTS[4]]);
}
