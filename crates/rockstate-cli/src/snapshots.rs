//! Commands over stored checkpoints and savepoints: `checkpoints`, `latest`, `inspect`,
//! `verify`, `savepoint dispose`, `gc`.

use std::time::Duration;

use rockstate::checkpoint::{sweep, SnapshotKind, SweepOptions};
use rockstate::{
    CheckpointMetadata, CheckpointStorage, Error, ErrorKind, KeyedSnapshot, RestoreSource,
};
use serde_json::{json, Value};

use crate::common::exit;
use crate::format;
use crate::progress::Progress;

/// The version of every `--json` document's layout: fields may be added within a version;
/// a field removed or changed in meaning bumps it.
pub const SCHEMA_VERSION: u32 = 1;

/// Prints a JSON document as one line of stdout, with its `schema_version`.
pub fn print_json(value: &Value) {
    let mut value = value.clone();
    if let Value::Object(fields) = &mut value {
        fields.insert("schema_version".into(), json!(SCHEMA_VERSION));
    }
    println!("{value}");
}

/// The job directories directly inside `dir` (folders holding a `chk-N/_metadata` or an
/// `_epochs/` claim), for commands given a checkpoint directory instead of a job's.
async fn job_dirs_inside(dir: &CheckpointStorage) -> rockstate::Result<Vec<String>> {
    let mut jobs = std::collections::BTreeSet::new();
    for object in dir.list("").await? {
        let parts: Vec<&str> = object.path.split('/').collect();
        let is_job = match parts.as_slice() {
            [_, chk, "_metadata"] => chk.starts_with("chk-"),
            [_, "_epochs", _] => true,
            _ => false,
        };
        if is_job {
            jobs.insert(parts[0].to_string());
        }
    }
    Ok(jobs.into_iter().collect())
}

/// The error for a checkpoint directory given where a job directory is expected, when
/// `job` holds job directories (`Ok` otherwise).
pub async fn refuse_parent(job: &CheckpointStorage) -> rockstate::Result<()> {
    let jobs = job_dirs_inside(job).await?;
    if jobs.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = jobs.iter().take(5).map(String::as_str).collect();
    Err(Error::invalid(format!(
        "{} is a checkpoint directory holding the job directories {}{}; give one of them, e.g. {}",
        job.url(),
        shown.join(", "),
        if jobs.len() > shown.len() {
            ", ..."
        } else {
            ""
        },
        job.url_of(&jobs[0])
    )))
}

/// Opens an existing job directory (never creates one).
pub fn open_job(url: &str) -> rockstate::Result<CheckpointStorage> {
    CheckpointStorage::open_existing(url)
}

fn kind_name(kind: SnapshotKind) -> (&'static str, &'static str) {
    match kind {
        SnapshotKind::Checkpoint => ("checkpoint", "incremental"),
        SnapshotKind::SavepointCanonical => ("savepoint", "canonical"),
        SnapshotKind::SavepointNative => ("savepoint", "native"),
    }
}

fn file_count(meta: &CheckpointMetadata) -> usize {
    meta.keyed().map(|(_, k)| k.files().len()).sum()
}

