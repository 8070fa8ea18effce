//! Model-based test: random operation sequences on every state kind, with TTL on or off,
//! flushes and reopens, compared after every step with an in-memory model.
//! Seeded, so a failure replays exactly.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use rockstate::{
    AggregateFunction, AggregatingState, AggregatingStateDescriptor, BackendOptions, Clock,
    ErrorKind, ListState, ListStateDescriptor, ManualClock, MapState, MapStateDescriptor,
    ReducingState, ReducingStateDescriptor, RocksStateBackend, ValueState, ValueStateDescriptor,
};

const TTL_MS: u64 = 100;
const KEYS: usize = 4;
const NAMESPACES: u8 = 2;

#[derive(Debug, Clone)]
enum Op {
    ValuePut(usize, u8, u64),
    ValueClear(usize, u8),
    ListAdd(usize, u8, u64),
    ListUpdate(usize, u8, Vec<u64>),
    ListClear(usize, u8),
    MapPut(usize, u8, u8, u64),
    MapRemove(usize, u8, u8),
    MapClear(usize, u8),
    Reduce(usize, u8, u64),
    Aggregate(usize, u8, u64),
    Advance(u64),
    ForeignPut(usize),
    Flush,
    Reopen,
    /// Compares scans and iteration with the model (other steps compare point reads
    /// only: a scan applies buffered writes, so between scans they pile up).
    Scan,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let k = 0..KEYS;
    let ns = 0..NAMESPACES;
    prop_oneof![
        4 => (k.clone(), ns.clone(), 0..1000u64).prop_map(|(k, n, v)| Op::ValuePut(k, n, v)),
        1 => (k.clone(), ns.clone()).prop_map(|(k, n)| Op::ValueClear(k, n)),
        4 => (k.clone(), ns.clone(), 0..1000u64).prop_map(|(k, n, v)| Op::ListAdd(k, n, v)),
        1 => (k.clone(), ns.clone(), prop::collection::vec(0..1000u64, 0..4))
            .prop_map(|(k, n, v)| Op::ListUpdate(k, n, v)),
        1 => (k.clone(), ns.clone()).prop_map(|(k, n)| Op::ListClear(k, n)),
        4 => (k.clone(), ns.clone(), 0..6u8, 0..1000u64)
            .prop_map(|(k, n, u, v)| Op::MapPut(k, n, u, v)),
        2 => (k.clone(), ns.clone(), 0..6u8).prop_map(|(k, n, u)| Op::MapRemove(k, n, u)),
        1 => (k.clone(), ns.clone()).prop_map(|(k, n)| Op::MapClear(k, n)),
        3 => (k.clone(), ns.clone(), 0..1000u64).prop_map(|(k, n, v)| Op::Reduce(k, n, v)),
        3 => (k.clone(), ns.clone(), 0..1000u64).prop_map(|(k, n, v)| Op::Aggregate(k, n, v)),
        2 => (0..60u64).prop_map(Op::Advance),
        1 => (0..KEYS).prop_map(Op::ForeignPut),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Scan),
    ]
}

/// Count and sum of the inputs.
struct CountSum;

impl AggregateFunction for CountSum {
    type In = u64;
    type Acc = (u64, u64);
    type Out = (u64, u64);

    fn create_accumulator(&self) -> (u64, u64) {
        (0, 0)
    }
    fn add(&self, input: u64, acc: (u64, u64)) -> (u64, u64) {
        (acc.0 + 1, acc.1 + input)
    }
    fn get_result(&self, acc: &(u64, u64)) -> (u64, u64) {
        *acc
    }
}

type Slot = (usize, u8);

/// The expected contents, with the write time of every value.
#[derive(Default)]
struct Model {
    value: BTreeMap<Slot, (u64, u64)>,
    list: BTreeMap<Slot, Vec<(u64, u64)>>,
    map: BTreeMap<Slot, BTreeMap<u8, (u64, u64)>>,
    reduce: BTreeMap<Slot, (u64, u64)>,
    aggregate: BTreeMap<Slot, ((u64, u64), u64)>,
}

#[derive(Clone, Copy)]
struct Live {
    ttl: bool,
    now: u64,
}

impl Live {
    fn ok(&self, written: u64) -> bool {
        !self.ttl || self.now < written + TTL_MS
    }
}

struct States {
    backend: RocksStateBackend,
    value: ValueState<String, u64, u8>,
    list: ListState<String, u64, u8>,
    map: MapState<String, u8, u64, u8>,
    reduce: ReducingState<String, u64, u8>,
    aggregate: AggregatingState<String, CountSum, u8>,
}

