//! The demo job (count, last 8 values and a histogram per key: six state operations per
//! record) through the harness, with checkpoints to local files: the record hand-off,
//! the key-ordered batches and the state accesses together.
//!
//! Run: `cargo bench --bench harness`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use rockstate::{CheckpointStorage, CoordinatorOptions};
use rockstate_harness::demo::{Counter, DemoSource, DEMO_UID};
use rockstate_harness::{Harness, HarnessConfig, StartFrom};

const EVENTS: u64 = 200_000;
const KEYS: u64 = 20_000;

fn demo(c: &mut Criterion) {
    let mut group = c.benchmark_group("harness_demo");
    group.throughput(Throughput::Elements(EVENTS));
    for parallelism in [1u32, 2] {
        group.bench_function(BenchmarkId::from_parameter(parallelism), |b| {
            b.iter_batched(
                || tempfile::tempdir().unwrap(),
                |dir| {
                    let storage =
                        CheckpointStorage::open(dir.path().join("cp").to_str().unwrap()).unwrap();
                    let config = HarnessConfig {
                        job_id: "bench".into(),
                        operator_uid: DEMO_UID.into(),
                        parallelism,
                        max_parallelism: 128,
                        local_root: dir.path().join("local"),
                        checkpoint_interval: EVENTS / 10,
                        memory_budget: 64 << 20,
                        rocksdb_statistics: false,
                        coordinator: CoordinatorOptions::default(),
                    };
                    let source = DemoSource::new(7, KEYS, EVENTS).unwrap();
                    let harness = Harness::start(
                        config,
                        &storage,
                        source,
                        Counter::factory(),
                        StartFrom::Empty,
                    )
                    .unwrap();
                    let done = harness.finish().unwrap();
                    assert_eq!(done.events, EVENTS);
                    dir
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group! {
    name = harness_benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(10));
    targets = demo
}
criterion_main!(harness_benches);
