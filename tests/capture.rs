//! A snapshot's synchronous phase only seals the memtables; its files are taken once the
//! flush it started is done. These tests put writes, flushes and registrations between
//! the two, in a fixed order, and check that a snapshot holds exactly the state of its
//! synchronous phase or is refused.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use rockstate::{
    BackendOptions, CheckpointStorage, ErrorKind, KeyedStateHandle, ListState, ListStateDescriptor,
    ManualClock, MapState, MapStateDescriptor, RocksStateBackend, ValueState, ValueStateDescriptor,
};

struct States {
    value: ValueState<String, u64>,
    list: ListState<String, u64>,
    map: MapState<String, u32, u64>,
}

type Model = BTreeMap<String, (Option<u64>, Vec<u64>, BTreeMap<u32, u64>)>;

fn register(b: &RocksStateBackend) -> States {
    States {
        value: b.register(ValueStateDescriptor::new("value")).unwrap(),
        list: b.register(ListStateDescriptor::new("list")).unwrap(),
        map: b.register(MapStateDescriptor::new("map")).unwrap(),
    }
}

/// Round `round`: puts, list appends (merges), map puts, and for every third key a
/// clear of the value and a removal from the map (deletes).
fn apply(s: &States, model: &mut Model, keys: &[String], round: u64) {
    for (i, key) in keys.iter().enumerate() {
        let v = round * 1_000 + i as u64;
        let entry = model.entry(key.clone()).or_default();
        if i % 3 == round as usize % 3 {
            s.value.clear(key).unwrap();
            entry.0 = None;
            s.map.remove(key, &(round as u32)).unwrap();
            entry.2.remove(&(round as u32));
        } else {
            s.value.put(key, &v).unwrap();
            entry.0 = Some(v);
        }
        s.list.add(key, &v).unwrap();
        entry.1.push(v);
        s.map.put(key, &(round as u32 + 1), &v).unwrap();
        entry.2.insert(round as u32 + 1, v);
    }
}

fn read(s: &States, keys: &[String]) -> Model {
    keys.iter()
        .map(|k| {
            let map = collect(s.map.iter(k).unwrap()).into_iter().collect();
            let list = s.list.get(k).unwrap();
            (k.clone(), (s.value.get(k).unwrap(), list, map))
        })
        .collect()
}

fn options(dir: &Path) -> BackendOptions {
    BackendOptions::for_subtask(dir, 0, PAR, MAX_PAR).unwrap()
}

async fn restored(handle: &KeyedStateHandle, job: &CheckpointStorage, dir: &Path) -> Model {
    let handle = KeyedStateHandle::decode(&handle.encode().unwrap()).unwrap();
    let b = RocksStateBackend::restore(options(dir), &handle, job)
        .await
        .unwrap();
    let model = read(&register(&b), &owned_keys(300));
    b.close().unwrap();
    model
}

/// A backend in a temporary directory with the three states, round 0 written to `n`
/// keys, and a job directory beside it.
struct Setup {
    dir: tempfile::TempDir,
    job: CheckpointStorage,
    b: RocksStateBackend,
    s: States,
    keys: Vec<String>,
    model: Model,
}

impl Setup {
    fn new(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let job = CheckpointStorage::open(&dir.path().join("job").to_string_lossy()).unwrap();
        let b = open(&dir.path().join("db"), &ManualClock::new(0));
        let s = register(&b);
        let keys = owned_keys(n);
        let mut model = Model::new();
        apply(&s, &mut model, &keys, 0);
        Self {
            dir,
            job,
            b,
            s,
            keys,
            model,
        }
    }
}

