//! The shared-state registry: which shared files are in use, and when one may be deleted.
//!
//! Rules:
//! 1. subtasks reuse only files of their last confirmed checkpoint (see the backend);
//! 2. each file remembers the last checkpoint that used it, and is deleted once the lowest
//!    retained checkpoint is above that;
//! 3. a checkpoint that references a file the registry does not know (and did not upload
//!    itself) fails instead of completing;
//! 4. after a restart the registry is rebuilt from the retained checkpoints' metadata.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::format::metadata::CheckpointMetadata;

/// One registered shared file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    last_used: u64,
    size: u64,
}

/// Shared files by path (relative to the job directory).
#[derive(Debug, Default)]
pub struct SharedStateRegistry {
    files: BTreeMap<String, Entry>,
}

impl SharedStateRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the registry from retained checkpoints, oldest first.
    pub fn rebuild<'a>(retained: impl IntoIterator<Item = &'a CheckpointMetadata>) -> Self {
        let mut registry = Self::new();
        for meta in retained {
            registry.add(meta);
        }
        registry
    }

    /// Records `meta`'s shared files without checking them (rebuild, or after `check`).
    pub(crate) fn add(&mut self, meta: &CheckpointMetadata) {
        for (_, handle) in meta.handles() {
            for file in &handle.shared {
                let entry = self.files.entry(file.path.clone()).or_insert(Entry {
                    last_used: meta.checkpoint_id,
                    size: file.size,
                });
                entry.last_used = entry.last_used.max(meta.checkpoint_id);
            }
        }
    }

    /// Rule 3: checks that every shared file of `meta` is either registered or uploaded by
    /// this very checkpoint.
    ///
    /// Errors: `NotFound` naming the first unknown file.
    pub fn check(&self, meta: &CheckpointMetadata) -> Result<()> {
        for (op, handle) in meta.handles() {
            for file in &handle.shared {
                if file.uploaded_by != meta.checkpoint_id && !self.files.contains_key(&file.path) {
                    return Err(Error::NotFound(format!(
                        "checkpoint {}, operator {:?}: shared file {} (uploaded by checkpoint {}) is not registered; it may have been deleted",
                        meta.checkpoint_id, op.uid, file.path, file.uploaded_by
                    )));
                }
            }
        }
        Ok(())
    }

    /// Registers a completed checkpoint's shared files (after [`check`](Self::check)).
    pub fn register(&mut self, meta: &CheckpointMetadata) -> Result<()> {
        self.check(meta)?;
        self.add(meta);
        Ok(())
    }

    /// Rule 2: forgets and returns the files whose last use is below `lowest_retained`.
    /// The caller deletes them.
    pub fn release_below(&mut self, lowest_retained: u64) -> Vec<String> {
        let gone: Vec<String> = self
            .files
            .iter()
            .filter(|(_, e)| e.last_used < lowest_retained)
            .map(|(p, _)| p.clone())
            .collect();
        for path in &gone {
            self.files.remove(path);
        }
        gone
    }

    /// Number of files whose last use is below `lowest_retained`.
    pub fn count_below(&self, lowest_retained: u64) -> usize {
        self.files
            .values()
            .filter(|e| e.last_used < lowest_retained)
            .count()
    }

    /// Whether `path` is registered.
    pub fn contains(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }

    /// Number of registered files and their total size.
    pub fn stats(&self) -> (usize, u64) {
        let bytes = self
            .files
            .values()
            .fold(0u64, |acc, e| acc.saturating_add(e.size));
        (self.files.len(), bytes)
    }
}
