//! Writes held in memory and applied to RocksDB together, as one write batch.
//!
//! Every RocksDB write, whatever its size, pays a fixed cost beside its memtable insert: a
//! write batch of its own, a turn in the write queue, the checks of write stalls. A state
//! write is small (a value of a few bytes), so that cost was about a third of each put in
//! a profile of the demo job. The backend therefore keeps its point writes (puts, deletes,
//! list appends) in a [`WriteBuffer`] and applies them in one batch once it holds
//! [`BackendOptions::buffered_writes`](crate::BackendOptions::buffered_writes) writes or
//! [`MAX_BUFFERED_BYTES`], and before anything reads RocksDB other than a point read
//! (scans, snapshots, flushes, changes of column families, ingestion, close).
//!
//! A point read looks in the buffer first: the value written last, or a delete, answers it
//! there; a key with a list append still buffered has the buffer applied first, so that
//! RocksDB merges it. Reads therefore always see every write made before them.
//!
//! Values stay in the index after their batch is applied, as a cache of what RocksDB now
//! holds, within a memory budget that every backend sharing one
//! [`SharedResources`](crate::SharedResources) shares ([`ValueCacheBudget`]). A
//! read-modify-write job (read a key's state, write it back) then reads most of its keys
//! from there instead of searching memtables and table files. The cache is only right
//! while every change of a state's data goes through the buffer: everything that
//! changes RocksDB another way (ingestion, range deletions, raw or large batched writes,
//! column family changes) makes the backend [forget](WriteBuffer::forget) it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;

use rocksdb::{AsColumnFamilyRef, WriteBatch};

/// The most key and value bytes a buffer holds before it is applied, whatever its count
/// of writes: a large value is not held back in memory for long.
pub(crate) const MAX_BUFFERED_BYTES: usize = 1 << 20;

/// The most index entries per column family kept allocated between rounds of a buffer
/// that keeps no values once applied.
const MAX_KEPT_SLOTS: usize = 16_384;

/// Bytes counted per index entry beside its key and value: its slot in the table (with
/// the table's spare room) and the rounding of its two allocations.
const ENTRY_OVERHEAD: usize = 80;

/// Rounds of writes (each applied as one batch) during which a column whose values were
/// let go while mostly missed keeps none, before it tries again; twice as many after each
/// such eviction in a row, up to 64 times as many.
const PAUSED_ROUNDS: u32 = 1_024;

/// The memory the value caches of every backend sharing one
/// [`SharedResources`](crate::SharedResources) may hold together. A buffer counts its
/// entries after each application and, while the total is over the limit and its own
/// part over an even share, lets go of its columns' values, those that answered the
/// fewest reads first; the total may pass the limit by one round of writes per backend.
/// A column whose values fill a quarter of the even share while answering fewer than a
/// tenth of its reads is let go earlier (see [`WriteBuffer::take`]).
///
/// The values kept are taken from the block cache as they grow: its capacity is the
/// memory budget less what they hold (to within [`RESIZE_STEP`]), so a state too large
/// for them to help leaves the block cache its whole budget.
pub(crate) struct ValueCacheBudget {
    limit: usize,
    used: AtomicUsize,
    /// Buffers sharing it.
    users: AtomicUsize,
    /// The block cache and the budget it shares with the values kept.
    block_cache: Option<(rocksdb::Cache, usize)>,
    /// `used` when the block cache's capacity was last set.
    resized_at: parking_lot::Mutex<usize>,
}

impl std::fmt::Debug for ValueCacheBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValueCacheBudget")
            .field("limit", &self.limit)
            .field("used", &self.used())
            .finish()
    }
}

/// How far the values kept may move before the block cache's capacity follows them.
const RESIZE_STEP: usize = 1 << 20;

