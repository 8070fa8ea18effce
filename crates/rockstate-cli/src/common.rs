//! What every command shares: exit codes, one-line messages, the async runtime.

/// Exit codes, documented in `--help`.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Nothing to show: `latest` of a job without a completed checkpoint, `status` of a
    /// job that never ran.
    pub const NONE: u8 = 1;
    /// Bad input or a failure, explained by one line on stderr.
    pub const ERROR: u8 = 2;
    /// `verify` found missing or damaged files.
    pub const BAD_FILES: u8 = 3;
    /// `savepoint trigger` or `stop`: no job answered within `--wait`.
    pub const NO_ANSWER: u8 = 4;
    /// `status`: the status is stale (its writer is gone or was replaced).
    pub const STALE: u8 = 5;
    /// Storage failed in a way that may pass (unreachable, throttled, timed out): retry.
    pub const TRANSIENT: u8 = 6;
    /// Not found: no such directory, bucket, checkpoint, savepoint or file.
    pub const NOT_FOUND: u8 = 7;

    /// The exit code of a command that failed with `error`.
    pub fn for_error(error: &rockstate::Error) -> u8 {
        match error.kind() {
            rockstate::ErrorKind::NotFound => NOT_FOUND,
            rockstate::ErrorKind::Unavailable => TRANSIENT,
            _ => ERROR,
        }
    }
}

/// The runtime for the commands' storage calls.
pub fn runtime() -> rockstate::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| rockstate::Error::io("start the async runtime", e))
}

/// `text` on one line: line breaks and runs of blanks become single spaces.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
