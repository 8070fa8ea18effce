//! What every state handle shares: the backend, the column family, the namespace, TTL.

use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::engine::ttl;
use crate::engine::{BackendCore, ColumnSettings, RawScan};
use crate::error::{Error, Result};
use crate::format::StateKind;
use crate::format::StateMeta;
use crate::keygroup;

/// Marks the types a handle is generic over without owning values of them; keeps handles
/// `Send + Sync` whatever the types.
pub(crate) type Types<T> = PhantomData<fn() -> T>;

mod sealed {
    pub trait Sealed {}
}
pub(crate) use sealed::Sealed;

/// A state descriptor that [`RocksStateBackend::register`](crate::RocksStateBackend::register)
/// accepts. Implemented by the descriptor types of this crate only.
pub trait StateSpec: Sealed {
    /// The handle that registration returns.
    type Handle;

    /// The metadata recorded for the state.
    fn meta(&self) -> StateMeta;

    /// The migrations of stored values the descriptor declares.
    fn migrations(&self) -> &[super::descriptor::Migration] {
        &[]
    }

    /// Builds the handle once the backend has registered the state.
    #[doc(hidden)]
    fn bind(self, core: StateCore) -> Self::Handle;
}

/// Internal part of every state handle. Not constructible outside the crate.
#[derive(Clone)]
pub struct StateCore {
    pub(crate) backend: Arc<BackendCore>,
    pub(crate) name: Arc<str>,
    pub(crate) column: Arc<ColumnSettings>,
    /// The serialized namespace the handle addresses; `None` until
    /// [`with_namespace`](Self::with_namespace) for a state whose namespace type is not `()`.
    pub(crate) namespace: Option<Arc<[u8]>>,
    /// The namespace type's name, for the error of a handle without a namespace.
    namespace_type: &'static str,
    /// How reads treat time to live (renewal, visibility of expired values).
    pub(crate) ttl: super::descriptor::TtlBehaviour,
}

impl std::fmt::Debug for StateCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCore")
            .field("name", &self.name)
            .field("namespace_len", &self.namespace.as_ref().map(|n| n.len()))
            .finish()
    }
}

impl StateCore {
    pub(crate) fn new(
        backend: Arc<BackendCore>,
        name: &str,
        column: Arc<ColumnSettings>,
    ) -> Result<Self> {
        let namespace = codec::encode_key(&())?;
        Ok(Self {
            backend,
            name: name.into(),
            column,
            namespace: Some(namespace.into()),
            namespace_type: "()",
            ttl: Default::default(),
        })
    }

    /// Sets how reads treat time to live.
    pub(crate) fn with_ttl_behaviour(mut self, ttl: super::descriptor::TtlBehaviour) -> Self {
        self.ttl = ttl;
        self
    }

    /// The time reads compare expiry against: now, or the beginning of time for a handle
    /// that returns expired values until compaction removes them (nothing is expired
    /// then: every write time plus a TTL of at least 1 ms lies after it). A state without
    /// a time to live expires nothing either, so the clock is not read for it.
    pub(crate) fn read_now(&self) -> u64 {
        if self.ttl.return_expired || self.ttl_ms().is_none() {
            0
        } else {
            self.now()
        }
    }

    /// Whether a read renews the time to live of what it finds.
    pub(crate) fn refreshes_on_read(&self) -> bool {
        self.ttl.refresh_on_read && self.ttl_ms().is_some()
    }

    /// The core of a handle whose namespace type is `N`: unless `N` is `()` (one possible
    /// namespace), it addresses no namespace until `with_namespace` is called, and every
    /// access before that is refused instead of silently using the `()` namespace.
    pub(crate) fn for_namespace_type<N: ?Sized>(mut self) -> Self {
        let name = std::any::type_name::<N>();
        if name != "()" {
            self.namespace = None;
            self.namespace_type = name;
        }
        self
    }

    /// "state \"name\"", for error messages.
    pub(crate) fn what(&self) -> String {
        format!("state \"{}\"", self.name)
    }

    pub(crate) fn with_namespace<N: Serialize + ?Sized>(&self, namespace: &N) -> Result<Self> {
        let mut core = self.clone();
        core.namespace = Some(codec::encode_key(namespace)?.into());
        Ok(core)
    }

