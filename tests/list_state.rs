//! ListState: append by merge, update, namespaces, clear, iteration, TTL, checks, reopen.

mod common;

use std::time::Duration;

use common::*;
use rockstate::{ErrorKind, ListStateDescriptor, ManualClock};

#[test]
fn add_get_update_clear_with_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path(), &ManualClock::new(0));
    let state = backend
        .register(ListStateDescriptor::<String, String, u8>::new("l"))
        .unwrap();
    let keys = owned_keys(2);
    let a = state.with_namespace(&1).unwrap();
    let b = state.with_namespace(&2).unwrap();
    assert!(a.get(&keys[0]).unwrap().is_empty());
    a.add(&keys[0], &"x".into()).unwrap();
    a.add(&keys[0], &"y".into()).unwrap();
    a.add_all(&keys[0], &["z".into(), "".into()]).unwrap();
    a.add_all(&keys[0], &[]).unwrap();
    b.add(&keys[0], &"other".into()).unwrap();
    assert_eq!(a.get(&keys[0]).unwrap(), vec!["x", "y", "z", ""]);
    assert_eq!(b.get(&keys[0]).unwrap(), vec!["other"]);

    a.update(&keys[0], &["only".into()]).unwrap();
    assert_eq!(a.get(&keys[0]).unwrap(), vec!["only"]);
    a.add(&keys[0], &"more".into()).unwrap();
    assert_eq!(a.get(&keys[0]).unwrap(), vec!["only", "more"]);

    a.add(&keys[1], &"k1".into()).unwrap();
    let mut all = collect(state.all_keys().unwrap());
    all.sort();
    let mut expected = vec![
        (keys[0].clone(), 1),
        (keys[0].clone(), 2),
        (keys[1].clone(), 1),
    ];
    expected.sort();
    assert_eq!(all, expected);

    a.clear(&keys[0]).unwrap();
    assert!(a.get(&keys[0]).unwrap().is_empty());
    a.update(&keys[1], &[]).unwrap();
    assert!(a.get(&keys[1]).unwrap().is_empty());
    assert_eq!(b.get(&keys[0]).unwrap(), vec!["other"]);
}

#[test]
fn elements_expire_individually() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000);
    let backend = open(dir.path(), &clock);
    let state = backend
        .register(ListStateDescriptor::<String, u32>::new("l").with_ttl(Duration::from_secs(10)))
        .unwrap();
    let key = &owned_keys(1)[0];
    state.add(key, &1).unwrap();
    clock.advance(Duration::from_secs(6));
    state.add(key, &2).unwrap();
    clock.advance(Duration::from_secs(5));
    assert_eq!(state.get(key).unwrap(), vec![2]);
    assert_eq!(collect(state.all_keys().unwrap()).len(), 1);
    clock.advance(Duration::from_secs(5));
    assert!(state.get(key).unwrap().is_empty());
    assert!(collect(state.all_keys().unwrap()).is_empty());
}

#[test]
fn foreign_keys_rejected_and_lists_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(0);
    let keys = owned_keys(20);
    {
        let backend = open(dir.path(), &clock);
        let state = backend
            .register(ListStateDescriptor::<String, u64>::new("l"))
            .unwrap();
        let foreign = &foreign_keys(1)[0];
        assert_eq!(
            state.add(foreign, &1).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        for (i, k) in keys.iter().enumerate() {
            for j in 0..=i as u64 {
                state.add(k, &j).unwrap();
            }
        }
        // Half of the lists are flushed before more appends, so reads merge across files.
        backend.flush().unwrap();
        for k in &keys {
            state.add(k, &999).unwrap();
        }
    }
    let backend = open(dir.path(), &clock);
    let state = backend
        .register(ListStateDescriptor::<String, u64>::new("l"))
        .unwrap();
    for (i, k) in keys.iter().enumerate() {
        let mut expected: Vec<u64> = (0..=i as u64).collect();
        expected.push(999);
        assert_eq!(state.get(k).unwrap(), expected);
    }
}
