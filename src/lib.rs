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
#![warn(missing_docs)]

mod backend;
pub mod checkpoint;
pub mod clock;
pub mod codec;
mod crashpoint;
mod digest;
mod engine;
mod error;
pub mod format;
mod hash;
pub mod keygroup;
pub mod restore;
pub mod runtime;
pub mod savepoint;
pub mod snapshot;
pub mod state;
pub mod storage;
#[cfg(feature = "testing")]
pub mod testing;

pub use backend::{
    BackendBuilder, BackendOptions, RocksStateBackend, SharedResources, DEFAULT_MEMORY_BUDGET,
};
pub use checkpoint::{
    AckOutcome, CheckpointCoordinator, CheckpointMetadata, CoordinatorOptions, OperatorSpec,
    StartPoint, SubtaskSnapshot,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use codec::{key_group_for, subtask_for_key};
pub use digest::StateDigest;
pub use error::{Error, ErrorKind, Result};
pub use keygroup::{key_group_range_for_subtask, subtask_for_key_group, KeyGroupRange};
pub use restore::{RescaleStrategy, RestoreMode, RestoreOptions, RestoreSource};
pub use savepoint::SavepointFormat;
pub use snapshot::{CanonicalHandle, KeyedSnapshot, KeyedStateHandle, PendingSnapshot, StateFile};
pub use state::{
    AggregateFunction, AggregatingState, AggregatingStateDescriptor, ListState,
    ListStateDescriptor, MapState, MapStateDescriptor, ReducingState, ReducingStateDescriptor,
    StateKind, StateMeta, ValueState, ValueStateDescriptor,
};
pub use storage::{CheckpointStorage, StorageOptions};

/// The README's Rust examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
