//! Finding checkpoints in a job directory: completed ones (a readable `_metadata`),
//! incomplete ones (a `chk-N/` without it) and unreadable ones.

use crate::checkpoint::epoch::Epochs;
use crate::error::{ErrorKind, Result};
use crate::format::{metadata_path, read_metadata_file, CheckpointMetadata};
use crate::storage::CheckpointStorage;

/// The id of a `chk-<id>` directory name.
pub(crate) fn parse_checkpoint_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("chk-")?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What a job directory holds ([`CheckpointStorage::checkpoints`]).
#[derive(Debug, Default)]
pub struct JobCheckpoints {
    /// Completed checkpoints of the current timeline, oldest first.
    pub completed: Vec<CheckpointMetadata>,
    /// Completed checkpoints of abandoned timelines (a writer restored an older
    /// checkpoint, or started afresh, after they were taken), oldest first. Never
    /// restored by "latest"; see [`crate::checkpoint::WriterEpoch`].
    pub abandoned: Vec<CheckpointMetadata>,
    /// The newest writer epoch of the directory (0 when none was claimed).
    pub epoch: u64,
    /// Every writer epoch listed.
    pub epochs: Vec<u64>,
    /// Ids of `chk-N/` directories without `_metadata`.
    pub incomplete: Vec<u64>,
    /// Ids whose `_metadata` exists but cannot be read, with the reason.
    pub unreadable: Vec<(u64, String)>,
    /// The highest id seen in any form (0 when none).
    pub highest_id: u64,
}

/// Reads one checkpoint's `_metadata`: `Ok(None)` when it does not exist.
pub(crate) async fn read_metadata(
    job: &CheckpointStorage,
    checkpoint_id: u64,
) -> Result<Option<CheckpointMetadata>> {
    match read_metadata_file(job, &metadata_path(checkpoint_id)).await {
        Ok(meta) => Ok(Some(meta)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Scans the job directory. Storage errors other than damaged metadata are returned:
/// nothing may be concluded (or deleted) from a partial view.
pub(crate) async fn scan(job: &CheckpointStorage) -> Result<JobCheckpoints> {
    let mut ids: Vec<u64> = job
        .list_dirs("")
        .await?
        .iter()
        .filter_map(|d| parse_checkpoint_dir(d))
        .collect();
    ids.sort_unstable();
    let mut epochs = Epochs::list(job).await?;
    let mut found = JobCheckpoints {
        highest_id: ids.last().copied().unwrap_or(0),
        epoch: epochs.current(),
        epochs: epochs.listed().to_vec(),
        ..JobCheckpoints::default()
    };
    for id in ids {
        match read_metadata(job, id).await {
            Ok(Some(meta)) if meta.checkpoint_id == id => {
                if epochs.is_live(id, meta.writer_epoch).await? {
                    found.completed.push(meta)
                } else {
                    found.abandoned.push(meta)
                }
            }
            Ok(Some(meta)) => found.unreadable.push((
                id,
                format!("_metadata names checkpoint {}", meta.checkpoint_id),
            )),
            Ok(None) => found.incomplete.push(id),
            // Damaged, of an unknown version, or behind a symbolic link: not this job's.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Corrupt | ErrorKind::Incompatible | ErrorKind::InvalidArgument
                ) =>
            {
                tracing::warn!(checkpoint = id, error = %e.report(), "skipping unreadable checkpoint");
                found.unreadable.push((id, e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

impl CheckpointStorage {
    /// Every checkpoint of the job whose directory this is: completed ones (oldest
    /// first), incomplete `chk-N/` folders, and ones whose `_metadata` cannot be read.
    ///
    /// Errors: storage errors.
    pub async fn checkpoints(&self) -> Result<JobCheckpoints> {
        scan(self).await
    }

    /// The newest completed checkpoint of the job whose directory this is: the highest
    /// `chk-N` with a readable `_metadata` on the current timeline. A newer checkpoint
    /// whose `_metadata` is damaged is skipped (and logged); incomplete `chk-N/` folders
    /// and checkpoints of abandoned timelines (taken before a writer restored an older
    /// checkpoint) are ignored.
    ///
    /// Errors: storage errors (a checkpoint is never skipped because of a network error).
    pub async fn latest_completed(&self) -> Result<Option<CheckpointMetadata>> {
        let mut ids: Vec<u64> = self
            .list_dirs("")
            .await?
            .iter()
            .filter_map(|d| parse_checkpoint_dir(d))
            .collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        let mut epochs = Epochs::list(self).await?;
        for id in ids {
            match read_metadata(self, id).await {
                Ok(Some(meta)) if meta.checkpoint_id == id => {
                    if epochs.is_live(id, meta.writer_epoch).await? {
                        return Ok(Some(meta));
                    }
                    tracing::debug!(
                        checkpoint = id,
                        "skipping a checkpoint of an abandoned timeline"
                    );
                }
                Ok(Some(meta)) => tracing::warn!(
                    checkpoint = id,
                    named = meta.checkpoint_id,
                    "skipping checkpoint whose _metadata names another id"
                ),
                Ok(None) => tracing::debug!(checkpoint = id, "skipping incomplete checkpoint"),
                // Damaged, of an unknown version, or behind a symbolic link: not this job's.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Corrupt | ErrorKind::Incompatible | ErrorKind::InvalidArgument
                    ) =>
                {
                    tracing::warn!(checkpoint = id, error = %e.report(), "skipping unreadable checkpoint");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_dir_names() {
        assert_eq!(parse_checkpoint_dir("chk-12"), Some(12));
        assert_eq!(parse_checkpoint_dir("chk-"), None);
        assert_eq!(parse_checkpoint_dir("chk-1a"), None);
        assert_eq!(parse_checkpoint_dir("chk--1"), None);
        assert_eq!(parse_checkpoint_dir("shared"), None);
        assert_eq!(parse_checkpoint_dir("chk-99999999999999999999999"), None);
    }
}
