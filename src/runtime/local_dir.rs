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
pub fn take(dir: &Path) -> Result<()> {
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

/// Where [`set_aside`] keeps an earlier run's files inside a scratch directory.
pub const PREVIOUS_RUN: &str = ".previous-run";

/// Takes `dir` (see [`take`]) and removes everything in it but the marker and the
/// files set aside by [`set_aside`].
///
/// Errors: see [`take`]; I/O errors.
pub fn reset(dir: &Path) -> Result<()> {
    take(dir)?;
    let io = |what: &str, e| Error::io(format!("{what} {}", dir.display()), e);
    for entry in std::fs::read_dir(dir).map_err(|e| io("read", e))? {
        let entry = entry.map_err(|e| io("read", e))?;
        if entry.file_name() == MARKER || entry.file_name() == PREVIOUS_RUN {
            continue;
        }
        remove(&entry.path())?;
    }
    Ok(())
}

/// Takes `dir` (see [`take`]) and moves what an earlier run left in it into
/// `dir/.previous-run/` (replacing what an even earlier start set aside), so that a
/// restore can reuse those files. Returns the directories set aside; remove them with
/// [`remove`] on `dir.join(PREVIOUS_RUN)` once the restore is done.
///
/// Errors: see [`take`]; I/O errors.
pub fn set_aside(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    take(dir)?;
    let previous = dir.join(PREVIOUS_RUN);
    let io = |what: &str, e| Error::io(format!("{what} {}", dir.display()), e);
    let entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| io("read", e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| io("read", e))?;
    let earlier: Vec<_> = entries
        .iter()
        .filter(|e| e.file_name() != MARKER && e.file_name() != PREVIOUS_RUN)
        .collect();
    if earlier.is_empty() {
        // Nothing new to set aside: what an earlier start set aside stays usable.
        return dirs_in(&previous);
    }
    remove(&previous)?;
    std::fs::create_dir(&previous).map_err(|e| io("create", e))?;
    for entry in earlier {
        let to = previous.join(entry.file_name());
        std::fs::rename(entry.path(), &to).map_err(|e| io("set aside files in", e))?;
    }
    dirs_in(&previous)
}

/// Moves `dir` (one runtime worker's scratch folder) to `previous`, replacing what an
/// earlier start set aside there, unless `dir` is missing or empty (then what is at
/// `previous` stays). Returns the directories inside `previous`, which a restore may
/// take files from; remove `previous` once the restore is done.
///
/// Errors: I/O errors.
pub fn set_aside_one(dir: &Path, previous: &Path) -> Result<Vec<std::path::PathBuf>> {
    let holds_files = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
    };
    if holds_files {
        remove(previous)?;
        std::fs::rename(dir, previous).map_err(|e| {
            Error::io(
                format!("move {} to {}", dir.display(), previous.display()),
                e,
            )
        })?;
    } else {
        remove(dir)?;
    }
    dirs_in(previous)
}

/// The directories directly inside `dir` (none when it does not exist).
fn dirs_in(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Removes `path` (a file, a link, or a directory tree; links are not followed); a
/// missing path is fine.
pub fn remove(path: &Path) -> Result<()> {
    crate::storage::remove_local(path)
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
        assert_eq!(err.kind(), crate::error::ErrorKind::InvalidArgument);
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
