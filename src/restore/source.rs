//! What to restore from, and how.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::checkpoint::discovery;
use crate::checkpoint::{CheckpointMetadata, OperatorSnapshot, OperatorSpec};
use crate::error::{Error, Result};
use crate::format::METADATA_FILE;
use crate::storage::{CheckedLinks, CheckpointStorage};

/// Who owns a restored snapshot's files afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestoreMode {
    /// The restored snapshot is never modified, deleted or referenced by the new job: its
    /// first checkpoint copies the files it still needs into the job's own `shared/`
    /// (inside the store, without downloading them; uploaded when the stores differ).
    /// Restoring a checkpoint of the job's own directory still leaves that checkpoint to
    /// the job's retention, like any other of its checkpoints.
    #[default]
    NoClaim,
    /// The job takes ownership: restored files that lie in the job's own `shared/` are
    /// referenced where they are and deleted by retention once no checkpoint uses them.
    /// Files elsewhere are copied as in `NoClaim` (paths are relative to the job's
    /// directory, so they cannot be referenced across directories).
    Claim,
}

/// How data of other subtasks is brought in when the key-group range changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RescaleStrategy {
    /// Ingest their SST files as they are (fast); falls back to iterating per source
    /// when ingestion is refused (for example when files overlap after earlier rescales).
    #[default]
    Ingest,
    /// Read every entry of the overlapping key groups and write it (slow; for comparison
    /// and as the fallback).
    IterateAndWrite,
}

/// Settings of a restore.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Ownership of the restored files (default `NoClaim`).
    pub mode: RestoreMode,
    /// How rescaling brings in other subtasks' data (default `Ingest`).
    pub strategy: RescaleStrategy,
    /// Accept a snapshot holding state of operators the new job does not have (that
    /// state is dropped). Default `false`: such a restore fails.
    pub allow_non_restored_state: bool,
    /// The operator may be new to the job: when the snapshot has no operator with the
    /// restored uid, [`restore_operator`](crate::BackendBuilder::restore_operator) starts
    /// it empty. Default `false`: a uid the snapshot does not know fails with `InvalidArgument`
    /// listing the snapshot's operators, so that a misspelt uid never restores nothing.
    pub allow_new_operator: bool,
}

/// A completed checkpoint or savepoint to restore from: its metadata and the directory
/// its file paths are relative to (the job directory for checkpoints, the savepoint
/// folder for savepoints).
#[derive(Debug, Clone)]
pub struct RestoreSource {
    metadata: CheckpointMetadata,
    root: CheckpointStorage,
    location: String,
    /// Files of this source already linked and checked by one of its restores, and where
    /// its restores put the files they fetched (shared by the source's other restores).
    checked: Arc<CheckedLinks>,
}

impl RestoreSource {
    /// Opens the snapshot at `url`: a `chk-N` folder of a job directory, a savepoint
    /// folder, or the `_metadata` file inside either.
    ///
    /// Errors: `NotFound` when there is no `_metadata`; `Corrupt`/`Incompatible` for
    /// damaged metadata; `InvalidArgument` for a bad URL.
    pub async fn open(url: &str) -> Result<Self> {
        let trimmed = url.trim_end_matches('/');
        let folder = trimmed
            .strip_suffix(&format!("/{METADATA_FILE}"))
            .unwrap_or(trimmed);
        Self::open_folder(&CheckpointStorage::open_existing(folder)?).await
    }

    /// Opens the snapshot whose folder (`chk-N` or savepoint folder) is `folder`.
    ///
    /// Errors: see [`open`](Self::open).
    pub async fn open_folder(folder: &CheckpointStorage) -> Result<Self> {
        let metadata = crate::format::read_metadata_file(folder, METADATA_FILE)
            .await
            .map_err(|e| match e.kind() {
                crate::error::ErrorKind::NotFound => Error::NotFound(format!(
                    "{}: no _metadata (not a completed checkpoint or savepoint)",
                    folder.url()
                )),
                _ => e,
            })?;
        if metadata.is_savepoint() {
            return Ok(Self {
                metadata,
                root: folder.clone(),
                location: folder.url().to_string(),
                checked: Arc::default(),
            });
        }
        let (job, name) = folder.parent().ok_or_else(|| {
            Error::invalid(format!(
                "checkpoint {} is not inside a job directory",
                folder.url()
            ))
        })?;
        if discovery::parse_checkpoint_dir(&name) != Some(metadata.checkpoint_id) {
            return Err(Error::corrupt(
                folder.url(),
                format!(
                    "the folder {name} holds the _metadata of checkpoint {}",
                    metadata.checkpoint_id
                ),
            ));
        }
        Ok(Self {
            metadata,
            root: job,
            location: folder.url().to_string(),
            checked: Arc::default(),
        })
    }

