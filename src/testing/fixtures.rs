//! Fixtures shared by tests: the demo-like states (a count, a list of recent values and a
//! histogram per key) and one-call snapshots and checkpoints. Every helper panics on an
//! error, with the step that failed.

use crate::checkpoint::{AckOutcome, CheckpointCoordinator, SubtaskSnapshot};
use crate::format::CheckpointMetadata;
use crate::state::{
    ListState, ListStateDescriptor, MapState, MapStateDescriptor, ValueState, ValueStateDescriptor,
};
use crate::storage::CheckpointStorage;
use crate::RocksStateBackend;

/// The three states most tests use: `count` (value), `recent` (list) and `histogram`
/// (map), keyed by `u32`.
#[derive(Debug, Clone)]
pub struct DemoStates {
    /// `count`: a value per key.
    pub count: ValueState<u32, u64>,
    /// `recent`: a list per key.
    pub recent: ListState<u32, String>,
    /// `histogram`: a map per key.
    pub histogram: MapState<u32, u8, u64>,
}

impl DemoStates {
    /// Registers (or re-attaches to) the three states on `backend`.
    pub fn register(backend: &RocksStateBackend) -> Self {
        Self {
            count: backend
                .register(ValueStateDescriptor::new("count"))
                .expect("register count"),
            recent: backend
                .register(ListStateDescriptor::new("recent"))
                .expect("register recent"),
            histogram: backend
                .register(MapStateDescriptor::new("histogram"))
                .expect("register histogram"),
        }
    }
}

/// Takes and uploads `backend`'s snapshot for checkpoint `id` as subtask `subtask` of
/// operator `uid`, and returns what the subtask acknowledges.
pub async fn snapshot_subtask(
    backend: &RocksStateBackend,
    job: &CheckpointStorage,
    uid: &str,
    subtask: u32,
    id: u64,
) -> SubtaskSnapshot {
    let pending = backend.snapshot(id).expect("synchronous snapshot");
    let handle = pending
        .upload(job, uid, subtask)
        .await
        .expect("upload the snapshot");
    SubtaskSnapshot {
        keyed: Some(handle.into()),
        ..SubtaskSnapshot::default()
    }
}

/// One whole checkpoint of operator `uid`, whose subtask `i` is `backends[i]`: trigger,
/// snapshot and upload every subtask, acknowledge, confirm to every backend. Returns the
/// completed checkpoint.
pub async fn checkpoint_once(
    coordinator: &mut CheckpointCoordinator,
    job: &CheckpointStorage,
    uid: &str,
    backends: &[RocksStateBackend],
) -> CheckpointMetadata {
    let id = coordinator.trigger().expect("trigger a checkpoint");
    let mut completed = None;
    for (i, backend) in backends.iter().enumerate() {
        let snapshot = snapshot_subtask(backend, job, uid, i as u32, id).await;
        match coordinator
            .acknowledge(id, uid, i as u32, snapshot)
            .await
            .expect("acknowledge")
        {
            AckOutcome::Completed(meta) => completed = Some(*meta),
            AckOutcome::Pending => {}
            AckOutcome::Discarded => panic!("checkpoint {id} was discarded"),
        }
    }
    for backend in backends {
        backend.notify_checkpoint_complete(id);
    }
    completed.unwrap_or_else(|| panic!("checkpoint {id} did not complete"))
}

/// Runs `f` to completion on a current-thread runtime of its own (for synchronous tests
/// that call an async API now and then).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a test runtime")
        .block_on(f)
}
