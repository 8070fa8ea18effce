//! The runtime-integration kit: what a stream runtime needs to host rockstate state,
//! shared by the thread harness and the timely adapter.
//!
//! - [`start`]: choosing where a job starts (the latest checkpoint with fallback to older
//!   ones, a given snapshot, or empty) and checking that a candidate's files are there.
//! - [`local_dir`]: the local scratch directories of a runtime: rockstate empties only
//!   directories it created, and sets an earlier run's files aside so that a restore can
//!   reuse them (local recovery).
//! - [`store_snapshot`]: one subtask's snapshot stored as a checkpoint's or a savepoint's.
//! - [`acks`]: acknowledgements and checkpoint completion through storage, for runtimes
//!   whose subtasks run in several processes.
//! - [`control`]: requests from other processes (take a savepoint, stop) through the
//!   job's storage, and the job's answers.

pub mod acks;
pub mod control;
pub mod local_dir;
pub mod savepoint;
pub mod start;

pub use savepoint::savepoint_from_snapshot;

use crate::checkpoint::SavepointTrigger;
use crate::error::Result;
use crate::format::{Compression, KeyedSnapshot};
use crate::snapshot::PendingSnapshot;
use crate::storage::CheckpointStorage;

/// The asynchronous half of one subtask's part of a checkpoint or savepoint: stores the
/// snapshot `pending` took (uploads it to the job directory `job`, or writes it into the
/// savepoint's folder when `savepoint` is given) and returns what the subtask
/// acknowledges as its keyed state (`SubtaskSnapshot::keyed`).
///
/// Run it off the subtask's thread, then acknowledge (to a
/// [`CheckpointCoordinator`](crate::CheckpointCoordinator) in this process, or through
/// [`acks`]); on an error, decline the checkpoint.
///
/// Errors: storage errors; a local I/O error reading the snapshot's files.
pub async fn store_snapshot(
    pending: PendingSnapshot,
    job: &CheckpointStorage,
    operator_uid: &str,
    subtask: u32,
    savepoint: Option<&SavepointTrigger>,
) -> Result<KeyedSnapshot> {
    match savepoint {
        Some(target) => {
            pending
                .write_savepoint(
                    &target.folder,
                    operator_uid,
                    subtask,
                    target.format,
                    Compression::default(),
                )
                .await
        }
        None => pending
            .upload(job, operator_uid, subtask)
            .await
            .map(KeyedSnapshot::Files),
    }
}

/// The name of an operator's directory under a runtime's local root (and in a
/// checkpoint): the 16-byte hash of its uid, in hex, so that any uid makes a safe name.
pub fn operator_dir_name(uid: &str) -> String {
    crate::hash::operator_uid_hash(uid)
}

/// A named place where crash tests kill the process: with the `testing` feature and
/// `ROCKSTATE_CRASH_AT=<point>:<n>` set, the `n`-th pass through `point` sends SIGKILL
/// to the process itself. Without the feature it does nothing.
#[inline]
pub fn crash_point(point: &'static str) {
    crate::crashpoint::hit(point)
}
