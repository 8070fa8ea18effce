//! Control requests through the job's storage: another process (the `rockstate` CLI, an
//! operator's script) asks a running job to take a savepoint or to stop, and the job
//! answers, with no RPC server, across processes and machines, on any store.
//!
//! Per request `<id>`, in the job directory's `_control/` folder:
//!
//! - `<id>.request`: written by the client ([`submit`]) with create-if-absent.
//! - `<id>.claim`: the one decision, written with create-if-absent by whoever comes
//!   first. The job writes `accepted` ([`accept`]) before it acts; a client that gives up
//!   writes `withdrawn`. So a withdrawn request is never acted on, and a client that finds
//!   its request accepted knows the job is carrying it out and keeps waiting for the answer.
//! - `<id>.answer`: the job's answer ([`answer`]), written once.
//!
//! The job lists unclaimed requests ([`pending`]) at its own pace (for example twice a
//! second). [`accept`] and [`answer`] first check that the job's coordinator still owns
//! the job directory, so a fenced (older) writer neither takes nor answers a request; a
//! writer fenced between that check and the write can still act on one request, the same
//! window every commit of an older writer has. A request carries its deadline: one found
//! after it (its client is gone) is withdrawn by the job instead of carried out. The
//! client removes the three files once it has its answer; withdrawn claims are removed by
//! the job an hour later.
//!
//! Requests and answers are small JSON documents, readable with any tool.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::checkpoint::CheckpointCoordinator;
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, ErrorKind, Result};
use crate::format::SavepointFormat;
use crate::storage::CheckpointStorage;

/// The folder of a job directory that holds control requests and answers.
pub const CONTROL_DIR: &str = "_control";
/// Requests and answers are small: a generous bound on what is read back.
const MAX_DOCUMENT: u64 = 64 << 10;

/// What a client asks of a running job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Take a savepoint and keep running. `dir` is the parent directory of the savepoint
    /// folder (the job's configured savepoint directory when `None`).
    Savepoint {
        /// Parent directory URL of the new savepoint folder.
        dir: Option<String>,
        /// Canonical or native.
        format: SavepointFormat,
    },
    /// Stop, after a final savepoint when `savepoint_dir` is given. Checkpoints in flight
    /// are aborted; a later resume starts from the latest completed checkpoint.
    Stop {
        /// Parent directory URL of the final savepoint, if one is wanted.
        savepoint_dir: Option<String>,
        /// Canonical or native.
        format: SavepointFormat,
    },
}

/// A request as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Its id (unique; part of the file names).
    pub id: String,
    /// What is asked.
    #[serde(flatten)]
    pub command: Command,
    /// When it was written, in ms since the Unix epoch.
    pub created_ms: u64,
    /// After this time (ms since the Unix epoch) its client no longer waits: the job
    /// withdraws it instead of carrying it out.
    pub expires_ms: u64,
}

/// A job's answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Answer {
    /// The savepoint was taken.
    Savepoint {
        /// The savepoint folder's URL.
        url: String,
    },
    /// The job stopped.
    Stopped {
        /// The final savepoint's URL, when one was asked for.
        savepoint: Option<String>,
    },
    /// The request could not be carried out.
    Failed {
        /// The error's kind, as `ErrorKind`'s `Debug` name.
        kind: String,
        /// What went wrong, on one line.
        message: String,
    },
}

impl Answer {
    /// The answer for an error.
    pub fn failed(error: &Error) -> Self {
        Answer::Failed {
            kind: format!("{:?}", error.kind()),
            message: error.report().to_string(),
        }
    }
}

fn request_path(id: &str) -> String {
    format!("{CONTROL_DIR}/{id}.request")
}

fn claim_path(id: &str) -> String {
    format!("{CONTROL_DIR}/{id}.claim")
}

fn answer_path(id: &str) -> String {
    format!("{CONTROL_DIR}/{id}.answer")
}

const ACCEPTED: &[u8] = b"accepted";
const WITHDRAWN: &[u8] = b"withdrawn";
/// Requests read per call of [`pending`]: a flood of requests cannot make one poll read
/// without bound (the rest wait for the next poll).
const MAX_PER_POLL: usize = 64;
/// Withdrawn claims are kept this long, so that a job that listed their request just
/// before the withdrawal still finds the claim; uncollected answers too, for a slow
/// client.
const KEEP_WITHDRAWN_MS: i64 = 3_600_000;

