//! `BackendCore`: the RocksDB instance and the operations state handles perform on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rocksdb::{
    DBRawIteratorWithThreadMode, DBWithThreadMode, FlushOptions, MultiThreaded, ReadOptions,
    WriteBatch, WriteOptions,
};

use crate::clock::Clock;
use crate::engine::buffer::{Lookup, ValueCacheBudget, ValueCacheStats, WriteBuffer};
use crate::engine::tracker::SnapshotTracker;
use crate::engine::ColumnSettings;
use crate::error::{Error, Result};
use crate::format::StateMeta;
use crate::keygroup::KeyGroupRange;

pub(crate) type Db = DBWithThreadMode<MultiThreaded>;

/// A registered state: its recorded metadata and its column family's settings.
pub(crate) struct StateEntry {
    pub meta: StateMeta,
    pub column: Arc<ColumnSettings>,
}

/// A point write of a state: what [`BackendCore::point_write`] does with its key.
enum PointWrite<'a> {
    Put(&'a [u8]),
    Merge(&'a [u8]),
    Delete,
}

/// The shared inside of a backend. State handles hold it through an `Arc`.
pub(crate) struct BackendCore {
    pub(crate) db: Db,
    pub(crate) dir: PathBuf,
    pub(crate) backend_uid: String,
    pub(crate) states: Mutex<BTreeMap<String, StateEntry>>,
    pub(crate) tracker: Arc<Mutex<SnapshotTracker>>,
    write_opts: WriteOptions,
    /// The write options of the buffer's batches.
    buffer_write_opts: WriteOptions,
    read_opts: ReadOptions,
    clock: Arc<dyn Clock>,
    max_parallelism: u32,
    key_group_range: KeyGroupRange,
    /// The backend's records arrive in key order within each key group: its state
    /// columns keep memtable insert hints ([`BackendOptions::writes_in_key_order`](crate::BackendOptions::writes_in_key_order)).
    pub(crate) writes_in_key_order: bool,
    /// The options the database was opened with: they hold its statistics object.
    pub(crate) statistics: Option<rocksdb::Options>,
    /// The statistics counters at the last [`ticker_deltas`](Self::ticker_deltas).
    last_tickers: Mutex<[u64; 3]>,
    /// The value cache's figures at the last reading for the metrics.
    last_cache_stats: Mutex<ValueCacheStats>,
    /// Why the local state can no longer be trusted (a migration converted the values
    /// but could not record the new type): snapshots are refused and the directory is
    /// not marked clean, so the next start restores from a snapshot instead.
    pub(crate) poisoned: Mutex<Option<String>>,
    /// Memtables RocksDB sealed (see [`Cut`]).
    pub(crate) seals: Arc<SealWatch>,
    /// Bumped before every change of the column families or ingestion of files (see
    /// [`Cut`]).
    layout: AtomicU64,
    /// The next snapshot flushes in its synchronous phase: a capture failed.
    flush_in_sync: AtomicBool,
    /// Captures under way.
    pub(crate) captures: Arc<Captures>,
    /// The column families whose compactions a rescale paused and that are not running
    /// again yet (see [`resume_compactions`](Self::resume_compactions)).
    paused_columns: Mutex<Vec<String>>,
    /// A scratch copy (an offline reader's, a rescale source, a savepoint being
    /// rewritten): its directory is removed after use, so closing it neither flushes nor
    /// syncs nor marks it clean (see [`mark_scratch`](Self::mark_scratch)).
    scratch: AtomicBool,
    /// Point writes not yet applied to RocksDB (see [`WriteBuffer`]).
    buffer: Mutex<WriteBuffer>,
    /// Writes buffered before they are applied; 0 applies each at once
    /// ([`BackendOptions::buffered_writes`](crate::BackendOptions::buffered_writes)).
    pub(crate) buffered_writes: usize,
    /// Set when buffered writes could not be applied: they are lost, so every read or
    /// write after it is refused (see [`apply_buffered`](Self::apply_buffered)).
    writes_lost: AtomicBool,
}

/// The captures of one backend under way (threads taking snapshot files), and a switch
/// that holds them before they take their files (tests order events around them).
#[derive(Debug, Default)]
pub(crate) struct Captures {
    running: Mutex<usize>,
    done: parking_lot::Condvar,
    held: Mutex<bool>,
    released: parking_lot::Condvar,
}

impl Captures {
    /// Counts a capture that started, until the returned guard is dropped (however the
    /// capture ends, a panic included).
    pub(crate) fn start(self: &Arc<Self>) -> CaptureCount {
        *self.running.lock() += 1;
        CaptureCount(self.clone())
    }

    fn finished(&self) {
        let mut n = self.running.lock();
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.done.notify_all();
        }
    }

    /// Blocks until no capture is under way.
    pub(crate) fn wait_idle(&self) {
        let mut n = self.running.lock();
        while *n > 0 {
            self.done.wait(&mut n);
        }
    }

    /// Holds captures before they take their files (`true`) or lets them go on.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn hold(&self, held: bool) {
        *self.held.lock() = held;
        if !held {
            self.released.notify_all();
        }
    }

    fn wait_released(&self) {
        let mut held = self.held.lock();
        while *held {
            self.released.wait(&mut held);
        }
    }
}

/// Counts one capture under way while it lives ([`Captures::start`]).
pub(crate) struct CaptureCount(Arc<Captures>);

impl Drop for CaptureCount {
    fn drop(&mut self) {
        self.0.finished();
    }
}

/// The highest first sequence number of any memtable RocksDB sealed (made immutable, to
/// be flushed) since the database opened. A memtable is sealed before it can be flushed,
/// and RocksDB reports it before it joins the flush queue.
///
/// It also counts finished flushes, so that a capture waiting for one wakes up at once.
#[derive(Debug, Default)]
pub(crate) struct SealWatch {
    max_first_seqno: AtomicU64,
    flushes: Mutex<u64>,
    flushed: parking_lot::Condvar,
    /// Background errors RocksDB reported.
    errors: AtomicU64,
}

