//! `rockstate state ls`: what a checkpoint or savepoint holds, state by state, read
//! without a job (`rockstate::restore::SavepointReader`).

use std::collections::BTreeMap;

use rockstate::restore::SavepointReader;
use serde_json::{json, Value};

use crate::common::exit;
use crate::format::bytes;
use crate::snapshots::print_json;

/// Lists the operators and states of the snapshot at `url` with their entry counts
/// (every stored entry is read; entries expired but not compacted yet are counted) and
/// the bytes of each operator's files. `scratch` holds the local copies while counting.
pub async fn ls(url: &str, json: bool, scratch: &std::path::Path) -> rockstate::Result<u8> {
    let reader = SavepointReader::open(url, scratch).await?;
    let meta = reader.metadata().clone();
    let mut operators = Vec::new();
    for op in &meta.operators {
        let bytes_of_files: u64 = op
            .subtasks
            .iter()
            .filter_map(|s| s.keyed.as_ref())
            .map(|k| k.total_size())
            .sum();
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let has_keyed = op.subtasks.iter().any(|s| s.keyed.is_some());
        if has_keyed {
            let keyed = reader.keyed_state(&op.uid).await?;
            // Reading every entry is blocking RocksDB work: off the async threads.
            counts = tokio::task::block_in_place(|| -> rockstate::Result<_> {
                let mut counts: BTreeMap<String, u64> = BTreeMap::new();
                // Entries come state by state: one count per run of a name, no allocation per
                // entry.
                let mut current = String::new();
                let mut n = 0u64;
                keyed.for_each_raw(|state, _, _| {
                    if state != current {
                        if n > 0 {
                            *counts.entry(std::mem::take(&mut current)).or_default() += n;
                        }
                        current = state.to_string();
                        n = 0;
                    }
                    n += 1;
                })?;
                if n > 0 {
                    *counts.entry(current).or_default() += n;
                }
                keyed.close()?;
                Ok(counts)
            })?;
        }
        let operator_entries: usize = op
            .subtasks
            .iter()
            .map(|s| {
                s.operator_state
                    .lists
                    .values()
                    .map(|l| l.entries.len())
                    .sum::<usize>()
            })
            .sum();
        let states: Vec<Value> = op
            .states
            .iter()
            .map(|s| {
                let mut state = crate::snapshots::state_json(s);
                state["entries"] = json!(counts.get(&s.name).copied().unwrap_or(0));
                state
            })
            .collect();
        operators.push(json!({
            "uid": op.uid,
            "parallelism": op.parallelism,
            "max_parallelism": op.max_parallelism,
            "bytes": bytes_of_files,
            "operator_state_entries": operator_entries,
            "states": states,
        }));
    }
    if json {
        print_json(&json!({
            "snapshot": url,
            "checkpoint_id": meta.checkpoint_id,
            "operators": operators,
        }));
        return Ok(exit::OK);
    }
    for op in &operators {
        println!(
            "operator {:?}: parallelism {}, max parallelism {}, {} of keyed state files, {} operator state entries",
            op["uid"].as_str().unwrap_or_default(),
            op["parallelism"],
            op["max_parallelism"],
            bytes(op["bytes"].as_u64().unwrap_or(0)),
            op["operator_state_entries"]
        );
        for s in op["states"].as_array().into_iter().flatten() {
            let user_key = s["user_key_type"]
                .as_str()
                .map(|t| format!(" -> {t}"))
                .unwrap_or_default();
            let ttl = s["ttl_ms"]
                .as_u64()
                .map(|ms| format!(", ttl {ms} ms"))
                .unwrap_or_default();
            println!(
                "  {:<20} {:<11} {:>10} entries  key {}{}, value {}, namespace {}{}",
                s["name"].as_str().unwrap_or_default(),
                s["kind"].as_str().unwrap_or_default(),
                s["entries"],
                s["key_type"].as_str().unwrap_or_default(),
                user_key,
                s["value_type"].as_str().unwrap_or_default(),
                s["namespace_type"].as_str().unwrap_or_default(),
                ttl
            );
        }
    }
    Ok(exit::OK)
}
