//! Which uploaded SST files a backend may reference without uploading them again.
//!
//! Only files of the last **confirmed** checkpoint are reused (never those of a pending or
//! aborted one, which the coordinator may delete): a checkpoint's files become reusable
//! when `notify_checkpoint_complete` arrives, and are forgotten when it is aborted.

use std::collections::BTreeMap;

use crate::format::handle::StateFile;

/// Files by local SST name.
pub(crate) type FileSet = BTreeMap<String, StateFile>;

/// Shared files of one checkpoint and the storage directory (URL) their paths are
/// relative to: they may be referenced only by snapshots uploaded to the same directory,
/// and only when `in_place`. Otherwise a snapshot copies them from `source` inside the
/// store when it can (no download, no upload from this machine).
#[derive(Debug, Clone, Default)]
pub(crate) struct Uploaded {
    pub root: String,
    pub files: FileSet,
    /// Whether later checkpoints may reference these files where they are.
    pub in_place: bool,
    /// Where the files are, for copies.
    pub source: Option<crate::storage::CheckpointStorage>,
}

/// Pending checkpoints remembered at most; older ones can no longer become reusable.
const MAX_PENDING: usize = 32;

#[derive(Debug, Default)]
pub(crate) struct SnapshotTracker {
    confirmed: Option<(u64, Uploaded)>,
    /// Whether `confirmed` is a restored snapshot's set: its id is of the snapshot's own
    /// job and says nothing about the order of this job's checkpoints (a job restored
    /// from checkpoint 9 of another directory takes checkpoints 1, 2, ...).
    seeded: bool,
    pending: BTreeMap<u64, Uploaded>,
}

impl SnapshotTracker {
    /// The files that a new snapshot may reference without upload.
    pub(crate) fn reusable(&self) -> Uploaded {
        self.confirmed
            .as_ref()
            .map(|(_, set)| set.clone())
            .unwrap_or_default()
    }

    /// The id of the last confirmed checkpoint.
    pub(crate) fn last_confirmed(&self) -> Option<u64> {
        self.confirmed.as_ref().map(|(id, _)| *id)
    }

    /// Records the shared files of an uploaded, not yet confirmed checkpoint.
    pub(crate) fn uploaded(&mut self, checkpoint_id: u64, files: Uploaded) {
        if !self.seeded && self.last_confirmed().is_some_and(|c| checkpoint_id <= c) {
            return;
        }
        self.pending.insert(checkpoint_id, files);
        while self.pending.len() > MAX_PENDING {
            self.pending.pop_first();
        }
    }

    /// The checkpoint completed: its files become the reusable set; older pending ones
    /// are subsumed. Returns false when the checkpoint is unknown here.
    pub(crate) fn complete(&mut self, checkpoint_id: u64) -> bool {
        let Some(files) = self.pending.remove(&checkpoint_id) else {
            return false;
        };
        if self.seeded || self.last_confirmed().is_none_or(|c| c < checkpoint_id) {
            self.confirmed = Some((checkpoint_id, files));
            self.seeded = false;
        }
        self.pending.retain(|id, _| *id > checkpoint_id);
        true
    }

    /// The checkpoint was aborted: its files are never reused.
    pub(crate) fn abort(&mut self, checkpoint_id: u64) {
        self.pending.remove(&checkpoint_id);
    }

    /// After a restore: the restored checkpoint's shared files are confirmed.
    pub(crate) fn seed(&mut self, checkpoint_id: u64, files: Uploaded) {
        self.confirmed = Some((checkpoint_id, files));
        self.seeded = true;
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> Uploaded {
        let files = names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    StateFile {
                        local_name: n.to_string(),
                        path: format!("shared/{n}"),
                        size: 1,
                        crc32: 0,
                        uploaded_by: 1,
                    },
                )
            })
            .collect();
        Uploaded {
            root: "memory://x".into(),
            files,
            in_place: true,
            source: None,
        }
    }

    #[test]
    fn only_confirmed_files_are_reused() {
        let mut t = SnapshotTracker::default();
        t.uploaded(1, set(&["a"]));
        assert!(
            t.reusable().files.is_empty(),
            "pending files are not reusable"
        );
        assert!(t.complete(1));
        assert_eq!(t.reusable().files.len(), 1);

        t.uploaded(2, set(&["a", "b"]));
        t.uploaded(3, set(&["a", "b", "c"]));
        t.abort(2);
        assert!(!t.complete(2), "aborted checkpoint is unknown");
        assert_eq!(t.reusable().files.keys().collect::<Vec<_>>(), vec!["a"]);
        assert!(t.complete(3));
        assert_eq!(t.reusable().files.len(), 3);
        assert_eq!(t.last_confirmed(), Some(3));

        // A late completion of an older checkpoint does not roll the set back.
        t.uploaded(5, set(&["d"]));
        t.uploaded(4, set(&["e"]));
        assert!(t.complete(5));
        assert!(!t.complete(4), "subsumed by 5");
        assert_eq!(t.reusable().files.keys().collect::<Vec<_>>(), vec!["d"]);
        t.uploaded(4, set(&["e"]));
        assert!(!t.complete(4), "older than the confirmed checkpoint");

        t.seed(9, set(&["x"]));
        assert_eq!(t.last_confirmed(), Some(9));
        // A restored snapshot's id does not order this job's checkpoints: a job restored
        // from checkpoint 9 of another directory confirms its own checkpoint 1.
        t.uploaded(1, set(&["x", "z"]));
        assert!(t.complete(1));
        assert_eq!(t.last_confirmed(), Some(1));
        assert_eq!(t.reusable().files.len(), 2);
        t.seed(9, set(&["x"]));

        for id in 10..100 {
            t.uploaded(id, set(&["y"]));
        }
        assert!(
            !t.complete(10),
            "the oldest pending checkpoints are forgotten"
        );
        assert!(t.complete(99));
    }
}
