//! The crate's one error type.
//!
//! Every fallible call returns [`Error`]. Match on [`Error::kind`] to decide what to do
//! (retry, give up, fix the input): the kind is the contract. The `Display` text says what
//! rockstate was doing and carries the ids that matter (state name, key group, file); the
//! underlying failure (RocksDB's, the object store's, the file system's, a user
//! operator's) is kept as the error's [`source`](std::error::Error::source), never repeated
//! in the message. [`Error::report`] prints the whole chain on one line.
//!
//! Errors are `Clone` (causes are shared), so an error that crosses a thread (a subtask's,
//! a worker's, an upload's) arrives whole: same variant, same kind, same causes.

use std::fmt;
use std::sync::Arc;

/// The cause of an [`Error`]: the underlying library's error, shared so that errors can be
/// cloned and sent to other threads.
pub type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// A cause given as text (where no error value exists, or it is not `Send`).
#[derive(Debug, Clone)]
struct Cause(String);

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Cause {}

/// What the caller should do about an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A local I/O or storage operation failed; retrying may succeed.
    Io,
    /// A remote service, or rockstate itself (too many checkpoints in flight), is
    /// temporarily unavailable or busy; retry later.
    Unavailable,
    /// Data read from disk or storage is damaged (bad checksum, truncated, undecodable).
    /// Retrying will not help; restore from another snapshot.
    Corrupt,
    /// The request does not fit existing state (type, layout, max parallelism).
    Incompatible,
    /// The caller passed a value that is not allowed (bad setting, key outside the range).
    InvalidArgument,
    /// Something that should exist does not.
    NotFound,
    /// Something that must be written once already exists (a completed checkpoint).
    AlreadyExists,
    /// A newer writer has claimed the job directory: this one may no longer commit or
    /// delete anything there. Stop the process; the newer writer owns the job.
    Fenced,
    /// A checkpoint's `_metadata` write got no definite answer (it may or may not be
    /// stored). Its files are kept; the checkpoint is not counted as completed.
    InDoubt,
    /// A local directory is held by another backend, in this process or another one.
    /// Close that backend (or stop that process), or use another directory.
    InUse,
    /// The user's operator (application code run by a runtime) failed; its error is the
    /// source.
    OperatorFailed,
    /// A broken internal invariant or an unexpected engine failure.
    Internal,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Corrupt => "corrupt data",
            ErrorKind::Incompatible => "incompatible",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::Fenced => "fenced",
            ErrorKind::InDoubt => "in doubt",
            ErrorKind::InUse => "in use",
            ErrorKind::OperatorFailed => "operator failed",
            ErrorKind::Internal => "internal error",
        };
        f.write_str(s)
    }
}

