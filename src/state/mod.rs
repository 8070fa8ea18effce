//! Typed keyed state.
//!
//! A state is registered on a [`RocksStateBackend`](crate::RocksStateBackend) with a
//! descriptor ([`ValueStateDescriptor`], [`ListStateDescriptor`], [`MapStateDescriptor`],
//! [`ReducingStateDescriptor`], [`AggregatingStateDescriptor`]) and accessed through the
//! handle that registration returns. Every access names the key explicitly; the handle
//! carries the namespace (`()` unless chosen with `with_namespace`). Handles are cheap to
//! clone and can be used from several threads.
//!
//! Each state lives in its own RocksDB column family. Keys outside the backend's key-group
//! range are rejected with [`Error::KeyGroupOutOfRange`](crate::Error::KeyGroupOutOfRange).

mod aggregating;
mod core;
mod descriptor;
mod list;
mod map;
mod reducing;
mod value;

pub use crate::format::{StateKind, StateMeta};
pub use aggregating::{AggregateFunction, AggregatingState, AggregatingStateDescriptor};
pub(crate) use core::StateCore;
pub use core::{KeyIter, StateSpec};
pub use descriptor::{Migration, StateTtlConfig, TtlUpdate, TtlVisibility};
pub use list::{ListState, ListStateDescriptor};
pub use map::{MapEntryIter, MapState, MapStateDescriptor};
pub use reducing::{ReducingState, ReducingStateDescriptor};
pub use value::{ValueState, ValueStateDescriptor};
