//! What a timely job is configured with: where it starts, and its job settings.

use std::path::PathBuf;
use std::time::Duration;

use rockstate::checkpoint::CoordinatorOptions;
use rockstate::restore::RestoreOptions;
use rockstate::storage::CheckpointStorage;

/// Where a job starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Empty state.
    Empty,
    /// The job's newest completed checkpoint (empty state when there is none).
    Latest,
    /// A checkpoint or savepoint folder (any job's, any parallelism).
    Snapshot {
        /// Its URL.
        url: String,
        /// Ownership, rescale strategy, non-restored state policy.
        options: RestoreOptions,
    },
}

/// Settings of a job on timely, shared by all workers of a process.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// The checkpoint directory; the job's checkpoints go to `<dir>/<job id>/`.
    pub checkpoint_dir: CheckpointStorage,
    /// The job id.
    pub job_id: String,
    /// Number of key groups (fixed for the life of the state).
    pub max_parallelism: u32,
    /// Local scratch space of this process's workers (`worker-<index>/` each, emptied at
    /// start). It must be new, empty, or one rockstate used before (marked with a
    /// `.rockstate-scratch` file): a directory holding other files is refused.
    pub local_root: PathBuf,
    /// Memory shared by the RocksDB instances of this process.
    pub memory_budget: usize,
    /// Whether the RocksDB instances keep statistics counters (block cache hits and
    /// misses, stall time, in the metrics; off by default); see
    /// [`BackendOptions::statistics`](rockstate::BackendOptions::statistics).
    pub rocksdb_statistics: bool,
    /// Where the job starts.
    pub start: Start,
    /// Whether epochs are checkpointed; without, state is only local.
    pub checkpoints: bool,
    /// Retention and timeout of the coordinator (worker 0).
    pub coordinator: CoordinatorOptions,
    /// How often acknowledgements and completions are looked for in storage.
    pub poll_interval: Duration,
    /// Snapshots a worker may have uploading at once; see [`WorkerJob::can_advance`](crate::WorkerJob::can_advance).
    pub max_uploads: usize,
}

impl JobConfig {
    /// Defaults: max parallelism 128, 256 MiB, start from the latest checkpoint,
    /// checkpoints on, 2 retained, a 60 s timeout, polling every 50 ms, 2 uploads.
    pub fn new(checkpoint_dir: CheckpointStorage, job_id: &str, local_root: PathBuf) -> Self {
        Self {
            checkpoint_dir,
            job_id: job_id.to_string(),
            max_parallelism: 128,
            local_root,
            memory_budget: 256 << 20,
            rocksdb_statistics: false,
            start: Start::Latest,
            checkpoints: true,
            coordinator: CoordinatorOptions {
                num_retained: 2,
                max_concurrent: 1,
                timeout: Duration::from_secs(60),
                savepoints_dir: None,
                ..CoordinatorOptions::default()
            },
            poll_interval: Duration::from_millis(50),
            max_uploads: 2,
        }
    }
}
