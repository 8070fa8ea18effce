//! Reading a snapshot without a running job: [`SavepointReader`] opens any completed
//! checkpoint or savepoint and gives an operator's keyed state (typed, through the same
//! descriptors the job uses, or raw) and its operator state. For debugging, checks and
//! migrations done offline.

use std::path::PathBuf;

use crate::backend::BackendOptions;
use crate::backend::RocksStateBackend;
use crate::error::{Error, Result};
use crate::format::{CheckpointMetadata, OperatorState, StateMeta};
use crate::keygroup::KeyGroupRange;
use crate::state::StateSpec;

use super::{remove_dir_if_exists, RestoreOptions, RestoreSource};

/// A completed checkpoint or savepoint opened for reading, without a job.
///
/// ```no_run
/// # async fn example() -> rockstate::Result<()> {
/// use rockstate::restore::SavepointReader;
/// use rockstate::ValueStateDescriptor;
///
/// let reader = SavepointReader::open("s3://bucket/savepoints/savepoint-job-1a2b", "/tmp/reader").await?;
/// let keyed = reader.keyed_state("counter").await?;
/// let count = keyed.register(ValueStateDescriptor::<String, u64>::new("count"))?;
/// for key in count.all_keys()? {
///     let (key, ()) = key?;
///     println!("{key}: {:?}", count.get(&key)?);
/// }
/// drop(count);
/// keyed.close()?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SavepointReader {
    source: RestoreSource,
    scratch: PathBuf,
}

impl SavepointReader {
    /// Opens the snapshot at `url` (a `chk-N` folder, a savepoint folder, or the
    /// `_metadata` inside either). `scratch` is a local directory for the keyed state
    /// read (each [`keyed_state`](Self::keyed_state) takes a new folder in it, removed
    /// when its reader is closed or dropped).
    ///
    /// Errors: see [`RestoreSource::open`].
    pub async fn open(url: &str, scratch: impl Into<PathBuf>) -> Result<Self> {
        Ok(Self {
            source: RestoreSource::open(url).await?,
            scratch: scratch.into(),
        })
    }

    /// A reader of an already opened snapshot.
    pub fn from_source(source: RestoreSource, scratch: impl Into<PathBuf>) -> Self {
        Self {
            source,
            scratch: scratch.into(),
        }
    }

    /// The snapshot's metadata: its operators, their parallelism and states.
    pub fn metadata(&self) -> &CheckpointMetadata {
        self.source.metadata()
    }

    fn operator(&self, uid: &str) -> Result<&crate::format::OperatorSnapshot> {
        self.metadata().operator(uid).ok_or_else(|| {
            let known: Vec<&str> = self
                .metadata()
                .operators
                .iter()
                .map(|o| o.uid.as_str())
                .collect();
            Error::invalid(format!(
                "no operator {uid:?} in {} (it holds {known:?})",
                self.source.location()
            ))
        })
    }

    /// The operator state of every subtask of operator `uid`, in subtask order.
    ///
    /// Errors: `InvalidArgument` listing the snapshot's operators for an unknown uid.
    pub fn operator_states(&self, uid: &str) -> Result<Vec<OperatorState>> {
        Ok(self
            .operator(uid)?
            .subtasks
            .iter()
            .map(|s| s.operator_state.clone())
            .collect())
    }

    /// The keyed state of operator `uid`, all key groups in one local backend (restored,
    /// every file CRC-checked, into a new folder of the scratch directory). Register the
    /// job's descriptors on it to read typed values, or read entries raw.
    ///
    /// Errors: `InvalidArgument` for an unknown uid; the restore's errors.
    pub async fn keyed_state(&self, uid: &str) -> Result<KeyedStateReader> {
        let op = self.operator(uid)?;
        let dir = self.scratch.join(format!(
            "read-{}-{:016x}",
            crate::hash::operator_uid_hash(uid),
            rand::random::<u64>()
        ));
        let mut options = BackendOptions::new(
            &dir,
            KeyGroupRange::all(op.max_parallelism)?,
            op.max_parallelism,
        );
        options.incremental = false;
        let restored = RocksStateBackend::builder(options)
            .restore_operator(&self.source, uid, &RestoreOptions::default())
            .await;
        match restored {
            Ok(backend) => Ok(KeyedStateReader {
                backend: Some(backend),
                dir,
            }),
            Err(e) => {
                if let Err(cleanup) = remove_dir_if_exists(&dir).await {
                    tracing::warn!(dir = %dir.display(), error = %cleanup.report(), "cannot remove a reader's directory");
                }
                Err(e)
            }
        }
    }
}

/// One operator's keyed state, read from a snapshot ([`SavepointReader::keyed_state`]).
/// Writes through it change only the local copy, never the snapshot.
#[derive(Debug)]
pub struct KeyedStateReader {
    backend: Option<RocksStateBackend>,
    dir: PathBuf,
}

impl KeyedStateReader {
    fn backend(&self) -> &RocksStateBackend {
        self.backend
            .as_ref()
            .expect("the backend is taken only by close, which consumes the reader")
    }

    /// The states stored, with their kinds, types and time to live.
    pub fn states(&self) -> Vec<StateMeta> {
        self.backend().states()
    }

    /// A typed handle on a stored state, as in the job (`Incompatible` when the types
    /// differ from the recorded ones).
    ///
    /// Errors: see [`RocksStateBackend::register`].
    pub fn register<S: StateSpec>(&self, spec: S) -> Result<S::Handle> {
        self.backend().register(spec)
    }

    /// Calls `f(state name, key, value)` for every stored entry, raw: the key is
    /// `key group (2 bytes) ‖ key ‖ namespace` in the state's encoding, the value as
    /// stored (with its TTL timestamp when the state has a time to live). Expired entries
    /// not yet removed by compaction are included.
    ///
    /// Errors: engine errors.
    pub fn for_each_raw(&self, f: impl FnMut(&str, &[u8], &[u8])) -> Result<()> {
        self.backend().for_each_entry(f)
    }

    /// Calls `f(key, value)` for the raw entries of state `name` whose key starts with
    /// `prefix`, in key order, until `f` returns `false` (see
    /// [`RocksStateBackend::scan_raw`]). Memory stays bounded whatever the state's size.
    ///
    /// Errors: `InvalidArgument` for a state that is not stored; engine errors.
    pub fn scan_raw(
        &self,
        name: &str,
        prefix: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        self.backend().scan_raw(name, prefix, f)
    }

    pub(crate) fn backend_ref(&self) -> &RocksStateBackend {
        self.backend()
    }

    /// Closes the local copy and removes its folder, whatever the close reports. Drop the
    /// state handles taken from it first: the database stays open while one exists.
    ///
    /// Errors: engine and local I/O errors.
    pub fn close(mut self) -> Result<()> {
        let closed = match self.backend.take() {
            Some(backend) => backend.close(),
            None => Ok(()),
        };
        let removed = std::fs::remove_dir_all(&self.dir)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| Error::io(format!("remove {}", self.dir.display()), e));
        closed.and(removed)
    }
}

impl Drop for KeyedStateReader {
    fn drop(&mut self) {
        if let Some(backend) = self.backend.take() {
            drop(backend);
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove a reader's directory");
                }
            }
        }
    }
}
