//! Paths inside a storage directory: relative, normalised, never escaping their root.

use crate::error::{Error, Result};

/// Longest accepted relative path, in bytes.
const MAX_PATH_LEN: usize = 1024;

/// Checks one path segment (a file or folder name).
pub(crate) fn validate_segment(segment: &str, what: &str) -> Result<()> {
    let bad = segment.is_empty()
        || segment == "."
        || segment == ".."
        || segment.len() > 255
        || segment
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control());
    if bad {
        return Err(Error::invalid(format!(
            "{what} {segment:?} is not a plain name (no '/', '\\\\', '.', '..', control characters; 1 to 255 bytes)"
        )));
    }
    Ok(())
}

/// Checks that `path` is relative and stays inside its root: `a/b/c` with plain segments.
/// Used on every path read from metadata before it is touched.
pub(crate) fn validate_relative(path: &str, what: &str) -> Result<()> {
    if path.is_empty() || path.len() > MAX_PATH_LEN || path.starts_with('/') {
        return Err(Error::corrupt(
            what,
            format!("path {path:?} is not a relative path inside its root"),
        ));
    }
    for segment in path.split('/') {
        validate_segment(segment, "path segment").map_err(|_| {
            Error::corrupt(what, format!("path {path:?} has a bad segment {segment:?}"))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_paths_are_rejected() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a/./b",
            "a//b",
            "a/",
            "a\\b",
            "..",
            "a/\0",
        ] {
            let err = validate_relative(bad, "handle").unwrap_err();
            assert_eq!(err.kind(), crate::error::ErrorKind::Corrupt, "{bad:?}");
        }
        for good in ["shared/abc.sst", "chk-1/0123/0/MANIFEST-000005", "x"] {
            validate_relative(good, "handle").unwrap();
        }
        assert!(validate_segment("job-1", "job id").is_ok());
        assert!(validate_segment("a/b", "job id").is_err());
        assert!(validate_relative(&"a/".repeat(600), "h").is_err());
    }
}
