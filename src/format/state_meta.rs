//! The recorded description of a registered state and the compatibility rule.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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

/// What the backend records about a registered state: its kind, the type names of its
/// key, namespace, (map) user key and value, the serializer version and the TTL.
///
/// Type names come from [`std::any::type_name`]. Re-registering a state is allowed when
/// kind, type names, serializer version and whether TTL is enabled all match; the TTL
/// duration itself may change (it applies to stored values too, since timestamps are
/// stored, not deadlines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMeta {
    /// The state's name, unique within a backend.
    pub name: String,
    /// The state's kind.
    pub kind: StateKind,
    /// Type name of the key.
    pub key_type: String,
    /// Type name of the namespace (`()` when unused).
    pub namespace_type: String,
    /// Type name of the map user key, for map state only.
    pub user_key_type: Option<String>,
    /// Type name of the stored value (the accumulator for aggregating state, the element
    /// for list state).
    pub value_type: String,
    /// Version of the value encoding chosen by the user; bump it when a type's serialized
    /// form changes incompatibly.
    pub serializer_version: u32,
    /// Time to live in milliseconds, if enabled.
    pub ttl_millis: Option<u64>,
}

impl StateMeta {
    pub(crate) fn new<K, N, V>(name: &str, kind: StateKind) -> Self {
        Self {
            name: name.to_string(),
            kind,
            key_type: std::any::type_name::<K>().to_string(),
            namespace_type: std::any::type_name::<N>().to_string(),
            user_key_type: None,
            value_type: std::any::type_name::<V>().to_string(),
            serializer_version: 1,
            ttl_millis: None,
        }
    }

    /// Errors with `Incompatible` when `requested` cannot read what `self` stored.
    pub fn check_compatible(&self, requested: &StateMeta) -> Result<()> {
        let same = self.kind == requested.kind
            && self.key_type == requested.key_type
            && self.namespace_type == requested.namespace_type
            && self.user_key_type == requested.user_key_type
            && self.value_type == requested.value_type
            && self.serializer_version == requested.serializer_version
            && self.ttl_millis.is_some() == requested.ttl_millis.is_some();
        if same {
            Ok(())
        } else {
            Err(Error::IncompatibleState {
                operator: None,
                state: self.name.clone(),
                stored: self.to_string(),
                requested: requested.to_string(),
            })
        }
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
        assert!(text.contains("value=u64") && text.contains("value=alloc::string::String"));

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
}