    /// A completed checkpoint of the job directory `job`.
    pub fn checkpoint(job: &CheckpointStorage, metadata: CheckpointMetadata) -> Self {
        let location = job.url_of(&format!("chk-{}", metadata.checkpoint_id));
        Self {
            metadata,
            root: job.clone(),
            location,
            checked: Arc::default(),
        }
    }

    /// What this source's restores have linked and checked already (clones share it).
    pub(crate) fn checked_links(&self) -> &Arc<CheckedLinks> {
        &self.checked
    }

    /// The snapshot's metadata.
    pub fn metadata(&self) -> &CheckpointMetadata {
        &self.metadata
    }

    /// The directory file paths are relative to.
    pub fn root(&self) -> &CheckpointStorage {
        &self.root
    }

    /// The snapshot's folder URL, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Renames operator `from` of the snapshot to `to`, for a program whose operator got a
    /// new uid: its state then restores under the new uid (the snapshot itself is not
    /// changed). A uid change is never guessed; this is the explicit way.
    ///
    /// Errors: `InvalidArgument` when the snapshot has no operator `from` (listing its
    /// operators) or already has one named `to`.
    pub fn rename_operator(&mut self, from: &str, to: &str) -> Result<()> {
        let known: Vec<String> = self
            .metadata
            .operators
            .iter()
            .map(|o| o.uid.clone())
            .collect();
        if known.iter().any(|uid| uid == to) {
            return Err(Error::invalid(format!(
                "{} already has an operator {to:?}",
                self.location
            )));
        }
        let Some(op) = self.metadata.operators.iter_mut().find(|o| o.uid == from) else {
            return Err(Error::invalid(format!(
                "no operator {from:?} in {} (it holds {known:?})",
                self.location
            )));
        };
        op.uid = to.to_string();
        op.uid_hash = crate::hash::operator_uid_hash(to);
        Ok(())
    }

    /// Checks that the new job can take this snapshot's state: every operator of the
    /// snapshot with state must exist in `operators` (unless `allow_non_restored_state`),
    /// with the same max parallelism. Operators absent from the snapshot start empty.
    ///
    /// Errors: `InvalidArgument` listing the unknown uids and the job's uids;
    /// `Incompatible` for a max parallelism mismatch.
    pub fn check_operators(
        &self,
        operators: &[OperatorSpec],
        allow_non_restored_state: bool,
    ) -> Result<()> {
        let known: BTreeSet<&str> = operators.iter().map(|o| o.uid.as_str()).collect();
        let unknown: Vec<&str> = self
            .metadata
            .operators
            .iter()
            .filter(|op| has_state(op) && !known.contains(op.uid.as_str()))
            .map(|op| op.uid.as_str())
            .collect();
        if !unknown.is_empty() && !allow_non_restored_state {
            return Err(Error::invalid(format!(
                "{} holds state of operator(s) {unknown:?} that the job does not have (its operators: {:?}); allow non-restored state to drop it",
                self.location,
                known
            )));
        }
        for spec in operators {
            if let Some(op) = self.metadata.operator(&spec.uid) {
                self.check_max_parallelism(op, spec.max_parallelism)?;
            }
        }
        Ok(())
    }

    pub(crate) fn check_max_parallelism(&self, op: &OperatorSnapshot, max: u32) -> Result<()> {
        if op.max_parallelism != max {
            return Err(Error::IncompatibleLayout {
                dir: self.location.clone(),
                detail: format!(
                    "operator {:?} was snapshotted with max parallelism {}, the job has {max}; max parallelism is fixed for the life of the state",
                    op.uid, op.max_parallelism
                ),
            });
        }
        Ok(())
    }
}

fn has_state(op: &OperatorSnapshot) -> bool {
    op.subtasks
        .iter()
        .any(|s| s.keyed.is_some() || !s.operator_state.is_empty())
}