fn encode<T: Serialize>(value: &T) -> Result<Bytes> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| Error::Internal(format!("encode a control document: {e}")))
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::corrupt(what, e))
}

/// Reads the small file at `path`: `None` when it does not exist.
async fn read_if_exists(job: &CheckpointStorage, path: &str) -> Result<Option<Bytes>> {
    match job.read_small(path, MAX_DOCUMENT).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the claim of request `id`: `Ok(true)` when this write decided it, `Ok(false)`
/// when the other side's claim was there first.
async fn claim(job: &CheckpointStorage, id: &str, what: &'static [u8]) -> Result<bool> {
    match job
        .put_if_absent(&claim_path(id), Bytes::from_static(what))
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            // The put's own retry may have stored ours: read who won.
            let stored = read_if_exists(job, &claim_path(id)).await?;
            Ok(stored.as_deref() == Some(what))
        }
        Err(e) => Err(e),
    }
}

/// Writes a new request for the job whose directory is `job`, which its client waits
/// for up to `wait`; returns its id.
///
/// Errors: storage errors.
pub async fn submit(job: &CheckpointStorage, command: Command, wait: Duration) -> Result<String> {
    let created_ms = SystemClock.now_millis();
    let id = format!("{created_ms:013}-{:016x}", rand::random::<u64>());
    let request = Request {
        id: id.clone(),
        command,
        created_ms,
        expires_ms: created_ms.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
    };
    job.put_if_absent(&request_path(&id), encode(&request)?)
        .await?;
    Ok(id)
}

/// What became of a request its client waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The job answered.
    Answered(Answer),
    /// No job took the request within the wait; it is withdrawn and never carried out.
    Withdrawn,
    /// A job took the request but did not answer within the wait (it may still finish).
    Unanswered,
}

/// Waits up to `wait` for the answer to request `id`, polling every `poll`. When the
/// wait ends with the request still unclaimed, withdraws it. Removes the request's files
/// once it has an answer (best effort: the answer is returned even if that fails).
///
/// Errors: `Corrupt` for an unreadable answer; storage errors (the request stays; the job
/// withdraws it after its deadline).
pub async fn wait_for_answer(
    job: &CheckpointStorage,
    id: &str,
    wait: Duration,
    poll: Duration,
) -> Result<Outcome> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(bytes) = read_if_exists(job, &answer_path(id)).await? {
            let answer = decode(&bytes, &job.url_of(&answer_path(id)))?;
            if let Err(e) = remove(job, id).await {
                tracing::debug!(request = id, error = %e.report(), "cannot remove an answered request");
            }
            return Ok(Outcome::Answered(answer));
        }
        if tokio::time::Instant::now() >= deadline {
            if claim(job, id, WITHDRAWN).await? {
                if let Err(e) = job.delete(&request_path(id)).await {
                    tracing::debug!(request = id, error = %e.report(), "cannot remove a withdrawn request");
                }
                return Ok(Outcome::Withdrawn);
            }
            // Accepted by a job: its answer may have landed meanwhile.
            return match read_if_exists(job, &answer_path(id)).await? {
                Some(bytes) => {
                    let answer = decode(&bytes, &job.url_of(&answer_path(id)))?;
                    if let Err(e) = remove(job, id).await {
                        tracing::debug!(request = id, error = %e.report(), "cannot remove an answered request");
                    }
                    Ok(Outcome::Answered(answer))
                }
                None => Ok(Outcome::Unanswered),
            };
        }
        tokio::time::sleep(poll).await;
    }
}

async fn remove(job: &CheckpointStorage, id: &str) -> Result<()> {
    remove_request_files(
        job,
        &request_path(id),
        vec![claim_path(id), answer_path(id)],
    )
    .await
}

/// Removes a request, and only once it is gone its claim and answer: a request left
/// without its claim would be taken, and carried out, again. (A claim left without its
/// request is removed by [`pending`] after an hour.)
async fn remove_request_files(
    job: &CheckpointStorage,
    request: &str,
    after: Vec<String>,
) -> Result<()> {
    job.delete(request).await?;
    job.delete_many(after).await
}