    /// The namespace this handle addresses.
    ///
    /// Errors: `InvalidArgument` for a handle of a namespaced state on which
    /// `with_namespace` was not called.
    pub(crate) fn namespace(&self) -> Result<&[u8]> {
        self.namespace.as_deref().ok_or_else(|| {
            Error::invalid(format!(
                "{} has namespace type {}: address a namespace with `with_namespace` before using the handle",
                self.what(),
                self.namespace_type
            ))
        })
    }

    pub(crate) fn ttl_ms(&self) -> Option<u64> {
        self.column.ttl_ms()
    }

    pub(crate) fn now(&self) -> u64 {
        self.backend.now_millis()
    }

    /// `key group ‖ key ‖ namespace` for `key`, checking the backend owns its key group.
    /// `key group ‖ key ‖ namespace`, built in one buffer: the key is encoded after room
    /// for its key group, which is then filled in from the encoded bytes.
    pub(crate) fn prefix<K: Serialize + ?Sized>(&self, key: &K) -> Result<Vec<u8>> {
        let namespace = self.namespace()?;
        let mut out = Vec::with_capacity(codec::ENCODE_CAPACITY + namespace.len());
        out.extend_from_slice(&[0, 0]);
        codec::encode_into(&mut out, key)?;
        let kg = keygroup::key_group_for_bytes(&out[2..], self.backend.max_parallelism());
        let range = self.backend.key_group_range();
        if !range.contains(kg) {
            return Err(Error::KeyGroupOutOfRange {
                state: self.name.to_string(),
                key_group: kg,
                range: range.to_string(),
            });
        }
        out[..2].copy_from_slice(&codec::key_group_prefix(kg));
        out.extend_from_slice(namespace);
        Ok(out)
    }

