//! Settings shared by every state descriptor.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::error::{Error, Result};
use crate::format::{StateMeta, TypeInfo};

/// When a value's time to live starts again (like Flink's `StateTtlConfig.UpdateType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TtlUpdate {
    /// When it is written (created or replaced). The default.
    #[default]
    OnCreateAndWrite,
    /// When it is written and when it is read by `get` (value, list, map entry, reducing
    /// and aggregating state): a value read that way now and then never expires. Such a
    /// read writes the value back with a new timestamp, so a handle that renews must not
    /// read a key while another thread writes the same key (state of one key is meant for
    /// one thread, as in a stream job). Iteration, `contains` and `all_keys` do not renew.
    OnReadAndWrite,
}

/// Whether reads see expired values that compaction has not removed yet (like Flink's
/// `StateTtlConfig.StateVisibility`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TtlVisibility {
    /// An expired value is never returned. The default.
    #[default]
    NeverReturnExpired,
    /// An expired value is returned until compaction removes it: cheaper, and enough when
    /// the TTL only bounds the state's size. List elements appended with `add` are merged
    /// when the list is read, and that merge also removes expired elements.
    ReturnExpiredIfNotCleanedUp,
}

/// Time to live of a state: how long a value lives, when its time starts again, and
/// whether expired values are visible before compaction removes them. Only `ttl` is
/// recorded with the state; the other two are how this program reads and writes it.
/// Expired values are removed by compaction and left out of canonical savepoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateTtlConfig {
    /// How long a value lives.
    pub ttl: Duration,
    /// When its time starts again.
    pub update: TtlUpdate,
    /// Whether expired values are returned before compaction removes them.
    pub visibility: TtlVisibility,
}

impl StateTtlConfig {
    /// `ttl`, renewed on writes, expired values never returned.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            update: TtlUpdate::default(),
            visibility: TtlVisibility::default(),
        }
    }

    /// Sets when the time to live starts again.
    pub fn update(mut self, update: TtlUpdate) -> Self {
        self.update = update;
        self
    }

    /// Sets whether expired values are returned before compaction removes them.
    pub fn visibility(mut self, visibility: TtlVisibility) -> Self {
        self.visibility = visibility;
        self
    }
}

/// How a handle treats time to live when reading (see [`StateTtlConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct TtlBehaviour {
    pub refresh_on_read: bool,
    pub return_expired: bool,
}

/// A conversion of stored values from an earlier type (and serializer version) of a
/// state to the current one, declared on a descriptor with `with_migration`.
///
/// On registration, a stored state whose value type has the structure of the earlier
/// type (or, for records of versions that did not record structures, its name) and whose
/// serializer version is the declared one has every value converted before the handle is
/// returned; then the state is recorded with the current type. The conversion runs once:
/// checkpoints taken afterwards hold the converted values.
#[derive(Clone)]
pub struct Migration {
    pub(crate) from: TypeInfo,
    pub(crate) from_version: u32,
    pub(crate) convert: Arc<ConvertFn>,
}

/// Converts one stored value's bytes into the current type's bytes.
pub(crate) type ConvertFn = dyn Fn(&[u8]) -> Result<Vec<u8>> + Send + Sync;

impl Migration {
    pub(crate) fn new<P, V, E>(
        from_version: u32,
        f: impl Fn(P) -> std::result::Result<V, E> + Send + Sync + 'static,
    ) -> Self
    where
        P: DeserializeOwned,
        V: Serialize,
        E: std::fmt::Display,
    {
        let from = TypeInfo::of::<P>();
        let what = format!("value stored as {}", from.name);
        Self {
            from,
            from_version,
            convert: Arc::new(move |bytes| {
                let old: P = codec::decode_exact(bytes, &what)?;
                let new = f(old).map_err(|e| {
                    Error::invalid(format!("migration of a {what} refused it: {e}"))
                })?;
                codec::encode_key(&new)
            }),
        }
    }

    /// The earlier type the stored values have.
    pub fn from_type(&self) -> &TypeInfo {
        &self.from
    }

    /// The serializer version of the stored values.
    pub fn from_version(&self) -> u32 {
        self.from_version
    }
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("from", &self.from.name)
            .field("from_version", &self.from_version)
            .finish_non_exhaustive()
    }
}

