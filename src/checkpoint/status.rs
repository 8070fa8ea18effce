//! The job status document: what a running coordinator keeps up to date in its job
//! directory (`_status.json`), so that any process (`rockstate status`, a script, a
//! dashboard) sees the checkpoints of a running job without talking to it.
//!
//! The coordinator rewrites the document when something changed (a checkpoint triggered,
//! completed or failed) and at least once per heartbeat otherwise, after checking that it
//! still owns the job directory: a fenced (older) writer does not overwrite the status of
//! the writer that replaced it. [`read_status`] tells whether the document is stale: its
//! writer no longer owns the directory, or it has not been refreshed for three heartbeats
//! (its process died or hangs).
//!
//! The document is plain JSON ([`JobStatus`]), with a `schema_version`; fields may be
//! added in later versions of the same schema, never renamed.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::checkpoint::epoch::Epochs;
use crate::error::{Error, ErrorKind, Result};
use crate::format::CheckpointMetadata;
use crate::storage::CheckpointStorage;

/// The status document's name in the job directory.
pub const STATUS_FILE: &str = "_status.json";
/// The version of [`JobStatus`]'s schema.
pub const STATUS_SCHEMA_VERSION: u32 = 1;
/// How often an unchanged status is rewritten by default.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Changes are written at most once a second (stores limit the write rate of one
/// object, and a change per checkpoint acknowledgement would be many).
const MIN_CHANGE_INTERVAL_MS: u64 = 1_000;
/// Finished checkpoints kept in [`JobStatus::recent`].
pub const RECENT_CHECKPOINTS: usize = 20;
/// A status document is small: a generous bound on what is read back.
const MAX_STATUS_LEN: u64 = 1 << 20;
/// Sync pauses noted for checkpoints not finished yet: a bound, in case a runtime notes
/// pauses of checkpoints the coordinator never hears of again.
const MAX_NOTED: usize = 256;

/// What the job is doing, as its coordinator last said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Running: checkpoints are taken.
    Running,
    /// Stopped on purpose (finished, cancelled, stopped with a savepoint).
    Stopped,
    /// Stopped by an error.
    Failed,
}

/// How a checkpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Its `_metadata` was committed.
    Completed,
    /// It could not complete (a subtask declined, an upload or the commit failed).
    Failed,
    /// It was abandoned (timed out, subsumed by a newer one, the job stopped).
    Aborted,
}

/// One finished checkpoint or savepoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Its id.
    pub id: u64,
    /// `true` for a savepoint.
    pub savepoint: bool,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it failed or was aborted.
    pub reason: Option<String>,
    /// When it was triggered (ms since the Unix epoch).
    pub triggered_ms: u64,
    /// When it ended (ms since the Unix epoch).
    pub ended_ms: u64,
    /// From trigger to end.
    pub duration_ms: u64,
    /// The longest synchronous pause of its subtasks, when the runtime reported them.
    pub sync_ms: Option<u64>,
    /// The rest of its duration: uploads and the commit.
    pub async_ms: Option<u64>,
    /// Bytes it uploaded (completed ones).
    pub bytes_uploaded: u64,
    /// Bytes of files it reused from earlier checkpoints (completed ones).
    pub bytes_reused: u64,
}

/// A checkpoint in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// Its id.
    pub id: u64,
    /// `true` for a savepoint.
    pub savepoint: bool,
    /// When it was triggered (ms since the Unix epoch).
    pub triggered_ms: u64,
    /// Age when the document was written.
    pub age_ms: u64,
    /// Subtask acknowledgements received.
    pub acknowledged: u32,
    /// Subtask acknowledgements needed.
    pub expected: u32,
}

/// The status document of a job directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// [`STATUS_SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// The job's id.
    pub job_id: String,
    /// The writer epoch of the coordinator that writes it.
    pub writer_epoch: u64,
    /// Who writes it (host and process id).
    pub writer: String,
    /// What the job is doing.
    pub state: RunState,
    /// When the coordinator started (ms since the Unix epoch).
    pub started_ms: u64,
    /// When the document was written (ms since the Unix epoch).
    pub updated_ms: u64,
    /// The longest time between two writes while running.
    pub heartbeat_ms: u64,
    /// The newest completed checkpoint: its id, and its record when this run took it.
    pub last_completed_id: Option<u64>,
    /// Checkpoints and savepoints in flight, oldest first.
    pub in_flight: Vec<InFlight>,
    /// The last finished checkpoints and savepoints of this run, newest first
    /// (at most [`RECENT_CHECKPOINTS`]).
    pub recent: Vec<CheckpointRecord>,
    /// Checkpoints completed by this run.
    pub completed: u64,
    /// Checkpoints failed by this run.
    pub failed: u64,
    /// Checkpoints aborted by this run.
    pub aborted: u64,
    /// Bytes uploaded by this run's completed checkpoints.
    pub bytes_uploaded: u64,
}

