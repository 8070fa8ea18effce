//! Metrics, recorded through the [`metrics`](https://docs.rs/metrics) facade: rockstate
//! records, the application chooses the exporter (Prometheus, StatsD, logs...) by
//! installing a recorder. Without one, recording costs next to nothing.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `rockstate_checkpoints_completed_total` | counter | `job` | checkpoints committed |
//! | `rockstate_checkpoints_failed_total` | counter | `job` | checkpoints that could not complete |
//! | `rockstate_checkpoints_aborted_total` | counter | `job` | checkpoints abandoned (timeout, subsumed, shutdown) |
//! | `rockstate_savepoints_completed_total` | counter | `job` | savepoints committed |
//! | `rockstate_checkpoint_duration_seconds` | histogram | `job` | trigger to commit |
//! | `rockstate_checkpoint_uploaded_bytes_total` | counter | `job` | bytes uploaded by completed checkpoints |
//! | `rockstate_checkpoint_reused_bytes_total` | counter | `job` | bytes of files referenced again instead of uploaded |
//! | `rockstate_checkpoint_last_uploaded_bytes` | gauge | `job` | bytes uploaded by the last completed checkpoint |
//! | `rockstate_snapshot_sync_seconds` | histogram | | synchronous part of each subtask snapshot |
//! | `rockstate_restore_duration_seconds` | histogram | | restore of one backend |
//! | `rockstate_restore_bytes_total` | counter | | bytes of snapshot files restores fetched and checked, per file (or took from the local directory after a check, or linked from a checked copy another restore of the same source fetched; a failed restore's completed files included) |
//! | `rockstate_restore_fetched_bytes_total` | counter | | of those, the bytes taken from checkpoint storage (downloaded, or linked or copied from local-file storage): not taken from the local directory nor linked from a copy another restore of the same source fetched |
//! | `rockstate_value_cache_lookups_total` | counter | `job`, `operator`, `subtask` | point reads, see [`RocksStateBackend::value_cache_stats`](crate::RocksStateBackend::value_cache_stats) |
//! | `rockstate_value_cache_hits_total` | counter | `job`, `operator`, `subtask` | of those, the reads answered from memory (a write not yet applied, a value kept) without RocksDB |
//! | `rockstate_value_cache_evictions_total` | counter | `job`, `operator`, `subtask` | times a state's kept values were let go, to stay within the budget or because they answered too few reads |
//! | `rockstate_value_cache_pauses_total` | counter | `job`, `operator`, `subtask` | of those, the times the state then kept none for a while |
//! | `rockstate_value_cache_bytes` | gauge | `job`, `operator`, `subtask` | bytes counted for the values kept |
//! | `rockstate_rocksdb_*` | gauges, counters | `job`, `operator`, `subtask` | RocksDB's own figures, see [`RocksStateBackend::record_metrics`](crate::RocksStateBackend::record_metrics); the counters only from backends opened with [`BackendOptions::statistics`](crate::BackendOptions::statistics) |
//!
//! Call [`describe`] once after installing the recorder to give every metric its help
//! text and unit.

use std::time::Duration;

pub(crate) const CHECKPOINTS_COMPLETED: &str = "rockstate_checkpoints_completed_total";
pub(crate) const CHECKPOINTS_FAILED: &str = "rockstate_checkpoints_failed_total";
pub(crate) const CHECKPOINTS_ABORTED: &str = "rockstate_checkpoints_aborted_total";
pub(crate) const SAVEPOINTS_COMPLETED: &str = "rockstate_savepoints_completed_total";
pub(crate) const CHECKPOINT_DURATION: &str = "rockstate_checkpoint_duration_seconds";
pub(crate) const CHECKPOINT_UPLOADED: &str = "rockstate_checkpoint_uploaded_bytes_total";
pub(crate) const CHECKPOINT_REUSED: &str = "rockstate_checkpoint_reused_bytes_total";
pub(crate) const CHECKPOINT_LAST_UPLOADED: &str = "rockstate_checkpoint_last_uploaded_bytes";
pub(crate) const SNAPSHOT_SYNC: &str = "rockstate_snapshot_sync_seconds";
pub(crate) const RESTORE_DURATION: &str = "rockstate_restore_duration_seconds";
pub(crate) const RESTORE_BYTES: &str = "rockstate_restore_bytes_total";
pub(crate) const RESTORE_FETCHED: &str = "rockstate_restore_fetched_bytes_total";
pub(crate) const VALUE_CACHE_LOOKUPS: &str = "rockstate_value_cache_lookups_total";
pub(crate) const VALUE_CACHE_HITS: &str = "rockstate_value_cache_hits_total";
pub(crate) const VALUE_CACHE_EVICTIONS: &str = "rockstate_value_cache_evictions_total";
pub(crate) const VALUE_CACHE_PAUSES: &str = "rockstate_value_cache_pauses_total";
pub(crate) const VALUE_CACHE_BYTES: &str = "rockstate_value_cache_bytes";

