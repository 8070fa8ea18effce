//! ReducingState and AggregatingState: user functions, namespaces, clear, iteration, TTL,
//! key-group checks, reopen.

mod common;

use std::time::Duration;

use common::*;
use rockstate::{
    AggregateFunction, AggregatingStateDescriptor, ErrorKind, ManualClock, ReducingStateDescriptor,
};

/// Mean of `f64` inputs; stores `(sum, count)`.
struct Mean;

impl AggregateFunction for Mean {
    type In = f64;
    type Acc = (f64, u64);
    type Out = f64;

    fn create_accumulator(&self) -> (f64, u64) {
        (0.0, 0)
    }
    fn add(&self, input: f64, acc: (f64, u64)) -> (f64, u64) {
        (acc.0 + input, acc.1 + 1)
    }
    fn get_result(&self, acc: &(f64, u64)) -> f64 {
        acc.0 / acc.1 as f64
    }
}

#[test]
fn reducing_state_combines_values() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path(), &ManualClock::new(0));
    let sum = backend
        .register(ReducingStateDescriptor::<String, u64, u16>::new(
            "sum",
            |a, b| a + b,
        ))
        .unwrap();
    let max = backend
        .register(ReducingStateDescriptor::<String, u64>::new("max", u64::max))
        .unwrap();
    let keys = owned_keys(2);
    let n1 = sum.with_namespace(&1).unwrap();
    let n2 = sum.with_namespace(&2).unwrap();
    for v in [3, 4, 5] {
        n1.add(&keys[0], v).unwrap();
        max.add(&keys[0], v).unwrap();
    }
    n2.add(&keys[0], 100).unwrap();
    assert_eq!(n1.get(&keys[0]).unwrap(), Some(12));
    assert_eq!(n2.get(&keys[0]).unwrap(), Some(100));
    assert_eq!(max.get(&keys[0]).unwrap(), Some(5));
    assert_eq!(n1.get(&keys[1]).unwrap(), None);
    assert_eq!(collect(sum.all_keys().unwrap()).len(), 2);
    n1.clear(&keys[0]).unwrap();
    assert_eq!(n1.get(&keys[0]).unwrap(), None);
    n1.add(&keys[0], 7).unwrap();
    assert_eq!(n1.get(&keys[0]).unwrap(), Some(7));
    let foreign = &foreign_keys(1)[0];
    assert_eq!(
        max.add(foreign, 1).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn aggregating_state_folds_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(0);
    let keys = owned_keys(3);
    {
        let backend = open(dir.path(), &clock);
        let mean = backend
            .register(AggregatingStateDescriptor::<String, _>::new("mean", Mean))
            .unwrap();
        for (i, k) in keys.iter().enumerate() {
            for v in 0..=i {
                mean.add(k, v as f64).unwrap();
            }
        }
        assert_eq!(mean.get(&keys[2]).unwrap(), Some(1.0));
        mean.clear(&keys[1]).unwrap();
        assert_eq!(mean.get(&keys[1]).unwrap(), None);
        let foreign = &foreign_keys(1)[0];
        assert!(mean.add(foreign, 1.0).is_err());
    }
    let backend = open(dir.path(), &clock);
    let mean = backend
        .register(AggregatingStateDescriptor::<String, _>::new("mean", Mean))
        .unwrap();
    assert_eq!(mean.get(&keys[0]).unwrap(), Some(0.0));
    assert_eq!(mean.get(&keys[2]).unwrap(), Some(1.0));
    let mut all = collect(mean.all_keys().unwrap());
    all.sort();
    let mut expected = vec![(keys[0].clone(), ()), (keys[2].clone(), ())];
    expected.sort();
    assert_eq!(all, expected);
}

#[test]
fn ttl_restarts_the_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(0);
    let backend = open(dir.path(), &clock);
    let sum = backend
        .register(
            ReducingStateDescriptor::<String, u64>::new("sum", |a, b| a + b)
                .with_ttl(Duration::from_secs(1)),
        )
        .unwrap();
    let mean = backend
        .register(
            AggregatingStateDescriptor::<String, _>::new("mean", Mean)
                .with_ttl(Duration::from_secs(1)),
        )
        .unwrap();
    let key = &owned_keys(1)[0];
    sum.add(key, 5).unwrap();
    mean.add(key, 5.0).unwrap();
    clock.advance(Duration::from_millis(999));
    assert_eq!(sum.get(key).unwrap(), Some(5));
    clock.advance(Duration::from_millis(1));
    assert_eq!(sum.get(key).unwrap(), None);
    assert_eq!(mean.get(key).unwrap(), None);
    sum.add(key, 2).unwrap();
    mean.add(key, 1.0).unwrap();
    assert_eq!(
        sum.get(key).unwrap(),
        Some(2),
        "expired value is not reduced into"
    );
    assert_eq!(mean.get(key).unwrap(), Some(1.0));
}