/// The error returned by every fallible rockstate operation.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting or argument is out of its allowed range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A key hashed to a key group that this backend does not own.
    #[error(
        "state \"{state}\": key belongs to key group {key_group}, outside this backend's range {range}"
    )]
    KeyGroupOutOfRange {
        /// The state that was accessed.
        state: String,
        /// The key group the key hashes to.
        key_group: u16,
        /// The range the backend owns, as `[start, end]`.
        range: String,
    },

    /// A state was registered again with a descriptor that does not match the stored one.
    #[error("state \"{state}\"{} is incompatible: stored as {stored}, requested as {requested}", in_operator(.operator))]
    IncompatibleState {
        /// The operator uid, when known.
        operator: Option<String>,
        /// The state name.
        state: String,
        /// The stored descriptor, human readable.
        stored: String,
        /// The descriptor that was requested, human readable.
        requested: String,
    },

    /// A local directory or a snapshot holds state written with a different layout than
    /// requested (key groups, max parallelism, partitions).
    #[error("incompatible state layout in {dir}: {detail}")]
    IncompatibleLayout {
        /// The local directory or snapshot folder.
        dir: String,
        /// What differs.
        detail: String,
    },

    /// Persisted data carries a format version this build cannot read.
    #[error("{what} has format version {found}; this build reads up to version {supported}")]
    UnsupportedVersion {
        /// What was being read.
        what: String,
        /// The version found.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },

    /// A value could not be serialized (a user type's `Serialize` failed).
    #[error("cannot encode {what}: {detail}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// The serializer's message.
        detail: String,
    },

    /// Bytes read back could not be decoded or failed a check.
    #[error("corrupt data in {what}: {detail}")]
    Corrupt {
        /// Where the bad bytes were found (state, file, ...).
        what: String,
        /// What is wrong with them.
        detail: String,
    },

    /// The storage engine (RocksDB) reported an error.
    #[error("storage engine error during {context}")]
    Engine {
        /// The operation that failed.
        context: String,
        /// Classification of the engine's error.
        kind: ErrorKind,
        /// The engine's error.
        #[source]
        source: Source,
    },

    /// A local file system operation failed.
    #[error("I/O error during {context}")]
    Io {
        /// The operation that failed, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: Source,
    },

    /// A local directory is locked by another backend.
    #[error("local directory {dir} is in use by another backend (in this or another process)")]
    InUse {
        /// The directory.
        dir: String,
        /// The engine's lock error.
        #[source]
        source: Source,
    },

    /// Something that should exist does not.
    #[error("not found: {0}")]
    NotFound(String),

    /// Something that is written once already exists.
    #[error("already exists: {0}")]
    AlreadyExists(String),

    /// An object-store request failed.
    #[error("storage error during {op} of {path}")]
    Storage {
        /// The operation (put, get, list, delete, ...).
        op: String,
        /// The object's path (or URL).
        path: String,
        /// Classification: `Unavailable` for retryable failures.
        kind: ErrorKind,
        /// The store's error.
        #[source]
        source: Source,
    },

    /// The user's operator failed.
    #[error("operator \"{operator}\" failed")]
    Operator {
        /// The operator's uid.
        operator: String,
        /// The operator's error.
        #[source]
        source: Source,
    },

    /// A newer writer claimed the job directory.
    #[error("fenced: {job}: writer epoch {ours} was superseded by epoch {newer}; another process now owns this job directory")]
    Fenced {
        /// The job directory.
        job: String,
        /// This writer's epoch.
        ours: u64,
        /// The newer epoch found.
        newer: u64,
    },

    /// A `_metadata` write whose outcome could not be determined.
    #[error("checkpoint {checkpoint_id}: the outcome of writing {path} is unknown ({detail}); its files are kept")]
    InDoubt {
        /// The checkpoint.
        checkpoint_id: u64,
        /// The `_metadata` URL.
        path: String,
        /// The last error seen.
        detail: String,
    },

    /// A request that cannot be served now (too many checkpoints in flight); retry later.
    #[error("busy: {0}")]
    Busy(String),

    /// A broken internal invariant.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Classifies the error so that callers can decide whether to retry, fail, or fix input.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument(_) | Error::KeyGroupOutOfRange { .. } | Error::Encode { .. } => {
                ErrorKind::InvalidArgument
            }
            Error::IncompatibleState { .. }
            | Error::IncompatibleLayout { .. }
            | Error::UnsupportedVersion { .. } => ErrorKind::Incompatible,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Engine { kind, .. } => *kind,
            Error::Io { .. } => ErrorKind::Io,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::Storage { kind, .. } => *kind,
            Error::Fenced { .. } => ErrorKind::Fenced,
            Error::InDoubt { .. } => ErrorKind::InDoubt,
            Error::InUse { .. } => ErrorKind::InUse,
            Error::Operator { .. } => ErrorKind::OperatorFailed,
            Error::Busy(_) => ErrorKind::Unavailable,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// An `InvalidArgument` error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// A `Corrupt` error: where the bad bytes were found, and what is wrong with them.
    pub fn corrupt(what: impl Into<String>, detail: impl fmt::Display) -> Self {
        Error::Corrupt {
            what: what.into(),
            detail: detail.to_string(),
        }
    }

    /// An `Io` error: what was being done, and the cause.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// An `OperatorFailed` error: the operator `uid` (user code) failed with `source`.
    pub fn operator(
        uid: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error::Operator {
            operator: uid.into(),
            source: Arc::from(source.into()),
        }
    }

    /// A storage error whose cause is given as text (no store error exists).
    pub(crate) fn storage_failed(
        op: impl Into<String>,
        path: impl Into<String>,
        kind: ErrorKind,
        cause: impl Into<String>,
    ) -> Self {
        Error::Storage {
            op: op.into(),
            path: path.into(),
            kind,
            source: Arc::new(Cause(cause.into())),
        }
    }

    /// The error and its chain of causes on one line: `message: cause: cause`.
    pub fn report(&self) -> Report<'_> {
        Report(self)
    }

    /// Wraps a RocksDB error, keeping its classification but not its type.
    pub(crate) fn engine(context: impl Into<String>, err: rocksdb::Error) -> Self {
        use rocksdb::ErrorKind as K;
        let kind = match err.kind() {
            K::Corruption => ErrorKind::Corrupt,
            K::IOError => ErrorKind::Io,
            K::Busy | K::TryAgain | K::TimedOut | K::Incomplete => ErrorKind::Unavailable,
            K::InvalidArgument | K::NotSupported => ErrorKind::InvalidArgument,
            K::NotFound => ErrorKind::NotFound,
            _ => ErrorKind::Internal,
        };
        Error::Engine {
            context: context.into(),
            kind,
            source: Arc::new(err),
        }
    }
}

