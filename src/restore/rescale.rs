//! Rescaling: restoring one subtask from the snapshots of subtasks with other key-group
//! ranges (file ingestion, iterate-and-write, canonical sections).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::backend::{BackendBuilder, RocksStateBackend};
use crate::codec;
use crate::engine::sst_list::{self, SST_LIST_NAME};
use crate::engine::tracker::FileSet;
use crate::engine::{live_sst_files, BackendCore, BackendOptions, ColumnSettings, Db, OpenMode};
use crate::error::{Error, ErrorKind, Result};
use crate::format::StateMeta;
use crate::format::{KeyedSnapshot, KeyedStateHandle, StateFile};
use crate::keygroup::KeyGroupRange;
use crate::restore::{
    database_files, download_all, download_files, download_for_ingestion, remove_dir_if_exists,
    seed, sibling, LocalFiles, RescaleStrategy, RestoreOptions, RestoreSource, RESTORING_MARKER,
};
use crate::savepoint::canonical::DataFileReader;

/// Bytes of entries written per batch when iterating.
const BATCH_BYTES: usize = 4 << 20;

type Batch = Vec<(Arc<ColumnSettings>, Vec<u8>, Vec<u8>)>;

impl BackendBuilder {
    /// Creates the backend's directory for a restore that builds it in place, marked
    /// with [`RESTORING_MARKER`].
    async fn start_in_place(&self) -> Result<()> {
        let dir = &self.options.local_dir;
        create_dir(dir).await?;
        let marker = dir.join(RESTORING_MARKER);
        tokio::fs::write(&marker, b"a restore is building this directory\n")
            .await
            .map_err(|e| Error::io(format!("write {}", marker.display()), e))
    }

