//! Settings of a backend and the memory resources backends of one process can share.

use std::path::PathBuf;
use std::sync::Arc;

use crate::engine::buffer::ValueCacheBudget;
use crate::error::{Error, Result};
use crate::keygroup::{self, KeyGroupRange};

/// Default memory budget of a backend that is not given [`SharedResources`]: 128 MiB.
pub const DEFAULT_MEMORY_BUDGET: usize = 128 << 20;

/// The values kept after writing them take one part in this many of a memory budget.
const VALUE_CACHE_SHARE: usize = 4;

/// Settings of one [`RocksStateBackend`](crate::RocksStateBackend) (one subtask).
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Local directory of the subtask's RocksDB instance. Created when missing. Reopening a
    /// directory requires the same `max_parallelism` and `key_group_range`.
    pub local_dir: PathBuf,
    /// Key groups this subtask owns; keys outside it are rejected.
    pub key_group_range: KeyGroupRange,
    /// Number of key groups of the job (1..=32768); fixed for the life of the state.
    pub max_parallelism: u32,
    /// Bytes for the block cache and write buffers together when the backend creates its
    /// own [`SharedResources`]. Ignored when resources are passed to the builder.
    pub memory_budget: usize,
    /// RocksDB background threads for flushes and compactions (default 2).
    pub background_jobs: i32,
    /// Incremental snapshots (default): upload only SST files that the last confirmed
    /// checkpoint did not already store. `false` uploads every file on every snapshot.
    pub incremental: bool,
    /// Set by a runtime that applies records in key order within each key group, or close
    /// to it (the harness sorts each batch by key group and encoded key, the timely
    /// adapter each epoch's records by key): memtable inserts then start their search
    /// where the last insert of the same key group landed (the demo job: 1.01-1.04x the events/s through the harness, about 1.1x
    /// through timely). Off by default: the gain was measured only where records arrive
    /// sorted, and the remembered positions take memtable space (about 300 bytes per key
    /// group written to a memtable; kept only while that is at most 1/32 of a write
    /// buffer). Only the search changes, never what is stored.
    pub writes_in_key_order: bool,
    /// Keeps RocksDB's statistics counters, which
    /// [`record_metrics`](crate::RocksStateBackend::record_metrics) reports as block cache
    /// hits and misses and stall time. Off by default: RocksDB updates its counters on
    /// every read and write whether or not anyone reads them, which cost the demo job
    /// about 4% of its events/s. The gauges (memtable and cache sizes, pending
    /// compaction, stopped writes) are read from properties and reported either way.
    pub statistics: bool,
    /// Point writes the backend holds in memory before it applies them to RocksDB in one
    /// batch (default [`DEFAULT_BUFFERED_WRITES`]); 0 applies each write at once. Point
    /// writes are puts, deletes, list appends, map batches (`put_all`, `clear`) of fewer
    /// entries than this count (larger ones are written at once, after the buffer) and
    /// the renewals of values read with a time to live. The buffer is also applied once its
    /// keys and values reach 1 MiB (about twice that in memory, with its index), and
    /// before anything reads RocksDB other than a point read: scans and iteration,
    /// snapshots, flushes, registering or dropping a state, closing. Reads always see
    /// every write made before them. RocksDB's own figures (memtable size, estimated
    /// keys in the metrics) count the writes once they are applied.
    ///
    /// Each RocksDB write costs a fixed amount beside its memtable insert (its own batch,
    /// a turn in the write queue, the stall checks); in batches that cost is paid once:
    /// the demo job ran at 1.11x the events/s at parallelism 2 (2 000 000 events over
    /// 100 000 keys, medians of three runs) and 1.02-1.33x at parallelism 1 (four pairs of
    /// runs, on a machine whose speed varied).
    ///
    /// The values written stay in the buffer's index once applied, as a cache of what
    /// RocksDB holds: a point read of a key written recently (a read-modify-write job's
    /// hot keys) is answered from memory. The caches of the backends sharing one
    /// [`SharedResources`] share a quarter of its budget, taken from the block cache as
    /// they grow ([`SharedResources::value_cache_usage`] reports it): over it, a backend
    /// holding more than an even share lets go, at its next round of writes, of the
    /// values of its states whose values answered the fewest reads first; a state whose
    /// values answered fewer than half of its reads keeps none for a while (longer each
    /// time), and so does one whose values, once they fill a quarter of the backend's
    /// even share, answered fewer than a tenth of its reads (with keys read at random,
    /// evenly, about when they would answer fewer than half with the share full), so
    /// state larger than memory costs little: 0.98-1.03x in the demo runs below
    /// ([`value_cache_stats`](crate::RocksStateBackend::value_cache_stats) counts the
    /// reads, those answered, the evictions and the pauses). States with a time to live
    /// keep none (RocksDB's compactions remove their expired values). Anything that changes
    /// stored values without the buffer (a restore's ingestion, a rescale's deletions, a
    /// migration, registering or dropping a state, a map batch of a buffer's size or
    /// more) lets them go. The demo job (`rockstate demo`, runs of each build in turn) ran
    /// at 1.42x and 1.67x the events/s of the buffer alone with 10 000 keys at parallelism
    /// 1, 1.17x and 1.50x at parallelism 2, and 1.11x and 1.07x with 100 000 keys at
    /// parallelism 1 and 2. With state larger than memory, at parallelism 2: 0.98-1.01x
    /// with 300 000 keys (3 000 000 events, three pairs of runs) and 1.00x and 1.03x
    /// with 1 000 000 keys (two pairs); before states were judged at a quarter of the
    /// share, 0.88-0.95x (ten pairs) and 0.92-1.00x (six pairs with the builds before).
    /// A state not read yet is judged only when the budget is full.
    ///
    /// What changes: a write RocksDB refuses (after a background error, when the disk is
    /// full) is reported by the call that applies the buffer (a later write, a read of a
    /// list with an append still buffered, a scan, a registration, the next snapshot or
    /// the close), not by the write itself, whose call returned. Those writes are lost,
    /// so the backend then refuses every later read, write, scan and snapshot
    /// ([`has_lost_writes`](crate::RocksStateBackend::has_lost_writes) says so), and is
    /// not marked clean when it closes: the job restores from its last checkpoint. The
    /// error's kind is `Internal` whatever RocksDB's was: retrying cannot help. (Without
    /// the buffer, a refused write fails only its own call.)
    pub buffered_writes: usize,
}

