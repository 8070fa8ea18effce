//! The RocksDB engine under the typed states: one database per subtask, one column family
//! per state, the metadata column that records the backend and its states, the list merge
//! operator and the TTL compaction filter, options and shared memory, and the tracker of
//! uploaded files a backend may reuse.

pub(crate) mod buffer;
mod column;
mod core;
mod meta;
mod migrate;
mod options;
pub(crate) mod sst_list;
pub(crate) mod tracker;
pub(crate) mod ttl;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options};

pub(crate) use self::core::FileIdentity;
pub(crate) use self::core::{live_sst_files, BackendCore, Cut, Db, RawScan, SstFile, StateEntry};
pub use buffer::ValueCacheStats;
pub(crate) use column::{ColumnSettings, META_COLUMN, STATE_COLUMN_PREFIX};
pub(crate) use migrate::Convert;
pub use options::{
    BackendOptions, SharedResources, DEFAULT_BUFFERED_WRITES, DEFAULT_MEMORY_BUDGET,
};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::format::{StateMeta, TypeInfo};
use meta::BackendRecord;

/// A conversion the program declared for values stored as `from` with serializer
/// version `from_version`.
pub(crate) struct ValueMigration<'a> {
    pub from: &'a TypeInfo,
    pub from_version: u32,
    pub convert: Convert<'a>,
}

fn db_options(options: &BackendOptions, resources: &SharedResources) -> Options {
    let mut opts = column::base_options(resources);
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // Without a WAL, families must flush together to stay consistent with each other.
    opts.set_atomic_flush(true);
    opts.set_max_background_jobs(options.background_jobs);
    opts.set_write_buffer_manager(&resources.write_buffers);
    opts.set_keep_log_file_num(2);
    opts.set_max_log_file_size(4 << 20);
    if options.statistics {
        // Counters only (block cache hits and misses, stall time): no timers or
        // histograms on the read and write paths.
        opts.enable_statistics();
        opts.set_statistics_level(rocksdb::statistics::StatsLevel::ExceptHistogramOrTimers);
    }
    opts
}

/// How many threads open the table files of a database in `dir` when it opens, per
/// column family: one for every [`FILES_PER_OPENING_THREAD`] SST files, at least one and
/// at most 16 (RocksDB's default). RocksDB starts that many threads for each column
/// family whatever its number of files; for the few files of most subtasks, starting
/// them cost more than the files' opening (a third of the time of an open).
pub(crate) fn file_opening_threads(dir: &Path) -> i32 {
    let files = std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".sst"))
            .count()
    });
    opening_threads_for(files)
}

/// SST files opened per thread when a database opens (see [`file_opening_threads`]).
pub(crate) const FILES_PER_OPENING_THREAD: usize = 32;

fn opening_threads_for(files: usize) -> i32 {
    // At most 16: the quotient fits an i32.
    (files / FILES_PER_OPENING_THREAD).clamp(1, 16) as i32
}

/// How a local directory is being opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenMode {
    /// The backend's own directory: new, or closed cleanly by a previous backend.
    Local,
    /// Files just downloaded and verified by a restore.
    Restored,
    /// Downloaded files of another subtask, being reshaped into this backend's key-group
    /// range: the backend record is rewritten for the new range under a new uid.
    Rescaled,
    /// A new database for a rescale by ingestion, created with the column families of
    /// the states given to [`open_core_with`] at once (one write of RocksDB's options
    /// file for all of them, where creating each after the open rewrites and syncs it
    /// each time), their compactions paused like a rescaled base's.
    NewForIngestion,
}

/// Written after the final flush when a backend closes; removed when it opens. Without
/// a write-ahead log, a directory lacking it was left by a crash and holds whatever the
/// last automatic flush wrote: a state that matches no checkpoint.
pub(crate) const CLEAN_MARKER: &str = "ROCKSTATE-CLOSED-CLEANLY";