    /// Builds the state in the backend's own directory with `build`, which opens it and
    /// returns the open backend. The directory carries [`RESTORING_MARKER`] until the
    /// build succeeded; on failure it is removed, so nothing is left behind. (After a
    /// crash the marker tells the next restore that the directory is its to empty.)
    async fn build_in_place<T: Send + 'static>(
        self,
        build: impl FnOnce(BackendBuilder) -> Result<(RocksStateBackend, T)> + Send + 'static,
    ) -> Result<(RocksStateBackend, T)> {
        let dir = self.options.local_dir.clone();
        let marker = dir.join(RESTORING_MARKER);
        let built = blocking(move || {
            let (backend, value) = build(self)?;
            std::fs::remove_file(&marker)
                .map_err(|e| Error::io(format!("remove {}", marker.display()), e))?;
            Ok((backend, value))
        })
        .await;
        if built.is_err() {
            if let Err(cleanup) = remove_dir_if_exists(&dir).await {
                tracing::warn!(dir = %dir.display(), error = %cleanup.report(), "cannot remove a failed restore");
            }
        }
        built
    }

    pub(super) async fn restore_canonical(
        self,
        source: &RestoreSource,
        states: &[StateMeta],
        handles: &[&KeyedSnapshot],
    ) -> Result<RocksStateBackend> {
        let range = self.options.key_group_range;
        let mut readers = Vec::new();
        for handle in handles {
            let KeyedSnapshot::Canonical(h) = handle else {
                continue;
            };
            let reader = DataFileReader::open(source.root(), &h.file.path, h.file.size).await?;
            let header = reader.header();
            if header.key_group_range != h.key_group_range
                || header.max_parallelism != h.max_parallelism
            {
                return Err(Error::corrupt(
                    source.root().url_of(&h.file.path),
                    "the file's key groups differ from the savepoint's metadata",
                ));
            }
            readers.push(reader);
        }
        let states = states.to_vec();
        let runtime = tokio::runtime::Handle::current();
        let remove_dir = self.options.local_dir.clone();
        self.start_in_place().await?;
        let (backend, ()) = self
            .build_in_place(move |builder| {
                let backend = builder.open()?;
                for meta in &states {
                    backend.ensure_state(meta)?;
                }
                for reader in &readers {
                    let columns = reader
                        .header()
                        .states
                        .iter()
                        .map(|m| backend.ensure_state(m))
                        .collect::<Result<Vec<_>>>()?;
                    let Some(part) = reader.header().key_group_range.intersect(&range) else {
                        continue;
                    };
                    let mut batch: Batch = Vec::new();
                    let mut bytes = 0usize;
                    for kg in part.iter() {
                        runtime.block_on(reader.read_key_group(kg, |entry| {
                            let key = codec::compose(kg, entry.key, &[]);
                            bytes += key.len() + entry.value.len();
                            batch.push((
                                columns[usize::from(entry.state)].clone(),
                                key,
                                entry.value.to_vec(),
                            ));
                            if bytes >= BATCH_BYTES {
                                backend.core.put_raw(&batch)?;
                                batch.clear();
                                bytes = 0;
                            }
                            Ok(())
                        }))?;
                    }
                    backend.core.put_raw(&batch)?;
                }
                backend.flush()?;
                Ok((backend, ()))
            })
            .await?;
        tracing::info!(dir = %remove_dir.display(), "restored from a canonical savepoint");
        Ok(backend)
    }

    pub(super) async fn rescale_files(
        self,
        source: &RestoreSource,
        handles: &[&KeyedStateHandle],
        options: &RestoreOptions,
    ) -> Result<RocksStateBackend> {
        let range = self.options.key_group_range;
        let overlap =
            |h: &KeyedStateHandle| h.key_group_range.intersect(&range).map_or(0, |r| r.len());
        let strategy = options.strategy;
        for handle in handles {
            handle.validate()?;
        }
        // The base is the source that shares the most key groups with the new range,
        // opened as stored: RocksDB opens no database with files missing, so it is
        // fetched whole, but none of it is synced. Without a base the database starts
        // empty and every source is ingested, so of none is more fetched than the files
        // that may hold keys of the new range, but each file ingested is synced (RocksDB
        // syncs what it ingests). From local files, where a fetch is a hard link and a
        // checksum read, opening the base was measured faster than ingesting it; so it is
        // with local directories to take files from (local recovery). From any other
        // store the largest source's list of files decides: without a base when that
        // leaves at least a quarter of its bytes unfetched.
        let largest = (0..handles.len())
            .max_by_key(|&i| (overlap(handles[i]), std::cmp::Reverse(i)))
            .ok_or_else(|| Error::Internal("rescale without handles".into()))?;
        let dir = self.options.local_dir.clone();
        let reuse = LocalFiles::scan(&self.reuse).await?;
        let started = std::time::Instant::now();
        // The largest source first, then the others: without a base, the new database is
        // created with its records and the others registered against them, in this order.
        let order: Vec<usize> = std::iter::once(largest)
            .chain((0..handles.len()).filter(|&i| i != largest))
            .collect();
        let mut base_index = Some(largest);
        let mut prelisted: Option<(PathBuf, Listed)> = None;
        if strategy == RescaleStrategy::Ingest
            && source.root().local_dir().is_none()
            && self.reuse.is_empty()
        {
            // Sources whose states disagree fail before any of their SST files is
            // fetched: the checks of registering them, in the same order (the base's
            // first, should it be opened, then the others').
            let mut recorded: BTreeMap<&str, &StateMeta> = BTreeMap::new();
            for meta in order.iter().flat_map(|&i| handles[i].states.iter()) {
                if let Some(stored) = recorded.get(meta.name.as_str()) {
                    if !stored.is_compatible(meta) {
                        return Err(stored.incompatible(meta));
                    }
                }
                // A compatible record replaces the stored one, as a registration does.
                recorded.insert(&meta.name, meta);
            }
            // Read into memory: the base's files, should it be opened, are fetched into
            // `dir`, and a source ingested is fetched into its own directory.
            let never = AtomicBool::new(false);
            let listed =
                read_sst_list(handles[largest], source.root(), None, &reuse, None, &never).await;
            let at = sibling(&dir, &format!(".rescale-{largest}"));
            // A list that cannot be read leaves the base as it is: opened as stored, it
            // needs no list.
            match listed {
                Ok(Some(files)) if leaves_out_a_quarter(&files, range) => {
                    base_index = None;
                    prelisted = Some((at, files));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    source = largest,
                    error = %e.report(),
                    "cannot read the list of the largest source: it is opened as the base"
                ),
            }
        }
        let others: Vec<(KeyedStateHandle, PathBuf)> = order
            .into_iter()
            .filter(|&i| Some(i) != base_index)
            .map(|i| (handles[i].clone(), sibling(&dir, &format!(".rescale-{i}"))))
            .collect();
        // Set when the base fails: the other sources' fetch then starts no more transfers.
        let base_failed = Arc::new(AtomicBool::new(false));
        let failed = base_failed.clone();
        // Once the base is fetched, it opens while the other sources are fetched and their
        // files listed (each side's blocking work on a task of its own: neither waits for
        // the other). The fetches do not overlap: on local files both are bound by the
        // same cores' checksums, and the open would wait for both.
        let (base_fetched_tx, base_fetched_rx) = tokio::sync::oneshot::channel::<()>();
        let sources = others.clone();
        let base_handle = base_index.map(|i| handles[i]);
        let build_base = async {
            let built = async {
                self.start_in_place().await?;
                if let Some(base) = base_handle {
                    download_all(
                        base,
                        source.root(),
                        &dir,
                        &reuse,
                        Some(source.checked_links()),
                        None,
                    )
                    .await?;
                }
                // The other side only waits for this: it is gone only if it failed.
                let _ = base_fetched_tx.send(());
                let base_fetched_at = started.elapsed();
                // Without a base, a new database (with the record of the new range under
                // a new uid) created with the column families of every source's states.
                let (mode, initial) = match base_handle {
                    Some(_) => (OpenMode::Rescaled, Vec::new()),
                    None => (
                        OpenMode::NewForIngestion,
                        sources
                            .iter()
                            .flat_map(|(h, _)| h.states.iter().cloned())
                            .collect(),
                    ),
                };
                blocking(move || {
                    // Compactions wait until the range deletions are written and flushed:
                    // the columns of the base open without them, the others are paused as
                    // soon as they exist.
                    let backend = self.open_with(mode, &initial).inspect_err(|_| {
                        failed.store(true, Ordering::SeqCst);
                    })?;
                    match add_columns(&backend, &sources) {
                        Ok(()) => Ok((backend, base_fetched_at, started.elapsed())),
                        Err(e) => {
                            // The other side stops before this close, not after it.
                            failed.store(true, Ordering::SeqCst);
                            // The directory is removed: closed with no flush nor sync.
                            backend.core.mark_scratch();
                            Err(e)
                        }
                    }
                })
                .await
            }
            .await;
            if built.is_err() {
                base_failed.store(true, Ordering::SeqCst);
            }
            built
        };
        let fetch_others = async {
            // Dropped unsent: the base failed before it was fetched, its error is the one
            // reported, and nothing else is fetched.
            if base_fetched_rx.await.is_err() {
                return Ok((Vec::new(), started.elapsed()));
            }
            let mut lists = Vec::new();
            let checked = Some(source.checked_links());
            for (handle, other) in &others {
                remove_dir_if_exists(other).await?;
                create_dir(other).await?;
                let listed = match (strategy, &prelisted) {
                    (RescaleStrategy::Ingest, Some((at, files))) if at == other => {
                        Some(files.clone())
                    }
                    (RescaleStrategy::Ingest, _) => match read_sst_list(
                        handle,
                        source.root(),
                        Some(other),
                        &reuse,
                        checked,
                        &base_failed,
                    )
                    .await
                    {
                        Ok(listed) => listed,
                        // The list only spares fetches: without it the source is fetched
                        // whole, every file checked, and listed from its MANIFEST.
                        Err(e) if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::NotFound) => {
                            tracing::warn!(
                                key_groups = %handle.key_group_range,
                                error = %e.report(),
                                "a source's list of files is unusable; fetching all of its files instead"
                            );
                            None
                        }
                        Err(e) => return Err(e),
                    },
                    (RescaleStrategy::IterateAndWrite, _) => None,
                };
                // With a list, only the files that may hold keys of the new range: the
                // source is never opened, so neither its other files nor its MANIFEST are
                // needed. Without one, every file its database opens with.
                let fetch = match &listed {
                    Some(files) => {
                        let wanted = wanted_names(files, range);
                        handle
                            .files()
                            .filter(|f| wanted.contains(&f.local_name))
                            .collect()
                    }
                    None => database_files(handle),
                };
                let cancel = Some(&*base_failed);
                let root = source.root();
                match strategy {
                    RescaleStrategy::Ingest => {
                        download_for_ingestion(fetch, root, other, &reuse, checked, cancel).await?
                    }
                    RescaleStrategy::IterateAndWrite => {
                        download_files(fetch, root, other, &reuse, checked, cancel).await?
                    }
                }
                lists.push(match (listed, strategy) {
                    (Some(files), _) => Fetched {
                        fetched: Some(wanted_names(&files, range)),
                        listed: Ok(files),
                    },
                    (None, RescaleStrategy::Ingest) => {
                        let at = other.clone();
                        Fetched {
                            listed: blocking(move || Ok(list_source_files(&at))).await?,
                            fetched: None,
                        }
                    }
                    (None, RescaleStrategy::IterateAndWrite) => Fetched {
                        listed: Err(Error::invalid("iterate")),
                        fetched: None,
                    },
                });
            }
            Ok::<_, Error>((lists, started.elapsed()))
        };
        let (opened, fetched) = tokio::join!(build_base, fetch_others);
        let base = base_handle.cloned();
        let sources = others.clone();
        let marker = dir.join(RESTORING_MARKER);
        let built = match (opened, fetched) {
            (Ok((backend, base_fetched_at, opened_at)), Ok((lists, others_at))) => {
                async {
                    let (base, sources) = (base.clone(), sources.clone());
                    let (backend, ingested) = blocking(move || {
                        let ingested = ingest_sources(
                            &backend,
                            base.as_ref(),
                            &sources,
                            lists,
                            strategy,
                            range,
                        );
                        Ok((backend, ingested))
                    })
                    .await?;
                    // Sources fetched in part whose ingestion was refused are iterated: the
                    // rest of their files is fetched first, here (not from the blocking
                    // thread, which a fetch may need).
                    let rest = match ingested {
                        Ok((provenance, to_iterate)) => {
                            let mut fetched = Ok(());
                            for (i, had) in &to_iterate {
                                let (handle, at) = &others[*i];
                                let missing = database_files(handle)
                                    .into_iter()
                                    .filter(|f| !had.contains(&f.local_name))
                                    .collect();
                                let checked = Some(source.checked_links());
                                fetched = download_files(
                                    missing,
                                    source.root(),
                                    at,
                                    &reuse,
                                    checked,
                                    None,
                                )
                                .await;
                                if fetched.is_err() {
                                    break;
                                }
                            }
                            fetched.map(|()| (provenance, to_iterate))
                        }
                        Err(e) => Err(e),
                    };
                    let sources = others.clone();
                    blocking(move || {
                        let reshaped = rest
                            .and_then(|(provenance, to_iterate)| {
                                finish(&backend, &sources, &to_iterate, range, provenance)
                            })
                            .and_then(|provenance| {
                                std::fs::remove_file(&marker).map_err(|e| {
                                    Error::io(format!("remove {}", marker.display()), e)
                                })?;
                                Ok(provenance)
                            });
                        match reshaped {
                            Ok(provenance) => {
                                tracing::debug!(
                                    base_fetched_ms = base_fetched_at.as_secs_f64() * 1e3,
                                    opened_ms = opened_at.as_secs_f64() * 1e3,
                                    others_fetched_ms = others_at.as_secs_f64() * 1e3,
                                    reshaped_ms = started.elapsed().as_secs_f64() * 1e3,
                                    "rescale built"
                                );
                                // The data is in place: the backend is usable now. The flush of
                                // the range deletions and the compactions come after, in the
                                // background (never for a build that failed).
                                backend.core.resume_compactions_in_background();
                                Ok((backend, provenance))
                            }
                            Err(e) => {
                                backend.core.mark_scratch();
                                Err(e)
                            }
                        }
                    })
                    .await
                }
                .await
            }
            (Ok((backend, _, _)), Err(e)) => {
                // Closed off the async threads (a close may wait for background work).
                let closed = blocking(move || {
                    backend.core.mark_scratch();
                    drop(backend);
                    Ok(())
                })
                .await;
                if let Err(also) = closed {
                    tracing::warn!(error = %also.report(), "cannot close a failed rescale");
                }
                Err(e)
            }
            (Err(e), fetched) => {
                // Mostly the fetch stopped because of it: worth a debug line only.
                if let Err(also) = fetched {
                    tracing::debug!(error = %also.report(), "the rescale's other sources were not fetched either");
                }
                Err(e)
            }
        };
        if built.is_ok() && source.root().local_dir().is_none() {
            // The files ingested from the sources' directories stay in the new one, where
            // the source's other restores (the other new subtasks) link them from.
            let links = source.checked_links().clone();
            let from: Vec<PathBuf> = others.iter().map(|(_, at)| at.clone()).collect();
            let to = dir.clone();
            let relocated = blocking(move || {
                for at in &from {
                    links.relocate(at, &to);
                }
                Ok(())
            })
            .await;
            if let Err(e) = relocated {
                tracing::warn!(error = %e.report(), "cannot note where a rescale's ingested files are");
            }
        }
        for (_, other) in others {
            if let Err(e) = remove_dir_if_exists(&other).await {
                tracing::warn!(dir = %other.display(), error = %e.report(), "cannot remove a rescale source");
            }
        }
        if built.is_err() {
            if let Err(cleanup) = remove_dir_if_exists(&dir).await {
                tracing::warn!(dir = %dir.display(), error = %cleanup.report(), "cannot remove a failed restore");
            }
        }
        let (backend, provenance) = built?;
        seed(
            &backend,
            source.metadata().checkpoint_id,
            source.root(),
            provenance,
            options.mode,
        );
        Ok(backend)
    }
}