impl SealWatch {
    fn max_first_seqno(&self) -> u64 {
        self.max_first_seqno.load(Ordering::SeqCst)
    }

    /// How many flushes finished so far.
    pub(crate) fn flushes(&self) -> u64 {
        *self.flushes.lock()
    }

    /// Waits until more than `seen` flushes finished, or `timeout` passed.
    pub(crate) fn wait_for_flush(&self, seen: u64, timeout: std::time::Duration) {
        let mut n = self.flushes.lock();
        if *n == seen {
            self.flushed.wait_for(&mut n, timeout);
        }
    }
}

/// Reports sealed memtables to a [`SealWatch`].
pub(crate) struct SealListener(pub(crate) Arc<SealWatch>);

impl rocksdb::event_listener::EventListener for SealListener {
    fn on_memtable_sealed(&self, info: &rocksdb::event_listener::MemTableInfo) {
        self.0
            .max_first_seqno
            .fetch_max(info.first_seqno(), Ordering::SeqCst);
    }

    fn on_flush_completed(&self, _: &rocksdb::event_listener::FlushJobInfo) {
        *self.0.flushes.lock() += 1;
        self.0.flushed.notify_all();
    }

    fn on_background_error(
        &self,
        _: rocksdb::event_listener::DBBackgroundErrorReason,
        _: rocksdb::event_listener::MutableStatus,
    ) {
        self.0.errors.fetch_add(1, Ordering::SeqCst);
        // A capture waiting for a flush that will not come stops waiting.
        let _flushes = self.0.flushes.lock();
        self.0.flushed.notify_all();
    }
}

/// The point a snapshot stands for, taken in its synchronous phase without waiting for
/// the flush it starts: every write up to `seqno` is in the memtables sealed then.
///
/// The files are taken later ([`BackendCore::capture_into`]), once that flush is done.
/// They hold exactly the state at `seqno` unless data written after it reached an SST
/// file first, which needs a memtable sealed after the cut (first sequence number above
/// `seqno`), or an ingestion or a change of column families (`layout` moved). Either
/// is detected, and the capture is then refused rather than taken approximately.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cut {
    seqno: u64,
    layout: u64,
    /// RocksDB's count of background errors at the cut.
    errors: u64,
}

impl BackendCore {
    pub(crate) fn new(
        db: Db,
        dir: PathBuf,
        backend_uid: String,
        clock: Arc<dyn Clock>,
        max_parallelism: u32,
        key_group_range: KeyGroupRange,
    ) -> Self {
        let mut write_opts = WriteOptions::default();
        // Durability comes from checkpoints: no write-ahead log.
        write_opts.disable_wal(true);
        let mut buffer_write_opts = WriteOptions::default();
        buffer_write_opts.disable_wal(true);
        // A buffered write of a state dropped since is skipped, not an error that would
        // lose the whole batch (a drop applies the buffer first, and a write checks the
        // drop under the buffer's lock: this only guards that order).
        buffer_write_opts.set_ignore_missing_column_families(true);
        Self {
            db,
            dir,
            backend_uid,
            states: Mutex::new(BTreeMap::new()),
            tracker: Arc::default(),
            write_opts,
            buffer_write_opts,
            read_opts: ReadOptions::default(),
            clock,
            max_parallelism,
            key_group_range,
            writes_in_key_order: false,
            statistics: None,
            last_tickers: Mutex::new([0; 3]),
            last_cache_stats: Mutex::new(ValueCacheStats::default()),
            poisoned: Mutex::new(None),
            seals: Arc::default(),
            layout: AtomicU64::new(0),
            flush_in_sync: AtomicBool::new(false),
            buffer: Mutex::new(WriteBuffer::default()),
            buffered_writes: 0,
            writes_lost: AtomicBool::new(false),
            captures: Arc::default(),
            paused_columns: Mutex::new(Vec::new()),
            scratch: AtomicBool::new(false),
        }
    }