pub(crate) fn open_core(
    options: &BackendOptions,
    resources: &SharedResources,
    clock: Arc<dyn Clock>,
    mode: OpenMode,
) -> Result<BackendCore> {
    open_core_with(options, resources, clock, mode, &[])
}

/// Like [`open_core`]; with [`OpenMode::NewForIngestion`], `states` are the states the
/// new database starts with (the first record of each name; the others are checked
/// against it by registering them after the open). Other modes ignore `states`.
pub(crate) fn open_core_with(
    options: &BackendOptions,
    resources: &SharedResources,
    clock: Arc<dyn Clock>,
    mode: OpenMode,
    states: &[StateMeta],
) -> Result<BackendCore> {
    let dir = &options.local_dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let mut db_opts = db_options(options, resources);
    db_opts.set_max_file_opening_threads(file_opening_threads(dir));
    let seals = Arc::new(self::core::SealWatch::default());
    db_opts.add_event_listener(self::core::SealListener(seals.clone()));
    let exists = dir.join("CURRENT").exists();
    let marker = dir.join(CLEAN_MARKER);
    let closed_cleanly = marker.exists();
    match mode {
        OpenMode::Local => {}
        OpenMode::NewForIngestion => {
            if exists {
                return Err(Error::Internal(format!(
                    "{} already holds a database",
                    dir.display()
                )));
            }
            db_opts.create_if_missing(true);
            db_opts.create_missing_column_families(true);
        }
        OpenMode::Restored | OpenMode::Rescaled => db_opts.create_if_missing(false),
    }
    let existing: Vec<String> = if exists {
        rocksdb::DB::list_cf(&db_opts, dir)
            .map_err(|e| Error::engine(format!("list column families of {}", dir.display()), e))?
    } else {
        Vec::new()
    };
    // The descriptor of state column family `name`, with compactions off when `paused`.
    let state_descriptor = |name: String, paused: bool| {
        let settings = Arc::new(ColumnSettings::new(name));
        let mut opts = column::state_column_options(
            resources,
            settings.clone(),
            clock.clone(),
            options.writes_in_key_order,
            options.key_group_range.len(),
        );
        if paused {
            opts.set_disable_auto_compactions(true);
        }
        (
            ColumnFamilyDescriptor::new(settings.cf_name.clone(), opts),
            settings,
        )
    };
    let mut columns = Vec::new();
    let mut descriptors = vec![ColumnFamilyDescriptor::new(
        META_COLUMN,
        column::base_options(resources),
    )];
    for name in &existing {
        if name == "default" || name == META_COLUMN {
            continue;
        }
        if !name.starts_with(STATE_COLUMN_PREFIX) {
            return Err(Error::IncompatibleLayout {
                dir: dir.display().to_string(),
                detail: format!("unexpected column family \"{name}\""),
            });
        }
        // A rescale ingests and deletes ranges before it lets compactions run (it resumes
        // them itself): none starts on files about to be cut.
        let paused = mode == OpenMode::Rescaled;
        let (descriptor, settings) = state_descriptor(name.clone(), paused);
        descriptors.push(descriptor);
        columns.push(settings);
    }
    let mut initial: Vec<&StateMeta> = Vec::new();
    if mode == OpenMode::NewForIngestion {
        for meta in states {
            validate_state_name(&meta.name)?;
            if initial.iter().any(|m| m.name == meta.name) {
                continue;
            }
            initial.push(meta);
            let (descriptor, settings) =
                state_descriptor(format!("{STATE_COLUMN_PREFIX}{}", meta.name), true);
            descriptors.push(descriptor);
            columns.push(settings);
        }
    }
    if exists && !existing.iter().any(|n| n == META_COLUMN) {
        return Err(Error::IncompatibleLayout {
            dir: dir.display().to_string(),
            detail: "a RocksDB database that rockstate did not create".into(),
        });
    }
    let db = Db::open_cf_descriptors(&db_opts, dir, descriptors).map_err(|e| {
        if is_lock_error(&e) {
            Error::InUse {
                dir: dir.display().to_string(),
                source: Arc::new(e),
            }
        } else {
            Error::engine(format!("open {}", dir.display()), e)
        }
    })?;
    // The directory is locked now: nothing else uses it.
    if exists && mode == OpenMode::Local && !closed_cleanly {
        return Err(Error::IncompatibleLayout {
            dir: dir.display().to_string(),
            detail: "it was not closed cleanly (a crash?); without a write-ahead log its \
                     contents match no checkpoint: restore from a checkpoint instead"
                .into(),
        });
    }
    // Snapshots staged before a crash are never uploaded now.
    let staging = options.staging_dir();
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .map_err(|e| Error::io(format!("remove stale {}", staging.display()), e))?;
    }

    let record = read_or_create_record(&db, options, clock.as_ref(), mode == OpenMode::Rescaled)?;
    let mut core = BackendCore::new(
        db,
        dir.clone(),
        record.backend_uid,
        clock,
        options.max_parallelism,
        options.key_group_range,
    );
    core.statistics = options.statistics.then_some(db_opts);
    core.seals = seals;
    core.writes_in_key_order = options.writes_in_key_order;
    core.buffered_writes = options.buffered_writes;
    if options.buffered_writes > 0 {
        core.keep_applied_values(resources.values.clone());
    }
    if matches!(mode, OpenMode::Rescaled | OpenMode::NewForIngestion) {
        core.note_compactions_paused(columns.iter().map(|c| c.cf_name.clone()));
    }
    // The records of the column families created with the database (without a
    // write-ahead log, they become durable with the first flush, like any record).
    for meta in initial {
        core.put_meta(&meta::state_key(&meta.name), &meta::encode_state(meta)?)?;
    }
    load_states(&core, columns)?;
    // From here on a crash must be noticed: the clean-close mark is written again only by
    // a clean close.
    if closed_cleanly {
        std::fs::remove_file(&marker)
            .map_err(|e| Error::io(format!("remove {}", marker.display()), e))?;
    }
    Ok(core)
}