/// Default of [`BackendOptions::buffered_writes`].
pub const DEFAULT_BUFFERED_WRITES: usize = 256;

impl BackendOptions {
    /// Options for a subtask owning `key_group_range` of `max_parallelism` key groups,
    /// in `local_dir`, with the default memory budget.
    pub fn new(
        local_dir: impl Into<PathBuf>,
        key_group_range: KeyGroupRange,
        max_parallelism: u32,
    ) -> Self {
        Self {
            local_dir: local_dir.into(),
            key_group_range,
            max_parallelism,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            background_jobs: 2,
            incremental: true,
            writes_in_key_order: false,
            statistics: false,
            buffered_writes: DEFAULT_BUFFERED_WRITES,
        }
    }

    /// Options for subtask `subtask` of `parallelism` with `max_parallelism` key groups.
    pub fn for_subtask(
        local_dir: impl Into<PathBuf>,
        subtask: u32,
        parallelism: u32,
        max_parallelism: u32,
    ) -> Result<Self> {
        let range = keygroup::key_group_range_for_subtask(subtask, parallelism, max_parallelism)?;
        Ok(Self::new(local_dir, range, max_parallelism))
    }

    /// Where snapshots are staged (hard links, so on the same file system): a sibling of
    /// `local_dir` named `<local_dir>.snapshots`.
    pub fn staging_dir(&self) -> PathBuf {
        let mut name = self
            .local_dir
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "rockstate".into());
        name.push(".snapshots");
        self.local_dir.with_file_name(name)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.local_dir.file_name().is_none() {
            return Err(Error::invalid(format!(
                "local dir {} must name a directory",
                self.local_dir.display()
            )));
        }
        keygroup::validate_max_parallelism(self.max_parallelism)?;
        if !self.key_group_range.fits(self.max_parallelism) {
            return Err(Error::invalid(format!(
                "key group range {} does not fit max parallelism {}",
                self.key_group_range, self.max_parallelism
            )));
        }
        if self.memory_budget < (4 << 20) {
            return Err(Error::invalid(format!(
                "memory budget {} bytes is below the 4 MiB minimum",
                self.memory_budget
            )));
        }
        if !(1..=64).contains(&self.background_jobs) {
            return Err(Error::invalid(format!(
                "background jobs {} outside 1..=64",
                self.background_jobs
            )));
        }
        Ok(())
    }
}

