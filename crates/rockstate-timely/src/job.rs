//! The job of one process: start planning shared by its workers, and the restore plan
//! worker 0 chooses and hands to the others.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use rockstate::checkpoint::{RestoredPoint, StartPoint, WriterEpoch};
use rockstate::clock::Clock;
use rockstate::keygroup;
use rockstate::restore::{RestoreMode, RestoreOptions, RestoreSource};
use rockstate::runtime::start::{self, StartRequest};
use rockstate::storage::CheckpointStorage;
use rockstate::SharedResources;
use rockstate::{Error, Result};

use crate::config::*;

/// A job's process-wide part: configuration, the async runtime for uploads, and the
/// memory shared by its RocksDB instances. Build it once, before `timely::execute`, and
/// call [`worker`](Self::worker) in every worker.
pub struct TimelyJob {
    pub(crate) config: JobConfig,
    pub(crate) job: CheckpointStorage,
    pub(crate) runtime: tokio::runtime::Runtime,
    pub(crate) resources: SharedResources,
    /// The writer epoch worker 0 claimed, until its coordinator takes it.
    pub(crate) claimed: parking_lot::Mutex<Option<WriterEpoch>>,
}

impl std::fmt::Debug for TimelyJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimelyJob")
            .field("job", &self.job.url())
            .finish()
    }
}

impl TimelyJob {
    /// Prepares a job.
    ///
    /// Errors: `InvalidArgument` for a bad job id, max parallelism or memory budget; I/O
    /// errors starting the runtime.
    pub fn new(config: JobConfig) -> Result<Arc<Self>> {
        keygroup::validate_parallelism(1, config.max_parallelism)?;
        let job = config.checkpoint_dir.child(&config.job_id)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rockstate-io")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the upload runtime", e))?;
        let resources = SharedResources::new(config.memory_budget)?;
        Ok(Arc::new(Self {
            config,
            job,
            runtime,
            resources,
            claimed: parking_lot::Mutex::new(None),
        }))
    }

    /// The job's checkpoint directory.
    pub fn job_storage(&self) -> &CheckpointStorage {
        &self.job
    }

    /// Worker 0's decision: what to restore, the first epoch, the run number. Uses the
    /// same start planning as every runtime; since one worker's failed restore would
    /// stall all others, every candidate is first checked for missing or mis-sized files
    /// and skipped (for an older one, when resuming from the latest) when it has any.
    /// With checkpoints on, it then claims the job directory for the chosen start.
    pub(crate) fn plan(&self) -> Result<Plan> {
        self.runtime.block_on(async {
            let request = match &self.config.start {
                Start::Empty => StartRequest::Empty,
                Start::Latest => StartRequest::Latest,
                Start::Snapshot { url, options } => StartRequest::Snapshot {
                    source: Box::new(RestoreSource::open(url).await?),
                    options: *options,
                },
            };
            let plan = start::plan_start(&self.job, request).await?;
            let chosen = start::first_whole(plan).await?;
            let epoch = if self.config.checkpoints {
                let restored = chosen.as_ref().and_then(|c| match c.start_point {
                    StartPoint::Checkpoint(id) => Some(RestoredPoint {
                        checkpoint_id: id,
                        epoch: c.source.metadata().writer_epoch,
                    }),
                    _ => None,
                });
                let external = chosen.as_ref().and_then(|c| match &c.start_point {
                    StartPoint::External(url) => Some(url.clone()),
                    _ => None,
                });
                let now = rockstate::clock::SystemClock.now_millis();
                let claimed = WriterEpoch::claim(&self.job, restored, external, now).await?;
                let number = claimed.epoch();
                *self.claimed.lock() = Some(claimed);
                number
            } else {
                0
            };
            // Epochs continue above every checkpoint folder that exists after the claim.
            let found = self.job.checkpoints().await?;
            let restore = chosen.map(|c| PlanRestore {
                own_checkpoint: match c.start_point {
                    StartPoint::Checkpoint(id) => Some(id),
                    _ => None,
                },
                url: c.source.location().to_string(),
                options: c.options,
            });
            Ok(Plan {
                first_epoch: found.highest_id.saturating_add(1).max(1),
                run: rand::random(),
                epoch,
                restore,
            })
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PlanRestore {
    /// Set for a checkpoint of this job (opened through the job's own storage).
    pub(crate) own_checkpoint: Option<u64>,
    pub(crate) url: String,
    #[serde(with = "restore_options")]
    pub(crate) options: RestoreOptions,
}

/// `RestoreOptions` as `(claim, allow_non_restored_state)`; the strategy is the default.
mod restore_options {
    use super::*;

    pub fn serialize<S: serde::Serializer>(
        o: &RestoreOptions,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        (o.mode == RestoreMode::Claim, o.allow_non_restored_state).serialize(s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<RestoreOptions, D::Error> {
        let (claim, allow) = <(bool, bool)>::deserialize(d)?;
        Ok(RestoreOptions {
            mode: if claim {
                RestoreMode::Claim
            } else {
                RestoreMode::NoClaim
            },
            allow_non_restored_state: allow,
            ..RestoreOptions::default()
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub(crate) first_epoch: u64,
    pub(crate) run: u64,
    /// The writer epoch worker 0 claimed (0 without checkpoints): workers confirm only
    /// checkpoints committed under it.
    pub(crate) epoch: u64,
    pub(crate) restore: Option<PlanRestore>,
}