    /// Marks the directory as a scratch copy that is removed after use: when the last
    /// reference goes, the database is closed as it is, with no flush, no sync of its
    /// files and no clean mark, so it will never reopen as a backend's own directory.
    /// (Syncing a downloaded copy only to delete it would write it all to disk.)
    pub(crate) fn mark_scratch(&self) {
        self.scratch.store(true, Ordering::SeqCst);
        // RocksDB itself flushes the memtables on close when there is no write-ahead log.
        if let Err(e) = self
            .db
            .set_db_options(&[("avoid_flush_during_shutdown", "true")])
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "a scratch copy will be flushed on close");
        }
    }

    /// Records that column families or files are about to change outside of writes
    /// (see [`Cut`]).
    /// Applies the buffered writes first: they belong to the layout before the change.
    /// The values the buffer kept are let go: the change may alter what they cache.
    pub(crate) fn layout_changed(&self) -> Result<()> {
        self.apply_and_forget()?;
        self.layout.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// The sum of integer property `property` over the default column family and every
    /// state's (RocksDB reports per-family figures for the default one only).
    pub(crate) fn property_sum(&self, property: &str) -> Option<u64> {
        let mut total = self.db.property_int_value(property).ok().flatten()?;
        let names: Vec<String> = self
            .states
            .lock()
            .values()
            .map(|e| e.column.cf_name.clone())
            .collect();
        for name in names {
            if let Some(cf) = self.db.cf_handle(&name) {
                if let Ok(Some(v)) = self.db.property_int_value_cf(&cf, property) {
                    total = total.saturating_add(v);
                }
            }
        }
        Some(total)
    }

    /// RocksDB's block cache hits, misses and stall time (µs) since the last call, or
    /// `None` when the backend keeps no statistics.
    pub(crate) fn ticker_deltas(&self) -> Option<(u64, u64, u64)> {
        use rocksdb::statistics::Ticker;
        let opts = self.statistics.as_ref()?;
        let mut last = self.last_tickers.lock();
        let now = [
            opts.get_ticker_count(Ticker::BlockCacheHit),
            opts.get_ticker_count(Ticker::BlockCacheMiss),
            opts.get_ticker_count(Ticker::StallMicros),
        ];
        let delta: Vec<u64> = now
            .iter()
            .zip(last.iter())
            .map(|(n, l)| n.saturating_sub(*l))
            .collect();
        *last = now;
        Some((delta[0], delta[1], delta[2]))
    }

    /// What point reads found in memory since the backend was opened, and the bytes of
    /// values kept.
    pub(crate) fn value_cache_stats(&self) -> ValueCacheStats {
        self.buffer.lock().stats()
    }

    /// The value cache's figures now, with its counters as increments since the last
    /// call.
    pub(crate) fn value_cache_deltas(&self) -> ValueCacheStats {
        // Read under the lock of the last reading, so that two callers cannot count
        // the same increments twice.
        let mut last = self.last_cache_stats.lock();
        let now = self.value_cache_stats();
        let delta = ValueCacheStats {
            lookups: now.lookups.saturating_sub(last.lookups),
            hits: now.hits.saturating_sub(last.hits),
            evictions: now.evictions.saturating_sub(last.evictions),
            pauses: now.pauses.saturating_sub(last.pauses),
            bytes: now.bytes,
        };
        *last = now;
        delta
    }

    pub(crate) fn max_parallelism(&self) -> u32 {
        self.max_parallelism
    }

    pub(crate) fn key_group_range(&self) -> KeyGroupRange {
        self.key_group_range
    }

    pub(crate) fn now_millis(&self) -> u64 {
        self.clock.now_millis()
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The column family of `column`; refused when its state was dropped (a handle made
    /// before [`drop_state`](Self::drop_state) never reaches a state of the same name
    /// registered again).
    pub(crate) fn column_cf(
        &self,
        column: &ColumnSettings,
    ) -> Result<Arc<rocksdb::BoundColumnFamily<'_>>> {
        if column.is_dropped() {
            return Err(Error::invalid(format!(
                "{} was dropped or migrated; register the state again for a new handle",
                column.cf_name
            )));
        }
        self.cf(&column.cf_name)
    }

    fn cf(&self, name: &str) -> Result<Arc<rocksdb::BoundColumnFamily<'_>>> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::Internal(format!("column family \"{name}\" is not open")))
    }

    fn fail(op: &str, column: &ColumnSettings) -> impl FnOnce(rocksdb::Error) -> Error {
        let context = format!("{op} on column family \"{}\"", column.cf_name);
        move |e| Error::engine(context, e)
    }

    /// Calls `f` with the stored bytes under `key`: the latest buffered write, copied, or
    /// the value RocksDB holds, without copying it.
    pub(crate) fn get_with<R>(
        &self,
        column: &ColumnSettings,
        key: &[u8],
        f: impl FnOnce(Option<&[u8]>) -> Result<R>,
    ) -> Result<R> {
        self.check_writes_applied()?;
        let cf = self.column_cf(column)?;
        let mut buffer = self.buffer.lock();
        // Again under the lock: an application that failed on another thread meanwhile
        // left the buffer empty, and RocksDB without those writes.
        self.check_writes_applied()?;
        match buffer.lookup(&column.cf_name, key) {
            Lookup::Absent => drop(buffer),
            Lookup::Value(value) => {
                // Copied so that `f` runs without the lock.
                let value = value.to_vec();
                drop(buffer);
                return f(Some(&value));
            }
            Lookup::Deleted => {
                drop(buffer);
                return f(None);
            }
            Lookup::Merged => {
                let mut buffer = buffer;
                self.apply_locked(&mut buffer)?;
            }
        }
        let pinned = self
            .db
            .get_pinned_cf_opt(&cf, key, &self.read_opts)
            .map_err(|e| Self::fail("get", column)(e))?;
        f(pinned.as_deref())
    }

    pub(crate) fn put(&self, column: &ColumnSettings, key: &[u8], value: &[u8]) -> Result<()> {
        self.point_write(column, key, PointWrite::Put(value))
    }

    pub(crate) fn merge(&self, column: &ColumnSettings, key: &[u8], operand: &[u8]) -> Result<()> {
        self.point_write(column, key, PointWrite::Merge(operand))
    }

    pub(crate) fn delete(&self, column: &ColumnSettings, key: &[u8]) -> Result<()> {
        self.point_write(column, key, PointWrite::Delete)
    }

    /// One write of `key`: into the buffer, or straight to RocksDB without one.
    fn point_write(
        &self,
        column: &ColumnSettings,
        key: &[u8],
        write: PointWrite<'_>,
    ) -> Result<()> {
        self.check_writes_applied()?;
        let cf = self.column_cf(column)?;
        if self.buffered_writes == 0 {
            let (op, done) = match write {
                PointWrite::Put(value) => {
                    ("put", self.db.put_cf_opt(&cf, key, value, &self.write_opts))
                }
                PointWrite::Merge(operand) => (
                    "merge",
                    self.db.merge_cf_opt(&cf, key, operand, &self.write_opts),
                ),
                PointWrite::Delete => ("delete", self.db.delete_cf_opt(&cf, key, &self.write_opts)),
            };
            return done.map_err(|e| Self::fail(op, column)(e));
        }
        let mut buffer = self.locked_buffer(column)?;
        if column.ttl_ms().is_some() {
            buffer.keep_none(&column.cf_name);
        }
        match write {
            PointWrite::Put(value) => buffer.put(&cf, &column.cf_name, key, value),
            PointWrite::Merge(operand) => buffer.merge(&cf, &column.cf_name, key, operand),
            PointWrite::Delete => buffer.delete(&cf, &column.cf_name, key),
        }
        self.apply_if_full(buffer)
    }

    /// The buffer, locked for a write to `column`: checked again under the lock, so that
    /// a write racing the state's [drop](crate::RocksStateBackend::drop_state) is either
    /// applied before its column family goes or refused (and a write racing a failed
    /// application of the buffer is refused, not lost).
    fn locked_buffer(
        &self,
        column: &ColumnSettings,
    ) -> Result<parking_lot::MutexGuard<'_, WriteBuffer>> {
        let buffer = self.buffer.lock();
        self.check_writes_applied()?;
        if column.is_dropped() {
            drop(buffer);
            // Reports the drop.
            self.column_cf(column)?;
            return Err(Error::Internal(format!("{} was dropped", column.cf_name)));
        }
        Ok(buffer)
    }

    fn apply_if_full(&self, mut buffer: parking_lot::MutexGuard<'_, WriteBuffer>) -> Result<()> {
        if buffer.is_full(self.buffered_writes) {
            self.apply_locked(&mut buffer)
        } else {
            Ok(())
        }
    }

    /// Applies the buffered writes to RocksDB in one batch. Called before anything reads
    /// RocksDB other than a point read, and by every change of column families or files.
    ///
    /// Errors: engine errors. The writes of a batch that RocksDB refused are lost, in
    /// whole or in part, after the calls that buffered them returned: the backend
    /// then refuses every later read, write and snapshot, and its directory is never
    /// marked clean, so the job restores from its last checkpoint.
    pub(crate) fn apply_buffered(&self) -> Result<()> {
        let buffer = self.buffer.lock();
        self.check_writes_applied()?;
        if buffer.is_empty() {
            return Ok(());
        }
        let mut buffer = buffer;
        self.apply_locked(&mut buffer)
    }

    /// Applies the buffered writes, then lets go of the values the buffer kept: RocksDB's
    /// data is about to change, or has just changed, without the buffer (ingestion, range
    /// deletions, raw writes). Called before such a change and again after it, as values
    /// written on another thread in between could be kept from before it.
    ///
    /// Errors: see [`apply_buffered`](Self::apply_buffered).
    pub(crate) fn apply_and_forget(&self) -> Result<()> {
        let mut buffer = self.buffer.lock();
        self.check_writes_applied()?;
        if !buffer.is_empty() {
            self.apply_locked(&mut buffer)?;
        }
        buffer.forget();
        Ok(())
    }

    /// Keeps the values of applied writes in the buffer's index, as a cache within
    /// `budget` (see [`WriteBuffer`]).
    pub(crate) fn keep_applied_values(&mut self, budget: Arc<ValueCacheBudget>) {
        self.buffer = Mutex::new(WriteBuffer::with_cache(budget));
    }

    /// Applies while holding the buffer's lock: a point read on another thread finds a
    /// write either still in the buffer or already in RocksDB, never in neither.
    fn apply_locked(&self, buffer: &mut WriteBuffer) -> Result<()> {
        let writes = buffer.len();
        let batch = buffer.take();
        #[cfg(feature = "testing")]
        if crate::testing::checks::writes_refused(&self.dir) {
            return Err(self.writes_lost(writes, Error::Internal("writes refused".into())));
        }
        self.db
            .write_opt(&batch, &self.buffer_write_opts)
            .map_err(|e| self.writes_lost(writes, Error::engine("apply buffered state writes", e)))
    }

    /// Records that `writes` buffered writes were lost to `error`, and returns it as
    /// `Internal`: whatever RocksDB's classification (an I/O error reads as "retry"),
    /// the backend is stopped for good.
    fn writes_lost(&self, writes: usize, error: Error) -> Error {
        let why = format!(
            "RocksDB refused {writes} buffered state writes ({}); they are lost, so this \
             backend refuses all further use: restore from the last checkpoint",
            error.report()
        );
        let lost = format!(
            "apply {writes} buffered state writes, now lost (restore from the last checkpoint)"
        );
        let error = match error {
            Error::Engine { source, .. } => Error::Engine {
                context: lost,
                kind: crate::error::ErrorKind::Internal,
                source,
            },
            other => Error::Internal(format!("{lost}: {}", other.report())),
        };
        self.writes_lost.store(true, Ordering::SeqCst);
        tracing::error!(dir = %self.dir.display(), "{why}");
        self.poisoned.lock().get_or_insert(why);
        error
    }

    /// Whether buffered writes were lost (see [`apply_buffered`](Self::apply_buffered)).
    pub(crate) fn has_lost_writes(&self) -> bool {
        self.writes_lost.load(Ordering::SeqCst)
    }

    /// Errors: `Internal` when buffered writes were lost (see
    /// [`apply_buffered`](Self::apply_buffered)).
    fn check_writes_applied(&self) -> Result<()> {
        if !self.writes_lost.load(Ordering::Relaxed) {
            return Ok(());
        }
        let why = self.poisoned.lock().clone().unwrap_or_default();
        Err(Error::Internal(format!(
            "buffered state writes of {} could not be applied and are lost; restore from the \
             last checkpoint ({why})",
            self.dir.display()
        )))
    }

    /// Applies puts (`Some(value)`) and deletes (`None`) atomically.
    pub(crate) fn write(
        &self,
        column: &ColumnSettings,
        ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        self.check_writes_applied()?;
        let cf = self.column_cf(column)?;
        let direct = |ops: Vec<(Vec<u8>, Option<Vec<u8>>)>| {
            let mut batch = WriteBatch::default();
            for (key, value) in ops {
                match value {
                    Some(value) => batch.put_cf(&cf, key, value),
                    None => batch.delete_cf(&cf, key),
                }
            }
            self.db
                .write_opt(&batch, &self.write_opts)
                .map_err(|e| Self::fail("write batch", column)(e))
        };
        if self.buffered_writes == 0 {
            return direct(ops);
        }
        let mut buffer = self.locked_buffer(column)?;
        if ops.len() >= self.buffered_writes {
            // A batch of a buffer's size or more goes to RocksDB as it is, after the
            // buffer (so in order), never into the buffer's index.
            if !buffer.is_empty() {
                self.apply_locked(&mut buffer)?;
            }
            // Under the lock, so that no value of these keys is kept from before them.
            buffer.forget_keys(&column.cf_name, ops.iter().map(|(key, _)| key.as_slice()));
            return direct(ops);
        }
        if column.ttl_ms().is_some() {
            buffer.keep_none(&column.cf_name);
        }
        // All into the buffer under one lock: the buffer is applied as one batch, so
        // these writes still land together or not at all.
        for (key, value) in ops {
            match value {
                Some(value) => buffer.put(&cf, &column.cf_name, &key, &value),
                None => buffer.delete(&cf, &column.cf_name, &key),
            }
        }
        self.apply_if_full(buffer)
    }

    /// Writes a record of the backend's own column family.
    pub(crate) fn put_meta(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.apply_buffered()?;
        let cf = self.cf(crate::engine::META_COLUMN)?;
        self.db
            .put_cf_opt(&cf, key, value, &self.write_opts)
            .map_err(|e| Error::engine("write backend record", e))
    }

    /// Removes a record of the meta column.
    pub(crate) fn delete_meta(&self, key: &[u8]) -> Result<()> {
        self.apply_buffered()?;
        let cf = self.cf(crate::engine::META_COLUMN)?;
        self.db
            .delete_cf_opt(&cf, key, &self.write_opts)
            .map_err(|e| Error::engine("delete backend record", e))
    }

    /// Scans `column` from `lower` (inclusive) to `upper` (exclusive; `None` = to the end).
    pub(crate) fn scan(
        &self,
        column: &ColumnSettings,
        lower: Vec<u8>,
        upper: Option<Vec<u8>>,
    ) -> Result<RawScan<'_>> {
        self.apply_buffered()?;
        let cf = self.column_cf(column)?;
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(lower.clone());
        if let Some(upper) = upper {
            opts.set_iterate_upper_bound(upper);
        }
        let mut iter = self.db.raw_iterator_cf_opt(&cf, opts);
        iter.seek(&lower);
        Ok(RawScan {
            iter,
            context: column.cf_name.clone(),
        })
    }

    /// Flushes every column family's memtable to SST files (atomically across families).
    pub(crate) fn flush(&self) -> Result<()> {
        self.apply_buffered()?;
        self.flush_with(false)
    }

    /// Flushes like [`flush`](Self::flush); with `allow_stall` it does not first wait
    /// until the new L0 files would not slow writes down (RocksDB's default wait lasts
    /// as long as compactions are behind, which after a burst of writes is seconds).
    fn flush_with(&self, allow_stall: bool) -> Result<()> {
        self.flush_all(true, allow_stall)
    }

    /// Flushes every column family atomically; without `wait` it returns once the
    /// memtables are sealed and the flush is scheduled.
    fn flush_all(&self, wait: bool, allow_stall: bool) -> Result<()> {
        let names: Vec<String> = self.db.cf_names();
        let handles: Vec<_> = names.iter().filter_map(|n| self.db.cf_handle(n)).collect();
        let refs: Vec<&_> = handles.iter().collect();
        let mut opts = FlushOptions::default();
        opts.set_wait(wait);
        opts.set_allow_write_stall(allow_stall);
        self.db
            .flush_cfs_opt(&refs, &opts)
            .map_err(|e| Error::engine(format!("flush of {}", self.dir.display()), e))
    }
}

