//! ValueState: namespaces, clear, iteration, TTL, key-group checks, reopen.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use rockstate::{Error, ErrorKind, ManualClock, ValueStateDescriptor};

#[test]
fn put_get_clear_and_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000);
    let backend = open(dir.path(), &clock);
    let state = backend
        .register(ValueStateDescriptor::<String, u64, u32>::new("v"))
        .unwrap();
    let keys = owned_keys(3);
    let w1 = state.with_namespace(&1).unwrap();
    let w2 = state.with_namespace(&2).unwrap();

    assert_eq!(w1.get(&keys[0]).unwrap(), None);
    w1.put(&keys[0], &10).unwrap();
    w2.put(&keys[0], &20).unwrap();
    w1.put(&keys[1], &11).unwrap();
    assert_eq!(w1.get(&keys[0]).unwrap(), Some(10));
    assert_eq!(w2.get(&keys[0]).unwrap(), Some(20));
    assert_eq!(w2.get(&keys[1]).unwrap(), None);

    w1.put(&keys[0], &15).unwrap();
    assert_eq!(w1.get(&keys[0]).unwrap(), Some(15));

    w1.clear(&keys[0]).unwrap();
    assert_eq!(w1.get(&keys[0]).unwrap(), None);
    assert_eq!(
        w2.get(&keys[0]).unwrap(),
        Some(20),
        "other namespace untouched"
    );

    let all: BTreeSet<(String, u32)> = collect(state.all_keys().unwrap()).into_iter().collect();
    let expected: BTreeSet<_> = [(keys[0].clone(), 2), (keys[1].clone(), 1)].into();
    assert_eq!(all, expected);
}

#[test]
fn keys_outside_the_range_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path(), &ManualClock::new(0));
    let state = backend
        .register(ValueStateDescriptor::<String, u64>::new("v"))
        .unwrap();
    for key in foreign_keys(5) {
        let err = state.put(&key, &1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        match &err {
            Error::KeyGroupOutOfRange {
                state, key_group, ..
            } => {
                assert_eq!(state, "v");
                assert!(*key_group >= 64);
            }
            other => panic!("unexpected error {other}"),
        }
        assert!(state.get(&key).is_err());
        assert!(state.clear(&key).is_err());
    }
    // Boundary: the last owned and first foreign key groups.
    let range = backend.key_group_range();
    assert_eq!((range.start(), range.end()), (0, 63));
    let owned = owned_keys(200);
    let last = owned
        .iter()
        .find(|k| rockstate::key_group_for(*k, MAX_PAR).unwrap() == 63);
    if let Some(key) = last {
        state.put(key, &1).unwrap();
    }
    let first_foreign = foreign_keys(400)
        .into_iter()
        .find(|k| rockstate::key_group_for(k, MAX_PAR).unwrap() == 64)
        .expect("some key hashes to group 64");
    assert!(state.put(&first_foreign, &1).is_err());
}

#[test]
fn ttl_hides_expired_values() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(10_000);
    let backend = open(dir.path(), &clock);
    let state = backend
        .register(
            ValueStateDescriptor::<String, String>::new("t").with_ttl(Duration::from_secs(10)),
        )
        .unwrap();
    let keys = owned_keys(2);
    state.put(&keys[0], &"a".to_string()).unwrap();
    clock.advance(Duration::from_secs(5));
    state.put(&keys[1], &"b".to_string()).unwrap();
    clock.advance(Duration::from_millis(4_999));
    assert_eq!(state.get(&keys[0]).unwrap().as_deref(), Some("a"));
    clock.advance(Duration::from_millis(1));
    assert_eq!(state.get(&keys[0]).unwrap(), None, "expired at exactly ttl");
    assert_eq!(state.get(&keys[1]).unwrap().as_deref(), Some("b"));
    assert_eq!(
        collect(state.all_keys().unwrap()),
        vec![(keys[1].clone(), ())]
    );
    // Writing again refreshes the timestamp.
    state.put(&keys[0], &"c".to_string()).unwrap();
    clock.advance(Duration::from_secs(9));
    assert_eq!(state.get(&keys[0]).unwrap().as_deref(), Some("c"));
}

#[test]
fn state_survives_reopen_of_the_same_dir() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(0);
    let keys = owned_keys(50);
    {
        let backend = open(dir.path(), &clock);
        let state = backend
            .register(ValueStateDescriptor::<String, u64>::new("v"))
            .unwrap();
        for (i, k) in keys.iter().enumerate() {
            state.put(k, &(i as u64)).unwrap();
        }
        drop(state);
        backend.close().unwrap();
    }
    let backend = open(dir.path(), &clock);
    assert_eq!(backend.states().len(), 1);
    let state = backend
        .register(ValueStateDescriptor::<String, u64>::new("v"))
        .unwrap();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(state.get(k).unwrap(), Some(i as u64));
    }
    assert_eq!(collect(state.all_keys().unwrap()).len(), keys.len());

    // Re-registering with another value type is refused, and names both types.
    let err = backend
        .register(ValueStateDescriptor::<String, String>::new("v"))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible);
    let text = err.to_string();
    assert!(text.contains("u64") && text.contains("String"), "{text}");
}
