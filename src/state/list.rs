//! `ListState`: an appendable list per key and namespace.
//!
//! `add` appends through RocksDB's merge operator: it writes the new element without
//! reading the list. Reads see all appended elements in order.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::engine::ttl;
use crate::error::{Error, Result};
use crate::format::{StateKind, StateMeta};
use crate::state::core::{KeyIter, Sealed, StateCore, StateSpec, Types};
use crate::state::descriptor::{common_descriptor_methods, migration_methods, CommonOptions};

/// Describes a [`ListState`] with key `K`, element `V` and namespace `N`.
#[derive(Debug, Clone)]
pub struct ListStateDescriptor<K, V, N = ()> {
    common: CommonOptions,
    _types: Types<(K, V, N)>,
}

impl<K, V, N> ListStateDescriptor<K, V, N> {
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

impl<K, V, N> Sealed for ListStateDescriptor<K, V, N> {}

impl<K, V, N> StateSpec for ListStateDescriptor<K, V, N>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
    N: Serialize + DeserializeOwned,
{
    type Handle = ListState<K, V, N>;

    fn meta(&self) -> StateMeta {
        self.common.apply(StateMeta::new::<K, N, V>(
            &self.common.name,
            StateKind::List,
        ))
    }

    fn migrations(&self) -> &[crate::state::Migration] {
        &self.common.migrations
    }

    fn bind(self, core: StateCore) -> Self::Handle {
        let core = core.with_ttl_behaviour(self.common.behaviour());
        let core = core.for_namespace_type::<N>();
        ListState {
            core,
            _types: PhantomData,
        }
    }
}

/// A list of `V` per key. With TTL, each element expires on its own.
#[derive(Debug, Clone)]
pub struct ListState<K, V, N = ()> {
    core: StateCore,
    _types: Types<(K, V, N)>,
}

impl<K, V, N> ListState<K, V, N>
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

    fn frame_all<'v>(&self, values: impl IntoIterator<Item = &'v V>) -> Result<Vec<u8>>
    where
        V: 'v,
    {
        let ttl = self.core.ttl_ms();
        // Elements carry a write time only under a time to live.
        let now = if ttl.is_some() { self.core.now() } else { 0 };
        let mut out = Vec::new();
        let mut payload = Vec::new();
        for value in values {
            payload.clear();
            codec::encode_into(&mut payload, value)?;
            ttl::frame_element(&mut out, ttl, now, &payload)?;
        }
        Ok(out)
    }

    /// Appends `value` to the list of `key` without reading the list.
    pub fn add(&self, key: &K, value: &V) -> Result<()> {
        self.add_all(key, std::slice::from_ref(value))
    }

    /// Appends all `values`, in order, with one write.
    pub fn add_all(&self, key: &K, values: &[V]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let raw_key = self.core.prefix(key)?;
        let operand = self.frame_all(values)?;
        self.core
            .backend
            .merge(&self.core.column, &raw_key, &operand)
    }

    /// Replaces the list of `key` with `values` (an empty slice clears it).
    pub fn update(&self, key: &K, values: &[V]) -> Result<()> {
        let raw_key = self.core.prefix(key)?;
        if values.is_empty() {
            return self.core.backend.delete(&self.core.column, &raw_key);
        }
        let raw_value = self.frame_all(values)?;
        self.core
            .backend
            .put(&self.core.column, &raw_key, &raw_value)
    }

    /// The live elements of the list of `key`, in insertion order; empty when absent.
    pub fn get(&self, key: &K) -> Result<Vec<V>> {
        let raw_key = self.core.prefix(key)?;
        let (ttl, now) = (self.core.ttl_ms(), self.core.read_now());
        let refresh = self.core.refreshes_on_read();
        let mut renewed: Option<Vec<u8>> = None;
        let values = self
            .core
            .backend
            .get_with(&self.core.column, &raw_key, |raw| {
                let Some(raw) = raw else {
                    return Ok(Vec::new());
                };
                let what = || self.core.what();
                let mut out = Vec::new();
                // The clock is read only for a renewal.
                let write_time = if refresh { self.core.now() } else { 0 };
                for element in ttl::Elements::new(raw, ttl.is_some()) {
                    let element = element.map_err(|e| Error::corrupt(what(), e))?;
                    if let (Some(ts), Some(ms)) = (element.written, ttl) {
                        if ttl::is_expired(ts, ms, now) {
                            continue;
                        }
                    }
                    if refresh {
                        // The elements read, written back with a new timestamp; an element
                        // expired now (returned until cleaned up) is not renewed but left
                        // out, as a read in Flink clears it.
                        let renewed = renewed.get_or_insert_with(Vec::new);
                        let live_now = match (element.written, ttl) {
                            (Some(ts), Some(ms)) => !ttl::is_expired(ts, ms, write_time),
                            _ => true,
                        };
                        if live_now {
                            ttl::frame_element(renewed, ttl, write_time, element.payload)?;
                        }
                    }
                    out.push(codec::decode_exact_with(element.payload, what)?);
                }
                Ok(out)
            })?;
        match renewed {
            Some(raw_value) if raw_value.is_empty() => {
                self.core.backend.delete(&self.core.column, &raw_key)?;
            }
            Some(raw_value) => {
                self.core
                    .backend
                    .put(&self.core.column, &raw_key, &raw_value)?;
            }
            None => {}
        }
        Ok(values)
    }

    /// Removes the list of `key`.
    pub fn clear(&self, key: &K) -> Result<()> {
        let raw_key = self.core.prefix(key)?;
        self.core.backend.delete(&self.core.column, &raw_key)
    }

    /// Every `(key, namespace)` whose list has a live element, in this backend's key groups.
    pub fn all_keys(&self) -> Result<KeyIter<'_, K, N>> {
        KeyIter::new(&self.core, StateKind::List)
    }
}