/// Where an SST file came from, as RocksDB describes it: enough to recognise the same
/// file under another name after an ingestion.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct FileIdentity {
    pub column: String,
    pub size: usize,
    pub start_key: Option<Vec<u8>>,
    pub end_key: Option<Vec<u8>>,
    pub smallest_seqno: u64,
    pub largest_seqno: u64,
}

/// A live SST file of a database.
#[derive(Debug, Clone)]
pub(crate) struct SstFile {
    /// File name (`000012.sst`).
    pub name: String,
    pub level: i32,
    pub identity: FileIdentity,
}

pub(crate) fn live_sst_files(db: &Db) -> Result<Vec<SstFile>> {
    let files = db
        .live_files()
        .map_err(|e| Error::engine("list live files", e))?;
    Ok(files
        .into_iter()
        .map(|f| SstFile {
            name: f.name.trim_start_matches('/').to_string(),
            level: f.level,
            identity: FileIdentity {
                column: f.column_family_name,
                size: f.size,
                start_key: f.start_key,
                end_key: f.end_key,
                smallest_seqno: f.smallest_seqno,
                largest_seqno: f.largest_seqno,
            },
        })
        .collect())
}

impl BackendCore {
    /// Every registered state with its column, by name.
    pub(crate) fn state_columns(&self) -> Vec<(StateMeta, Arc<ColumnSettings>)> {
        self.states
            .lock()
            .values()
            .map(|e| (e.meta.clone(), e.column.clone()))
            .collect()
    }

