//! `_metadata`: the record whose presence makes a checkpoint (or savepoint) complete.
//!
//! Layout: 8-byte magic `RKSTMETA`, format version (u32 big-endian), payload length (u32
//! big-endian), serde payload, CRC32 (u32 big-endian) of everything before it. Reading
//! checks each part before decoding anything, so damaged or hostile bytes give a typed
//! error and never a large allocation.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::{Error, Result};
use crate::format::handle::{KeyedSnapshot, KeyedStateHandle};
use crate::format::operator_state::OperatorState;
use crate::format::StateMeta;
use crate::storage::CheckpointStorage;

/// The magic bytes at the start of every `_metadata`.
pub const METADATA_MAGIC: &[u8; 8] = b"RKSTMETA";
/// The newest `_metadata` format version this build writes and reads.
/// Version 4 records the structure of the states' types.
pub const METADATA_VERSION: u32 = 4;
/// Largest `_metadata` accepted (64 MiB).
pub const MAX_METADATA_LEN: u64 = 64 << 20;

const HEADER_LEN: usize = 8 + 4 + 4;

/// What a `_metadata` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// A checkpoint, owned by the job and deleted when subsumed.
    Checkpoint,
    /// A savepoint in the canonical, format-independent layout.
    SavepointCanonical,
    /// A savepoint made of RocksDB files.
    SavepointNative,
}

/// One subtask's part of an operator's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SubtaskSnapshot {
    /// Keyed state, when the operator has any.
    pub keyed: Option<KeyedSnapshot>,
    /// Non-keyed operator state (small lists, e.g. source offsets).
    pub operator_state: OperatorState,
}

/// One operator's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorSnapshot {
    /// The operator's stable uid.
    pub uid: String,
    /// Hex of the uid's 16-byte MurmurHash3 (its directory name in the checkpoint).
    pub uid_hash: String,
    /// Number of subtasks.
    pub parallelism: u32,
    /// Number of key groups.
    pub max_parallelism: u32,
    /// The operator's keyed states.
    pub states: Vec<StateMeta>,
    /// One entry per subtask, in subtask order.
    pub subtasks: Vec<SubtaskSnapshot>,
}

/// The content of a `_metadata` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMetadata {
    /// The checkpoint id.
    pub checkpoint_id: u64,
    /// Checkpoint or savepoint.
    pub kind: SnapshotKind,
    /// The job that took it.
    pub job_id: String,
    /// When it was triggered (ms since the Unix epoch).
    pub triggered_at_ms: u64,
    /// When it completed (ms since the Unix epoch).
    pub completed_at_ms: u64,
    /// Every operator's snapshot.
    pub operators: Vec<OperatorSnapshot>,
    /// The writer epoch of the coordinator that committed it (0 for snapshots written
    /// before epochs existed). See [`crate::checkpoint::WriterEpoch`].
    pub writer_epoch: u64,
}

impl CheckpointMetadata {
    /// Every subtask's keyed state, with its operator.
    pub fn keyed(&self) -> impl Iterator<Item = (&OperatorSnapshot, &KeyedSnapshot)> {
        self.operators.iter().flat_map(|op| {
            op.subtasks
                .iter()
                .filter_map(move |s| s.keyed.as_ref().map(|h| (op, h)))
        })
    }

    /// Every RocksDB-file handle (checkpoints and native savepoints), with its operator.
    pub fn handles(&self) -> impl Iterator<Item = (&OperatorSnapshot, &KeyedStateHandle)> {
        self.keyed()
            .filter_map(|(op, k)| k.as_files().map(|h| (op, h)))
    }

    /// The operator with `uid`.
    pub fn operator(&self, uid: &str) -> Option<&OperatorSnapshot> {
        self.operators.iter().find(|o| o.uid == uid)
    }

    /// Whether this is a savepoint (self-contained, never deleted by retention).
    pub fn is_savepoint(&self) -> bool {
        self.kind != SnapshotKind::Checkpoint
    }

    /// Every path this snapshot references, relative to its root.
    pub fn referenced_paths(&self) -> impl Iterator<Item = &str> {
        self.keyed()
            .flat_map(|(_, h)| h.files().into_iter().map(|f| f.path.as_str()))
    }

