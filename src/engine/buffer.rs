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

use rustc_hash::FxHashMap as HashMap;

use rocksdb::{AsColumnFamilyRef, WriteBatch};

/// The most key and value bytes a buffer holds before it is applied, whatever its count
/// of writes: a large value is not held back in memory for long.
pub(crate) const MAX_BUFFERED_BYTES: usize = 1 << 20;

/// The most index entries per column family kept allocated between rounds.
const MAX_KEPT_SLOTS: usize = 16_384;

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

/// Point writes not yet applied, in the order they were made, with an index of the latest
/// write per column family and key.
#[derive(Default)]
pub(crate) struct WriteBuffer {
    batch: WriteBatch,
    /// Per column family (by name; a backend has a handful), the latest write per key.
    columns: Vec<(String, HashMap<Vec<u8>, Slot>)>,
    writes: usize,
    bytes: usize,
}

impl WriteBuffer {
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

    /// The latest buffered write of `key` in column family `column`.
    pub(crate) fn lookup(&self, column: &str, key: &[u8]) -> Lookup<'_> {
        if self.writes == 0 {
            return Lookup::Absent;
        }
        let Some((_, slots)) = self.columns.iter().find(|(name, _)| name == column) else {
            return Lookup::Absent;
        };
        match slots.get(key) {
            Some(Slot::Value(value)) => Lookup::Value(value),
            Some(Slot::Deleted) => Lookup::Deleted,
            Some(Slot::Merged) => Lookup::Merged,
            None => Lookup::Absent,
        }
    }

    fn slots(&mut self, column: &str) -> &mut HashMap<Vec<u8>, Slot> {
        let at = match self.columns.iter().position(|(name, _)| name == column) {
            Some(at) => at,
            None => {
                self.columns.push((column.to_string(), HashMap::default()));
                self.columns.len() - 1
            }
        };
        &mut self.columns[at].1
    }

    fn note(&mut self, column: &str, key: &[u8], slot: Slot, bytes: usize) {
        self.writes += 1;
        self.bytes += key.len() + bytes;
        let slots = self.slots(column);
        match slots.get_mut(key) {
            Some(existing) => *existing = slot,
            None => {
                slots.insert(key.to_vec(), slot);
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

    /// Takes the buffered writes out as one batch, leaving the buffer empty (its index
    /// keeps its capacity for the next round).
    pub(crate) fn take(&mut self) -> WriteBatch {
        for (_, slots) in &mut self.columns {
            // Kept for the next round, unless one large batch grew it.
            if slots.capacity() > MAX_KEPT_SLOTS {
                *slots = HashMap::default();
            } else {
                slots.clear();
            }
        }
        self.writes = 0;
        self.bytes = 0;
        std::mem::take(&mut self.batch)
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
}
