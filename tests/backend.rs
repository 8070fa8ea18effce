//! Backend: options, layout checks on reopen, registration rules, shared resources.

mod common;

use std::time::Duration;

use common::*;
use rockstate::{
    BackendOptions, ErrorKind, KeyGroupRange, ListStateDescriptor, ManualClock, MapState,
    MapStateDescriptor, RocksStateBackend, SharedResources, StateKind, ValueStateDescriptor,
};

#[test]
fn invalid_options_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let range = KeyGroupRange::new(0, 200).unwrap();
    let err = RocksStateBackend::open(BackendOptions::new(dir.path(), range, 128)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err = BackendOptions::for_subtask(dir.path(), 2, 2, 128).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err = BackendOptions::for_subtask(dir.path(), 0, 1, 40_000).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let mut small = BackendOptions::for_subtask(dir.path(), 0, 1, 128).unwrap();
    small.memory_budget = 1024;
    assert_eq!(
        RocksStateBackend::open(small).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let backend = open(dir.path(), &ManualClock::new(0));
    let err = backend
        .register(ValueStateDescriptor::<u8, u8>::new(""))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err = backend
        .register(ValueStateDescriptor::<u8, u8>::new("bad\nname"))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn reopen_requires_the_same_layout() {
    let dir = tempfile::tempdir().unwrap();
    let uid = {
        let backend = open(dir.path(), &ManualClock::new(0));
        backend
            .register(ValueStateDescriptor::<String, u64>::new("v"))
            .unwrap();
        backend.backend_uid().to_string()
    };
    let other_max = BackendOptions::new(dir.path(), KeyGroupRange::new(0, 63).unwrap(), 256);
    let err = RocksStateBackend::open(other_max).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible);
    assert!(err.to_string().contains("max parallelism 128"), "{err}");

    let other_range = BackendOptions::for_subtask(dir.path(), 1, 2, 128).unwrap();
    let err = RocksStateBackend::open(other_range).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible);
    assert!(err.to_string().contains("[0, 63]"), "{err}");

    let backend = open(dir.path(), &ManualClock::new(0));
    assert_eq!(backend.backend_uid(), uid, "uid is stable across reopen");
}

#[test]
fn a_dir_can_be_open_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path(), &ManualClock::new(0));
    let options = BackendOptions::for_subtask(dir.path(), 0, PAR, MAX_PAR).unwrap();
    assert!(RocksStateBackend::open(options).is_err());
}

#[test]
fn foreign_rocksdb_dirs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db = rocksdb::DB::open(&opts, dir.path()).unwrap();
        db.put(b"k", b"v").unwrap();
    }
    let options = BackendOptions::for_subtask(dir.path(), 0, PAR, MAX_PAR).unwrap();
    let err = RocksStateBackend::open(options).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible);
}

#[test]
fn registration_is_recorded_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(0);
    {
        let backend = open(dir.path(), &clock);
        backend
            .register(ValueStateDescriptor::<String, u64>::new("a"))
            .unwrap();
        backend
            .register(ListStateDescriptor::<String, u64>::new("b").with_ttl(Duration::from_secs(5)))
            .unwrap();
        // Same descriptor twice is fine and shares data.
        let m1 = backend
            .register(MapStateDescriptor::<String, u8, u8>::new("c"))
            .unwrap();
        let m2 = backend
            .register(MapStateDescriptor::<String, u8, u8>::new("c"))
            .unwrap();
        let key = &owned_keys(1)[0];
        m1.put(key, &1, &2).unwrap();
        assert_eq!(m2.get(key, &1).unwrap(), Some(2));
        // Another kind under the same name is refused.
        let err = backend
            .register(ValueStateDescriptor::<String, u8>::new("c"))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Incompatible);
        // A different serializer version is refused.
        let err = backend
            .register(ValueStateDescriptor::<String, u64>::new("a").with_serializer_version(2))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Incompatible);
    }
    let backend = open(dir.path(), &clock);
    let states = backend.states();
    let names: Vec<_> = states.iter().map(|s| (s.name.as_str(), s.kind)).collect();
    assert_eq!(
        names,
        vec![
            ("a", StateKind::Value),
            ("b", StateKind::List),
            ("c", StateKind::Map)
        ]
    );
    assert_eq!(states[1].ttl_millis, Some(5_000));
    // Turning TTL off is incompatible (stored values carry timestamps) ...
    let err = backend
        .register(ListStateDescriptor::<String, u64>::new("b"))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible);
    // ... but changing its duration is recorded.
    backend
        .register(ListStateDescriptor::<String, u64>::new("b").with_ttl(Duration::from_secs(9)))
        .unwrap();
    drop(backend);
    let backend = open(dir.path(), &clock);
    assert_eq!(backend.states()[1].ttl_millis, Some(9_000));
}

