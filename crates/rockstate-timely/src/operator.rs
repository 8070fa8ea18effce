//! The keyed operator: records exchanged by key group, applied per epoch, with a
//! checkpoint after every epoch.

use std::collections::BTreeMap;
use std::rc::Rc;

use serde::Serialize;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::StreamVec;

use rockstate::keygroup;
use rockstate::restore::RestoreOptions;
use rockstate::{BackendOptions, RocksStateBackend};
use rockstate::{Error, Result};

use crate::worker::*;

/// Keyed, checkpointed state on a timely stream of `(key, value)` records.
///
/// An epoch's records are buffered until the epoch is complete: sources bound memory by
/// keeping few epochs in flight (probe the output, and see [`WorkerJob::can_advance`]).
pub trait KeyedState<'scope, K, V> {
    /// Adds keyed operator `uid`: records are routed to the worker owning their key group;
    /// `build` registers the states on this worker's backend (restored when the job
    /// restored), and `logic` handles each record with them, pushing outputs (emitted at
    /// the record's epoch). Records of an epoch are handled once the epoch is complete,
    /// sorted by `(key, value)`; then the backend is snapshotted for checkpoint `epoch`.
    ///
    /// Errors: restore errors of this worker's backend; `InvalidArgument` for a uid used
    /// twice or registered after the job started. Errors of `logic` stop the worker at
    /// its next [`WorkerJob::step`].
    fn keyed_state<S, O, B, L>(
        self,
        job: &WorkerJob,
        uid: &str,
        build: B,
        logic: L,
    ) -> Result<StreamVec<'scope, u64, O>>
    where
        S: 'static,
        O: timely::ExchangeData,
        B: FnOnce(&RocksStateBackend) -> Result<S>,
        L: FnMut(&mut S, &K, V, &mut Vec<O>) -> Result<()> + 'static;
}