/// An error with its causes on one line ([`Error::report`]).
#[derive(Debug, Clone, Copy)]
pub struct Report<'a>(&'a Error);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut previous = self.0.to_string();
        f.write_str(&previous)?;
        let mut cause = std::error::Error::source(self.0);
        while let Some(e) = cause {
            let text = e.to_string();
            // Some libraries print their own cause too: say each text once.
            if !text.is_empty() && !previous.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            previous = text;
            cause = e.source();
        }
        Ok(())
    }
}

fn in_operator(operator: &Option<String>) -> String {
    operator
        .as_ref()
        .map(|uid| format!(" of operator \"{uid}\""))
        .unwrap_or_default()
}

impl Error {
    /// Names the operator in an [`Error::IncompatibleState`] (other errors are returned
    /// unchanged).
    pub fn for_operator(self, uid: &str) -> Self {
        match self {
            Error::IncompatibleState {
                operator: None,
                state,
                stored,
                requested,
            } => Error::IncompatibleState {
                operator: Some(uid.to_string()),
                state,
                stored,
                requested,
            },
            other => other,
        }
    }

    /// Wraps an object-store error for `op` on `path`.
    pub(crate) fn storage(op: &str, path: impl fmt::Display, err: object_store::Error) -> Self {
        use object_store::Error as E;
        let path = path.to_string();
        match err {
            E::NotFound { .. } => Error::NotFound(format!("{path} ({op})")),
            E::AlreadyExists { .. } | E::Precondition { .. } => Error::AlreadyExists(path),
            other => {
                let mut op = op.to_string();
                let kind = match &other {
                    E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => {
                        ErrorKind::InvalidArgument
                    }
                    E::NotSupported { .. } | E::NotImplemented { .. } => ErrorKind::Internal,
                    E::PermissionDenied { .. } | E::Unauthenticated { .. } => ErrorKind::Io,
                    E::Generic { .. } => match misconfiguration(&chain_text(&other)) {
                        Some(Misconfigured::NoSuchBucket) => {
                            return Error::NotFound(format!(
                                "{path}: the bucket does not exist ({op})"
                            ))
                        }
                        Some(Misconfigured::Credentials(hint)) => {
                            op.push_str(&format!(" ({hint})"));
                            ErrorKind::InvalidArgument
                        }
                        None => ErrorKind::Unavailable,
                    },
                    _ => ErrorKind::Unavailable,
                };
                Error::Storage {
                    op,
                    path,
                    kind,
                    source: Arc::new(other),
                }
            }
        }
    }
}

