//! `rockstate state ls|get|dump`: what a checkpoint or savepoint holds, state by state,
//! read without a job (`rockstate::restore::SavepointReader`), values decoded through the
//! type structures recorded with each state.

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

/// Prints the entries of `key` (JSON; a bare word for a string key) in state `state` of
/// operator `operator` as JSON lines. Exit 1 when there are none.
pub async fn get(
    url: &str,
    operator: &str,
    state: &str,
    key: &str,
    scratch: &std::path::Path,
) -> rockstate::Result<u8> {
    let reader = SavepointReader::open(url, scratch).await?;
    let keyed = reader.keyed_state(operator).await?;
    let string_key = keyed
        .states()
        .iter()
        .find(|s| s.name == state)
        .and_then(|s| s.key_type.schema.as_ref())
        .is_some_and(|t| t.name() == "String");
    let key = parse_key(key, string_key);
    let found = tokio::task::block_in_place(|| -> rockstate::Result<u64> {
        let prefix = keyed.key_prefix(state, &key)?;
        let mut out = Lines::new();
        keyed.scan_json(state, &prefix, |entry| out.write(&entry))?;
        let written = out.written;
        out.finish()?;
        keyed.close()?;
        Ok(written)
    })?;
    Ok(if found == 0 { exit::NONE } else { exit::OK })
}

/// Prints every entry of state `state` of operator `operator` as JSON lines, at most
/// `limit`.
pub async fn dump(
    url: &str,
    operator: &str,
    state: &str,
    limit: Option<u64>,
    scratch: &std::path::Path,
) -> rockstate::Result<u8> {
    let reader = SavepointReader::open(url, scratch).await?;
    let keyed = reader.keyed_state(operator).await?;
    tokio::task::block_in_place(|| -> rockstate::Result<()> {
        let mut out = Lines::new();
        keyed.scan_json(state, &[], |entry| {
            limit.is_none_or(|l| out.written < l) && out.write(&entry)
        })?;
        out.finish()?;
        keyed.close()
    })?;
    Ok(exit::OK)
}

/// A key typed on the command line: JSON, except that a bare word (or a number given for
/// a string key) is the text itself.
fn parse_key(text: &str, string_key: bool) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::String(s)) => Value::String(s),
        Ok(v) if !string_key => v,
        _ => Value::String(text.to_string()),
    }
}

/// Where `key-group --like` found a key.
pub struct KeyGroupLike {
    pub key_group: u16,
    pub max_parallelism: u32,
    pub parallelism: u32,
    pub key_type: String,
}

/// The key group of `key` (JSON) in the key type recorded for `state` of `operator` in the
/// snapshot at `url`; only the snapshot's `_metadata` is read.
pub async fn key_group_like(
    url: &str,
    operator: &str,
    state: &str,
    key: &str,
) -> rockstate::Result<KeyGroupLike> {
    let source = rockstate::RestoreSource::open(url).await?;
    let op = source
        .metadata()
        .operator(operator)
        .ok_or_else(|| rockstate::Error::invalid(format!("no operator {operator:?} in {url}")))?;
    let meta = op.states.iter().find(|s| s.name == state).ok_or_else(|| {
        rockstate::Error::invalid(format!("operator {operator:?} has no state {state:?}"))
    })?;
    let schema = meta.key_type.schema.as_ref().ok_or_else(|| {
        rockstate::Error::invalid(format!(
            "state {state:?}: its key type {} was recorded without its structure (by an \
             earlier version): use --key-type",
            meta.key_type.rust_name
        ))
    })?;
    let encoded = schema.encode_json(&parse_key(key, schema.name() == "String"))?;
    Ok(KeyGroupLike {
        key_group: rockstate::keygroup::key_group_for_bytes(&encoded, op.max_parallelism),
        max_parallelism: op.max_parallelism,
        parallelism: op.parallelism,
        key_type: meta.key_type.name.clone(),
    })
}

/// JSON lines on standard output, buffered; a closed pipe (`| head`) ends the output
/// quietly.
struct Lines {
    out: std::io::BufWriter<std::io::Stdout>,
    written: u64,
    error: Option<std::io::Error>,
}

impl Lines {
    fn new() -> Self {
        Self {
            out: std::io::BufWriter::new(std::io::stdout()),
            written: 0,
            error: None,
        }
    }

    /// Writes one line; `false` once the output is closed or failed.
    fn write(&mut self, entry: &Value) -> bool {
        use std::io::Write;
        let line = entry.to_string();
        match writeln!(self.out, "{line}") {
            Ok(()) => {
                self.written += 1;
                true
            }
            Err(e) => {
                self.error = Some(e);
                false
            }
        }
    }

    fn finish(mut self) -> rockstate::Result<()> {
        use std::io::Write;
        let flushed = self.out.flush();
        match self.error.take().map_or(flushed, Err) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(rockstate::Error::io("write to standard output", e))
            }
            _ => Ok(()),
        }
    }
}