    /// Turns automatic compactions of the state columns that `which` selects off until
    /// [`resume_compactions`](Self::resume_compactions): while a rescale builds a
    /// database, compactions would rewrite files that range deletions are about to make
    /// obsolete, and delay every step. (Every change of options rewrites RocksDB's
    /// options file.)
    pub(crate) fn pause_compactions_of(
        &self,
        which: impl Fn(&ColumnSettings) -> bool,
    ) -> Result<()> {
        for (_, column) in self.state_columns() {
            if !which(&column) {
                continue;
            }
            let cf = self.column_cf(&column)?;
            self.db
                .set_options_cf(&cf, &[("disable_auto_compactions", "true")])
                .map_err(Self::fail("pause compactions", &column))?;
            self.note_compactions_paused([column.cf_name.clone()]);
        }
        Ok(())
    }

    /// Lets the compactions a rescale paused run again, on a thread of its own, so the
    /// rescaled backend is usable at once: first a flush, so the first compactions see
    /// the range deletions and drop what they cover instead of rewriting it, then the
    /// change of options (each rewrites and syncs RocksDB's options file).
    ///
    /// It counts as a capture: a snapshot, a close and a drop wait for it, and the
    /// database is let go of before it counts as finished. Should it fail, the next
    /// snapshot resumes the compactions (or fails, saying why). Like a capture, it waits
    /// while captures are held (tests act in between).
    pub(crate) fn resume_compactions_in_background(self: &Arc<Self>) {
        let counted = self.captures.start();
        let core = self.clone();
        let spawned = std::thread::Builder::new()
            .name("rockstate-resume".into())
            .spawn(move || {
                // Declared after the count, so dropped before it even by a panic: the
                // database is let go of before the capture counts as finished.
                let counted = counted;
                let core = core;
                core.captures.wait_released();
                // Not `flush`: the buffered writes are the processing thread's to apply.
                if let Err(e) = core.flush_with(false) {
                    tracing::warn!(dir = %core.dir.display(), error = %e.report(), "cannot flush the range deletions of a rescale");
                }
                if let Err(e) = core.resume_compactions() {
                    tracing::warn!(dir = %core.dir.display(), error = %e.report(), "cannot resume compactions after a rescale; the next snapshot tries again");
                }
                drop(core);
                drop(counted);
            });
        if let Err(e) = spawned {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot start resuming compactions; the next snapshot resumes them");
        }
    }

