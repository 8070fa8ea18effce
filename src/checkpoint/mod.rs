//! Checkpoint coordination: `_metadata`, the shared-state registry, retention, discovery
//! of the latest checkpoint, the orphan sweep and non-keyed operator state.

mod coordinator;
pub(crate) mod discovery;
pub(crate) mod epoch;
mod metadata;
mod operator_state;
mod registry;
mod sweep;

pub use coordinator::{
    AckOutcome, CheckpointCoordinator, CoordinatorOptions, OperatorSpec, SavepointTrigger,
    StartPoint,
};
pub use discovery::JobCheckpoints;
pub use epoch::{EpochRecord, RestoredPoint, WriterEpoch};
pub use metadata::{
    CheckpointMetadata, OperatorSnapshot, SnapshotKind, SubtaskSnapshot, MAX_METADATA_LEN,
    METADATA_MAGIC, METADATA_VERSION,
};
pub use operator_state::{redistribute, OperatorList, OperatorState, Redistribution};
pub use registry::SharedStateRegistry;
pub use sweep::{sweep, SweepOptions, SweepReport};