#[test]
fn backends_share_memory_resources() {
    let resources = SharedResources::new(16 << 20).unwrap();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let backends: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let options = BackendOptions::for_subtask(d.path(), i as u32, 2, 128).unwrap();
            RocksStateBackend::builder(options)
                .shared_resources(resources.clone())
                .open()
                .unwrap()
        })
        .collect();
    for (i, backend) in backends.iter().enumerate() {
        let state = backend
            .register(ValueStateDescriptor::<String, Vec<u8>>::new("v"))
            .unwrap();
        let mut written = 0;
        for n in 0.. {
            let key = format!("k{n}");
            if rockstate::subtask_for_key(&key, 2, 128).unwrap() != i as u32 {
                continue;
            }
            state.put(&key, &vec![7u8; 1024]).unwrap();
            written += 1;
            if written == 2_000 {
                break;
            }
        }
        assert_eq!(backend.resources().budget(), 16 << 20);
    }
    // Write buffers of both backends are charged to the one shared cache.
    assert!(resources.cache_usage() > 0);
    assert!(resources.cache_usage() <= 2 * resources.budget());
}

/// Memtables are charged to the shared block cache before anything is flushed or read:
/// half a write buffer of puts shows in the cache's usage.
#[test]
fn unflushed_memtables_are_charged_to_the_block_cache() {
    let resources = SharedResources::new(16 << 20).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = BackendOptions::new(dir.path(), rockstate::KeyGroupRange::all(128).unwrap(), 128);
    let backend = RocksStateBackend::builder(options)
        .shared_resources(resources.clone())
        .open()
        .unwrap();
    let state = backend
        .register(ValueStateDescriptor::<u32, Vec<u8>>::new("v"))
        .unwrap();
    let before = resources.cache_usage();
    // 512 KiB, a quarter of the 2 MiB write buffer: no flush.
    for key in 0..512u32 {
        state.put(&key, &vec![7u8; 1024]).unwrap();
    }
    let charged = resources.cache_usage() - before.min(resources.cache_usage());
    assert!(charged >= 512 << 10, "{charged} bytes charged");
    assert!(std::fs::read_dir(dir.path())
        .unwrap()
        .all(|e| e.unwrap().path().extension() != Some("sst".as_ref())));
}

#[test]
fn a_dir_left_by_a_crash_is_not_reopened() {
    let dir = tempfile::tempdir().unwrap();
    {
        let backend = open(dir.path(), &ManualClock::new(0));
        let v = backend
            .register(ValueStateDescriptor::<String, u64>::new("v"))
            .unwrap();
        v.put(&owned_keys(1)[0], &1).unwrap();
    }
    // A crash skips the clean close: the mark written after the final flush is missing.
    let marker = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains("CLOSED-CLEANLY")
        })
        .expect("a clean close leaves its mark");
    std::fs::remove_file(&marker).unwrap();
    let options = BackendOptions::for_subtask(dir.path(), 0, PAR, MAX_PAR).unwrap();
    let err = RocksStateBackend::open(options).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible);
    assert!(err.to_string().contains("not closed cleanly"), "{err}");
}

/// A directory held by an open backend cannot be opened by a second one.
///
/// Proves: the second open fails with kind `InUse` naming the directory (not `Io`, which
/// says "retry"), keeps RocksDB's lock error as its source rather than in its message,
/// and leaves the first backend working.
#[test]
fn a_directory_in_use_is_refused_with_a_clear_error() {
    use std::error::Error as _;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(0);
    let first = open(dir.path(), &clock);
    let count = first
        .register(ValueStateDescriptor::<String, u64>::new("count"))
        .unwrap();
    let options = BackendOptions::for_subtask(dir.path(), 0, PAR, MAX_PAR).unwrap();
    let err = RocksStateBackend::open(options).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InUse, "{}", err.report());
    let text = err.to_string();
    assert!(
        text.contains("in use") && text.contains(&dir.path().display().to_string()),
        "{text}"
    );
    assert!(
        !text.to_lowercase().contains("lock"),
        "the engine's message is repeated: {text}"
    );
    assert!(err.source().is_some());
    let key = &owned_keys(1)[0];
    count.put(key, &1).unwrap();
    assert_eq!(count.get(key).unwrap(), Some(1));
}