/// `rockstate checkpoints JOB_URL`.
pub async fn checkpoints(job_url: &str, json: bool) -> rockstate::Result<u8> {
    let job = open_job(job_url)?;
    let found = job.checkpoints().await?;
    if found.completed.is_empty() && found.incomplete.is_empty() && found.unreadable.is_empty() {
        refuse_parent(&job).await?;
    }
    let mut rows: Vec<(u64, Value)> = Vec::new();
    for meta in &found.completed {
        rows.push((
            meta.checkpoint_id,
            json!({
                "id": meta.checkpoint_id,
                "status": "completed",
                "url": job.url_of(&format!("chk-{}", meta.checkpoint_id)),
                "triggered_at_ms": meta.triggered_at_ms,
                "completed_at_ms": meta.completed_at_ms,
                "total_bytes": meta.total_size(),
                "uploaded_bytes": meta.uploaded_bytes(),
                "files": file_count(meta),
            }),
        ));
    }
    for id in &found.incomplete {
        rows.push((*id, json!({ "id": id, "status": "incomplete" })));
    }
    for (id, why) in &found.unreadable {
        rows.push((
            *id,
            json!({ "id": id, "status": "unreadable", "error": why }),
        ));
    }
    rows.sort_by_key(|(id, _)| *id);
    if json {
        let list: Vec<Value> = rows.into_iter().map(|(_, v)| v).collect();
        print_json(&json!({ "job": job.url(), "checkpoints": list }));
        return Ok(exit::OK);
    }
    println!(
        "{}: {} completed, {} incomplete, {} unreadable",
        job.url(),
        found.completed.len(),
        found.incomplete.len(),
        found.unreadable.len()
    );
    if rows.is_empty() {
        return Ok(exit::OK);
    }
    println!(
        "{:>8}  {:<24}  {:>10}  {:>10}  {:>5}",
        "id", "completed", "size", "uploaded", "files"
    );
    for (id, row) in rows {
        match row["status"].as_str() {
            Some("completed") => println!(
                "{id:>8}  {:<24}  {:>10}  {:>10}  {:>5}",
                format::utc_millis(row["completed_at_ms"].as_u64().unwrap_or(0)),
                format::bytes(row["total_bytes"].as_u64().unwrap_or(0)),
                format::bytes(row["uploaded_bytes"].as_u64().unwrap_or(0)),
                row["files"].as_u64().unwrap_or(0)
            ),
            Some("incomplete") => println!("{id:>8}  incomplete (no _metadata)"),
            _ => println!(
                "{id:>8}  unreadable: {}",
                row["error"].as_str().unwrap_or("")
            ),
        }
    }
    Ok(exit::OK)
}

/// `rockstate latest JOB_URL`.
pub async fn latest(job_url: &str, json: bool) -> rockstate::Result<u8> {
    let job = open_job(job_url)?;
    let latest = job.latest_completed().await?;
    if latest.is_none() {
        refuse_parent(&job).await?;
    }
    let url = latest
        .as_ref()
        .map(|meta| job.url_of(&format!("chk-{}", meta.checkpoint_id)));
    if json {
        print_json(&json!({
            "job": job.url(),
            "latest": url,
            "checkpoint_id": latest.as_ref().map(|m| m.checkpoint_id),
        }));
    }
    match url {
        Some(url) => {
            if !json {
                println!("{url}");
            }
            Ok(exit::OK)
        }
        None => {
            eprintln!("rockstate: no completed checkpoint in {}", job.url());
            Ok(exit::NONE)
        }
    }
}

/// The JSON description of one state (`inspect --json`, `state ls --json`).
pub fn state_json(s: &rockstate::StateMeta) -> Value {
    json!({
        "name": s.name,
        "kind": s.kind.to_string(),
        "key_type": s.key_type.name,
        "namespace_type": s.namespace_type.name,
        "user_key_type": s.user_key_type.as_ref().map(|t| &t.name),
        "value_type": s.value_type.name,
        "structures": {
            "key": s.key_type.schema.as_ref().map(|t| t.describe()),
            "user_key": s.user_key_type.as_ref().and_then(|t| t.schema.as_ref()).map(|t| t.describe()),
            "value": s.value_type.schema.as_ref().map(|t| t.describe()),
        },
        "serializer_version": s.serializer_version,
        "ttl_ms": s.ttl_millis,
    })
}

