//! `ValueState`: one value per key and namespace.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Result;
use crate::format::{StateKind, StateMeta};
use crate::state::core::{KeyIter, Sealed, StateCore, StateSpec, Types};
use crate::state::descriptor::{common_descriptor_methods, migration_methods, CommonOptions};

/// Describes a [`ValueState`] with key `K`, value `V` and namespace `N`.
///
/// ```
/// # use rockstate::ValueStateDescriptor;
/// let count = ValueStateDescriptor::<String, u64>::new("count");
/// # let _ = count;
/// ```
#[derive(Debug, Clone)]
pub struct ValueStateDescriptor<K, V, N = ()> {
    common: CommonOptions,
    _types: Types<(K, V, N)>,
}

impl<K, V, N> ValueStateDescriptor<K, V, N> {
    /// A descriptor for the state called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            common: CommonOptions::new(name),
            _types: PhantomData,
        }
    }

    migration_methods!(V; V: serde::Serialize,);

    common_descriptor_methods!();
}

impl<K, V, N> Sealed for ValueStateDescriptor<K, V, N> {}

impl<K, V, N> StateSpec for ValueStateDescriptor<K, V, N>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
    N: Serialize + DeserializeOwned,
{
    type Handle = ValueState<K, V, N>;

    fn meta(&self) -> StateMeta {
        self.common.apply(StateMeta::new::<K, N, V>(
            &self.common.name,
            StateKind::Value,
        ))
    }

    fn migrations(&self) -> &[crate::state::Migration] {
        &self.common.migrations
    }

    fn bind(self, core: StateCore) -> Self::Handle {
        let core = core.with_ttl_behaviour(self.common.behaviour());
        let core = core.for_namespace_type::<N>();
        ValueState {
            core,
            _types: PhantomData,
        }
    }
}

/// One value per key (in the handle's namespace).
///
/// Each call encodes the key, checks its key group and performs one RocksDB operation.
#[derive(Debug, Clone)]
pub struct ValueState<K, V, N = ()> {
    core: StateCore,
    _types: Types<(K, V, N)>,
}

impl<K, V, N> ValueState<K, V, N>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
    N: Serialize + DeserializeOwned,
{
    /// The same state, addressed in `namespace`.
    pub fn with_namespace(&self, namespace: &N) -> Result<Self> {
        Ok(Self {
            core: self.core.with_namespace(namespace)?,
            _types: PhantomData,
        })
    }

    /// The value for `key`, or `None` when absent or expired.
    ///
    /// Errors: `KeyGroupOutOfRange` for a key this backend does not own; `Corrupt` when the
    /// stored bytes do not decode as `V`.
    pub fn get(&self, key: &K) -> Result<Option<V>> {
        let raw_key = self.core.prefix(key)?;
        self.core.get_value(&raw_key)
    }

    /// Stores `value` for `key`, replacing any previous value.
    pub fn put(&self, key: &K, value: &V) -> Result<()> {
        let raw_key = self.core.prefix(key)?;
        let raw_value = self.core.encode_value(value)?;
        self.core
            .backend
            .put(&self.core.column, &raw_key, &raw_value)
    }

    /// Removes the value for `key`.
    pub fn clear(&self, key: &K) -> Result<()> {
        let raw_key = self.core.prefix(key)?;
        self.core.backend.delete(&self.core.column, &raw_key)
    }

    /// Every `(key, namespace)` with a live value in this backend's key groups.
    pub fn all_keys(&self) -> Result<KeyIter<'_, K, N>> {
        KeyIter::new(&self.core, StateKind::Value)
    }
}