/// RocksDB integer properties reported as gauges: (property, metric, help). The first four
/// are per column family and summed over the backend's; the others are database-wide.
pub(crate) const ROCKSDB_GAUGES: [(&str, &str, &str); 7] = [
    (
        "rocksdb.cur-size-all-mem-tables",
        "rockstate_rocksdb_memtable_bytes",
        "bytes in the memtables (active and immutable)",
    ),
    (
        "rocksdb.estimate-pending-compaction-bytes",
        "rockstate_rocksdb_pending_compaction_bytes",
        "bytes compaction still has to rewrite",
    ),
    (
        "rocksdb.live-sst-files-size",
        "rockstate_rocksdb_live_sst_bytes",
        "bytes of the live SST files",
    ),
    (
        "rocksdb.estimate-num-keys",
        "rockstate_rocksdb_estimated_keys",
        "estimated number of keys",
    ),
    (
        "rocksdb.block-cache-usage",
        "rockstate_rocksdb_block_cache_usage_bytes",
        "bytes in the block cache (shared by the backends of one memory budget)",
    ),
    (
        "rocksdb.is-write-stopped",
        "rockstate_rocksdb_write_stopped",
        "1 while writes are stopped (too many files or memtables)",
    ),
    (
        "rocksdb.actual-delayed-write-rate",
        "rockstate_rocksdb_delayed_write_rate_bytes",
        "write rate while writes are slowed down (0: not slowed)",
    ),
];

/// RocksDB statistics tickers reported as counters, by backends opened with
/// [`BackendOptions::statistics`](crate::BackendOptions::statistics).
pub(crate) const ROCKSDB_BLOCK_CACHE_HITS: &str = "rockstate_rocksdb_block_cache_hits_total";
pub(crate) const ROCKSDB_BLOCK_CACHE_MISSES: &str = "rockstate_rocksdb_block_cache_misses_total";
pub(crate) const ROCKSDB_STALL_MICROS: &str = "rockstate_rocksdb_stall_micros_total";

/// Gives every rockstate metric its help text and unit in the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(CHECKPOINTS_COMPLETED, "checkpoints committed");
    describe_counter!(
        CHECKPOINTS_FAILED,
        "checkpoints that could not complete (a subtask declined, an upload or the commit failed)"
    );
    describe_counter!(
        CHECKPOINTS_ABORTED,
        "checkpoints abandoned (timed out, subsumed by a newer one, the job stopped)"
    );
    describe_counter!(SAVEPOINTS_COMPLETED, "savepoints committed");
    describe_histogram!(
        CHECKPOINT_DURATION,
        Unit::Seconds,
        "checkpoint duration, from trigger to commit"
    );
    describe_counter!(
        CHECKPOINT_UPLOADED,
        Unit::Bytes,
        "bytes uploaded by completed checkpoints"
    );
    describe_counter!(
        CHECKPOINT_REUSED,
        Unit::Bytes,
        "bytes of earlier checkpoints' files that completed checkpoints referenced instead of uploading"
    );
    describe_gauge!(
        CHECKPOINT_LAST_UPLOADED,
        Unit::Bytes,
        "bytes uploaded by the last completed checkpoint"
    );
    describe_histogram!(
        SNAPSHOT_SYNC,
        Unit::Seconds,
        "synchronous part of a subtask's snapshot (the pause of its processing)"
    );
    describe_histogram!(
        RESTORE_DURATION,
        Unit::Seconds,
        "restore of one backend from a snapshot"
    );
    describe_counter!(
        RESTORE_BYTES,
        Unit::Bytes,
        "bytes of snapshot files restores fetched and checked, or took from the local directory or another restore's copy after a check"
    );
    describe_counter!(
        RESTORE_FETCHED,
        Unit::Bytes,
        "bytes of snapshot files restores took from checkpoint storage"
    );
    for (_, name, help) in ROCKSDB_GAUGES {
        describe_gauge!(name, help);
    }
    describe_counter!(ROCKSDB_BLOCK_CACHE_HITS, "block cache hits");
    describe_counter!(ROCKSDB_BLOCK_CACHE_MISSES, "block cache misses");
    describe_counter!(
        ROCKSDB_STALL_MICROS,
        Unit::Microseconds,
        "time writes were stalled by RocksDB"
    );
    describe_counter!(VALUE_CACHE_LOOKUPS, "point reads of stored state values");
    describe_counter!(
        VALUE_CACHE_HITS,
        "point reads answered from memory (a write not yet applied, a value kept), without RocksDB"
    );
    describe_counter!(
        VALUE_CACHE_EVICTIONS,
        "times a state's values kept in memory were let go, to stay within the budget or because they answered too few reads"
    );
    describe_counter!(
        VALUE_CACHE_PAUSES,
        "times a state's values kept in memory were let go and the state then kept none for a while"
    );
    describe_gauge!(
        VALUE_CACHE_BYTES,
        Unit::Bytes,
        "bytes counted for the state values kept in memory"
    );
}

pub(crate) fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}