fn read_or_create_record(
    db: &Db,
    options: &BackendOptions,
    clock: &dyn Clock,
    rescaled: bool,
) -> Result<BackendRecord> {
    let dir = options.local_dir.display().to_string();
    let cf = db
        .cf_handle(META_COLUMN)
        .ok_or_else(|| Error::Internal("meta column family missing".into()))?;
    let stored = db
        .get_cf(&cf, meta::BACKEND_KEY)
        .map_err(|e| Error::engine("read backend record", e))?;
    let new_record = || {
        let record = BackendRecord {
            backend_uid: new_uid(),
            max_parallelism: options.max_parallelism,
            key_group_range: options.key_group_range,
            created_at_ms: clock.now_millis(),
        };
        let mut wo = rocksdb::WriteOptions::default();
        wo.disable_wal(true);
        db.put_cf_opt(&cf, meta::BACKEND_KEY, record.encode()?, &wo)
            .map_err(|e| Error::engine("write backend record", e))?;
        Ok(record)
    };
    match stored {
        Some(bytes) => {
            let record = BackendRecord::decode(&bytes)?;
            if record.max_parallelism == options.max_parallelism && rescaled {
                // Another range now, and another identity.
                return new_record();
            }
            if record.max_parallelism != options.max_parallelism {
                return Err(Error::IncompatibleLayout {
                    dir,
                    detail: format!(
                        "written with max parallelism {}, opened with {}",
                        record.max_parallelism, options.max_parallelism
                    ),
                });
            }
            if record.key_group_range != options.key_group_range {
                return Err(Error::IncompatibleLayout {
                    dir,
                    detail: format!(
                        "holds key groups {}, opened for {}",
                        record.key_group_range, options.key_group_range
                    ),
                });
            }
            Ok(record)
        }
        None => new_record(),
    }
}

/// Whether RocksDB refused to open a database because another instance (in this process
/// or another) holds its `LOCK` file.
fn is_lock_error(e: &rocksdb::Error) -> bool {
    let message: &str = e.as_ref();
    e.kind() == rocksdb::ErrorKind::IOError
        && (message.contains("While lock file") || message.contains("lock hold by current process"))
}

