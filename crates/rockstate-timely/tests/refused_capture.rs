//! A snapshot whose files are refused (state written after its synchronous phase reached
//! the files first) declines its checkpoint in the timely adapter: the job goes on, the
//! next checkpoint flushes in its synchronous phase and completes, and nothing is lost.

use std::rc::Rc;

use rockstate::restore::RestoreOptions;
use rockstate::testing::fixtures::block_on;
use rockstate::{
    BackendOptions, CheckpointStorage, RestoreSource, RocksStateBackend, ValueState,
    ValueStateDescriptor,
};
use rockstate_timely::{JobConfig, KeyedState, TimelyJob, WorkerReport};
use timely::dataflow::operators::Probe;
use timely::dataflow::{InputHandleVec, ProbeHandle};

const KEYS: u64 = 200;
const EPOCHS: u64 = 6;
/// The epoch whose snapshot's files are held, then refused.
const HELD: u64 = 2;

struct Op {
    backend: RocksStateBackend,
    count: ValueState<u64, u64>,
    hold: Option<rockstate::CaptureHold>,
    added: Option<ValueState<u64, u64>>,
}

/// One worker counts records per key over `EPOCHS` epochs, a checkpoint after each. Once
/// the checkpoint before is complete, while it applies epoch `HELD`, it holds the taking
/// of snapshot files, so the snapshot of epoch `HELD` waits; while it applies the next epoch it registers a new state (the
/// database's layout changes), then lets go: the held snapshot's files are refused.
///
/// Proves: checkpoint `HELD` is declined with the refusal as its reason, the job still
/// ends normally, every later checkpoint completes, and the final one restores with every
/// count (the new state included).
#[test]
fn a_refused_capture_declines_its_checkpoint_and_the_next_one_completes() {
    let dir = tempfile::tempdir().unwrap();
    let storage =
        CheckpointStorage::open(&dir.path().join("checkpoints").display().to_string()).unwrap();
    let mut config = JobConfig::new(storage.clone(), "refused", dir.path().join("local"));
    config.checkpoints = true;
    // The held upload must not stop the source from sending the next epoch.
    config.max_uploads = 4;
    let job = TimelyJob::new(config).unwrap();
    let guards = timely::execute(timely::Config::thread(), move |worker| {
        let w = job.worker(worker)?;
        let first = w.first_epoch();
        let mut input: InputHandleVec<u64, (u64, u64)> = InputHandleVec::new();
        let probe = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| -> rockstate::Result<()> {
            input
                .to_stream(scope)
                .keyed_state(
                    &w,
                    "counter",
                    |backend: &RocksStateBackend| {
                        Ok(Op {
                            backend: backend.clone(),
                            count: backend.register(ValueStateDescriptor::new("count"))?,
                            hold: None,
                            added: None,
                        })
                    },
                    move |op: &mut Op, key: &u64, k: u64, _out: &mut Vec<()>| {
                        if k == HELD && op.hold.is_none() && op.added.is_none() {
                            op.hold = Some(op.backend.hold_snapshot_captures());
                        }
                        if k == HELD + 1 && op.hold.is_some() {
                            op.added =
                                Some(op.backend.register(ValueStateDescriptor::new("added"))?);
                            op.hold = None;
                        }
                        if let Some(added) = &op.added {
                            added.put(key, &k)?;
                        }
                        let n = op.count.get(key)?.unwrap_or(0);
                        op.count.put(key, &(n + 1))
                    },
                )?
                .probe_with(&probe);
            Ok(())
        })?;
        w.set_final_epoch(first + EPOCHS - 1);
        input.advance_to(first);
        for k in 0..EPOCHS {
            let epoch = first + k;
            if k == HELD {
                // The snapshot before is whole (its files taken) before captures are held.
                while !w.report().completed.contains(&(epoch - 1)) {
                    w.step(worker)?;
                }
            }
            for key in 0..KEYS {
                input.send((key, k));
            }
            input.advance_to(epoch + 1);
            while !w.can_advance() || probe.less_than(&epoch.saturating_sub(1)) {
                w.step(worker)?;
            }
        }
        drop(input);
        let report: WorkerReport = w.finish(worker)?;
        let backends: Vec<(String, Rc<RocksStateBackend>)> = w.backends();
        let (_, backend) = &backends[0];
        let count = backend.register(ValueStateDescriptor::<u64, u64>::new("count"))?;
        for key in 0..KEYS {
            assert_eq!(count.get(&key)?, Some(EPOCHS), "key {key}");
        }
        Ok::<_, rockstate::Error>((report, first))
    })
    .unwrap();
    let (report, first) = guards.join().into_iter().next().unwrap().unwrap().unwrap();
    let held = first + HELD;
    let (_, reason) = report
        .failed
        .iter()
        .find(|(id, _)| *id == held)
        .unwrap_or_else(|| panic!("checkpoint {held} was not declined: {:?}", report.failed));
    assert!(
        reason.contains("busy") && reason.contains("moved on"),
        "declined for another reason: {reason}"
    );
    assert!(!report.completed.contains(&held), "{:?}", report.completed);
    for id in held + 1..first + EPOCHS {
        assert!(
            report.completed.contains(&id),
            "checkpoint {id}: {:?}",
            report.completed
        );
    }
    let last = report
        .last_checkpoint
        .expect("the final checkpoint completed");
    assert_eq!(last, first + EPOCHS - 1);

    // The final checkpoint restores with every count and the state added on the way.
    let folder = storage
        .child("refused")
        .unwrap()
        .child(&format!("chk-{last}"))
        .unwrap();
    block_on(async {
        let source = RestoreSource::open_folder(&folder).await.unwrap();
        let options = BackendOptions::for_subtask(dir.path().join("restored"), 0, 1, 128).unwrap();
        let restored = RocksStateBackend::builder(options)
            .restore_operator(&source, "counter", &RestoreOptions::default())
            .await
            .unwrap();
        let count = restored
            .register(ValueStateDescriptor::<u64, u64>::new("count"))
            .unwrap();
        let added = restored
            .register(ValueStateDescriptor::<u64, u64>::new("added"))
            .unwrap();
        for key in 0..KEYS {
            assert_eq!(count.get(&key).unwrap(), Some(EPOCHS), "key {key}");
            assert_eq!(added.get(&key).unwrap(), Some(EPOCHS - 1), "key {key}");
        }
    });
}
