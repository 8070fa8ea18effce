//! The one place that decides how keys, namespaces and values become bytes.
//!
//! Keys, namespaces, map user keys and values are encoded with serde through bincode
//! (standard configuration, big-endian, variable-length integers). The encoding is
//! self-delimiting: no encoded value is a proper prefix of another value of the same type,
//! so a prefix scan over `key ‖ namespace` finds exactly that key and namespace.
//! Unsigned integers keep their numeric order in this encoding.
//!
//! RocksDB keys are laid out as
//! `key group (u16 big-endian) ‖ key ‖ namespace [‖ map user key]`.
//!
//! Types must serialize without `deserialize_any` (no `#[serde(untagged)]` or `flatten`),
//! as usual for a binary format. `fixtures/key_encoding.txt` pins the layout.
//!
//! bincode is used here and nowhere else, and never appears in a public signature. It is
//! pinned to exactly 2.0.1, its final release: RUSTSEC-2025-0141 marks the crate
//! unmaintained, which suits a format that must never change. The golden files under
//! `fixtures/` guard the bytes, so a replacement encoder would have to reproduce them.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::keygroup;

/// Bytes reserved up front for one encoded key or value.
pub(crate) const ENCODE_CAPACITY: usize = 64;

/// Largest total of the lengths a decode may claim, guarding against allocation bombs
/// from damaged bytes.
const DECODE_LIMIT: usize = 1 << 30;

fn config() -> impl bincode::config::Config {
    limited::<DECODE_LIMIT>()
}

/// The encoding, with a decode limit of `N` claimed bytes.
fn limited<const N: usize>() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_big_endian()
        .with_variable_int_encoding()
        .with_limit::<N>()
}

/// Decodes with a limit proportional to the input: the lengths claimed by strings and
/// collections may add up to 16 times the input size (at least 64 KiB), so a damaged
/// length field cannot make a small input allocate a large buffer. bincode takes the
/// limit as a constant: the smallest power-of-four tier that covers it is used.
fn decode_limited<T: DeserializeOwned>(
    bytes: &[u8],
) -> std::result::Result<(T, usize), bincode::error::DecodeError> {
    let budget = bytes.len().saturating_mul(16).max(1 << 16);
    macro_rules! tiers {
        ($($n:expr),*) => {
            $(
                if budget <= $n {
                    return bincode::serde::decode_from_slice(bytes, limited::<{ $n }>());
                }
            )*
        };
    }
    tiers!(
        1 << 16,
        1 << 18,
        1 << 20,
        1 << 22,
        1 << 24,
        1 << 26,
        1 << 28
    );
    bincode::serde::decode_from_slice(bytes, config())
}

/// Serializes `value` on its own.
///
/// Errors: `InvalidArgument` (`Error::Encode`) when the type's `Serialize` fails.
pub fn encode_key<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    // Room for the usual key or value: no reallocation while it is written.
    let mut out = Vec::with_capacity(ENCODE_CAPACITY);
    encode_into(&mut out, value)?;
    Ok(out)
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Result<()> {
    bincode::serde::encode_into_std_write(value, out, config()).map_err(|e| Error::Encode {
        what: std::any::type_name::<T>().to_string(),
        detail: e.to_string(),
    })?;
    Ok(())
}

/// Decodes one `T` from the front of `bytes`, returning it and the number of bytes used.
///
/// Errors: `Corrupt`, naming `what`, when the bytes do not hold a `T`.
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<(T, usize)> {
    decode_prefix_with(bytes, || what.to_string())
}

/// [`decode_prefix`], describing what was decoded only when it fails.
fn decode_prefix_with<T: DeserializeOwned>(
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> Result<(T, usize)> {
    decode_limited(bytes).map_err(|e| {
        Error::corrupt(
            what(),
            format!("cannot decode {}: {e}", std::any::type_name::<T>()),
        )
    })
}

/// Decodes exactly one `T` from `bytes`; trailing bytes are an error.
pub fn decode_exact<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    decode_exact_with(bytes, || what.to_string())
}

/// [`decode_exact`], describing what was decoded only when it fails: the hot read paths
/// build no description for the bytes that decode.
pub(crate) fn decode_exact_with<T: DeserializeOwned>(
    bytes: &[u8],
    what: impl Fn() -> String,
) -> Result<T> {
    let (value, used) = decode_prefix_with(bytes, &what)?;
    if used != bytes.len() {
        return Err(Error::corrupt(
            what(),
            format!("{} trailing bytes after value", bytes.len() - used),
        ));
    }
    Ok(value)
}