/// The JSON description of a snapshot (`inspect --json`).
fn describe(source: &RestoreSource) -> Value {
    let meta = source.metadata();
    let (kind, format) = kind_name(meta.kind);
    let operators: Vec<Value> = meta
        .operators
        .iter()
        .map(|op| {
            let states: Vec<Value> = op.states.iter().map(state_json).collect();
            let subtasks: Vec<Value> = op
                .subtasks
                .iter()
                .enumerate()
                .map(|(i, sub)| {
                    let operator_state: serde_json::Map<String, Value> = sub
                        .operator_state
                        .lists
                        .iter()
                        .map(|(name, list)| (name.clone(), json!(list.entries.len())))
                        .collect();
                    let keyed = sub.keyed.as_ref().map(|k| {
                        let files: Vec<Value> = match k {
                            KeyedSnapshot::Files(h) => h
                                .shared
                                .iter()
                                .map(|f| (f, "shared"))
                                .chain(h.private.iter().map(|f| (f, "private")))
                                .map(|(f, role)| {
                                    json!({
                                        "path": f.path, "role": role, "size": f.size,
                                        "crc32": format!("{:08x}", f.crc32),
                                        "uploaded_by": f.uploaded_by,
                                    })
                                })
                                .collect(),
                            KeyedSnapshot::Canonical(c) => vec![json!({
                                "path": c.file.path, "role": "data", "size": c.file.size,
                                "crc32": format!("{:08x}", c.file.crc32),
                                "uploaded_by": c.file.uploaded_by,
                            })],
                        };
                        let range = k.key_group_range();
                        json!({
                            "key_groups": [range.start(), range.end()],
                            "layout": match k {
                                KeyedSnapshot::Files(_) => "rocksdb",
                                KeyedSnapshot::Canonical(_) => "canonical",
                            },
                            "bytes": k.total_size(),
                            "uploaded_bytes": k.uploaded_bytes(),
                            "files": files,
                        })
                    });
                    json!({ "index": i, "keyed": keyed, "operator_state": operator_state })
                })
                .collect();
            json!({
                "uid": op.uid,
                "uid_hash": op.uid_hash,
                "parallelism": op.parallelism,
                "max_parallelism": op.max_parallelism,
                "states": states,
                "subtasks": subtasks,
            })
        })
        .collect();
    json!({
        "url": source.location(),
        "kind": kind,
        "format": format,
        "id": meta.checkpoint_id,
        "job_id": meta.job_id,
        "triggered_at_ms": meta.triggered_at_ms,
        "completed_at_ms": meta.completed_at_ms,
        "total_bytes": meta.total_size(),
        "uploaded_bytes": meta.uploaded_bytes(),
        "files": file_count(meta),
        "operators": operators,
    })
}

/// `rockstate inspect SNAPSHOT_URL`.
pub async fn inspect(url: &str, json: bool) -> rockstate::Result<u8> {
    let source = RestoreSource::open(url).await?;
    let doc = describe(&source);
    if json {
        print_json(&doc);
        return Ok(exit::OK);
    }
    let meta = source.metadata();
    let (kind, format) = kind_name(meta.kind);
    println!("{} {}", kind, source.location());
    println!("  id          {}", meta.checkpoint_id);
    println!("  job         {}", meta.job_id);
    println!("  format      {format}");
    println!("  completed   {}", format::utc_millis(meta.completed_at_ms));
    println!(
        "  size        {} in {} files ({} uploaded by it)",
        format::bytes(meta.total_size()),
        file_count(meta),
        format::bytes(meta.uploaded_bytes())
    );
    for op in &meta.operators {
        println!(
            "operator {:?}: parallelism {}, max parallelism {}",
            op.uid, op.parallelism, op.max_parallelism
        );
        for s in &op.states {
            let user_key = s
                .user_key_type
                .as_ref()
                .map(|t| format!(", user key {t}"))
                .unwrap_or_default();
            let ttl = s
                .ttl_millis
                .map(|t| format!(", ttl {t} ms"))
                .unwrap_or_default();
            println!(
                "  state {:?} ({}): key {}, namespace {}{user_key}, value {}{ttl}",
                s.name, s.kind, s.key_type, s.namespace_type, s.value_type
            );
        }
        for (i, sub) in op.subtasks.iter().enumerate() {
            let lists: Vec<String> = sub
                .operator_state
                .lists
                .iter()
                .map(|(name, l)| format!("{name}: {} entries", l.entries.len()))
                .collect();
            match &sub.keyed {
                Some(k) => {
                    println!(
                        "  subtask {i}: key groups {}, {} in {} files{}",
                        k.key_group_range(),
                        format::bytes(k.total_size()),
                        k.files().len(),
                        if lists.is_empty() {
                            String::new()
                        } else {
                            format!("; operator state {}", lists.join(", "))
                        }
                    );
                    for f in k.files() {
                        println!("    {:<60} {:>10}", f.path, format::bytes(f.size));
                    }
                }
                None => println!(
                    "  subtask {i}: no keyed state{}",
                    if lists.is_empty() {
                        String::new()
                    } else {
                        format!("; operator state {}", lists.join(", "))
                    }
                ),
            }
        }
    }
    Ok(exit::OK)
}

