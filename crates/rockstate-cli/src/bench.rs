//! `rockstate bench`: the macro benchmark. Every figure is a ratio against a baseline
//! measured in the same run, or a rate of this run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, DBCompressionType, Options, DB};
use rockstate::checkpoint::{AckOutcome, SubtaskSnapshot};
use rockstate::savepoint::Compression;
use rockstate::{
    codec, BackendOptions, CheckpointCoordinator, CheckpointMetadata, CheckpointStorage,
    CoordinatorOptions, Error, KeyGroupRange, OperatorSpec, RescaleStrategy, RestoreOptions,
    RestoreSource, RocksStateBackend, SavepointFormat, ValueState, ValueStateDescriptor,
};
use serde_json::json;

use crate::format;
use crate::progress::Progress;
use crate::snapshots::print_json;

pub const HELP: &str = "\
What is measured (local-file storage in --dir, 1 KiB values over 4 subtasks):
  value_get_ratio, value_put_ratio   rockstate ValueState ops/s divided by raw RocksDB ops/s
                                     (same options and key layout; --ops operations, best of 3)
  upload_amplification               bytes uploaded by incremental checkpoints / bytes of
                                     their new SST files
  incremental_vs_full                median incremental checkpoint bytes / full checkpoint
                                     bytes (1% of keys updated between checkpoints)
  sync_phase_ms_median, _p99          the synchronous (blocking) part of each subtask's snapshot
                                     in the incremental rounds (use --rounds 25 or more for
                                     a meaningful p99)
  sync_phase_ms_first                the same for the first checkpoint, which flushes the
                                     memtables the load filled
  sync_phase_ms_max                  the largest of all
  capture_ms_median, _p99            after the synchronous part, until the snapshot's files
                                     are taken (its flush, in the background, and links)
  restore_vs_copy                    restore time at the same parallelism / plain copy of
                                     the same files (every byte CRC-checked); copies,
                                     restores and rescales are medians of 3
  local_restore_vs_copy              restore time when the subtasks' earlier directories are
                                     still on this machine (local recovery) / plain copy
  local_vs_streamed_restore          local recovery / a restore that streams every file
                                     through the object-store API, as from a remote store
  rescale_vs_restore                 4->3 rescale time / same-parallelism restore time
  rescale_2_to_3_vs_restore          the same for 2->3 (of a checkpoint taken at 2)
  streamed_rescale_2_to_3_vs_restore the same, both streaming every file they fetch
                                     through the object-store API (medians of 3); as from
                                     a remote store, the rescale then decides per subtask
                                     whether it opens a base, and syncs what it ingests;
                                     the new subtasks, restored one after the other, link
                                     a stored file one of them fetched while its copy lasts
  streamed_rescale_2_to_3_fetched_vs_restore
                                     bytes that 2->3 read from storage / bytes the 2->2 read
  savepoint_mib_per_s                canonical savepoint rate, MiB of state per second
  events_per_s                       the demo job (count, last 8 values, histogram per key)
                                     through the harness at parallelism 1, with checkpoints
  raw_loop_events_per_s              the same six RocksDB operations per event in a plain
                                     loop on one thread, same options and key layout
  events_vs_raw_loop                 events_per_s / raw_loop_events_per_s
  upload_mean_bytes, upload_max_bytes bytes uploaded per checkpoint of that demo job
                                     (about 50 checkpoints, demo_checkpoints says how
                                     many; compactions included)
  peak_rss_mib                       peak resident memory of the process

Build with --release for meaningful figures: cargo run --release -- bench --json";

const MAX_PAR: u32 = 128;
const PARALLELISM: u32 = 4;
const VALUE_LEN: usize = 1024;
const UID: &str = "bench";
/// Keys of the point-operation comparison.
const POINT_KEYS: u64 = 50_000;

/// Flags of `rockstate bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// State size in MiB (1 KiB values).
    #[arg(long, default_value_t = 256, value_name = "N")]
    state_mib: u64,
    /// Incremental checkpoint rounds.
    #[arg(long, default_value_t = 5, value_name = "N")]
    rounds: u64,
    /// Operations per point-operation measurement.
    #[arg(long, default_value_t = 300_000, value_name = "N")]
    ops: u64,
    /// Events of the demo-job throughput measurement.
    #[arg(long, default_value_t = 1_000_000, value_name = "N")]
    demo_events: u64,
    /// Keys of the demo-job throughput measurement.
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    demo_keys: u64,
    /// Scratch directory (a temporary directory inside it is used and removed).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Prints one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

fn io(context: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(context, e)
}

