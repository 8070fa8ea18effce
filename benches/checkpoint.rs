//! Incremental vs full checkpoints, and restore vs a plain copy, on a large state.
//!
//! Writes `ROCKSTATE_BENCH_MIB` MiB of values (default 512) into one backend, takes a first
//! checkpoint, then `ROCKSTATE_BENCH_ROUNDS` rounds (default 5) that each update 1% of the
//! keys and checkpoint to a local-file store. Reports, per round and as medians: bytes
//! uploaded by the incremental checkpoint against the bytes a full checkpoint uploads
//! (every file of the same checkpoint), the sync-phase and async-phase times; then the time
//! to restore the last checkpoint against a plain copy of the same files.
//!
//! Run: `cargo bench --bench checkpoint`.

use std::time::{Duration, Instant};

use rockstate::{
    BackendOptions, CheckpointStorage, KeyGroupRange, RocksStateBackend, ValueStateDescriptor,
};

const MAX_PAR: u32 = 128;
const VALUE_LEN: usize = 1024;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Deterministic, poorly compressible value bytes.
fn value(key: u64, round: u64) -> Vec<u8> {
    let mut x = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round;
    (0..VALUE_LEN / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("checkpoint: bench");
        return;
    }
    let state_mib = env_or("ROCKSTATE_BENCH_MIB", 512);
    let rounds = env_or("ROCKSTATE_BENCH_ROUNDS", 5).max(1);
    let keys = state_mib * (1 << 20) / VALUE_LEN as u64;
    let work = tempfile::tempdir().unwrap();
    let job = CheckpointStorage::open(work.path().join("store").to_str().unwrap())
        .unwrap()
        .child("bench")
        .unwrap();

    let options = BackendOptions::new(
        work.path().join("db"),
        KeyGroupRange::all(MAX_PAR).unwrap(),
        MAX_PAR,
    );
    let backend = RocksStateBackend::open(options).unwrap();
    let state = backend
        .register(ValueStateDescriptor::<u64, Vec<u8>>::new("blob"))
        .unwrap();
    let started = Instant::now();
    for k in 0..keys {
        state.put(&k, &value(k, 0)).unwrap();
    }
    println!(
        "state: {keys} keys x {VALUE_LEN} B = {state_mib} MiB written in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let first = backend.snapshot(1).unwrap();
    let sync = first.sync_duration();
    let t = Instant::now();
    let mut handle = first.upload(&job, "bench", 0).await.unwrap();
    backend.notify_checkpoint_complete(1);
    println!(
        "checkpoint 1 (initial): {:.1} MiB in {} files, sync {:.0} ms, upload {:.0} ms",
        mib(handle.uploaded_bytes),
        handle.files().count(),
        ms(sync),
        ms(t.elapsed())
    );

    let mut uploaded = Vec::new();
    let mut full = Vec::new();
    let mut syncs = Vec::new();
    let mut asyncs = Vec::new();
    println!("round  updated  incremental MiB  full MiB  ratio   sync ms  async ms");
    for round in 1..=rounds {
        let step = 100;
        for k in (round % step..keys).step_by(step as usize) {
            state.put(&k, &value(k, round)).unwrap();
        }
        let id = round + 1;
        let pending = backend.snapshot(id).unwrap();
        let sync = pending.sync_duration();
        let t = Instant::now();
        handle = pending.upload(&job, "bench", 0).await.unwrap();
        let upload = t.elapsed();
        backend.notify_checkpoint_complete(id);
        let ratio = handle.uploaded_bytes as f64 / handle.total_size() as f64;
        println!(
            "{round:>5}  {:>6}  {:>15.1}  {:>8.1}  {:>5.3}  {:>8.0}  {:>8.0}",
            keys / step,
            mib(handle.uploaded_bytes),
            mib(handle.total_size()),
            ratio,
            ms(sync),
            ms(upload)
        );
        uploaded.push(handle.uploaded_bytes as f64);
        full.push(handle.total_size() as f64);
        syncs.push(ms(sync));
        asyncs.push(ms(upload));
    }
    let (mu, mf) = (median(uploaded), median(full));
    println!(
        "median: incremental {:.1} MiB vs full {:.1} MiB (ratio {:.3}); sync {:.0} ms; async {:.0} ms",
        mu / (1 << 20) as f64,
        mf / (1 << 20) as f64,
        mu / mf,
        median(syncs),
        median(asyncs)
    );

    // Restore of the last checkpoint vs a plain copy of the same files.
    let store_root = work.path().join("store").join("bench");
    let copy_dir = work.path().join("copy");
    std::fs::create_dir_all(&copy_dir).unwrap();
    let t = Instant::now();
    for f in handle.files() {
        std::fs::copy(store_root.join(&f.path), copy_dir.join(&f.local_name)).unwrap();
    }
    let copy = t.elapsed();
    let t = Instant::now();
    let options = BackendOptions::new(
        work.path().join("restored"),
        KeyGroupRange::all(MAX_PAR).unwrap(),
        MAX_PAR,
    );
    let restored = RocksStateBackend::restore(options, &handle, &job)
        .await
        .unwrap();
    let restore = t.elapsed();
    let check = restored
        .register(ValueStateDescriptor::<u64, Vec<u8>>::new("blob"))
        .unwrap();
    assert_eq!(check.get(&(keys - 1)).unwrap().unwrap().len(), VALUE_LEN);
    println!(
        "restore of {:.1} MiB: {:.0} ms; plain copy of the same files: {:.0} ms; ratio {:.2}",
        mib(handle.total_size()),
        ms(restore),
        ms(copy),
        restore.as_secs_f64() / copy.as_secs_f64()
    );
}