impl ValueCacheBudget {
    /// A budget of `limit` bytes on its own (the block cache does not give way).
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
            users: AtomicUsize::new(0),
            block_cache: None,
            resized_at: parking_lot::Mutex::new(0),
        }
    }

    /// A budget of `limit` bytes taken, as it is used, from `block_cache`, which shares
    /// `total` bytes with it.
    pub(crate) fn within(limit: usize, block_cache: rocksdb::Cache, total: usize) -> Self {
        Self {
            block_cache: Some((block_cache, total)),
            ..Self::new(limit)
        }
    }

    /// Gives the block cache what the values kept do not use.
    fn resize_block_cache(&self) {
        let Some((cache, total)) = &self.block_cache else {
            return;
        };
        // Read and set under one lock, so that capacities are set in the order of the
        // usage they follow.
        let mut at = self.resized_at.lock();
        let used = self.used().min(self.limit);
        if used.abs_diff(*at) < RESIZE_STEP {
            return;
        }
        *at = used;
        cache.clone().set_capacity(total - used);
    }

    /// Bytes the caches hold now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes the caches are kept within.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

/// What a backend's point reads found in memory (its buffered writes and the values it
/// keeps once applied, see [`BackendOptions::buffered_writes`]), counted since the
/// backend was opened; from [`RocksStateBackend::value_cache_stats`].
///
/// [`BackendOptions::buffered_writes`]: crate::BackendOptions::buffered_writes
/// [`RocksStateBackend::value_cache_stats`]: crate::RocksStateBackend::value_cache_stats
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ValueCacheStats {
    /// Point reads of stored values: a value, a list, a map entry, a reduced or
    /// aggregated value (counted also with `buffered_writes` at 0).
    pub lookups: u64,
    /// Of those, the reads answered from memory without RocksDB, by a write not yet
    /// applied or a value kept (a value, or that the key was deleted).
    pub hits: u64,
    /// Times a state's kept values were let go: to stay within the budget, or because
    /// they answered too few of its reads. Letting go of every value because the stored
    /// data changed without the buffer (a restore's ingestion, registering a state, and
    /// the like) is not counted.
    pub evictions: u64,
    /// Of those, the evictions after which the state keeps none for a while: its values
    /// answered fewer than half of its reads, or fewer than a tenth once they filled a
    /// quarter of the backend's even share of the budget (a key space larger than
    /// memory holds, where keeping them costs more than it saves).
    pub pauses: u64,
    /// Bytes counted for the values kept now.
    pub bytes: u64,
}

impl ValueCacheStats {
    /// The part of the point reads answered from memory (0 without reads).
    pub fn hit_ratio(&self) -> f64 {
        if self.lookups == 0 {
            0.0
        } else {
            self.hits as f64 / self.lookups as f64
        }
    }
}

/// What the buffer knows about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    /// Written with this value.
    Value(Vec<u8>),
    /// Deleted.
    Deleted,
    /// A list append is buffered: only RocksDB's merge gives the value.
    Merged,
}

impl Slot {
    /// The bytes counted for an entry of `key_len` key bytes holding this slot.
    fn charge(&self, key_len: usize) -> usize {
        let value = match self {
            Slot::Value(value) => value.len(),
            Slot::Deleted | Slot::Merged => 0,
        };
        key_len + value + ENTRY_OVERHEAD
    }
}

/// The answer of [`WriteBuffer::lookup`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup<'a> {
    /// The buffer holds the key's latest value.
    Value(&'a [u8]),
    /// The key's latest write deleted it.
    Deleted,
    /// The key has an append that RocksDB must merge: apply the buffer, then read.
    Merged,
    /// The buffer holds no write of the key: read RocksDB.
    Absent,
}

/// The index of one column family.
struct Column {
    name: String,
    slots: HashMap<Vec<u8>, Slot>,
    /// Bytes counted for its entries.
    bytes: usize,
    /// Point reads of the column, and those the index answered, since its values were
    /// last let go.
    lookups: u64,
    hits: u64,
    /// Rounds left during which it keeps no values once applied (see [`PAUSED_ROUNDS`]).
    paused: u32,
    /// Evictions in a row of values that were mostly missed.
    strikes: u32,
    /// Keeps no values once applied: a state with a time to live, whose values RocksDB's
    /// compactions remove without the buffer (see [`WriteBuffer::keep_none`]).
    volatile: bool,
}

