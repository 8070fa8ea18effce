//! State access through rockstate beside the same operation on raw RocksDB.
//!
//! Both sides use the same RocksDB settings (128 MiB hyper clock block cache, 10-bit bloom
//! filters, LZ4, WAL off) and the same key layout (`key group ‖ key ‖ namespace
//! [‖ user key]`, serde-encoded). The raw side encodes keys and values itself, as a user of
//! plain RocksDB would; the difference is rockstate's own overhead.
//!
//! Run: `cargo bench --bench state_access` (or `make bench`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DBCompressionType, MergeOperands, Options,
    WriteOptions, DB,
};
use rockstate::{
    codec, BackendOptions, KeyGroupRange, ListStateDescriptor, MapStateDescriptor,
    RocksStateBackend, ValueStateDescriptor,
};

const KEYS: u64 = 50_000;
const LIST_LEN: u64 = 8;
const MAP_LEN: u32 = 16;
const MAX_PAR: u32 = 128;

fn concat(_: &[u8], existing: Option<&[u8]>, ops: &MergeOperands) -> Option<Vec<u8>> {
    let mut out = existing.map(<[u8]>::to_vec).unwrap_or_default();
    for op in ops {
        out.extend_from_slice(op);
    }
    Some(out)
}

struct Raw {
    db: DB,
    wo: WriteOptions,
}

/// Memtable inserts with one hint per key group (the first two bytes), as a backend that
/// writes in key order sets them.
const INSERT_HINT: &str = "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.2";

/// Table options as the backend sets them (bloom filters, cached metadata with high
/// priority, level-0 metadata pinned), in `cache`; with `partitioned`, filter and index
/// blocks split into 4 KiB partitions under a pinned top level, as the backend once had.
fn table_options(cache: &rocksdb::Cache, partitioned: bool) -> BlockBasedOptions {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    table.set_cache_index_and_filter_blocks_with_high_priority(true);
    table.set_format_version(6);
    if partitioned {
        table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
        table.set_partition_filters(true);
        table.set_metadata_block_size(4096);
        table.set_pin_top_level_index_and_filter(true);
    }
    table
}

fn raw_db(dir: &std::path::Path, insert_hints: bool) -> Raw {
    let cache = rocksdb::Cache::new_hyper_clock_cache(128 << 20, 0);
    let table = table_options(&cache, false);
    let mut cf = if insert_hints {
        Options::default()
            .get_options_from_string(INSERT_HINT)
            .unwrap()
    } else {
        Options::default()
    };
    cf.set_block_based_table_factory(&table);
    cf.set_write_buffer_size(16 << 20);
    cf.set_level_zero_file_num_compaction_trigger(8);
    cf.set_memtable_prefix_bloom_ratio(0.02);
    cf.set_memtable_whole_key_filtering(true);
    cf.set_compression_type(DBCompressionType::Lz4);
    cf.set_bottommost_compression_type(DBCompressionType::Zstd);
    cf.set_merge_operator_associative("concat", concat);
    let mut db_opts = cf.clone();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.set_atomic_flush(true);
    let cfs = ["value", "list", "map"].map(|n| ColumnFamilyDescriptor::new(n, cf.clone()));
    let db = DB::open_cf_descriptors(&db_opts, dir, cfs).unwrap();
    let mut wo = WriteOptions::default();
    wo.disable_wal(true);
    Raw { db, wo }
}

/// A deterministic scrambled walk over the key space.
fn key_at(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % KEYS
}

