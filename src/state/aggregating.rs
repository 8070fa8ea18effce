//! `AggregatingState`: an accumulator per key updated by a user aggregate function.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Result;
use crate::format::{StateKind, StateMeta};
use crate::state::core::{KeyIter, Sealed, StateCore, StateSpec, Types};
use crate::state::descriptor::{common_descriptor_methods, migration_methods, CommonOptions};

/// How an [`AggregatingState`] folds inputs of type `In` into an accumulator and reads a
/// result of type `Out` from it. Only the accumulator is stored.
pub trait AggregateFunction: Send + Sync + 'static {
    /// The input type given to `add`.
    type In;
    /// The stored accumulator.
    type Acc: Serialize + DeserializeOwned;
    /// The result type returned by `get`.
    type Out;

    /// A fresh, empty accumulator.
    fn create_accumulator(&self) -> Self::Acc;
    /// Folds `input` into `acc`.
    fn add(&self, input: Self::In, acc: Self::Acc) -> Self::Acc;
    /// Reads the result from `acc`.
    fn get_result(&self, acc: &Self::Acc) -> Self::Out;
}

/// Describes an [`AggregatingState`] with key `K`, aggregate function `F` and namespace `N`.
pub struct AggregatingStateDescriptor<K, F, N = ()> {
    common: CommonOptions,
    function: Arc<F>,
    _types: Types<(K, N)>,
}

impl<K, F, N> AggregatingStateDescriptor<K, F, N> {
    /// A descriptor for the state called `name`, aggregating with `function`.
    pub fn new(name: impl Into<String>, function: F) -> Self {
        Self {
            common: CommonOptions::new(name),
            function: Arc::new(function),
            _types: PhantomData,
        }
    }

    migration_methods!(F::Acc; F: crate::state::AggregateFunction,);

    common_descriptor_methods!();
}

impl<K, F, N> fmt::Debug for AggregatingStateDescriptor<K, F, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregatingStateDescriptor")
            .field("common", &self.common)
            .finish_non_exhaustive()
    }
}

impl<K, F, N> Sealed for AggregatingStateDescriptor<K, F, N> {}

impl<K, F, N> StateSpec for AggregatingStateDescriptor<K, F, N>
where
    K: Serialize + DeserializeOwned,
    F: AggregateFunction,
    N: Serialize + DeserializeOwned,
{
    type Handle = AggregatingState<K, F, N>;

    fn meta(&self) -> StateMeta {
        self.common.apply(StateMeta::new::<K, N, F::Acc>(
            &self.common.name,
            StateKind::Aggregating,
        ))
    }

    fn migrations(&self) -> &[crate::state::Migration] {
        &self.common.migrations
    }

    fn bind(self, core: StateCore) -> Self::Handle {
        let core = core.with_ttl_behaviour(self.common.behaviour());
        let core = core.for_namespace_type::<N>();
        AggregatingState {
            core,
            function: self.function,
            _types: PhantomData,
        }
    }
}

/// An accumulator per key; `add` folds an input in, `get` returns the function's result.
///
/// `add` reads, folds and writes; concurrent `add`s of the same key from several threads
/// are not atomic (a subtask processes its keys from one thread).
pub struct AggregatingState<K, F, N = ()> {
    core: StateCore,
    function: Arc<F>,
    _types: Types<(K, N)>,
}

impl<K, F, N> Clone for AggregatingState<K, F, N> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
            function: self.function.clone(),
            _types: PhantomData,
        }
    }
}

impl<K, F, N> fmt::Debug for AggregatingState<K, F, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregatingState")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl<K, F, N> AggregatingState<K, F, N>
where
    K: Serialize + DeserializeOwned,
    F: AggregateFunction,
    N: Serialize + DeserializeOwned,
{
    /// The same state, addressed in `namespace`.
    pub fn with_namespace(&self, namespace: &N) -> Result<Self> {
        Ok(Self {
            core: self.core.with_namespace(namespace)?,
            function: self.function.clone(),
            _types: PhantomData,
        })
    }

    /// The aggregate result for `key`, or `None` when nothing was added (or it expired).
    pub fn get(&self, key: &K) -> Result<Option<F::Out>> {
        let raw_key = self.core.prefix(key)?;
        let acc = self.core.get_value::<F::Acc>(&raw_key)?;
        Ok(acc.map(|acc| self.function.get_result(&acc)))
    }

    /// Folds `input` into the accumulator of `key`.
    pub fn add(&self, key: &K, input: F::In) -> Result<()> {
        let raw_key = self.core.prefix(key)?;
        let acc = match self.core.get_value_for_update::<F::Acc>(&raw_key)? {
            Some(acc) => acc,
            None => self.function.create_accumulator(),
        };
        let next = self.function.add(input, acc);
        let raw_value = self.core.encode_value(&next)?;
        self.core
            .backend
            .put(&self.core.column, &raw_key, &raw_value)
    }

    /// Removes the accumulator of `key`.
    pub fn clear(&self, key: &K) -> Result<()> {
        let raw_key = self.core.prefix(key)?;
        self.core.backend.delete(&self.core.column, &raw_key)
    }

    /// Every `(key, namespace)` with a live accumulator in this backend's key groups.
    pub fn all_keys(&self) -> Result<KeyIter<'_, K, N>> {
        KeyIter::new(&self.core, StateKind::Aggregating)
    }
}