/// Encodes a persisted structure as `format version (u32 big-endian) ‖ payload`.
pub(crate) fn encode_versioned<T: Serialize>(version: u32, value: &T) -> Result<Vec<u8>> {
    let mut out = version.to_be_bytes().to_vec();
    encode_into(&mut out, value)?;
    Ok(out)
}

/// Decodes a structure written by [`encode_versioned`], accepting versions `1..=newest`.
/// Returns the version found and the value.
pub(crate) fn decode_versioned<T: DeserializeOwned>(
    bytes: &[u8],
    newest: u32,
    what: &str,
) -> Result<(u32, T)> {
    let Some((head, payload)) = bytes.split_first_chunk::<4>() else {
        return Err(Error::corrupt(
            what,
            format!("{} bytes, too short for a format version", bytes.len()),
        ));
    };
    let version = u32::from_be_bytes(*head);
    if version == 0 || version > newest {
        return Err(Error::UnsupportedVersion {
            what: what.to_string(),
            found: version,
            supported: newest,
        });
    }
    Ok((version, decode_exact(payload, what)?))
}

/// The RocksDB key under which value, list, reducing and aggregating state store `key` in
/// `namespace`: `key group ‖ key ‖ namespace`.
///
/// Errors: `InvalidArgument` for an invalid `max_parallelism` or unserializable input.
pub fn state_key<K, N>(key: &K, namespace: &N, max_parallelism: u32) -> Result<Vec<u8>>
where
    K: Serialize + ?Sized,
    N: Serialize + ?Sized,
{
    let key_bytes = encode_key(key)?;
    let kg = keygroup::key_group_for_bytes(&key_bytes, {
        keygroup::validate_max_parallelism(max_parallelism)?;
        max_parallelism
    });
    Ok(compose(kg, &key_bytes, &encode_key(namespace)?))
}

/// The RocksDB key of map entry `user_key` of `key` in `namespace`:
/// `key group ‖ key ‖ namespace ‖ user key`.
pub fn map_entry_key<K, N, UK>(
    key: &K,
    namespace: &N,
    user_key: &UK,
    max_parallelism: u32,
) -> Result<Vec<u8>>
where
    K: Serialize + ?Sized,
    N: Serialize + ?Sized,
    UK: Serialize + ?Sized,
{
    let mut out = state_key(key, namespace, max_parallelism)?;
    encode_into(&mut out, user_key)?;
    Ok(out)
}

/// Length of the key-group prefix of every RocksDB key.
pub(crate) const KEY_GROUP_PREFIX_LEN: usize = 2;

/// Starts a RocksDB key with its key group.
pub(crate) fn key_group_prefix(key_group: u16) -> [u8; KEY_GROUP_PREFIX_LEN] {
    key_group.to_be_bytes()
}

/// Reads the key group of a RocksDB key.
pub(crate) fn read_key_group(raw_key: &[u8]) -> Result<u16> {
    match raw_key {
        [a, b, ..] => Ok(u16::from_be_bytes([*a, *b])),
        _ => Err(Error::corrupt(
            "state key",
            format!("{} bytes, shorter than the key-group prefix", raw_key.len()),
        )),
    }
}

/// Builds `key group ‖ key bytes ‖ namespace bytes`.
pub(crate) fn compose(key_group: u16, key: &[u8], namespace: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(KEY_GROUP_PREFIX_LEN + key.len() + namespace.len() + 8);
    out.extend_from_slice(&key_group_prefix(key_group));
    out.extend_from_slice(key);
    out.extend_from_slice(namespace);
    out
}

/// The smallest byte string greater than every string that starts with `prefix`, or `None`
/// when `prefix` is all `0xff` (no upper bound needed).
pub(crate) fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut out = prefix.to_vec();
    while let Some(last) = out.pop() {
        if last != 0xff {
            out.push(last + 1);
            return Some(out);
        }
    }
    None
}

/// The key group of `key`, hashing its serialized form (see [`encode_key`]).
///
/// Errors: `InvalidArgument` when `max_parallelism` is invalid or the key cannot be
/// serialized.
pub fn key_group_for<K: Serialize + ?Sized>(key: &K, max_parallelism: u32) -> Result<u16> {
    keygroup::validate_max_parallelism(max_parallelism)?;
    let bytes = encode_key(key)?;
    Ok(keygroup::key_group_for_bytes(&bytes, max_parallelism))
}