impl<'scope, K, V> KeyedState<'scope, K, V> for StreamVec<'scope, u64, (K, V)>
where
    K: timely::ExchangeData + Serialize + Ord,
    V: timely::ExchangeData + Ord,
{
    fn keyed_state<S, O, B, L>(
        self,
        job: &WorkerJob,
        uid: &str,
        build: B,
        mut logic: L,
    ) -> Result<StreamVec<'scope, u64, O>>
    where
        S: 'static,
        O: timely::ExchangeData,
        B: FnOnce(&RocksStateBackend) -> Result<S>,
        L: FnMut(&mut S, &K, V, &mut Vec<O>) -> Result<()> + 'static,
    {
        let max_parallelism = job.job.config.max_parallelism;
        let (index, peers, first_epoch, op) = {
            let mut s = job.state.borrow_mut();
            s.register(uid)?;
            let mut options = BackendOptions::for_subtask(
                s.local.join(rockstate::runtime::operator_dir_name(uid)),
                s.index,
                s.peers,
                max_parallelism,
            )?;
            // Each epoch's records are applied sorted by key.
            options.writes_in_key_order = true;
            options.statistics = job.job.config.rocksdb_statistics;
            let builder = RocksStateBackend::builder(options.clone())
                .shared_resources(job.job.resources.clone())
                .reuse_local_files(s.reuse.iter().cloned());
            let backend = match (&s.restore, &s.plan.restore) {
                (Some(source), Some(plan)) => {
                    // The job's operators were checked against the snapshot by worker 0.
                    let restored = job.job.runtime.block_on(builder.restore_operator(
                        source,
                        uid,
                        &RestoreOptions {
                            allow_new_operator: true,
                            ..plan.options
                        },
                    ));
                    match restored {
                        Ok(backend) => backend,
                        // Reported to every worker at the first step: returning here
                        // would leave the other workers waiting for this one forever.
                        Err(e) => {
                            tracing::error!(operator = uid, error = %e.report(), "cannot restore this worker's state");
                            s.restore_error.get_or_insert(e);
                            RocksStateBackend::builder(options)
                                .shared_resources(job.job.resources.clone())
                                .open()?
                        }
                    }
                }
                _ => builder.open()?,
            };
            s.add_operator(uid, max_parallelism);
            s.keyed.push(KeyedEntry {
                uid: uid.to_string(),
                backend: Rc::new(backend),
                finished: false,
            });
            (s.index, s.peers, s.plan.first_epoch, s.keyed.len() - 1)
        };
        let mut user = {
            let s = job.state.borrow();
            build(&s.keyed[op].backend).map_err(|e| e.for_operator(uid))?
        };
        let state = job.state.clone();
        let shared = job.job.clone();
        let route = move |(key, _): &(K, V)| -> u64 {
            rockstate::key_group_for(key, max_parallelism)
                .and_then(|kg| keygroup::subtask_for_key_group(kg, peers, max_parallelism))
                .map_or(0, u64::from)
        };
        let uid = uid.to_string();
        let stream = self.unary_frontier::<CapacityContainerBuilder<Vec<O>>, _, _, _>(
            Exchange::new(route),
            &format!("KeyedState({uid})"),
            move |capability, _info| {
                let mut capability = Some(capability);
                let mut stash: BTreeMap<u64, Vec<(K, V)>> = BTreeMap::new();
                let mut next = first_epoch;
                let mut seen = first_epoch.saturating_sub(1);
                let mut failed = false;
                move |(input, frontier), output| {
                    input.for_each(|cap, data| {
                        if let Some(time) = cap.least() {
                            stash.entry(*time).or_default().append(data);
                        }
                    });
                    if failed {
                        stash.clear();
                        return;
                    }
                    if let Some(t) = frontier.frontier().first() {
                        seen = seen.max(*t);
                    }
                    let closed = frontier.is_empty();
                    let stashed = stash.keys().next_back().copied().unwrap_or(0);
                    let last = match state.borrow().final_epoch {
                        // The same on every worker: no worker snapshots past it, whatever
                        // frontier it happened to see (a worker that saw its input's
                        // frontier pass the final epoch before the input closed would
                        // otherwise snapshot one epoch more than the others, and wait
                        // for a checkpoint the others never take).
                        Some(declared) => declared,
                        None => stashed.max(seen),
                    };
                    if stashed > last {
                        let e = Error::invalid(format!(
                            "operator {uid:?} got records of epoch {stashed}, after the final epoch {last}"
                        ));
                        state.borrow_mut().error.get_or_insert(e);
                        failed = true;
                        return;
                    }
                    if let Some(&early) = stash.keys().next().filter(|t| **t < next) {
                        let e = Error::invalid(format!(
                            "operator {uid:?} got records of epoch {early}, before the first epoch {next} of this run"
                        ));
                        state.borrow_mut().error.get_or_insert(e);
                        failed = true;
                        return;
                    }
                    while next <= last && (closed || !frontier.less_equal(&next)) {
                        let mut records = stash.remove(&next).unwrap_or_default();
                        records.sort_unstable();
                        let mut out = Vec::new();
                        for (key, value) in records {
                            let kg = rockstate::key_group_for(&key, max_parallelism)
                                .and_then(|kg| {
                                    keygroup::subtask_for_key_group(kg, peers, max_parallelism)
                                });
                            let result = match kg {
                                Ok(owner) if owner == index => {
                                    logic(&mut user, &key, value, &mut out)
                                }
                                Ok(owner) => Err(Error::Internal(format!(
                                    "record for subtask {owner} reached worker {index}"
                                ))),
                                Err(e) => Err(e),
                            };
                            if let Err(e) = result {
                                state
                                    .borrow_mut()
                                    .error
                                    .get_or_insert(e.for_operator(&uid));
                                failed = true;
                                return;
                            }
                        }
                        if !out.is_empty() {
                            if let Some(cap) = capability.as_ref() {
                                let cap = cap.delayed(&next);
                                output.session(&cap).give_iterator(out.into_iter());
                            }
                        }
                        if shared.config.checkpoints {
                            state.borrow_mut().snapshot(&shared, op, next);
                        }
                        next += 1;
                    }
                    if closed {
                        capability = None;
                        state.borrow_mut().keyed[op].finished = true;
                    } else if let Some(cap) = capability.as_mut() {
                        if *cap.time() < next {
                            cap.downgrade(&next);
                        }
                    }
                }
            },
        );
        Ok(stream)
    }
}