/// The requests of `job` that nobody claimed yet (at most 64, the oldest listed first).
/// Unreadable requests are skipped (their clients time out); withdrawn claims, and the
/// files of answered requests whose client never collected the answer, are removed after
/// an hour.
///
/// Errors: storage errors.
pub async fn pending(job: &CheckpointStorage) -> Result<Vec<Request>> {
    let listed = job.list(CONTROL_DIR).await?;
    let names: std::collections::BTreeSet<&str> = listed.iter().map(|o| o.path.as_str()).collect();
    let now = i64::try_from(SystemClock.now_millis()).unwrap_or(i64::MAX);
    let mut requests = Vec::new();
    for object in &listed {
        // An answer its client never collected (the client died after the job took the
        // request): the request's files go after an hour.
        if let Some(stem) = object.path.strip_suffix(".answer") {
            if now.saturating_sub(object.last_modified_ms) > KEEP_WITHDRAWN_MS {
                let removed = remove_request_files(
                    job,
                    &format!("{stem}.request"),
                    vec![format!("{stem}.claim"), object.path.clone()],
                )
                .await;
                if let Err(e) = removed {
                    tracing::debug!(path = %object.path, error = %e.report(), "cannot remove an old answer");
                }
            }
            continue;
        }
        if let Some(stem) = object.path.strip_suffix(".claim") {
            let orphan = !names.contains(format!("{stem}.request").as_str());
            if orphan && now.saturating_sub(object.last_modified_ms) > KEEP_WITHDRAWN_MS {
                if let Err(e) = job.delete(&object.path).await {
                    tracing::debug!(path = %object.path, error = %e.report(), "cannot remove an old claim");
                }
            }
            continue;
        }
        let Some(stem) = object.path.strip_suffix(".request") else {
            continue;
        };
        if names.contains(format!("{stem}.claim").as_str()) {
            continue;
        }
        if requests.len() >= MAX_PER_POLL {
            break;
        }
        let Some(id) = stem.strip_prefix(&format!("{CONTROL_DIR}/")) else {
            continue;
        };
        let Some(bytes) = read_if_exists(job, &object.path).await? else {
            continue; // removed meanwhile
        };
        match decode::<Request>(&bytes, &job.url_of(&object.path)) {
            Ok(request) if request.id == id => requests.push(request),
            Ok(_) => {
                tracing::warn!(path = %object.path, "a control request under another id; ignored")
            }
            Err(e) => tracing::warn!(error = %e.report(), "an unreadable control request; ignored"),
        }
    }
    requests.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(requests)
}

/// Takes request `request` for the job `coordinator` coordinates, before acting on it:
/// `Ok(true)` when the job now owns it; `Ok(false)` when its client withdrew it first,
/// or it is past its deadline (then it is withdrawn here).
///
/// Errors: `Fenced` when a newer writer owns the job; storage errors.
pub async fn accept(coordinator: &mut CheckpointCoordinator, request: &Request) -> Result<bool> {
    coordinator.check_writer().await?;
    let job = coordinator.job_storage().clone();
    if SystemClock.now_millis() > request.expires_ms {
        claim(&job, &request.id, WITHDRAWN).await?;
        return Ok(false);
    }
    claim(&job, &request.id, ACCEPTED).await
}

