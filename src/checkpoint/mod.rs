//! Checkpoint coordination: the coordinator that commits `_metadata`, the shared-state
//! registry, retention, writer epochs, discovery of the latest checkpoint and the orphan
//! sweep. The formats it writes are in [`crate::format`] (re-exported here).

mod coordinator;
pub(crate) mod discovery;
pub(crate) mod epoch;
mod registry;
pub mod status;
mod sweep;

pub use crate::format::{redistribute, OperatorList, OperatorState, Redistribution};
pub use crate::format::{
    CheckpointMetadata, OperatorSnapshot, SnapshotKind, SubtaskSnapshot, MAX_METADATA_LEN,
    METADATA_MAGIC, METADATA_VERSION,
};
pub(crate) use coordinator::commit;
pub use coordinator::{
    AckOutcome, CheckpointCoordinator, CoordinatorOptions, OperatorSpec, SavepointTrigger,
    StartPoint,
};
pub use discovery::JobCheckpoints;
pub use epoch::{EpochRecord, RestoredPoint, WriterEpoch};
pub use registry::SharedStateRegistry;
pub use sweep::{sweep, SweepOptions, SweepReport};
