//! Restoring one subtask (64 MiB of 1 KiB values) beside a plain copy of the same files,
//! and opening a backend beside RocksDB's own open of the same database.
//!
//! - `plain_copy`: `std::fs::copy` of every file of the checkpoint, the baseline;
//! - `local_files`: a restore from a local-file store (SST files hard-linked, every byte
//!   read once for the CRC32 check, the other files copied);
//! - `streamed`: the same files streamed through the object-store API, as from a remote
//!   store;
//! - `local_recovery`: the streamed store, but the subtask's earlier directory is still on
//!   this machine, so matching files are checked and taken from it.
//!
//! And opening a backend of three states whose database holds a few files (`open`):
//! - `rockstate`: [`RocksStateBackend::open`] of the closed backend's directory;
//! - `rocksdb_defaults`: a copy of the same database opened by RocksDB with its default
//!   options (one column family descriptor per family listed), the baseline. Its default
//!   starts 16 threads per column family to open table files; the backend starts one per
//!   32 files.
//!
//! Run: `cargo bench --bench restore`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use rockstate::{
    BackendOptions, CheckpointStorage, KeyedStateHandle, ListStateDescriptor, MapStateDescriptor,
    RocksStateBackend, ValueState, ValueStateDescriptor,
};

const MAX_PAR: u32 = 128;
const KEYS: u64 = 64 << 10;

struct Fixture {
    _work: tempfile::TempDir,
    work: PathBuf,
    store_dir: PathBuf,
    source_dir: PathBuf,
    local: CheckpointStorage,
    streamed: CheckpointStorage,
    handle: KeyedStateHandle,
}

fn options(dir: &Path) -> BackendOptions {
    BackendOptions::for_subtask(dir, 0, 1, MAX_PAR).unwrap()
}

fn fixture(runtime: &tokio::runtime::Runtime) -> Fixture {
    let work = tempfile::tempdir().unwrap();
    let store_dir = work.path().join("store");
    let source_dir = work.path().join("source");
    let local = CheckpointStorage::open(store_dir.to_str().unwrap()).unwrap();
    let backend = RocksStateBackend::open(options(&source_dir)).unwrap();
    let state: ValueState<u64, Vec<u8>> = backend.register(ValueStateDescriptor::new("v")).unwrap();
    for key in 0..KEYS {
        // Incompressible, as a real state's values mostly are after compression.
        let mut x = key.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let value: Vec<u8> = (0..128)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        state.put(&key, &value).unwrap();
    }
    let pending = backend.snapshot(1).unwrap();
    let handle = runtime
        .block_on(pending.upload(&local, "bench", 0))
        .unwrap();
    backend.notify_checkpoint_complete(1);
    drop(state);
    backend.close().unwrap();
    let streamed_store = object_store::local::LocalFileSystem::new_with_prefix(&store_dir).unwrap();
    let streamed = CheckpointStorage::from_store(Arc::new(streamed_store), "streamed");
    Fixture {
        work: work.path().to_path_buf(),
        _work: work,
        store_dir,
        source_dir,
        local,
        streamed,
        handle,
    }
}

fn restore(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let f = fixture(&runtime);
    let target = |name: &str| {
        let dir = f.work.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        dir
    };
    let mut group = c.benchmark_group("restore_64_mib");
    group.bench_function("plain_copy", |b| {
        b.iter_batched(
            || target("copy"),
            |dir| {
                std::fs::create_dir_all(&dir).unwrap();
                for file in f.handle.files() {
                    std::fs::copy(f.store_dir.join(&file.path), dir.join(&file.local_name))
                        .unwrap();
                }
            },
            BatchSize::PerIteration,
        )
    });
    let cases: [(&str, &CheckpointStorage, Vec<PathBuf>); 3] = [
        ("local_files", &f.local, Vec::new()),
        ("streamed", &f.streamed, Vec::new()),
        ("local_recovery", &f.streamed, vec![f.source_dir.clone()]),
    ];
    for (name, store, reuse) in cases {
        group.bench_function(name, |b| {
            b.iter_batched(
                || target(name),
                |dir| {
                    let backend = runtime
                        .block_on(
                            RocksStateBackend::builder(options(&dir))
                                .reuse_local_files(reuse.iter().cloned())
                                .restore(&f.handle, store),
                        )
                        .unwrap();
                    backend.close().unwrap();
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// Only the opens are timed: each backend is closed (so that it reopens) outside them.
fn open(c: &mut Criterion) {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("backend");
    let backend = RocksStateBackend::open(options(&dir)).unwrap();
    let value = backend
        .register(ValueStateDescriptor::<u64, u64>::new("count"))
        .unwrap();
    let list = backend
        .register(ListStateDescriptor::<u64, u64>::new("recent"))
        .unwrap();
    let map = backend
        .register(MapStateDescriptor::<u64, u8, u64>::new("histogram"))
        .unwrap();
    // A few flushes: a few files per state, as a subtask's database holds between
    // compactions.
    for round in 0..3u64 {
        for key in 0..20_000u64 {
            value.put(&key, &round).unwrap();
            list.add(&key, &round).unwrap();
            map.put(&key, &((key % 10) as u8), &round).unwrap();
        }
        backend.flush().unwrap();
    }
    drop((value, list, map));
    backend.close().unwrap();
    let raw_dir = work.path().join("raw");
    std::fs::create_dir_all(&raw_dir).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), raw_dir.join(entry.file_name())).unwrap();
        }
    }
    let mut group = c.benchmark_group("open");
    group.bench_function("rockstate", |b| {
        b.iter_custom(|iters| {
            timed_opens(
                iters,
                || RocksStateBackend::open(options(&dir)).unwrap(),
                |backend| backend.close().unwrap(),
            )
        })
    });
    group.bench_function("rocksdb_defaults", |b| {
        b.iter_custom(|iters| {
            timed_opens(
                iters,
                || {
                    let opts = rocksdb::Options::default();
                    let names = rocksdb::DB::list_cf(&opts, &raw_dir).unwrap();
                    rocksdb::DB::open_cf(&opts, &raw_dir, names).unwrap()
                },
                drop,
            )
        })
    });
    group.finish();
}

/// Time spent in `open` over `iters` opens, each closed by `close` outside the timing.
fn timed_opens<T>(iters: u64, mut open: impl FnMut() -> T, mut close: impl FnMut(T)) -> Duration {
    let mut timed = Duration::ZERO;
    for _ in 0..iters {
        let started = std::time::Instant::now();
        let opened = open();
        timed += started.elapsed();
        close(opened);
    }
    timed
}

criterion_group! {
    name = open_benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = open
}

criterion_group! {
    name = restore_benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    targets = restore
}
criterion_main!(restore_benches, open_benches);