    /// Records that the compactions of `columns` are paused until
    /// [`resume_compactions`](Self::resume_compactions) (a rescale opens its base so).
    pub(crate) fn note_compactions_paused(&self, columns: impl IntoIterator<Item = String>) {
        self.paused_columns.lock().extend(columns);
    }

    /// Resumes the compactions a rescale paused, if any are still paused: every column
    /// is tried, those that fail stay listed for the next call, and the first error is
    /// returned. It takes no lock but its own (a snapshot calls it holding the states
    /// lock, and waits for the background resumption, which must not wait for that lock).
    pub(crate) fn resume_compactions(&self) -> Result<()> {
        let mut paused = self.paused_columns.lock();
        let mut first = None;
        paused.retain(|name| {
            // A column dropped meanwhile has nothing to resume.
            let Some(cf) = self.db.cf_handle(name) else {
                return false;
            };
            let context = format!("resume compactions of {name}");
            #[cfg(feature = "testing")]
            let refused = crate::testing::checks::compaction_resumes_refused(&self.dir);
            #[cfg(not(feature = "testing"))]
            let refused = false;
            let resumed = if refused {
                Err(Error::Internal(format!("{context}: refused")))
            } else {
                self.db
                    .set_options_cf(&cf, &[("disable_auto_compactions", "false")])
                    .map_err(|e| Error::engine(context, e))
            };
            match resumed {
                Ok(()) => false,
                Err(e) => {
                    first.get_or_insert(e);
                    true
                }
            }
        });
        first.map_or(Ok(()), Err)
    }