/// The smallest key after every key starting with `prefix`.
fn successor(prefix: &[u8]) -> Vec<u8> {
    let mut out = prefix.to_vec();
    while out.last() == Some(&0xff) {
        out.pop();
    }
    if let Some(last) = out.last_mut() {
        *last += 1;
    }
    out
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn benches(c: &mut Criterion) {
    let rs_dir = tempfile::tempdir().unwrap();
    let raw_dir = tempfile::tempdir().unwrap();
    let all = KeyGroupRange::all(MAX_PAR).unwrap();
    let mut options = BackendOptions::new(rs_dir.path(), all, MAX_PAR);
    options.memory_budget = 128 << 20;
    let backend = RocksStateBackend::open(options).unwrap();
    let value = backend
        .register(ValueStateDescriptor::<u64, u64>::new("value"))
        .unwrap();
    let list = backend
        .register(ListStateDescriptor::<u64, u64>::new("list"))
        .unwrap();
    let map = backend
        .register(MapStateDescriptor::<u64, u32, u64>::new("map"))
        .unwrap();
    let raw = raw_db(raw_dir.path(), false);
    let (rv, rl, rm) = (
        raw.db.cf_handle("value").unwrap(),
        raw.db.cf_handle("list").unwrap(),
        raw.db.cf_handle("map").unwrap(),
    );

    // Load both stores with the same data.
    for k in 0..KEYS {
        value.put(&k, &k).unwrap();
        let key = codec::state_key(&k, &(), MAX_PAR).unwrap();
        raw.db
            .put_cf_opt(&rv, &key, codec::encode_key(&k).unwrap(), &raw.wo)
            .unwrap();
        for j in 0..LIST_LEN {
            list.add(&k, &j).unwrap();
            raw.db
                .merge_cf_opt(&rl, &key, frame(&codec::encode_key(&j).unwrap()), &raw.wo)
                .unwrap();
        }
        for u in 0..MAP_LEN {
            map.put(&k, &u, &(k + u as u64)).unwrap();
            let mk = codec::map_entry_key(&k, &(), &u, MAX_PAR).unwrap();
            raw.db
                .put_cf_opt(
                    &rm,
                    mk,
                    codec::encode_key(&(k + u as u64)).unwrap(),
                    &raw.wo,
                )
                .unwrap();
        }
    }
    backend.flush().unwrap();
    raw.db.flush_cf(&rv).unwrap();
    raw.db.flush_cf(&rl).unwrap();
    raw.db.flush_cf(&rm).unwrap();

    let mut g = c.benchmark_group("value");
    let mut i = 0u64;
    g.bench_function(BenchmarkId::new("get", "rockstate"), |b| {
        b.iter(|| {
            i += 1;
            black_box(value.get(&key_at(i)).unwrap())
        })
    });
    g.bench_function(BenchmarkId::new("get", "raw"), |b| {
        b.iter(|| {
            i += 1;
            let key = codec::state_key(&key_at(i), &(), MAX_PAR).unwrap();
            let v = raw.db.get_pinned_cf(&rv, key).unwrap().unwrap();
            black_box(codec::decode_exact::<u64>(&v, "v").unwrap())
        })
    });
    g.bench_function(BenchmarkId::new("put", "rockstate"), |b| {
        b.iter(|| {
            i += 1;
            value.put(&key_at(i), &i).unwrap()
        })
    });
    g.bench_function(BenchmarkId::new("put", "raw"), |b| {
        b.iter(|| {
            i += 1;
            let key = codec::state_key(&key_at(i), &(), MAX_PAR).unwrap();
            raw.db
                .put_cf_opt(&rv, key, codec::encode_key(&i).unwrap(), &raw.wo)
                .unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("list");
    g.bench_function(BenchmarkId::new("get8", "rockstate"), |b| {
        b.iter(|| {
            i += 1;
            black_box(list.get(&key_at(i)).unwrap())
        })
    });
    g.bench_function(BenchmarkId::new("get8", "raw"), |b| {
        b.iter(|| {
            i += 1;
            let key = codec::state_key(&key_at(i), &(), MAX_PAR).unwrap();
            let v = raw.db.get_pinned_cf(&rl, key).unwrap().unwrap();
            let mut out = Vec::new();
            let mut rest: &[u8] = &v;
            while rest.len() >= 4 {
                let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                out.push(codec::decode_exact::<u64>(&rest[4..4 + len], "l").unwrap());
                rest = &rest[4 + len..];
            }
            black_box(out)
        })
    });
    g.bench_function(BenchmarkId::new("add", "rockstate"), |b| {
        b.iter(|| {
            i += 1;
            list.add(&key_at(i), &i).unwrap()
        })
    });
    g.bench_function(BenchmarkId::new("add", "raw"), |b| {
        b.iter(|| {
            i += 1;
            let key = codec::state_key(&key_at(i), &(), MAX_PAR).unwrap();
            raw.db
                .merge_cf_opt(&rl, key, frame(&codec::encode_key(&i).unwrap()), &raw.wo)
                .unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("map");
    g.bench_function(BenchmarkId::new("get", "rockstate"), |b| {
        b.iter(|| {
            i += 1;
            black_box(map.get(&key_at(i), &((i % 16) as u32)).unwrap())
        })
    });
    g.bench_function(BenchmarkId::new("get", "raw"), |b| {
        b.iter(|| {
            i += 1;
            let key = codec::map_entry_key(&key_at(i), &(), &((i % 16) as u32), MAX_PAR).unwrap();
            let v = raw.db.get_pinned_cf(&rm, key).unwrap().unwrap();
            black_box(codec::decode_exact::<u64>(&v, "m").unwrap())
        })
    });
    g.bench_function(BenchmarkId::new("put", "rockstate"), |b| {
        b.iter(|| {
            i += 1;
            map.put(&key_at(i), &((i % 16) as u32), &i).unwrap()
        })
    });
    g.bench_function(BenchmarkId::new("put", "raw"), |b| {
        b.iter(|| {
            i += 1;
            let key = codec::map_entry_key(&key_at(i), &(), &((i % 16) as u32), MAX_PAR).unwrap();
            raw.db
                .put_cf_opt(&rm, key, codec::encode_key(&i).unwrap(), &raw.wo)
                .unwrap()
        })
    });
    g.bench_function(BenchmarkId::new("iter16", "rockstate"), |b| {
        b.iter(|| {
            i += 1;
            let n = map
                .iter(&key_at(i))
                .unwrap()
                .map(|e| e.unwrap().1)
                .sum::<u64>();
            black_box(n)
        })
    });
    g.bench_function(BenchmarkId::new("iter16", "raw"), |b| {
        b.iter(|| {
            i += 1;
            let prefix = codec::state_key(&key_at(i), &(), MAX_PAR).unwrap();
            let upper = successor(&prefix);
            let mut ro = rocksdb::ReadOptions::default();
            ro.set_iterate_upper_bound(upper);
            let mut it = raw.db.raw_iterator_cf_opt(&rm, ro);
            it.seek(&prefix);
            let mut n = 0u64;
            while let Some((k, v)) = it.item() {
                black_box(codec::decode_exact::<u32>(&k[prefix.len()..], "m").unwrap());
                n += codec::decode_exact::<u64>(v, "m").unwrap();
                it.next();
            }
            black_box(n)
        })
    });
    g.finish();
}

/// Puts in batches of 2 048 keys, sorted by key group and key as the harness applies its
/// records, or in stream order, into memtables without and with insert hints per key
/// group (`BackendOptions::writes_in_key_order`). Only the puts are timed: keys are built
/// (and sorted) before each batch. Memtable flushes (16 MiB) fall within the measurement
/// on every side alike.
fn memtable_inserts(c: &mut Criterion) {
    const BATCH: u64 = 2048;
    let mut g = c.benchmark_group("memtable_insert");
    for sorted in [true, false] {
        for hints in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let raw = raw_db(dir.path(), hints);
            let cf = raw.db.cf_handle("value").unwrap();
            let mut round = 0u64;
            let order = if sorted {
                "sorted_batch_2048"
            } else {
                "stream_order_2048"
            };
            let name = if hints {
                "hint_per_key_group"
            } else {
                "no_hint"
            };
            g.bench_function(BenchmarkId::new(order, name), |b| {
                b.iter_batched(
                    || {
                        round += 1;
                        let mut keys: Vec<Vec<u8>> = (0..BATCH)
                            .map(|j| {
                                codec::state_key(&key_at(round * BATCH + j), &(), MAX_PAR).unwrap()
                            })
                            .collect();
                        if sorted {
                            keys.sort();
                        }
                        (keys, codec::encode_key(&round).unwrap())
                    },
                    |(keys, value)| {
                        for key in keys {
                            raw.db.put_cf_opt(&cf, key, &value, &raw.wo).unwrap();
                        }
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

/// Point reads of existing keys that miss the memtables, under the block cache and
/// filter settings weighed for the backend: an LRU or a hyper clock block cache, and
/// partitioned (a pinned top level over 4 KiB partitions) or whole-file filter and index
/// blocks. The keys were written in five rounds, each flushed (five level-0 files, the
/// newest holding most keys): a read finds its key in the newest file or the one before,
/// after the memtable's miss; every block fits in the cache.
fn point_reads(c: &mut Criterion) {
    const ROUND_KEYS: u64 = 40_000;
    let mut g = c.benchmark_group("point_read");
    for cache_kind in ["lru", "hyper_clock"] {
        for partitioned in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let cache = match cache_kind {
                "lru" => rocksdb::Cache::new_lru_cache(128 << 20),
                _ => rocksdb::Cache::new_hyper_clock_cache(128 << 20, 0),
            };
            let table = table_options(&cache, partitioned);
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.set_block_based_table_factory(&table);
            opts.set_compression_type(DBCompressionType::Lz4);
            opts.set_disable_auto_compactions(true);
            let db = DB::open(&opts, dir.path()).unwrap();
            let mut wo = WriteOptions::default();
            wo.disable_wal(true);
            for round in 0..5u64 {
                for j in 0..ROUND_KEYS {
                    let key =
                        codec::state_key(&key_at(round * ROUND_KEYS + j), &(), MAX_PAR).unwrap();
                    db.put_opt(key, codec::encode_key(&round).unwrap(), &wo)
                        .unwrap();
                }
                db.flush().unwrap();
            }
            let keys: Vec<Vec<u8>> = (0..KEYS)
                .map(|i| codec::state_key(&key_at(i * 7), &(), MAX_PAR).unwrap())
                .collect();
            let mut i = 0usize;
            let filters = if partitioned {
                "partitioned"
            } else {
                "whole_file"
            };
            g.bench_function(BenchmarkId::new(cache_kind, filters), |b| {
                b.iter(|| {
                    i = (i + 1) % keys.len();
                    black_box(db.get_pinned(&keys[i]).unwrap())
                })
            });
        }
    }
    g.finish();
}

/// A read-modify-write of a value (a get, then a put of the value plus one) per key, on
/// a backend applying each write at once and on one buffering them
/// (`BackendOptions::buffered_writes`, default 256): the per-write cost of RocksDB's write
/// path against one batch per 256 writes. The keys were written and flushed before, so
/// every get misses the memtable as in a job's first access after a checkpoint.
fn buffered_writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_modify_write");
    for buffered in [0, rockstate::DEFAULT_BUFFERED_WRITES] {
        let dir = tempfile::tempdir().unwrap();
        let all = KeyGroupRange::all(MAX_PAR).unwrap();
        let mut options = BackendOptions::new(dir.path(), all, MAX_PAR);
        options.memory_budget = 128 << 20;
        options.buffered_writes = buffered;
        let backend = RocksStateBackend::open(options).unwrap();
        let value = backend
            .register(ValueStateDescriptor::<u64, u64>::new("value"))
            .unwrap();
        for k in 0..KEYS {
            value.put(&k, &k).unwrap();
        }
        backend.flush().unwrap();
        let name = if buffered == 0 {
            "each_write_applied".to_string()
        } else {
            format!("buffered_{buffered}")
        };
        let mut i = 0u64;
        g.bench_function(BenchmarkId::new("value", name), |b| {
            b.iter(|| {
                i += 1;
                let key = key_at(i);
                let v = value.get(&key).unwrap().unwrap_or(0);
                value.put(&key, &(v + 1)).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = state_access;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = benches, memtable_inserts, point_reads, buffered_writes
}
criterion_main!(state_access);
