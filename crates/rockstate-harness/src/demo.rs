//! The demo job run by `rockstate demo`: a deterministic keyed event stream, split into
//! source partitions, flowing into a stateful operator with uid [`DEMO_UID`] that keeps
//! per key a count, the last 8 values and a histogram of values.
//!
//! The stream is a pure function of `(seed, keys, events)`: the record at a partition's
//! offset never changes, so a run that crashes and resumes from a checkpoint (whose
//! operator state holds the partitions' offsets) replays exactly the records after it and
//! ends in the same state as an uninterrupted run, at any parallelism.

use std::sync::Arc;

use crate::{Operator, OperatorFactory, Source};
use rockstate::state::{
    ListState, ListStateDescriptor, MapState, MapStateDescriptor, ValueState, ValueStateDescriptor,
};
use rockstate::RocksStateBackend;
use rockstate::StateDigest;
use rockstate::{Error, Result};

/// The uid of the demo's keyed operator.
pub const DEMO_UID: &str = "counter";

/// Number of source partitions of the demo stream.
pub const DEMO_PARTITIONS: u32 = 8;

/// Values kept per key by the `recent` list state.
pub const RECENT_VALUES: usize = 8;

/// The demo's event stream: `events` records over `keys` keys, spread over
/// [`DEMO_PARTITIONS`] partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoSource {
    seed: u64,
    keys: u64,
    events: u64,
}

impl DemoSource {
    /// A stream of `events` records over `keys` keys (`key-0` …), generated from `seed`.
    ///
    /// Errors: `InvalidArgument` when `keys` is 0.
    pub fn new(seed: u64, keys: u64, events: u64) -> Result<Self> {
        if keys == 0 {
            return Err(Error::invalid("the demo needs at least one key"));
        }
        Ok(Self { seed, keys, events })
    }

    /// Records in `partition`: the events are dealt out as evenly as possible.
    pub fn partition_len(&self, partition: u32) -> u64 {
        let p = u64::from(DEMO_PARTITIONS);
        self.events / p + u64::from(u64::from(partition) < self.events % p)
    }
}

/// SplitMix64: a fast, well-mixed function of its input.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Source for DemoSource {
    type Key = String;
    type Value = u64;

    fn partitions(&self) -> u32 {
        DEMO_PARTITIONS
    }

    fn record(&self, partition: u32, offset: u64) -> Option<(String, u64)> {
        if partition >= DEMO_PARTITIONS || offset >= self.partition_len(partition) {
            return None;
        }
        let x = mix(self.seed ^ mix(u64::from(partition) << 48 ^ offset));
        Some((format!("key-{}", x % self.keys), (x >> 32) % 1000))
    }
}

/// The demo's keyed operator: per key a count, the last [`RECENT_VALUES`] values and a
/// histogram of values in buckets of 100.
pub struct Counter {
    count: ValueState<String, u64>,
    recent: ListState<String, u64>,
    histogram: MapState<String, u8, u64>,
}

impl Counter {
    /// Registers the operator's states on `backend`.
    ///
    /// Errors: `Incompatible` when the backend holds states of these names with other
    /// types (a restored snapshot of another job).
    pub fn new(backend: &RocksStateBackend) -> Result<Self> {
        Ok(Self {
            count: backend.register(ValueStateDescriptor::new("count"))?,
            recent: backend.register(ListStateDescriptor::new("recent"))?,
            histogram: backend.register(MapStateDescriptor::new("histogram"))?,
        })
    }

    /// A factory for the harness.
    pub fn factory() -> OperatorFactory<String, u64> {
        Arc::new(|backend: &RocksStateBackend| {
            Ok(Box::new(Counter::new(backend)?) as Box<dyn Operator<String, u64>>)
        })
    }
}

impl Operator<String, u64> for Counter {
    fn process(&mut self, key: &String, value: u64) -> Result<()> {
        let n = self.count.get(key)?.unwrap_or(0);
        self.count.put(key, &(n + 1))?;
        let mut recent = self.recent.get(key)?;
        recent.push(value);
        let keep = recent.len().saturating_sub(RECENT_VALUES);
        self.recent.update(key, &recent[keep..])?;
        let bucket = (value / 100) as u8;
        let c = self.histogram.get(key, &bucket)?.unwrap_or(0);
        self.histogram.put(key, &bucket, &(c + 1))
    }
}

/// The digest of the demo operator's state over all its subtasks' backends.
///
/// Errors: engine errors.
pub fn state_digest(backends: &[RocksStateBackend]) -> Result<StateDigest> {
    let mut digest = StateDigest::new();
    for backend in backends {
        digest.add_backend(DEMO_UID, backend)?;
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_a_function_of_its_parameters() {
        let s = DemoSource::new(7, 100, 1_003).unwrap();
        let total: u64 = (0..DEMO_PARTITIONS).map(|p| s.partition_len(p)).sum();
        assert_eq!(total, 1_003);
        assert_eq!(s.record(3, 5), s.record(3, 5));
        assert_ne!(s.record(3, 5), s.record(3, 6));
        assert_eq!(s.record(0, s.partition_len(0)), None);
        assert_eq!(s.record(DEMO_PARTITIONS, 0), None);
        let other = DemoSource::new(8, 100, 1_003).unwrap();
        assert_ne!(s.record(1, 1), other.record(1, 1));
        assert!(DemoSource::new(1, 0, 10).is_err());
    }
}