/// Deterministic, poorly compressible value bytes.
fn value(key: u64, round: u64) -> Vec<u8> {
    let mut x = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round.wrapping_add(1);
    (0..VALUE_LEN / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// A deterministic scrambled walk over the point-operation keys.
fn key_at(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % POINT_KEYS
}

/// Repetitions of each restore and rescale measurement (their median is reported).
const REPEATS: usize = 3;

/// The median of durations, in seconds.
fn median_s(v: Vec<Duration>) -> f64 {
    median(v.iter().map(Duration::as_secs_f64).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The `q` quantile (0..=1) of `v`, nearest rank.
fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Peak resident set size from `/proc/self/status` (0 where unavailable).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A raw column family's options, as the backend sets them for its states (without the
/// insert hints of a backend that writes in key order).
fn raw_options(cache: &rocksdb::Cache, write_buffer: usize) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    table.set_cache_index_and_filter_blocks_with_high_priority(true);
    table.set_format_version(6);
    // No memtable insert hints: they are for writers in key order (the harness sorts its
    // batches), and this loop writes in stream order, as a plain program would.
    let mut cf = Options::default();
    cf.set_block_based_table_factory(&table);
    cf.set_write_buffer_size(write_buffer);
    cf.set_level_zero_file_num_compaction_trigger(8);
    cf.set_memtable_prefix_bloom_ratio(0.02);
    cf.set_memtable_whole_key_filtering(true);
    cf.set_compression_type(DBCompressionType::Lz4);
    cf.set_bottommost_compression_type(DBCompressionType::Zstd);
    cf
}

/// Write buffers of up to half of `budget`, charged to `cache`, as a backend's
/// `SharedResources` set them up: the baselines account for their memtables as the
/// backend does.
fn charged_write_buffers(cache: &rocksdb::Cache, budget: usize) -> rocksdb::WriteBufferManager {
    rocksdb::WriteBufferManager::new_write_buffer_manager_with_cache(
        budget / 2,
        false,
        cache.clone(),
    )
}

/// Raw RocksDB with the backend's settings for one value column (128 MiB hyper clock cache, 10-bit
/// bloom filters, memtable bloom filters, LZ4 then ZSTD at the
/// bottom, no write-ahead log).
fn raw_db(dir: &Path) -> rockstate::Result<DB> {
    let cache = rocksdb::Cache::new_hyper_clock_cache(128 << 20, 0);
    let cf = raw_options(&cache, 16 << 20);
    let mut db_opts = cf.clone();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.set_atomic_flush(true);
    db_opts.set_write_buffer_manager(&charged_write_buffers(&cache, 128 << 20));
    DB::open_cf_descriptors(&db_opts, dir, [ColumnFamilyDescriptor::new("value", cf)])
        .map_err(|e| Error::Internal(format!("open the raw RocksDB baseline: {e}")))
}

/// Memory of the demo job's backend, as `rockstate demo` runs it.
const DEMO_MEMORY: usize = 64 << 20;

/// The demo job's throughput: `(harness events/s, raw loop events/s, bytes uploaded per
/// checkpoint)`. The harness runs it at parallelism 1 with a checkpoint every 1/50 of the
/// events; the raw loop (run first) does the same six RocksDB operations per event (get
/// and put of the count, the recent values and the histogram bucket) on one thread, with
/// the backend's options (without insert hints) and key layout.
fn demo_throughput(dir: &Path, events: u64, keys: u64) -> rockstate::Result<(f64, f64, Vec<u64>)> {
    use rockstate_harness::demo::{Counter, DemoSource, DEMO_PARTITIONS, DEMO_UID, RECENT_VALUES};
    use rockstate_harness::{Harness, HarnessConfig, Source, StartFrom};
    let source = DemoSource::new(7, keys, events)?;
    // About 50 checkpoints (one refused while another is in flight is tried again a
    // little later), so that compactions show in the mean and the maximum; the count is
    // reported.
    let storage = CheckpointStorage::open(&dir.join("demo-checkpoints").display().to_string())?;
    let config = HarnessConfig {
        job_id: "throughput".into(),
        operator_uid: DEMO_UID.into(),
        parallelism: 1,
        max_parallelism: MAX_PAR,
        local_root: dir.join("demo-local"),
        checkpoint_interval: (events / 50).max(1),
        memory_budget: DEMO_MEMORY,
        rocksdb_statistics: false,
        coordinator: CoordinatorOptions::default(),
    };
    // The same records in the same order, applied directly: first, in a process that
    // has run nothing else yet (run after the harness, the same loop measured anywhere
    // from 83 000 to 104 000 events/s between builds with the same loop code), its
    // database closed before the harness starts.
    let raw_rate = {
        let cache = rocksdb::Cache::new_hyper_clock_cache(DEMO_MEMORY, 0);
        let cf = raw_options(&cache, DEMO_MEMORY / 8);
        let mut db_opts = cf.clone();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_atomic_flush(true);
        db_opts.set_write_buffer_manager(&charged_write_buffers(&cache, DEMO_MEMORY));
        let raw_err = |e: rocksdb::Error| Error::Internal(format!("raw RocksDB: {e}"));
        let names = ["count", "recent", "histogram"];
        let db = DB::open_cf_descriptors(
            &db_opts,
            dir.join("demo-raw"),
            names.map(|n| ColumnFamilyDescriptor::new(n, cf.clone())),
        )
        .map_err(raw_err)?;
        let cfs: Vec<_> = names
            .iter()
            .map(|n| {
                db.cf_handle(n)
                    .ok_or_else(|| Error::Internal(format!("raw column family {n} missing")))
            })
            .collect::<rockstate::Result<_>>()?;
        let mut wo = rocksdb::WriteOptions::default();
        wo.disable_wal(true);
        let started = Instant::now();
        let mut applied = 0u64;
        for offset in 0.. {
            let mut any = false;
            for partition in 0..DEMO_PARTITIONS {
                let Some((key, value)) = source.record(partition, offset) else {
                    continue;
                };
                any = true;
                applied += 1;
                let state_key = codec::state_key(&key, &(), MAX_PAR)?;
                let n: u64 = match db.get_pinned_cf(&cfs[0], &state_key).map_err(raw_err)? {
                    Some(v) => codec::decode_exact(&v, "count")?,
                    None => 0,
                };
                db.put_cf_opt(&cfs[0], &state_key, codec::encode_key(&(n + 1))?, &wo)
                    .map_err(raw_err)?;
                let mut recent: Vec<u64> =
                    match db.get_pinned_cf(&cfs[1], &state_key).map_err(raw_err)? {
                        Some(v) => codec::decode_exact(&v, "recent")?,
                        None => Vec::new(),
                    };
                recent.push(value);
                let keep = recent.len().saturating_sub(RECENT_VALUES);
                db.put_cf_opt(
                    &cfs[1],
                    &state_key,
                    codec::encode_key(&recent[keep..])?,
                    &wo,
                )
                .map_err(raw_err)?;
                let entry = codec::map_entry_key(&key, &(), &((value / 100) as u8), MAX_PAR)?;
                let c: u64 = match db.get_pinned_cf(&cfs[2], &entry).map_err(raw_err)? {
                    Some(v) => codec::decode_exact(&v, "histogram")?,
                    None => 0,
                };
                db.put_cf_opt(&cfs[2], &entry, codec::encode_key(&(c + 1))?, &wo)
                    .map_err(raw_err)?;
            }
            if !any {
                break;
            }
        }
        applied as f64 / started.elapsed().as_secs_f64()
    };
    let started = Instant::now();
    let harness = Harness::start(
        config,
        &storage,
        source,
        Counter::factory(),
        StartFrom::Empty,
    )?;
    let finished = harness.finish()?;
    let harness_rate = finished.events as f64 / started.elapsed().as_secs_f64();
    let uploads = finished.uploaded.clone();
    drop(finished);

    Ok((harness_rate, raw_rate, uploads))
}

/// Ops/s of `op` over `ops` operations.
fn rate(ops: u64, mut op: impl FnMut(u64) -> rockstate::Result<()>) -> rockstate::Result<f64> {
    let started = Instant::now();
    for i in 0..ops {
        op(i)?;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// Best of three alternating runs of each side: (rockstate ops/s, raw ops/s).
fn compare(
    ops: u64,
    mut ours: impl FnMut(u64) -> rockstate::Result<()>,
    mut raw: impl FnMut(u64) -> rockstate::Result<()>,
) -> rockstate::Result<(f64, f64)> {
    let (mut best_ours, mut best_raw) = (0f64, 0f64);
    for _ in 0..3 {
        best_ours = best_ours.max(rate(ops, &mut ours)?);
        best_raw = best_raw.max(rate(ops, &mut raw)?);
    }
    Ok((best_ours, best_raw))
}

/// Value get and put through rockstate and through raw RocksDB.
fn point_ops(dir: &Path, ops: u64) -> rockstate::Result<(f64, f64)> {
    let mut options = BackendOptions::new(
        dir.join("point-rockstate"),
        KeyGroupRange::all(MAX_PAR)?,
        MAX_PAR,
    );
    options.memory_budget = 128 << 20;
    let backend = RocksStateBackend::open(options)?;
    let state = backend.register(ValueStateDescriptor::<u64, u64>::new("value"))?;
    let raw = raw_db(&dir.join("point-raw"))?;
    let cf = raw
        .cf_handle("value")
        .ok_or_else(|| Error::Internal("raw column family missing".into()))?;
    let mut wo = rocksdb::WriteOptions::default();
    wo.disable_wal(true);
    let raw_err = |e: rocksdb::Error| Error::Internal(format!("raw RocksDB: {e}"));
    let raw_put = |k: u64, v: u64| -> rockstate::Result<()> {
        let key = codec::state_key(&k, &(), MAX_PAR)?;
        raw.put_cf_opt(&cf, key, codec::encode_key(&v)?, &wo)
            .map_err(raw_err)
    };
    for k in 0..POINT_KEYS {
        state.put(&k, &k)?;
        raw_put(k, k)?;
    }
    backend.flush()?;
    raw.flush_cf(&cf).map_err(raw_err)?;
    let (get_ours, get_raw) = compare(
        ops,
        |i| {
            state.get(&key_at(i)).map(|v| {
                std::hint::black_box(v);
            })
        },
        |i| {
            let key = codec::state_key(&key_at(i), &(), MAX_PAR)?;
            let v = raw.get_pinned_cf(&cf, key).map_err(raw_err)?;
            let v = v.ok_or_else(|| Error::Internal("raw key missing".into()))?;
            std::hint::black_box(codec::decode_exact::<u64>(&v, "value")?);
            Ok(())
        },
    )?;
    let (put_ours, put_raw) = compare(
        ops,
        |i| state.put(&key_at(i), &i),
        |i| raw_put(key_at(i), i),
    )?;
    Ok((get_ours / get_raw, put_ours / put_raw))
}

/// One checkpoint (or canonical savepoint into `savepoint`) of all subtasks; returns the
/// completed metadata and, per subtask, the sync-phase duration and the time until its
/// files were taken.
async fn snapshot_all(
    coordinator: &mut CheckpointCoordinator,
    backends: &[RocksStateBackend],
    job: &CheckpointStorage,
    savepoint: Option<&CheckpointStorage>,
) -> rockstate::Result<(
    CheckpointMetadata,
    Vec<(Duration, Duration)>,
    Option<CheckpointStorage>,
)> {
    let (id, folder) = match savepoint {
        Some(dir) => {
            let t = coordinator.trigger_savepoint(Some(dir), SavepointFormat::Canonical)?;
            (t.checkpoint_id, Some(t.folder))
        }
        None => (coordinator.trigger()?, None),
    };
    let mut syncs = Vec::new();
    let mut completed = None;
    for (i, backend) in backends.iter().enumerate() {
        let mut pending = backend.snapshot(id)?;
        pending.capture().await?;
        syncs.push((pending.sync_duration(), pending.capture_duration()));
        let keyed = match &folder {
            Some(f) => {
                pending
                    .write_savepoint(
                        f,
                        UID,
                        i as u32,
                        SavepointFormat::Canonical,
                        Compression::Lz4,
                    )
                    .await?
            }
            None => pending.upload(job, UID, i as u32).await?.into(),
        };
        let ack = SubtaskSnapshot {
            keyed: Some(keyed),
            ..Default::default()
        };
        if let AckOutcome::Completed(meta) = coordinator.acknowledge(id, UID, i as u32, ack).await?
        {
            completed = Some(*meta);
        }
    }
    let meta =
        completed.ok_or_else(|| Error::Internal(format!("snapshot {id} did not complete")))?;
    if savepoint.is_none() {
        for b in backends {
            b.notify_checkpoint_complete(id);
        }
    }
    Ok((meta, syncs, folder))
}

/// Restores every subtask of `p` from `source` into `<dir>/<label>-<i>`, taking files
/// from `reuse` where they match; returns the time taken.
async fn restore_all(
    source: &RestoreSource,
    dir: &Path,
    label: &str,
    p: u32,
    strategy: RescaleStrategy,
    reuse: &[PathBuf],
) -> rockstate::Result<Duration> {
    let (elapsed, backends) = restore_open(source, dir, label, p, strategy, reuse).await?;
    // Closed off the async threads: a close waits for background work and syncs files.
    tokio::task::spawn_blocking(move || {
        for b in backends {
            let local = b.local_dir().to_path_buf();
            b.close()?;
            // Compactions of the restored copies write new files: the scratch space of a
            // large state would otherwise grow with every repetition.
            std::fs::remove_dir_all(&local).map_err(io("remove a restored directory"))?;
        }
        Ok::<_, Error>(())
    })
    .await
    .map_err(|e| Error::Internal(format!("closing restored backends failed: {e}")))??;
    Ok(elapsed)
}

/// Like [`restore_all`], returning the open backends.
async fn restore_open(
    source: &RestoreSource,
    dir: &Path,
    label: &str,
    p: u32,
    strategy: RescaleStrategy,
    reuse: &[PathBuf],
) -> rockstate::Result<(Duration, Vec<RocksStateBackend>)> {
    let started = Instant::now();
    let mut backends = Vec::new();
    for i in 0..p {
        let options = BackendOptions::for_subtask(dir.join(format!("{label}-{i}")), i, p, MAX_PAR)?;
        let options_r = RestoreOptions {
            strategy,
            ..RestoreOptions::default()
        };
        backends.push(
            RocksStateBackend::builder(options)
                .reuse_local_files(reuse.iter().cloned())
                .restore_operator(source, UID, &options_r)
                .await?,
        );
    }
    Ok((started.elapsed(), backends))
}

/// Times of restores, and the bytes each read from checkpoint storage.
#[derive(Default)]
struct Runs {
    times: Vec<Duration>,
    fetched: Vec<u64>,
}

impl Runs {
    /// Runs `restore`, recording its time and the bytes it read from storage.
    async fn push(
        &mut self,
        restore: impl std::future::Future<Output = rockstate::Result<Duration>>,
    ) -> rockstate::Result<()> {
        let before = rockstate::storage::fetched_total();
        self.times.push(restore.await?);
        self.fetched
            .push(rockstate::storage::fetched_total().saturating_sub(before));
        Ok(())
    }

    fn median_fetched(&self) -> f64 {
        median(self.fetched.iter().map(|&b| b as f64).collect())
    }
}

/// The checkpoint `meta` of `job` restored at parallelism 2 and at 3, [`REPEATS`] times
/// in turn: the restores and the rescales.
async fn two_and_three(
    job: &CheckpointStorage,
    meta: &CheckpointMetadata,
    dir: &Path,
    label: &str,
    strategy: RescaleStrategy,
) -> rockstate::Result<(Runs, Runs)> {
    let (mut restores, mut rescales) = (Runs::default(), Runs::default());
    for rep in 0..REPEATS {
        let at_two = RestoreSource::checkpoint(job, meta.clone());
        let name = format!("{label}-2-{rep}");
        restores
            .push(restore_all(&at_two, dir, &name, 2, strategy, &[]))
            .await?;
        let at_two = RestoreSource::checkpoint(job, meta.clone());
        let name = format!("{label}-2-3-{rep}");
        rescales
            .push(restore_all(&at_two, dir, &name, 3, strategy, &[]))
            .await?;
    }
    Ok((restores, rescales))
}

/// Checkpoints the state at parallelism 2 (restored from `source`) into its own job
/// directory, then times a restore at 2 and a rescale 2->3 of that checkpoint.
/// Restore and rescale times of a checkpoint taken at 2 after a rescale 4->2.
struct TwoToThree {
    restore_s: f64,
    rescale_s: f64,
    streamed_restore_s: f64,
    streamed_rescale_s: f64,
    /// Bytes the streamed 2->3 read from storage per byte the streamed 2->2 read.
    streamed_fetched_ratio: f64,
}

async fn rescale_two_to_three(
    source: &RestoreSource,
    store: &CheckpointStorage,
    dir: &Path,
) -> rockstate::Result<TwoToThree> {
    let ingest = RescaleStrategy::Ingest;
    let (_, two) = restore_open(source, dir, "two", 2, ingest, &[]).await?;
    let job = store.child("job-2")?;
    let specs = vec![OperatorSpec {
        uid: UID.into(),
        parallelism: 2,
        max_parallelism: MAX_PAR,
    }];
    let mut coordinator =
        CheckpointCoordinator::start(job.clone(), "bench-2", specs, CoordinatorOptions::default())
            .await?;
    let (meta, _, _) = snapshot_all(&mut coordinator, &two, &job, None).await?;
    for b in two {
        b.close()?;
    }
    let (restores, rescales) = two_and_three(&job, &meta, dir, "at-two", ingest).await?;
    // Every fetched byte streamed through the object-store API, as from a remote store.
    let streamed_store =
        object_store::local::LocalFileSystem::new_with_prefix(dir.join("store").join("job-2"))
            .map_err(|e| Error::Internal(format!("open the streamed store: {e}")))?;
    let streamed = CheckpointStorage::from_store(std::sync::Arc::new(streamed_store), "streamed");
    // Medians of runs in turn, like the others: one streamed run spreads widely (the disk
    // is still writing back what the earlier phases wrote).
    let (streamed_restores, streamed_rescales) =
        two_and_three(&streamed, &meta, dir, "streamed", ingest).await?;
    coordinator.shutdown(true).await?;
    Ok(TwoToThree {
        restore_s: median_s(restores.times),
        rescale_s: median_s(rescales.times),
        streamed_fetched_ratio: streamed_rescales.median_fetched()
            / streamed_restores.median_fetched().max(1.0),
        streamed_restore_s: median_s(streamed_restores.times),
        streamed_rescale_s: median_s(streamed_rescales.times),
    })
}

/// The local names of a checkpoint's SST files with their sizes.
fn sst_files(meta: &CheckpointMetadata) -> std::collections::BTreeMap<(usize, String), u64> {
    meta.handles()
        .enumerate()
        .flat_map(|(i, (_, h))| {
            h.files()
                .filter(|f| f.local_name.ends_with(".sst"))
                .map(move |f| ((i, f.local_name.clone()), f.size))
        })
        .collect()
}

struct Report {
    state_bytes: u64,
    value_get_ratio: f64,
    value_put_ratio: f64,
    upload_amplification: f64,
    incremental_vs_full: f64,
    incremental_median_bytes: f64,
    full_bytes: f64,
    sync_ms: Vec<f64>,
    sync_first_ms: Vec<f64>,
    capture_ms: Vec<f64>,
    events_per_s: f64,
    raw_loop_events_per_s: f64,
    restore_s: f64,
    copy_s: f64,
    local_restore_s: f64,
    streamed_restore_s: f64,
    rescale_s: f64,
    restore_2_s: f64,
    rescale_2_3_s: f64,
    streamed_restore_2_s: f64,
    streamed_rescale_2_3_s: f64,
    streamed_fetched_2_3_ratio: f64,
    savepoint_mib_per_s: f64,
}

async fn measure(args: &BenchArgs, dir: &Path, say: &dyn Fn(&str)) -> rockstate::Result<Report> {
    say(&format!(
        "point operations: {} ops per side against raw RocksDB",
        args.ops
    ));
    let (value_get_ratio, value_put_ratio) = point_ops(dir, args.ops)?;

    let keys = (args.state_mib.max(1) << 20) / VALUE_LEN as u64;
    let state_bytes = keys * VALUE_LEN as u64;
    let store = CheckpointStorage::open(&dir.join("store").to_string_lossy())?;
    let job = store.child("job")?;
    let savepoints = store.child("savepoints")?;
    let specs = vec![OperatorSpec {
        uid: UID.into(),
        parallelism: PARALLELISM,
        max_parallelism: MAX_PAR,
    }];
    let mut coordinator = CheckpointCoordinator::start(
        job.clone(),
        "bench",
        specs,
        CoordinatorOptions {
            num_retained: 2,
            ..CoordinatorOptions::default()
        },
    )
    .await?;
    let backends: Vec<RocksStateBackend> = (0..PARALLELISM)
        .map(|i| {
            let o =
                BackendOptions::for_subtask(dir.join(format!("src-{i}")), i, PARALLELISM, MAX_PAR)?;
            RocksStateBackend::open(o)
        })
        .collect::<rockstate::Result<_>>()?;
    let states: Vec<ValueState<u64, Vec<u8>>> = backends
        .iter()
        .map(|b| b.register(ValueStateDescriptor::new("v")))
        .collect::<rockstate::Result<_>>()?;
    say(&format!(
        "loading {} of state: {keys} keys over {PARALLELISM} subtasks",
        format::bytes(state_bytes)
    ));
    let loading = Progress::bytes("load", state_bytes);
    for key in 0..keys {
        let s = rockstate::subtask_for_key(&key, PARALLELISM, MAX_PAR)?;
        states[s as usize].put(&key, &value(key, 0))?;
        if key % 1024 == 0 {
            loading.set(key * VALUE_LEN as u64);
        }
    }
    loading.finish();

    say("incremental checkpoints, 1% of keys updated before each");
    let (mut previous, mut sync, _) = snapshot_all(&mut coordinator, &backends, &job, None).await?;
    // The first checkpoint flushes the memtables filled by the load; it is reported on
    // its own, the rounds after it are the steady state.
    let sync_first_ms: Vec<f64> = sync.drain(..).map(|(d, _)| d.as_secs_f64() * 1e3).collect();
    let mut sync_ms: Vec<f64> = Vec::new();
    let mut capture_ms: Vec<f64> = Vec::new();
    let (mut uploaded, mut new_sst, mut incremental, mut full) =
        (0u64, 0u64, Vec::new(), Vec::new());
    for round in 1..=args.rounds.max(1) {
        for key in (round % 100..keys).step_by(100) {
            let s = rockstate::subtask_for_key(&key, PARALLELISM, MAX_PAR)?;
            states[s as usize].put(&key, &value(key, round))?;
        }
        let (meta, syncs, _) = snapshot_all(&mut coordinator, &backends, &job, None).await?;
        sync_ms.extend(syncs.iter().map(|(d, _)| d.as_secs_f64() * 1e3));
        capture_ms.extend(syncs.iter().map(|(_, c)| c.as_secs_f64() * 1e3));
        let before = sst_files(&previous);
        let fresh: u64 = sst_files(&meta)
            .into_iter()
            .filter(|(name, _)| !before.contains_key(name))
            .map(|(_, size)| size)
            .sum();
        uploaded += meta.uploaded_bytes();
        new_sst += fresh;
        incremental.push(meta.uploaded_bytes() as f64);
        full.push(meta.total_size() as f64);
        previous = meta;
    }

    say("canonical savepoint");
    let started = Instant::now();
    snapshot_all(&mut coordinator, &backends, &job, Some(&savepoints)).await?;
    let savepoint_s = started.elapsed().as_secs_f64();
    drop(states);
    for b in backends {
        b.close()?;
    }

    say("restore and rescale of the last checkpoint");
    let job_dir = dir.join("store").join("job");
    // The plain copy, like the restores below, is a median of repetitions.
    let mut copies = Vec::new();
    for rep in 0..REPEATS {
        let copy_dir = dir.join(format!("copy-{rep}"));
        let started = Instant::now();
        for (i, (_, handle)) in previous.handles().enumerate() {
            let target = copy_dir.join(i.to_string());
            std::fs::create_dir_all(&target).map_err(io("create the copy directory"))?;
            for f in handle.files() {
                std::fs::copy(job_dir.join(&f.path), target.join(&f.local_name))
                    .map_err(io("copy a checkpoint file"))?;
            }
        }
        copies.push(started.elapsed());
        std::fs::remove_dir_all(&copy_dir).map_err(io("remove a copy"))?;
    }
    let copy_s = median_s(copies);
    let source = RestoreSource::checkpoint(&job, previous.clone());
    let ingest = RescaleStrategy::Ingest;
    // Medians of alternating repetitions, each from a source of its own (a source
    // remembers which of its files it has checked already).
    let (mut restores, mut rescales) = (Vec::new(), Vec::new());
    for rep in 0..REPEATS {
        let fresh = RestoreSource::checkpoint(&job, previous.clone());
        let label = format!("restore-{rep}");
        restores.push(restore_all(&fresh, dir, &label, PARALLELISM, ingest, &[]).await?);
        let fresh = RestoreSource::checkpoint(&job, previous.clone());
        let label = format!("rescale-{rep}");
        rescales.push(restore_all(&fresh, dir, &label, PARALLELISM - 1, ingest, &[]).await?);
    }
    let restore_s = median_s(restores);
    let rescale_s = median_s(rescales);
    // Local recovery: the source backends' directories are still here.
    let earlier: Vec<PathBuf> = (0..PARALLELISM)
        .map(|i| dir.join(format!("src-{i}")))
        .collect();
    // The same files through the object-store API, every byte streamed as from a remote
    // store.
    let streamed_store = object_store::local::LocalFileSystem::new_with_prefix(&job_dir)
        .map_err(|e| Error::Internal(format!("open the streamed store: {e}")))?;
    let streamed = CheckpointStorage::from_store(std::sync::Arc::new(streamed_store), "streamed");
    let (mut locals, mut streams) = (Vec::new(), Vec::new());
    for rep in 0..REPEATS {
        let fresh = RestoreSource::checkpoint(&job, previous.clone());
        let label = format!("local-{rep}");
        locals.push(restore_all(&fresh, dir, &label, PARALLELISM, ingest, &earlier).await?);
        let fresh = RestoreSource::checkpoint(&streamed, previous.clone());
        let label = format!("streamed-{rep}");
        streams.push(restore_all(&fresh, dir, &label, PARALLELISM, ingest, &[]).await?);
    }
    let local_restore_s = median_s(locals);
    let streamed_restore_s = median_s(streams);
    let two_to_three = rescale_two_to_three(&source, &store, dir).await?;
    coordinator.shutdown(true).await?;

    let incremental_median_bytes = median(incremental);
    let full_bytes = median(full);
    Ok(Report {
        state_bytes,
        value_get_ratio,
        value_put_ratio,
        upload_amplification: uploaded as f64 / (new_sst.max(1)) as f64,
        incremental_vs_full: incremental_median_bytes / full_bytes.max(1.0),
        incremental_median_bytes,
        full_bytes,
        sync_ms,
        sync_first_ms,
        capture_ms,
        events_per_s: 0.0,
        raw_loop_events_per_s: 0.0,
        restore_s,
        copy_s,
        local_restore_s,
        streamed_restore_s,
        rescale_s,
        restore_2_s: two_to_three.restore_s,
        rescale_2_3_s: two_to_three.rescale_s,
        streamed_restore_2_s: two_to_three.streamed_restore_s,
        streamed_rescale_2_3_s: two_to_three.streamed_rescale_s,
        streamed_fetched_2_3_ratio: two_to_three.streamed_fetched_ratio,
        savepoint_mib_per_s: mib(state_bytes) / savepoint_s.max(1e-9),
    })
}

pub fn run(args: BenchArgs) -> rockstate::Result<u8> {
    let parent = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&parent).map_err(io("create the bench directory"))?;
    let work = tempfile::Builder::new()
        .prefix("rockstate-bench-")
        .tempdir_in(&parent)
        .map_err(io("create the bench directory"))?;
    let build = if cfg!(debug_assertions) {
        eprintln!("rockstate: warning: a debug build; figures are meaningful only with --release");
        "debug"
    } else {
        "release"
    };
    let say = |line: &str| eprintln!("bench: {line}");
    // The harness runs its own runtime: measured outside this one.
    say(&format!(
        "demo job: {} events over {} keys, harness at parallelism 1 against a raw loop",
        args.demo_events, args.demo_keys
    ));
    let (events_per_s, raw_loop_events_per_s, uploads) =
        demo_throughput(work.path(), args.demo_events, args.demo_keys)?;
    let upload_max = uploads.iter().copied().max().unwrap_or(0);
    let upload_mean = uploads.iter().sum::<u64>() as f64 / uploads.len().max(1) as f64;
    let runtime = crate::common::runtime()?;
    let mut r = runtime.block_on(measure(&args, work.path(), &say))?;
    r.events_per_s = events_per_s;
    r.raw_loop_events_per_s = raw_loop_events_per_s;
    let sync_first = r.sync_first_ms.iter().copied().fold(0.0, f64::max);
    let sync_max = r.sync_ms.iter().copied().fold(sync_first, f64::max);
    let sync_median = median(r.sync_ms.clone());
    let sync_p99 = percentile(r.sync_ms.clone(), 0.99);
    let restore_vs_copy = r.restore_s / r.copy_s.max(1e-9);
    let local_restore_vs_copy = r.local_restore_s / r.copy_s.max(1e-9);
    let local_vs_streamed = r.local_restore_s / r.streamed_restore_s.max(1e-9);
    let rescale_vs_restore = r.rescale_s / r.restore_s.max(1e-9);
    let peak = peak_rss_mib();
    if args.json {
        print_json(&json!({
            "build": build,
            "state_bytes": r.state_bytes,
            "value_get_ratio": r.value_get_ratio,
            "value_put_ratio": r.value_put_ratio,
            "upload_amplification": r.upload_amplification,
            "incremental_vs_full": r.incremental_vs_full,
            "incremental_median_bytes": r.incremental_median_bytes,
            "full_checkpoint_bytes": r.full_bytes,
            "sync_phase_ms_median": sync_median,
            "sync_phase_ms_max": sync_max,
            "sync_phase_ms_p99": sync_p99,
            "sync_phase_samples": r.sync_ms.len(),
            "sync_phase_ms_first": sync_first,
            "capture_ms_median": median(r.capture_ms.clone()),
            "capture_ms_p99": percentile(r.capture_ms.clone(), 0.99),
            "restore_vs_copy": restore_vs_copy,
            "restore_s": r.restore_s,
            "copy_s": r.copy_s,
            "local_restore_vs_copy": local_restore_vs_copy,
            "local_restore_s": r.local_restore_s,
            "local_vs_streamed_restore": local_vs_streamed,
            "streamed_restore_s": r.streamed_restore_s,
            "rescale_vs_restore": rescale_vs_restore,
            "rescale_s": r.rescale_s,
            "rescale_2_to_3_vs_restore": r.rescale_2_3_s / r.restore_2_s.max(1e-9),
            "rescale_2_to_3_s": r.rescale_2_3_s,
            "restore_2_s": r.restore_2_s,
            "streamed_rescale_2_to_3_vs_restore":
                r.streamed_rescale_2_3_s / r.streamed_restore_2_s.max(1e-9),
            "streamed_rescale_2_to_3_s": r.streamed_rescale_2_3_s,
            "streamed_restore_2_s": r.streamed_restore_2_s,
            "streamed_rescale_2_to_3_fetched_vs_restore": r.streamed_fetched_2_3_ratio,
            "savepoint_mib_per_s": r.savepoint_mib_per_s,
            "events_per_s": r.events_per_s,
            "raw_loop_events_per_s": r.raw_loop_events_per_s,
            "events_vs_raw_loop": r.events_per_s / r.raw_loop_events_per_s.max(1e-9),
            "upload_mean_bytes": upload_mean,
            "upload_max_bytes": upload_max,
            "demo_checkpoints": uploads.len(),
            "peak_rss_mib": peak,
        }));
    } else {
        println!(
            "rockstate bench ({build} build), {} of state over {PARALLELISM} subtasks",
            format::bytes(r.state_bytes)
        );
        println!(
            "  value get, ops/s vs raw RocksDB        {:.2}",
            r.value_get_ratio
        );
        println!(
            "  value put, ops/s vs raw RocksDB        {:.2}",
            r.value_put_ratio
        );
        println!(
            "  upload amplification                   {:.3} (uploaded / new SST bytes)",
            r.upload_amplification
        );
        println!(
            "  incremental vs full checkpoint         {:.3} ({} vs {})",
            r.incremental_vs_full,
            format::bytes(r.incremental_median_bytes as u64),
            format::bytes(r.full_bytes as u64)
        );
        println!(
            "  sync phase, median / p99 / max         {sync_median:.1} / {sync_p99:.1} / {sync_max:.1} ms (first {sync_first:.1} ms)"
        );
        println!(
            "  files taken after it, median / p99     {:.1} / {:.1} ms",
            median(r.capture_ms.clone()),
            percentile(r.capture_ms.clone(), 0.99)
        );
        println!(
            "  restore vs plain copy                  {restore_vs_copy:.2} ({:.2} s vs {:.2} s)",
            r.restore_s, r.copy_s
        );
        println!(
            "  local recovery vs plain copy           {local_restore_vs_copy:.2} ({:.2} s; streamed restore {:.2} s)",
            r.local_restore_s, r.streamed_restore_s
        );
        println!(
            "  rescale 4->3 vs restore 4->4           {rescale_vs_restore:.2} ({:.2} s vs {:.2} s)",
            r.rescale_s, r.restore_s
        );
        println!(
            "  rescale 2->3 vs restore 2->2           {:.2} ({:.2} s vs {:.2} s)",
            r.rescale_2_3_s / r.restore_2_s.max(1e-9),
            r.rescale_2_3_s,
            r.restore_2_s
        );
        println!(
            "  the same, streamed                     {:.2} ({:.2} s vs {:.2} s)",
            r.streamed_rescale_2_3_s / r.streamed_restore_2_s.max(1e-9),
            r.streamed_rescale_2_3_s,
            r.streamed_restore_2_s
        );
        println!(
            "  bytes read from storage, 2->3 vs 2->2  {:.2}",
            r.streamed_fetched_2_3_ratio
        );
        println!(
            "  canonical savepoint                    {:.0} MiB/s",
            r.savepoint_mib_per_s
        );
        println!(
            "  demo job vs raw loop, events/s         {:.2} ({:.0} vs {:.0})",
            r.events_per_s / r.raw_loop_events_per_s.max(1e-9),
            r.events_per_s,
            r.raw_loop_events_per_s
        );
        println!(
            "  bytes uploaded per checkpoint          mean {} / max {} ({} checkpoints)",
            format::bytes(upload_mean as u64),
            format::bytes(upload_max),
            uploads.len()
        );
        println!("  peak RSS                               {peak:.0} MiB");
    }
    Ok(crate::common::exit::OK)
}
