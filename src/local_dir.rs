//! Local scratch directories: rockstate empties only directories it created.
//!
//! A runtime's local root (the subtasks' RocksDB directories) is marked with a file
//! [`MARKER`] when rockstate takes it. At a later start a marked directory is emptied; an
//! empty or missing one is taken; a non-empty directory without the marker holds someone
//! else's files and is refused, never emptied.

use std::path::Path;

use crate::error::{Error, Result};

/// The file that marks a directory as rockstate's scratch space.
pub const MARKER: &str = ".rockstate-scratch";

/// Takes `dir` as scratch space: creates it (or accepts it empty) and marks it.
///
/// Errors: `InvalidArgument` when it holds files and is not marked; I/O errors.
pub(crate) fn take(dir: &Path) -> Result<()> {
    let io = |what: &str, e| Error::io(format!("{what} {}", dir.display()), e);
    if dir.join(MARKER).is_file() {
        return Ok(());
    }
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() && !dir.join(MARKER).is_file() {
                return Err(Error::invalid(format!(
                    "local directory {} is not empty and was not created by rockstate; give a new or empty directory",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| io("create", e))?;
        }
        Err(e) => return Err(io("read", e)),
    }
    std::fs::write(
        dir.join(MARKER),
        b"rockstate local state; emptied at every start\n",
    )
    .map_err(|e| io("mark", e))
}

/// Takes `dir` (see [`take`]) and removes everything in it but the marker.
///
/// Errors: see [`take`]; I/O errors.
pub(crate) fn reset(dir: &Path) -> Result<()> {
    take(dir)?;
    let io = |what: &str, e| Error::io(format!("{what} {}", dir.display()), e);
    for entry in std::fs::read_dir(dir).map_err(|e| io("read", e))? {
        let entry = entry.map_err(|e| io("read", e))?;
        if entry.file_name() == MARKER {
            continue;
        }
        remove(&entry.path())?;
    }
    Ok(())
}

/// Removes `path` (a file, a link, or a directory tree; links are not followed).
pub(crate) fn remove(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("inspect {}", path.display()), e)),
    };
    let removed = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    removed.map_err(|e| Error::io(format!("remove {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_marked_or_empty_directories_are_emptied() {
        let top = tempfile::tempdir().unwrap();
        let fresh = top.path().join("fresh");
        reset(&fresh).unwrap();
        std::fs::create_dir_all(fresh.join("subtask-0")).unwrap();
        std::fs::write(fresh.join("subtask-0/CURRENT"), b"x").unwrap();
        reset(&fresh).unwrap();
        assert!(!fresh.join("subtask-0").exists());
        assert!(fresh.join(MARKER).is_file());

        let user = top.path().join("user");
        std::fs::create_dir_all(&user).unwrap();
        std::fs::write(user.join("thesis.tex"), b"years of work").unwrap();
        let err = reset(&user).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        assert!(
            err.to_string().contains("not created by rockstate"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(user.join("thesis.tex")).unwrap(),
            b"years of work"
        );
    }
}
