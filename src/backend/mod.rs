//! `RocksStateBackend`: one RocksDB instance per subtask, one column family per state.

use std::path::Path;
use std::sync::Arc;

pub use crate::engine::{
    BackendOptions, SharedResources, ValueCacheStats, DEFAULT_BUFFERED_WRITES,
    DEFAULT_MEMORY_BUDGET,
};

use crate::clock::{Clock, SystemClock};
use crate::engine::{open_core_with, BackendCore, ColumnSettings, OpenMode, ValueMigration};
use crate::error::{Error, Result};
use crate::format::StateMeta;
use crate::keygroup::KeyGroupRange;
use crate::snapshot::{self, PendingSnapshot, StagingDir};
use crate::state::{StateCore, StateSpec};

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
    /// Captures start held (see [`hold_captures_from_open`](Self::hold_captures_from_open)).
    #[cfg(feature = "testing")]
    pub(crate) hold_captures: bool,
}

impl BackendBuilder {
    /// Holds captures from the moment the database opens, as
    /// [`RocksStateBackend::hold_snapshot_captures`] does once it is open: the work a
    /// rescale leaves to the background (the flush of its range deletions, then the
    /// resumption of its compactions) waits too, so that a test can act in between.
    /// Release it by dropping a guard from `hold_snapshot_captures`.
    #[cfg(feature = "testing")]
    pub fn hold_captures_from_open(mut self) -> Self {
        self.hold_captures = true;
        self
    }

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
        self.open_with(mode, &[])
    }

    /// Like [`open_as`](Self::open_as), with the states a new database starts with (see
    /// [`OpenMode::NewForIngestion`]).
    pub(crate) fn open_with(
        self,
        mode: OpenMode,
        states: &[StateMeta],
    ) -> Result<RocksStateBackend> {
        self.options.validate()?;
        let resources = match self.resources {
            Some(r) => r,
            None => SharedResources::new(self.options.memory_budget)?,
        };
        let core = open_core_with(&self.options, &resources, self.clock.clone(), mode, states)?;
        #[cfg(feature = "testing")]
        if self.hold_captures {
            core.captures.hold(true);
        }
        Ok(RocksStateBackend {
            core: Arc::new(core),
            options: self.options,
            resources,
            clock: self.clock,
        })
    }
}

impl RocksStateBackend {
    /// Registers a state from its recorded description (creating its column family), or
    /// checks it against the stored one. See [`register`](Self::register).
    pub(crate) fn ensure_state(&self, requested: &StateMeta) -> Result<Arc<ColumnSettings>> {
        self.core
            .ensure_state(requested, &[], &self.resources, self.clock.clone())
    }