/// Registers in a rescale's opened base (or new database) the states of the other
/// sources, with their compactions paused like the base's own.
fn add_columns(backend: &RocksStateBackend, sources: &[(KeyedStateHandle, PathBuf)]) -> Result<()> {
    let opened: BTreeSet<String> = backend
        .core
        .state_columns()
        .into_iter()
        .map(|(_, c)| c.cf_name.clone())
        .collect();
    for (handle, _) in sources {
        for meta in &handle.states {
            backend.ensure_state(meta)?;
        }
    }
    backend
        .core
        .pause_compactions_of(|c| !opened.contains(&c.cf_name))
}

/// Sources fetched in part whose ingestion was refused: their index among a rescale's
/// other sources, with the names of the files fetched of them.
type ToIterate = Vec<(usize, BTreeSet<String>)>;

/// What was fetched of one of a rescale's other sources.
struct Fetched {
    /// Its SST files, or why they could not be listed (the source is then iterated).
    listed: Result<Listed>,
    /// The names of the SST files fetched (those to ingest), or `None` when every file
    /// of the source was.
    fetched: Option<BTreeSet<String>>,
}

/// Brings the key groups of the sources other than the `base` (all of them when there is
/// none) into a rescale's `backend` (`lists`: what was fetched of them, one entry per
/// source), by ingestion or else by iteration, and
/// returns which local files are copies of which stored files, with the sources still
/// to iterate: those fetched in part whose ingestion was refused (their other files are
/// needed first). [`finish`] completes the build.
fn ingest_sources(
    backend: &RocksStateBackend,
    base: Option<&KeyedStateHandle>,
    sources: &[(KeyedStateHandle, PathBuf)],
    lists: Vec<Fetched>,
    strategy: RescaleStrategy,
    range: KeyGroupRange,
) -> Result<(FileSet, ToIterate)> {
    if lists.len() != sources.len() {
        return Err(Error::Internal(format!(
            "{} file lists for {} rescale sources",
            lists.len(),
            sources.len()
        )));
    }
    let mut provenance = base.map(sst_files_of).unwrap_or_default();
    let mut to_iterate: ToIterate = Vec::new();
    for (i, ((handle, dir), fetched)) in sources.iter().zip(lists).enumerate() {
        let listed = fetched.listed;
        match listed.and_then(|files| ingest(backend, handle, dir, files, range)) {
            Ok(files) => provenance.extend(files),
            Err(e) => {
                if strategy == RescaleStrategy::Ingest {
                    tracing::info!(error = %e.report(), "ingestion refused; iterating instead");
                    // Whatever was ingested of this source is removed first.
                    backend.core.delete_inside(handle.key_group_range)?;
                }
                match fetched.fetched {
                    None => iterate(backend, handle, dir, range)?,
                    Some(had) => to_iterate.push((i, had)),
                }
            }
        }
    }
    Ok((provenance, to_iterate))
}

