//! An order-independent digest of keyed state, for comparing the state of two runs of a
//! job whatever their parallelism or the order in which they wrote.
//!
//! Every stored entry contributes the 128-bit MurmurHash3 of (operator uid, state name,
//! RocksDB key, RocksDB value), length-framed; contributions are added modulo 2^128. The
//! key carries the key group (a function of the key and the max parallelism only), the
//! serialized key, the namespace and, for map state, the user key, so the digest of a job
//! does not depend on how its key groups are spread over subtasks. Values are digested as
//! stored: for states with a TTL this includes each value's write time.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::backend::RocksStateBackend;
use crate::error::Result;
use crate::hash::murmur3_x64_128;

/// The digest of a set of keyed state entries (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDigest {
    /// Number of entries digested.
    pub entries: u64,
    /// Sum of the entries' hashes, modulo 2^128.
    pub sum: u128,
}

impl StateDigest {
    /// The digest of nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one entry of state `state` of operator `uid`.
    pub fn add_entry(&mut self, uid: &str, state: &str, key: &[u8], value: &[u8]) {
        let mut framed = Vec::with_capacity(16 + uid.len() + state.len() + key.len() + value.len());
        for part in [uid.as_bytes(), state.as_bytes(), key, value] {
            framed.extend_from_slice(&(part.len() as u32).to_be_bytes());
            framed.extend_from_slice(part);
        }
        let hash = u128::from_be_bytes(murmur3_x64_128(&framed, 0));
        self.sum = self.sum.wrapping_add(hash);
        self.entries += 1;
    }

    /// Adds every entry of every state registered on `backend`, as operator `uid`. States
    /// must be registered first (a subtask's operator registers them when it starts).
    ///
    /// Errors: engine errors from the scan.
    pub fn add_backend(&mut self, uid: &str, backend: &RocksStateBackend) -> Result<()> {
        backend.for_each_entry(|state, key, value| self.add_entry(uid, state, key, value))
    }

    /// Combines two digests of disjoint entry sets.
    pub fn merge(&mut self, other: &StateDigest) {
        self.sum = self.sum.wrapping_add(other.sum);
        self.entries += other.entries;
    }
}

impl fmt::Display for StateDigest {
    /// 32 hex digits of the sum.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_does_not_matter_and_duplicates_do_not_cancel() {
        let mut a = StateDigest::new();
        a.add_entry("op", "s", b"k1", b"v1");
        a.add_entry("op", "s", b"k2", b"v2");
        let mut b = StateDigest::new();
        b.add_entry("op", "s", b"k2", b"v2");
        b.add_entry("op", "s", b"k1", b"v1");
        assert_eq!(a, b);
        let mut twice = a;
        twice.merge(&a);
        assert_ne!(twice.sum, 0);
        assert_eq!(twice.entries, 4);
    }

    #[test]
    fn framing_separates_fields() {
        let mut a = StateDigest::new();
        a.add_entry("op", "s", b"ab", b"c");
        let mut b = StateDigest::new();
        b.add_entry("op", "s", b"a", b"bc");
        let mut c = StateDigest::new();
        c.add_entry("op", "t", b"ab", b"c");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string().len(), 32);
    }
}