impl JobStatus {
    /// Encodes as the JSON document stored.
    pub fn encode(&self) -> Result<Bytes> {
        serde_json::to_vec_pretty(self)
            .map(Bytes::from)
            .map_err(|e| Error::Internal(format!("encode the job status: {e}")))
    }

    /// Decodes a stored document.
    ///
    /// Errors: `Corrupt` for anything that is not a status document; `UnsupportedVersion`
    /// for a newer schema.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Version {
            schema_version: u32,
        }
        let version: Version =
            serde_json::from_slice(bytes).map_err(|e| Error::corrupt(what, e))?;
        if version.schema_version != STATUS_SCHEMA_VERSION {
            return Err(Error::UnsupportedVersion {
                what: what.to_string(),
                found: version.schema_version,
                supported: STATUS_SCHEMA_VERSION,
            });
        }
        serde_json::from_slice(bytes).map_err(|e| Error::corrupt(what, e))
    }

    /// The newest completed checkpoint's record, when this run took it.
    pub fn last_completed(&self) -> Option<&CheckpointRecord> {
        self.recent
            .iter()
            .find(|r| r.outcome == Outcome::Completed && !r.savepoint)
    }
}

/// A status document as read, with what the reader concluded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusView {
    /// The document.
    pub status: JobStatus,
    /// Set when the document no longer describes a live writer: why.
    pub stale: Option<String>,
    /// The job directory's current writer epoch.
    pub current_epoch: u64,
}

/// Reads the status of the job directory `job`: `None` when no coordinator wrote one.
/// `now_ms` is the reader's clock (ms since the Unix epoch).
///
/// Errors: `Corrupt`/`UnsupportedVersion` for a damaged or newer document; storage errors.
pub async fn read_status(job: &CheckpointStorage, now_ms: u64) -> Result<Option<StatusView>> {
    let bytes = match job.read_small(STATUS_FILE, MAX_STATUS_LEN).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let status = JobStatus::decode(&bytes, &job.url_of(STATUS_FILE))?;
    let current_epoch = Epochs::list(job).await?.current();
    let stale = if current_epoch > status.writer_epoch {
        Some(format!(
            "writer epoch {} was replaced by epoch {current_epoch} (another process owns the job directory now)",
            status.writer_epoch
        ))
    } else if status.state == RunState::Running
        && now_ms
            > status
                .updated_ms
                .saturating_add(status.heartbeat_ms.saturating_mul(3))
    {
        Some(format!(
            "not refreshed for {} s (heartbeat {} s): its process is gone or hangs",
            (now_ms - status.updated_ms) / 1000,
            status.heartbeat_ms / 1000
        ))
    } else {
        None
    };
    Ok(Some(StatusView {
        status,
        stale,
        current_epoch,
    }))
}

/// What a coordinator remembers for its status document.
#[derive(Debug)]
pub(crate) struct StatusTracker {
    pub(crate) heartbeat: Duration,
    started_ms: u64,
    recent: VecDeque<CheckpointRecord>,
    completed: u64,
    failed: u64,
    aborted: u64,
    bytes_uploaded: u64,
    /// Longest sync pause noted per checkpoint in flight, in ms.
    sync: BTreeMap<u64, u64>,
    dirty: bool,
    published: Option<(u64, RunState)>,
}

impl StatusTracker {
    pub(crate) fn new(started_ms: u64) -> Self {
        Self {
            heartbeat: DEFAULT_HEARTBEAT,
            started_ms,
            recent: VecDeque::new(),
            completed: 0,
            failed: 0,
            aborted: 0,
            bytes_uploaded: 0,
            sync: BTreeMap::new(),
            dirty: true,
            published: None,
        }
    }

    pub(crate) fn changed(&mut self) {
        self.dirty = true;
    }

    pub(crate) fn note_sync(&mut self, id: u64, pause: Duration) {
        let ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
        let entry = self.sync.entry(id).or_insert(0);
        *entry = (*entry).max(ms);
        while self.sync.len() > MAX_NOTED {
            self.sync.pop_first();
        }
    }

    fn push(&mut self, record: CheckpointRecord) {
        self.recent.push_front(record);
        self.recent.truncate(RECENT_CHECKPOINTS);
        self.dirty = true;
    }

    fn durations(
        &mut self,
        id: u64,
        triggered_ms: u64,
        now_ms: u64,
    ) -> (u64, Option<u64>, Option<u64>) {
        let duration = now_ms.saturating_sub(triggered_ms);
        let sync = self.sync.remove(&id);
        (duration, sync, sync.map(|s| duration.saturating_sub(s)))
    }

