//! `RocksStateBackend`: one RocksDB instance per subtask, one column family per state.

mod column;
mod engine;
mod meta;
mod options;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options};

pub(crate) use column::ColumnSettings;
pub(crate) use column::STATE_COLUMN_PREFIX;
pub(crate) use engine::{live_sst_files, BackendCore, Db, RawScan};
pub use options::{BackendOptions, SharedResources, DEFAULT_MEMORY_BUDGET};

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::keygroup::KeyGroupRange;
use crate::snapshot::{self, PendingSnapshot, StagingDir};
use crate::state::{StateCore, StateMeta, StateSpec};
use column::META_COLUMN;
use engine::StateEntry;
use meta::BackendRecord;

/// Keyed state of one subtask, stored in RocksDB.
///
/// Cloning is cheap and yields another handle to the same instance. The RocksDB instance
/// closes when the last backend handle and state handle are dropped: it flushes its
/// memtables and marks the directory as closed cleanly. A flush error at that point can
/// only be logged, and the directory then refuses to reopen; call [`close`](Self::close)
/// first to see such errors.
#[derive(Clone)]
pub struct RocksStateBackend {
    pub(crate) core: Arc<BackendCore>,
    pub(crate) options: BackendOptions,
    resources: SharedResources,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for RocksStateBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStateBackend")
            .field("dir", &self.core.dir())
            .field("key_group_range", &self.core.key_group_range())
            .field("max_parallelism", &self.core.max_parallelism())
            .finish()
    }
}

/// Builds a [`RocksStateBackend`] from options and optional components.
#[derive(Debug)]
pub struct BackendBuilder {
    pub(crate) options: BackendOptions,
    pub(crate) resources: Option<SharedResources>,
    pub(crate) clock: Arc<dyn Clock>,
    /// Directories of an earlier run whose files a restore may take instead of
    /// downloading them.
    pub(crate) reuse: Vec<std::path::PathBuf>,
}

impl BackendBuilder {
    /// Lets a restore take files from `dirs` instead of downloading them: directories of
    /// an earlier run on this machine, such as the backend directories a crashed process
    /// left behind (local recovery). A file is taken when its name, size and CRC32 match
    /// the snapshot's record; it is read through once for that check, then hard-linked
    /// (SST files on the same file system) or copied. Everything else is downloaded.
    ///
    /// The directories are only read (subdirectories are not searched); remove them once
    /// the restore is done. Only the restore methods use them; [`open`](Self::open) does not.
    pub fn reuse_local_files(mut self, dirs: impl IntoIterator<Item = std::path::PathBuf>) -> Self {
        self.reuse.extend(dirs);
        self
    }

    /// Shares `resources` (block cache and write buffer budget) with other backends.
    pub fn shared_resources(mut self, resources: SharedResources) -> Self {
        self.resources = Some(resources);
        self
    }

    /// Uses `clock` for TTL instead of the system clock.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Opens (or creates) the backend's local directory.
    ///
    /// Errors: `InvalidArgument` for bad options; `Incompatible` when the directory holds
    /// state of another max parallelism or key-group range, or is not a rockstate
    /// directory; `Io`/engine errors when RocksDB cannot open it (for example while another
    /// backend holds it open).
    pub fn open(self) -> Result<RocksStateBackend> {
        self.open_as(OpenMode::Local)
    }

