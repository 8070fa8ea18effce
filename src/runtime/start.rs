//! Choosing where a job starts, one path for every runtime (the thread harness and the
//! timely adapter): which snapshot to restore, what to fall back to when it cannot be
//! restored, and what the coordinator records when it claims the job directory.

use std::collections::BTreeMap;

use crate::checkpoint::epoch::Epochs;
use crate::checkpoint::{CheckpointMetadata, StartPoint};
use crate::error::{Error, ErrorKind, Result};
use crate::restore::{RestoreMode, RestoreOptions, RestoreSource};
use crate::storage::CheckpointStorage;

/// What a runtime was asked to start from.
#[derive(Debug, Clone)]
pub enum StartRequest {
    /// Empty state.
    Empty,
    /// The newest completed checkpoint of the job's current timeline, falling back to
    /// older ones of the timeline when it cannot be restored (empty when there is none).
    Latest,
    /// A given checkpoint of the job's own directory.
    Checkpoint(Box<CheckpointMetadata>),
    /// Any checkpoint or savepoint, restored with `options`.
    Snapshot {
        /// What to restore.
        source: Box<RestoreSource>,
        /// Ownership, rescale strategy, non-restored state policy.
        options: RestoreOptions,
    },
}

/// One snapshot a runtime may start from.
#[derive(Debug, Clone)]
pub struct StartCandidate {
    /// What to restore.
    pub source: RestoreSource,
    /// How.
    pub options: RestoreOptions,
    /// What the coordinator records when it claims the job directory after restoring
    /// this candidate.
    pub start_point: StartPoint,
}

/// The snapshots to try, best first. Restoring a checkpoint of the job's own directory
/// keeps it retained (the coordinator's claim records it), so its files may always be
/// reused in place by the next checkpoint.
#[derive(Debug, Clone)]
pub struct StartPlan {
    /// Candidates, best first; empty for an empty start.
    pub candidates: Vec<StartCandidate>,
    /// Whether a candidate that cannot be restored (a missing or damaged file, an
    /// unreadable `_metadata`) is skipped for the next one.
    pub fallback: bool,
}

/// What the coordinator records for a restore of `source` into the job directory `job`.
pub fn start_point(job: &CheckpointStorage, source: &RestoreSource) -> StartPoint {
    let meta = source.metadata();
    if !meta.is_savepoint() && source.root().url() == job.url() {
        StartPoint::Checkpoint(meta.checkpoint_id)
    } else {
        StartPoint::External(source.location().to_string())
    }
}

/// Plans a start of the job whose directory is `job`.
///
/// Errors: storage errors (nothing is skipped because of a network error).
pub async fn plan_start(job: &CheckpointStorage, request: StartRequest) -> Result<StartPlan> {
    let resume = RestoreOptions {
        mode: RestoreMode::Claim,
        ..RestoreOptions::default()
    };
    let candidate = |source: RestoreSource, options: RestoreOptions| StartCandidate {
        start_point: start_point(job, &source),
        source,
        options,
    };
    Ok(match request {
        StartRequest::Empty => StartPlan {
            candidates: Vec::new(),
            fallback: false,
        },
        StartRequest::Latest => {
            let found = job.checkpoints().await?;
            let mut candidates: Vec<StartCandidate> = found
                .completed
                .into_iter()
                .rev()
                .map(|meta| candidate(RestoreSource::checkpoint(job, meta), resume))
                .collect();
            if candidates.is_empty() {
                // Restored from elsewhere, and no checkpoint completed since: resuming
                // restores that snapshot again (never an empty state).
                if let Some(url) = Epochs::list(job).await?.newest_external().await? {
                    let source = RestoreSource::open(&url).await?;
                    candidates.push(StartCandidate {
                        source,
                        options: RestoreOptions::default(),
                        start_point: StartPoint::External(url),
                    });
                }
            }
            StartPlan {
                candidates,
                fallback: true,
            }
        }
        StartRequest::Checkpoint(meta) => StartPlan {
            candidates: vec![candidate(RestoreSource::checkpoint(job, *meta), resume)],
            fallback: false,
        },
        StartRequest::Snapshot { source, options } => StartPlan {
            candidates: vec![candidate(*source, options)],
            fallback: false,
        },
    })
}

/// Whether a restore error means "this snapshot cannot be restored, try an older one"
/// (rather than a problem of this process or of the storage connection).
pub fn falls_back(error: &Error) -> bool {
    matches!(error.kind(), ErrorKind::Corrupt | ErrorKind::NotFound)
}

/// A cheap check before a restore that several processes depend on: every file the
/// snapshot references exists with its recorded size (one listing, no downloads).
/// Content damage is still found by the restore itself, which checks every CRC32.
///
/// Errors: `NotFound` or `Corrupt` naming the first missing or mis-sized file (see
/// [`falls_back`]); storage errors.
pub async fn preflight(source: &RestoreSource) -> Result<()> {
    let listed: BTreeMap<String, u64> = source
        .root()
        .list("")
        .await?
        .into_iter()
        .map(|o| (o.path, o.size))
        .collect();
    check_listed(source, &listed)
}

/// [`preflight`] of every candidate of `plan`, best first, listing each root once:
/// the first candidate whose files are all there, or, when resuming with fallback and
/// none is, the newest one's reason.
///
/// Errors: see [`preflight`].
pub async fn first_whole(plan: StartPlan) -> Result<Option<StartCandidate>> {
    let mut listings: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut newest_error = None;
    for candidate in plan.candidates {
        let root = candidate.source.root();
        if !listings.contains_key(root.url()) {
            let listed = root
                .list("")
                .await?
                .into_iter()
                .map(|o| (o.path, o.size))
                .collect();
            listings.insert(root.url().to_string(), listed);
        }
        match check_listed(&candidate.source, &listings[root.url()]) {
            Ok(()) => return Ok(Some(candidate)),
            Err(e) if plan.fallback && falls_back(&e) => {
                tracing::warn!(checkpoint = %candidate.source.location(), error = %e.report(), "cannot restore this checkpoint; trying an older one");
                newest_error.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    newest_error.map_or(Ok(None), Err)
}

fn check_listed(source: &RestoreSource, listed: &BTreeMap<String, u64>) -> Result<()> {
    let meta = source.metadata();
    for (op, keyed) in meta.keyed() {
        for file in keyed.files() {
            match listed.get(&file.path) {
                None => {
                    return Err(Error::NotFound(format!(
                        "checkpoint {}, operator {:?}: file {}",
                        meta.checkpoint_id,
                        op.uid,
                        source.root().url_of(&file.path)
                    )))
                }
                Some(size) if *size != file.size => {
                    return Err(Error::corrupt(
                        format!("file {}", source.root().url_of(&file.path)),
                        format!("{size} bytes stored, {} recorded", file.size),
                    ))
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}
