//! Restoring one subtask (64 MiB of 1 KiB values) beside a plain copy of the same files.
//!
//! - `plain_copy`: `std::fs::copy` of every file of the checkpoint, the baseline;
//! - `local_files`: a restore from a local-file store (SST files hard-linked, every byte
//!   read once for the CRC32 check, the other files copied);
//! - `streamed`: the same files streamed through the object-store API, as from a remote
//!   store;
//! - `local_recovery`: the streamed store, but the subtask's earlier directory is still on
//!   this machine, so matching files are checked and taken from it.
//!
//! Run: `cargo bench --bench restore`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use rockstate::{
    BackendOptions, CheckpointStorage, KeyedStateHandle, RocksStateBackend, ValueState,
    ValueStateDescriptor,
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

criterion_group! {
    name = restore_benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    targets = restore
}
criterion_main!(restore_benches);