fn open_states(dir: &Path, clock: &ManualClock, ttl: bool, buffered: usize) -> States {
    let mut options = BackendOptions::for_subtask(dir, 0, PAR, MAX_PAR).unwrap();
    options.buffered_writes = buffered;
    let backend = RocksStateBackend::builder(options)
        .clock(clock.clone())
        .open()
        .unwrap();
    let t = Duration::from_millis(TTL_MS);
    macro_rules! reg {
        ($d:expr) => {
            backend
                .register(if ttl { $d.with_ttl(t) } else { $d })
                .unwrap()
        };
    }
    States {
        value: reg!(ValueStateDescriptor::<String, u64, u8>::new("value")),
        list: reg!(ListStateDescriptor::<String, u64, u8>::new("list")),
        map: reg!(MapStateDescriptor::<String, u8, u64, u8>::new("map")),
        reduce: reg!(ReducingStateDescriptor::<String, u64, u8>::new(
            "reduce",
            |a, b| a + b
        )),
        aggregate: reg!(AggregatingStateDescriptor::<String, _, u8>::new(
            "agg", CountSum
        )),
        backend,
    }
}

fn run_case(ttl: bool, buffered: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000);
    let keys = owned_keys(KEYS);
    let foreign = foreign_keys(KEYS);
    let mut model = Model::default();
    let mut s = Some(open_states(dir.path(), &clock, ttl, buffered));

    for op in ops {
        let st = s.as_ref().unwrap();
        let now = clock.now_millis();
        let live = Live { ttl, now };
        match op.clone() {
            Op::ValuePut(k, n, v) => {
                st.value
                    .with_namespace(&n)
                    .unwrap()
                    .put(&keys[k], &v)
                    .unwrap();
                model.value.insert((k, n), (v, now));
            }
            Op::ValueClear(k, n) => {
                st.value
                    .with_namespace(&n)
                    .unwrap()
                    .clear(&keys[k])
                    .unwrap();
                model.value.remove(&(k, n));
            }
            Op::ListAdd(k, n, v) => {
                st.list
                    .with_namespace(&n)
                    .unwrap()
                    .add(&keys[k], &v)
                    .unwrap();
                model.list.entry((k, n)).or_default().push((v, now));
            }
            Op::ListUpdate(k, n, vs) => {
                st.list
                    .with_namespace(&n)
                    .unwrap()
                    .update(&keys[k], &vs)
                    .unwrap();
                if vs.is_empty() {
                    model.list.remove(&(k, n));
                } else {
                    model
                        .list
                        .insert((k, n), vs.iter().map(|v| (*v, now)).collect());
                }
            }
            Op::ListClear(k, n) => {
                st.list.with_namespace(&n).unwrap().clear(&keys[k]).unwrap();
                model.list.remove(&(k, n));
            }
            Op::MapPut(k, n, u, v) => {
                st.map
                    .with_namespace(&n)
                    .unwrap()
                    .put(&keys[k], &u, &v)
                    .unwrap();
                model.map.entry((k, n)).or_default().insert(u, (v, now));
            }
            Op::MapRemove(k, n, u) => {
                st.map
                    .with_namespace(&n)
                    .unwrap()
                    .remove(&keys[k], &u)
                    .unwrap();
                if let Some(m) = model.map.get_mut(&(k, n)) {
                    m.remove(&u);
                }
            }
            Op::MapClear(k, n) => {
                st.map.with_namespace(&n).unwrap().clear(&keys[k]).unwrap();
                model.map.remove(&(k, n));
            }
            Op::Reduce(k, n, v) => {
                st.reduce
                    .with_namespace(&n)
                    .unwrap()
                    .add(&keys[k], v)
                    .unwrap();
                let next = match model.reduce.get(&(k, n)) {
                    Some((cur, w)) if live.ok(*w) => cur + v,
                    _ => v,
                };
                model.reduce.insert((k, n), (next, now));
            }
            Op::Aggregate(k, n, v) => {
                st.aggregate
                    .with_namespace(&n)
                    .unwrap()
                    .add(&keys[k], v)
                    .unwrap();
                let (c, sum) = match model.aggregate.get(&(k, n)) {
                    Some((acc, w)) if live.ok(*w) => *acc,
                    _ => (0, 0),
                };
                model.aggregate.insert((k, n), ((c + 1, sum + v), now));
            }
            Op::Advance(ms) => clock.advance(Duration::from_millis(ms)),
            Op::ForeignPut(k) => {
                let err = st.value.put(&foreign[k], &1).unwrap_err();
                prop_assert_eq!(err.kind(), ErrorKind::InvalidArgument);
            }
            Op::Flush => st.backend.flush().unwrap(),
            Op::Reopen => {
                drop(s.take());
                s = Some(open_states(dir.path(), &clock, ttl, buffered));
            }
            Op::Scan => {}
        }
        if matches!(op, Op::Scan) {
            check(s.as_ref().unwrap(), &model, &keys, &clock, ttl)?;
        } else {
            check_point_reads(s.as_ref().unwrap(), &model, &keys, &clock, ttl)?;
        }
    }
    check(s.as_ref().unwrap(), &model, &keys, &clock, ttl)
}

/// What the model says a slot holds at `live.now`: the value, the list, the map entries,
/// the reduction and the aggregate.
type Expected = (
    Option<u64>,
    Vec<u64>,
    Vec<(u8, u64)>,
    Option<u64>,
    Option<(u64, u64)>,
);