    /// Total size of every referenced file.
    pub fn total_size(&self) -> u64 {
        self.keyed()
            .fold(0u64, |acc, (_, h)| acc.saturating_add(h.total_size()))
    }

    /// Bytes uploaded by this checkpoint itself.
    pub fn uploaded_bytes(&self) -> u64 {
        self.keyed()
            .fold(0u64, |acc, (_, h)| acc.saturating_add(h.uploaded_bytes()))
    }

    /// Encodes as a `_metadata` file.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let payload = codec::encode_key(self)?;
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| u64::from(*l) + HEADER_LEN as u64 + 4 <= MAX_METADATA_LEN)
            .ok_or_else(|| {
                Error::invalid(format!("metadata of {} bytes is too large", payload.len()))
            })?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + 4);
        out.extend_from_slice(METADATA_MAGIC);
        out.extend_from_slice(&METADATA_VERSION.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&payload);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        Ok(out)
    }

    /// Decodes a `_metadata` file; `what` names it in errors. Every handle is validated.
    ///
    /// Errors: `Corrupt` for a bad magic, length, CRC or payload, or unsafe handle content;
    /// `Incompatible` for an unknown version.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        if bytes.len() < HEADER_LEN + 4 {
            return Err(Error::corrupt(
                what,
                format!("{} bytes, shorter than the header", bytes.len()),
            ));
        }
        if &bytes[..8] != METADATA_MAGIC {
            return Err(Error::corrupt(
                what,
                "bad magic (not a rockstate _metadata file)",
            ));
        }
        let version = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version == 0 || version > METADATA_VERSION {
            return Err(Error::UnsupportedVersion {
                what: what.to_string(),
                found: version,
                supported: METADATA_VERSION,
            });
        }
        let len = u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
        if bytes.len() != HEADER_LEN + len + 4 {
            return Err(Error::corrupt(
                what,
                format!(
                    "payload length {len} does not match the file size {}",
                    bytes.len()
                ),
            ));
        }
        let body_end = HEADER_LEN + len;
        let stored = u32::from_be_bytes([
            bytes[body_end],
            bytes[body_end + 1],
            bytes[body_end + 2],
            bytes[body_end + 3],
        ]);
        let actual = crc32fast::hash(&bytes[..body_end]);
        if stored != actual {
            return Err(Error::corrupt(
                what,
                format!("CRC32 mismatch: {actual:08x} computed, {stored:08x} stored"),
            ));
        }
        let payload = &bytes[HEADER_LEN..body_end];
        let meta: CheckpointMetadata = match version {
            1 => crate::format::decode_legacy(|| {
                codec::decode_exact::<v1::CheckpointMetadata>(payload, what)
            })?
            .into(),
            2 => crate::format::decode_legacy(|| {
                codec::decode_exact::<v2::CheckpointMetadata>(payload, what)
            })?
            .into(),
            3 => crate::format::decode_legacy(|| codec::decode_exact(payload, what))?,
            _ => codec::decode_exact(payload, what)?,
        };
        for (op, handle) in meta.keyed() {
            handle.validate()?;
            if handle.max_parallelism() != op.max_parallelism {
                return Err(Error::corrupt(
                    what,
                    format!("operator {:?}: handle max parallelism differs", op.uid),
                ));
            }
        }
        for op in &meta.operators {
            if op.subtasks.len() != op.parallelism as usize {
                return Err(Error::corrupt(
                    what,
                    format!(
                        "operator {:?}: {} subtasks for parallelism {}",
                        op.uid,
                        op.subtasks.len(),
                        op.parallelism
                    ),
                ));
            }
        }
        Ok(meta)
    }
}

/// Format version 2, without the writer epoch. Read and converted (epoch 0).
mod v2 {
    use serde::Deserialize;

    use super::{OperatorSnapshot, SnapshotKind};

    #[derive(Deserialize)]
    pub(super) struct CheckpointMetadata {
        checkpoint_id: u64,
        kind: SnapshotKind,
        job_id: String,
        triggered_at_ms: u64,
        completed_at_ms: u64,
        operators: Vec<OperatorSnapshot>,
    }

    impl From<CheckpointMetadata> for super::CheckpointMetadata {
        fn from(m: CheckpointMetadata) -> Self {
            Self {
                checkpoint_id: m.checkpoint_id,
                kind: m.kind,
                job_id: m.job_id,
                triggered_at_ms: m.triggered_at_ms,
                completed_at_ms: m.completed_at_ms,
                operators: m.operators,
                writer_epoch: 0,
            }
        }
    }
}