    /// A value as stored: its encoding, after its write time when the state has a time to
    /// live, built in one buffer.
    pub(crate) fn encode_value<V: Serialize + ?Sized>(&self, value: &V) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(codec::ENCODE_CAPACITY);
        if self.ttl_ms().is_some() {
            out.extend_from_slice(&self.now().to_be_bytes());
        }
        codec::encode_into(&mut out, value)?;
        Ok(out)
    }

    /// Decodes a stored value, or `None` when it has expired at `now`.
    pub(crate) fn decode_live_at<V: DeserializeOwned>(
        &self,
        raw: &[u8],
        now: u64,
    ) -> Result<Option<V>> {
        let what = || self.what();
        match ttl::live_value(raw, self.ttl_ms(), now, &what)? {
            Some(payload) => Ok(Some(codec::decode_exact_with(payload, what)?)),
            None => Ok(None),
        }
    }

    /// Reads and decodes the live value under `raw_key`; with renewal on read, writes it
    /// back with a new timestamp.
    pub(crate) fn get_value<V: DeserializeOwned>(&self, raw_key: &[u8]) -> Result<Option<V>> {
        self.get_value_renewing(raw_key, self.refreshes_on_read())
    }

    /// Reads the live value under `raw_key` for a read-modify-write that writes it anyway
    /// (no renewal: the write renews it).
    pub(crate) fn get_value_for_update<V: DeserializeOwned>(
        &self,
        raw_key: &[u8],
    ) -> Result<Option<V>> {
        self.get_value_renewing(raw_key, false)
    }

    fn get_value_renewing<V: DeserializeOwned>(
        &self,
        raw_key: &[u8],
        refresh: bool,
    ) -> Result<Option<V>> {
        let now = self.read_now();
        let mut renewed = None;
        let value = self
            .backend
            .get_with(&self.column, raw_key, |raw| match raw {
                Some(raw) => {
                    let value = self.decode_live_at(raw, now)?;
                    if refresh && value.is_some() {
                        // Only a value still live now is renewed: an expired one returned
                        // until compaction removes it is never brought back to life.
                        let what = || self.what();
                        let write_time = self.now();
                        if let Some(payload) =
                            ttl::live_value(raw, self.ttl_ms(), write_time, &what)?
                        {
                            renewed = Some(ttl::frame_value(self.ttl_ms(), write_time, payload));
                        }
                    }
                    Ok(value)
                }
                None => Ok(None),
            })?;
        if let Some(raw_value) = renewed {
            self.backend.put(&self.column, raw_key, &raw_value)?;
        }
        Ok(value)
    }

    /// Scans every entry of the state within the backend's key groups.
    pub(crate) fn scan_all(&self) -> Result<RawScan<'_>> {
        let range = self.backend.key_group_range();
        let lower = codec::key_group_prefix(range.start()).to_vec();
        let upper = codec::key_group_prefix(range.end().wrapping_add(1)).to_vec();
        let upper = (range.end() < u16::MAX).then_some(upper);
        self.backend.scan(&self.column, lower, upper)
    }

    /// Scans the entries whose keys start with `prefix`.
    pub(crate) fn scan_prefix(&self, prefix: &[u8]) -> Result<RawScan<'_>> {
        self.backend.scan(
            &self.column,
            prefix.to_vec(),
            codec::prefix_successor(prefix),
        )
    }

    /// Whether a stored entry holds anything live at `now`.
    pub(crate) fn entry_is_live(
        &self,
        kind: StateKind,
        raw_value: &[u8],
        now: u64,
    ) -> Result<bool> {
        let what = || self.what();
        match kind {
            StateKind::List => {
                let ttl = self.ttl_ms();
                for element in ttl::Elements::new(raw_value, ttl.is_some()) {
                    let element = element.map_err(|e| Error::corrupt(what(), e))?;
                    match (element.written, ttl) {
                        (Some(ts), Some(ms)) if ttl::is_expired(ts, ms, now) => continue,
                        _ => return Ok(true),
                    }
                }
                Ok(false)
            }
            _ => Ok(ttl::live_value(raw_value, self.ttl_ms(), now, &what)?.is_some()),
        }
    }

    /// Decodes `key ‖ namespace` after the key-group prefix, returning them and the length
    /// of the whole `key group ‖ key ‖ namespace` prefix.
    pub(crate) fn decode_key_namespace<K: DeserializeOwned, N: DeserializeOwned>(
        &self,
        raw_key: &[u8],
    ) -> Result<(K, N, usize)> {
        let what = self.what();
        codec::read_key_group(raw_key)?;
        let start = codec::KEY_GROUP_PREFIX_LEN;
        let (key, klen) = codec::decode_prefix::<K>(&raw_key[start..], &what)?;
        let (ns, nlen) = codec::decode_prefix::<N>(&raw_key[start + klen..], &what)?;
        Ok((key, ns, start + klen + nlen))
    }
}

/// Iterator over the distinct `(key, namespace)` pairs of a state that hold live data,
/// within the backend's key groups, in storage order.
pub struct KeyIter<'a, K, N> {
    core: &'a StateCore,
    scan: RawScan<'a>,
    kind: StateKind,
    now: u64,
    done: bool,
    _types: Types<(K, N)>,
}

impl<'a, K, N> KeyIter<'a, K, N> {
    pub(crate) fn new(core: &'a StateCore, kind: StateKind) -> Result<Self> {
        Ok(Self {
            scan: core.scan_all()?,
            now: core.read_now(),
            core,
            kind,
            done: false,
            _types: PhantomData,
        })
    }
}

impl<K: DeserializeOwned, N: DeserializeOwned> KeyIter<'_, K, N> {
    fn step(&mut self) -> Result<Option<(K, N)>> {
        loop {
            let Some((raw_key, raw_value)) = self.scan.current()? else {
                return Ok(None);
            };
            if !self.core.entry_is_live(self.kind, raw_value, self.now)? {
                self.scan.advance();
                continue;
            }
            let (key, ns, prefix_len) = self.core.decode_key_namespace::<K, N>(raw_key)?;
            if self.kind == StateKind::Map {
                // Skip the remaining entries of this key and namespace.
                match codec::prefix_successor(&raw_key[..prefix_len]) {
                    Some(next) => self.scan.seek(&next),
                    None => self.done = true,
                }
            } else {
                self.scan.advance();
            }
            return Ok(Some((key, ns)));
        }
    }
}

impl<K: DeserializeOwned, N: DeserializeOwned> Iterator for KeyIter<'_, K, N> {
    type Item = Result<(K, N)>;

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
