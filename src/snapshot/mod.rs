//! Snapshots of a backend: the synchronous part (flush and hard-link a RocksDB checkpoint
//! into a staging directory) and the asynchronous upload that produces a
//! [`KeyedStateHandle`].
//!
//! Incremental snapshots upload only SST files that the last confirmed checkpoint did not
//! already upload, and reference those under `shared/`; MANIFEST, CURRENT and OPTIONS are
//! private to each checkpoint. Full snapshots (`incremental = false`) upload every file as
//! private.

mod pending;

pub use crate::format::{CanonicalHandle, KeyedSnapshot, KeyedStateHandle, StateFile};
pub use pending::PendingSnapshot;
pub(crate) use pending::{list_captured, start_capture, Capture, StagingDir};
