//! What a savepoint is made of: its format, the compression of canonical blocks, and the
//! name of its folder.

use serde::{Deserialize, Serialize};

/// How a savepoint stores keyed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SavepointFormat {
    /// Key-group sections in rockstate's own format (the default).
    #[default]
    Canonical,
    /// RocksDB files.
    Native,
}

/// A new savepoint folder name for `job_id`: `savepoint-<first 8 characters>-<12 hex>`.
pub(crate) fn folder_name(job_id: &str) -> String {
    let short: String = job_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(8)
        .collect();
    format!(
        "savepoint-{short}-{:012x}",
        rand::random::<u64>() & 0xffff_ffff_ffff
    )
}

/// Compression of savepoint blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Compression {
    /// Stored as is.
    None,
    /// LZ4 block compression (fast; the default).
    #[default]
    Lz4,
}

impl Compression {
    pub(crate) fn tag(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_are_plain_and_unique() {
        let a = folder_name("my/job id with spaces");
        let b = folder_name("my/job id with spaces");
        assert!(a.starts_with("savepoint-myjobidw-"), "{a}");
        assert_ne!(a, b);
        crate::storage::path::validate_segment(&a, "folder").unwrap();
    }
}
