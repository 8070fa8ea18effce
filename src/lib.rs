//! # rockstate
//!
//! Keyed state for stream processors, stored in RocksDB, partitioned into key groups so
//! that it can be checkpointed and restored at any parallelism.
//!
//! A job's keys are hashed into `max_parallelism` key groups ([`keygroup`]); each parallel
//! subtask owns a contiguous [`KeyGroupRange`] and one [`RocksStateBackend`]. States are
//! registered on the backend with a descriptor and used through typed handles.
//!
//! ```
//! use rockstate::{
//!     BackendOptions, ListStateDescriptor, MapStateDescriptor, RocksStateBackend,
//!     ValueStateDescriptor,
//! };
//!
//! # fn main() -> rockstate::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! // Subtask 0 of 2, with 128 key groups.
//! let options = BackendOptions::for_subtask(dir.path(), 0, 2, 128)?;
//! let backend = RocksStateBackend::open(options)?;
//!
//! let count = backend.register(ValueStateDescriptor::<String, u64>::new("count"))?;
//! let recent = backend.register(ListStateDescriptor::<String, u32>::new("recent"))?;
//! let hist = backend.register(MapStateDescriptor::<String, u32, u64>::new("hist"))?;
//!
//! // Only keys in this subtask's key groups are accepted.
//! let key = (0..).map(|i| format!("user-{i}"))
//!     .find(|k| rockstate::subtask_for_key(k, 2, 128).unwrap() == 0)
//!     .unwrap();
//! count.put(&key, &1)?;
//! recent.add(&key, &7)?;
//! hist.put(&key, &7, &1)?;
//!
//! assert_eq!(count.get(&key)?, Some(1));
//! assert_eq!(recent.get(&key)?, vec![7]);
//! assert_eq!(hist.get(&key, &7)?, Some(1));
//! # Ok(())
//! # }
//! ```
//!
//! # Requirements
//!
//! State access ([`ValueState::get`], [`MapState::put`], ...) is synchronous: call it from
//! the thread that processes a subtask's records. Everything that talks to storage
//! (uploads, restores, the [`CheckpointCoordinator`], savepoints) is an `async fn` that
//! must run on a [tokio](https://docs.rs/tokio) runtime with I/O and time enabled (a
//! multi-threaded one for the blocking work restores do). rockstate never starts a
//! runtime of its own.
//!
//! Cargo features: `aws`, `gcp` and `azure` add `s3://`, `gs://` and `az://` storage
//! (local paths, `file://` and `memory://` always work); `testing` adds crash points and
//! the misbehaving stores and test helpers of `rockstate::testing`.
//!
//! # Hosting rockstate in a runtime
//!
//! A stream runtime (the thread harness and the timely adapter of this repository are
//! two) does the same few things; [`runtime`] holds the parts they share. Each task below
//! names the calls and shows them in a compiled example.
//!
//! ## 1. One backend per subtask, records routed by key group
//!
//! Subtask `i` of `p` owns [`key_group_range_for_subtask`]`(i, p, max_parallelism)` and
//! opens one [`RocksStateBackend`] on a local directory of its own. Route every record to
//! [`subtask_for_key`]: a backend refuses keys outside its range. See the example at the
//! top of this page.
//!
//! ## 2. Choose where the job starts
//!
//! [`runtime::start::plan_start`] turns what the job was asked to start from (the latest
//! checkpoint, a given checkpoint or savepoint, or nothing) into candidates, best first.
//! Restore every subtask from the first candidate that restores; when `plan.fallback` is
//! set, an error for which [`runtime::start::falls_back`] holds (a missing or damaged
//! file) moves on to the next, older candidate. Then start the coordinator with the
//! candidate's `start_point`, which claims the job directory (older writers are fenced)
//! and continues checkpoint ids.
//!
//! Local directories are scratch space: [`runtime::local_dir::set_aside`] takes a
//! runtime's local root (refusing a directory holding someone else's files) and moves
//! what an earlier run left into `.previous-run`; give those directories to
//! [`BackendBuilder::reuse_local_files`] and a restore takes every file that is still there
//! and matches the snapshot's size and CRC32 (local recovery) instead of downloading it.
//!
//! ```
//! use std::path::{Path, PathBuf};
//! use std::sync::Arc;
//!
//! use rockstate::runtime::local_dir;
//! use rockstate::runtime::start::{self, StartCandidate, StartRequest};
//! use rockstate::{
//!     BackendOptions, CheckpointCoordinator, CheckpointStorage, CoordinatorOptions,
//!     OperatorSpec, RestoreOptions, RocksStateBackend, StartPoint, SystemClock,
//! };
//!
//! /// Opens the `p` subtasks of operator "counter", restored from `candidate` or empty.
//! async fn open_subtasks(
//!     local_root: &Path,
//!     earlier: &[PathBuf],
//!     operators: &[OperatorSpec],
//!     candidate: Option<&StartCandidate>,
//! ) -> rockstate::Result<Vec<RocksStateBackend>> {
//!     local_dir::reset(local_root)?;
//!     let (p, max) = (operators[0].parallelism, operators[0].max_parallelism);
//!     let mut backends = Vec::new();
//!     for i in 0..p {
//!         let dir = local_root.join(format!("subtask-{i}"));
//!         let builder = RocksStateBackend::builder(BackendOptions::for_subtask(dir, i, p, max)?)
//!             .reuse_local_files(earlier.iter().cloned());
//!         backends.push(match candidate {
//!             Some(c) => {
//!                 c.source.check_operators(operators, c.options.allow_non_restored_state)?;
//!                 // Every operator of the job was checked: a new one starts empty.
//!                 let options = RestoreOptions { allow_new_operator: true, ..c.options };
//!                 builder.restore_operator(&c.source, "counter", &options).await?
//!             }
//!             None => builder.open()?,
//!         });
//!     }
//!     Ok(backends)
//! }
//!
//! /// Starts the job from the latest checkpoint that restores (empty when there is
//! /// none), then the coordinator.
//! async fn start_job(
//!     job: &CheckpointStorage,
//!     local_root: &Path,
//!     operators: Vec<OperatorSpec>,
//! ) -> rockstate::Result<(Vec<RocksStateBackend>, CheckpointCoordinator)> {
//!     let earlier = local_dir::set_aside(local_root)?;
//!     let plan = start::plan_start(job, StartRequest::Latest).await?;
//!     let mut started = None;
//!     let mut newest_error = None;
//!     for candidate in &plan.candidates {
//!         match open_subtasks(local_root, &earlier, &operators, Some(candidate)).await {
//!             Ok(backends) => {
//!                 started = Some((backends, candidate.start_point.clone()));
//!                 break;
//!             }
//!             Err(e) if plan.fallback && start::falls_back(&e) => {
//!                 newest_error.get_or_insert(e);
//!             }
//!             Err(e) => return Err(e),
//!         }
//!     }
//!     let (backends, start_point) = match (started, newest_error) {
//!         (Some(started), _) => started,
//!         (None, Some(e)) => return Err(e),
//!         (None, None) => (
//!             open_subtasks(local_root, &earlier, &operators, None).await?,
//!             StartPoint::Fresh,
//!         ),
//!     };
//!     local_dir::remove(&local_root.join(local_dir::PREVIOUS_RUN))?;
//!     let coordinator = CheckpointCoordinator::start_at(
//!         job.clone(),
//!         "my-job",
//!         operators,
//!         CoordinatorOptions::default(),
//!         Arc::new(SystemClock),
//!         start_point,
//!     )
//!     .await?;
//!     Ok((backends, coordinator))
//! }
//!
//! # fn main() -> rockstate::Result<()> {
//! # let tmp = tempfile::tempdir().unwrap();
//! # let storage = CheckpointStorage::open(tmp.path().join("checkpoints").to_str().unwrap())?;
//! # let job = storage.child("my-job")?;
//! # let runtime = tokio::runtime::Runtime::new().unwrap();
//! let operators =
//!     vec![OperatorSpec { uid: "counter".into(), parallelism: 2, max_parallelism: 128 }];
//! let local = tmp.path().join("local");
//! let (backends, _coordinator) = runtime.block_on(start_job(&job, &local, operators))?;
//! assert_eq!(backends.len(), 2);
//! # Ok(())
//! # }
//! ```
//!
//! ## 3. Checkpoint: snapshot, store, acknowledge, confirm
//!
//! 1. **Trigger.** [`CheckpointCoordinator::trigger`] returns the next checkpoint id
//!    (`Unavailable` while `max_concurrent` checkpoints are in flight).
//! 2. **Snapshot**, on each subtask's thread, at the barrier: [`RocksStateBackend::snapshot`]
//!    flushes and hard-links the database (the only pause of record processing).
//! 3. **Store**, off that thread: [`runtime::store_snapshot`] uploads only the files the
//!    last confirmed checkpoint did not (or writes a savepoint's files).
//! 4. **Acknowledge** with [`CheckpointCoordinator::acknowledge`]: the last one writes
//!    `_metadata`, which completes the checkpoint ([`AckOutcome::Completed`]). On an error,
//!    [`CheckpointCoordinator::decline`].
//! 5. **Confirm.** Tell every subtask [`RocksStateBackend::notify_checkpoint_complete`];
//!    only then do later checkpoints reuse its files. Aborted or failed checkpoints get
//!    [`RocksStateBackend::notify_checkpoint_aborted`]. Call
//!    [`CheckpointCoordinator::abort_expired`] now and then.
//!
//! ```
//! use rockstate::runtime::store_snapshot;
//! use rockstate::{
//!     AckOutcome, BackendOptions, CheckpointCoordinator, CheckpointMetadata, CheckpointStorage,
//!     CoordinatorOptions, OperatorSpec, RocksStateBackend, SubtaskSnapshot,
//! };
//!
//! async fn checkpoint(
//!     coordinator: &mut CheckpointCoordinator,
//!     job: &CheckpointStorage,
//!     backends: &[RocksStateBackend],
//! ) -> rockstate::Result<Option<CheckpointMetadata>> {
//!     let id = coordinator.trigger()?;
//!     let mut completed = None;
//!     for (i, backend) in backends.iter().enumerate() {
//!         let pending = backend.snapshot(id)?;
//!         let stored = store_snapshot(pending, job, "counter", i as u32, None).await;
//!         let keyed = match stored {
//!             Ok(keyed) => keyed,
//!             Err(e) => {
//!                 coordinator.decline(id, &e.to_string()).await?;
//!                 backends.iter().for_each(|b| b.notify_checkpoint_aborted(id));
//!                 return Err(e);
//!             }
//!         };
//!         let ack = SubtaskSnapshot { keyed: Some(keyed), ..Default::default() };
//!         if let AckOutcome::Completed(meta) =
//!             coordinator.acknowledge(id, "counter", i as u32, ack).await?
//!         {
//!             completed = Some(*meta);
//!         }
//!     }
//!     backends.iter().for_each(|b| b.notify_checkpoint_complete(id));
//!     Ok(completed)
//! }
//!
//! # fn main() -> rockstate::Result<()> {
//! # let tmp = tempfile::tempdir().unwrap();
//! # let job = CheckpointStorage::open(tmp.path().to_str().unwrap())?.child("my-job")?;
//! # let runtime = tokio::runtime::Runtime::new().unwrap();
//! # let backends: Vec<RocksStateBackend> = (0..2)
//! #     .map(|i| RocksStateBackend::open(BackendOptions::for_subtask(tmp.path().join(format!("l{i}")), i, 2, 128)?))
//! #     .collect::<rockstate::Result<_>>()?;
//! let ops = vec![OperatorSpec { uid: "counter".into(), parallelism: 2, max_parallelism: 128 }];
//! let meta = runtime.block_on(async {
//!     let mut coordinator =
//!         CheckpointCoordinator::start(job.clone(), "my-job", ops, CoordinatorOptions::default())
//!             .await?;
//!     checkpoint(&mut coordinator, &job, &backends).await
//! })?;
//! assert_eq!(meta.map(|m| m.checkpoint_id), Some(1));
//! # Ok(())
//! # }
//! ```
//!
//! ## 4. Savepoints
//!
//! [`CheckpointCoordinator::trigger_savepoint`] returns a
//! [`SavepointTrigger`](checkpoint::SavepointTrigger); pass it to
//! [`runtime::store_snapshot`] and acknowledge as above. A savepoint is self-contained,
//! never deleted by retention, and restores at any parallelism
//! ([`RestoreSource::open`] on its folder, then step 2).
//!
//! ## 5. Subtasks in several processes
//!
//! Without an RPC channel to one coordinator, acknowledge through storage:
//! [`runtime::acks`] writes one acknowledgement file per worker and checkpoint, runs the
//! coordinating task on one worker, and lets every worker learn from storage which
//! checkpoints completed (only those of its own writer epoch). The timely adapter works
//! this way across processes and machines.
//!
//! ## 6. Operating a running job
//!
//! Other processes (the `rockstate` command, scripts) reach a running job through its
//! storage, so a runtime needs no server: poll [`runtime::control::pending`] now and then
//! (twice a second), [`accept`](runtime::control::accept) a request before acting on it
//! and [`answer`](runtime::control::answer) it once done. Call
//! [`CheckpointCoordinator::publish_status`] from the same loop: it keeps
//! `_status.json` up to date for `rockstate status` (cheap when nothing is due). Call
//! [`RocksStateBackend::record_metrics`] now and then (at each checkpoint) so that
//! RocksDB's figures reach the application's metrics exporter ([`telemetry`]).
//!
//! ```
//! use rockstate::checkpoint::status::RunState;
//! use rockstate::runtime::control::{self, Answer, Command};
//! use rockstate::{CheckpointCoordinator, CheckpointStorage, CoordinatorOptions, SavepointFormat};
//! # fn main() -> rockstate::Result<()> {
//! # let runtime = tokio::runtime::Runtime::new().unwrap();
//! # runtime.block_on(async {
//! let job = CheckpointStorage::open("memory://operated")?.child("my-job")?;
//! let mut coordinator =
//!     CheckpointCoordinator::start(job.clone(), "my-job", vec![], CoordinatorOptions::default())
//!         .await?;
//! // Another process asks for a savepoint (what `rockstate savepoint trigger` does).
//! let wait = std::time::Duration::from_secs(60);
//! let savepoint = Command::Savepoint { dir: Some("memory://savepoints".into()), format: SavepointFormat::Canonical };
//! let id = control::submit(&job, savepoint, wait).await?;
//!
//! // The runtime's polling loop.
//! coordinator.publish_status(RunState::Running).await?;
//! for request in control::pending(&job).await? {
//!     if !control::accept(&mut coordinator, &request).await? {
//!         continue; // withdrawn by its client, or expired
//!     }
//!     if let Command::Savepoint { .. } = request.command {
//!         // Take it as in step 4, then answer with its folder's URL.
//!         let answer = Answer::Savepoint { url: "memory://savepoints/savepoint-my-job-1".into() };
//!         control::answer(&mut coordinator, &request.id, &answer).await?;
//!     }
//! }
//! let outcome = control::wait_for_answer(&job, &id, wait, std::time::Duration::from_millis(10)).await?;
//! assert!(matches!(outcome, control::Outcome::Answered(Answer::Savepoint { .. })));
//! # Ok::<_, rockstate::Error>(())
//! # })
//! # }
//! ```
//!
//! ## Errors
//!
//! Every call returns [`Error`]; decide with [`Error::kind`]. `Fenced` means another
//! process owns the job directory now: stop. `InDoubt` means a `_metadata` write got no
//! definite answer: its files are kept, go on. `Unavailable` and `Io` may succeed on a
//! retry; `Corrupt` and `NotFound` during a restore mean "try an older snapshot". Causes
//! (RocksDB's, the object store's) are kept as [`source`](std::error::Error::source);
//! [`Error::report`] prints the chain on one line.
#![warn(missing_docs)]