/// Completes a rescale's build after [`ingest_sources`]: iterates the sources
/// `to_iterate` (now fetched whole), deletes what lies outside the new `range`, and
/// keeps of `provenance` the files still live.
fn finish(
    backend: &RocksStateBackend,
    sources: &[(KeyedStateHandle, PathBuf)],
    to_iterate: &ToIterate,
    range: KeyGroupRange,
    mut provenance: FileSet,
) -> Result<FileSet> {
    for &(i, _) in to_iterate {
        let (handle, dir) = sources
            .get(i)
            .ok_or_else(|| Error::Internal(format!("no rescale source {i}")))?;
        iterate(backend, handle, dir, range)?;
    }
    let dropped = backend.core.delete_outside(range)?;
    tracing::debug!(files = dropped, "files outside the new range dropped whole");
    let live = live_file_names(backend)?;
    provenance.retain(|name, _| live.contains(name));
    Ok(provenance)
}

/// The names of the live SST files of `backend`.
fn live_file_names(backend: &RocksStateBackend) -> Result<BTreeSet<String>> {
    Ok(backend
        .core
        .live_files()?
        .into_iter()
        .map(|f| f.name)
        .collect())
}

async fn create_dir(dir: &Path) -> Result<()> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| Error::io(format!("create {}", dir.display()), e))
}

