//! `rockstate status`: the status document a running job's coordinator keeps in its job
//! directory, and whether it still describes a live writer.

use std::time::Duration;

use rockstate::checkpoint::status::{read_status, CheckpointRecord, Outcome, RunState, StatusView};
use rockstate::clock::{Clock, SystemClock};
use serde_json::json;

use crate::common::exit;
use crate::format::{bytes, utc_millis};
use crate::snapshots::{open_job, print_json, refuse_parent};

/// Shows the status of the job in `job_url`, once or every `watch`.
pub async fn status(job_url: &str, json: bool, watch: Option<Duration>) -> rockstate::Result<u8> {
    let job = open_job(job_url)?;
    loop {
        let now = SystemClock.now_millis();
        let view = read_status(&job, now).await?;
        let code = match &view {
            None => {
                refuse_parent(&job).await?;
                if json {
                    print_json(&json!({ "job": job.url(), "status": null, "stale": null }));
                } else {
                    eprintln!(
                        "rockstate: no status in {}: no job has run there with this version",
                        job.url()
                    );
                }
                exit::NONE
            }
            Some(view) => {
                if json {
                    print_json(&json!({
                        "job": job.url(),
                        "stale": view.stale.is_some(),
                        "stale_reason": view.stale,
                        "current_epoch": view.current_epoch,
                        "status": view.status,
                    }));
                } else {
                    print!("{}", render(job.url(), view, now));
                }
                if view.stale.is_some() {
                    exit::STALE
                } else {
                    exit::OK
                }
            }
        };
        let Some(every) = watch else {
            return Ok(code);
        };
        tokio::time::sleep(every).await;
        if !json {
            println!();
        }
    }
}

fn seconds(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

fn record_line(r: &CheckpointRecord) -> String {
    let what = if r.savepoint { "savepoint" } else { "chk" };
    let outcome = match r.outcome {
        Outcome::Completed => "completed",
        Outcome::Failed => "failed",
        Outcome::Aborted => "aborted",
    };
    let mut line = format!(
        "  {what}-{:<6} {outcome:<9} {}  took {}",
        r.id,
        utc_millis(r.ended_ms),
        seconds(r.duration_ms)
    );
    if let (Some(sync), Some(rest)) = (r.sync_ms, r.async_ms) {
        line.push_str(&format!(
            " (sync {}, async {})",
            seconds(sync),
            seconds(rest)
        ));
    }
    if r.outcome == Outcome::Completed {
        line.push_str(&format!(
            ", uploaded {}, reused {}",
            bytes(r.bytes_uploaded),
            bytes(r.bytes_reused)
        ));
    }
    if let Some(reason) = &r.reason {
        line.push_str(&format!(": {}", crate::common::one_line(reason)));
    }
    line
}

/// The text form of a status.
fn render(url: &str, view: &StatusView, now: u64) -> String {
    let s = &view.status;
    let state = match (&view.stale, s.state) {
        (Some(_), _) => "STALE",
        (None, RunState::Running) => "running",
        (None, RunState::Stopped) => "stopped",
        (None, RunState::Failed) => "failed",
    };
    let mut out = format!(
        "job {} ({url}): {state}\n  writer epoch {} ({}), started {}, updated {} ({} ago)\n",
        s.job_id,
        s.writer_epoch,
        s.writer,
        utc_millis(s.started_ms),
        utc_millis(s.updated_ms),
        seconds(now.saturating_sub(s.updated_ms)),
    );
    if let Some(reason) = &view.stale {
        out.push_str(&format!("  stale: {reason}\n"));
    }
    match (s.last_completed_id, s.last_completed()) {
        (Some(id), Some(r)) if r.id == id => {
            out.push_str(&format!("last completed:\n{}\n", record_line(r)))
        }
        (Some(id), _) => out.push_str(&format!("last completed: chk-{id} (before this run)\n")),
        (None, _) => out.push_str("last completed: none\n"),
    }
    if s.in_flight.is_empty() {
        out.push_str("in flight: none\n");
    } else {
        out.push_str("in flight:\n");
        for f in &s.in_flight {
            out.push_str(&format!(
                "  {}-{:<6} age {}, {}/{} acknowledged\n",
                if f.savepoint { "savepoint" } else { "chk" },
                f.id,
                seconds(f.age_ms.saturating_add(now.saturating_sub(s.updated_ms))),
                f.acknowledged,
                f.expected
            ));
        }
    }
    if !s.recent.is_empty() {
        out.push_str("recent (newest first):\n");
        for r in &s.recent {
            out.push_str(&record_line(r));
            out.push('\n');
        }
    }
    out.push_str(&format!(
        "this run: {} completed, {} failed, {} aborted, {} uploaded\n",
        s.completed,
        s.failed,
        s.aborted,
        bytes(s.bytes_uploaded)
    ));
    out
}