/// The subtask (0-based) of `parallelism` that owns `key`.
pub fn subtask_for_key<K: Serialize + ?Sized>(
    key: &K,
    parallelism: u32,
    max_parallelism: u32,
) -> Result<u32> {
    let kg = key_group_for(key, max_parallelism)?;
    keygroup::subtask_for_key_group(kg, parallelism, max_parallelism)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_claims_stay_within_the_input_budget() {
        // A string claiming 512 MiB in 6 bytes: refused before any allocation.
        let mut bytes = vec![0xfc];
        bytes.extend_from_slice(&(512u32 << 20).to_be_bytes());
        bytes.push(b'x');
        let err = decode_exact::<String>(&bytes, "s").unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Corrupt);
        // Values whose decoded form is far larger than their encoding still decode:
        // 20 000 `None`s of 72 bytes each from 20 KiB.
        let value: Vec<Option<[u64; 8]>> = vec![None; 20_000];
        let encoded = encode_key(&value).unwrap();
        assert_eq!(
            decode_exact::<Vec<Option<[u64; 8]>>>(&encoded, "v").unwrap(),
            value
        );
        // And a large string of its own length.
        let big = "y".repeat(3 << 20);
        assert_eq!(
            decode_exact::<String>(&encode_key(&big).unwrap(), "b").unwrap(),
            big
        );
    }

    #[test]
    fn round_trip_and_prefix_decode() {
        let mut buf = encode_key("abc").unwrap();
        encode_into(&mut buf, &42u64).unwrap();
        let (s, used) = decode_prefix::<String>(&buf, "t").unwrap();
        assert_eq!(s, "abc");
        let n: u64 = decode_exact(&buf[used..], "t").unwrap();
        assert_eq!(n, 42);
        assert!(decode_exact::<String>(&buf, "t").is_err());
    }

    /// The description is built only for bytes that fail, and both failures (bytes that
    /// do not decode, trailing bytes) name it, as `decode_exact` does.
    #[test]
    fn a_lazy_description_is_built_only_on_failure() {
        let calls = std::cell::Cell::new(0);
        let what = || {
            calls.set(calls.get() + 1);
            "state \"x\"".to_string()
        };
        let good = encode_key(&7u64).unwrap();
        assert_eq!(decode_exact_with::<u64>(&good, what).unwrap(), 7);
        assert_eq!(calls.get(), 0);
        let mut trailing = good.clone();
        trailing.push(0);
        for bad in [&trailing[..], &[0xfb, 0xff][..]] {
            let lazy = decode_exact_with::<u64>(bad, what).unwrap_err().to_string();
            let eager = decode_exact::<u64>(bad, "state \"x\"")
                .unwrap_err()
                .to_string();
            assert_eq!(lazy, eager);
        }
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn damaged_bytes_are_corrupt_errors() {
        let err = decode_exact::<String>(&[0xfb, 0xff, 0xff], "state \"x\"").unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Corrupt);
        assert!(err.to_string().contains("state \"x\""));
        // A huge claimed length must fail without allocating it.
        let bomb = [0xfd, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(decode_exact::<Vec<u8>>(&bomb, "t").is_err());
        assert!(decode_exact::<String>(&bomb, "t").is_err());
        assert!(read_key_group(&[1]).is_err());
    }

    #[test]
    fn versioned_round_trip_and_errors() {
        let bytes = encode_versioned(2, &("a".to_string(), 7u32)).unwrap();
        let (v, value): (u32, (String, u32)) = decode_versioned(&bytes, 2, "rec").unwrap();
        assert_eq!((v, value), (2, ("a".to_string(), 7)));
        let err = decode_versioned::<(String, u32)>(&bytes, 1, "rec").unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Incompatible);
        assert!(decode_versioned::<u32>(&[0, 0], 1, "rec").is_err());
        assert!(decode_versioned::<u32>(&[0, 0, 0, 0, 1], 1, "rec").is_err());
    }

    #[test]
    fn unsigned_integers_keep_their_order() {
        let values = [
            0u64,
            1,
            250,
            251,
            255,
            256,
            65_535,
            65_536,
            u32::MAX as u64,
            u64::MAX,
        ];
        let encoded: Vec<Vec<u8>> = values.iter().map(|v| encode_key(v).unwrap()).collect();
        for pair in encoded.windows(2) {
            assert!(pair[0] < pair[1]);
        }
    }

    #[test]
    fn prefix_successor_bounds_the_prefix() {
        assert_eq!(prefix_successor(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_successor(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
        assert_eq!(compose(258, b"k", b"n"), vec![1, 2, b'k', b'n']);
    }

    #[test]
    fn decoding_checks_ranges() {
        let good = keygroup::KeyGroupRange::new(3, 9).unwrap();
        let bytes = encode_key(&good).unwrap();
        assert_eq!(
            decode_exact::<keygroup::KeyGroupRange>(&bytes, "r").unwrap(),
            good
        );
        let bad = encode_key(&(9u16, 3u16)).unwrap();
        assert!(decode_exact::<keygroup::KeyGroupRange>(&bad, "r").is_err());
    }
}