/// Format version 1, where keyed state was always RocksDB files. Read and converted.
mod v1 {
    use serde::Deserialize;

    use super::{OperatorState, SnapshotKind};
    use crate::format::KeyedStateHandle;
    use crate::format::StateMeta;

    #[derive(Deserialize)]
    pub(super) struct SubtaskSnapshot {
        keyed: Option<KeyedStateHandle>,
        operator_state: OperatorState,
    }

    #[derive(Deserialize)]
    pub(super) struct OperatorSnapshot {
        uid: String,
        uid_hash: String,
        parallelism: u32,
        max_parallelism: u32,
        states: Vec<StateMeta>,
        subtasks: Vec<SubtaskSnapshot>,
    }

    #[derive(Deserialize)]
    pub(super) struct CheckpointMetadata {
        checkpoint_id: u64,
        kind: SnapshotKind,
        job_id: String,
        triggered_at_ms: u64,
        completed_at_ms: u64,
        operators: Vec<OperatorSnapshot>,
    }

    impl From<CheckpointMetadata> for super::CheckpointMetadata {
        fn from(m: CheckpointMetadata) -> Self {
            Self {
                checkpoint_id: m.checkpoint_id,
                kind: m.kind,
                job_id: m.job_id,
                triggered_at_ms: m.triggered_at_ms,
                completed_at_ms: m.completed_at_ms,
                operators: m
                    .operators
                    .into_iter()
                    .map(|op| super::OperatorSnapshot {
                        uid: op.uid,
                        uid_hash: op.uid_hash,
                        parallelism: op.parallelism,
                        max_parallelism: op.max_parallelism,
                        states: op.states,
                        subtasks: op
                            .subtasks
                            .into_iter()
                            .map(|s| super::SubtaskSnapshot {
                                keyed: s.keyed.map(Into::into),
                                operator_state: s.operator_state,
                            })
                            .collect(),
                    })
                    .collect(),
                writer_epoch: 0,
            }
        }
    }
}

/// The name of the file whose presence completes a checkpoint or savepoint.
pub(crate) const METADATA_FILE: &str = "_metadata";

/// `chk-<id>/_metadata`.
pub(crate) fn metadata_path(checkpoint_id: u64) -> String {
    format!("chk-{checkpoint_id}/{METADATA_FILE}")
}

/// Reads and decodes the `_metadata` at `rel` of `storage`.
///
/// Errors: `NotFound`; `Corrupt`/`Incompatible` naming the file; storage errors.
pub(crate) async fn read_metadata_file(
    storage: &CheckpointStorage,
    rel: &str,
) -> Result<CheckpointMetadata> {
    let bytes = storage.read_small(rel, MAX_METADATA_LEN).await?;
    CheckpointMetadata::decode(&bytes, &storage.url_of(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CheckpointMetadata {
        CheckpointMetadata {
            checkpoint_id: 4,
            kind: SnapshotKind::Checkpoint,
            job_id: "job".into(),
            triggered_at_ms: 1,
            completed_at_ms: 2,
            operators: vec![OperatorSnapshot {
                uid: "counter".into(),
                uid_hash: crate::hash::operator_uid_hash("counter"),
                parallelism: 1,
                max_parallelism: 128,
                states: vec![],
                subtasks: vec![SubtaskSnapshot::default()],
            }],
            writer_epoch: 3,
        }
    }

    #[test]
    fn round_trip_and_every_damage_is_detected() {
        let m = sample();
        let bytes = m.encode().unwrap();
        assert_eq!(CheckpointMetadata::decode(&bytes, "m").unwrap(), m);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            let err = CheckpointMetadata::decode(&bad, "m").unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    crate::error::ErrorKind::Corrupt | crate::error::ErrorKind::Incompatible
                ),
                "byte {i}: {err}"
            );
        }
        for cut in 0..bytes.len() {
            assert!(CheckpointMetadata::decode(&bytes[..cut], "m").is_err());
        }
        let mut future = bytes.clone();
        future[11] = 9;
        assert_eq!(
            CheckpointMetadata::decode(&future, "m").unwrap_err().kind(),
            crate::error::ErrorKind::Incompatible
        );
    }
}
