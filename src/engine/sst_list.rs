//! The list of a snapshot's SST files as RocksDB describes them (column family, level,
//! first and last keys, sequence numbers), written beside the files when they are
//! captured and uploaded with them as a private file.
//!
//! A rescale reads it to fetch, of a source whose key groups it only partly takes, just
//! the files that may hold keys of its new range, and to ingest them without opening a
//! copy of that source. A snapshot without it (taken before it existed, or whose files
//! changed while it was being written) is read as before: every file is fetched and the
//! list comes from the copy's MANIFEST.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::engine::{FileIdentity, SstFile};
use crate::error::{Error, Result};
use crate::storage::path;

/// The list's file name in a snapshot (and in a directory restored from one, where
/// RocksDB ignores it).
pub(crate) const SST_LIST_NAME: &str = "SST-LIST";

const SST_LIST_VERSION: u32 = 1;

/// The largest list written or read (a list takes some 100 bytes per file plus its
/// keys): a reader holds it in memory whole.
pub(crate) const MAX_LIST_BYTES: u64 = 16 << 20;

/// Levels RocksDB may report (it has at most 7 by default; more would be a misreading).
const MAX_LEVEL: i32 = 100;

#[derive(Serialize, Deserialize)]
struct Wire {
    files: Vec<WireFile>,
}

#[derive(Serialize, Deserialize)]
struct WireFile {
    name: String,
    column: String,
    level: i32,
    size: u64,
    start_key: Option<Vec<u8>>,
    end_key: Option<Vec<u8>>,
    smallest_seqno: u64,
    largest_seqno: u64,
}

/// Writes into `dir` the list of its SST files `staged` (name and size) as `live`
/// describes them, and returns its size; `None` (nothing written) when a staged file is
/// not described with its size in `live`: the files changed between the capture and the
/// listing, and a list that is not exactly the snapshot's is no list.
pub(crate) fn write(dir: &Path, staged: &[(String, u64)], live: &[SstFile]) -> Result<Option<u64>> {
    let by_name: BTreeMap<&str, &SstFile> = live.iter().map(|f| (f.name.as_str(), f)).collect();
    let mut files = Vec::new();
    for (name, size) in staged.iter().filter(|(n, _)| n.ends_with(".sst")) {
        let Some(file) = by_name.get(name.as_str()) else {
            return Ok(None);
        };
        if u64::try_from(file.identity.size).ok() != Some(*size) {
            return Ok(None);
        }
        files.push(WireFile {
            name: name.clone(),
            column: file.identity.column.clone(),
            level: file.level,
            size: *size,
            start_key: file.identity.start_key.clone(),
            end_key: file.identity.end_key.clone(),
            smallest_seqno: file.identity.smallest_seqno,
            largest_seqno: file.identity.largest_seqno,
        });
    }
    let bytes = codec::encode_versioned(SST_LIST_VERSION, &Wire { files })?;
    if bytes.len() as u64 > MAX_LIST_BYTES {
        return Ok(None);
    }
    let target = dir.join(SST_LIST_NAME);
    if let Err(e) = std::fs::write(&target, &bytes) {
        // Nothing half written is left to be uploaded.
        let _ = std::fs::remove_file(&target);
        return Err(Error::io(format!("write {}", target.display()), e));
    }
    Ok(Some(bytes.len() as u64))
}