/// `rockstate verify SNAPSHOT_URL`.
pub async fn verify(url: &str, json: bool) -> rockstate::Result<u8> {
    let source = match RestoreSource::open(url).await {
        Ok(source) => source,
        // Damaged metadata is a bad file of the snapshot, not bad input. Metadata of a
        // newer format (`Incompatible`) is not damage: it is reported as an error.
        Err(e) if e.kind() == ErrorKind::Corrupt => {
            let metadata = metadata_url(url);
            report_bad(json, url, 1, None, &[(metadata, e)]);
            return Ok(exit::BAD_FILES);
        }
        Err(e) => return Err(e),
    };
    let total: u64 = source
        .metadata()
        .keyed()
        .flat_map(|(_, k)| k.files())
        .fold(0u64, |acc, f| acc.saturating_add(f.size));
    let progress = Progress::bytes("verify", total);
    let report = source.verify(|n| progress.add(n)).await?;
    progress.finish();
    // Every referenced file plus `_metadata`, which was read and checked to open it.
    let files = report.files + 1;
    if report.is_sound() {
        if json {
            print_json(&json!({
                "url": source.location(), "sound": true, "files": files,
                "bytes": report.bytes, "bad": [],
            }));
        } else {
            println!(
                "{}: sound ({files} files, {} checked)",
                source.location(),
                format::bytes(report.bytes)
            );
        }
        return Ok(exit::OK);
    }
    let bad: Vec<(String, Error)> = report.bad.into_iter().map(|b| (b.url, b.error)).collect();
    report_bad(json, source.location(), files, Some(report.bytes), &bad);
    Ok(exit::BAD_FILES)
}

/// The URL of a snapshot's `_metadata`, in the normalized form other reports use.
fn metadata_url(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    let folder = trimmed.strip_suffix("/_metadata").unwrap_or(trimmed);
    match CheckpointStorage::open_existing(folder) {
        Ok(storage) => storage.url_of("_metadata"),
        Err(_) => format!("{folder}/_metadata"),
    }
}

fn report_bad(json: bool, url: &str, files: usize, bytes: Option<u64>, bad: &[(String, Error)]) {
    if json {
        let list: Vec<Value> = bad
            .iter()
            .map(|(url, e)| {
                json!({
                    "url": url,
                    "kind": format!("{:?}", e.kind()),
                    "error": crate::common::one_line(&e.report().to_string()),
                })
            })
            .collect();
        print_json(&json!({
            "url": url, "sound": false, "files": files, "bytes": bytes, "bad": list,
        }));
        return;
    }
    for (file, e) in bad {
        println!(
            "BAD {file}: {}",
            crate::common::one_line(&e.report().to_string())
        );
    }
    println!("{url}: {} of {files} files bad", bad.len());
    eprintln!(
        "rockstate: {url} is damaged: {} bad file(s), listed above",
        bad.len()
    );
}

/// `rockstate savepoint dispose SAVEPOINT_URL`.
pub async fn dispose(url: &str) -> rockstate::Result<u8> {
    let folder = CheckpointStorage::open_existing(url.trim_end_matches('/'))?;
    rockstate::savepoint::dispose_savepoint(&folder).await?;
    if let Some(dir) = folder.local_dir() {
        // The objects are gone; the emptied folder goes too (left if anything remains).
        if let Err(e) = tokio::fs::remove_dir(dir).await {
            tracing::warn!(dir = %dir.display(), error = %e, "savepoint folder not removed");
        }
    }
    println!("disposed {}", folder.url());
    Ok(exit::OK)
}

/// `rockstate gc JOB_URL`.
pub async fn gc(
    job_url: &str,
    dry_run: bool,
    grace: Duration,
    json: bool,
) -> rockstate::Result<u8> {
    let job = open_job(job_url)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::Internal(format!("system clock before 1970: {e}")))?
        .as_millis() as u64;
    let report = sweep(&job, &SweepOptions { grace, dry_run }, now_ms).await?;
    if json {
        let mut doc = serde_json::to_value(&report)
            .map_err(|e| Error::Internal(format!("encode the sweep report: {e}")))?;
        doc["job"] = json!(job.url());
        print_json(&doc);
        return Ok(exit::OK);
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    for orphan in &report.orphans {
        println!(
            "{verb} {} ({})",
            job.url_of(&orphan.path),
            format::bytes(orphan.size)
        );
    }
    println!(
        "{}: {verb} {} orphan files ({}); kept {} referenced, {} younger than {:?}",
        job.url(),
        report.orphans.len(),
        format::bytes(report.orphan_bytes),
        report.referenced,
        report.too_young,
        grace
    );
    for (id, why) in &report.unreadable {
        eprintln!("rockstate: checkpoint {id} is unreadable, shared/ left alone: {why}");
    }
    Ok(exit::OK)
}