mod backend;
pub mod checkpoint;
pub mod clock;
pub mod codec;
mod crashpoint;
mod digest;
mod engine;
pub mod error;
pub mod format;
mod hash;
pub mod keygroup;
pub mod restore;
pub mod runtime;
pub mod savepoint;
pub mod snapshot;
pub mod state;
pub mod storage;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "testing")]
pub use backend::CaptureHold;
pub use backend::{
    BackendBuilder, BackendOptions, RocksStateBackend, SharedResources, ValueCacheStats,
    DEFAULT_BUFFERED_WRITES, DEFAULT_MEMORY_BUDGET,
};
pub use checkpoint::{
    AckOutcome, CheckpointCoordinator, CheckpointMetadata, CoordinatorOptions, OperatorSpec,
    StartPoint, SubtaskSnapshot,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use codec::{key_group_for, subtask_for_key};
pub use digest::StateDigest;
pub use error::{Error, ErrorKind, Result};
pub use format::{Compression, SavepointFormat};
pub use keygroup::{key_group_range_for_subtask, subtask_for_key_group, KeyGroupRange};
pub use restore::{RescaleStrategy, RestoreMode, RestoreOptions, RestoreSource};
pub use snapshot::{CanonicalHandle, KeyedSnapshot, KeyedStateHandle, PendingSnapshot, StateFile};
pub use state::{
    AggregateFunction, AggregatingState, AggregatingStateDescriptor, ListState,
    ListStateDescriptor, MapState, MapStateDescriptor, ReducingState, ReducingStateDescriptor,
    StateKind, StateMeta, StateTtlConfig, TtlUpdate, TtlVisibility, ValueState,
    ValueStateDescriptor,
};
pub use storage::{CheckpointStorage, StorageOptions};

/// The README's Rust examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
