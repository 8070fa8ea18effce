//! `KeyedStateHandle`: the serialisable description of one subtask's snapshot.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::{Error, Result};
use crate::format::StateMeta;
use crate::keygroup::{self, KeyGroupRange};
use crate::storage::path;
use crate::storage::FileInfo;

/// Version 2 records the structure of the states' types.
const HANDLE_VERSION: u32 = 2;

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// The file's name in the RocksDB directory (restored under this name).
    pub local_name: String,
    /// Where the file is stored, relative to the snapshot's root (the job directory for
    /// checkpoints), e.g. `shared/4f0c….sst`.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// CRC32 (IEEE) of the content.
    pub crc32: u32,
    /// The checkpoint that uploaded the file. A shared file reused by a later checkpoint
    /// keeps the id of the one that uploaded it, so the coordinator can tell a new file
    /// from a reference to an existing one.
    pub uploaded_by: u64,
}

impl StateFile {
    /// Size and checksum, as checked on download.
    pub fn info(&self) -> FileInfo {
        FileInfo {
            size: self.size,
            crc32: self.crc32,
        }
    }
}

/// What one subtask's snapshot consists of. Handles travel as plain values (serde, or
/// [`encode`](Self::encode)) so that a runtime can send them over its own channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedStateHandle {
    /// Id of the backend's local state that was snapshotted.
    pub backend_uid: String,
    /// The checkpoint this snapshot belongs to.
    pub checkpoint_id: u64,
    /// Key groups covered.
    pub key_group_range: KeyGroupRange,
    /// The job's number of key groups.
    pub max_parallelism: u32,
    /// Whether SST files are shared with other checkpoints (`shared/`) or private.
    pub incremental: bool,
    /// SST files under `shared/`, possibly referenced by several checkpoints.
    pub shared: Vec<StateFile>,
    /// Files owned by this checkpoint alone (MANIFEST, CURRENT, OPTIONS, and every SST of
    /// a full snapshot).
    pub private: Vec<StateFile>,
    /// The states stored in the snapshot.
    pub states: Vec<StateMeta>,
    /// Bytes this checkpoint uploaded (new shared files plus private files).
    pub uploaded_bytes: u64,
}

impl KeyedStateHandle {
    /// Shared files this checkpoint uploaded (not references to earlier uploads).
    pub fn new_shared(&self) -> impl Iterator<Item = &StateFile> {
        self.shared
            .iter()
            .filter(|f| f.uploaded_by == self.checkpoint_id)
    }

    /// Every file, shared first.
    pub fn files(&self) -> impl Iterator<Item = &StateFile> {
        self.shared.iter().chain(self.private.iter())
    }

    /// Total size of every referenced file (saturating: sizes come from storage).
    pub fn total_size(&self) -> u64 {
        self.files().fold(0u64, |acc, f| acc.saturating_add(f.size))
    }

    /// Encodes the handle as a versioned byte string.
    pub fn encode(&self) -> Result<Vec<u8>> {
        codec::encode_versioned(HANDLE_VERSION, self)
    }

    /// Decodes and [validates](Self::validate) a handle.
    ///
    /// Errors: `Corrupt` for damaged bytes or unsafe content; `Incompatible` for an unknown
    /// format version.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (_, handle): (u32, Self) =
            crate::format::decode_versioned_states(bytes, HANDLE_VERSION, 2, "state handle")?;
        handle.validate()?;
        Ok(handle)
    }

    /// Checks what a handle read from storage must satisfy before anything is touched:
    /// relative paths inside the root, plain and unique local file names, a key-group
    /// range within the max parallelism.
    pub fn validate(&self) -> Result<()> {
        let what = format!("state handle of checkpoint {}", self.checkpoint_id);
        keygroup::validate_max_parallelism(self.max_parallelism)
            .map_err(|e| Error::corrupt(&what, e))?;
        if !self.key_group_range.fits(self.max_parallelism) {
            return Err(Error::corrupt(
                &what,
                format!(
                    "key groups {} beyond max parallelism {}",
                    self.key_group_range, self.max_parallelism
                ),
            ));
        }
        let mut names = BTreeSet::new();
        for file in self.files() {
            path::validate_relative(&file.path, &what)?;
            path::validate_segment(&file.local_name, "local file name")
                .map_err(|e| Error::corrupt(&what, e))?;
            if !names.insert(file.local_name.as_str()) {
                return Err(Error::corrupt(
                    &what,
                    format!("file {} listed twice", file.local_name),
                ));
            }
        }
        if !self.shared.iter().all(|f| f.path.starts_with("shared/")) {
            return Err(Error::corrupt(&what, "a shared file outside shared/"));
        }
        if self.files().any(|f| f.uploaded_by > self.checkpoint_id)
            || self
                .private
                .iter()
                .any(|f| f.uploaded_by != self.checkpoint_id)
        {
            return Err(Error::corrupt(
                &what,
                "a file claims to be uploaded by another checkpoint than possible",
            ));
        }
        Ok(())
    }
}

/// One subtask's keyed state in a canonical savepoint: one data file with a section per
/// key group (see [`crate::savepoint::canonical`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanonicalHandle {
    /// The savepoint's id.
    pub checkpoint_id: u64,
    /// Key groups covered.
    pub key_group_range: KeyGroupRange,
    /// The job's number of key groups.
    pub max_parallelism: u32,
    /// The states stored in the file.
    pub states: Vec<StateMeta>,
    /// The data file, relative to the savepoint folder.
    pub file: StateFile,
    /// Number of entries in the file.
    pub entries: u64,
}

