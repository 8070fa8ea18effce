//! Assertions about what a job directory holds, and hooks that observe or refuse steps of
//! the engine in the directories a test names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::format::CheckpointMetadata;
use crate::storage::CheckpointStorage;

/// Paths and sizes of every object under `storage`. Panics when the listing fails.
pub async fn stored(storage: &CheckpointStorage) -> BTreeMap<String, u64> {
    storage
        .list("")
        .await
        .expect("list the job directory")
        .into_iter()
        .map(|o| (o.path, o.size))
        .collect()
}

/// Asserts that the `_metadata` of `meta` and every file it references exist in `job`
/// with the recorded sizes; `when` names the moment in the failure message.
pub async fn assert_whole_on_storage(
    job: &CheckpointStorage,
    meta: &CheckpointMetadata,
    when: &str,
) {
    let stored = stored(job).await;
    let id = meta.checkpoint_id;
    assert!(
        stored.contains_key(&format!("chk-{id}/_metadata")),
        "{when}: the _metadata of checkpoint {id} is gone"
    );
    let mut missing = Vec::new();
    for (_, handle) in meta.handles() {
        for file in handle.files() {
            match stored.get(&file.path) {
                Some(size) if *size == file.size => {}
                Some(size) => missing.push(format!(
                    "{} ({size} bytes, {} recorded)",
                    file.path, file.size
                )),
                None => missing.push(file.path.clone()),
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{when}: checkpoint {id} references {} missing or changed file(s): {missing:?}",
        missing.len()
    );
}

/// The column families whose automatic compactions are off in the latest options file
/// RocksDB wrote in `dir` (see [`columns_with_option`]).
pub fn columns_with_compactions_off(dir: &Path) -> Vec<String> {
    columns_with_option(dir, "disable_auto_compactions=true")
}

/// The column families whose memtables insert with a hint per key group in the latest
/// options file RocksDB wrote in `dir` (see [`columns_with_option`]).
pub fn columns_with_insert_hints(dir: &Path) -> Vec<String> {
    columns_with_option(
        dir,
        "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.2",
    )
}

/// The column families with the option line `line` (`name=value`) in the latest options
/// file RocksDB wrote in `dir` (a backend's local directory: RocksDB rewrites the file at
/// every open and change of options). Panics when there is none or it cannot be read.
pub fn columns_with_option(dir: &Path, line: &str) -> Vec<String> {
    sections_with_option(dir, "CFOptions", line)
}

/// The column families whose block-based table options have the line `line`
/// (`name=value`) in the latest options file RocksDB wrote in `dir` (see
/// [`columns_with_option`]).
pub fn tables_with_option(dir: &Path, line: &str) -> Vec<String> {
    sections_with_option(dir, "TableOptions/BlockBasedTable", line)
}

/// The names of the `[KIND "name"]` sections with the line `line` in the latest options
/// file in `dir`.
fn sections_with_option(dir: &Path, kind: &str, line: &str) -> Vec<String> {
    let latest = std::fs::read_dir(dir)
        .expect("list the backend's directory")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| {
            let number: u64 = name.strip_prefix("OPTIONS-")?.parse().ok()?;
            Some((number, name))
        })
        .max()
        .expect("an options file");
    let text = std::fs::read_to_string(dir.join(&latest.1)).expect("read the options file");
    let mut section = String::new();
    let mut with = Vec::new();
    for text_line in text.lines().map(str::trim) {
        if let Some(name) = text_line
            .strip_prefix('[')
            .and_then(|rest| rest.strip_prefix(kind))
            .and_then(|rest| rest.strip_prefix(" \""))
            .and_then(|rest| rest.strip_suffix("\"]"))
        {
            section = name.to_string();
        } else if text_line.starts_with('[') {
            section.clear();
        } else if text_line == line && !section.is_empty() {
            with.push(section.clone());
        }
    }
    with
}

/// Per root a test watches, the directories under it whose database was closed as a
/// scratch copy (no flush, no sync, no clean mark), in order.
static SCRATCH_CLOSES: parking_lot::Mutex<Vec<(PathBuf, Vec<PathBuf>)>> =
    parking_lot::Mutex::new(Vec::new());

pub(crate) fn scratch_closed(dir: &Path) {
    for (root, closed) in SCRATCH_CLOSES.lock().iter_mut() {
        if dir.starts_with(root) {
            closed.push(dir.to_path_buf());
        }
    }
}

/// From now on, records which databases under `root` are closed as scratch copies (see
/// [`scratch_closes_under`]). Nothing is recorded outside the roots being watched.
pub fn watch_scratch_closes(root: &Path) {
    let mut watched = SCRATCH_CLOSES.lock();
    if !watched.iter().any(|(r, _)| r == root) {
        watched.push((root.to_path_buf(), Vec::new()));
    }
}

/// The directories under `root` (watched with [`watch_scratch_closes`]) whose database
/// was marked as a scratch copy when it closed, so that it was closed with no flush, no
/// sync of its files and no clean mark.
pub fn scratch_closes_under(root: &Path) -> Vec<PathBuf> {
    SCRATCH_CLOSES
        .lock()
        .iter()
        .filter(|(r, _)| r == root)
        .flat_map(|(_, closed)| closed.iter().cloned())
        .collect()
}

/// Directories under which every attempt to resume a column's compactions is refused,
/// as a RocksDB that cannot rewrite its options file would refuse it.
static REFUSED_COMPACTION_RESUMES: parking_lot::Mutex<Vec<PathBuf>> =
    parking_lot::Mutex::new(Vec::new());

/// Makes every later attempt to resume compactions paused by a rescale, in a backend
/// whose directory lies under `root`, fail (`true`) or succeed again (`false`).
pub fn refuse_compaction_resumes(root: &Path, refuse: bool) {
    let mut refused = REFUSED_COMPACTION_RESUMES.lock();
    refused.retain(|r| r != root);
    if refuse {
        refused.push(root.to_path_buf());
    }
}

static REFUSED_INGESTIONS: parking_lot::Mutex<Vec<PathBuf>> = parking_lot::Mutex::new(Vec::new());
static REFUSED_WRITES: parking_lot::Mutex<Vec<PathBuf>> = parking_lot::Mutex::new(Vec::new());

/// Makes every later ingestion of files into a backend whose directory lies under `root`
/// fail (`true`) or succeed again (`false`), as RocksDB refusing them would.
pub fn refuse_ingestions(root: &Path, refuse: bool) {
    let mut refused = REFUSED_INGESTIONS.lock();
    refused.retain(|r| r != root);
    if refuse {
        refused.push(root.to_path_buf());
    }
}

pub(crate) fn ingestion_refused(dir: &Path) -> bool {
    REFUSED_INGESTIONS
        .lock()
        .iter()
        .any(|root| dir.starts_with(root))
}

/// Makes every later application of buffered writes by a backend whose directory lies
/// under `root` fail (`true`) or succeed again (`false`), as RocksDB refusing the batch
/// (after a background error) would.
pub fn refuse_writes(root: &Path, refuse: bool) {
    let mut refused = REFUSED_WRITES.lock();
    refused.retain(|r| r != root);
    if refuse {
        refused.push(root.to_path_buf());
    }
}

pub(crate) fn writes_refused(dir: &Path) -> bool {
    REFUSED_WRITES
        .lock()
        .iter()
        .any(|root| dir.starts_with(root))
}

pub(crate) fn compaction_resumes_refused(dir: &Path) -> bool {
    REFUSED_COMPACTION_RESUMES
        .lock()
        .iter()
        .any(|root| dir.starts_with(root))
}

/// Compacts every state column of `backend` into one sorted run at its bottom level, as
/// RocksDB's own compactions eventually do: its SST files then span the key groups of
/// everything it holds. Panics when a column cannot be found.
pub fn compact_states(backend: &crate::RocksStateBackend) {
    let core = &backend.core;
    core.apply_buffered().expect("the buffered writes applied");
    for (_, column) in core.state_columns() {
        let cf = core.column_cf(&column).expect("a state column");
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        core.db
            .compact_range_cf_opt(&cf, None::<&[u8]>, None::<&[u8]>, &opts);
    }
}
