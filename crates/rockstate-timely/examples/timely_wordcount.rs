//! Word counts in rockstate keyed state on timely dataflow, checkpointed every epoch and
//! resumable after a crash at another worker count.
//!
//! ```text
//! cargo run --example timely_wordcount -- 2            # 2 worker threads
//! cargo run --example timely_wordcount -- 4            # again: resumes, 4 workers
//! ```

use rockstate::checkpoint::{OperatorState, Redistribution};
use rockstate::{CheckpointStorage, ValueState, ValueStateDescriptor};
use rockstate_timely::{JobConfig, KeyedState, TimelyJob};
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};

const TEXT: &str = "the quick brown fox jumps over the lazy dog the end";
const ROUNDS: u64 = 20;

fn main() -> rockstate::Result<()> {
    let workers: usize = std::env::args()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or(2);
    let storage = CheckpointStorage::open("./timely-wordcount")?;
    let job = TimelyJob::new(JobConfig::new(
        storage,
        "words",
        "./timely-wordcount-local".into(),
    ))?;
    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        let w = job.worker(worker)?;
        // The source position (rounds done) is operator state, given to every worker.
        let restored = w.operator_state("source")?;
        let mut round = restored.get("round").first().map_or(0, |b| b[0] as u64);
        let mut input = InputHandleVec::new();
        let probe = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            input
                .to_stream(scope)
                .keyed_state(
                    &w,
                    "counts",
                    |backend| backend.register(ValueStateDescriptor::<String, u64>::new("count")),
                    |count: &mut ValueState<String, u64>, word: &String, n: u64, out| {
                        let total = count.get(word)?.unwrap_or(0) + n;
                        count.put(word, &total)?;
                        out.push((word.clone(), total));
                        Ok(())
                    },
                )?
                .inspect(|(word, total)| println!("{word}: {total}"))
                .probe_with(&probe);
            Ok::<_, rockstate::Error>(())
        })?;
        let first = w.first_epoch();
        let last = first + ROUNDS.saturating_sub(round).max(1) - 1;
        w.set_final_epoch(last);
        input.advance_to(first);
        for epoch in first..=last {
            if w.index() == 0 && round < ROUNDS {
                TEXT.split(' ')
                    .for_each(|word| input.send((word.to_string(), 1)));
                round += 1;
            }
            let mut state = OperatorState::default();
            let entries = if w.index() == 0 {
                vec![vec![round as u8]]
            } else {
                vec![]
            };
            state.put("round", Redistribution::Union, entries);
            w.set_operator_state("source", epoch, state)?;
            input.advance_to(epoch + 1);
            while probe.less_than(&epoch) || !w.can_advance() {
                w.step(worker)?;
            }
        }
        drop(input);
        let report = w.finish(worker)?;
        println!(
            "worker {}: checkpoint {:?} completed",
            w.index(),
            report.last_checkpoint
        );
        Ok::<_, rockstate::Error>(())
    })
    .map_err(rockstate::Error::Internal)?;
    for result in guards.join() {
        result.map_err(rockstate::Error::Internal)??;
    }
    Ok(())
}