/// Settings common to every descriptor.
#[derive(Debug, Clone)]
pub(crate) struct CommonOptions {
    pub name: String,
    pub ttl: Option<StateTtlConfig>,
    pub serializer_version: u32,
    pub migrations: Vec<Migration>,
}

impl CommonOptions {
    pub(crate) fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ttl: None,
            serializer_version: 1,
            migrations: Vec::new(),
        }
    }

    pub(crate) fn apply(&self, mut meta: StateMeta) -> StateMeta {
        meta.serializer_version = self.serializer_version;
        meta.ttl_millis = self
            .ttl
            .map(|c| u64::try_from(c.ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        meta
    }

    pub(crate) fn behaviour(&self) -> TtlBehaviour {
        match &self.ttl {
            None => TtlBehaviour::default(),
            Some(c) => TtlBehaviour {
                refresh_on_read: c.update == TtlUpdate::OnReadAndWrite,
                return_expired: c.visibility == TtlVisibility::ReturnExpiredIfNotCleanedUp,
            },
        }
    }
}

/// Adds the builder methods shared by every descriptor type.
macro_rules! common_descriptor_methods {
    () => {
        /// Enables time-to-live: a value written more than `ttl` ago is invisible to reads
        /// and dropped by compaction. Each list element and map entry expires on its own.
        /// Same as [`with_ttl_config`](Self::with_ttl_config) with
        /// [`StateTtlConfig::new`](crate::StateTtlConfig::new).
        pub fn with_ttl(mut self, ttl: std::time::Duration) -> Self {
            self.common.ttl = Some($crate::state::StateTtlConfig::new(ttl));
            self
        }

        /// Enables time-to-live with the renewal and visibility of `config`.
        pub fn with_ttl_config(mut self, config: $crate::state::StateTtlConfig) -> Self {
            self.common.ttl = Some(config);
            self
        }

        /// Sets the serializer version recorded with the state (default 1). Bump it when
        /// the meaning of stored values changes while their structure does not.
        /// Registering with a different version than the stored one is an `Incompatible`
        /// error unless a migration from the stored version is declared.
        pub fn with_serializer_version(mut self, version: u32) -> Self {
            self.common.serializer_version = version;
            self
        }

        /// The state's name.
        pub fn name(&self) -> &str {
            &self.common.name
        }

        /// The migrations declared so far.
        pub fn migrations(&self) -> &[$crate::state::Migration] {
            &self.common.migrations
        }
    };
}
pub(crate) use common_descriptor_methods;

/// Adds `with_migration` and `with_fallible_migration` to a descriptor whose stored value
/// type is `$value` (with the `where` bounds that type needs).
macro_rules! migration_methods {
    ($value:ty; $($bound:tt)*) => {
        /// Declares that values stored as `P` with serializer version `from_version` (an
        /// earlier version of this program) become the current value type through
        /// `convert`. See [`Migration`](crate::state::Migration). Keep the earlier type
        /// (e.g. in a module `v1`) for as long as snapshots written with it may be
        /// restored; to migrate across several versions, declare one migration per
        /// earlier version, each converting straight to the current type.
        pub fn with_migration<P>(
            mut self,
            from_version: u32,
            convert: impl Fn(P) -> $value + Send + Sync + 'static,
        ) -> Self
        where
            P: serde::de::DeserializeOwned,
            $($bound)*
        {
            self.common.migrations.push(
                $crate::state::Migration::new::<P, $value, std::convert::Infallible>(
                    from_version,
                    move |p| Ok(convert(p)),
                ),
            );
            self
        }

        /// Like [`with_migration`](Self::with_migration), with a conversion that may
        /// refuse a value: registration then fails with `InvalidArgument` carrying the
        /// message, and the stored state is left as it was (the conversion is all or
        /// nothing).
        pub fn with_fallible_migration<P, E>(
            mut self,
            from_version: u32,
            convert: impl Fn(P) -> std::result::Result<$value, E> + Send + Sync + 'static,
        ) -> Self
        where
            P: serde::de::DeserializeOwned,
            E: std::fmt::Display,
            $($bound)*
        {
            self.common
                .migrations
                .push($crate::state::Migration::new::<P, $value, E>(from_version, convert));
            self
        }
    };
}
pub(crate) use migration_methods;
