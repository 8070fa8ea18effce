//! Key groups: how keys are assigned to subtasks.
//!
//! A key's group is `murmur3_x86_32(serialized key, seed 0) % max_parallelism`. Subtask `i`
//! of `p` owns the contiguous groups `[ceil(i*m/p), ceil((i+1)*m/p) - 1]`, and key group
//! `kg` belongs to subtask `kg * p / m`. These rules are frozen: every checkpoint and
//! savepoint depends on them, and `fixtures/keygroup_vectors.txt` pins them.
//!
//! This module works on serialized keys; [`crate::subtask_for_key`] and
//! [`crate::key_group_for`] (in [`crate::codec`], which decides how a key is serialized)
//! take typed keys. Runtimes must route records with them (or [`key_group_for_bytes`]
//! followed by [`subtask_for_key_group`]) so that routing and state ownership agree.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The largest allowed max parallelism (number of key groups). Key groups are stored as a
/// big-endian `u16` prefix, and this bound keeps `kg * parallelism` within `u32` range math.
pub const MAX_MAX_PARALLELISM: u32 = 32_768;

/// MurmurHash3, x86 32-bit variant, over `data` with `seed`.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut k: u32 = 0;
        for (i, b) in tail.iter().enumerate() {
            k |= u32::from(*b) << (8 * i);
        }
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Checks that `max_parallelism` is in `1..=32768`.
pub fn validate_max_parallelism(max_parallelism: u32) -> Result<()> {
    if (1..=MAX_MAX_PARALLELISM).contains(&max_parallelism) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "max parallelism {max_parallelism} is outside 1..={MAX_MAX_PARALLELISM}"
        )))
    }
}

/// Checks that `parallelism` is in `1..=max_parallelism` and that `max_parallelism` is valid.
pub fn validate_parallelism(parallelism: u32, max_parallelism: u32) -> Result<()> {
    validate_max_parallelism(max_parallelism)?;
    if (1..=max_parallelism).contains(&parallelism) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "parallelism {parallelism} is outside 1..={max_parallelism} (the max parallelism)"
        )))
    }
}

/// The key group of already-serialized key bytes. `max_parallelism` must be valid.
pub fn key_group_for_bytes(key_bytes: &[u8], max_parallelism: u32) -> u16 {
    debug_assert!((1..=MAX_MAX_PARALLELISM).contains(&max_parallelism));
    (murmur3_32(key_bytes, 0) % max_parallelism) as u16
}

/// The subtask (0-based) of `parallelism` that owns `key_group`.
///
/// Errors: `InvalidArgument` when the parallelism settings are invalid or `key_group` is not
/// below `max_parallelism`.
pub fn subtask_for_key_group(
    key_group: u16,
    parallelism: u32,
    max_parallelism: u32,
) -> Result<u32> {
    validate_parallelism(parallelism, max_parallelism)?;
    if u32::from(key_group) >= max_parallelism {
        return Err(Error::invalid(format!(
            "key group {key_group} is not below max parallelism {max_parallelism}"
        )));
    }
    Ok(u32::from(key_group) * parallelism / max_parallelism)
}

/// The key groups owned by `subtask` of `parallelism`.
///
/// Errors: `InvalidArgument` when the settings are invalid or `subtask >= parallelism`.
pub fn key_group_range_for_subtask(
    subtask: u32,
    parallelism: u32,
    max_parallelism: u32,
) -> Result<KeyGroupRange> {
    validate_parallelism(parallelism, max_parallelism)?;
    if subtask >= parallelism {
        return Err(Error::invalid(format!(
            "subtask {subtask} is not below parallelism {parallelism}"
        )));
    }
    let (i, p, m) = (
        u64::from(subtask),
        u64::from(parallelism),
        u64::from(max_parallelism),
    );
    let start = (i * m).div_ceil(p);
    let end = ((i + 1) * m).div_ceil(p) - 1;
    Ok(KeyGroupRange {
        start: start as u16,
        end: end as u16,
    })
}

/// An inclusive, non-empty range of key groups `[start, end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RangeRepr")]
pub struct KeyGroupRange {
    start: u16,
    end: u16,
}

/// The serialized form of a range, checked on the way in.
#[derive(Deserialize)]
struct RangeRepr {
    start: u16,
    end: u16,
}

impl TryFrom<RangeRepr> for KeyGroupRange {
    type Error = Error;

    fn try_from(r: RangeRepr) -> Result<Self> {
        KeyGroupRange::new(r.start, r.end)
    }
}