/// A random 128-bit id in hex.
pub(crate) fn new_uid() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Reads the state records and configures the opened state column families. A column
/// family without a record was created by a registration whose record never became
/// durable; it holds no durable data (families flush atomically) and is dropped.
fn load_states(core: &BackendCore, columns: Vec<Arc<ColumnSettings>>) -> Result<()> {
    let cf = core
        .db
        .cf_handle(META_COLUMN)
        .ok_or_else(|| Error::Internal("meta column family missing".into()))?;
    let mut records = std::collections::BTreeMap::new();
    for item in core.db.prefix_iterator_cf(&cf, meta::STATE_KEY_PREFIX) {
        let (key, value) = item.map_err(|e| Error::engine("read state records", e))?;
        if !key.starts_with(meta::STATE_KEY_PREFIX) {
            break;
        }
        let meta = meta::decode_state(&value)?;
        records.insert(meta.name.clone(), meta);
    }
    drop(cf);
    let mut states = core.states.lock();
    for settings in columns {
        let name = &settings.cf_name[STATE_COLUMN_PREFIX.len()..];
        match records.remove(name) {
            Some(meta) => {
                settings.configure(meta.kind, meta.ttl_millis);
                states.insert(
                    meta.name.clone(),
                    StateEntry {
                        meta,
                        column: settings,
                    },
                );
            }
            None => {
                tracing::warn!(column = %settings.cf_name, "dropping column family without a state record");
                core.layout_changed()?;
                core.db
                    .drop_cf(&settings.cf_name)
                    .map_err(|e| Error::engine("drop unrecorded column family", e))?;
            }
        }
    }
    if let Some(name) = records.keys().next() {
        return Err(Error::corrupt(
            format!("backend in {}", core.dir().display()),
            format!("state \"{name}\" is recorded but its column family is missing"),
        ));
    }
    Ok(())
}

fn validate_state_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "state name {name:?} must be 1 to 200 bytes without control characters"
        )));
    }
    Ok(())
}

impl BackendCore {
    /// Removes state `name`: its record and its column family with every value; `false`
    /// when there is no such state.
    ///
    /// Errors: engine errors.
    pub(crate) fn drop_state(&self, name: &str) -> Result<bool> {
        let mut states = self.states.lock();
        let Some(entry) = states.get(name) else {
            return Ok(false);
        };
        let cf_name = entry.column.cf_name.clone();
        // The record goes first: should that fail, nothing changed. Without its record the
        // state is gone (a column family without one is dropped when the directory
        // opens), so from here on it is dropped in memory too, whatever `drop_cf` says.
        self.delete_meta(&meta::state_key(name))?;
        entry.column.mark_dropped();
        states.remove(name);
        self.layout_changed()?;
        self.db
            .drop_cf(&cf_name)
            .map_err(|e| Error::engine(format!("drop column family \"{cf_name}\""), e))?;
        Ok(true)
    }

