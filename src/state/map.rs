//! `MapState`: a map of user keys to values per key and namespace.
//!
//! Each map entry is its own RocksDB entry under `key group ‖ key ‖ namespace ‖ user key`,
//! so `get`/`put`/`remove` touch one entry and iteration is a bounded prefix scan.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::engine::RawScan;
use crate::error::Result;
use crate::format::{StateKind, StateMeta};
use crate::state::core::{KeyIter, Sealed, StateCore, StateSpec, Types};
use crate::state::descriptor::{common_descriptor_methods, migration_methods, CommonOptions};

/// Describes a [`MapState`] with key `K`, user key `UK`, value `UV` and namespace `N`.
#[derive(Debug, Clone)]
pub struct MapStateDescriptor<K, UK, UV, N = ()> {
    common: CommonOptions,
    _types: Types<(K, UK, UV, N)>,
}

impl<K, UK, UV, N> MapStateDescriptor<K, UK, UV, N> {
    /// A descriptor for the state called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            common: CommonOptions::new(name),
            _types: PhantomData,
        }
    }

    migration_methods!(UV; UV: serde::Serialize,);

    common_descriptor_methods!();
}

impl<K, UK, UV, N> Sealed for MapStateDescriptor<K, UK, UV, N> {}

impl<K, UK, UV, N> StateSpec for MapStateDescriptor<K, UK, UV, N>
where
    K: Serialize + DeserializeOwned,
    UK: Serialize + DeserializeOwned,
    UV: Serialize + DeserializeOwned,
    N: Serialize + DeserializeOwned,
{
    type Handle = MapState<K, UK, UV, N>;

    fn meta(&self) -> StateMeta {
        let mut meta = StateMeta::new::<K, N, UV>(&self.common.name, StateKind::Map);
        meta.user_key_type = Some(crate::format::TypeInfo::of::<UK>());
        self.common.apply(meta)
    }

    fn migrations(&self) -> &[crate::state::Migration] {
        &self.common.migrations
    }

    fn bind(self, core: StateCore) -> Self::Handle {
        let core = core.with_ttl_behaviour(self.common.behaviour());
        let core = core.for_namespace_type::<N>();
        MapState {
            core,
            _types: PhantomData,
        }
    }
}

/// A map from `UK` to `UV` per key. With TTL, each entry expires on its own.
#[derive(Debug, Clone)]
pub struct MapState<K, UK, UV, N = ()> {
    core: StateCore,
    _types: Types<(K, UK, UV, N)>,
}

/// Number of deletions `clear` collects before writing them.
const CLEAR_BATCH: usize = 1024;