/// Buffered writes that RocksDB refuses to apply are lost, so the backend stops: the call
/// that applied them fails, every later read, write and snapshot is refused, and its
/// directory is not marked clean, so the next start restores from a checkpoint instead of
/// reopening state that lacks writes its caller saw succeed.
#[test]
fn buffered_writes_that_cannot_be_applied_stop_the_backend() {
    use rockstate::testing::checks::refuse_writes;

    let dir = tempfile::tempdir().unwrap();
    let keys = owned_keys(4);
    {
        let mut options = BackendOptions::for_subtask(dir.path(), 0, PAR, MAX_PAR).unwrap();
        options.buffered_writes = 4;
        let backend = RocksStateBackend::open(options).unwrap();
        let v = backend
            .register(ValueStateDescriptor::<String, u64>::new("v"))
            .unwrap();
        v.put(&keys[0], &1).unwrap();
        backend.flush().unwrap();

        refuse_writes(dir.path(), true);
        for (i, key) in keys[..3].iter().enumerate() {
            v.put(key, &(10 + i as u64)).unwrap();
        }
        // Buffered: read back before they are applied.
        assert_eq!(v.get(&keys[0]).unwrap(), Some(10));
        // The fourth fills the buffer, whose batch is refused.
        assert!(!backend.has_lost_writes());
        let err = v.put(&keys[3], &13).unwrap_err();
        refuse_writes(dir.path(), false);
        assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
        assert!(backend.has_lost_writes());

        // Nothing reads the state without those writes, nor writes after them.
        for err in [
            v.get(&keys[0]).unwrap_err(),
            v.put(&keys[1], &2).unwrap_err(),
            v.clear(&keys[1]).unwrap_err(),
            match v.all_keys() {
                Err(e) => e,
                Ok(_) => panic!("the scan is refused"),
            },
            match backend.snapshot(1) {
                Err(e) => e,
                Ok(_) => panic!("the snapshot is refused"),
            },
        ] {
            assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
            assert!(err.to_string().contains("lost"), "{err}");
        }
    }
    let options = BackendOptions::for_subtask(dir.path(), 0, PAR, MAX_PAR).unwrap();
    let err = RocksStateBackend::open(options).unwrap_err();
    assert!(err.to_string().contains("not closed cleanly"), "{err}");
}

/// With buffered writes, every kind of read sees the writes made before it, and the
/// writes reach RocksDB in the order they were made: across a flush, a reopen and a
/// checkpoint-free close.
#[test]
fn buffered_writes_are_read_back_and_kept_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let keys = owned_keys(3);
    let open_with = |buffered: usize| {
        let mut options = BackendOptions::for_subtask(dir.path(), 0, PAR, MAX_PAR).unwrap();
        options.buffered_writes = buffered;
        let backend = RocksStateBackend::open(options).unwrap();
        let v = backend
            .register(ValueStateDescriptor::<String, u64>::new("v"))
            .unwrap();
        let l = backend
            .register(ListStateDescriptor::<String, u64>::new("l"))
            .unwrap();
        let m = backend
            .register(MapStateDescriptor::<String, u8, u64>::new("m"))
            .unwrap();
        (backend, v, l, m)
    };
    {
        let (backend, v, l, m) = open_with(1_000);
        v.put(&keys[0], &1).unwrap();
        v.put(&keys[0], &2).unwrap();
        v.put(&keys[1], &3).unwrap();
        v.clear(&keys[1]).unwrap();
        assert_eq!(v.get(&keys[0]).unwrap(), Some(2));
        assert_eq!(v.get(&keys[1]).unwrap(), None);
        // An append is merged by RocksDB: the read applies the buffer first.
        l.update(&keys[0], &[1, 2]).unwrap();
        l.add(&keys[0], &3).unwrap();
        assert_eq!(l.get(&keys[0]).unwrap(), vec![1, 2, 3]);
        l.add(&keys[0], &4).unwrap();
        m.put(&keys[2], &1, &10).unwrap();
        m.put(&keys[2], &2, &20).unwrap();
        m.remove(&keys[2], &1).unwrap();
        assert_eq!(m.get(&keys[2], &2).unwrap(), Some(20));
        // A scan sees them all.
        assert_eq!(collect(m.iter(&keys[2]).unwrap()), vec![(2, 20)]);
        m.put(&keys[2], &3, &30).unwrap();
        v.put(&keys[2], &5).unwrap();
        // A batch larger than the buffer goes to RocksDB directly, after what is buffered.
        let (big, entries): (MapState<String, u16, u64>, Vec<(u16, u64)>) = (
            backend.register(MapStateDescriptor::new("big")).unwrap(),
            (0..1_500u16).map(|u| (u, u64::from(u))).collect(),
        );
        big.put(&keys[0], &0, &7).unwrap();
        big.put(&keys[0], &1_600, &8).unwrap();
        big.put_all(&keys[0], entries.iter().map(|(u, v)| (u, v)))
            .unwrap();
        assert_eq!(big.get(&keys[0], &0).unwrap(), Some(0));
        assert_eq!(big.get(&keys[0], &1_600).unwrap(), Some(8));
        assert_eq!(collect(big.iter(&keys[0]).unwrap()).len(), 1_501);
        // Dropped with writes still buffered: the drop applies them before its flush.
    }
    let (_backend, v, l, m) = open_with(0);
    assert_eq!(v.get(&keys[0]).unwrap(), Some(2));
    assert_eq!(v.get(&keys[1]).unwrap(), None);
    assert_eq!(v.get(&keys[2]).unwrap(), Some(5));
    assert_eq!(l.get(&keys[0]).unwrap(), vec![1, 2, 3, 4]);
    assert_eq!(collect(m.iter(&keys[2]).unwrap()), vec![(2, 20), (3, 30)]);
}

