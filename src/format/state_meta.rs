//! The recorded description of a registered state and the compatibility rule.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::{Error, Result};
use crate::format::schema::TypeSchema;

/// The kind of a keyed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StateKind {
    /// One value per key and namespace.
    Value,
    /// An appendable list per key and namespace.
    List,
    /// A map of user keys to values per key and namespace.
    Map,
    /// One value per key and namespace, combined with a reduce function on add.
    Reducing,
    /// An accumulator per key and namespace, updated by an aggregate function on add.
    Aggregating,
}

impl StateKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StateKind::Value => "value",
            StateKind::List => "list",
            StateKind::Map => "map",
            StateKind::Reducing => "reducing",
            StateKind::Aggregating => "aggregating",
        }
    }
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a key, namespace, user key or value type is recorded: a stable name, the Rust type
/// name, and the structure of its serde format when it can be traced.
///
/// Two recorded types [match](Self::matches) when both structures are known and equal
/// (container names aside, see [`TypeSchema`]); a stored type without structure (written
/// before structures were recorded, or a type that cannot be traced) matches by Rust type
/// name; a stored structure never matches a type that cannot be traced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeInfo {
    /// A name that does not depend on module paths: the serde name of a struct or enum,
    /// or a description of a built-in type (`u64`, `String`, `Vec<u8>`).
    pub name: String,
    /// [`std::any::type_name`] of the type that registered it.
    pub rust_name: String,
    /// The traced structure, when the type could be traced.
    pub schema: Option<TypeSchema>,
}

impl TypeInfo {
    /// Records `T`.
    pub fn of<T: DeserializeOwned>() -> Self {
        let rust_name = std::any::type_name::<T>().to_string();
        let schema = TypeSchema::trace::<T>();
        let name = match &schema {
            Some(s) => s.name(),
            None => strip_paths(&rust_name),
        };
        Self {
            name,
            rust_name,
            schema,
        }
    }

    /// What a record written before structures were recorded says: a Rust type name.
    pub(crate) fn legacy(rust_name: String) -> Self {
        Self {
            name: strip_paths(&rust_name),
            rust_name,
            schema: None,
        }
    }

    /// Whether data written as `self` reads as `other` (see the type's documentation).
    /// A type recorded with its structure never matches one that cannot be traced: the
    /// type changed, and nothing shows it is still the same.
    pub fn matches(&self, other: &TypeInfo) -> bool {
        match (&self.schema, &other.schema) {
            (Some(a), Some(b)) => a.same_structure(b),
            (Some(_), None) => false,
            (None, _) => self.rust_name == other.rust_name,
        }
    }

    /// Whether data written as `self` was written as `declared`, a type a migration names
    /// as a former version: equal structures, or, where a structure is missing, equal
    /// stable names (the declaration is the program's word for it).
    pub fn was_declared_as(&self, declared: &TypeInfo) -> bool {
        match (&self.schema, &declared.schema) {
            (Some(a), Some(b)) => a.same_structure(b),
            _ => self.name == declared.name || self.rust_name == declared.rust_name,
        }
    }

    fn validate(&self) -> Result<()> {
        match &self.schema {
            Some(s) => s.validate(),
            None => Ok(()),
        }
    }
}

impl fmt::Display for TypeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => f.write_str(&s.describe()),
            None => f.write_str(&self.name),
        }
    }
}

/// `alloc::vec::Vec<my::Order>` → `Vec<Order>`.
fn strip_paths(rust_name: &str) -> String {
    let mut out = String::with_capacity(rust_name.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(word.rsplit("::").next().unwrap_or(word));
        word.clear();
    };
    for c in rust_name.chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// What the backend records about a registered state: its kind, its key, namespace, (map)
/// user key and value types ([`TypeInfo`]), the serializer version and the TTL.
///
/// Registering a state again is allowed when kind, every type, serializer version and
/// whether TTL is enabled all match; the TTL duration itself may change (it applies to
/// stored values too, since timestamps are stored, not deadlines). A value type that
/// differs needs a migration declared by the descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateMeta {
    /// The state's name, unique within a backend.
    pub name: String,
    /// The state's kind.
    pub kind: StateKind,
    /// The key type.
    pub key_type: TypeInfo,
    /// The namespace type (`()` when unused).
    pub namespace_type: TypeInfo,
    /// The map user key type, for map state only.
    pub user_key_type: Option<TypeInfo>,
    /// The stored value type (the accumulator for aggregating state, the element for list
    /// state).
    pub value_type: TypeInfo,
    /// Version of the value encoding chosen by the program; bump it when the meaning of a
    /// value changes while its structure does not.
    pub serializer_version: u32,
    /// Time to live in milliseconds, if enabled.
    pub ttl_millis: Option<u64>,
}