impl<K, UK, UV, N> MapState<K, UK, UV, N>
where
    K: Serialize + DeserializeOwned,
    UK: Serialize + DeserializeOwned,
    UV: Serialize + DeserializeOwned,
    N: Serialize + DeserializeOwned,
{
    /// The same state, addressed in `namespace`.
    pub fn with_namespace(&self, namespace: &N) -> Result<Self> {
        Ok(Self {
            core: self.core.with_namespace(namespace)?,
            _types: PhantomData,
        })
    }

    fn entry_key(&self, key: &K, user_key: &UK) -> Result<Vec<u8>> {
        let mut raw = self.core.prefix(key)?;
        codec::encode_into(&mut raw, user_key)?;
        Ok(raw)
    }

    /// The value under `user_key` in the map of `key`.
    pub fn get(&self, key: &K, user_key: &UK) -> Result<Option<UV>> {
        let raw_key = self.entry_key(key, user_key)?;
        self.core.get_value(&raw_key)
    }

    /// Whether the map of `key` holds a live value under `user_key`.
    pub fn contains(&self, key: &K, user_key: &UK) -> Result<bool> {
        let raw_key = self.entry_key(key, user_key)?;
        let now = self.core.read_now();
        self.core
            .backend
            .get_with(&self.core.column, &raw_key, |raw| match raw {
                Some(raw) => self.core.entry_is_live(StateKind::Map, raw, now),
                None => Ok(false),
            })
    }

    /// Stores `value` under `user_key` in the map of `key`.
    pub fn put(&self, key: &K, user_key: &UK, value: &UV) -> Result<()> {
        let raw_key = self.entry_key(key, user_key)?;
        let raw_value = self.core.encode_value(value)?;
        self.core
            .backend
            .put(&self.core.column, &raw_key, &raw_value)
    }

    /// Stores every `(user key, value)` of `entries` in the map of `key` with one write.
    pub fn put_all<'e>(
        &self,
        key: &K,
        entries: impl IntoIterator<Item = (&'e UK, &'e UV)>,
    ) -> Result<()>
    where
        UK: 'e,
        UV: 'e,
    {
        let prefix = self.core.prefix(key)?;
        let mut batch = Vec::new();
        for (user_key, value) in entries {
            let mut raw_key = prefix.clone();
            codec::encode_into(&mut raw_key, user_key)?;
            batch.push((raw_key, Some(self.core.encode_value(value)?)));
        }
        self.core.backend.write(&self.core.column, batch)
    }

    /// Removes `user_key` from the map of `key`.
    pub fn remove(&self, key: &K, user_key: &UK) -> Result<()> {
        let raw_key = self.entry_key(key, user_key)?;
        self.core.backend.delete(&self.core.column, &raw_key)
    }

    /// The live entries of the map of `key`, in storage order of the encoded user keys
    /// (numeric order for unsigned integers). Iteration streams from RocksDB.
    pub fn iter(&self, key: &K) -> Result<MapEntryIter<'_, UK, UV>> {
        let prefix = self.core.prefix(key)?;
        Ok(MapEntryIter {
            scan: self.core.scan_prefix(&prefix)?,
            core: &self.core,
            prefix_len: prefix.len(),
            now: self.core.read_now(),
            done: false,
            _types: PhantomData,
        })
    }

    /// The live user keys of the map of `key`.
    pub fn keys(&self, key: &K) -> Result<impl Iterator<Item = Result<UK>> + '_> {
        Ok(self.iter(key)?.map(|e| e.map(|(k, _)| k)))
    }

    /// The live values of the map of `key`.
    pub fn values(&self, key: &K) -> Result<impl Iterator<Item = Result<UV>> + '_> {
        Ok(self.iter(key)?.map(|e| e.map(|(_, v)| v)))
    }

    /// Whether the map of `key` has no live entry.
    pub fn is_empty(&self, key: &K) -> Result<bool> {
        let prefix = self.core.prefix(key)?;
        let mut scan = self.core.scan_prefix(&prefix)?;
        let now = self.core.read_now();
        while let Some((_, raw_value)) = scan.current()? {
            if self.core.entry_is_live(StateKind::Map, raw_value, now)? {
                return Ok(false);
            }
            scan.advance();
        }
        Ok(true)
    }

    /// Removes every entry of the map of `key`, in batches of bounded size, with one
    /// scan (the scan reads a consistent view, unaffected by its own deletions).
    pub fn clear(&self, key: &K) -> Result<()> {
        let prefix = self.core.prefix(key)?;
        let mut scan = self.core.scan_prefix(&prefix)?;
        let mut batch = Vec::with_capacity(CLEAR_BATCH);
        while let Some((raw_key, _)) = scan.current()? {
            batch.push((raw_key.to_vec(), None));
            scan.advance();
            if batch.len() == CLEAR_BATCH {
                self.core
                    .backend
                    .write(&self.core.column, std::mem::take(&mut batch))?;
            }
        }
        self.core.backend.write(&self.core.column, batch)
    }

    /// Every `(key, namespace)` whose map has a live entry, in this backend's key groups.
    pub fn all_keys(&self) -> Result<KeyIter<'_, K, N>> {
        KeyIter::new(&self.core, StateKind::Map)
    }
}

/// Iterator over the live `(user key, value)` entries of one map.
pub struct MapEntryIter<'a, UK, UV> {
    core: &'a StateCore,
    scan: RawScan<'a>,
    prefix_len: usize,
    now: u64,
    done: bool,
    _types: Types<(UK, UV)>,
}

impl<UK: DeserializeOwned, UV: DeserializeOwned> MapEntryIter<'_, UK, UV> {
    fn step(&mut self) -> Result<Option<(UK, UV)>> {
        loop {
            let Some((raw_key, raw_value)) = self.scan.current()? else {
                return Ok(None);
            };
            let value = match self.core.decode_live_at::<UV>(raw_value, self.now)? {
                Some(value) => value,
                None => {
                    self.scan.advance();
                    continue;
                }
            };
            let what = self.core.what();
            let user_key = codec::decode_exact::<UK>(&raw_key[self.prefix_len..], &what)?;
            self.scan.advance();
            return Ok(Some((user_key, value)));
        }
    }
}

impl<UK: DeserializeOwned, UV: DeserializeOwned> Iterator for MapEntryIter<'_, UK, UV> {
    type Item = Result<(UK, UV)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.step();
        if !matches!(item, Ok(Some(_))) {
            self.done = true;
        }
        item.transpose()
    }
}
