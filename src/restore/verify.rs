//! Checking that a snapshot's files are all there and intact, without restoring it.

use std::collections::BTreeMap;

use futures::StreamExt;

use crate::error::{Error, ErrorKind, Result};
use crate::restore::RestoreSource;
use crate::storage::FileInfo;

/// One referenced file that failed verification.
#[derive(Debug)]
pub struct BadFile {
    /// The file's URL.
    pub url: String,
    /// What is wrong: `NotFound`, `Corrupt` (size or CRC32 mismatch), or
    /// `InvalidArgument` (a recorded path that escapes the snapshot's root).
    pub error: Error,
}

/// The result of [`RestoreSource::verify`].
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Distinct files referenced by the snapshot.
    pub files: usize,
    /// Their total recorded size.
    pub bytes: u64,
    /// The files that are missing or damaged, in path order.
    pub bad: Vec<BadFile>,
}

impl VerifyReport {
    /// Whether every file is sound.
    pub fn is_sound(&self) -> bool {
        self.bad.is_empty()
    }
}

impl RestoreSource {
    /// Reads every file the snapshot references (in parallel, the storage's transfer
    /// concurrency) and checks it exists with its recorded size and CRC32. `on_bytes` is
    /// called with the length of every chunk read (for progress).
    ///
    /// Missing, damaged and out-of-root files are listed in the report. Errors: storage
    /// errors that leave a file's state unknown (`Unavailable`, `Io`): nothing is concluded
    /// from a partial read.
    pub async fn verify(&self, on_bytes: impl Fn(u64) + Sync) -> Result<VerifyReport> {
        let mut files: BTreeMap<&str, FileInfo> = BTreeMap::new();
        for (_, keyed) in self.metadata().keyed() {
            for file in keyed.files() {
                files.insert(&file.path, file.info());
            }
        }
        let mut report = VerifyReport {
            files: files.len(),
            bytes: files
                .values()
                .fold(0u64, |acc, f| acc.saturating_add(f.size)),
            bad: Vec::new(),
        };
        let root = self.root();
        let on_bytes = &on_bytes;
        let mut checks = futures::stream::iter(files.into_iter().map(|(path, info)| async move {
            let result = root.verify_file(path, &info, on_bytes).await;
            (path, result)
        }))
        .buffer_unordered(root.options().transfer_concurrency.max(1));
        while let Some((path, result)) = checks.next().await {
            match result {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::NotFound | ErrorKind::Corrupt | ErrorKind::InvalidArgument
                    ) =>
                {
                    report.bad.push(BadFile {
                        url: root.url_of(path),
                        error: e,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        report.bad.sort_by(|a, b| a.url.cmp(&b.url));
        Ok(report)
    }
}