    pub(crate) fn completed(&mut self, meta: &CheckpointMetadata, now_ms: u64) {
        let (duration_ms, sync_ms, async_ms) =
            self.durations(meta.checkpoint_id, meta.triggered_at_ms, now_ms);
        let uploaded = meta.uploaded_bytes();
        let savepoint = meta.is_savepoint();
        if !savepoint {
            self.completed += 1;
            self.bytes_uploaded = self.bytes_uploaded.saturating_add(uploaded);
        }
        self.push(CheckpointRecord {
            id: meta.checkpoint_id,
            savepoint,
            outcome: Outcome::Completed,
            reason: None,
            triggered_ms: meta.triggered_at_ms,
            ended_ms: now_ms,
            duration_ms,
            sync_ms,
            async_ms,
            bytes_uploaded: uploaded,
            bytes_reused: meta.total_size().saturating_sub(uploaded),
        });
    }

    pub(crate) fn ended(
        &mut self,
        id: u64,
        savepoint: bool,
        outcome: Outcome,
        reason: &str,
        triggered_ms: u64,
        now_ms: u64,
    ) {
        let (duration_ms, sync_ms, async_ms) = self.durations(id, triggered_ms, now_ms);
        match outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Aborted => self.aborted += 1,
        }
        self.push(CheckpointRecord {
            id,
            savepoint,
            outcome,
            reason: Some(reason.to_string()),
            triggered_ms,
            ended_ms: now_ms,
            duration_ms,
            sync_ms,
            async_ms,
            bytes_uploaded: 0,
            bytes_reused: 0,
        });
    }

    /// Whether a document is due: the state changed, something changed and the last
    /// write is a second old, or a heartbeat passed.
    pub(crate) fn due(&self, state: RunState, now_ms: u64) -> bool {
        match self.published {
            None => true,
            Some((at, published)) => {
                let heartbeat = u64::try_from(self.heartbeat.as_millis()).unwrap_or(u64::MAX);
                published != state
                    || (self.dirty && now_ms >= at.saturating_add(MIN_CHANGE_INTERVAL_MS))
                    || now_ms >= at.saturating_add(heartbeat)
            }
        }
    }

    pub(crate) fn published(&mut self, state: RunState, now_ms: u64) {
        self.dirty = false;
        self.published = Some((now_ms, state));
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn document(
        &self,
        job_id: &str,
        writer_epoch: u64,
        writer: &str,
        state: RunState,
        now_ms: u64,
        last_completed_id: Option<u64>,
        in_flight: Vec<InFlight>,
    ) -> JobStatus {
        JobStatus {
            schema_version: STATUS_SCHEMA_VERSION,
            job_id: job_id.to_string(),
            writer_epoch,
            writer: writer.to_string(),
            state,
            started_ms: self.started_ms,
            updated_ms: now_ms,
            heartbeat_ms: u64::try_from(self.heartbeat.as_millis()).unwrap_or(u64::MAX),
            last_completed_id,
            in_flight,
            recent: self.recent.iter().cloned().collect(),
            completed: self.completed,
            failed: self.failed,
            aborted: self.aborted,
            bytes_uploaded: self.bytes_uploaded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JobStatus {
        let mut tracker = StatusTracker::new(1_000);
        tracker.note_sync(3, Duration::from_millis(7));
        tracker.ended(3, false, Outcome::Failed, "worker 1 declined", 1_000, 1_500);
        tracker.document(
            "job",
            2,
            "host:1",
            RunState::Running,
            2_000,
            None,
            Vec::new(),
        )
    }

    #[test]
    fn documents_round_trip_and_newer_schemas_are_refused() {
        let status = sample();
        assert_eq!(status.failed, 1);
        let record = &status.recent[0];
        assert_eq!(
            (record.duration_ms, record.sync_ms, record.async_ms),
            (500, Some(7), Some(493))
        );
        let bytes = status.encode().unwrap();
        assert_eq!(JobStatus::decode(&bytes, "s").unwrap(), status);
        let newer = String::from_utf8(bytes.to_vec())
            .unwrap()
            .replace("\"schema_version\": 1", "\"schema_version\": 2");
        let e = JobStatus::decode(newer.as_bytes(), "s").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Incompatible, "{e}");
        for bad in [&b"{}"[..], b"not json", b"{\"schema_version\":1}"] {
            assert_eq!(
                JobStatus::decode(bad, "s").unwrap_err().kind(),
                ErrorKind::Corrupt
            );
        }
    }

    #[test]
    fn a_document_is_due_on_change_state_or_heartbeat() {
        let mut tracker = StatusTracker::new(0);
        assert!(tracker.due(RunState::Running, 0));
        tracker.published(RunState::Running, 0);
        assert!(!tracker.due(RunState::Running, 9_999));
        assert!(tracker.due(RunState::Running, 10_000));
        assert!(tracker.due(RunState::Stopped, 1));
        tracker.changed();
        assert!(!tracker.due(RunState::Running, 999));
        assert!(tracker.due(RunState::Running, 1_000));
    }
}