fn expected(model: &Model, slot: Slot, live: Live) -> Expected {
    (
        model
            .value
            .get(&slot)
            .filter(|(_, w)| live.ok(*w))
            .map(|(v, _)| *v),
        model
            .list
            .get(&slot)
            .map(|l| {
                l.iter()
                    .filter(|(_, w)| live.ok(*w))
                    .map(|(v, _)| *v)
                    .collect()
            })
            .unwrap_or_default(),
        model
            .map
            .get(&slot)
            .map(|m| {
                m.iter()
                    .filter(|(_, (_, w))| live.ok(*w))
                    .map(|(u, (v, _))| (*u, *v))
                    .collect()
            })
            .unwrap_or_default(),
        model
            .reduce
            .get(&slot)
            .filter(|(_, w)| live.ok(*w))
            .map(|(v, _)| *v),
        model
            .aggregate
            .get(&slot)
            .filter(|(_, w)| live.ok(*w))
            .map(|(v, _)| *v),
    )
}

/// Compares the point reads of every slot with the model.
fn check_point_reads(
    st: &States,
    model: &Model,
    keys: &[String],
    clock: &ManualClock,
    ttl: bool,
) -> Result<(), TestCaseError> {
    let live = Live {
        ttl,
        now: clock.now_millis(),
    };
    for (k, key) in keys.iter().enumerate() {
        for n in 0..NAMESPACES {
            let (value, list, map_entries, reduced, aggregated) = expected(model, (k, n), live);
            prop_assert_eq!(
                st.value.with_namespace(&n).unwrap().get(key).unwrap(),
                value
            );
            prop_assert_eq!(st.list.with_namespace(&n).unwrap().get(key).unwrap(), list);
            let map = st.map.with_namespace(&n).unwrap();
            for u in 0..6u8 {
                let w = map_entries.iter().find(|(x, _)| *x == u).map(|(_, v)| *v);
                prop_assert_eq!(map.get(key, &u).unwrap(), w);
                prop_assert_eq!(map.contains(key, &u).unwrap(), w.is_some());
            }
            prop_assert_eq!(
                st.reduce.with_namespace(&n).unwrap().get(key).unwrap(),
                reduced
            );
            prop_assert_eq!(
                st.aggregate.with_namespace(&n).unwrap().get(key).unwrap(),
                aggregated
            );
        }
    }
    Ok(())
}

/// Compares point reads, then iteration and scans, with the model. Point reads come
/// first: with buffered writes, a scan applies the buffer, and the point reads before it
/// are answered from it.
fn check(
    st: &States,
    model: &Model,
    keys: &[String],
    clock: &ManualClock,
    ttl: bool,
) -> Result<(), TestCaseError> {
    check_point_reads(st, model, keys, clock, ttl)?;
    let live = Live {
        ttl,
        now: clock.now_millis(),
    };
    let mut expect_keys: [BTreeSet<(String, u8)>; 5] = Default::default();
    for (k, key) in keys.iter().enumerate() {
        for n in 0..NAMESPACES {
            let (value, list, map_entries, reduced, aggregated) = expected(model, (k, n), live);
            let map = st.map.with_namespace(&n).unwrap();
            prop_assert_eq!(&collect(map.iter(key).unwrap()), &map_entries);
            prop_assert_eq!(map.is_empty(key).unwrap(), map_entries.is_empty());
            let present = [
                value.is_some(),
                !list.is_empty(),
                !map_entries.is_empty(),
                reduced.is_some(),
                aggregated.is_some(),
            ];
            for (kind, present) in present.into_iter().enumerate() {
                if present {
                    expect_keys[kind].insert((key.clone(), n));
                }
            }
        }
    }
    let got: [BTreeSet<(String, u8)>; 5] = [
        collect(st.value.all_keys().unwrap()).into_iter().collect(),
        collect(st.list.all_keys().unwrap()).into_iter().collect(),
        collect(st.map.all_keys().unwrap()).into_iter().collect(),
        collect(st.reduce.all_keys().unwrap()).into_iter().collect(),
        collect(st.aggregate.all_keys().unwrap())
            .into_iter()
            .collect(),
    ];
    prop_assert_eq!(got, expect_keys);
    Ok(())
}

#[test]
fn random_operations_match_the_model() {
    let cases: u32 = std::env::var("ROCKSTATE_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(0x5eed_0001),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    // Writes buffered before they are applied: each at once, or after 1, 3 or the
    // default count of writes (reads then find them in the buffer).
    let buffered = prop::sample::select(vec![0, 1, 3, rockstate::DEFAULT_BUFFERED_WRITES]);
    let strategy = (
        any::<bool>(),
        buffered,
        prop::collection::vec(op_strategy(), 1..60),
    );
    runner
        .run(&strategy, |(ttl, buffered, ops)| {
            run_case(ttl, buffered, &ops)
        })
        .unwrap();
}
