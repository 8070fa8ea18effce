//! One subtask of the harness: a thread that processes its records and snapshots at
//! barriers, with uploads and acknowledgements running on the async runtime.

use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::Arc;

use crate::{Operator, SharedProgress};
use rockstate::checkpoint::{AckOutcome, CheckpointCoordinator, SavepointTrigger, SubtaskSnapshot};
use rockstate::snapshot::PendingSnapshot;
use rockstate::storage::CheckpointStorage;
use rockstate::RocksStateBackend;

/// What the driver and the upload tasks tell a subtask.
pub(crate) enum Message<K, V> {
    /// Records sorted by key group and key; those of one key in stream order.
    Records(Vec<(K, V)>),
    /// Snapshot for checkpoint `id`; `last_completed` is the newest completed checkpoint
    /// known when it was triggered (a completion notice that may not have arrived yet).
    Barrier {
        id: u64,
        last_completed: Option<u64>,
        /// Set when this barrier takes a savepoint instead of a checkpoint.
        savepoint: Option<SavepointTrigger>,
    },
    Completed(u64),
    Aborted(u64),
    Stop,
}

pub(crate) struct SubtaskContext<K, V> {
    pub index: u32,
    pub operator_uid: String,
    /// The job's id (a label of its metrics).
    pub job_id: String,
    pub job: CheckpointStorage,
    pub coordinator: Arc<tokio::sync::Mutex<CheckpointCoordinator>>,
    pub runtime: tokio::runtime::Handle,
    pub peers: Vec<SyncSender<Message<K, V>>>,
    pub progress: SharedProgress,
    /// Where the keys of processed records go back to the driver, to be freed there.
    pub spent: Sender<Vec<K>>,
}

impl<K, V> SubtaskContext<K, V> {
    fn fail(&self, error: &rockstate::Error) {
        let (lock, cvar) = &*self.progress;
        let index = self.index;
        tracing::error!(subtask = index, error = %error.report(), "subtask failed");
        lock.lock().error.get_or_insert_with(|| error.clone());
        cvar.notify_all();
    }
}

/// Runs the subtask until `Stop` (or until the driver goes away); returns its backend.
pub(crate) fn run<K, V>(
    ctx: SubtaskContext<K, V>,
    backend: RocksStateBackend,
    mut operator: Box<dyn Operator<K, V>>,
    rx: Receiver<Message<K, V>>,
) -> rockstate::Result<RocksStateBackend>
where
    K: Send + 'static,
    V: Send + 'static,
{
    for message in rx {
        match message {
            Message::Records(records) => {
                // Keys that own memory go back to the driver, which allocated them.
                let return_keys = std::mem::needs_drop::<K>();
                let mut keys = Vec::with_capacity(if return_keys { records.len() } else { 0 });
                for (key, value) in records {
                    rockstate::runtime::crash_point("record");
                    if let Err(e) = operator.process(&key, value) {
                        ctx.fail(&e);
                        return Err(e);
                    }
                    if return_keys {
                        keys.push(key);
                    }
                }
                // Freed by the driver; here if it is gone.
                if return_keys {
                    if let Err(returned) = ctx.spent.send(keys) {
                        drop(returned);
                    }
                }
            }
            Message::Barrier {
                id,
                last_completed,
                savepoint,
            } => {
                if let Some(done) = last_completed {
                    backend.notify_checkpoint_complete(done);
                }
                backend.record_metrics(&ctx.job_id, &ctx.operator_uid, ctx.index);
                match backend.snapshot(id) {
                    Ok(pending) => {
                        {
                            let mut progress = ctx.progress.0.lock();
                            progress.max_sync = progress.max_sync.max(pending.sync_duration());
                        }
                        spawn_upload(&ctx, id, pending, savepoint)
                    }
                    // Writes were lost: the checkpoint is declined and the subtask fails
                    // (the job restarts from a checkpoint) instead of going on.
                    Err(e) if backend.has_lost_writes() => {
                        ctx.fail(&e);
                        spawn_decline(&ctx, id, e.to_string());
                        return Err(e);
                    }
                    Err(e) => spawn_decline(&ctx, id, e.to_string()),
                }
            }
            Message::Completed(id) => backend.notify_checkpoint_complete(id),
            Message::Aborted(id) => backend.notify_checkpoint_aborted(id),
            Message::Stop => break,
        }
    }
    drop(operator);
    Ok(backend)
}