/// A block cache and a write-buffer budget that several backends of one process share, so
/// that memory is budgeted per process rather than per subtask.
///
/// Write buffers are charged to the cache, so one `budget` covers both, and the values
/// the backends keep in memory after writing them (a quarter of the budget, taken from
/// the cache: see [`BackendOptions::buffered_writes`]). It is a soft limit: the cache may
/// briefly exceed it under pinned blocks, the kept values by one round of buffered
/// writes per backend, and writers are not stalled (memtables are flushed instead).
#[derive(Clone)]
pub struct SharedResources {
    pub(crate) cache: rocksdb::Cache,
    pub(crate) write_buffers: rocksdb::WriteBufferManager,
    pub(crate) values: Arc<ValueCacheBudget>,
    pub(crate) budget: usize,
}

impl std::fmt::Debug for SharedResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedResources")
            .field("budget", &self.budget)
            .finish()
    }
}

impl SharedResources {
    /// Resources bounded by `budget` bytes: a quarter for the values kept after writing
    /// them, the rest for the block cache, half of the budget of which may hold write
    /// buffers.
    ///
    /// Errors: `InvalidArgument` below 4 MiB.
    pub fn new(budget: usize) -> Result<Self> {
        if budget < (4 << 20) {
            return Err(Error::invalid(format!(
                "memory budget {budget} bytes is below the 4 MiB minimum"
            )));
        }
        // A hyper clock cache (sized automatically, entry charge 0): its lookups take no
        // shard lock. Every point read that misses the memtables looks up cached blocks
        // of each table file it probes; with the LRU cache those lookups and their
        // mutexes were about 6% of the demo job's time, and the job ran 7-9% faster with
        // this cache at parallelism 1 and 2 (`rockstate demo`, 2 000 000 events,
        // alternating runs). Write buffers are charged to it as to the LRU cache.
        let cache = rocksdb::Cache::new_hyper_clock_cache(budget, 0);
        let write_buffers = rocksdb::WriteBufferManager::new_write_buffer_manager_with_cache(
            budget / 2,
            false,
            cache.clone(),
        );
        let values = Arc::new(ValueCacheBudget::within(
            budget / VALUE_CACHE_SHARE,
            cache.clone(),
            budget,
        ));
        Ok(Self {
            cache,
            write_buffers,
            values,
            budget,
        })
    }

    /// The total budget in bytes.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Bytes currently held by the block cache (including charged write buffers).
    pub fn cache_usage(&self) -> usize {
        self.cache.get_usage()
    }

    /// Bytes of state values the backends sharing these resources keep in memory after
    /// writing them, and the size they are kept within (a quarter of the budget).
    pub fn value_cache_usage(&self) -> (usize, usize) {
        (self.values.used(), self.values.limit())
    }

    /// Bytes of memtables, of every backend sharing these resources, that the write
    /// buffers hold now (sealed ones waiting for their flush included), and the size they
    /// are kept within (half the budget).
    pub fn write_buffer_usage(&self) -> (usize, usize) {
        (
            self.write_buffers.get_usage(),
            self.write_buffers.get_buffer_size(),
        )
    }

    /// Whether a write could make RocksDB seal a memtable to keep the write buffers
    /// within their size, whatever the backend writing: their usage is at half their
    /// size or more. (RocksDB seals once the memtables not yet sealed pass 7/8 of the
    /// size, or the whole usage passes the size with half of it not yet sealed.)
    pub(crate) fn write_buffers_pressed(&self) -> bool {
        let (usage, size) = self.write_buffer_usage();
        size > 0 && usage.saturating_mul(2) >= size
    }

    /// Per-column-family write buffer size that suits the budget.
    pub(crate) fn write_buffer_size(&self) -> usize {
        (self.budget / 8).clamp(1 << 20, 64 << 20)
    }
}