    /// Starts building a backend from `options`.
    pub fn builder(options: BackendOptions) -> BackendBuilder {
        BackendBuilder {
            options,
            resources: None,
            clock: Arc::new(SystemClock),
            reuse: Vec::new(),
            #[cfg(feature = "testing")]
            hold_captures: false,
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
        let migrations: Vec<ValueMigration<'_>> = spec
            .migrations()
            .iter()
            .map(|m| ValueMigration {
                from: &m.from,
                from_version: m.from_version,
                convert: &*m.convert,
            })
            .collect();
        let column =
            self.core
                .ensure_state(&requested, &migrations, &self.resources, self.clock.clone())?;
        let core = StateCore::new(self.core.clone(), &requested.name, column)?;
        Ok(spec.bind(core))
    }

    /// Drops state `name` on purpose: its values and its record go, and checkpoints and
    /// savepoints taken from now on no longer hold it; `Ok(false)` when there is no such
    /// state (so the call can stay in a program that restarts from its own checkpoints).
    /// For a program that no longer has the state: call it right after the restore.
    /// Handles of the dropped state are refused from then on (`InvalidArgument`), also
    /// after a state of the same name is registered again. A state the program merely
    /// stops using is kept, never dropped by accident.
    ///
    /// Errors: engine errors.
    pub fn drop_state(&self, name: &str) -> Result<bool> {
        self.core.drop_state(name)
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

    /// Calls `f(RocksDB key, RocksDB value)` for the stored entries of state `name` whose
    /// key starts with `prefix` (all of them for an empty prefix), in key order, until `f`
    /// returns `false`. Reads a consistent view.
    ///
    /// Errors: `InvalidArgument` for a state that is not stored; engine errors.
    pub fn scan_raw(
        &self,
        name: &str,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let column = self
            .core
            .state_columns()
            .into_iter()
            .find(|(meta, _)| meta.name == name)
            .map(|(_, column)| column)
            .ok_or_else(|| Error::invalid(format!("no state {name:?} is stored")))?;
        let upper = crate::codec::prefix_successor(prefix);
        let mut scan = self.core.scan(&column, prefix.to_vec(), upper)?;
        while let Some((key, value)) = scan.current()? {
            if !f(key, value) {
                break;
            }
            scan.advance();
        }
        Ok(())
    }

    /// Writes all memtables to SST files. Blocks until the flush is done.
    pub fn flush(&self) -> Result<()> {
        self.core.flush()
    }

    /// Whether RocksDB refused buffered writes ([`BackendOptions::buffered_writes`]): they
    /// are lost, and the backend refuses every later read, write and snapshot. A runtime
    /// seeing a failed snapshot should ask, and fail the subtask (to restore it from its
    /// last checkpoint) rather than decline one checkpoint and go on.
    pub fn has_lost_writes(&self) -> bool {
        self.core.has_lost_writes()
    }

    /// What this backend's point reads found in memory since it was opened: how many
    /// were answered by its buffered writes or by the values it keeps once applied
    /// (without RocksDB), its evictions of kept values, and the bytes it keeps now. A
    /// hit ratio far below one half with a large state says the values kept do not pay
    /// for themselves: the backend then keeps fewer by itself, and `buffered_writes`
    /// decides whether it keeps any. The counts start at zero with each opening: a
    /// backend restored after a failure counts from its restore.
    pub fn value_cache_stats(&self) -> ValueCacheStats {
        self.core.value_cache_stats()
    }

    /// The synchronous phase of a snapshot for `checkpoint_id`: notes the point the
    /// snapshot stands for and seals the memtables, whose flush then runs in the
    /// background. Writes may continue as soon as it returns; the files are hard-linked
    /// into the staging directory when the flush is done ([`PendingSnapshot::capture`],
    /// which [`PendingSnapshot::upload`] runs first). Should writes made after this call
    /// reach the files first (a memtable filled and flushed in the meantime), the capture
    /// is refused with `Busy` and the next snapshot flushes here instead, blocking for
    /// the flush.
    ///
    /// Errors: engine and local I/O errors; `Internal` when a migration converted a
    /// state's values but could not record its new type (the local state is then never
    /// snapshotted or reopened: restore instead).
    pub fn snapshot(&self, checkpoint_id: u64) -> Result<PendingSnapshot> {
        if let Some(why) = self.core.poisoned.lock().as_ref() {
            return Err(Error::Internal(format!(
                "no snapshot of {}: {why}",
                self.core.dir().display()
            )));
        }
        let started = std::time::Instant::now();
        let root = self.options.staging_dir();
        std::fs::create_dir_all(&root)
            .map_err(|e| Error::io(format!("create {}", root.display()), e))?;
        // A name of its own per attempt: concurrent or repeated snapshots never collide.
        let target = root.join(format!("chk-{checkpoint_id}-{}", crate::engine::new_uid()));
        let reusable = if self.options.incremental {
            self.core.tracker.lock().reusable()
        } else {
            Default::default()
        };
        // The record of every state and the files are taken under the lock that
        // registration holds while it migrates or drops a state: a snapshot never holds
        // values of one type under the record of another.
        let states_guard = self.core.states.lock();
        // An earlier snapshot still waiting for its flush would refuse its files if this
        // one sealed the memtables now. (Captures never take the states lock.)
        self.core.captures.wait_idle();
        // Compactions a rescale paused and could not resume in the background.
        self.core.resume_compactions()?;
        let states: Vec<StateMeta> = states_guard.values().map(|e| e.meta.clone()).collect();
        let staging = StagingDir::new(target.clone());
        crate::crashpoint::hit("sync");
        // Normally the flush runs in the background and the files are taken when it is
        // done (`PendingSnapshot::capture`); after a refused capture, here. So it is when
        // the write buffers, which every backend sharing these resources fills, are near
        // their size: the first writes after the cut could then make RocksDB seal this
        // backend's fresh memtable, which would refuse the capture (at parallelism 4 on
        // two cores, the demo job had a third of its checkpoints refused so).
        // The buffered writes first: they belong to the snapshot, and they fill the
        // write buffers the check below reads.
        self.core.apply_buffered()?;
        let in_sync = self.core.take_flush_in_sync() || self.resources.write_buffers_pressed();
        let (files, capture) = if in_sync {
            if let Err(e) = self.core.checkpoint_into(&target) {
                self.core.flush_later_in_sync();
                return Err(e);
            }
            drop(states_guard);
            (
                snapshot::list_captured(&self.core, &target)?,
                snapshot::Capture::Taken,
            )
        } else {
            let cut = self.core.begin_checkpoint()?;
            drop(states_guard);
            let capture = snapshot::start_capture(self.core.clone(), cut, target.clone())?;
            (Vec::new(), capture)
        };
        let sync_duration = started.elapsed();
        metrics::histogram!(crate::telemetry::SNAPSHOT_SYNC)
            .record(crate::telemetry::seconds(sync_duration));
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
            sync_duration,
            capture,
            capture_duration: std::time::Duration::ZERO,
            resources: self.resources.clone(),
            clock: self.clock.clone(),
        })
    }