impl Column {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            slots: HashMap::default(),
            bytes: 0,
            lookups: 0,
            hits: 0,
            paused: 0,
            strikes: 0,
            volatile: false,
        }
    }

    /// Lets go of every entry (and of a table grown large).
    fn clear(&mut self) {
        if self.slots.capacity() > MAX_KEPT_SLOTS {
            self.slots = HashMap::default();
        } else {
            self.slots.clear();
        }
        self.bytes = 0;
        self.lookups = 0;
        self.hits = 0;
    }

    /// Whether its values answered a smaller part of its reads than `other`'s, or as
    /// much and it holds more (a column never read answered none).
    fn worth_less_than(&self, other: &Column) -> bool {
        let mine = u128::from(self.hits) * u128::from(other.lookups.max(1));
        let theirs = u128::from(other.hits) * u128::from(self.lookups.max(1));
        mine < theirs || (mine == theirs && self.bytes > other.bytes)
    }

    /// Lets go of its values, to bring a cache back within its budget or because they
    /// answered too few reads (see [`WriteBuffer::take`]). When they answered
    /// fewer than half of its reads, its keys are read less often than the budget can
    /// wait for (a key space larger than it holds): keeping them only costs memory and
    /// time, so it keeps none for [`PAUSED_ROUNDS`] rounds (more after each such
    /// eviction in a row). Returns whether it paused.
    fn evict(&mut self) -> bool {
        let missed = self.hits * 2 < self.lookups.max(1);
        if missed {
            self.paused = PAUSED_ROUNDS << self.strikes.min(6);
            self.strikes += 1;
        } else {
            self.strikes = 0;
        }
        self.clear();
        missed
    }
}

/// Point writes not yet applied, in the order they were made, with an index of the latest
/// write per column family and key (and, with a cache, of the values applied before).
#[derive(Default)]
pub(crate) struct WriteBuffer {
    batch: WriteBatch,
    /// Per column family (by name; a backend has a handful), the latest write per key.
    columns: Vec<Column>,
    /// Keys whose latest write of this round was a list append: their entries go when
    /// the round is applied (only RocksDB knows the merged value).
    merged: Vec<(usize, Vec<u8>)>,
    writes: usize,
    bytes: usize,
    /// The budget of the values kept once applied; `None` keeps none.
    cache: Option<Arc<ValueCacheBudget>>,
    /// This buffer's bytes as last added to the budget.
    counted: usize,
    /// What its lookups found, and its evictions (`bytes` unused: see `counted`).
    stats: ValueCacheStats,
}

impl Drop for WriteBuffer {
    fn drop(&mut self) {
        if let Some(budget) = &self.cache {
            budget.used.fetch_sub(self.counted, Ordering::Relaxed);
            budget.users.fetch_sub(1, Ordering::Relaxed);
            budget.resize_block_cache();
        }
    }
}

impl WriteBuffer {
    /// A buffer that keeps values once applied, within `budget`.
    pub(crate) fn with_cache(budget: Arc<ValueCacheBudget>) -> Self {
        budget.users.fetch_add(1, Ordering::Relaxed);
        let mut buffer = Self::default();
        buffer.cache = Some(budget);
        buffer
    }

    /// Whether nothing is buffered.
    pub(crate) fn is_empty(&self) -> bool {
        self.writes == 0
    }

    /// Writes buffered.
    pub(crate) fn len(&self) -> usize {
        self.writes
    }

    /// Whether the buffer should be applied now: it holds `limit` writes or more, or
    /// [`MAX_BUFFERED_BYTES`] of keys and values.
    pub(crate) fn is_full(&self, limit: usize) -> bool {
        self.writes >= limit || self.bytes >= MAX_BUFFERED_BYTES
    }

