//! Settings shared by every state descriptor.

use std::time::Duration;

use crate::format::StateMeta;

/// Settings common to every descriptor.
#[derive(Debug, Clone)]
pub(crate) struct CommonOptions {
    pub name: String,
    pub ttl: Option<Duration>,
    pub serializer_version: u32,
}

impl CommonOptions {
    pub(crate) fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ttl: None,
            serializer_version: 1,
        }
    }

    pub(crate) fn apply(&self, mut meta: StateMeta) -> StateMeta {
        meta.serializer_version = self.serializer_version;
        meta.ttl_millis = self
            .ttl
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1));
        meta
    }
}

/// Adds the builder methods shared by every descriptor type.
macro_rules! common_descriptor_methods {
    () => {
        /// Enables time-to-live: a value written more than `ttl` ago is invisible to reads
        /// and dropped by compaction. Each list element and map entry expires on its own.
        pub fn with_ttl(mut self, ttl: std::time::Duration) -> Self {
            self.common.ttl = Some(ttl);
            self
        }

        /// Sets the serializer version recorded with the state (default 1). Registering
        /// with a different version than the stored one is an `Incompatible` error.
        pub fn with_serializer_version(mut self, version: u32) -> Self {
            self.common.serializer_version = version;
            self
        }

        /// The state's name.
        pub fn name(&self) -> &str {
            &self.common.name
        }
    };
}
pub(crate) use common_descriptor_methods;
