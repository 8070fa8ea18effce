//! The harness's source: partitions read in a deterministic order from saved offsets.

use crate::SOURCE_UID;
use rockstate::checkpoint::{CheckpointMetadata, OperatorState, Redistribution};
use rockstate::{Error, Result};

/// A replayable, partitioned input: the record at a given offset never changes.
pub trait Source: Send + 'static {
    /// The record key.
    type Key;
    /// The record value.
    type Value;

    /// Number of partitions.
    fn partitions(&self) -> u32;

    /// The record at `offset` of `partition`, or `None` past its end.
    fn record(&self, partition: u32, offset: u64) -> Option<(Self::Key, Self::Value)>;
}

const OFFSETS: &str = "offsets";

/// How far each partition has been read. The next record always comes from the unfinished
/// partition with the lowest offset (lowest index on ties), so the order of the stream is
/// a function of the offsets alone and a restart replays it exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePosition {
    offsets: Vec<u64>,
    finished: Vec<bool>,
}

impl SourcePosition {
    /// Every partition at offset 0.
    pub fn start(partitions: u32) -> Self {
        Self {
            offsets: vec![0; partitions as usize],
            finished: vec![false; partitions as usize],
        }
    }

    /// The offset of every partition.
    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    /// Reads the next record.
    pub(crate) fn next<S: Source>(&mut self, source: &S) -> Option<(S::Key, S::Value)> {
        loop {
            let partition = (0..self.offsets.len())
                .filter(|p| !self.finished[*p])
                .min_by_key(|p| (self.offsets[*p], *p))?;
            match source.record(partition as u32, self.offsets[partition]) {
                Some(record) => {
                    self.offsets[partition] += 1;
                    return Some(record);
                }
                None => self.finished[partition] = true,
            }
        }
    }

    /// The offsets as operator state of `parallelism` source subtasks: partition `j`'s
    /// `(partition, offset)` entry goes to subtask `j % parallelism`.
    pub(crate) fn to_operator_state(&self, parallelism: u32) -> Vec<OperatorState> {
        let p = parallelism.max(1) as usize;
        let mut lists = vec![Vec::new(); p];
        for (j, offset) in self.offsets.iter().enumerate() {
            let mut entry = (j as u32).to_be_bytes().to_vec();
            entry.extend_from_slice(&offset.to_be_bytes());
            lists[j % p].push(entry);
        }
        lists
            .into_iter()
            .map(|entries| {
                let mut state = OperatorState::default();
                state.put(OFFSETS, Redistribution::Split, entries);
                state
            })
            .collect()
    }

    /// The position recorded in a checkpoint, whatever the parallelism it was taken with.
    ///
    /// Errors: `Corrupt` for a malformed entry; `Incompatible` when the checkpoint's
    /// partitions differ from the source's.
    pub(crate) fn from_checkpoint(meta: &CheckpointMetadata, partitions: u32) -> Result<Self> {
        let what = format!("source offsets of checkpoint {}", meta.checkpoint_id);
        let op = meta
            .operators
            .iter()
            .find(|o| o.uid == SOURCE_UID)
            .ok_or_else(|| Error::NotFound(what.clone()))?;
        let mut offsets: Vec<Option<u64>> = vec![None; partitions as usize];
        for subtask in &op.subtasks {
            for entry in subtask.operator_state.get(OFFSETS) {
                let (Some(p), Some(o)) = (entry.get(..4), entry.get(4..12)) else {
                    return Err(Error::corrupt(
                        &what,
                        format!("entry of {} bytes", entry.len()),
                    ));
                };
                if entry.len() != 12 {
                    return Err(Error::corrupt(
                        &what,
                        format!("entry of {} bytes", entry.len()),
                    ));
                }
                let p = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize;
                let o = u64::from_be_bytes([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]]);
                match offsets.get_mut(p) {
                    Some(slot @ None) => *slot = Some(o),
                    Some(Some(_)) => {
                        return Err(Error::corrupt(
                            &what,
                            format!("partition {p} recorded twice"),
                        ))
                    }
                    None => {
                        return Err(Error::IncompatibleLayout {
                            dir: what,
                            detail: format!("partition {p}, but the source has {partitions}"),
                        })
                    }
                }
            }
        }
        let offsets = offsets
            .into_iter()
            .enumerate()
            .map(|(p, o)| {
                o.ok_or_else(|| Error::IncompatibleLayout {
                    dir: what.clone(),
                    detail: format!("no offset for partition {p}"),
                })
            })
            .collect::<Result<Vec<u64>>>()?;
        Ok(Self {
            finished: vec![false; offsets.len()],
            offsets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Numbers(Vec<u64>);

    impl Source for Numbers {
        type Key = u64;
        type Value = u64;
        fn partitions(&self) -> u32 {
            self.0.len() as u32
        }
        fn record(&self, partition: u32, offset: u64) -> Option<(u64, u64)> {
            (offset < self.0[partition as usize]).then_some((u64::from(partition), offset))
        }
    }

    #[test]
    fn order_depends_on_offsets_only() {
        let source = Numbers(vec![3, 1, 2]);
        let mut pos = SourcePosition::start(3);
        let mut all = Vec::new();
        while let Some(r) = pos.next(&source) {
            all.push(r);
        }
        assert_eq!(all, vec![(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]);
        assert_eq!(pos.offsets(), &[3, 1, 2]);

        // Resuming from any prefix's offsets replays the same suffix.
        for cut in 0..all.len() {
            let mut pos = SourcePosition::start(3);
            for _ in 0..cut {
                pos.next(&source);
            }
            let saved = pos.offsets().to_vec();
            let mut resumed = SourcePosition {
                finished: vec![false; 3],
                offsets: saved,
            };
            let rest: Vec<_> = std::iter::from_fn(|| resumed.next(&source)).collect();
            assert_eq!(rest, all[cut..].to_vec(), "cut {cut}");
        }
    }
}
