//! Time to live configured like Flink's `StateTtlConfig`: renewal on read, visibility of
//! expired values, and canonical savepoints without expired entries.

mod common;

use std::time::Duration;

use common::*;
use rockstate::checkpoint::{CheckpointCoordinator, CoordinatorOptions, OperatorSpec};
use rockstate::format::KeyedSnapshot;
use rockstate::savepoint::Compression;
use rockstate::{
    BackendOptions, CheckpointStorage, ListStateDescriptor, ManualClock, MapStateDescriptor,
    RestoreOptions, RestoreSource, RocksStateBackend, SavepointFormat, StateTtlConfig,
    SubtaskSnapshot, TtlUpdate, TtlVisibility, ValueStateDescriptor,
};

const TTL: Duration = Duration::from_secs(10);

/// With renewal on read, a value read before it expires lives another TTL; a read of an
/// expired value renews nothing. Without it (the default), reads do not extend a life.
#[test]
fn reads_renew_the_time_to_live_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(100_000);
    let backend = open(dir.path(), &clock);
    let renew = StateTtlConfig::new(TTL).update(TtlUpdate::OnReadAndWrite);
    let value = backend
        .register(ValueStateDescriptor::<String, u64>::new("value").with_ttl_config(renew))
        .unwrap();
    let plain = backend
        .register(ValueStateDescriptor::<String, u64>::new("plain").with_ttl(TTL))
        .unwrap();
    let list = backend
        .register(ListStateDescriptor::<String, u64>::new("list").with_ttl_config(renew))
        .unwrap();
    let map = backend
        .register(MapStateDescriptor::<String, u8, u64>::new("map").with_ttl_config(renew))
        .unwrap();
    let keys = owned_keys(2);
    let (k, other) = (&keys[0], &keys[1]);
    value.put(k, &1).unwrap();
    plain.put(k, &1).unwrap();
    list.add(k, &1).unwrap();
    list.add(k, &2).unwrap();
    map.put(k, &1, &10).unwrap();
    map.put(k, &2, &20).unwrap();
    value.put(other, &9).unwrap();

    // Read at 9 s: every value of `k` starts a new life.
    clock.advance(Duration::from_secs(9));
    assert_eq!(value.get(k).unwrap(), Some(1));
    assert_eq!(plain.get(k).unwrap(), Some(1));
    assert_eq!(list.get(k).unwrap(), vec![1, 2]);
    assert_eq!(map.get(k, &1).unwrap(), Some(10));
    // At 15 s: renewed values live; the unread ones expired.
    clock.advance(Duration::from_secs(6));
    assert_eq!(value.get(k).unwrap(), Some(1));
    assert_eq!(plain.get(k).unwrap(), None, "reads do not renew by default");
    assert_eq!(list.get(k).unwrap(), vec![1, 2]);
    assert_eq!(map.get(k, &1).unwrap(), Some(10));
    assert_eq!(
        map.get(k, &2).unwrap(),
        None,
        "only the entry read was renewed"
    );
    assert_eq!(value.get(other).unwrap(), None);
    // An expired value is not brought back by a read.
    clock.advance(Duration::from_secs(10));
    assert_eq!(value.get(k).unwrap(), None);
    clock.advance(Duration::from_secs(1));
    assert_eq!(value.get(k).unwrap(), None);
}