/// Whatever call applies the buffer when RocksDB refuses it (a read of a list with an
/// append still buffered, a snapshot, a registration, the close) reports the refusal, and
/// the backend refuses everything after it.
#[test]
fn a_refused_buffer_is_reported_by_whatever_call_applies_it() {
    use rockstate::testing::checks::refuse_writes;

    for applier in ["list read", "snapshot", "registration", "close"] {
        let dir = tempfile::tempdir().unwrap();
        let key = &owned_keys(1)[0];
        let backend = open(dir.path(), &ManualClock::new(0));
        let v = backend
            .register(ValueStateDescriptor::<String, u64>::new("v"))
            .unwrap();
        let l = backend
            .register(ListStateDescriptor::<String, u64>::new("l"))
            .unwrap();
        v.put(key, &1).unwrap();
        l.add(key, &2).unwrap();
        refuse_writes(dir.path(), true);
        let err = match applier {
            "list read" => l.get(key).unwrap_err(),
            "snapshot" => match backend.snapshot(1) {
                Err(e) => e,
                Ok(_) => panic!("the snapshot is refused"),
            },
            "registration" => backend
                .register(ValueStateDescriptor::<String, u64>::new("w"))
                .unwrap_err(),
            _ => {
                let err = backend.close().unwrap_err();
                refuse_writes(dir.path(), false);
                assert_eq!(err.kind(), ErrorKind::Internal, "{applier}: {err}");
                // The handles hold the database open.
                drop((v, l));
                let options = BackendOptions::for_subtask(dir.path(), 0, PAR, MAX_PAR).unwrap();
                let err = RocksStateBackend::open(options).unwrap_err();
                assert!(err.to_string().contains("not closed cleanly"), "{err}");
                continue;
            }
        };
        refuse_writes(dir.path(), false);
        assert_eq!(err.kind(), ErrorKind::Internal, "{applier}: {err}");
        let later = v.get(key).unwrap_err();
        assert!(later.to_string().contains("lost"), "{applier}: {later}");
    }
}