/// Runs blocking engine work off the async runtime's threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("restore task failed: {e}")))?
}

/// The SST files of a handle, by local name.
fn sst_files_of(handle: &KeyedStateHandle) -> FileSet {
    handle
        .files()
        .filter(|f| f.local_name.ends_with(".sst"))
        .map(|f| (f.local_name.clone(), f.clone()))
        .collect()
}

/// The live SST files of a downloaded snapshot.
type Listed = Vec<crate::engine::SstFile>;

/// Lists the live SST files of the downloaded snapshot in `dir`, opening it read-only.
fn list_source_files(dir: &Path) -> Result<Listed> {
    // Only the list of files is read: no table is opened ahead and no statistics are
    // gathered from the files.
    let mut opts = rocksdb::Options::default();
    opts.set_max_open_files(20);
    opts.set_skip_stats_update_on_db_open(true);
    opts.set_max_file_opening_threads(crate::engine::file_opening_threads(dir));
    let columns = Db::list_cf(&opts, dir)
        .map_err(|e| Error::engine(format!("list column families of {}", dir.display()), e))?;
    let db = Db::open_cf_for_read_only(&opts, dir, &columns, false)
        .map_err(|e| Error::engine(format!("open {}", dir.display()), e))?;
    live_sst_files(&db)
}