/// An error and its causes as one text.
fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// A store's answer that no retry can change: the configuration is wrong.
#[derive(Debug, PartialEq, Eq)]
enum Misconfigured {
    NoSuchBucket,
    /// With what to do about it.
    Credentials(&'static str),
}

/// Recognises misconfiguration in the text of a store client's generic error (the
/// clients report these as generic HTTP errors, with the service's error code).
fn misconfiguration(text: &str) -> Option<Misconfigured> {
    if text.contains("NoSuchBucket") || text.contains("ContainerNotFound") {
        return Some(Misconfigured::NoSuchBucket);
    }
    // No credentials in the environment: the client asked the instance metadata
    // service, which does not exist here.
    let metadata_service =
        text.contains("169.254.169.254") || text.contains("metadata.google.internal");
    // Any failure but a passing one of a service that exists (a 5xx or 429 answer): no
    // such service here (refused, unreachable, timed out, not resolved, denied).
    let passing = ["500 ", "502 ", "503 ", "504 ", "429 "]
        .iter()
        .any(|status| {
            text.contains(&format!("code: {status}")) || text.contains(&format!(": {status}"))
        });
    if metadata_service && !passing {
        return Some(Misconfigured::Credentials(
            "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where instance credentials exist",
        ));
    }
    const REFUSED: [&str; 5] = [
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "AuthorizationHeaderMalformed",
        "AuthenticationFailed",
    ];
    if REFUSED.iter().any(|code| text.contains(code)) {
        return Some(Misconfigured::Credentials(
            "the store refused the credentials: check the access key, secret and region, and the bucket's policy",
        ));
    }
    None
}

/// Whether a storage error already went through the store client's own retries (its
/// message says so): retrying it again would repeat the whole wait.
pub(crate) fn already_retried(error: &Error) -> bool {
    match error {
        Error::Storage { source, .. } => retries_exhausted(&chain_text(source.as_ref())),
        _ => false,
    }
}

/// Reads the store client's own account of its retries, "... in 6.7s, after 10 retries,
/// max_retries: 10, retry_timeout: 180s ...", anchored on that one phrase (a path or a
/// message elsewhere in the text may hold the same words): `true` when it used all its
/// retries or all its time.
fn retries_exhausted(text: &str) -> bool {
    const MARK: &str = " retries, max_retries: ";
    let Some(at) = text.find(MARK) else {
        return false;
    };
    let leading_number = |s: &str| -> Option<f64> {
        let n: String = s
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let value: f64 = n.parse().ok()?;
        let unit = &s[n.len()..];
        Some(if unit.starts_with("ms") {
            value / 1e3
        } else if unit.starts_with("µs") || unit.starts_with("us") {
            value / 1e6
        } else if unit.starts_with("ns") {
            value / 1e9
        } else {
            value
        })
    };
    let (before, done) = match text[..at].rsplit_once("after ") {
        Some((before, done)) => (before, done.parse::<u64>().ok()),
        None => (&text[..at], None),
    };
    let tail = &text[at + MARK.len()..];
    let max = leading_number(tail).map(|m| m as u64);
    let out_of_retries = matches!((done, max), (Some(d), Some(m)) if d >= m);
    let elapsed = before
        .trim_end()
        .trim_end_matches(',')
        .rsplit_once(" in ")
        .and_then(|(_, e)| leading_number(e));
    let limit = tail
        .find("retry_timeout: ")
        .and_then(|i| leading_number(&tail[i + "retry_timeout: ".len()..]));
    let out_of_time = matches!((elapsed, limit), (Some(e), Some(l)) if e >= l);
    out_of_retries || out_of_time
}

/// Shorthand for `std::result::Result<T, rockstate::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_misconfiguration_is_told_apart_from_outages() {
        let generic = |text: &str| object_store::Error::Generic {
            store: "S3",
            source: text.to_string().into(),
        };
        let e = Error::storage(
            "list",
            "s3://b/j/",
            generic("404 Not Found: <Code>NoSuchBucket</Code>"),
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("bucket does not exist"), "{e}");
        let e = Error::storage(
            "get",
            "s3://b/j/x",
            generic("Error performing PUT http://169.254.169.254/latest/api/token: 403 Forbidden"),
        );
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("AWS_ACCESS_KEY_ID"), "{e}");
        let e = Error::storage(
            "put",
            "s3://b/j/x",
            generic("403 Forbidden: <Code>SignatureDoesNotMatch</Code>"),
        );
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = Error::storage(
            "list",
            "s3://b/j/",
            generic("Error performing GET http://127.0.0.1:1/b in 6.7s, after 10 retries, max_retries: 10, retry_timeout: 180s - HTTP error: Connection refused"),
        );
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(already_retried(&e));
        let early = Error::storage(
            "put",
            "s3://b/j/x",
            generic("Error performing PUT http://h/b/x in 30s, after 1 retries, max_retries: 10, retry_timeout: 180s - timed out"),
        );
        assert!(!already_retried(&early));
        let out_of_time = Error::storage(
            "put",
            "s3://b/j/x",
            generic("Error performing PUT http://h/b/x in 181.5s, after 4 retries, max_retries: 10, retry_timeout: 180s - timed out"),
        );
        assert!(already_retried(&out_of_time));
        // The same words elsewhere in the text (a key, a message) do not count.
        let look_alike = Error::storage(
            "put",
            "s3://b/after 5 in 999s/x",
            generic("Error performing PUT http://h/b/after 5 in 999s/x in 2.1s, after 10 retries, max_retries: 10, retry_timeout: 180s - connection refused in handshake"),
        );
        assert!(already_retried(&look_alike));
        let early_look_alike = Error::storage(
            "put",
            "s3://b/x",
            generic("Error performing PUT http://h/b/after 10/x in 2.1s, after 3 retries, max_retries: 10, retry_timeout: 180s"),
        );
        assert!(!already_retried(&early_look_alike));
        let silent = Error::storage(
            "get",
            "s3://b/j/x",
            generic("Error performing PUT http://169.254.169.254/latest/api/token in 1s - operation timed out"),
        );
        assert_eq!(silent.kind(), ErrorKind::InvalidArgument);
        let hiccup = Error::storage(
            "get",
            "s3://b/j/x",
            generic("Error performing GET http://169.254.169.254/latest/api/token: 503 Service Unavailable"),
        );
        assert_eq!(hiccup.kind(), ErrorKind::Unavailable);
        let e = Error::storage("list", "s3://b/j/", generic("500 Internal Server Error"));
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(!already_retried(&e));
    }

    #[test]
    fn kinds_classify_variants() {
        assert_eq!(Error::invalid("x").kind(), ErrorKind::InvalidArgument);
        assert_eq!(Error::corrupt("f", "bad crc").kind(), ErrorKind::Corrupt);
        let e = Error::IncompatibleState {
            operator: None,
            state: "count".into(),
            stored: "value<u64>".into(),
            requested: "value<String>".into(),
        };
        assert_eq!(e.kind(), ErrorKind::Incompatible);
        assert!(e.to_string().contains("\"count\""));
        let io = Error::io("open /x", std::io::Error::other("boom"));
        assert_eq!(io.kind(), ErrorKind::Io);
        assert!(io.to_string().contains("open /x"));
    }

    /// Causes are kept as sources, not repeated in the message, and survive a clone sent
    /// to another thread with the kind intact.
    #[test]
    fn causes_are_sources_and_survive_threads() {
        use std::error::Error as _;
        let io = Error::io("open /x", std::io::Error::other("boom"));
        assert!(!io.to_string().contains("boom"), "{io}");
        assert_eq!(io.source().unwrap().to_string(), "boom");
        assert_eq!(io.report().to_string(), "I/O error during open /x: boom");
        let sent = std::thread::spawn({
            let io = io.clone();
            move || io
        })
        .join()
        .unwrap();
        assert_eq!(sent.kind(), ErrorKind::Io);
        assert_eq!(sent.source().unwrap().to_string(), "boom");

        let failed = Error::operator("counter", "negative count");
        assert_eq!(failed.kind(), ErrorKind::OperatorFailed);
        assert_eq!(
            failed.report().to_string(),
            "operator \"counter\" failed: negative count"
        );

        // A cause that prints its own cause is said once.
        let store = Error::storage(
            "put",
            "memory://x/a",
            object_store::Error::Generic {
                store: "S3",
                source: "connection reset".into(),
            },
        );
        let line = store.report().to_string();
        assert_eq!(line.matches("connection reset").count(), 1, "{line}");

        let engine = Error::engine(
            "open /db",
            rocksdb::DB::open_default("/proc/rockstate-cannot-create-this").unwrap_err(),
        );
        assert!(engine.source().is_some());
        assert!(!engine.to_string().contains("proc/rockstate"), "{engine}");
    }
}