    /// Writes raw entries (full RocksDB keys) in one batch.
    pub(crate) fn put_raw(
        &self,
        entries: &[(Arc<ColumnSettings>, Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        self.apply_and_forget()?;
        if entries.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for (column, key, value) in entries {
            let cf = self.column_cf(column)?;
            batch.put_cf(&cf, key, value);
        }
        let written = self
            .db
            .write_opt(&batch, &self.write_opts)
            .map_err(|e| Error::engine("write restored entries", e));
        // Also after a failure: part of the batch may have landed.
        written.and(self.apply_and_forget())
    }

    /// Deletes every entry of every state whose key group is outside `range`. Below and
    /// above the range, the span `[first, last]` of the keys present is what goes: the
    /// files of levels 1 and below that lie within it are dropped whole (no compaction
    /// rewrites them later), then a range deletion `[first, last + 0)` covers the rest.
    /// Returns how many files of the states were dropped whole. Only for a database no
    /// reader uses yet (a rescale's base before it is handed out): between the two steps
    /// a reader could see values the dropped files had hidden.
    pub(crate) fn delete_outside(&self, range: KeyGroupRange) -> Result<usize> {
        let state_files = |core: &Self| -> Result<usize> {
            Ok(core
                .live_files()?
                .iter()
                .filter(|f| f.identity.column.starts_with(super::STATE_COLUMN_PREFIX))
                .count())
        };
        let before = state_files(self)?;
        // Files go: a capture in flight must not take this layout for the one it saw.
        self.layout_changed()?;
        let low = crate::codec::key_group_prefix(range.start()).to_vec();
        let high = crate::codec::prefix_successor(&crate::codec::key_group_prefix(range.end()));
        let deleted = self.delete_spans_outside(range, &low, high.as_deref());
        // Also after a failure: some columns may have changed.
        deleted.and(self.apply_and_forget())?;
        Ok(before.saturating_sub(state_files(self)?))
    }

    /// The deletions of [`delete_outside`](Self::delete_outside), below `low` and from
    /// `high` on.
    fn delete_spans_outside(
        &self,
        range: KeyGroupRange,
        low: &[u8],
        high: Option<&[u8]>,
    ) -> Result<()> {
        for (_, column) in self.state_columns() {
            let mut spans = Vec::new();
            if range.start() > 0 {
                spans.extend(self.extent(&column, None, Some(low))?);
            }
            if let Some(high) = high {
                spans.extend(self.extent(&column, Some(high), None)?);
            }
            let cf = self.column_cf(&column)?;
            for (first, last) in spans {
                // RocksDB drops the files whose keys (their deletions' too) all lie in
                // [first, last]. Values they hid lie in the same bounds, so the range
                // deletion that follows, with a newer sequence number, covers them.
                self.db
                    .delete_file_in_range_cf(&cf, &first, &last)
                    .map_err(Self::fail("delete files in range", &column))?;
                // Bounded by the data present: no tombstone over key groups this database
                // never held, so a later rescale can still ingest other subtasks' files
                // beside it.
                let mut end = last;
                end.push(0);
                self.db
                    .delete_range_cf_opt(&cf, first, end, &self.write_opts)
                    .map_err(Self::fail("delete range", &column))?;
            }
        }
        Ok(())
    }

    /// The first and the last key present in `column` between `lower` (inclusive) and
    /// `upper` (exclusive); `None` when there are none.
    fn extent(
        &self,
        column: &ColumnSettings,
        lower: Option<&[u8]>,
        upper: Option<&[u8]>,
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let cf = self.column_cf(column)?;
        let mut opts = ReadOptions::default();
        if let Some(lower) = lower {
            opts.set_iterate_lower_bound(lower.to_vec());
        }
        if let Some(upper) = upper {
            opts.set_iterate_upper_bound(upper.to_vec());
        }
        let mut iter = self.db.raw_iterator_cf_opt(&cf, opts);
        let fail = |e| Self::fail("scan", column)(e);
        iter.seek_to_first();
        iter.status().map_err(fail)?;
        let Some(first) = iter.key().map(<[u8]>::to_vec) else {
            return Ok(None);
        };
        iter.seek_to_last();
        iter.status().map_err(fail)?;
        let Some(last) = iter.key() else {
            return Ok(None);
        };
        Ok(Some((first, last.to_vec())))
    }

    /// Counts the visible entries of every state outside `range`.
    pub(crate) fn count_outside(&self, range: KeyGroupRange) -> Result<u64> {
        self.apply_buffered()?;
        let low = crate::codec::key_group_prefix(range.start()).to_vec();
        let high = crate::codec::prefix_successor(&crate::codec::key_group_prefix(range.end()));
        let mut count = 0;
        for (_, column) in self.state_columns() {
            let mut bounds = vec![(Vec::new(), Some(low.clone()))];
            if let Some(high) = &high {
                bounds.push((high.clone(), None));
            }
            for (lower, upper) in bounds {
                let mut scan = self.scan(&column, lower, upper)?;
                while scan.current()?.is_some() {
                    count += 1;
                    scan.advance();
                }
            }
        }
        Ok(count)
    }

    /// Deletes every entry of every state whose key group is inside `range`.
    pub(crate) fn delete_inside(&self, range: KeyGroupRange) -> Result<()> {
        self.apply_and_forget()?;
        let low = crate::codec::key_group_prefix(range.start()).to_vec();
        let high = crate::codec::prefix_successor(&crate::codec::key_group_prefix(range.end()))
            .unwrap_or_else(|| vec![0xff; 3]);
        let deleted = self
            .state_columns()
            .into_iter()
            .try_for_each(|(_, column)| {
                let cf = self.column_cf(&column)?;
                self.db
                    .delete_range_cf_opt(&cf, &low, &high, &self.write_opts)
                    .map_err(Self::fail("delete range", &column))
            });
        // Also after a failure: some columns may have changed.
        deleted.and(self.apply_and_forget())
    }

    /// Ingests SST files written by another rockstate database into `column`, keeping
    /// their sequence numbers. `files` must be ordered oldest data first (deepest level
    /// first) and must not overlap the column's existing keys. The files are hard-linked,
    /// so the source directory stays whole (a fallback can still read it).
    pub(crate) fn ingest_db_files(&self, column: &ColumnSettings, files: &[PathBuf]) -> Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        self.layout_changed()?;
        let cf = self.column_cf(column)?;
        #[cfg(feature = "testing")]
        if crate::testing::checks::ingestion_refused(&self.dir) {
            return Err(Error::Internal(format!(
                "ingest files into {}: refused",
                column.cf_name
            )));
        }
        let mut opts = rocksdb::IngestExternalFileOptions::default();
        opts.set_allow_db_generated_files(true);
        opts.set_link_files(true);
        opts.set_snapshot_consistency(false);
        self.db
            .ingest_external_file_cf_opts(&cf, &opts, files.to_vec())
            .map_err(Self::fail("ingest files", column))
            // Also after a failure, which may come after the files went in.
            .and(self.apply_and_forget())
    }

    /// The live SST files.
    pub(crate) fn live_files(&self) -> Result<Vec<SstFile>> {
        live_sst_files(&self.db)
    }
}

impl BackendCore {
    /// Flushes every column family and hard-links a consistent copy of the database into
    /// `target`, which must not exist. Writes must not run concurrently (the runtime's
    /// processing thread takes the snapshot).
    ///
    /// This is the synchronous part of a snapshot, so it must not wait for compactions:
    /// the flush is made without waiting for write stalls to clear (later writes are
    /// slowed down instead, RocksDB's own back pressure), and the checkpoint is then
    /// taken without a second flush (the memtables are empty; without a write-ahead log
    /// there is nothing else to capture).
    pub(crate) fn checkpoint_into(&self, target: &Path) -> Result<()> {
        self.apply_buffered()?;
        self.flush_with(true)?;
        self.link_checkpoint(target)
    }

    /// Hard-links the database's current files into `target` without flushing (without
    /// a write-ahead log, what the memtables hold is left out).
    fn link_checkpoint(&self, target: &Path) -> Result<()> {
        let checkpoint = rocksdb::checkpoint::Checkpoint::new(&self.db)
            .map_err(|e| Error::engine("prepare checkpoint", e))?;
        checkpoint
            .create_checkpoint_with_log_size(target, u64::MAX)
            .map_err(|e| Error::engine(format!("checkpoint into {}", target.display()), e))
    }

    /// Makes the next snapshot flush in its synchronous phase.
    pub(crate) fn flush_later_in_sync(&self) {
        self.flush_in_sync.store(true, Ordering::SeqCst);
    }

    /// Whether the next snapshot must flush in its synchronous phase (a capture was
    /// refused); reading it clears it.
    pub(crate) fn take_flush_in_sync(&self) -> bool {
        self.flush_in_sync.swap(false, Ordering::SeqCst)
    }

