//! MapState: entry operations, prefix iteration, namespaces, clear, TTL, checks, reopen.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use rockstate::{ErrorKind, ManualClock, MapStateDescriptor};

#[test]
fn entry_operations_and_iteration() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path(), &ManualClock::new(0));
    let state = backend
        .register(MapStateDescriptor::<String, u32, String>::new("m"))
        .unwrap();
    let keys = owned_keys(2);
    let (k0, k1) = (&keys[0], &keys[1]);
    assert!(state.is_empty(k0).unwrap());
    for uk in [300u32, 2, 70_000, 1] {
        state.put(k0, &uk, &format!("v{uk}")).unwrap();
    }
    state.put(k1, &2, &"other".into()).unwrap();
    assert!(!state.is_empty(k0).unwrap());
    assert!(state.contains(k0, &300).unwrap());
    assert!(!state.contains(k0, &3).unwrap());
    assert_eq!(state.get(k0, &2).unwrap().as_deref(), Some("v2"));
    assert_eq!(state.get(k0, &5).unwrap(), None);

    // Iteration yields exactly this key's entries, in numeric order of the user keys.
    let entries = collect(state.iter(k0).unwrap());
    assert_eq!(
        entries.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        vec![1, 2, 300, 70_000]
    );
    assert_eq!(collect(state.keys(k1).unwrap()), vec![2]);
    assert_eq!(
        collect(state.values(k1).unwrap()),
        vec!["other".to_string()]
    );

    state.remove(k0, &2).unwrap();
    assert!(!state.contains(k0, &2).unwrap());
    assert_eq!(collect(state.keys(k0).unwrap()), vec![1, 300, 70_000]);

    let extra: BTreeMap<u32, String> = (10..15).map(|i| (i, format!("e{i}"))).collect();
    state.put_all(k0, &extra).unwrap();
    assert_eq!(collect(state.iter(k0).unwrap()).len(), 8);

    let mut all = collect(state.all_keys().unwrap());
    all.sort();
    let mut expected = vec![(k0.clone(), ()), (k1.clone(), ())];
    expected.sort();
    assert_eq!(all, expected, "one entry per key, not per user key");

    state.clear(k0).unwrap();
    assert!(state.is_empty(k0).unwrap());
    assert_eq!(collect(state.iter(k0).unwrap()), vec![]);
    assert_eq!(state.get(k1, &2).unwrap().as_deref(), Some("other"));
}

#[test]
fn clear_of_a_large_map_and_namespaces_are_exact_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path(), &ManualClock::new(0));
    let state = backend
        .register(MapStateDescriptor::<String, u64, u64, String>::new("m"))
        .unwrap();
    let key = &owned_keys(1)[0];
    // Namespaces where one is a string prefix of the other must not bleed into each other.
    let a = state.with_namespace(&"w".to_string()).unwrap();
    let b = state.with_namespace(&"w1".to_string()).unwrap();
    for i in 0..3_000u64 {
        a.put(key, &i, &i).unwrap();
    }
    b.put(key, &1, &100).unwrap();
    assert_eq!(collect(a.iter(key).unwrap()).len(), 3_000);
    a.clear(key).unwrap();
    assert!(a.is_empty(key).unwrap());
    assert_eq!(collect(b.iter(key).unwrap()), vec![(1, 100)]);
}

#[test]
fn entries_expire_individually() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(0);
    let backend = open(dir.path(), &clock);
    let state = backend
        .register(MapStateDescriptor::<String, u8, u8>::new("m").with_ttl(Duration::from_secs(1)))
        .unwrap();
    let key = &owned_keys(1)[0];
    state.put(key, &1, &1).unwrap();
    clock.advance(Duration::from_millis(600));
    state.put(key, &2, &2).unwrap();
    clock.advance(Duration::from_millis(600));
    assert_eq!(collect(state.iter(key).unwrap()), vec![(2, 2)]);
    assert!(!state.contains(key, &1).unwrap());
    assert!(state.contains(key, &2).unwrap());
    assert_eq!(collect(state.all_keys().unwrap()).len(), 1);
    clock.advance(Duration::from_millis(600));
    assert!(state.is_empty(key).unwrap());
    assert!(collect(state.all_keys().unwrap()).is_empty());
}

#[test]
fn foreign_keys_rejected_and_maps_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(0);
    let keys = owned_keys(10);
    {
        let backend = open(dir.path(), &clock);
        let state = backend
            .register(MapStateDescriptor::<String, String, u64>::new("m"))
            .unwrap();
        let foreign = &foreign_keys(1)[0];
        assert_eq!(
            state.put(foreign, &"a".into(), &1).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert!(state.iter(foreign).is_err());
        for (i, k) in keys.iter().enumerate() {
            state.put(k, &format!("u{i}"), &(i as u64)).unwrap();
        }
    }
    let backend = open(dir.path(), &clock);
    let state = backend
        .register(MapStateDescriptor::<String, String, u64>::new("m"))
        .unwrap();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            collect(state.iter(k).unwrap()),
            vec![(format!("u{i}"), i as u64)]
        );
    }
}

/// A windowed map state (namespace type `u64`, the window) used through a handle on which
/// `with_namespace` was never called.
///
/// Proves: every access is refused with `InvalidArgument` naming the state and the
/// namespace type, instead of silently using the `()` namespace (whose data a windowed
/// read would then decode as another window's, or fail as `Corrupt`); after
/// `with_namespace` the same handle type reads and writes its window only.
#[test]
fn a_namespaced_handle_needs_a_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path(), &ManualClock::new(0));
    let counts = backend
        .register(MapStateDescriptor::<String, String, u64, u64>::new(
            "window-counts",
        ))
        .unwrap();
    let key = &owned_keys(1)[0];
    let err = counts.put(key, &"word".to_string(), &1).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("window-counts") && text.contains("u64") && text.contains("with_namespace"),
        "{text}"
    );
    assert_eq!(
        counts.get(key, &"word".to_string()).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    let window_1 = counts.with_namespace(&1).unwrap();
    let window_2 = counts.with_namespace(&2).unwrap();
    window_1.put(key, &"word".to_string(), &5).unwrap();
    assert_eq!(window_1.get(key, &"word".to_string()).unwrap(), Some(5));
    assert_eq!(window_2.get(key, &"word".to_string()).unwrap(), None);
}