    /// The latest write of `key` in column family `column`, buffered or (with a cache)
    /// applied.
    pub(crate) fn lookup(&mut self, column: &str, key: &[u8]) -> Lookup<'_> {
        self.stats.lookups += 1;
        if self.writes == 0 && self.cache.is_none() {
            return Lookup::Absent;
        }
        let Some(found) = self.columns.iter_mut().find(|c| c.name == column) else {
            return Lookup::Absent;
        };
        found.lookups += 1;
        let slot = found.slots.get(key);
        // A buffered append is no answer: the buffer is applied and RocksDB read.
        if matches!(slot, Some(Slot::Value(_) | Slot::Deleted)) {
            found.hits += 1;
            self.stats.hits += 1;
        }
        match slot {
            Some(Slot::Value(value)) => Lookup::Value(value),
            Some(Slot::Deleted) => Lookup::Deleted,
            Some(Slot::Merged) => Lookup::Merged,
            None => Lookup::Absent,
        }
    }

    fn column(&mut self, column: &str) -> usize {
        match self.columns.iter().position(|c| c.name == column) {
            Some(at) => at,
            None => {
                self.columns.push(Column::new(column));
                self.columns.len() - 1
            }
        }
    }

    /// Keeps no values of `column` once applied, from now on: its state has a time to
    /// live, so RocksDB's compactions remove expired values without the buffer, and a
    /// reader that accepts expired values until they are removed must not find them here
    /// after.
    pub(crate) fn keep_none(&mut self, column: &str) {
        let at = self.column(column);
        self.columns[at].volatile = true;
    }

    fn note(&mut self, column: &str, key: &[u8], slot: Slot, bytes: usize) {
        self.writes += 1;
        self.bytes += key.len() + bytes;
        let at = self.column(column);
        if slot == Slot::Merged {
            self.merged.push((at, key.to_vec()));
        }
        let charge = slot.charge(key.len());
        let column = &mut self.columns[at];
        match column.slots.get_mut(key) {
            Some(existing) => {
                column.bytes = column.bytes - existing.charge(key.len()) + charge;
                *existing = slot;
            }
            None => {
                column.slots.insert(key.to_vec(), slot);
                column.bytes += charge;
            }
        }
    }

    /// Buffers a put of `value` under `key` in `cf` (named `column`).
    pub(crate) fn put(
        &mut self,
        cf: &impl AsColumnFamilyRef,
        column: &str,
        key: &[u8],
        value: &[u8],
    ) {
        self.batch.put_cf(cf, key, value);
        self.note(column, key, Slot::Value(value.to_vec()), value.len());
    }

    /// Buffers a delete of `key` in `cf` (named `column`).
    pub(crate) fn delete(&mut self, cf: &impl AsColumnFamilyRef, column: &str, key: &[u8]) {
        self.batch.delete_cf(cf, key);
        self.note(column, key, Slot::Deleted, 0);
    }

    /// Buffers a merge of `operand` into `key` in `cf` (named `column`).
    pub(crate) fn merge(
        &mut self,
        cf: &impl AsColumnFamilyRef,
        column: &str,
        key: &[u8],
        operand: &[u8],
    ) {
        self.batch.merge_cf(cf, key, operand);
        self.note(column, key, Slot::Merged, operand.len());
    }

    /// Takes the buffered writes out as one batch, leaving nothing buffered. Without a
    /// cache the index is emptied (keeping its capacity for the next round); with one,
    /// it keeps the values and deletes, now RocksDB's, within the cache's budget.
    pub(crate) fn take(&mut self) -> WriteBatch {
        self.writes = 0;
        self.bytes = 0;
        let batch = std::mem::take(&mut self.batch);
        let Some(budget) = self.cache.clone() else {
            self.merged.clear();
            for column in &mut self.columns {
                column.clear();
            }
            return batch;
        };
        for (at, key) in self.merged.drain(..) {
            let column = &mut self.columns[at];
            if column.slots.get(&key) == Some(&Slot::Merged) {
                column.slots.remove(&key);
                column.bytes -= Slot::Merged.charge(key.len());
            }
        }
        for column in &mut self.columns {
            if column.volatile {
                column.clear();
            } else if column.paused > 0 {
                column.paused -= 1;
                column.clear();
            }
        }
        self.recount(&budget);
        // Whoever holds more than an even share gives back: a backend is not emptied
        // because another one grows.
        let share = budget.limit / budget.users.load(Ordering::Relaxed).max(1);
        // A state is judged once its values fill a quarter of the even share, not only
        // once the budget is full. The even share is the room a buffer keeps when the
        // others grow (above it, it gives back). With its keys read at random, evenly,
        // the part of its reads answered since it started keeping them is below a
        // tenth at a quarter of the share about when it would be below half with the
        // share full (its keys then number about 1.25 times what the share holds),
        // where it would pause anyway; a hot set answers more early on. Judged early, a
        // key space too large for memory costs a quarter of a share's filling each time
        // it tries again, not the whole budget's.
        // A state not read yet gives no evidence (values loaded before they are read):
        // it is judged once the budget is full, as a state never read is.
        let quarter = (share / 4).max(1);
        let mut judged = false;
        for column in &mut self.columns {
            if column.bytes >= quarter && column.lookups > 0 && column.hits * 10 < column.lookups {
                self.stats.evictions += 1;
                self.stats.pauses += u64::from(column.evict());
                judged = true;
            }
        }
        if judged {
            self.recount(&budget);
        }
        while budget.used() > budget.limit && self.counted > share {
            let mut worst: Option<&mut Column> = None;
            for column in self.columns.iter_mut().filter(|c| c.bytes > 0) {
                match &worst {
                    Some(w) if !column.worth_less_than(w) => {}
                    _ => worst = Some(column),
                }
            }
            let Some(worst) = worst else {
                break;
            };
            self.stats.evictions += 1;
            if worst.evict() {
                self.stats.pauses += 1;
            }
            self.recount(&budget);
        }
        batch
    }

    /// What its lookups found since it was made, its evictions, and the bytes it keeps.
    pub(crate) fn stats(&self) -> ValueCacheStats {
        ValueCacheStats {
            bytes: self.counted as u64,
            ..self.stats
        }
    }

    /// Brings this buffer's share of the budget up to date.
    fn recount(&mut self, budget: &ValueCacheBudget) {
        let now: usize = self.columns.iter().map(|c| c.bytes).sum();
        if now > self.counted {
            budget.used.fetch_add(now - self.counted, Ordering::Relaxed);
        } else {
            budget.used.fetch_sub(self.counted - now, Ordering::Relaxed);
        }
        self.counted = now;
        budget.resize_block_cache();
    }

    /// Lets go of the values kept from earlier rounds, because RocksDB's data changed
    /// without the buffer. Only with nothing buffered: apply first.
    pub(crate) fn forget(&mut self) {
        debug_assert!(self.is_empty());
        if self.cache.is_none() || self.counted == 0 {
            return;
        }
        for column in &mut self.columns {
            column.clear();
        }
        self.merged.clear();
        if let Some(budget) = self.cache.clone() {
            self.recount(&budget);
        }
    }

    /// Lets go of the values kept of `keys` in `column`, about to be written to RocksDB
    /// without the buffer. Only with nothing buffered: apply first.
    pub(crate) fn forget_keys<'k>(&mut self, column: &str, keys: impl Iterator<Item = &'k [u8]>) {
        debug_assert!(self.is_empty());
        let Some(at) = self.columns.iter().position(|c| c.name == column) else {
            return;
        };
        let column = &mut self.columns[at];
        for key in keys {
            if let Some(slot) = column.slots.remove(key) {
                column.bytes -= slot.charge(key.len());
            }
        }
        if let Some(budget) = self.cache.clone() {
            self.recount(&budget);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rocksdb::Options;

    fn db() -> (
        tempfile::TempDir,
        rocksdb::DBWithThreadMode<rocksdb::MultiThreaded>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db = rocksdb::DBWithThreadMode::<rocksdb::MultiThreaded>::open_cf(
            &opts,
            dir.path(),
            ["a", "b"],
        )
        .unwrap();
        (dir, db)
    }

    #[test]
    fn a_lookup_answers_the_latest_write_of_a_key_in_its_own_column() {
        let (_dir, db) = db();
        let a = db.cf_handle("a").unwrap();
        let b = db.cf_handle("b").unwrap();
        let mut buffer = WriteBuffer::default();
        assert_eq!(buffer.lookup("a", b"k"), Lookup::Absent);
        buffer.put(&a, "a", b"k", b"1");
        buffer.put(&a, "a", b"k", b"2");
        buffer.delete(&b, "b", b"k");
        assert_eq!(buffer.lookup("a", b"k"), Lookup::Value(b"2"));
        assert_eq!(buffer.lookup("b", b"k"), Lookup::Deleted);
        assert_eq!(buffer.lookup("a", b"other"), Lookup::Absent);
        buffer.put(&b, "b", b"k", b"4");
        assert_eq!(buffer.lookup("b", b"k"), Lookup::Value(b"4"));
        assert_eq!(buffer.len(), 4);

        // Applied in the order written: the last write of each key wins.
        let batch = buffer.take();
        assert!(buffer.is_empty());
        assert_eq!(buffer.lookup("b", b"k"), Lookup::Absent);
        db.write(&batch).unwrap();
        assert_eq!(db.get_cf(&a, b"k").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(db.get_cf(&b, b"k").unwrap().as_deref(), Some(&b"4"[..]));

        // A buffered append hides the value: only RocksDB's merge gives it.
        let mut appended = WriteBuffer::default();
        appended.put(&a, "a", b"k", b"5");
        appended.merge(&a, "a", b"k", b"6");
        assert_eq!(appended.lookup("a", b"k"), Lookup::Merged);
        appended.delete(&a, "a", b"k");
        assert_eq!(appended.lookup("a", b"k"), Lookup::Deleted);
    }

    #[test]
    fn a_buffer_is_full_at_its_count_of_writes_or_its_bytes() {
        let (_dir, db) = db();
        let a = db.cf_handle("a").unwrap();
        let mut buffer = WriteBuffer::default();
        buffer.put(&a, "a", b"k1", b"v");
        assert!(!buffer.is_full(2));
        buffer.delete(&a, "a", b"k2");
        assert!(buffer.is_full(2));
        buffer.take();
        buffer.put(&a, "a", b"big", &vec![0; MAX_BUFFERED_BYTES]);
        assert!(buffer.is_full(1000));
    }

    #[test]
    fn applied_values_and_deletes_are_kept_but_not_appends() {
        let (_dir, db) = db();
        let a = db.cf_handle("a").unwrap();
        let budget = Arc::new(ValueCacheBudget::new(1 << 20));
        let mut buffer = WriteBuffer::with_cache(budget.clone());
        buffer.put(&a, "a", b"v", b"1");
        buffer.delete(&a, "a", b"d");
        buffer.merge(&a, "a", b"m", b"2");
        buffer.merge(&a, "a", b"p", b"3");
        buffer.put(&a, "a", b"p", b"4");
        // (Not written: this database has no merge operator.)
        buffer.take();
        assert!(buffer.is_empty());
        assert_eq!(buffer.lookup("a", b"v"), Lookup::Value(b"1"));
        assert_eq!(buffer.lookup("a", b"d"), Lookup::Deleted);
        // Only RocksDB knows a merged value.
        assert_eq!(buffer.lookup("a", b"m"), Lookup::Absent);
        // A put after the append: its value is the key's.
        assert_eq!(buffer.lookup("a", b"p"), Lookup::Value(b"4"));
        let kept = budget.used();
        assert_eq!(kept, 3 + 3 * ENTRY_OVERHEAD + 2);

        buffer.forget_keys("a", [&b"v"[..]].into_iter());
        assert_eq!(buffer.lookup("a", b"v"), Lookup::Absent);
        assert_eq!(buffer.lookup("a", b"p"), Lookup::Value(b"4"));
        assert_eq!(budget.used(), kept - (1 + 1 + ENTRY_OVERHEAD));
        buffer.forget();
        assert_eq!(buffer.lookup("a", b"p"), Lookup::Absent);
        assert_eq!(budget.used(), 0);
        buffer.put(&a, "a", b"v", b"5");
        buffer.take();
        assert!(budget.used() > 0);
        drop(buffer);
        assert_eq!(budget.used(), 0, "a dropped buffer gives its share back");
    }

    #[test]
    fn over_its_budget_a_buffer_lets_go_of_its_least_read_then_largest_column() {
        let (_dir, db) = db();
        let a = db.cf_handle("a").unwrap();
        let b = db.cf_handle("b").unwrap();
        let entry = 8 + 100 + ENTRY_OVERHEAD;
        let budget = Arc::new(ValueCacheBudget::new(50 * entry));
        let mut buffer = WriteBuffer::with_cache(budget.clone());
        let mut other = WriteBuffer::with_cache(budget.clone());
        other.put(&b, "b", b"elsewhere", &[0; 100]);
        other.take();
        let shared = budget.used();
        buffer.put(&b, "b", b"small", b"1");
        for i in 0..40u64 {
            buffer.put(&a, "a", &i.to_be_bytes(), &[1; 100]);
        }
        buffer.take();
        assert_eq!(
            buffer.lookup("a", &0u64.to_be_bytes()),
            Lookup::Value(&[1; 100])
        );
        assert_eq!(buffer.lookup("b", b"small"), Lookup::Value(b"1"));
        for i in 40..60u64 {
            buffer.put(&a, "a", &i.to_be_bytes(), &[1; 100]);
        }
        // This round is still whole until it is applied.
        assert_eq!(
            buffer.lookup("a", &59u64.to_be_bytes()),
            Lookup::Value(&[1; 100])
        );
        buffer.take();
        // Over the budget: of two columns whose reads all found their key, the larger
        // ("a") goes; "b" stays.
        assert_eq!(buffer.lookup("a", &0u64.to_be_bytes()), Lookup::Absent);
        assert_eq!(buffer.lookup("a", &59u64.to_be_bytes()), Lookup::Absent);
        assert_eq!(buffer.lookup("b", b"small"), Lookup::Value(b"1"));
        assert!(budget.used() <= budget.limit(), "{}", budget.used());
        assert_eq!(budget.used(), shared + 5 + 1 + ENTRY_OVERHEAD);
        assert_eq!(other.lookup("b", b"elsewhere"), Lookup::Value(&[0; 100]));
    }

    #[test]
    fn a_column_whose_values_were_mostly_missed_keeps_none_for_a_while() {
        let (_dir, db) = db();
        let a = db.cf_handle("a").unwrap();
        let b = db.cf_handle("b").unwrap();
        let entry = 8 + 8 + ENTRY_OVERHEAD;
        let budget = Arc::new(ValueCacheBudget::new(30 * entry));
        let mut buffer = WriteBuffer::with_cache(budget.clone());
        // Column "b" is read back; column "a" sees a new key each round, read back every
        // fourth round: its values answer a fifth of its reads.
        buffer.put(&b, "b", b"hot", b"1");
        buffer.take();
        for i in 0..40u64 {
            let key = i.to_be_bytes();
            assert_eq!(buffer.lookup("a", &key), Lookup::Absent);
            assert_eq!(buffer.lookup("b", b"hot"), Lookup::Value(b"1"));
            buffer.put(&a, "a", &key, &key);
            buffer.take();
            // More than a tenth answered: not let go at a quarter of the budget, only
            // once it is full (31 entries), and then paused (fewer than half).
            let over = i >= 29;
            assert_eq!(buffer.stats().evictions, u64::from(over), "round {i}");
            if i % 4 == 0 {
                let expected = if over {
                    Lookup::Absent
                } else {
                    Lookup::Value(&key)
                };
                assert_eq!(buffer.lookup("a", &key), expected, "round {i}");
            }
        }
        // Over the budget, "a" went, and keeps nothing now; "b" stays.
        assert!(budget.used() <= budget.limit());
        let stats = buffer.stats();
        assert_eq!((stats.lookups, stats.hits), (90, 48), "{stats:?}");
        assert_eq!((stats.evictions, stats.pauses), (1, 1), "{stats:?}");
        assert_eq!(stats.bytes as usize, budget.used());
        buffer.put(&a, "a", b"new", b"2");
        assert_eq!(buffer.lookup("a", b"new"), Lookup::Value(b"2"), "unapplied");
        buffer.take();
        assert_eq!(buffer.lookup("a", b"new"), Lookup::Absent);
        assert_eq!(buffer.lookup("b", b"hot"), Lookup::Value(b"1"));
        // It tries again after its pause.
        for _ in 0..PAUSED_ROUNDS {
            buffer.take();
        }
        buffer.put(&a, "a", b"new", b"3");
        buffer.take();
        assert_eq!(buffer.lookup("a", b"new"), Lookup::Value(b"3"));
    }

    #[test]
    fn a_column_is_judged_when_its_values_fill_a_quarter_of_the_even_share() {
        let (_dir, db) = db();
        let a = db.cf_handle("a").unwrap();
        let b = db.cf_handle("b").unwrap();
        let entry = 8 + 8 + ENTRY_OVERHEAD;
        let budget = Arc::new(ValueCacheBudget::new(40 * entry));
        let mut buffer = WriteBuffer::with_cache(budget.clone());
        // Another buffer shares the budget: an even share is 20 entries, and a quarter of
        // it 5. (That this one holds nothing does not count: it may grow any time.)
        let idle = WriteBuffer::with_cache(budget.clone());
        // Both columns get a new key each round; "a" reads each first and misses, "b" is
        // not read yet (no evidence: it is not judged before the budget is full).
        for i in 0..12u64 {
            let key = i.to_be_bytes();
            assert_eq!(buffer.lookup("a", &key), Lookup::Absent);
            buffer.put(&a, "a", &key, &key);
            buffer.put(&b, "b", &key, &key);
            buffer.take();
            let stats = buffer.stats();
            // At 5 entries (a quarter of the share), "a" had answered none of its reads:
            // it keeps none now, long before the budget is full.
            let judged = i >= 4;
            assert_eq!(stats.pauses, u64::from(judged), "round {i}: {stats:?}");
            assert!(budget.used() < 24 * entry);
        }
        assert_eq!(buffer.lookup("a", &11u64.to_be_bytes()), Lookup::Absent);
        for i in 0..12u64 {
            let key = i.to_be_bytes();
            assert_eq!(buffer.lookup("b", &key), Lookup::Value(&key), "{i}");
        }
        assert_eq!(budget.used(), 12 * entry);
        drop(idle);
    }

    #[test]
    fn the_block_cache_gives_way_to_the_values_kept_and_gets_it_back() {
        let (_dir, db) = db();
        let a = db.cf_handle("a").unwrap();
        let total = 16 << 20;
        let cache = rocksdb::Cache::new_hyper_clock_cache(total, 0);
        let budget = Arc::new(ValueCacheBudget::within(4 << 20, cache.clone(), total));
        let mut buffer = WriteBuffer::with_cache(budget.clone());
        for i in 0..2_000u64 {
            buffer.put(&a, "a", &i.to_be_bytes(), &[0; 1_000]);
            if buffer.is_full(256) {
                buffer.take();
            }
        }
        buffer.take();
        let used = budget.used();
        assert!(used > 2 << 20, "{used}");
        let capacity = cache.get_capacity();
        assert!(
            capacity <= total - used + RESIZE_STEP && capacity >= total - used,
            "capacity {capacity} with {used} bytes of values kept"
        );
        drop(buffer);
        assert_eq!(cache.get_capacity(), total);
    }
}