/// Reads the list of the SST files of `handle` (see [`crate::engine::sst_list`]),
/// fetched into `dir` like its other files, or, without `dir`, straight into memory
/// (checked against its recorded size and CRC32 all the same; `reuse` and `checked` are
/// then not used); `None` for a snapshot without one, or whose list is unusable
/// (logged): its files are then all fetched and listed from its MANIFEST. A list that
/// cannot be read or fails its checksum is an error, like any other file (the caller
/// deciding on a base then opens the source as stored; for the other sources, a missing
/// or damaged list has them fetched whole).
async fn read_sst_list(
    handle: &KeyedStateHandle,
    job: &crate::storage::CheckpointStorage,
    dir: Option<&Path>,
    reuse: &LocalFiles,
    checked: Option<&Arc<crate::storage::CheckedLinks>>,
    cancel: &AtomicBool,
) -> Result<Option<Listed>> {
    let Some(list) = handle
        .private
        .iter()
        .find(|f| f.local_name == SST_LIST_NAME)
    else {
        return Ok(None);
    };
    // Read whole into memory: a size beyond any real list (its handle is data from
    // storage) is not fetched at all.
    if list.size > sst_list::MAX_LIST_BYTES {
        tracing::warn!(
            file = %job.url_of(&list.path),
            size = list.size,
            "a snapshot's list of files is larger than any list; fetching all of its files instead"
        );
        return Ok(None);
    }
    let what = job.url_of(&list.path);
    let bytes = match dir {
        Some(dir) => {
            download_files(vec![list], job, dir, reuse, checked, Some(cancel)).await?;
            let path = dir.join(SST_LIST_NAME);
            tokio::fs::read(&path)
                .await
                .map_err(|e| Error::io(format!("read {}", path.display()), e))?
        }
        None => {
            let bytes = job.read_small(&list.path, list.size).await?;
            let size = bytes.len() as u64;
            crate::storage::check_read(&what, &list.info(), size, crc32fast::hash(&bytes))?;
            crate::storage::count_restored(size);
            crate::storage::count_fetched(size);
            bytes.to_vec()
        }
    };
    let expected = handle
        .files()
        .filter(|f| f.local_name.ends_with(".sst"))
        .map(|f| (f.local_name.clone(), f.size))
        .collect();
    match sst_list::read(&bytes, &expected, &what) {
        Ok(files) => Ok(Some(files)),
        Err(e) => {
            tracing::warn!(error = %e.report(), "a snapshot's list of files is unusable; fetching all of its files instead");
            Ok(None)
        }
    }
}

