//! `rockstate savepoint trigger` and `rockstate stop`: requests to a running job through
//! its checkpoint storage.

use std::time::Duration;

use rockstate::checkpoint::status::{read_status, RunState};
use rockstate::runtime::control::{self, Answer, Command, Outcome};
use rockstate::CheckpointStorage;

use crate::common::exit;

/// How often the answer is looked for.
const POLL: Duration = Duration::from_millis(200);

/// Sends `command` to the job of `job_url`, waits up to `wait` for its answer and prints
/// it. Exit codes: 0 answered, 2 the job failed to carry it out, 4 no answer in time.
pub async fn request(job_url: &str, command: Command, wait: Duration) -> rockstate::Result<u8> {
    let job = CheckpointStorage::open(job_url)?;
    if job.list("_epochs").await?.is_empty() {
        crate::snapshots::refuse_parent(&job).await?;
        return Err(rockstate::Error::NotFound(format!(
            "no job has run in {} (give the job directory, <checkpoint dir>/<job id>)",
            job.url()
        )));
    }
    let now = rockstate::clock::Clock::now_millis(&rockstate::clock::SystemClock);
    if let Some(view) = read_status(&job, now).await? {
        if view.stale.is_none() && view.status.state != RunState::Running {
            eprintln!(
                "rockstate: job {} is not running (it stopped at {})",
                job.url(),
                crate::format::utc_millis(view.status.updated_ms)
            );
            return Ok(exit::NO_ANSWER);
        }
    }
    let id = control::submit(&job, command, wait).await?;
    match control::wait_for_answer(&job, &id, wait, POLL).await? {
        Outcome::Answered(Answer::Savepoint { url }) => {
            println!("{url}");
            Ok(exit::OK)
        }
        Outcome::Answered(Answer::Stopped { savepoint }) => {
            match savepoint {
                Some(url) => println!("{url}"),
                None => eprintln!("rockstate: the job stopped"),
            }
            Ok(exit::OK)
        }
        Outcome::Answered(Answer::Failed { kind, message }) => {
            eprintln!(
                "rockstate: the job could not do it ({kind}): {}",
                crate::common::one_line(&message)
            );
            Ok(exit::ERROR)
        }
        Outcome::Withdrawn => {
            eprintln!(
                "rockstate: no job answered within {wait:?} (is one running on {}?); the request was withdrawn",
                job.url()
            );
            Ok(exit::NO_ANSWER)
        }
        Outcome::Unanswered => {
            eprintln!(
                "rockstate: the job took the request but did not answer within {wait:?}; it may still complete it"
            );
            Ok(exit::NO_ANSWER)
        }
    }
}