/// `ReturnExpiredIfNotCleanedUp` returns expired values until compaction removes them;
/// another handle of the same state with the default visibility does not.
#[test]
fn expired_values_are_returned_until_cleaned_up_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(100_000);
    let backend = open(dir.path(), &clock);
    let lenient = StateTtlConfig::new(TTL).visibility(TtlVisibility::ReturnExpiredIfNotCleanedUp);
    let value = backend
        .register(ValueStateDescriptor::<String, u64>::new("value").with_ttl_config(lenient))
        .unwrap();
    let list = backend
        .register(ListStateDescriptor::<String, u64>::new("list").with_ttl_config(lenient))
        .unwrap();
    let map = backend
        .register(MapStateDescriptor::<String, u8, u64>::new("map").with_ttl_config(lenient))
        .unwrap();
    let keys = owned_keys(1);
    let k = &keys[0];
    value.put(k, &1).unwrap();
    // Elements appended with `add` are merged when read, and the merge cleans up expired
    // ones; a list written whole is returned until compaction.
    list.update(k, &[1]).unwrap();
    map.put(k, &1, &10).unwrap();
    clock.advance(TTL * 2);
    assert_eq!(value.get(k).unwrap(), Some(1));
    assert_eq!(list.get(k).unwrap(), vec![1]);
    assert_eq!(map.get(k, &1).unwrap(), Some(10));
    assert!(map.contains(k, &1).unwrap());
    assert_eq!(collect(value.all_keys().unwrap()).len(), 1);
    let strict = backend
        .register(ValueStateDescriptor::<String, u64>::new("value").with_ttl(TTL))
        .unwrap();
    assert_eq!(strict.get(k).unwrap(), None);
    // Once compaction removed it, a lenient reader no longer gets it either, although
    // the scan above applied the write buffer, whose values otherwise stay in memory.
    rockstate::testing::checks::compact_states(&backend);
    assert_eq!(value.get(k).unwrap(), None);
    assert_eq!(map.get(k, &1).unwrap(), None);
}

/// Renewal on read together with "return expired if not cleaned up": an expired value
/// (or list element) is returned, but never renewed, so it stays expired for a strict
/// reader. Before the fix, that read wrote it back with a new timestamp and it lived on.
#[test]
fn a_read_never_brings_an_expired_value_back_to_life() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(100_000);
    let backend = open(dir.path(), &clock);
    let both = StateTtlConfig::new(TTL)
        .update(TtlUpdate::OnReadAndWrite)
        .visibility(TtlVisibility::ReturnExpiredIfNotCleanedUp);
    let value = backend
        .register(ValueStateDescriptor::<String, u64>::new("value").with_ttl_config(both))
        .unwrap();
    let list = backend
        .register(ListStateDescriptor::<String, u64>::new("list").with_ttl_config(both))
        .unwrap();
    let keys = owned_keys(2);
    let (k, later) = (&keys[0], &keys[1]);
    value.put(k, &1).unwrap();
    list.update(k, &[1]).unwrap();
    clock.advance(TTL / 2);
    list.update(later, &[2]).unwrap();
    clock.advance(TTL * 3 / 4);
    // `k`'s value and list have expired; `later`'s list has not.
    assert_eq!(value.get(k).unwrap(), Some(1));
    assert_eq!(list.get(k).unwrap(), vec![1]);
    assert_eq!(list.get(later).unwrap(), vec![2]);
    let strict_value = backend
        .register(ValueStateDescriptor::<String, u64>::new("value").with_ttl(TTL))
        .unwrap();
    let strict_list = backend
        .register(ListStateDescriptor::<String, u64>::new("list").with_ttl(TTL))
        .unwrap();
    assert_eq!(
        strict_value.get(k).unwrap(),
        None,
        "the expired value was renewed"
    );
    assert!(
        strict_list.get(k).unwrap().is_empty(),
        "the expired list was renewed"
    );
    // The live list was renewed by the read: it outlives its first deadline.
    clock.advance(TTL / 2);
    assert_eq!(strict_list.get(later).unwrap(), vec![2]);
}

