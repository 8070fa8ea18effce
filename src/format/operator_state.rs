//! Non-keyed operator state: small named lists per subtask (e.g. source offsets), stored
//! in `_metadata` and redistributed when the parallelism changes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a list is spread over subtasks when the parallelism changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Redistribution {
    /// The entries of all subtasks are dealt round-robin to the new subtasks.
    Split,
    /// Every new subtask receives every entry of every old subtask.
    Union,
}

/// A named list of opaque entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorList {
    /// How the list is redistributed.
    pub mode: Redistribution,
    /// The entries, in order.
    pub entries: Vec<Vec<u8>>,
}

/// The operator state of one subtask: lists by name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OperatorState {
    /// The lists, by name.
    pub lists: BTreeMap<String, OperatorList>,
}

impl OperatorState {
    /// Sets the list `name`.
    pub fn put(&mut self, name: &str, mode: Redistribution, entries: Vec<Vec<u8>>) {
        self.lists
            .insert(name.to_string(), OperatorList { mode, entries });
    }

    /// The entries of list `name` (empty when absent).
    pub fn get(&self, name: &str) -> &[Vec<u8>] {
        self.lists.get(name).map_or(&[], |l| &l.entries)
    }

    /// Whether no list has entries.
    pub fn is_empty(&self) -> bool {
        self.lists.values().all(|l| l.entries.is_empty())
    }
}

/// Spreads the operator state of the old subtasks (in subtask order) over
/// `new_parallelism` subtasks. With an unchanged parallelism each subtask keeps its own.
///
/// Errors: `Corrupt` when one list name has different modes in different subtasks;
/// `InvalidArgument` for a zero parallelism.
pub fn redistribute(old: &[OperatorState], new_parallelism: u32) -> Result<Vec<OperatorState>> {
    if new_parallelism == 0 {
        return Err(Error::invalid("parallelism 0"));
    }
    let p = new_parallelism as usize;
    if old.len() == p {
        return Ok(old.to_vec());
    }
    let mut modes: BTreeMap<&str, Redistribution> = BTreeMap::new();
    for state in old {
        for (name, list) in &state.lists {
            match modes.insert(name, list.mode) {
                Some(mode) if mode != list.mode => {
                    return Err(Error::corrupt(
                        "operator state",
                        format!("list {name:?} is both split and union"),
                    ))
                }
                _ => {}
            }
        }
    }
    let mut new = vec![OperatorState::default(); p];
    for (name, mode) in modes {
        let all = old.iter().flat_map(|s| s.get(name).iter().cloned());
        match mode {
            Redistribution::Split => {
                let mut lists = vec![Vec::new(); p];
                for (i, entry) in all.enumerate() {
                    lists[i % p].push(entry);
                }
                for (state, entries) in new.iter_mut().zip(lists) {
                    state.put(name, mode, entries);
                }
            }
            Redistribution::Union => {
                let entries: Vec<Vec<u8>> = all.collect();
                for state in &mut new {
                    state.put(name, mode, entries.clone());
                }
            }
        }
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(offsets: &[u8], union: &[u8]) -> OperatorState {
        let mut s = OperatorState::default();
        s.put(
            "offsets",
            Redistribution::Split,
            offsets.iter().map(|b| vec![*b]).collect(),
        );
        s.put(
            "seen",
            Redistribution::Union,
            union.iter().map(|b| vec![*b]).collect(),
        );
        s
    }

    fn flat(states: &[OperatorState], name: &str) -> Vec<Vec<u8>> {
        states.iter().map(|s| s.get(name).concat()).collect()
    }

    #[test]
    fn split_and_union_from_two_to_three_and_back() {
        let two = vec![state(&[1, 2, 3], &[10]), state(&[4], &[20])];
        let three = redistribute(&two, 3).unwrap();
        assert_eq!(flat(&three, "offsets"), vec![vec![1, 4], vec![2], vec![3]]);
        assert_eq!(flat(&three, "seen"), vec![vec![10, 20]; 3]);

        let back = redistribute(&three, 2).unwrap();
        let mut all: Vec<u8> = flat(&back, "offsets").concat();
        all.sort();
        assert_eq!(all, vec![1, 2, 3, 4], "no entry lost or duplicated");
        assert_eq!(flat(&back, "seen"), vec![vec![10, 20, 10, 20, 10, 20]; 2]);

        assert_eq!(redistribute(&two, 2).unwrap(), two);
        assert!(redistribute(&two, 0).is_err());

        let mut conflict = two.clone();
        conflict[1].put("seen", Redistribution::Split, vec![]);
        assert!(redistribute(&conflict, 3).is_err());
    }
}
