//! Records the backend keeps about itself in its own column family.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::Result;
use crate::format::StateMeta;
use crate::keygroup::KeyGroupRange;

/// Key of the backend record.
pub(crate) const BACKEND_KEY: &[u8] = b"backend";
/// Prefix of the keys of state records; the state name follows.
pub(crate) const STATE_KEY_PREFIX: &[u8] = b"state/";

const BACKEND_RECORD_VERSION: u32 = 1;
/// Version 2 records the structure of the state's types.
const STATE_RECORD_VERSION: u32 = 2;

/// Identity and layout of a backend's local state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BackendRecord {
    pub backend_uid: String,
    pub max_parallelism: u32,
    pub key_group_range: KeyGroupRange,
    pub created_at_ms: u64,
}

impl BackendRecord {
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        codec::encode_versioned(BACKEND_RECORD_VERSION, self)
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        Ok(codec::decode_versioned(bytes, BACKEND_RECORD_VERSION, "backend record")?.1)
    }
}

pub(crate) fn state_key(name: &str) -> Vec<u8> {
    [STATE_KEY_PREFIX, name.as_bytes()].concat()
}

pub(crate) fn encode_state(meta: &StateMeta) -> Result<Vec<u8>> {
    codec::encode_versioned(STATE_RECORD_VERSION, meta)
}

pub(crate) fn decode_state(bytes: &[u8]) -> Result<StateMeta> {
    let meta: StateMeta =
        crate::format::decode_versioned_states(bytes, STATE_RECORD_VERSION, 2, "state record")?.1;
    if meta.ttl_millis == Some(0) {
        return Err(crate::error::Error::corrupt(
            format!("record of state \"{}\"", meta.name),
            "a TTL of 0 ms",
        ));
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::StateKind;

    #[test]
    fn records_round_trip() {
        let rec = BackendRecord {
            backend_uid: "abc".into(),
            max_parallelism: 128,
            key_group_range: KeyGroupRange::new(0, 63).unwrap(),
            created_at_ms: 5,
        };
        assert_eq!(BackendRecord::decode(&rec.encode().unwrap()).unwrap(), rec);
        let meta = StateMeta::new::<String, (), u64>("count", StateKind::Value);
        assert_eq!(decode_state(&encode_state(&meta).unwrap()).unwrap(), meta);
        assert!(BackendRecord::decode(b"\0\0\0\x01garbage").is_err());
    }
}