/// Dropping a state while writes to it and to another state are buffered keeps the other
/// state's writes, and a handle of the dropped state is refused rather than buffered.
#[test]
fn dropping_a_state_with_buffered_writes_keeps_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let keys = owned_keys(2);
    {
        let backend = open(dir.path(), &ManualClock::new(0));
        let kept = backend
            .register(ValueStateDescriptor::<String, u64>::new("kept"))
            .unwrap();
        let dropped = backend
            .register(ValueStateDescriptor::<String, u64>::new("dropped"))
            .unwrap();
        kept.put(&keys[0], &1).unwrap();
        dropped.put(&keys[0], &2).unwrap();
        kept.put(&keys[1], &3).unwrap();
        assert!(backend.drop_state("dropped").unwrap());
        let err = dropped.put(&keys[1], &4).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        kept.put(&keys[1], &5).unwrap();
        // Registered again under its name, in the same backend, it starts empty: the
        // values kept in memory for the dropped state went with it.
        let again = backend
            .register(ValueStateDescriptor::<String, u64>::new("dropped"))
            .unwrap();
        assert_eq!(again.get(&keys[0]).unwrap(), None);
        assert_eq!(kept.get(&keys[0]).unwrap(), Some(1));
        backend.close().unwrap();
    }
    let backend = open(dir.path(), &ManualClock::new(0));
    let kept = backend
        .register(ValueStateDescriptor::<String, u64>::new("kept"))
        .unwrap();
    assert_eq!(kept.get(&keys[0]).unwrap(), Some(1));
    assert_eq!(kept.get(&keys[1]).unwrap(), Some(5));
    let again = backend
        .register(ValueStateDescriptor::<String, u64>::new("dropped"))
        .unwrap();
    assert_eq!(again.get(&keys[0]).unwrap(), None);
}

/// The values kept in memory after writing them (the write buffer's cache) stay within
/// the quarter of the budget that backends sharing one `SharedResources` share, give the
/// memory back when their backends close, and never answer for more than they hold:
/// every key written still reads back, from memory or from RocksDB.
#[test]
fn values_kept_after_writing_stay_within_their_share_of_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let resources = SharedResources::new(4 << 20).unwrap();
    let (_, limit) = resources.value_cache_usage();
    assert_eq!(limit, 1 << 20);
    let open = |i: u32| {
        let options =
            BackendOptions::for_subtask(dir.path().join(i.to_string()), i, PAR, MAX_PAR).unwrap();
        RocksStateBackend::builder(options)
            .shared_resources(resources.clone())
            .open()
            .unwrap()
    };
    let backends = [open(0), open(1)];
    // A value of its own per key, of 100 bytes.
    let value_of = |key: &str| format!("{key:->100}").into_bytes();
    let mut written = Vec::new();
    for (i, backend) in backends.iter().enumerate() {
        let state = backend
            .register(ValueStateDescriptor::<String, Vec<u8>>::new("v"))
            .unwrap();
        let owned = if i == 0 {
            owned_keys(20_000)
        } else {
            foreign_keys(20_000)
        };
        for key in &owned {
            state.put(key, &value_of(key)).unwrap();
            // Read back, as a read-modify-write job would: values that answer reads are
            // kept (those of a state never read are not).
            assert_eq!(state.get(key).unwrap(), Some(value_of(key)), "{key}");
        }
        let (used, _) = resources.value_cache_usage();
        // Over by at most the last round of writes of each backend (256 writes, their
        // keys and values and the bytes counted per entry).
        assert!(
            used <= limit + 2 * 256 * 256,
            "backend {i}: {used} bytes kept, over {limit}"
        );
        // To stay within its share the backend let its values go, each time right after
        // the write applied last: the one read that followed missed. Every other read
        // found the value just written in memory, so it never paused.
        let stats = backend.value_cache_stats();
        assert!(stats.evictions > 0, "{stats:?}");
        assert_eq!(stats.lookups, 20_000, "{stats:?}");
        assert_eq!(stats.hits, 20_000 - stats.evictions, "{stats:?}");
        assert_eq!(stats.pauses, 0, "{stats:?}");
        written.push((state, owned, stats));
    }
    assert!(resources.value_cache_usage().0 > 0);
    for (state, owned, _) in &written {
        for key in owned {
            assert_eq!(state.get(key).unwrap(), Some(value_of(key)), "{key}");
        }
    }
    // Read again, most values came from RocksDB: memory held only the last ones.
    let mut kept = 0;
    for (backend, (_, _, before)) in backends.iter().zip(&written) {
        let now = backend.value_cache_stats();
        assert_eq!(now.lookups, 40_000, "{now:?}");
        let answered = now.hits - before.hits;
        // The 1 MiB budget (a backend takes more than its even share while the other
        // holds less) holds under 5 600 entries of a key, a 100-byte value and the 80
        // bytes counted per entry, and one round of 256 writes may pass it.
        assert!(answered > 0 && answered < 5_900, "{now:?} after {before:?}");
        kept += now.bytes;
    }
    assert_eq!(kept as usize, resources.value_cache_usage().0);
    drop(written);
    drop(backends);
    assert_eq!(
        resources.value_cache_usage().0,
        0,
        "memory kept after close"
    );
}