/// Whether a rescale into the key groups `range` would leave at least a quarter of the
/// bytes of the state files in `files` unfetched (see [`is_wanted`]).
fn leaves_out_a_quarter(files: &[crate::engine::SstFile], range: KeyGroupRange) -> bool {
    let (mut total, mut left_out) = (0u64, 0u64);
    for f in files {
        if !f
            .identity
            .column
            .starts_with(crate::engine::STATE_COLUMN_PREFIX)
        {
            continue;
        }
        total = total.saturating_add(u64::try_from(f.identity.size).unwrap_or(u64::MAX));
        if !may_overlap(f, range) {
            left_out = left_out.saturating_add(u64::try_from(f.identity.size).unwrap_or(u64::MAX));
        }
    }
    total > 0 && left_out.saturating_mul(4) >= total
}

/// The names of the files of `files` that a rescale into the key groups `range` ingests.
fn wanted_names(files: &[crate::engine::SstFile], range: KeyGroupRange) -> BTreeSet<String> {
    files
        .iter()
        .filter(|f| is_wanted(f, range))
        .map(|f| f.name.clone())
        .collect()
}

/// Whether a rescale ingests `file` of another source into a backend of the key groups
/// `range`: a file of a state that may hold keys of `range`.
fn is_wanted(file: &crate::engine::SstFile, range: KeyGroupRange) -> bool {
    file.identity
        .column
        .starts_with(crate::engine::STATE_COLUMN_PREFIX)
        && may_overlap(file, range)
}

/// Whether an SST file may hold keys of the key groups `range`: `false` only when its
/// first and last keys show it lies wholly below or above.
fn may_overlap(file: &crate::engine::SstFile, range: KeyGroupRange) -> bool {
    let group = |key: &Option<Vec<u8>>| {
        key.as_deref()
            .and_then(|k| crate::codec::read_key_group(k).ok())
    };
    let below = group(&file.identity.end_key).is_some_and(|g| g < range.start());
    let above = group(&file.identity.start_key).is_some_and(|g| g > range.end());
    !(below || above)
}

/// Ingests those of `files`, the SST files of the downloaded snapshot in `dir` (see
/// [`list_source_files`]), that may hold keys of the new `range` into `backend`, column
/// by column, and returns which new local files are copies of which stored files. A
/// file wholly outside `range` holds nothing the backend keeps (its range deletions
/// too lie within its bounds): it is left out rather than ingested and deleted again.
fn ingest(
    backend: &RocksStateBackend,
    handle: &KeyedStateHandle,
    dir: &Path,
    files: Listed,
    range: KeyGroupRange,
) -> Result<FileSet> {
    let stored = sst_files_of(handle);
    let mut by_column: BTreeMap<String, Vec<_>> = BTreeMap::new();
    let listed = files.len();
    let mut skipped = 0usize;
    for file in files {
        if is_wanted(&file, range) {
            by_column
                .entry(file.identity.column.clone())
                .or_default()
                .push(file);
        } else if file
            .identity
            .column
            .starts_with(crate::engine::STATE_COLUMN_PREFIX)
        {
            skipped += 1;
        }
    }
    tracing::debug!(
        checkpoint = handle.checkpoint_id,
        listed,
        skipped,
        "files of a rescale source wholly outside the new range left out"
    );
    let before = live_file_names(backend)?;
    let columns = backend.core.state_columns();
    let mut identities = BTreeMap::new();
    for (column_name, mut files) in by_column {
        let (_, column) = columns
            .iter()
            .find(|(_, c)| c.cf_name == column_name)
            .ok_or_else(|| {
                Error::corrupt(
                    format!("snapshot {}", handle.checkpoint_id),
                    format!("column family {column_name:?} has no state record"),
                )
            })?;
        // Oldest data first: the deepest level first, older L0 files before newer.
        files.sort_by_key(|f| (std::cmp::Reverse(f.level), f.identity.largest_seqno));
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(&f.name)).collect();
        for f in &files {
            if let Some(stored) = stored.get(&f.name) {
                // An identity seen twice is ambiguous: such files are uploaded again
                // rather than risk recording the wrong stored file.
                match identities.entry(f.identity.clone()) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(Some(stored.clone()));
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        o.insert(None);
                    }
                }
            }
        }
        backend.core.ingest_db_files(column, &paths)?;
    }
    let mut provenance = FileSet::new();
    for file in backend.core.live_files()? {
        if before.contains(&file.name) {
            continue;
        }
        if let Some(Some(stored)) = identities.get(&file.identity) {
            let copy = StateFile {
                local_name: file.name.clone(),
                ..stored.clone()
            };
            provenance.insert(file.name, copy);
        }
    }
    Ok(provenance)
}