/// Answers request `id`, which this job accepted, once (a second answer changes nothing).
/// It first checks that the coordinator still owns the job directory.
///
/// Errors: `Fenced` when a newer writer owns the job; storage errors.
pub async fn answer(
    coordinator: &mut CheckpointCoordinator,
    id: &str,
    answer: &Answer,
) -> Result<()> {
    coordinator.check_writer().await?;
    let job = coordinator.job_storage().clone();
    match job.put_if_absent(&answer_path(id), encode(answer)?).await {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// A stop the job's coordinator accepted, announced to every worker of a run through
/// `_control/stop/<run>/notice`, for runtimes whose workers live in several processes.
///
/// The workers of a run then agree on the last epoch (checkpoint) they process: each
/// proposes the last epoch it has fully sent ([`propose_final`]), and the job stops after
/// the highest proposal ([`agreed_final`]), so that every worker takes its final snapshot
/// at the same epoch. A worker whose input ends on its own proposes its final epoch as it
/// finishes, so that no proposal is ever missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopNotice {
    /// The request that asked for the stop.
    pub request: String,
}

/// The worker whose file `path` is (`.../worker-<n>`), if it is one.
pub(crate) fn worker_of(path: &str) -> Option<u32> {
    path.rsplit('/')
        .next()
        .and_then(|n| n.strip_prefix("worker-"))
        .and_then(|n| n.parse().ok())
}

fn stop_dir(run: u64) -> String {
    format!("{CONTROL_DIR}/stop/{run:016x}")
}

/// Announces a stop to the workers of run `run`. Announcing twice is harmless.
///
/// Errors: `Fenced` when a newer writer owns the job; storage errors.
pub async fn announce_stop(
    coordinator: &mut CheckpointCoordinator,
    run: u64,
    notice: &StopNotice,
) -> Result<()> {
    coordinator.check_writer().await?;
    let job = coordinator.job_storage().clone();
    match job
        .put_if_absent(&format!("{}/notice", stop_dir(run)), encode(notice)?)
        .await
    {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// The stop announced to run `run`, if any.
///
/// Errors: `Corrupt` for an unreadable notice; storage errors.
pub async fn stop_notice(job: &CheckpointStorage, run: u64) -> Result<Option<StopNotice>> {
    let path = format!("{}/notice", stop_dir(run));
    match read_if_exists(job, &path).await? {
        Some(bytes) => decode(&bytes, &job.url_of(&path)).map(Some),
        None => Ok(None),
    }
}

/// Worker `worker` of run `run` proposes `epoch` as the last epoch of the job (the last
/// one it has fully sent, or its final one). A second proposal of the same worker is
/// ignored: the first counts.
///
/// Errors: storage errors.
pub async fn propose_final(
    job: &CheckpointStorage,
    run: u64,
    worker: u32,
    epoch: u64,
) -> Result<()> {
    let path = format!("{}/worker-{worker}", stop_dir(run));
    match job
        .put_if_absent(&path, Bytes::from(epoch.to_string()))
        .await
    {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// The agreed last epoch of run `run`: the highest proposal once all `workers` proposed,
/// `None` before. The first reader that finds every proposal records the agreement
/// (`agreed`, create-if-absent), so later readers read one object.
///
/// Errors: `Corrupt` for a damaged proposal; storage errors.
pub async fn agreed_final(job: &CheckpointStorage, run: u64, workers: u32) -> Result<Option<u64>> {
    let dir = stop_dir(run);
    let agreed_path = format!("{dir}/agreed");
    if let Some(bytes) = read_if_exists(job, &agreed_path).await? {
        return parse_epoch(job, &agreed_path, &bytes).map(Some);
    }
    let listed = job.list(&dir).await?;
    let mut highest = None;
    let mut seen = std::collections::BTreeSet::new();
    for object in listed {
        let Some(worker) = worker_of(&object.path).filter(|w| *w < workers) else {
            continue;
        };
        let bytes = job.read_small(&object.path, 32).await?;
        let epoch = parse_epoch(job, &object.path, &bytes)?;
        seen.insert(worker);
        highest = highest.max(Some(epoch));
    }
    let Some(agreed) = highest.filter(|_| seen.len() == workers as usize) else {
        return Ok(None);
    };
    match job
        .put_if_absent(&agreed_path, Bytes::from(agreed.to_string()))
        .await
    {
        // Another reader recorded it first: the same highest proposal.
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(e),
        _ => Ok(Some(agreed)),
    }
}

fn parse_epoch(job: &CheckpointStorage, path: &str, bytes: &[u8]) -> Result<u64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| Error::corrupt(job.url_of(path), "not an epoch number"))
}

/// Removes the stop announcement and proposals of run `run` (best effort).
pub async fn clear_stops(job: &CheckpointStorage, run: u64) {
    remove_stop_files(job, |path| path.starts_with(&format!("{}/", stop_dir(run)))).await;
}

/// Removes the stop announcements and proposals of every run but `run` (best effort):
/// what earlier runs left.
pub async fn clear_other_stops(job: &CheckpointStorage, run: u64) {
    remove_stop_files(job, |path| {
        !path.starts_with(&format!("{}/", stop_dir(run)))
    })
    .await;
}

async fn remove_stop_files(job: &CheckpointStorage, keep_out: impl Fn(&str) -> bool) {
    let cleared = async {
        let paths: Vec<String> = job
            .list(&format!("{CONTROL_DIR}/stop"))
            .await?
            .into_iter()
            .map(|o| o.path)
            .filter(|p| keep_out(p))
            .collect();
        job.delete_many(paths).await
    };
    if let Err(e) = cleared.await {
        tracing::debug!(error = %e.report(), "cannot remove stop announcements");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_plain_json() {
        let request = Request {
            id: "1-a".into(),
            command: Command::Savepoint {
                dir: Some("file:///sp".into()),
                format: SavepointFormat::Canonical,
            },
            created_ms: 1,
            expires_ms: 2,
        };
        let text = String::from_utf8(encode(&request).unwrap().to_vec()).unwrap();
        assert!(text.contains("\"command\":\"savepoint\""), "{text}");
        assert_eq!(decode::<Request>(text.as_bytes(), "r").unwrap(), request);
        let failed = Answer::failed(&Error::invalid("no directory"));
        let text = String::from_utf8(encode(&failed).unwrap().to_vec()).unwrap();
        assert!(
            text.contains("\"outcome\":\"failed\"") && text.contains("InvalidArgument"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn workers_agree_on_the_highest_last_epoch_once_all_proposed() {
        let job = CheckpointStorage::open("memory://stop-agreement").unwrap();
        let (run, other) = (7, 8);
        assert_eq!(stop_notice(&job, run).await.unwrap(), None);
        propose_final(&job, run, 0, 12).await.unwrap();
        propose_final(&job, run, 2, 15).await.unwrap();
        assert_eq!(agreed_final(&job, run, 3).await.unwrap(), None);
        // A second proposal of one worker does not count.
        propose_final(&job, run, 0, 99).await.unwrap();
        propose_final(&job, run, 1, 14).await.unwrap();
        assert_eq!(agreed_final(&job, run, 3).await.unwrap(), Some(15));
        // Recorded: it stays the answer even if proposals go.
        for w in 0..3 {
            job.delete(&format!("{}/worker-{w}", stop_dir(run)))
                .await
                .unwrap();
        }
        assert_eq!(agreed_final(&job, run, 3).await.unwrap(), Some(15));
        // Proposals of workers beyond the count are ignored; damage is reported.
        propose_final(&job, other, 5, 1).await.unwrap();
        assert_eq!(agreed_final(&job, other, 1).await.unwrap(), None);
        job.put(
            &format!("{}/worker-0", stop_dir(other)),
            Bytes::from_static(b"x"),
        )
        .await
        .unwrap();
        let e = agreed_final(&job, other, 1).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        // Each run clears its own files, or those of the others.
        clear_other_stops(&job, run).await;
        assert!(job.list(&stop_dir(other)).await.unwrap().is_empty());
        assert!(!job.list(&stop_dir(run)).await.unwrap().is_empty());
        clear_stops(&job, run).await;
        assert!(job
            .list(&format!("{CONTROL_DIR}/stop"))
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn answers_nobody_collected_are_removed_after_an_hour() {
        let tmp = tempfile::tempdir().unwrap();
        let job = CheckpointStorage::open(tmp.path().to_str().unwrap()).unwrap();
        let wait = Duration::from_secs(60);
        let command = || Command::Savepoint {
            dir: None,
            format: SavepointFormat::Canonical,
        };
        let old = submit(&job, command(), wait).await.unwrap();
        let fresh = submit(&job, command(), wait).await.unwrap();
        for id in [&old, &fresh] {
            assert!(claim(&job, id, ACCEPTED).await.unwrap());
            let answer = Answer::Savepoint {
                url: "file:///sp".into(),
            };
            job.put_if_absent(&answer_path(id), encode(&answer).unwrap())
                .await
                .unwrap();
        }
        // The client of `old` died two hours ago.
        let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7_200);
        let file = std::fs::File::options()
            .write(true)
            .open(tmp.path().join(answer_path(&old)))
            .unwrap();
        file.set_modified(two_hours_ago).unwrap();
        assert!(pending(&job).await.unwrap().is_empty());
        let left: Vec<String> = job
            .list(CONTROL_DIR)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.path)
            .collect();
        assert!(left.iter().all(|p| p.contains(&fresh)), "{left:?}");
        assert_eq!(left.len(), 3, "{left:?}");
    }
}