impl StateMeta {
    pub(crate) fn new<K, N, V>(name: &str, kind: StateKind) -> Self
    where
        K: DeserializeOwned,
        N: DeserializeOwned,
        V: DeserializeOwned,
    {
        Self {
            name: name.to_string(),
            kind,
            key_type: TypeInfo::of::<K>(),
            namespace_type: TypeInfo::of::<N>(),
            user_key_type: None,
            value_type: TypeInfo::of::<V>(),
            serializer_version: 1,
            ttl_millis: None,
        }
    }

    /// Whether everything but the value type and the serializer version matches: what a
    /// migration of the values needs.
    pub fn same_but_value(&self, requested: &StateMeta) -> bool {
        self.kind == requested.kind
            && self.key_type.matches(&requested.key_type)
            && self.namespace_type.matches(&requested.namespace_type)
            && match (&self.user_key_type, &requested.user_key_type) {
                (Some(a), Some(b)) => a.matches(b),
                (None, None) => true,
                _ => false,
            }
            && self.ttl_millis.is_some() == requested.ttl_millis.is_some()
    }

    /// Whether `requested` reads what `self` stored as it is.
    pub fn is_compatible(&self, requested: &StateMeta) -> bool {
        self.same_but_value(requested)
            && self.value_type.matches(&requested.value_type)
            && self.serializer_version == requested.serializer_version
    }

    /// Errors with `Incompatible`, naming both descriptions, when `requested` cannot read
    /// what `self` stored as it is.
    pub fn check_compatible(&self, requested: &StateMeta) -> Result<()> {
        if self.is_compatible(requested) {
            Ok(())
        } else {
            Err(self.incompatible(requested))
        }
    }

    /// The `Incompatible` error between `self` (stored) and `requested`.
    pub fn incompatible(&self, requested: &StateMeta) -> Error {
        Error::IncompatibleState {
            operator: None,
            state: self.name.clone(),
            stored: self.to_string(),
            requested: requested.to_string(),
        }
    }

    /// Checks the recorded type descriptions (see [`TypeSchema::validate`]).
    pub(crate) fn validate(&self) -> Result<()> {
        self.key_type.validate()?;
        self.namespace_type.validate()?;
        if let Some(t) = &self.user_key_type {
            t.validate()?;
        }
        self.value_type.validate()
    }
}

impl fmt::Display for StateMeta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}<key={}, namespace={}",
            self.kind, self.key_type, self.namespace_type
        )?;
        if let Some(uk) = &self.user_key_type {
            write!(f, ", user_key={uk}")?;
        }
        write!(
            f,
            ", value={}> serializer v{}",
            self.value_type, self.serializer_version
        )?;
        match self.ttl_millis {
            Some(ms) => write!(f, ", ttl {ms} ms"),
            None => write!(f, ", no ttl"),
        }
    }
}

/// The layout written now.
#[derive(Deserialize)]
struct Wire {
    name: String,
    kind: StateKind,
    key_type: TypeInfo,
    namespace_type: TypeInfo,
    user_key_type: Option<TypeInfo>,
    value_type: TypeInfo,
    serializer_version: u32,
    ttl_millis: Option<u64>,
}

/// The layout of records written before type structures were recorded: type names only.
#[derive(Deserialize)]
struct WireV1 {
    name: String,
    kind: StateKind,
    key_type: String,
    namespace_type: String,
    user_key_type: Option<String>,
    value_type: String,
    serializer_version: u32,
    ttl_millis: Option<u64>,
}

