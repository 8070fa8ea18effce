//! rockstate's persisted formats, in one place: what a checkpoint's or savepoint's
//! `_metadata` holds ([`CheckpointMetadata`]), the handles of a subtask's keyed state
//! ([`KeyedStateHandle`], [`CanonicalHandle`]), non-keyed operator state
//! ([`OperatorState`]), the recorded description of every state ([`StateMeta`], with the
//! structure of its types in [`schema`]) and the
//! kinds of savepoint ([`SavepointFormat`], [`Compression`]).
//!
//! These formats are frozen: every stored snapshot depends on them, and the golden files
//! under `fixtures/` pin their bytes. The code that writes and reads them (snapshots,
//! the checkpoint coordinator, restores, savepoints) imports them from here.

pub(crate) mod handle;
mod json;
pub(crate) mod metadata;
pub(crate) mod operator_state;
mod savepoint;
pub mod schema;
mod state_meta;
mod trace;

pub use handle::{CanonicalHandle, KeyedSnapshot, KeyedStateHandle, StateFile};
pub(crate) use metadata::{metadata_path, read_metadata_file, METADATA_FILE};
pub use metadata::{
    CheckpointMetadata, OperatorSnapshot, SnapshotKind, SubtaskSnapshot, MAX_METADATA_LEN,
    METADATA_MAGIC, METADATA_VERSION,
};
pub use operator_state::{redistribute, OperatorList, OperatorState, Redistribution};
pub(crate) use savepoint::folder_name;
pub use savepoint::{Compression, SavepointFormat};
pub(crate) use state_meta::{decode_legacy, decode_versioned_states};
pub use state_meta::{StateKind, StateMeta, TypeInfo};