    /// Holds the taking of snapshot files (after the flush of their synchronous phase)
    /// until the returned guard is dropped, so that a test can order writes and flushes
    /// before it. A [`snapshot`](Self::snapshot) waits for earlier captures: drop the
    /// guard before taking the next one.
    #[cfg(feature = "testing")]
    pub fn hold_snapshot_captures(&self) -> CaptureHold {
        self.core.captures.hold(true);
        CaptureHold {
            core: self.core.clone(),
        }
    }

    /// Records this backend's figures in the metrics
    /// ([`crate::telemetry`]), labelled with `job`, `operator` and `subtask`: memtable bytes,
    /// block cache usage, pending compaction bytes, live SST bytes, estimated keys, whether
    /// writes are stopped and the delayed write rate (gauges), and block cache hits and
    /// misses and stall time (counters, from RocksDB's statistics, only when the backend
    /// was opened with [`BackendOptions::statistics`](crate::BackendOptions::statistics));
    /// and what point reads found in memory ([`value_cache_stats`](Self::value_cache_stats)).
    /// Runtimes call it now and then (the harness and the timely adapter at every
    /// checkpoint); it reads a few properties, and holds the write path's lock only to
    /// copy five numbers.
    pub fn record_metrics(&self, job: &str, operator: &str, subtask: u32) {
        let labels = [
            ("job", job.to_string()),
            ("operator", operator.to_string()),
            ("subtask", subtask.to_string()),
        ];
        for (i, (property, name, _)) in crate::telemetry::ROCKSDB_GAUGES.iter().enumerate() {
            let value = if i < 4 {
                self.core.property_sum(property)
            } else {
                self.core.db.property_int_value(*property).ok().flatten()
            };
            if let Some(value) = value {
                metrics::gauge!(*name, &labels).set(value as f64);
            }
        }
        // Counted by what changed since the last reading: a backend reopened in the same
        // process (a restart, a rescale) starts its statistics from zero again.
        let cache = self.core.value_cache_deltas();
        metrics::gauge!(crate::telemetry::VALUE_CACHE_BYTES, &labels).set(cache.bytes as f64);
        metrics::counter!(crate::telemetry::VALUE_CACHE_LOOKUPS, &labels).increment(cache.lookups);
        metrics::counter!(crate::telemetry::VALUE_CACHE_HITS, &labels).increment(cache.hits);
        metrics::counter!(crate::telemetry::VALUE_CACHE_EVICTIONS, &labels)
            .increment(cache.evictions);
        metrics::counter!(crate::telemetry::VALUE_CACHE_PAUSES, &labels).increment(cache.pauses);
        let Some((hits, misses, stalls)) = self.core.ticker_deltas() else {
            return;
        };
        metrics::counter!(crate::telemetry::ROCKSDB_BLOCK_CACHE_HITS, &labels).increment(hits);
        metrics::counter!(crate::telemetry::ROCKSDB_BLOCK_CACHE_MISSES, &labels).increment(misses);
        metrics::counter!(crate::telemetry::ROCKSDB_STALL_MICROS, &labels).increment(stalls);
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

/// Holds snapshot captures while it lives ([`RocksStateBackend::hold_snapshot_captures`]).
#[cfg(feature = "testing")]
pub struct CaptureHold {
    core: Arc<BackendCore>,
}

#[cfg(feature = "testing")]
impl Drop for CaptureHold {
    fn drop(&mut self) {
        self.core.captures.hold(false);
    }
}

impl Drop for RocksStateBackend {
    /// Waits for the snapshot captures under way (each waits for a flush, then links
    /// files): they hold the database open, and its directory must be free to reopen once
    /// the backend is gone.
    fn drop(&mut self) {
        self.core.captures.wait_idle();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;
    use crate::state::{ListStateDescriptor, MapStateDescriptor, ValueState, ValueStateDescriptor};

    fn raw_entries(backend: &RocksStateBackend, state: &str) -> usize {
        backend.core.apply_buffered().unwrap();
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

    /// Compacts `state`; later reads go to RocksDB (the values kept in memory are let go).
    fn compact(backend: &RocksStateBackend, state: &str) {
        backend.core.apply_and_forget().unwrap();
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

    /// RocksDB's statistics are kept only when asked for: without them RocksDB has no
    /// statistics object (it counts nothing) and there are no counters for
    /// `record_metrics` to report; with them a read of a flushed value counts its block
    /// cache lookups.
    #[test]
    fn statistics_are_kept_only_when_asked_for() {
        let root = tempfile::tempdir().unwrap();
        for statistics in [false, true] {
            let range = KeyGroupRange::all(16).unwrap();
            let mut options =
                BackendOptions::new(root.path().join(statistics.to_string()), range, 16);
            options.statistics = statistics;
            let backend = RocksStateBackend::open(options).unwrap();
            let value = backend
                .register(ValueStateDescriptor::<u32, u32>::new("v"))
                .unwrap();
            value.put(&1, &2).unwrap();
            compact(&backend, "v");
            assert_eq!(raw_entries(&backend, "v"), 1);
            let kept = backend
                .core
                .db
                .property_value(rocksdb::properties::OPTIONS_STATISTICS)
                .unwrap();
            assert_eq!(kept.is_some(), statistics, "RocksDB's statistics: {kept:?}");
            let before = backend.core.ticker_deltas();
            assert_eq!(value.get(&1).unwrap(), Some(2));
            match (before, backend.core.ticker_deltas()) {
                (None, None) => assert!(!statistics, "statistics asked for but not kept"),
                (Some(_), Some((hits, misses, _))) => {
                    assert!(statistics, "statistics kept though not asked for");
                    assert!(hits + misses > 0, "the read counted no block cache lookup");
                }
                other => panic!("statistics came and went: {other:?}"),
            }
        }
    }

    /// Compactions a rescale paused and could not resume in the background are resumed by
    /// the next snapshot, before it takes anything.
    #[cfg(feature = "testing")]
    #[test]
    fn a_snapshot_resumes_compactions_still_paused() {
        use crate::testing::checks::columns_with_compactions_off;
        let root = tempfile::tempdir().unwrap();
        let (backend, value) = value_backend(root.path());
        value.put(&1, &2).unwrap();
        backend.core.pause_compactions_of(|_| true).unwrap();
        assert_eq!(columns_with_compactions_off(root.path()), ["state/v"]);
        drop(backend.snapshot(1).unwrap());
        assert!(columns_with_compactions_off(root.path()).is_empty());
    }

    /// The memtables of a state column of a backend that writes in key order insert with
    /// one hint per key group, whether the state is registered after the database opened
    /// or is opened with it, while the hints take at most 1/32 of a write buffer (at 300
    /// bytes per key group: 873 key groups at a 64 MiB budget's 8 MiB write buffers, 109 at
    /// 8 MiB's 1 MiB); larger ranges, backends that write in any order (the default), and
    /// the backend's own column, go without.
    #[cfg(feature = "testing")]
    #[test]
    fn state_columns_insert_with_a_hint_per_key_group() {
        use crate::testing::checks::columns_with_insert_hints;
        let root = tempfile::tempdir().unwrap();
        let tail = |n: u16| KeyGroupRange::new(1024, 1024 + n).unwrap();
        for (in_order, budget_mib, max_parallelism, range, hints) in [
            (true, 64, 16, KeyGroupRange::all(16).unwrap(), true),
            (false, 64, 16, KeyGroupRange::all(16).unwrap(), false),
            (true, 64, 4096, tail(872), true),
            (true, 64, 4096, tail(873), false),
            (true, 8, 128, KeyGroupRange::new(0, 108).unwrap(), true),
            (true, 8, 128, KeyGroupRange::all(128).unwrap(), false),
        ] {
            let dir = root.path().join(format!(
                "{in_order}-{budget_mib}-{max_parallelism}-{}",
                range.len()
            ));
            let mut options = BackendOptions::new(&dir, range, max_parallelism);
            options.memory_budget = budget_mib << 20;
            options.writes_in_key_order = in_order;
            for reopened in [false, true] {
                let backend = RocksStateBackend::open(options.clone()).unwrap();
                let value = backend
                    .register(ValueStateDescriptor::<u32, u32>::new("v"))
                    .unwrap();
                let key = (0u32..)
                    .find(|k| {
                        let bytes = crate::codec::encode_key(k).unwrap();
                        let kg = crate::keygroup::key_group_for_bytes(&bytes, max_parallelism);
                        (range.start()..=range.end()).contains(&kg)
                    })
                    .unwrap();
                value.put(&key, &2).unwrap();
                let what = format!(
                    "in order {in_order}, {} key groups, {budget_mib} MiB, reopened {reopened}",
                    range.len()
                );
                // Never the backend's own column.
                let expected: &[&str] = if hints { &["state/v"] } else { &[] };
                assert_eq!(columns_with_insert_hints(&dir), expected, "{what}");
            }
        }
    }

    /// The backend's own column and its state columns write table files with one bloom
    /// filter block and one index block each, not partitions: a partitioned filter or
    /// index costs a point read two more cache lookups per file it probes. Level-0 files
    /// are compacted 8 at a time.
    #[cfg(feature = "testing")]
    #[test]
    fn table_files_have_one_filter_and_one_index_block() {
        use crate::testing::checks::tables_with_option;
        let dir = tempfile::tempdir().unwrap();
        let options = BackendOptions::new(dir.path(), KeyGroupRange::all(16).unwrap(), 16);
        let backend = RocksStateBackend::open(options).unwrap();
        let value = backend
            .register(ValueStateDescriptor::<u32, u32>::new("v"))
            .unwrap();
        value.put(&1, &2).unwrap();
        let filtered = tables_with_option(dir.path(), "filter_policy=bloomfilter");
        assert!(filtered.iter().any(|c| c == "state/v"), "{filtered:?}");
        assert!(filtered.len() >= 2, "{filtered:?}");
        for line in ["index_type=kBinarySearch", "partition_filters=false"] {
            let with = tables_with_option(dir.path(), line);
            let without: Vec<_> = filtered.iter().filter(|c| !with.contains(c)).collect();
            assert!(without.is_empty(), "{line} missing in {without:?}");
        }
        // Level-0 files are compacted 8 at a time.
        let trigger = crate::testing::checks::columns_with_option(
            dir.path(),
            "level0_file_num_compaction_trigger=8",
        );
        assert!(trigger.iter().any(|c| c == "state/v"), "{trigger:?}");
    }

    /// A backend closes its directory flushed and marked clean, so it reopens with its
    /// data; a scratch copy is closed as it is: nothing flushed, no clean mark, and
    /// reopening it as a backend's own directory is refused.
    #[test]
    fn a_scratch_copy_closes_without_flush_or_clean_mark() {
        let root = tempfile::tempdir().unwrap();
        let all = KeyGroupRange::all(16).unwrap();
        let marker = |dir: &std::path::Path| dir.join(crate::engine::CLEAN_MARKER).exists();
        let ssts = |dir: &std::path::Path| {
            std::fs::read_dir(dir)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension() == Some("sst".as_ref()))
                .count()
        };
        for scratch in [false, true] {
            let dir = root.path().join(format!("scratch-{scratch}"));
            let mut options = BackendOptions::new(&dir, all, 16);
            // Each write applied at once: the value is in the memtable, which only a
            // close that is not a scratch copy's flushes.
            options.buffered_writes = 0;
            let backend = RocksStateBackend::open(options.clone()).unwrap();
            let value = backend
                .register(ValueStateDescriptor::<u32, u32>::new("v"))
                .unwrap();
            value.put(&1, &2).unwrap();
            if scratch {
                backend.core.mark_scratch();
            }
            drop(value);
            let before = ssts(&dir);
            drop(backend);
            assert_eq!(marker(&dir), !scratch, "clean mark, scratch {scratch}");
            assert_eq!(ssts(&dir) > before, !scratch, "flushed, scratch {scratch}");
            match RocksStateBackend::open(options) {
                Ok(reopened) => {
                    assert!(!scratch, "a scratch copy reopened");
                    let value = reopened
                        .register(ValueStateDescriptor::<u32, u32>::new("v"))
                        .unwrap();
                    assert_eq!(value.get(&1).unwrap(), Some(2));
                }
                Err(e) => assert!(scratch, "the backend's own directory refused: {e}"),
            }
        }
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
        let kg = |k: u32| crate::codec::key_group_for(&k, 16).unwrap();
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

    /// The levels of the live SST files of `state`, in order.
    fn file_levels(backend: &RocksStateBackend, state: &str) -> Vec<i32> {
        let column = format!("state/{state}");
        let mut levels: Vec<i32> = backend
            .core
            .live_files()
            .unwrap()
            .into_iter()
            .filter(|f| f.identity.column == column)
            .map(|f| f.level)
            .collect();
        levels.sort();
        levels
    }

    /// A backend over 16 key groups in `dir`, with the value state `v`.
    fn value_backend(dir: &std::path::Path) -> (RocksStateBackend, ValueState<u32, u32>) {
        let options = BackendOptions::new(dir, KeyGroupRange::all(16).unwrap(), 16);
        let backend = RocksStateBackend::open(options).unwrap();
        let value = backend
            .register(ValueStateDescriptor::<u32, u32>::new("v"))
            .unwrap();
        (backend, value)
    }

    /// Files of levels 1 and below that lie wholly outside the kept range are dropped
    /// whole; what lies outside in other files (here a level-0 file) goes by range
    /// deletion; what lies inside stays.
    #[test]
    fn files_wholly_outside_a_range_are_dropped_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, value) = value_backend(dir.path());
        let kg = |k: u32| crate::codec::key_group_for(&k, 16).unwrap();
        let keys_in = |groups: std::ops::RangeInclusive<u16>| -> Vec<u32> {
            (0..2000).filter(|k| groups.contains(&kg(*k))).collect()
        };
        let (low, kept, high) = (keys_in(0..=3), keys_in(6..=9), keys_in(12..=13));
        for k in &low {
            value.put(k, k).unwrap();
        }
        backend.flush().unwrap();
        // The low key groups' file moves below level 0; the others stay at level 0.
        compact(&backend, "v");
        for k in kept.iter().chain(&high) {
            value.put(k, k).unwrap();
        }
        backend.flush().unwrap();
        let before = file_levels(&backend, "v");
        assert_eq!(before.len(), 2, "{before:?}");
        assert!(before[1] > 0, "{before:?}");
        let dropped = backend
            .core
            .delete_outside(KeyGroupRange::new(6, 9).unwrap())
            .unwrap();
        assert_eq!(dropped, 1);
        assert_eq!(file_levels(&backend, "v"), vec![0]);
        assert_eq!(
            backend
                .core
                .count_outside(KeyGroupRange::new(6, 9).unwrap())
                .unwrap(),
            0
        );
        for k in &kept {
            assert_eq!(value.get(k).unwrap(), Some(*k));
        }
        for k in low.iter().chain(&high) {
            assert_eq!(value.get(k).unwrap(), None, "key {k}");
        }
    }

    /// A file dropped whole may hold deletions of older values in a deeper file that is
    /// kept: those values lie in the dropped file's bounds, inside the span the range
    /// deletion covers, and do not come back. Both kinds of deletion: of one key, and of
    /// a range of keys.
    #[test]
    fn values_under_a_dropped_files_deletions_do_not_come_back() {
        values_under_a_dropped_file_stay_deleted(false);
        values_under_a_dropped_file_stay_deleted(true);
    }

    fn values_under_a_dropped_file_stay_deleted(range_deletion: bool) {
        let dir = tempfile::tempdir().unwrap();
        let (backend, value) = value_backend(dir.path());
        let raw = |k: u32| crate::codec::state_key(&k, &(), 16).unwrap();
        let kg = |k: u32| crate::codec::key_group_for(&k, 16).unwrap();
        // Keys of key group 2 in raw order, and one of key group 7 (kept).
        let mut low: Vec<u32> = (0..2000).filter(|k| kg(*k) == 2).collect();
        low.sort_by_key(|k| raw(*k));
        let (x, y) = (low[low.len() / 3], low[2 * low.len() / 3]);
        let hidden: Vec<u32> = if range_deletion {
            low[low.len() / 3..2 * low.len() / 3].to_vec()
        } else {
            vec![x]
        };
        let m = (0..2000).find(|k| kg(*k) == 7).unwrap();
        for k in (0..2000).filter(|k| kg(*k) == 2 || kg(*k) == 7) {
            value.put(&k, &k).unwrap();
        }
        backend.flush().unwrap();
        // One file at the bottom holds them all: it reaches into the kept range.
        compact(&backend, "v");
        // A file of its own, one level up, deletes x, or [x, y) (a small level target
        // makes the level above the bottom one in use, so the ingestion places the file
        // there). Compactions stay off, as in a rescale: none merges the two files.
        let sst = dir.path().join("deletion.sst");
        let cf = backend.core.db.cf_handle("state/v").unwrap();
        backend
            .core
            .db
            .set_options_cf(
                &cf,
                &[
                    ("disable_auto_compactions", "true"),
                    ("max_bytes_for_level_base", "1024"),
                ],
            )
            .unwrap();
        let opts = rocksdb::Options::default();
        let mut writer = rocksdb::SstFileWriter::create(&opts);
        writer.open(&sst).unwrap();
        if range_deletion {
            writer.delete_range(raw(x), raw(y)).unwrap();
        } else {
            writer.delete(raw(x)).unwrap();
        }
        writer.finish().unwrap();
        backend
            .core
            .db
            .ingest_external_file_cf(&cf, vec![&sst])
            .unwrap();
        drop(cf);
        for k in &hidden {
            assert_eq!(value.get(k).unwrap(), None, "key {k}");
        }
        assert_eq!(value.get(&y).unwrap(), Some(y));
        let before = file_levels(&backend, "v");
        assert_eq!(before.len(), 2, "{before:?}");
        assert!(before[0] > 0 && before[0] < before[1], "{before:?}");
        let range = KeyGroupRange::new(6, 9).unwrap();
        assert_eq!(backend.core.delete_outside(range).unwrap(), 1);
        assert_eq!(
            file_levels(&backend, "v"),
            vec![before[1]],
            "the deletion's file went"
        );
        for k in &low {
            assert_eq!(value.get(k).unwrap(), None, "key {k}");
        }
        assert_eq!(backend.core.count_outside(range).unwrap(), 0);
        assert_eq!(value.get(&m).unwrap(), Some(m));
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