    pub(crate) fn open_as(self, mode: OpenMode) -> Result<RocksStateBackend> {
        self.options.validate()?;
        let resources = match self.resources {
            Some(r) => r,
            None => SharedResources::new(self.options.memory_budget)?,
        };
        let core = open_core(&self.options, &resources, self.clock.clone(), mode)?;
        Ok(RocksStateBackend {
            core: Arc::new(core),
            options: self.options,
            resources,
            clock: self.clock,
        })
    }
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
    opts
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
    let dir = &options.local_dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let mut db_opts = db_options(options, resources);
    let exists = dir.join("CURRENT").exists();
    let marker = dir.join(CLEAN_MARKER);
    let closed_cleanly = marker.exists();
    if mode != OpenMode::Local {
        db_opts.create_if_missing(false);
    }
    let existing: Vec<String> = if exists {
        rocksdb::DB::list_cf(&db_opts, dir)
            .map_err(|e| Error::engine(format!("list column families of {}", dir.display()), e))?
    } else {
        Vec::new()
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
        let settings = Arc::new(ColumnSettings::new(name.clone()));
        let opts = column::state_column_options(resources, settings.clone(), clock.clone());
        descriptors.push(ColumnFamilyDescriptor::new(name, opts));
        columns.push(settings);
    }
    if exists && !existing.iter().any(|n| n == META_COLUMN) {
        return Err(Error::IncompatibleLayout {
            dir: dir.display().to_string(),
            detail: "a RocksDB database that rockstate did not create".into(),
        });
    }
    let db = engine::Db::open_cf_descriptors(&db_opts, dir, descriptors)
        .map_err(|e| Error::engine(format!("open {}", dir.display()), e))?;
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
    let core = BackendCore::new(
        db,
        dir.clone(),
        record.backend_uid,
        clock,
        options.max_parallelism,
        options.key_group_range,
    );
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
    db: &engine::Db,
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

impl RocksStateBackend {
    /// Registers a state from its recorded description (creating its column family), or
    /// checks it against the stored one. See [`register`](Self::register).
    pub(crate) fn ensure_state(&self, requested: &StateMeta) -> Result<Arc<ColumnSettings>> {
        validate_state_name(&requested.name)?;
        let mut states = self.core.states.lock();
        let column = match states.get_mut(&requested.name) {
            Some(entry) => {
                entry.meta.check_compatible(requested)?;
                if entry.meta.ttl_millis != requested.ttl_millis {
                    self.core.put_meta(
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
                    &self.resources,
                    settings.clone(),
                    self.clock.clone(),
                );
                self.core
                    .db
                    .create_cf(&cf_name, &opts)
                    .map_err(|e| Error::engine(format!("create column family \"{cf_name}\""), e))?;
                self.core.put_meta(
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

    /// Starts building a backend from `options`.
    pub fn builder(options: BackendOptions) -> BackendBuilder {
        BackendBuilder {
            options,
            resources: None,
            clock: Arc::new(SystemClock),
            reuse: Vec::new(),
        }
    }

    /// Opens a backend with its own memory resources and the system clock.
    pub fn open(options: BackendOptions) -> Result<Self> {
        Self::builder(options).open()
    }

    /// Registers a state (or re-attaches to a stored one) and returns its handle.
    ///
    /// Registering the same name again returns another handle to the same data when the
    /// descriptor is compatible (see [`StateMeta`]); a changed TTL duration is recorded.
    ///
    /// Errors: `Incompatible` ([`Error::IncompatibleState`]) naming both descriptors when
    /// kind, types, serializer version or TTL enablement differ; `InvalidArgument` for a bad
    /// name.
    pub fn register<S: StateSpec>(&self, spec: S) -> Result<S::Handle> {
        let requested = spec.meta();
        let column = self.ensure_state(&requested)?;
        let core = StateCore::new(self.core.clone(), &requested.name, column)?;
        Ok(spec.bind(core))
    }

    /// The metadata of every state stored in this backend (registered in this process or
    /// found on disk), ordered by name.
    pub fn states(&self) -> Vec<StateMeta> {
        self.core
            .states
            .lock()
            .values()
            .map(|e| e.meta.clone())
            .collect()
    }

    /// The key groups this backend owns.
    pub fn key_group_range(&self) -> KeyGroupRange {
        self.core.key_group_range()
    }

    /// The job's number of key groups.
    pub fn max_parallelism(&self) -> u32 {
        self.core.max_parallelism()
    }

    /// The local directory of the RocksDB instance.
    pub fn local_dir(&self) -> &Path {
        self.core.dir()
    }

    /// A random id given to this backend's local state when it was first created.
    pub fn backend_uid(&self) -> &str {
        &self.core.backend_uid
    }

    /// The memory resources this backend uses.
    pub fn resources(&self) -> &SharedResources {
        &self.resources
    }

    /// Counts stored entries (of every state) whose key group is outside this backend's
    /// range: 0 unless a restore or rescale kept data it does not own. A consistency
    /// check for tools and tests; it scans only outside the range.
    pub fn entries_outside_range(&self) -> Result<u64> {
        self.core.count_outside(self.core.key_group_range())
    }

    /// Calls `f(state name, RocksDB key, RocksDB value)` for every stored entry of every
    /// registered state, state by state in key order. Reads a consistent view per state.
    ///
    /// Errors: engine errors from the scan.
    pub fn for_each_entry(&self, mut f: impl FnMut(&str, &[u8], &[u8])) -> Result<()> {
        for (meta, column) in self.core.state_columns() {
            let mut scan = self.core.scan(&column, Vec::new(), None)?;
            while let Some((key, value)) = scan.current()? {
                f(&meta.name, key, value);
                scan.advance();
            }
        }
        Ok(())
    }

    /// Writes all memtables to SST files. Blocks until the flush is done.
    pub fn flush(&self) -> Result<()> {
        self.core.flush()
    }

    /// The synchronous phase of a snapshot for `checkpoint_id`: flushes the memtables and
    /// hard-links a consistent copy of the database into the staging directory. Blocks for
    /// the flush; returns as soon as the copy exists, after which writes may continue while
    /// [`PendingSnapshot::upload`] runs.
    ///
    /// Errors: engine and local I/O errors.
    pub fn snapshot(&self, checkpoint_id: u64) -> Result<PendingSnapshot> {
        let started = std::time::Instant::now();
        let root = self.options.staging_dir();
        std::fs::create_dir_all(&root)
            .map_err(|e| Error::io(format!("create {}", root.display()), e))?;
        // A name of its own per attempt: concurrent or repeated snapshots never collide.
        let target = root.join(format!("chk-{checkpoint_id}-{}", new_uid()));
        let reusable = if self.options.incremental {
            self.core.tracker.lock().reusable()
        } else {
            Default::default()
        };
        let states = self.states();
        let staging = StagingDir::new(target.clone());
        crate::crashpoint::hit("sync");
        self.core.checkpoint_into(&target)?;
        let files = snapshot::list_staged(&target)?;
        Ok(PendingSnapshot {
            checkpoint_id,
            staging,
            files,
            reusable,
            incremental: self.options.incremental,
            backend_uid: self.core.backend_uid.clone(),
            key_group_range: self.core.key_group_range(),
            max_parallelism: self.core.max_parallelism(),
            states,
            tracker: self.core.tracker.clone(),
            sync_duration: started.elapsed(),
            resources: self.resources.clone(),
            clock: self.clock.clone(),
        })
    }

    /// The checkpoint completed: the shared files it uploaded may be referenced by later
    /// snapshots. Older pending checkpoints are subsumed.
    pub fn notify_checkpoint_complete(&self, checkpoint_id: u64) {
        if !self.core.tracker.lock().complete(checkpoint_id) {
            tracing::debug!(
                checkpoint_id,
                "completion of a checkpoint this backend did not upload or already subsumed"
            );
        }
    }

    /// The checkpoint was aborted: none of its files will be referenced again by this
    /// backend (the coordinator may delete them).
    pub fn notify_checkpoint_aborted(&self, checkpoint_id: u64) {
        self.core.tracker.lock().abort(checkpoint_id);
    }

    /// Forgets every uploaded file, so that the next snapshot uploads all of its files.
    /// Call it when the checkpoint this backend was restored from (or last confirmed) is
    /// no longer retained by the coordinator, for example after restoring an older
    /// checkpoint than the job's newest.
    pub fn discard_reusable_files(&self) {
        *self.core.tracker.lock() = Default::default();
    }

    /// The last checkpoint whose files this backend reuses, if any.
    pub fn last_confirmed_checkpoint(&self) -> Option<u64> {
        self.core.tracker.lock().last_confirmed()
    }

    /// Flushes and releases this handle. The instance closes once every clone of the
    /// backend and every state handle is gone.
    pub fn close(self) -> Result<()> {
        self.core.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;
    use crate::state::{ListStateDescriptor, MapStateDescriptor, ValueStateDescriptor};

    fn raw_entries(backend: &RocksStateBackend, state: &str) -> usize {
        let cf = backend
            .core
            .db
            .cf_handle(&format!("state/{state}"))
            .unwrap();
        backend
            .core
            .db
            .iterator_cf(&cf, rocksdb::IteratorMode::Start)
            .count()
    }

    fn compact(backend: &RocksStateBackend, state: &str) {
        let cf = backend
            .core
            .db
            .cf_handle(&format!("state/{state}"))
            .unwrap();
        backend
            .core
            .db
            .compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
    }

    /// Range deletions after a rescale cover only keys that are present: none when nothing
    /// lies outside, and never key groups the database does not hold.
    #[test]
    fn deletions_outside_a_range_are_bounded_by_the_data_present() {
        let dir = tempfile::tempdir().unwrap();
        let all = KeyGroupRange::all(16).unwrap();
        let options = BackendOptions::new(dir.path(), all, 16);
        let backend = RocksStateBackend::open(options).unwrap();
        let value = backend
            .register(ValueStateDescriptor::<u32, u32>::new("v"))
            .unwrap();
        let kg = |k: u32| crate::keygroup::key_group_for(&k, 16).unwrap();
        let keys: Vec<u32> = (0..400).filter(|k| (4..=11).contains(&kg(*k))).collect();
        for k in &keys {
            value.put(k, k).unwrap();
        }
        // Everything present lies inside [2, 13]: nothing may be deleted.
        backend
            .core
            .delete_outside(KeyGroupRange::new(2, 13).unwrap())
            .unwrap();
        // [6, 9]: what lies below and above goes.
        backend
            .core
            .delete_outside(KeyGroupRange::new(6, 9).unwrap())
            .unwrap();
        for k in &keys {
            let inside = (6..=9).contains(&kg(*k));
            assert_eq!(value.get(k).unwrap().is_some(), inside, "key {k}");
        }
        // No tombstone reaches into key groups below 4 or above 11, which held nothing:
        // the flushed files (data and deletions) span key groups [4, 11] only.
        backend.flush().unwrap();
        let prefix = |g: u16| crate::codec::key_group_prefix(g).to_vec();
        let files: Vec<_> = backend
            .core
            .live_files()
            .unwrap()
            .into_iter()
            .filter(|f| f.identity.column == "state/v")
            .collect();
        assert!(!files.is_empty());
        for f in files {
            let start = f.identity.start_key.unwrap();
            let end = f.identity.end_key.unwrap();
            assert!(start >= prefix(4) && end < prefix(12), "{start:?}..{end:?}");
        }
    }

    #[test]
    fn compaction_drops_expired_entries_only() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000);
        let options = BackendOptions::new(dir.path(), KeyGroupRange::all(16).unwrap(), 16);
        let backend = RocksStateBackend::builder(options)
            .clock(clock.clone())
            .open()
            .unwrap();
        let ttl = Duration::from_secs(10);
        let value = backend
            .register(ValueStateDescriptor::<u32, u32>::new("v").with_ttl(ttl))
            .unwrap();
        let list = backend
            .register(ListStateDescriptor::<u32, u32>::new("l").with_ttl(ttl))
            .unwrap();
        let map = backend
            .register(MapStateDescriptor::<u32, u32, u32>::new("m").with_ttl(ttl))
            .unwrap();
        let plain = backend
            .register(ValueStateDescriptor::<u32, u32>::new("p"))
            .unwrap();
        for k in 0..100u32 {
            value.put(&k, &k).unwrap();
            list.add(&k, &k).unwrap();
            map.put(&k, &1, &k).unwrap();
            plain.put(&k, &k).unwrap();
        }
        backend.flush().unwrap();
        clock.advance(Duration::from_secs(6));
        for k in 0..10u32 {
            value.put(&k, &k).unwrap();
            list.add(&k, &k).unwrap();
            map.put(&k, &2, &k).unwrap();
        }
        backend.flush().unwrap();
        clock.advance(Duration::from_secs(5));
        for state in ["v", "l", "m", "p"] {
            compact(&backend, state);
        }
        // Merged lists lose their expired elements in the first compaction and, once
        // empty, are removed by the filter in the next.
        compact(&backend, "l");
        assert_eq!(raw_entries(&backend, "v"), 10);
        // Lists with one live element are kept whole; the rest are gone.
        assert_eq!(raw_entries(&backend, "l"), 10);
        assert_eq!(list.get(&3).unwrap(), vec![3]);
        assert_eq!(raw_entries(&backend, "m"), 10);
        assert_eq!(raw_entries(&backend, "p"), 100, "no TTL, nothing dropped");
    }
}