/// A canonical savepoint holds what reads would see: expired values, map entries and list
/// elements are left out, live ones restore at another parallelism.
#[test]
fn canonical_savepoints_leave_expired_entries_out() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(100_000);
    let backend = open(dir.path().join("source").as_path(), &clock);
    let value = backend
        .register(ValueStateDescriptor::<String, u64>::new("value").with_ttl(TTL))
        .unwrap();
    let list = backend
        .register(ListStateDescriptor::<String, u64>::new("list").with_ttl(TTL))
        .unwrap();
    let map = backend
        .register(MapStateDescriptor::<String, u8, u64>::new("map").with_ttl(TTL))
        .unwrap();
    let keys = owned_keys(2);
    let (old, young) = (&keys[0], &keys[1]);
    value.put(old, &1).unwrap();
    list.add(old, &1).unwrap();
    map.put(old, &1, &10).unwrap();
    clock.advance(Duration::from_secs(6));
    value.put(young, &2).unwrap();
    list.add(old, &2).unwrap();
    map.put(old, &2, &20).unwrap();
    clock.advance(Duration::from_secs(6));

    // A savepoint of the job: this backend is subtask 0 of 2; subtask 1 holds nothing.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = CheckpointStorage::open(dir.path().join("store").to_str().unwrap()).unwrap();
    let spec = vec![OperatorSpec {
        uid: "op".into(),
        parallelism: PAR,
        max_parallelism: MAX_PAR,
    }];
    let second = RocksStateBackend::open(
        BackendOptions::for_subtask(dir.path().join("second"), 1, PAR, MAX_PAR).unwrap(),
    )
    .unwrap();
    let folder = runtime.block_on(async {
        let mut coordinator = CheckpointCoordinator::start(
            store.child("job").unwrap(),
            "ttl",
            spec,
            CoordinatorOptions::default(),
        )
        .await
        .unwrap();
        let trigger = coordinator
            .trigger_savepoint(
                Some(&store.child("savepoints").unwrap()),
                SavepointFormat::Canonical,
            )
            .unwrap();
        for (i, b) in [&backend, &second].into_iter().enumerate() {
            let keyed = b
                .snapshot(trigger.checkpoint_id)
                .unwrap()
                .write_savepoint(
                    &trigger.folder,
                    "op",
                    i as u32,
                    SavepointFormat::Canonical,
                    Compression::default(),
                )
                .await
                .unwrap();
            if i == 0 {
                let KeyedSnapshot::Canonical(handle) = &keyed else {
                    panic!("not a canonical snapshot: {keyed:?}");
                };
                // value: `young` only; list: one element left under `old`; map: entry 2.
                assert_eq!(handle.entries, 3, "{handle:?}");
            }
            let ack = SubtaskSnapshot {
                keyed: Some(keyed),
                ..Default::default()
            };
            coordinator
                .acknowledge(trigger.checkpoint_id, "op", i as u32, ack)
                .await
                .unwrap();
        }
        trigger.folder
    });
    let source = runtime
        .block_on(RestoreSource::open_folder(&folder))
        .unwrap();
    let options = BackendOptions::for_subtask(dir.path().join("restored"), 0, 1, MAX_PAR).unwrap();
    let restored: RocksStateBackend = runtime
        .block_on(
            RocksStateBackend::builder(options)
                .clock(ManualClock::new(0))
                .restore_operator(&source, "op", &RestoreOptions::default()),
        )
        .unwrap();
    let value = restored
        .register(
            ValueStateDescriptor::<String, u64>::new("value").with_ttl_config(
                StateTtlConfig::new(TTL).visibility(TtlVisibility::ReturnExpiredIfNotCleanedUp),
            ),
        )
        .unwrap();
    let list = restored
        .register(ListStateDescriptor::<String, u64>::new("list").with_ttl(TTL))
        .unwrap();
    let map = restored
        .register(MapStateDescriptor::<String, u8, u64>::new("map").with_ttl(TTL))
        .unwrap();
    assert_eq!(value.get(old).unwrap(), None, "expired values stay behind");
    assert_eq!(value.get(young).unwrap(), Some(2));
    assert_eq!(list.get(old).unwrap(), vec![2]);
    assert_eq!(map.get(old, &1).unwrap(), None);
    assert_eq!(map.get(old, &2).unwrap(), Some(20));
}
