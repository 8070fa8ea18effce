//! Savepoints: user-triggered, self-contained snapshots that restore at any parallelism.
//!
//! A savepoint lives in its own folder, `savepoint-<job>-<random>/`, holding `_metadata`
//! and every data file under paths relative to the folder: the folder can be moved or
//! copied anywhere and still restores. Savepoints never reference checkpoint files and
//! are never deleted by checkpoint retention; [`dispose_savepoint`] deletes one.
//!
//! Two formats:
//! - **canonical** ([`SavepointFormat::Canonical`]): per subtask one data file with a
//!   CRC-checked section per key group and an index ([`canonical`]), independent of
//!   RocksDB's file format;
//! - **native** ([`SavepointFormat::Native`]): the subtask's RocksDB files, copied. Faster
//!   to take and to restore at the same parallelism; rescaling uses file ingestion.

pub mod canonical;

use crate::error::{Error, ErrorKind, Result};
use crate::format::{read_metadata_file, CheckpointMetadata, METADATA_FILE};
use crate::storage::CheckpointStorage;

pub use crate::format::{Compression, SavepointFormat};

/// Reads the `_metadata` of the savepoint folder `folder`.
///
/// Errors: `NotFound` when the folder has no `_metadata`; `InvalidArgument` when it is a
/// checkpoint, not a savepoint; `Corrupt`/`Incompatible` for damaged metadata.
pub async fn read_savepoint(folder: &CheckpointStorage) -> Result<CheckpointMetadata> {
    let meta = read_metadata_file(folder, METADATA_FILE)
        .await
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::NotFound(format!(
                "savepoint {}: no _metadata (not a savepoint folder, or incomplete)",
                folder.url()
            )),
            _ => e,
        })?;
    if !meta.is_savepoint() {
        return Err(Error::invalid(format!(
            "{} holds checkpoint {}, not a savepoint",
            folder.url(),
            meta.checkpoint_id
        )));
    }
    Ok(meta)
}

/// Deletes the savepoint in `folder`: its `_metadata` first (so a half-deleted savepoint
/// is never mistaken for a complete one), then every other object in the folder. Nothing
/// outside the folder is touched.
///
/// Errors: the errors of [`read_savepoint`] (a folder that is not a savepoint is refused
/// and left alone); storage errors.
pub async fn dispose_savepoint(folder: &CheckpointStorage) -> Result<()> {
    read_savepoint(folder).await?;
    folder.delete(METADATA_FILE).await?;
    let rest: Vec<String> = folder.list("").await?.into_iter().map(|o| o.path).collect();
    folder.delete_many(rest).await
}