/// Tells every subtask, from a blocking thread (queues may be full).
fn broadcast<K, V>(ctx: &SubtaskContext<K, V>, make: fn(u64) -> Message<K, V>, id: u64)
where
    K: Send + 'static,
    V: Send + 'static,
{
    let peers = ctx.peers.clone();
    ctx.runtime.spawn_blocking(move || {
        for peer in peers {
            // A stopped subtask needs no notice.
            let _ = peer.send(make(id));
        }
    });
}

fn record_failure<K, V>(ctx: &SubtaskContext<K, V>, id: u64, reason: String) {
    let (lock, cvar) = &*ctx.progress;
    lock.lock().failed.push((id, reason));
    cvar.notify_all();
}

fn spawn_upload<K, V>(
    ctx: &SubtaskContext<K, V>,
    id: u64,
    pending: PendingSnapshot,
    savepoint: Option<SavepointTrigger>,
) where
    K: Send + 'static,
    V: Send + 'static,
{
    let job = ctx.job.clone();
    let uid = ctx.operator_uid.clone();
    let index = ctx.index;
    let coordinator = ctx.coordinator.clone();
    let task_ctx = SubtaskContext {
        index,
        operator_uid: uid.clone(),
        job_id: ctx.job_id.clone(),
        job: job.clone(),
        coordinator: coordinator.clone(),
        runtime: ctx.runtime.clone(),
        peers: ctx.peers.clone(),
        progress: ctx.progress.clone(),
        spent: ctx.spent.clone(),
    };
    let pause = pending.sync_duration();
    ctx.runtime.spawn(async move {
        let written =
            rockstate::runtime::store_snapshot(pending, &job, &uid, index, savepoint.as_ref())
                .await;
        let outcome = match written {
            Ok(handle) => {
                let snapshot = SubtaskSnapshot {
                    keyed: Some(handle),
                    ..SubtaskSnapshot::default()
                };
                let mut coordinator = coordinator.lock().await;
                coordinator.note_sync_pause(id, pause);
                coordinator.acknowledge(id, &uid, index, snapshot).await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(AckOutcome::Completed(meta)) if meta.is_savepoint() => {
                let (lock, cvar) = &*task_ctx.progress;
                lock.lock().savepoints.push(*meta);
                cvar.notify_all();
            }
            Ok(AckOutcome::Completed(meta)) => {
                {
                    let (lock, cvar) = &*task_ctx.progress;
                    let mut progress = lock.lock();
                    progress.completed.push(id);
                    progress.uploaded.push(meta.uploaded_bytes());
                    progress.latest = Some(*meta);
                    cvar.notify_all();
                }
                broadcast(&task_ctx, Message::Completed, id);
            }
            Ok(AckOutcome::Pending | AckOutcome::Discarded) => {}
            Err(e) if e.kind() == rockstate::ErrorKind::Fenced => {
                tracing::error!(checkpoint = id, subtask = index, error = %e.report(), "stopping: another writer owns the job directory");
                let (lock, cvar) = &*task_ctx.progress;
                let mut progress = lock.lock();
                progress.fatal.get_or_insert(e);
                cvar.notify_all();
            }
            Err(e) => {
                tracing::warn!(checkpoint = id, subtask = index, error = %e.report(), "checkpoint failed");
                if let Err(decline) = coordinator.lock().await.decline(id, &e.to_string()).await {
                    tracing::warn!(checkpoint = id, error = %decline.report(), "decline failed");
                    if decline.kind() == rockstate::ErrorKind::Fenced {
                        let (lock, cvar) = &*task_ctx.progress;
                        lock.lock().fatal.get_or_insert(decline);
                        cvar.notify_all();
                    }
                }
                record_failure(&task_ctx, id, e.to_string());
                broadcast(&task_ctx, Message::Aborted, id);
            }
        }
    });
}

fn spawn_decline<K, V>(ctx: &SubtaskContext<K, V>, id: u64, reason: String)
where
    K: Send + 'static,
    V: Send + 'static,
{
    let coordinator = ctx.coordinator.clone();
    let task_ctx = SubtaskContext {
        index: ctx.index,
        operator_uid: ctx.operator_uid.clone(),
        job_id: ctx.job_id.clone(),
        job: ctx.job.clone(),
        coordinator: coordinator.clone(),
        runtime: ctx.runtime.clone(),
        peers: ctx.peers.clone(),
        progress: ctx.progress.clone(),
        spent: ctx.spent.clone(),
    };
    ctx.runtime.spawn(async move {
        if let Err(e) = coordinator.lock().await.decline(id, &reason).await {
            tracing::warn!(checkpoint = id, error = %e.report(), "decline failed");
        }
        record_failure(&task_ctx, id, reason);
        broadcast(&task_ctx, Message::Aborted, id);
    });
}
