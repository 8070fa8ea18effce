//! Canonical savepoints and rescaling on a large state.
//!
//! Writes `ROCKSTATE_BENCH_MIB` MiB (default 512) of 1 KiB values spread over 4 subtasks,
//! checkpoints them to a local-file store, then measures:
//! - the canonical savepoint write rate against a full scan of the same databases;
//! - restoring the checkpoint at parallelism 3 (4→3) by SST ingestion and by
//!   iterate-and-write, against restoring it at the same parallelism (4→4).
//!
//! Run: `cargo bench --bench rescale`.

use std::path::Path;
use std::time::{Duration, Instant};

use rockstate::checkpoint::{AckOutcome, CheckpointCoordinator, CoordinatorOptions, OperatorSpec};
use rockstate::savepoint::Compression;
use rockstate::{
    BackendOptions, CheckpointStorage, RescaleStrategy, RestoreOptions, RestoreSource,
    RocksStateBackend, SavepointFormat, SubtaskSnapshot, ValueStateDescriptor,
};

const MAX_PAR: u32 = 128;
const VALUE_LEN: usize = 1024;
const UID: &str = "op";

fn value(key: u64) -> Vec<u8> {
    let mut x = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..VALUE_LEN / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

async fn take(
    coordinator: &mut CheckpointCoordinator,
    backends: &[RocksStateBackend],
    job: &CheckpointStorage,
    savepoint: Option<&CheckpointStorage>,
) -> (RestoreSource, u64) {
    let (id, folder) = match savepoint {
        Some(dir) => {
            let t = coordinator
                .trigger_savepoint(Some(dir), SavepointFormat::Canonical)
                .unwrap();
            (t.checkpoint_id, Some(t.folder))
        }
        None => (coordinator.trigger().unwrap(), None),
    };
    let mut meta = None;
    let mut bytes = 0;
    for (i, b) in backends.iter().enumerate() {
        let pending = b.snapshot(id).unwrap();
        let keyed = match &folder {
            Some(f) => pending
                .write_savepoint(
                    f,
                    UID,
                    i as u32,
                    SavepointFormat::Canonical,
                    Compression::Lz4,
                )
                .await
                .unwrap(),
            None => pending.upload(job, UID, i as u32).await.unwrap().into(),
        };
        bytes += keyed.total_size();
        let ack = SubtaskSnapshot {
            keyed: Some(keyed),
            ..Default::default()
        };
        if let AckOutcome::Completed(m) = coordinator
            .acknowledge(id, UID, i as u32, ack)
            .await
            .unwrap()
        {
            meta = Some(*m);
        }
    }
    let source = match folder {
        Some(f) => RestoreSource::open_folder(&f).await.unwrap(),
        None => RestoreSource::checkpoint(job, meta.unwrap()),
    };
    (source, bytes)
}

async fn restore(
    source: &RestoreSource,
    root: &Path,
    p: u32,
    strategy: RescaleStrategy,
) -> Duration {
    let started = Instant::now();
    let mut backends = Vec::new();
    for i in 0..p {
        let o =
            BackendOptions::for_subtask(root.join(format!("{p}-{strategy:?}-{i}")), i, p, MAX_PAR)
                .unwrap();
        let options = RestoreOptions {
            strategy,
            ..Default::default()
        };
        backends.push(
            RocksStateBackend::builder(o)
                .restore_operator(source, UID, &options)
                .await
                .unwrap(),
        );
    }
    let elapsed = started.elapsed();
    drop(backends);
    elapsed
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("rescale: bench");
        return;
    }
    let state_mib: u64 = std::env::var("ROCKSTATE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let keys = state_mib * (1 << 20) / VALUE_LEN as u64;
    let tmp =
        tempfile::tempdir_in(std::env::var("ROCKSTATE_BENCH_DIR").unwrap_or(".".into())).unwrap();
    let store = CheckpointStorage::open(tmp.path().join("store").to_str().unwrap()).unwrap();
    let job = store.child("job").unwrap();
    let savepoints = store.child("savepoints").unwrap();
    let specs = vec![OperatorSpec {
        uid: UID.into(),
        parallelism: 4,
        max_parallelism: MAX_PAR,
    }];
    let mut coordinator =
        CheckpointCoordinator::start(job.clone(), "bench", specs, CoordinatorOptions::default())
            .await
            .unwrap();
    let backends: Vec<RocksStateBackend> = (0..4)
        .map(|i| {
            let o = BackendOptions::for_subtask(tmp.path().join(format!("src-{i}")), i, 4, MAX_PAR)
                .unwrap();
            RocksStateBackend::open(o).unwrap()
        })
        .collect();
    let states: Vec<_> = backends
        .iter()
        .map(|b| {
            b.register(ValueStateDescriptor::<u64, Vec<u8>>::new("v"))
                .unwrap()
        })
        .collect();
    for key in 0..keys {
        let s = rockstate::subtask_for_key(&key, 4, MAX_PAR).unwrap();
        states[s as usize].put(&key, &value(key)).unwrap();
    }
    for b in &backends {
        b.flush().unwrap();
    }
    println!("state: {keys} keys, {state_mib} MiB of values, 4 subtasks");

    // Full scan of the same data, the baseline for the savepoint writer.
    let started = Instant::now();
    let mut scanned = 0u64;
    for s in &states {
        for k in s.all_keys().unwrap() {
            let (k, ()) = k.unwrap();
            scanned += s.get(&k).unwrap().map_or(0, |v| v.len() as u64);
        }
    }
    let scan = started.elapsed();
    let started = Instant::now();
    let (_, savepoint_bytes) = take(&mut coordinator, &backends, &job, Some(&savepoints)).await;
    let savepoint = started.elapsed();
    let scan_rate = scanned as f64 / (1 << 20) as f64 / secs(scan);
    let savepoint_rate = state_mib as f64 / secs(savepoint);
    println!(
        "canonical savepoint: {:.1} s, {:.0} MiB/s of state ({:.0} MiB written); full scan {:.1} s, {:.0} MiB/s; ratio {:.2}",
        secs(savepoint),
        savepoint_rate,
        savepoint_bytes as f64 / (1 << 20) as f64,
        secs(scan),
        scan_rate,
        savepoint_rate / scan_rate
    );

    let (checkpoint, bytes) = take(&mut coordinator, &backends, &job, None).await;
    drop(states);
    drop(backends);
    println!("checkpoint: {:.0} MiB", bytes as f64 / (1 << 20) as f64);
    let same = restore(&checkpoint, tmp.path(), 4, RescaleStrategy::Ingest).await;
    let ingest = restore(&checkpoint, tmp.path(), 3, RescaleStrategy::Ingest).await;
    let iterate = restore(&checkpoint, tmp.path(), 3, RescaleStrategy::IterateAndWrite).await;
    println!(
        "restore 4->4 {:.1} s; rescale 4->3 by ingestion {:.1} s ({:.2}x), by iterate-and-write {:.1} s ({:.2}x)",
        secs(same),
        secs(ingest),
        secs(ingest) / secs(same),
        secs(iterate),
        secs(iterate) / secs(same)
    );
}