/// Copies the entries of the key groups `range` shares with the snapshot in `dir` into
/// `backend`, by reading and writing them.
fn iterate(
    backend: &RocksStateBackend,
    handle: &KeyedStateHandle,
    dir: &Path,
    range: KeyGroupRange,
) -> Result<()> {
    let Some(part) = handle.key_group_range.intersect(&range) else {
        return Ok(());
    };
    let mut options = BackendOptions::new(dir, handle.key_group_range, handle.max_parallelism);
    options.incremental = false;
    let source: BackendCore = crate::engine::open_core(
        &options,
        backend.resources(),
        Arc::new(crate::clock::SystemClock),
        OpenMode::Restored,
    )?;
    // The copy is removed once read.
    source.mark_scratch();
    let lower = codec::key_group_prefix(part.start()).to_vec();
    let upper = codec::prefix_successor(&codec::key_group_prefix(part.end()));
    for (meta, column) in source.state_columns() {
        let target = backend.ensure_state(&meta)?;
        let mut scan = source.scan(&column, lower.clone(), upper.clone())?;
        let mut batch: Batch = Vec::new();
        let mut bytes = 0usize;
        while let Some((key, value)) = scan.current()? {
            bytes += key.len() + value.len();
            batch.push((target.clone(), key.to_vec(), value.to_vec()));
            if bytes >= BATCH_BYTES {
                backend.core.put_raw(&batch)?;
                batch.clear();
                bytes = 0;
            }
            scan.advance();
        }
        backend.core.put_raw(&batch)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{FileIdentity, SstFile};

    fn file(start: Option<&[u8]>, end: Option<&[u8]>) -> SstFile {
        SstFile {
            name: "000007.sst".into(),
            level: 1,
            identity: FileIdentity {
                column: "state/v".into(),
                size: 100,
                start_key: start.map(<[u8]>::to_vec),
                end_key: end.map(<[u8]>::to_vec),
                smallest_seqno: 1,
                largest_seqno: 2,
            },
        }
    }

    #[test]
    fn a_base_is_left_out_when_a_quarter_of_its_state_bytes_would_not_be_fetched() {
        let range = KeyGroupRange::new(43, 85).unwrap();
        let key = |group: u16| crate::codec::key_group_prefix(group).to_vec();
        let sized = |first: u16, last: u16, size: usize, column: &str| {
            let mut f = file(Some(&key(first)), Some(&key(last)));
            f.identity.size = size;
            f.identity.column = column.into();
            f
        };
        let inside = sized(43, 85, 300, "state/v");
        let outside = sized(86, 127, 100, "state/v");
        assert!(leaves_out_a_quarter(
            &[inside.clone(), outside.clone()],
            range
        ));
        let small = sized(86, 127, 99, "state/v");
        assert!(!leaves_out_a_quarter(&[inside.clone(), small], range));
        // Only state columns count: a large file of another column changes nothing.
        let meta = sized(0, 0, 10_000, "rockstate-meta");
        assert!(leaves_out_a_quarter(
            &[inside.clone(), outside, meta],
            range
        ));
        assert!(!leaves_out_a_quarter(&[inside], range));
        assert!(!leaves_out_a_quarter(&[], range));
    }

    #[test]
    fn only_files_wholly_below_or_above_a_range_are_left_out() {
        let range = KeyGroupRange::new(43, 85).unwrap();
        let key = |group: u16, rest: &[u8]| {
            let mut k = crate::codec::key_group_prefix(group).to_vec();
            k.extend_from_slice(rest);
            k
        };
        let below = file(Some(&key(0, b"a")), Some(&key(42, b"\xff\xff")));
        let above = file(Some(&key(86, b"")), Some(&key(127, b"z")));
        let first = file(Some(&key(10, b"a")), Some(&key(43, b"")));
        let last = file(Some(&key(85, b"z")), Some(&key(100, b"a")));
        let across = file(Some(&key(0, b"a")), Some(&key(127, b"z")));
        assert!(!may_overlap(&below, range));
        assert!(!may_overlap(&above, range));
        assert!(may_overlap(&first, range));
        assert!(may_overlap(&last, range));
        assert!(may_overlap(&across, range));
        // Bounds that say nothing keep the file.
        assert!(may_overlap(&file(None, None), range));
        assert!(may_overlap(&file(Some(b"\x00"), Some(b"\x00")), range));
        assert!(may_overlap(&file(Some(&key(0, b"")), None), range));
    }
}