/// Reads a list written by [`write`] (`what` names it in errors) and checks it against
/// the snapshot's SST files `expected` (name and size): the result describes exactly
/// those files. Errors: `Corrupt` for bytes that do not decode or a list that is not
/// the snapshot's; `UnsupportedVersion` for a newer format.
pub(crate) fn read(
    bytes: &[u8],
    expected: &BTreeMap<String, u64>,
    what: &str,
) -> Result<Vec<SstFile>> {
    let (_, wire): (u32, Wire) = codec::decode_versioned(bytes, SST_LIST_VERSION, what)?;
    if wire.files.len() != expected.len() {
        return Err(Error::corrupt(
            what,
            format!(
                "{} files listed for a snapshot of {} SST files",
                wire.files.len(),
                expected.len()
            ),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut files = Vec::with_capacity(wire.files.len());
    for f in wire.files {
        path::validate_segment(&f.name, "listed file name").map_err(|e| Error::corrupt(what, e))?;
        if expected.get(&f.name) != Some(&f.size) || !seen.insert(f.name.clone()) {
            return Err(Error::corrupt(
                what,
                format!(
                    "{} ({} bytes) is not one of the snapshot's files, or is listed twice",
                    f.name, f.size
                ),
            ));
        }
        if !(0..MAX_LEVEL).contains(&f.level) || f.smallest_seqno > f.largest_seqno {
            return Err(Error::corrupt(
                what,
                format!(
                    "{}: level {}, sequence numbers {}..{}",
                    f.name, f.level, f.smallest_seqno, f.largest_seqno
                ),
            ));
        }
        let size = usize::try_from(f.size)
            .map_err(|_| Error::corrupt(what, format!("{}: {} bytes", f.name, f.size)))?;
        files.push(SstFile {
            name: f.name,
            level: f.level,
            identity: FileIdentity {
                column: f.column,
                size,
                start_key: f.start_key,
                end_key: f.end_key,
                smallest_seqno: f.smallest_seqno,
                largest_seqno: f.largest_seqno,
            },
        });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sst(name: &str, size: usize, level: i32) -> SstFile {
        SstFile {
            name: name.into(),
            level,
            identity: FileIdentity {
                column: "state/v".into(),
                size,
                start_key: Some(b"\x00\x01a".to_vec()),
                end_key: Some(b"\x00\x07z".to_vec()),
                smallest_seqno: 3,
                largest_seqno: 9,
            },
        }
    }

    fn expected(files: &[(&str, u64)]) -> BTreeMap<String, u64> {
        files.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    #[test]
    fn a_list_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let live = vec![
            sst("000009.sst", 100, 0),
            sst("000012.sst", 40, 6),
            sst("000013.sst", 1, 0),
        ];
        let staged = vec![
            ("000009.sst".to_string(), 100),
            ("000012.sst".to_string(), 40),
            ("CURRENT".to_string(), 16),
            ("MANIFEST-000014".to_string(), 300),
        ];
        let size = write(dir.path(), &staged, &live).unwrap().unwrap();
        let bytes = std::fs::read(dir.path().join(SST_LIST_NAME)).unwrap();
        assert_eq!(bytes.len() as u64, size);
        let read = read(
            &bytes,
            &expected(&[("000009.sst", 100), ("000012.sst", 40)]),
            "list",
        )
        .unwrap();
        assert_eq!(read.len(), 2);
        for (got, want) in read.iter().zip(&live) {
            assert_eq!(
                (&got.name, got.level, &got.identity),
                (&want.name, want.level, &want.identity)
            );
        }
    }

    #[test]
    fn files_that_changed_before_the_listing_leave_no_list() {
        let dir = tempfile::tempdir().unwrap();
        let staged = vec![("000009.sst".to_string(), 100)];
        // Gone from the live files (compacted away since the capture).
        assert_eq!(
            write(dir.path(), &staged, &[sst("000010.sst", 100, 1)]).unwrap(),
            None
        );
        // Described with another size.
        assert_eq!(
            write(dir.path(), &staged, &[sst("000009.sst", 99, 1)]).unwrap(),
            None
        );
        assert!(!dir.path().join(SST_LIST_NAME).exists());
    }

    #[test]
    fn a_list_that_is_not_the_snapshots_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let staged = vec![("000009.sst".to_string(), 100)];
        write(dir.path(), &staged, &[sst("000009.sst", 100, 1)])
            .unwrap()
            .unwrap();
        let bytes = std::fs::read(dir.path().join(SST_LIST_NAME)).unwrap();
        for wrong in [
            expected(&[]),
            expected(&[("000009.sst", 101)]),
            expected(&[("000008.sst", 100)]),
            expected(&[("000009.sst", 100), ("000010.sst", 5)]),
        ] {
            let err = read(&bytes, &wrong, "list").unwrap_err();
            assert_eq!(err.kind(), crate::error::ErrorKind::Corrupt, "{err}");
        }
        for cut in [0, 3, 4, bytes.len() - 1] {
            assert!(read(&bytes[..cut], &expected(&[("000009.sst", 100)]), "list").is_err());
        }
        let mut newer = bytes.clone();
        newer[..4].copy_from_slice(&2u32.to_be_bytes());
        assert!(read(&newer, &expected(&[("000009.sst", 100)]), "list").is_err());
    }

    #[test]
    fn a_listed_name_that_escapes_its_directory_is_refused() {
        let wire = Wire {
            files: vec![WireFile {
                name: "../000009.sst".into(),
                column: "state/v".into(),
                level: 1,
                size: 100,
                start_key: None,
                end_key: None,
                smallest_seqno: 1,
                largest_seqno: 1,
            }],
        };
        let bytes = codec::encode_versioned(SST_LIST_VERSION, &wire).unwrap();
        let err = read(&bytes, &expected(&[("../000009.sst", 100)]), "list").unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Corrupt, "{err}");
    }
}