/// One subtask's keyed state in a snapshot: RocksDB files (checkpoints and native
/// savepoints) or a canonical data file (canonical savepoints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyedSnapshot {
    /// RocksDB files.
    Files(KeyedStateHandle),
    /// A canonical savepoint data file.
    Canonical(CanonicalHandle),
}

impl From<KeyedStateHandle> for KeyedSnapshot {
    fn from(handle: KeyedStateHandle) -> Self {
        KeyedSnapshot::Files(handle)
    }
}

impl KeyedSnapshot {
    /// The snapshot's checkpoint (or savepoint) id.
    pub fn checkpoint_id(&self) -> u64 {
        match self {
            KeyedSnapshot::Files(h) => h.checkpoint_id,
            KeyedSnapshot::Canonical(h) => h.checkpoint_id,
        }
    }

    /// Key groups covered.
    pub fn key_group_range(&self) -> KeyGroupRange {
        match self {
            KeyedSnapshot::Files(h) => h.key_group_range,
            KeyedSnapshot::Canonical(h) => h.key_group_range,
        }
    }

    /// The job's number of key groups.
    pub fn max_parallelism(&self) -> u32 {
        match self {
            KeyedSnapshot::Files(h) => h.max_parallelism,
            KeyedSnapshot::Canonical(h) => h.max_parallelism,
        }
    }

    /// The states stored.
    pub fn states(&self) -> &[StateMeta] {
        match self {
            KeyedSnapshot::Files(h) => &h.states,
            KeyedSnapshot::Canonical(h) => &h.states,
        }
    }

    /// The RocksDB-file handle, if this is one.
    pub fn as_files(&self) -> Option<&KeyedStateHandle> {
        match self {
            KeyedSnapshot::Files(h) => Some(h),
            KeyedSnapshot::Canonical(_) => None,
        }
    }

    /// Every referenced file.
    pub fn files(&self) -> Vec<&StateFile> {
        match self {
            KeyedSnapshot::Files(h) => h.files().collect(),
            KeyedSnapshot::Canonical(h) => vec![&h.file],
        }
    }

    /// Files this snapshot wrote itself (not references to earlier uploads).
    pub fn written_files(&self) -> Vec<&StateFile> {
        match self {
            KeyedSnapshot::Files(h) => h.new_shared().chain(h.private.iter()).collect(),
            KeyedSnapshot::Canonical(h) => vec![&h.file],
        }
    }

    /// Total size of every referenced file (saturating).
    pub fn total_size(&self) -> u64 {
        self.files()
            .iter()
            .fold(0u64, |acc, f| acc.saturating_add(f.size))
    }

    /// Bytes this snapshot uploaded.
    pub fn uploaded_bytes(&self) -> u64 {
        match self {
            KeyedSnapshot::Files(h) => h.uploaded_bytes,
            KeyedSnapshot::Canonical(h) => h.file.size,
        }
    }

    /// Validates what was read from storage; see [`KeyedStateHandle::validate`].
    pub fn validate(&self) -> Result<()> {
        match self {
            KeyedSnapshot::Files(h) => h.validate(),
            KeyedSnapshot::Canonical(h) => {
                let what = format!("savepoint handle of {}", h.checkpoint_id);
                keygroup::validate_max_parallelism(h.max_parallelism)
                    .map_err(|e| Error::corrupt(&what, e))?;
                if !h.key_group_range.fits(h.max_parallelism) {
                    return Err(Error::corrupt(&what, "key groups beyond max parallelism"));
                }
                path::validate_relative(&h.file.path, &what)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> KeyedStateHandle {
        KeyedStateHandle {
            backend_uid: "b".into(),
            checkpoint_id: 3,
            key_group_range: KeyGroupRange::new(0, 63).unwrap(),
            max_parallelism: 128,
            incremental: true,
            shared: vec![StateFile {
                local_name: "000012.sst".into(),
                path: "shared/abc.sst".into(),
                size: 10,
                crc32: 7,
                uploaded_by: 2,
            }],
            private: vec![StateFile {
                local_name: "CURRENT".into(),
                path: "chk-3/00/0/CURRENT".into(),
                size: 16,
                crc32: 9,
                uploaded_by: 3,
            }],
            states: vec![],
            uploaded_bytes: 26,
        }
    }

    #[test]
    fn round_trip_and_validation() {
        let h = handle();
        assert_eq!(KeyedStateHandle::decode(&h.encode().unwrap()).unwrap(), h);
        assert_eq!(h.total_size(), 26);

        let mut escaping = handle();
        escaping.private[0].path = "../../etc/passwd".into();
        let err = KeyedStateHandle::decode(&escaping.encode().unwrap()).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Corrupt);

        let mut bad_name = handle();
        bad_name.shared[0].local_name = "../x.sst".into();
        assert!(bad_name.validate().is_err());

        let mut twice = handle();
        twice.private[0].local_name = "000012.sst".into();
        assert!(twice.validate().is_err());

        let mut outside = handle();
        outside.shared[0].path = "chk-3/x.sst".into();
        assert!(outside.validate().is_err());

        let mut range = handle();
        range.max_parallelism = 32;
        assert!(range.validate().is_err());

        assert!(KeyedStateHandle::decode(&[0, 0, 0, 1, 0xff]).is_err());
    }
}
