//! `ReducingState`: a value per key combined with a user reduce function.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Result;
use crate::format::{StateKind, StateMeta};
use crate::state::core::{KeyIter, Sealed, StateCore, StateSpec, Types};
use crate::state::descriptor::{common_descriptor_methods, migration_methods, CommonOptions};

type ReduceFn<V> = Arc<dyn Fn(V, V) -> V + Send + Sync>;

/// Describes a [`ReducingState`]: values of type `V` combined by `reduce(stored, new)`.
pub struct ReducingStateDescriptor<K, V, N = ()> {
    common: CommonOptions,
    reduce: ReduceFn<V>,
    _types: Types<(K, N)>,
}

impl<K, V, N> ReducingStateDescriptor<K, V, N> {
    /// A descriptor for the state called `name`, combining values with `reduce`.
    pub fn new(
        name: impl Into<String>,
        reduce: impl Fn(V, V) -> V + Send + Sync + 'static,
    ) -> Self {
        Self {
            common: CommonOptions::new(name),
            reduce: Arc::new(reduce),
            _types: PhantomData,
        }
    }

    migration_methods!(V; V: serde::Serialize,);

    common_descriptor_methods!();
}

impl<K, V, N> fmt::Debug for ReducingStateDescriptor<K, V, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReducingStateDescriptor")
            .field("common", &self.common)
            .finish_non_exhaustive()
    }
}

impl<K, V, N> Sealed for ReducingStateDescriptor<K, V, N> {}

impl<K, V, N> StateSpec for ReducingStateDescriptor<K, V, N>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
    N: Serialize + DeserializeOwned,
{
    type Handle = ReducingState<K, V, N>;

    fn meta(&self) -> StateMeta {
        self.common.apply(StateMeta::new::<K, N, V>(
            &self.common.name,
            StateKind::Reducing,
        ))
    }

    fn migrations(&self) -> &[crate::state::Migration] {
        &self.common.migrations
    }

    fn bind(self, core: StateCore) -> Self::Handle {
        let core = core.with_ttl_behaviour(self.common.behaviour());
        let core = core.for_namespace_type::<N>();
        ReducingState {
            core,
            reduce: self.reduce,
            _types: PhantomData,
        }
    }
}

/// A value per key that `add` combines with the stored one through the reduce function.
///
/// `add` reads, reduces and writes: it is not atomic with respect to concurrent `add`s of
/// the same key from several threads (a subtask processes its keys from one thread).
pub struct ReducingState<K, V, N = ()> {
    core: StateCore,
    reduce: ReduceFn<V>,
    _types: Types<(K, N)>,
}

impl<K, V, N> Clone for ReducingState<K, V, N> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
            reduce: self.reduce.clone(),
            _types: PhantomData,
        }
    }
}

impl<K, V, N> fmt::Debug for ReducingState<K, V, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReducingState")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl<K, V, N> ReducingState<K, V, N>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
    N: Serialize + DeserializeOwned,
{
    /// The same state, addressed in `namespace`.
    pub fn with_namespace(&self, namespace: &N) -> Result<Self> {
        Ok(Self {
            core: self.core.with_namespace(namespace)?,
            reduce: self.reduce.clone(),
            _types: PhantomData,
        })
    }

    /// The reduced value for `key`, or `None` when absent or expired.
    pub fn get(&self, key: &K) -> Result<Option<V>> {
        let raw_key = self.core.prefix(key)?;
        self.core.get_value(&raw_key)
    }

    /// Combines `value` into the stored value (or stores it when there is none).
    pub fn add(&self, key: &K, value: V) -> Result<()> {
        let raw_key = self.core.prefix(key)?;
        let next = match self.core.get_value_for_update::<V>(&raw_key)? {
            Some(current) => (self.reduce)(current, value),
            None => value,
        };
        let raw_value = self.core.encode_value(&next)?;
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
        KeyIter::new(&self.core, StateKind::Reducing)
    }
}
