//! The final epoch declared by the sources is the last one any worker snapshots, whatever
//! frontier a worker's keyed operator saw before the inputs closed.

use std::time::Duration;

use rockstate::{CheckpointStorage, ValueStateDescriptor};
use rockstate_timely::{JobConfig, KeyedState, Start, TimelyJob};
use timely::dataflow::operators::Probe;
use timely::dataflow::{InputHandleVec, ProbeHandle};

/// Two workers declare final epoch `first + 1`, advance their inputs past it and wait
/// until their keyed operators have seen that frontier before closing the inputs. Before
/// the fix, each operator took the frontier it had seen (`first + 2`) for its last epoch
/// and snapshotted one epoch more than declared; when only some workers saw it, the
/// others never acknowledged that checkpoint and the job waited for it until the
/// coordinator's timeout.
#[test]
fn no_worker_snapshots_past_the_declared_final_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let storage =
        CheckpointStorage::open(&dir.path().join("checkpoints").display().to_string()).unwrap();
    let mut config = JobConfig::new(storage, "final", dir.path().join("local"));
    config.start = Start::Empty;
    config.coordinator.timeout = Duration::from_secs(30);
    let job = TimelyJob::new(config).unwrap();
    let guards = timely::execute(timely::Config::process(2), move |worker| {
        let w = job.worker(worker).unwrap();
        let mut input: InputHandleVec<u64, (u64, u64)> = InputHandleVec::new();
        let probe = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            input
                .to_stream(scope)
                .keyed_state(
                    &w,
                    "sum",
                    |backend| backend.register(ValueStateDescriptor::<u64, u64>::new("sum")),
                    |sum, key, value, _out: &mut Vec<()>| {
                        let now = sum.get(key)?.unwrap_or(0);
                        sum.put(key, &(now + value))
                    },
                )
                .unwrap()
                .probe_with(&probe);
        });
        let first = w.first_epoch();
        let last = first + 1;
        w.set_final_epoch(last);
        input.advance_to(first);
        for epoch in first..=last {
            for key in 0..20u64 {
                input.send((key + 100 * u64::from(w.index()), epoch));
            }
            input.advance_to(epoch + 1);
        }
        // The keyed operator has seen the frontier `last + 1` once the probe passed `last`.
        while probe.less_equal(&last) {
            w.step(worker).unwrap();
        }
        drop(input);
        let report = w.finish(worker).unwrap();
        (last, report)
    })
    .unwrap();
    for joined in guards.join() {
        let (last, report) = joined.unwrap();
        let snapshotted: Vec<u64> = report.bases.iter().map(|b| b.0).collect();
        assert_eq!(
            snapshotted.last(),
            Some(&last),
            "worker {} snapshotted {snapshotted:?}, the final epoch is {last}",
            report.index
        );
        assert_eq!(
            report.last_checkpoint,
            Some(last),
            "worker {}",
            report.index
        );
    }
}
