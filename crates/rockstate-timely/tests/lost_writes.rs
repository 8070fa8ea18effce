//! State writes still buffered when a snapshot applies them, and refused by RocksDB there,
//! are lost: the timely adapter fails the worker with that reason instead of declining
//! the checkpoint and ending as if its state were whole.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rockstate::restore::RestoreOptions;
use rockstate::testing::checks::refuse_writes;
use rockstate::testing::fixtures::block_on;
use rockstate::{
    BackendOptions, CheckpointStorage, RestoreSource, RocksStateBackend, ValueState,
    ValueStateDescriptor,
};
use rockstate_timely::{JobConfig, KeyedState, TimelyJob};
use timely::dataflow::operators::Probe;
use timely::dataflow::{InputHandleVec, ProbeHandle};

/// Fewer writes per epoch than a buffer holds (256): every write of an epoch is still
/// buffered when its snapshot is taken.
const KEYS: u64 = 50;
const EPOCHS: u64 = 3;

struct Op {
    count: ValueState<u64, u64>,
    seen: u64,
    refused: PathBuf,
}

/// One worker counts records per key over `EPOCHS` epochs, a checkpoint after each. After
/// the last record of the last epoch it makes RocksDB refuse every write under the job's
/// local directory, so the final snapshot cannot apply that epoch's buffered writes.
///
/// Proves: the worker fails with the lost writes as its reason (it does not end with the
/// final checkpoint merely declined), and the checkpoint before restores with every count
/// it acknowledged.
#[test]
fn writes_lost_at_the_final_snapshot_fail_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let storage =
        CheckpointStorage::open(&dir.path().join("checkpoints").display().to_string()).unwrap();
    let local = dir.path().join("local");
    let mut config = JobConfig::new(storage.clone(), "lost", local.clone());
    config.checkpoints = true;
    let job = TimelyJob::new(config).unwrap();
    let refused = local.clone();
    let guards = timely::execute(timely::Config::thread(), move |worker| {
        let w = job.worker(worker)?;
        let first = w.first_epoch();
        let mut input: InputHandleVec<u64, (u64, u64)> = InputHandleVec::new();
        let probe = ProbeHandle::new();
        let refused = refused.clone();
        worker.dataflow::<u64, _, _>(|scope| -> rockstate::Result<()> {
            input
                .to_stream(scope)
                .keyed_state(
                    &w,
                    "counter",
                    move |backend: &RocksStateBackend| {
                        Ok(Op {
                            count: backend.register(ValueStateDescriptor::new("count"))?,
                            seen: 0,
                            refused: refused.clone(),
                        })
                    },
                    move |op: &mut Op, key: &u64, _k: u64, _out: &mut Vec<()>| {
                        let n = op.count.get(key)?.unwrap_or(0);
                        op.count.put(key, &(n + 1))?;
                        op.seen += 1;
                        if op.seen == KEYS * EPOCHS {
                            refuse_writes(&op.refused, true);
                        }
                        Ok(())
                    },
                )?
                .probe_with(&probe);
            Ok(())
        })?;
        // A failure, not a hang, if the checkpoints never come.
        let deadline = Instant::now() + Duration::from_secs(60);
        let waited = || -> rockstate::Result<()> {
            if Instant::now() > deadline {
                return Err(rockstate::Error::Internal("no progress within 60 s".into()));
            }
            Ok(())
        };
        w.set_final_epoch(first + EPOCHS - 1);
        input.advance_to(first);
        for k in 0..EPOCHS {
            let epoch = first + k;
            if k == EPOCHS - 1 {
                // The checkpoint before is complete before the last epoch starts.
                while !w.report().completed.contains(&(epoch - 1)) {
                    waited()?;
                    w.step(worker)?;
                }
            }
            for key in 0..KEYS {
                input.send((key, k));
            }
            input.advance_to(epoch + 1);
            while !w.can_advance() || probe.less_than(&epoch.saturating_sub(1)) {
                waited()?;
                w.step(worker)?;
            }
        }
        drop(input);
        w.finish(worker)
    })
    .unwrap();
    let outcome = guards.join().into_iter().next().unwrap().unwrap();
    refuse_writes(&local, false);
    match outcome {
        Ok(report) => panic!(
            "the worker ended although its last writes were lost (completed {:?}, declined {:?})",
            report.completed, report.failed
        ),
        Err(e) => assert!(
            e.report().to_string().contains("buffered state writes"),
            "{}",
            e.report()
        ),
    }

    // The last completed checkpoint is the one before: it holds every count up to it.
    let job = storage.child("lost").unwrap();
    let last = block_on(job.latest_completed())
        .unwrap()
        .expect("the checkpoints before the last one completed");
    let folder = job.child(&format!("chk-{}", last.checkpoint_id)).unwrap();
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
        for key in 0..KEYS {
            assert_eq!(count.get(&key).unwrap(), Some(EPOCHS - 1), "key {key}");
        }
    });
}
