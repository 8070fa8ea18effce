//! Keyed rockstate state inside [timely dataflow](https://docs.rs/timely): each timely
//! worker is one subtask, checkpoints follow timely epochs, and acknowledgements travel
//! through the checkpoint storage, so jobs run in one process or in many.
//!
//! # Model
//!
//! * **Subtasks.** Worker `i` of `n` (over all processes) is subtask `i` of every
//!   operator, and owns the key groups of subtask `i` at parallelism `n`. The keyed
//!   operator ([`KeyedState::keyed_state`]) exchanges records by
//!   `subtask_for_key_group(key_group_for(key))`, so routing and state ownership agree.
//! * **Epochs are checkpoints.** Timestamps are `u64` epochs, starting at
//!   [`WorkerJob::first_epoch`] and advanced one at a time by the sources. Records of an
//!   epoch are applied once the operator's input frontier has passed the epoch (all its
//!   records have arrived), sorted by `(key, value)`: the state after every epoch is a
//!   function of the records, whatever the worker count or arrival order. Right after
//!   applying epoch `e`, every worker snapshots its backends for checkpoint `e` (the
//!   synchronous part seals the memtables; their flush and the hard links follow in the
//!   background), and uploads in the background while the dataflow goes on.
//! * **Operator state.** Sources record their positions for an epoch with
//!   [`WorkerJob::set_operator_state`] before advancing past it; each checkpoint carries
//!   them, and a restart hands every worker its share ([`WorkerJob::operator_state`]).
//!
//! # Acknowledgement through storage
//!
//! Completion must be decided across processes. Rather than a timely channel (which would
//! need a cycle in the dataflow, and dies with the processes), the checkpoint storage
//! itself carries the protocol:
//!
//! 1. When its uploads for checkpoint `e` are done, worker `i` writes
//!    `chk-e/_acks/<run>/worker-i` with create-if-absent: its handles and operator state,
//!    CRC-checked. A worker that cannot snapshot writes a declining record instead.
//! 2. Worker 0 runs the [`CheckpointCoordinator`](rockstate::checkpoint::CheckpointCoordinator)
//!    on a task. It polls the acknowledgements of the checkpoints in flight and, once all
//!    `n` are there, writes `chk-e/_metadata` (create-if-absent): its presence is the
//!    commit, exactly as for every other rockstate checkpoint. Retention and shared-file
//!    deletion stay with this single coordinator.
//! 3. Every worker polls `_metadata` of the checkpoints it acknowledged and only then
//!    calls `notify_checkpoint_complete`: shared files are reused only once their
//!    checkpoint is confirmed (DESIGN rule 1). A checkpoint that lost a worker never gets
//!    `_metadata`; it times out and its files are swept.
//!
//! `<run>` is a random number drawn by worker 0 at start, and checkpoint ids continue
//! above every `chk-N` in storage, so acknowledgements of a crashed run are never
//! mistaken for new ones. Worker 0 also chooses the snapshot every worker restores and
//! tells them through a small dataflow, so all workers agree.
//!
//! # Example
//!
//! See `examples/timely_wordcount.rs` for a complete job, and [`demo`] for the job behind
//! `rockstate demo --engine timely`.

mod config;
pub mod demo;
mod exchange;
mod job;
mod operator;
mod worker;

pub use config::{JobConfig, Start};
pub use exchange::all_gather;
pub use job::TimelyJob;
pub use operator::KeyedState;
pub use worker::{WorkerJob, WorkerReport};
