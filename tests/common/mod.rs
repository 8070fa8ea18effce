//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

use rockstate::{BackendOptions, ManualClock, RocksStateBackend};

/// Max parallelism used by the tests.
pub const MAX_PAR: u32 = 128;
/// The tests' backend is subtask 0 of this many.
pub const PAR: u32 = 2;

/// Opens subtask 0 of 2 (key groups [0, 63] of 128) in `dir` with a manual clock.
pub fn open(dir: &Path, clock: &ManualClock) -> RocksStateBackend {
    let options = BackendOptions::for_subtask(dir, 0, PAR, MAX_PAR).unwrap();
    RocksStateBackend::builder(options)
        .clock(clock.clone())
        .open()
        .unwrap()
}

/// String keys that subtask 0 of 2 owns.
pub fn owned_keys(n: usize) -> Vec<String> {
    keys_of_subtask(0, n)
}

/// String keys that subtask 0 of 2 does not own.
pub fn foreign_keys(n: usize) -> Vec<String> {
    keys_of_subtask(1, n)
}

fn keys_of_subtask(subtask: u32, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("key-{i}"))
        .filter(|k| rockstate::subtask_for_key(k, PAR, MAX_PAR).unwrap() == subtask)
        .take(n)
        .collect()
}

/// Collects an iterator of results, failing the test on the first error.
pub fn collect<T>(iter: impl Iterator<Item = rockstate::Result<T>>) -> Vec<T> {
    iter.map(|r| r.unwrap()).collect()
}

pub mod snapshots;