impl KeyGroupRange {
    /// The range `[start, end]`. Errors with `InvalidArgument` when `start > end` or
    /// `end >= 32768`.
    pub fn new(start: u16, end: u16) -> Result<Self> {
        if start > end || u32::from(end) >= MAX_MAX_PARALLELISM {
            return Err(Error::invalid(format!(
                "key group range [{start}, {end}] is empty or beyond {}",
                MAX_MAX_PARALLELISM - 1
            )));
        }
        Ok(Self { start, end })
    }

    /// All key groups of a job with `max_parallelism` (one subtask owns everything).
    pub fn all(max_parallelism: u32) -> Result<Self> {
        validate_max_parallelism(max_parallelism)?;
        Self::new(0, (max_parallelism - 1) as u16)
    }

    /// First key group of the range.
    pub fn start(&self) -> u16 {
        self.start
    }

    /// Last key group of the range (inclusive).
    pub fn end(&self) -> u16 {
        self.end
    }

    /// Number of key groups in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }

    /// Always false: a range holds at least one key group. Present for API symmetry.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `key_group` is in the range.
    pub fn contains(&self, key_group: u16) -> bool {
        (self.start..=self.end).contains(&key_group)
    }

    /// The key groups in both ranges, if any.
    pub fn intersect(&self, other: &KeyGroupRange) -> Option<KeyGroupRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start <= end).then_some(KeyGroupRange { start, end })
    }

    /// Whether every key group of the range is below `max_parallelism`.
    pub fn fits(&self, max_parallelism: u32) -> bool {
        u32::from(self.end) < max_parallelism
    }

    /// Iterates over the key groups of the range in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u16> {
        self.start..=self.end
    }
}

impl fmt::Display for KeyGroupRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}]", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_published_vectors() {
        // Reference values of MurmurHash3_x86_32 (seed 0 unless stated).
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"hello", 0), 0x248b_fa47);
        assert_eq!(murmur3_32(b"Hello, world!", 1234), 0xfaf6_cdb3);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0),
            0x2e4f_f723
        );
        assert_eq!(murmur3_32(&[0x21, 0x43, 0x65, 0x87], 0), 0xf55b_516b);
        assert_eq!(murmur3_32(&[0x21, 0x43, 0x65], 0), 0x7e4a_8634);
        assert_eq!(murmur3_32(&[0x21, 0x43], 0), 0xa0f7_b07a);
        assert_eq!(murmur3_32(&[0x21], 0), 0x7266_1cf4);
    }

    #[test]
    fn validation_bounds() {
        assert!(validate_max_parallelism(0).is_err());
        assert!(validate_max_parallelism(1).is_ok());
        assert!(validate_max_parallelism(32_768).is_ok());
        assert!(validate_max_parallelism(32_769).is_err());
        assert!(validate_parallelism(0, 128).is_err());
        assert!(validate_parallelism(128, 128).is_ok());
        assert!(validate_parallelism(129, 128).is_err());
        assert!(key_group_range_for_subtask(3, 3, 128).is_err());
        assert!(subtask_for_key_group(128, 2, 128).is_err());
        assert!(KeyGroupRange::new(5, 4).is_err());
        assert!(KeyGroupRange::new(0, 32_768).is_err());
    }

    #[test]
    fn ranges_partition_key_groups_and_agree_with_routing() {
        for m in [1u32, 2, 3, 7, 128, 1000, 32_768] {
            for p in [1u32, 2, 3, 4, 5, 7, 16, 127, 128] {
                if p > m {
                    continue;
                }
                let mut next = 0u32;
                for i in 0..p {
                    let r = key_group_range_for_subtask(i, p, m).unwrap();
                    assert_eq!(u32::from(r.start()), next, "m={m} p={p} i={i}");
                    next = u32::from(r.end()) + 1;
                    for kg in [r.start(), r.end()] {
                        assert_eq!(subtask_for_key_group(kg, p, m).unwrap(), i);
                    }
                }
                assert_eq!(next, m);
            }
        }
    }

    #[test]
    fn range_operations() {
        let a = KeyGroupRange::new(10, 20).unwrap();
        let b = KeyGroupRange::new(15, 30).unwrap();
        assert_eq!(a.intersect(&b), Some(KeyGroupRange::new(15, 20).unwrap()));
        assert_eq!(a.intersect(&KeyGroupRange::new(21, 22).unwrap()), None);
        assert_eq!(a.len(), 11);
        assert!(a.contains(10) && a.contains(20) && !a.contains(21));
        assert!(a.fits(21) && !a.fits(20));
        assert_eq!(a.to_string(), "[10, 20]");
        assert_eq!(KeyGroupRange::all(128).unwrap().len(), 128);
    }
}