    /// The synchronous part of a snapshot that does not wait for its flush: takes the
    /// [`Cut`] and seals the memtables (every column family, atomically), whose flush
    /// then runs in the background. Writes must not run concurrently, as for
    /// [`checkpoint_into`](Self::checkpoint_into).
    pub(crate) fn begin_checkpoint(&self) -> Result<Cut> {
        self.apply_buffered()?;
        let cut = Cut {
            seqno: self.db.latest_sequence_number(),
            layout: self.layout.load(Ordering::SeqCst),
            errors: self.background_errors()?,
        };
        self.flush_all(false, true)?;
        Ok(cut)
    }

    /// Background errors so far: RocksDB's count plus the reports of the listener (a
    /// database whose background work stopped before the cut rejects flushes without
    /// counting them).
    fn background_errors(&self) -> Result<u64> {
        let counted = self
            .db
            .property_int_value("rocksdb.background-errors")
            .map_err(|e| Error::engine("read the background error count", e))?
            .unwrap_or(0);
        Ok(counted.saturating_add(self.seals.errors.load(Ordering::SeqCst)))
    }

    /// Whether sealed memtables are still waiting to be flushed, in any column family.
    ///
    /// Errors: `Busy` when RocksDB met a background error since `cut` (the flush may
    /// never finish); engine errors.
    pub(crate) fn flush_pending(&self, cut: &Cut) -> Result<bool> {
        // Refused already: no need to wait for the flush.
        self.check_cut(cut)?;
        if self.background_errors()? > cut.errors {
            self.flush_in_sync.store(true, Ordering::SeqCst);
            return Err(Error::Busy(format!(
                "RocksDB in {} met a background error while the snapshot's flush was under way",
                self.dir.display()
            )));
        }
        for name in self.db.cf_names() {
            let Some(cf) = self.db.cf_handle(&name) else {
                continue;
            };
            let immutable = self
                .db
                .property_int_value_cf(&cf, "rocksdb.num-immutable-mem-table")
                .map_err(|e| Error::engine("read the memtable count", e))?;
            if immutable.unwrap_or(0) > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Hard-links the files of `cut` into `target` once its flush is done (see
    /// [`flush_pending`](Self::flush_pending)), and checks that they hold nothing written
    /// after it.
    ///
    /// Errors: `Busy` (retryable) when data written after the cut may have reached the
    /// files; the next snapshot then flushes in its synchronous phase. Engine and local
    /// I/O errors.
    pub(crate) fn capture_into(&self, cut: Cut, target: &Path) -> Result<()> {
        self.captures.wait_released();
        self.link_checkpoint(target)?;
        // Checked after the links: a memtable sealed after them is not in them.
        self.check_cut(&cut)
    }

    /// Refuses `cut` when data written after it may have reached SST files: a memtable
    /// sealed with a first sequence number above it, or a change of column families,
    /// settings or files.
    fn check_cut(&self, cut: &Cut) -> Result<()> {
        let sealed = self.seals.max_first_seqno();
        let layout = self.layout.load(Ordering::SeqCst);
        if sealed > cut.seqno || layout != cut.layout {
            self.flush_in_sync.store(true, Ordering::SeqCst);
            return Err(Error::Busy(format!(
                "the state of {} moved on before snapshot files could be taken (a memtable \
                 sealed at sequence {sealed} after the cut at {}, or states or files \
                 changed); the next snapshot flushes before it resumes processing",
                self.dir.display(),
                cut.seqno
            )));
        }
        Ok(())
    }
}

impl Drop for BackendCore {
    /// Flushes, makes every file durable, then marks the directory as closed cleanly
    /// (a [scratch](BackendCore::mark_scratch) copy is closed as it is).
    /// When the flush fails the mark is not written, and reopening the directory is
    /// refused (restore instead).
    fn drop(&mut self) {
        if self.scratch.load(Ordering::SeqCst) {
            #[cfg(feature = "testing")]
            crate::testing::checks::scratch_closed(&self.dir);
            return;
        }
        if let Some(why) = self.poisoned.lock().as_ref() {
            tracing::error!(dir = %self.dir.display(), reason = %why, "the local state is not marked clean; it will not reopen");
            return;
        }
        // Without a write-ahead log, unflushed writes would be lost on reopen.
        match self.flush() {
            Ok(()) => {
                // Restored files are not synced when they are fetched (scratch space);
                // a directory marked clean must survive a machine crash as it is.
                let marker = self.dir.join(crate::engine::CLEAN_MARKER);
                let marked = sync_files(&self.dir)
                    .and_then(|()| std::fs::File::create(&marker)?.sync_all())
                    .and_then(|()| std::fs::File::open(&self.dir)?.sync_all());
                if let Err(e) = marked {
                    tracing::error!(file = %marker.display(), error = %e, "cannot mark clean close");
                }
            }
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e.report(), "flush on close failed; the directory will not reopen");
            }
        }
    }
}

/// Syncs every regular file directly inside `dir` to disk (files that RocksDB removes
/// meanwhile are skipped).
fn sync_files(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        match std::fs::File::open(entry.path()).and_then(|f| f.sync_all()) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

/// A bounded forward scan over raw RocksDB entries.
pub(crate) struct RawScan<'a> {
    iter: DBRawIteratorWithThreadMode<'a, Db>,
    context: String,
}

impl RawScan<'_> {
    /// The entry under the cursor, `None` at the end. Engine errors surface here.
    pub(crate) fn current(&self) -> Result<Option<(&[u8], &[u8])>> {
        if self.iter.valid() {
            return Ok(self.iter.item());
        }
        self.iter
            .status()
            .map_err(|e| Error::engine(format!("scan of column family \"{}\"", self.context), e))?;
        Ok(None)
    }

    pub(crate) fn advance(&mut self) {
        if self.iter.valid() {
            self.iter.next();
        }
    }

    pub(crate) fn seek(&mut self, key: &[u8]) {
        self.iter.seek(key);
    }
}