thread_local! {
    static LEGACY_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Decodes, inside `f`, every [`StateMeta`] in the layout written before type structures
/// were recorded. The formats that embed state descriptions (`_metadata`, handles,
/// canonical data files, state records) call it for their older versions, so that the
/// types nesting a `StateMeta` need no copy per version. Decoding is synchronous, so a
/// thread-local flag scopes it exactly.
pub(crate) fn decode_legacy<R>(f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            LEGACY_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
    }
    LEGACY_DEPTH.with(|d| d.set(d.get() + 1));
    let _reset = Reset;
    f()
}

/// [`codec::decode_versioned`] for a format that embeds state descriptions and recorded
/// their type structures from version `first_with_structures` on.
pub(crate) fn decode_versioned_states<T: DeserializeOwned>(
    bytes: &[u8],
    newest: u32,
    first_with_structures: u32,
    what: &str,
) -> Result<(u32, T)> {
    let old = bytes
        .first_chunk::<4>()
        .is_some_and(|v| u32::from_be_bytes(*v) < first_with_structures);
    if old {
        decode_legacy(|| codec::decode_versioned(bytes, newest, what))
    } else {
        codec::decode_versioned(bytes, newest, what)
    }
}

impl<'de> Deserialize<'de> for StateMeta {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        if LEGACY_DEPTH.with(|x| x.get()) > 0 {
            let w = WireV1::deserialize(d)?;
            return Ok(StateMeta {
                name: w.name,
                kind: w.kind,
                key_type: TypeInfo::legacy(w.key_type),
                namespace_type: TypeInfo::legacy(w.namespace_type),
                user_key_type: w.user_key_type.map(TypeInfo::legacy),
                value_type: TypeInfo::legacy(w.value_type),
                serializer_version: w.serializer_version,
                ttl_millis: w.ttl_millis,
            });
        }
        let w = Wire::deserialize(d)?;
        let meta = StateMeta {
            name: w.name,
            kind: w.kind,
            key_type: w.key_type,
            namespace_type: w.namespace_type,
            user_key_type: w.user_key_type,
            value_type: w.value_type,
            serializer_version: w.serializer_version,
            ttl_millis: w.ttl_millis,
        };
        meta.validate().map_err(serde::de::Error::custom)?;
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatibility_rules() {
        let base = StateMeta::new::<String, (), u64>("count", StateKind::Value);
        assert!(base.check_compatible(&base.clone()).is_ok());

        let other_type = StateMeta::new::<String, (), String>("count", StateKind::Value);
        let err = base.check_compatible(&other_type).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Incompatible);
        let text = err.to_string();
        assert!(
            text.contains("value=u64") && text.contains("value=String"),
            "{text}"
        );

        let mut ttl_on = base.clone();
        ttl_on.ttl_millis = Some(10);
        assert!(base.check_compatible(&ttl_on).is_err());
        let mut ttl_longer = ttl_on.clone();
        ttl_longer.ttl_millis = Some(99);
        assert!(ttl_on.check_compatible(&ttl_longer).is_ok());

        let mut v2 = base.clone();
        v2.serializer_version = 2;
        assert!(base.check_compatible(&v2).is_err());
        let list = StateMeta::new::<String, (), u64>("count", StateKind::List);
        assert!(base.check_compatible(&list).is_err());
    }

    #[test]
    fn a_recorded_structure_never_matches_a_type_without_one() {
        let traced = TypeInfo::of::<u64>();
        let untraced = TypeInfo {
            schema: None,
            ..traced.clone()
        };
        // The same Rust name, but the new type cannot be traced: it changed.
        assert!(!traced.matches(&untraced));
        // A record of an earlier version (no structure) matches by Rust name.
        assert!(untraced.matches(&traced));
        assert!(!untraced.matches(&TypeInfo::of::<u32>()));
        assert_eq!(strip_paths("alloc::vec::Vec<my::Order>"), "Vec<Order>");
    }
}