    /// Registers a state from its recorded description (creating its column family), or
    /// checks it against the stored one. See [`RocksStateBackend::register`](crate::RocksStateBackend::register).
    ///
    /// A stored state that `requested` cannot read as it is, but whose value type and
    /// serializer version one of `migrations` declares, has every value converted first
    /// (all or nothing); the record then describes `requested`. A stored record that
    /// matches but describes its types less completely (written by an older version, or
    /// under another type name) is replaced by `requested`.
    pub(crate) fn ensure_state(
        &self,
        requested: &StateMeta,
        migrations: &[ValueMigration<'_>],
        resources: &SharedResources,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<ColumnSettings>> {
        validate_state_name(&requested.name)?;
        let mut states = self.states.lock();
        let column = match states.get_mut(&requested.name) {
            Some(entry) => {
                let stored = &entry.meta;
                let declared = migrations.iter().find(|m| {
                    stored.same_but_value(requested)
                        && stored.serializer_version == m.from_version
                        && stored.value_type.was_declared_as(m.from)
                });
                // A record written before structures were recorded names its value type
                // only: a migration declared for it is the program's word that those
                // values have the earlier type, even when the name still matches.
                let migration = match declared {
                    Some(m) if stored.value_type.schema.is_none() => Some(m),
                    _ if stored.is_compatible(requested) => None,
                    Some(m) => Some(m),
                    None => return Err(stored.incompatible(requested)),
                };
                if let Some(migration) = migration {
                    // Handles of the stored type are refused from now on, also while the
                    // values are converted: none writes a value of the old type again.
                    let next = Arc::new(entry.column.successor());
                    entry.column.mark_dropped();
                    let previous = std::mem::replace(&mut entry.column, next);
                    let converted = match self.rewrite_values(
                        &entry.column,
                        entry.meta.kind,
                        entry.meta.ttl_millis.is_some(),
                        migration.convert,
                    ) {
                        Ok(n) => n,
                        Err(e) => {
                            // Nothing was converted: the handles of the stored type work
                            // again.
                            previous.revive();
                            entry.column = previous;
                            return Err(e);
                        }
                    };
                    tracing::info!(
                        state = %requested.name,
                        from = %entry.meta.value_type,
                        to = %requested.value_type,
                        values = converted,
                        "state migrated"
                    );
                    // The values are converted: from here on the state is of the new
                    // type. Should its record not be written, the local state holds new
                    // values under the old record: it is poisoned (no snapshot is taken
                    // of it, and it never reopens).
                    entry.meta = requested.clone();
                    entry.column.configure(requested.kind, requested.ttl_millis);
                    let recorded = meta::encode_state(requested)
                        .and_then(|bytes| self.put_meta(&meta::state_key(&requested.name), &bytes));
                    if let Err(e) = recorded {
                        // A reason already given (lost writes) is kept.
                        self.poisoned.lock().get_or_insert_with(|| {
                            format!(
                                "state {:?} was migrated but its new type could not be recorded: {}",
                                requested.name,
                                e.report()
                            )
                        });
                        return Err(e);
                    }
                }
                if entry.meta != *requested {
                    // New settings (a time-to-live) change what flushes and compactions
                    // keep: a snapshot whose files are not taken yet must not see them.
                    self.layout_changed()?;
                    self.put_meta(
                        &meta::state_key(&requested.name),
                        &meta::encode_state(requested)?,
                    )?;
                    entry.column.configure(requested.kind, requested.ttl_millis);
                    entry.meta = requested.clone();
                }
                entry.column.clone()
            }
            None => {
                let cf_name = format!("{STATE_COLUMN_PREFIX}{}", requested.name);
                let settings = Arc::new(ColumnSettings::new(cf_name.clone()));
                settings.configure(requested.kind, requested.ttl_millis);
                let opts = column::state_column_options(
                    resources,
                    settings.clone(),
                    clock,
                    self.writes_in_key_order,
                    self.key_group_range().len(),
                );
                self.layout_changed()?;
                self.db
                    .create_cf(&cf_name, &opts)
                    .map_err(|e| Error::engine(format!("create column family \"{cf_name}\""), e))?;
                self.put_meta(
                    &meta::state_key(&requested.name),
                    &meta::encode_state(requested)?,
                )?;
                states.insert(
                    requested.name.clone(),
                    StateEntry {
                        meta: requested.clone(),
                        column: settings.clone(),
                    },
                );
                settings
            }
        };
        Ok(column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_files_open_on_one_thread_per_32_files_up_to_16() {
        assert_eq!(opening_threads_for(0), 1);
        assert_eq!(opening_threads_for(FILES_PER_OPENING_THREAD - 1), 1);
        assert_eq!(opening_threads_for(2 * FILES_PER_OPENING_THREAD), 2);
        assert_eq!(opening_threads_for(10_000), 16);
        assert_eq!(
            file_opening_threads(Path::new("/nonexistent/rockstate-test")),
            1
        );
    }
}