#[tokio::test]
async fn writes_after_the_synchronous_phase_are_not_in_the_snapshot() {
    let Setup {
        dir,
        job,
        b,
        s,
        keys,
        mut model,
    } = Setup::new(300);
    let first = b.snapshot(1).unwrap().upload(&job, "op", 0).await.unwrap();
    b.notify_checkpoint_complete(1);
    apply(&s, &mut model, &keys, 1);
    let at_cut = model.clone();

    let mut pending = b.snapshot(2).unwrap();
    assert_eq!(
        pending.staged_size(),
        (0, 0),
        "no file is taken before the flush"
    );
    // Everything below lands in the memtable after the cut: overwrites, merges onto
    // lists, deletes.
    apply(&s, &mut model, &keys, 2);
    apply(&s, &mut model, &keys, 3);
    pending.capture().await.unwrap();
    assert!(pending.staged_size().0 > 0);
    let second = pending.upload(&job, "op", 0).await.unwrap();
    b.notify_checkpoint_complete(2);

    assert_eq!(read(&s, &keys), model, "the live state has every write");
    assert_eq!(
        restored(&second, &job, &dir.path().join("r2")).await,
        at_cut
    );
    assert_ne!(at_cut, model);

    // The writes after the cut are in the next snapshot, which reuses the files of the
    // last one.
    let third = b.snapshot(3).unwrap().upload(&job, "op", 0).await.unwrap();
    assert_eq!(restored(&third, &job, &dir.path().join("r3")).await, model);
    let shared =
        |h: &KeyedStateHandle| -> Vec<String> { h.shared.iter().map(|f| f.path.clone()).collect() };
    assert!(shared(&second).iter().any(|p| shared(&third).contains(p)));
    assert!(shared(&first).iter().any(|p| shared(&second).contains(p)));
}

#[tokio::test]
async fn a_flush_after_the_synchronous_phase_refuses_the_capture() {
    let Setup {
        dir,
        job,
        b,
        s,
        keys,
        mut model,
    } = Setup::new(300);

    let hold = b.hold_snapshot_captures();
    let pending = b.snapshot(1).unwrap();
    apply(&s, &mut model, &keys, 1);
    // Data written after the cut reaches an SST file before the capture.
    b.flush().unwrap();
    drop(hold);
    let mut pending = pending;
    let err = pending.capture().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("moved on"), "{err}");
    // A refused snapshot stays refused: asking again, or uploading, never stores a
    // snapshot without its files.
    let again = pending.capture().await.unwrap_err();
    assert_eq!(again.to_string(), err.to_string());
    let err = pending.upload(&job, "op", 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");

    // The next snapshot flushes in its synchronous phase: its files are there at once.
    apply(&s, &mut model, &keys, 2);
    let at_two = model.clone();
    let pending = b.snapshot(2).unwrap();
    assert!(
        pending.staged_size().0 > 0,
        "flushed in the synchronous phase"
    );
    apply(&s, &mut model, &keys, 3);
    let handle = pending.upload(&job, "op", 0).await.unwrap();
    b.notify_checkpoint_complete(2);
    assert_eq!(
        restored(&handle, &job, &dir.path().join("r2")).await,
        at_two
    );

    // And the one after goes back to flushing in the background.
    let pending = b.snapshot(3).unwrap();
    assert_eq!(pending.staged_size(), (0, 0));
    let handle = pending.upload(&job, "op", 0).await.unwrap();
    assert_eq!(restored(&handle, &job, &dir.path().join("r3")).await, model);
}

