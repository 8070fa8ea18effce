//! Column-family settings: the list merge operator and the TTL compaction filter.

use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use rocksdb::compaction_filter::{CompactionFilter, Decision};
use rocksdb::compaction_filter_factory::{CompactionFilterContext, CompactionFilterFactory};
use rocksdb::{BlockBasedOptions, DBCompressionType, MergeOperands, Options};

use crate::clock::Clock;
use crate::engine::ttl;
use crate::engine::SharedResources;
use crate::format::StateKind;

/// The column family that holds the backend's own records.
pub(crate) const META_COLUMN: &str = "rockstate-meta";
/// Prefix of every state column family's name.
pub(crate) const STATE_COLUMN_PREFIX: &str = "state/";

/// What a state's column family needs to know at run time. Shared between the state
/// handles and the column family's compaction filter factory. The kind and TTL are set
/// after the column family is opened, once its record is read.
#[derive(Debug)]
pub(crate) struct ColumnSettings {
    pub cf_name: String,
    /// Kind and TTL, shared with the column family's compaction filter and merge operator
    /// (also by the [successor](Self::successor) settings a migration installs).
    flags: Arc<Flags>,
    /// Set when the state was dropped or migrated: handles holding these settings are
    /// refused.
    dropped: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Flags {
    kind: AtomicU8,
    ttl_ms: AtomicU64,
}

const KIND_UNKNOWN: u8 = 0;

fn kind_code(kind: StateKind) -> u8 {
    match kind {
        StateKind::Value => 1,
        StateKind::List => 2,
        StateKind::Map => 3,
        StateKind::Reducing => 4,
        StateKind::Aggregating => 5,
    }
}

impl ColumnSettings {
    pub(crate) fn new(cf_name: String) -> Self {
        Self {
            cf_name,
            flags: Arc::new(Flags {
                kind: AtomicU8::new(KIND_UNKNOWN),
                ttl_ms: AtomicU64::new(0),
            }),
            dropped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// New settings for the same column family, sharing kind and TTL with these (and so
    /// with the compaction filter), for the handles registered from now on; the handles
    /// holding these are refused once they are marked dropped.
    pub(crate) fn successor(&self) -> Self {
        Self {
            cf_name: self.cf_name.clone(),
            flags: self.flags.clone(),
            dropped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(crate) fn mark_dropped(&self) {
        self.dropped.store(true, Ordering::SeqCst);
    }

    /// Undoes [`mark_dropped`](Self::mark_dropped) for a migration that changed nothing.
    pub(crate) fn revive(&self) {
        self.dropped.store(false, Ordering::SeqCst);
    }

    pub(crate) fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn configure(&self, kind: StateKind, ttl_ms: Option<u64>) {
        self.flags
            .ttl_ms
            .store(ttl_ms.unwrap_or(0), Ordering::SeqCst);
        self.flags.kind.store(kind_code(kind), Ordering::SeqCst);
    }

    pub(crate) fn ttl_ms(&self) -> Option<u64> {
        match self.flags.ttl_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }

    fn is_list(&self) -> bool {
        self.flags.kind.load(Ordering::SeqCst) == kind_code(StateKind::List)
    }

    fn is_known(&self) -> bool {
        self.flags.kind.load(Ordering::SeqCst) != KIND_UNKNOWN
    }
}

/// The list merge operator: the stored list followed by every operand. Lists are
/// concatenations of self-delimiting elements, so partial merges concatenate too.
///
/// Compaction filters never see merge operands, so with TTL the merge itself leaves out
/// expired elements; a list whose elements all expired becomes empty, and the compaction
/// filter removes empty lists. Bytes that do not parse are concatenated unchanged.
fn list_merge(
    settings: Arc<ColumnSettings>,
    clock: Arc<dyn Clock>,
) -> impl Fn(&[u8], Option<&[u8]>, &MergeOperands) -> Option<Vec<u8>> + Clone + Send + Sync + 'static
{
    move |_key, existing, operands| {
        let parts = || existing.into_iter().chain(operands);
        let total: usize = parts().map(<[u8]>::len).sum();
        let mut out = Vec::with_capacity(total);
        let ttl = if settings.is_list() {
            settings.ttl_ms()
        } else {
            None
        };
        if let Some(ttl_ms) = ttl {
            let now = clock.now_millis();
            let parsed = parts().all(|part| ttl::Elements::new(part, true).all(|e| e.is_ok()));
            if parsed {
                for part in parts() {
                    let mut rest = part;
                    for element in ttl::Elements::new(part, true).flatten() {
                        let len = ttl::element_len(&element, true);
                        let (framed, tail) = rest.split_at(len);
                        rest = tail;
                        match element.written {
                            Some(ts) if ttl::is_expired(ts, ttl_ms, now) => {}
                            _ => out.extend_from_slice(framed),
                        }
                    }
                }
                return Some(out);
            }
        }
        for part in parts() {
            out.extend_from_slice(part);
        }
        Some(out)
    }
}

struct TtlFilterFactory {
    settings: Arc<ColumnSettings>,
    clock: Arc<dyn Clock>,
}

/// Drops values whose TTL has passed; a list goes only when all its elements have expired.
/// Bytes it cannot parse are kept: compaction never destroys what it does not understand.
struct TtlFilter {
    ttl_ms: Option<u64>,
    list: bool,
    now: u64,
}

impl CompactionFilterFactory for TtlFilterFactory {
    type Filter = TtlFilter;

    fn create(&mut self, _context: CompactionFilterContext) -> TtlFilter {
        let known = self.settings.is_known();
        TtlFilter {
            ttl_ms: if known { self.settings.ttl_ms() } else { None },
            list: self.settings.is_list(),
            now: self.clock.now_millis(),
        }
    }

    fn name(&self) -> &CStr {
        c"rockstate.ttl_filter_factory"
    }
}

impl TtlFilter {
    fn expired(&self, value: &[u8]) -> bool {
        let Some(ttl_ms) = self.ttl_ms else {
            return false;
        };
        if self.list {
            // Empty lists are left behind by merges that dropped every expired element.
            for element in ttl::Elements::new(value, true) {
                match element {
                    Ok(e) => match e.written {
                        Some(ts) if ttl::is_expired(ts, ttl_ms, self.now) => {}
                        _ => return false,
                    },
                    Err(_) => return false,
                }
            }
            true
        } else {
            let what = String::new;
            match ttl::split_value(value, true, &what) {
                Ok((Some(ts), _)) => ttl::is_expired(ts, ttl_ms, self.now),
                _ => false,
            }
        }
    }
}

impl CompactionFilter for TtlFilter {
    fn filter(&mut self, _level: u32, _key: &[u8], value: &[u8]) -> Decision {
        if self.expired(value) {
            Decision::Remove
        } else {
            Decision::Keep
        }
    }

    fn name(&self) -> &CStr {
        c"rockstate.ttl_filter"
    }
}

/// Memtable inserts of a state column of a backend that writes in key order keep one
/// hint per key group: the skip list position of the last key written in it. Keys start
/// with their key group (two bytes); a runtime that applies records in key order (the
/// harness sorts each batch by key group and key) inserts next to the previous insert of
/// the key group, and the search starts there instead of at the top of the skip list. The memtables hold the same entries either way; only the search and
/// the memory below differ.
pub(crate) const MEMTABLE_INSERT_HINT: &str =
    "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.2";

/// Memory of one insert hint, per key group written to a memtable: the saved position
/// (232 bytes, in the memtable's arena, so counted in its size) and the entry of the map
/// that finds it (outside the arena), rounded up.
const HINT_BYTES: usize = 300;

/// The most key groups a backend may hold for its memtables to keep insert hints: as
/// many as take at most 1/32 of a write buffer (873 at 8 MiB, 1 747 at 16 MiB, 109 at
/// the smallest, 1 MiB).
pub(crate) fn hinted_key_groups(write_buffer_size: usize) -> u32 {
    u32::try_from(write_buffer_size / 32 / HINT_BYTES).unwrap_or(u32::MAX)
}

/// Default options, with [`MEMTABLE_INSERT_HINT`] set when `hints` (only RocksDB's option
/// strings reach that setting). Should RocksDB refuse it, the memtables insert without
/// hints.
fn memtable_options(hints: bool) -> Options {
    const _: () = assert!(crate::codec::KEY_GROUP_PREFIX_LEN == 2);
    if !hints {
        return Options::default();
    }
    match Options::default().get_options_from_string(MEMTABLE_INSERT_HINT) {
        Ok(opts) => opts,
        Err(e) => {
            tracing::warn!("memtable insert hints are off: {e}");
            Options::default()
        }
    }
}

/// Options shared by every column family: block cache, bloom filters, compression.
pub(crate) fn base_options(resources: &SharedResources) -> Options {
    with_base(Options::default(), resources)
}

fn with_base(mut opts: Options, resources: &SharedResources) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&resources.cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    // One filter and one index block per file (not partitioned), cached as high-priority
    // entries. A partitioned filter or index costs every point read two more
    // lookups per file it probes (its top level, then the partition in the cache): the
    // demo job ran 1.15x faster without partitions at 100 000 keys, and 1.06x, 1.15x
    // and 1.16x with state larger than the memory budget (1 000 000, 3 000 000 and
    // 20 000 000 keys, the last mostly new keys, so mostly filter misses), and as fast
    // (1.00x) with more filter blocks than the cache holds (40 000 000 keys).
    table.set_cache_index_and_filter_blocks_with_high_priority(true);
    table.set_format_version(6);
    opts.set_block_based_table_factory(&table);
    opts.set_write_buffer_size(resources.write_buffer_size());
    // Level-0 files are compacted 8 at a time, not 4: each such compaction rewrites the
    // level below, so twice as many checkpoints share the cost of one rewrite. With one
    // filter block per file the extra level-0 probes of a point read cost little: the
    // demo job uploaded 9-17% fewer bytes per checkpoint on average at 100 000 keys and
    // 26% fewer with state larger than memory (1 000 000 keys), at 0.98-1.07x the
    // events/s (medians of three runs; 1.02x with the larger state).
    opts.set_level_zero_file_num_compaction_trigger(8);
    // Point reads of keys that are not in a memtable skip it: without a memtable bloom
    // filter every get walks the skip list of the active and each immutable memtable,
    // which dominated the profile of a read-modify-write job. Whole-key filtering needs
    // no prefix extractor, and prefix scans (map and list iteration) are unaffected.
    opts.set_memtable_prefix_bloom_ratio(0.02);
    opts.set_memtable_whole_key_filtering(true);
    opts.set_compression_type(DBCompressionType::Lz4);
    opts.set_bottommost_compression_type(DBCompressionType::Zstd);
    opts
}

/// Options of a state column family: the base options, the list merge operator, the
/// time-to-live compaction filter, and, for a backend that writes in key order
/// (`hinted`), insert hints per key group when it holds at most [`hinted_key_groups`]
/// (`key_groups`).
pub(crate) fn state_column_options(
    resources: &SharedResources,
    settings: Arc<ColumnSettings>,
    clock: Arc<dyn Clock>,
    hinted: bool,
    key_groups: u32,
) -> Options {
    let hints = hinted && key_groups <= hinted_key_groups(resources.write_buffer_size());
    let mut opts = with_base(memtable_options(hints), resources);
    opts.set_merge_operator_associative(
        "rockstate.list_append",
        list_merge(settings.clone(), clock.clone()),
    );
    opts.set_compaction_filter_factory(TtlFilterFactory { settings, clock });
    opts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(ttl: Option<u64>, list: bool, now: u64) -> TtlFilter {
        TtlFilter {
            ttl_ms: ttl,
            list,
            now,
        }
    }

    #[test]
    fn insert_hints_take_at_most_a_32nd_of_a_write_buffer() {
        assert_eq!(hinted_key_groups(8 << 20), 873);
        assert_eq!(hinted_key_groups(16 << 20), 1_747);
        assert_eq!(hinted_key_groups(1 << 20), 109);
    }

    #[test]
    fn memtable_insert_hints_are_accepted() {
        // The fallback in `memtable_options` would silently drop them.
        Options::default()
            .get_options_from_string(MEMTABLE_INSERT_HINT)
            .unwrap();
    }

    #[test]
    fn filter_drops_only_expired_values() {
        let v = ttl::frame_value(Some(10), 100, b"x");
        assert!(!filter(Some(10), false, 109).expired(&v));
        assert!(filter(Some(10), false, 110).expired(&v));
        assert!(!filter(None, false, 1_000).expired(&v));
        assert!(!filter(Some(10), false, 1_000).expired(b"short"));
    }

    #[test]
    fn filter_drops_a_list_only_when_every_element_expired() {
        let mut list = Vec::new();
        ttl::frame_element(&mut list, Some(10), 100, b"a").unwrap();
        ttl::frame_element(&mut list, Some(10), 105, b"b").unwrap();
        assert!(!filter(Some(10), true, 112).expired(&list));
        assert!(filter(Some(10), true, 115).expired(&list));
        assert!(
            filter(Some(10), true, 0).expired(&[]),
            "empty list is dropped"
        );
        list.pop();
        assert!(
            !filter(Some(10), true, 1_000).expired(&list),
            "truncated list is kept"
        );
    }
}