#[tokio::test]
async fn a_state_registered_dropped_or_reconfigured_after_the_synchronous_phase_refuses_the_capture(
) {
    let Setup {
        dir: _dir,
        job,
        b,
        keys,
        ..
    } = Setup::new(50);

    let hold = b.hold_snapshot_captures();
    let pending = b.snapshot(1).unwrap();
    let late: ValueState<String, u64> = b.register(ValueStateDescriptor::new("late")).unwrap();
    late.put(&keys[0], &7).unwrap();
    drop(hold);
    let err = pending.upload(&job, "op", 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");

    // Flushed in the synchronous phase, the next one holds the new state.
    let handle = b.snapshot(2).unwrap().upload(&job, "op", 0).await.unwrap();
    assert!(handle.states.iter().any(|m| m.name == "late"));

    let hold = b.hold_snapshot_captures();
    let pending = b.snapshot(3).unwrap();
    assert!(b.drop_state("late").unwrap());
    drop(hold);
    let err = pending.upload(&job, "op", 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");

    // New settings of a state (a shorter time-to-live changes what a flush keeps).
    let hour = std::time::Duration::from_secs(3_600);
    let ttl: ValueState<String, u64> = b
        .register(ValueStateDescriptor::new("ttl").with_ttl(hour))
        .unwrap();
    ttl.put(&keys[0], &1).unwrap();
    b.snapshot(4).unwrap().upload(&job, "op", 0).await.unwrap();
    let hold = b.hold_snapshot_captures();
    let pending = b.snapshot(5).unwrap();
    let minute = std::time::Duration::from_secs(60);
    let _shorter: ValueState<String, u64> = b
        .register(ValueStateDescriptor::new("ttl").with_ttl(minute))
        .unwrap();
    drop(hold);
    let err = pending.upload(&job, "op", 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
}

#[tokio::test]
async fn an_abandoned_capture_leaves_nothing_and_a_dropped_backend_frees_its_directory() {
    let Setup {
        dir,
        job,
        b,
        s,
        keys,
        mut model,
    } = Setup::new(300);
    let staging = BackendOptions::for_subtask(dir.path().join("db"), 0, PAR, MAX_PAR)
        .unwrap()
        .staging_dir();
    let staged = || -> Vec<String> {
        std::fs::read_dir(&staging)
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };

    // Dropped before its files are taken: the capture removes what it links.
    let hold = b.hold_snapshot_captures();
    let abandoned = b.snapshot(1).unwrap();
    drop(abandoned);
    drop(hold);
    // The next snapshot waits for the first capture to finish.
    let mut next = b.snapshot(2).unwrap();
    assert!(
        staged().iter().all(|name| !name.starts_with("chk-1-")),
        "{:?}",
        staged()
    );
    next.capture().await.unwrap();
    let handle = next.upload(&job, "op", 0).await.unwrap();
    assert!(staged().is_empty(), "{:?}", staged());
    assert_eq!(restored(&handle, &job, &dir.path().join("r2")).await, model);

    // A backend dropped right after a snapshot waits for its capture: the directory
    // reopens at once (the capture held the database open).
    apply(&s, &mut model, &keys, 1);
    let pending = b.snapshot(3).unwrap();
    drop(s);
    drop(b);
    // (Staged snapshots do not outlive a reopen: the directory's staging area is
    // cleared when it opens.)
    drop(pending);
    let reopened = open(&dir.path().join("db"), &ManualClock::new(0));
    let states = register(&reopened);
    assert_eq!(read(&states, &keys), model);
}

/// Backends that share one memory budget share its write buffers. When those are near
/// their size at a snapshot's synchronous phase, a write after the cut could make RocksDB
/// seal the backend's fresh memtable to keep them within it, which would refuse the
/// capture: the synchronous phase then flushes and takes the files itself, and the
/// snapshot holds exactly the state of its cut.
#[tokio::test]
async fn a_snapshot_with_the_shared_write_buffers_near_their_size_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let job = CheckpointStorage::open(&dir.path().join("job").to_string_lossy()).unwrap();
    let resources = rockstate::SharedResources::new(4 << 20).unwrap();
    // Each write applied at once: the writes after the cut reach the memtable as soon as
    // they are made (buffered, fewer than a buffer's count would wait for the next
    // snapshot, and the seal this guards against would come later or not at all).
    let mut b_options = options(&dir.path().join("db"));
    b_options.buffered_writes = 0;
    let b = RocksStateBackend::builder(b_options)
        .shared_resources(resources.clone())
        .open()
        .unwrap();
    let other = RocksStateBackend::builder(BackendOptions::new(
        dir.path().join("other"),
        rockstate::KeyGroupRange::all(MAX_PAR).unwrap(),
        MAX_PAR,
    ))
    .shared_resources(resources.clone())
    .open()
    .unwrap();
    let s = register(&b);
    let keys = owned_keys(50);
    let mut model = Model::new();
    apply(&s, &mut model, &keys, 0);
    // The other backend fills the shared write buffers to 80% of their size, over three
    // columns, each below its own write buffer size (so that none is sealed).
    let fill: Vec<ValueState<u32, Vec<u8>>> = (0..3)
        .map(|c| {
            other
                .register(ValueStateDescriptor::new(format!("fill-{c}")))
                .unwrap()
        })
        .collect();
    let (_, size) = resources.write_buffer_usage();
    let mut n = 0u32;
    while resources.write_buffer_usage().0 < size / 10 * 8 {
        fill[(n % 3) as usize].put(&n, &vec![7u8; 1024]).unwrap();
        n += 1;
        assert!(
            n < 10_000,
            "the write buffers did not fill: {:?}",
            resources.write_buffer_usage()
        );
    }
    let at_cut = model.clone();
    let hold = b.hold_snapshot_captures();
    let mut pending = b.snapshot(1).unwrap();
    apply(&s, &mut model, &keys, 1);
    drop(hold);
    pending.capture().await.unwrap();
    let handle = pending.upload(&job, "op", 0).await.unwrap();
    let mut restored = restored(&handle, &job, &dir.path().join("r")).await;
    // (Read over more keys than were written.)
    restored.retain(|key, _| keys.contains(key));
    assert_eq!(restored, at_cut);
    drop(other);
}
