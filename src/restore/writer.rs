//! Writing a savepoint without a running job: [`SavepointWriter`] builds the keyed and
//! operator state of any number of operators in local backends and writes them as one
//! canonical savepoint, which restores in any runtime at any parallelism. For
//! bootstrapping a new job from existing data, and, with [`SavepointReader`], for
//! transforming a snapshot offline: drop keys, fix values, remove or rename operators.
//!
//! [`SavepointReader`]: super::SavepointReader

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::{BackendOptions, RocksStateBackend};
use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    folder_name, CheckpointMetadata, Compression, KeyedSnapshot, OperatorSnapshot, OperatorState,
    SavepointFormat, SnapshotKind, StateMeta, SubtaskSnapshot, METADATA_FILE,
};
use crate::keygroup::{self, KeyGroupRange};
use crate::state::{ListStateDescriptor, MapStateDescriptor, StateSpec, ValueStateDescriptor};
use crate::storage::CheckpointStorage;

use super::reader::KeyedStateReader;
use super::remove_dir_if_exists;

/// Entries copied per write batch by [`OperatorWriter::copy_keyed_state`].
const COPY_BATCH_BYTES: usize = 4 << 20;

/// Builds a canonical savepoint from data rather than from a job.
///
/// ```no_run
/// # async fn example() -> rockstate::Result<()> {
/// use rockstate::restore::SavepointWriter;
/// use rockstate::{CheckpointStorage, ValueStateDescriptor};
///
/// let mut writer = SavepointWriter::new(128, "/tmp/writer")?;
/// let counts = writer
///     .operator("counter")?
///     .register(ValueStateDescriptor::<String, u64>::new("count"))?;
/// for (key, n) in [("a", 3u64), ("b", 5)] {
///     counts.put(&key.to_string(), &n)?;
/// }
/// drop(counts);
/// let parent = CheckpointStorage::open("s3://bucket/savepoints")?;
/// let (folder, _) = writer.write(&parent, "bootstrap").await?;
/// println!("restore from {}", folder.url());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SavepointWriter {
    max_parallelism: u32,
    scratch: PathBuf,
    memory_budget: usize,
    operators: Vec<OperatorWriter>,
}

/// The state of one operator of a [`SavepointWriter`]: a local backend holding every key
/// group, and the operator state.
#[derive(Debug)]
pub struct OperatorWriter {
    uid: String,
    /// Taken only when the savepoint is written.
    backend: Option<RocksStateBackend>,
    operator_state: OperatorState,
    dir: PathBuf,
}

impl SavepointWriter {
    /// A writer of a savepoint with `max_parallelism` key groups; `scratch` is a local
    /// directory for its backends (in a new folder of this writer's, removed when the
    /// writer is written or dropped).
    ///
    /// Errors: `InvalidArgument` for a max parallelism outside `1..=32768`.
    pub fn new(max_parallelism: u32, scratch: impl Into<PathBuf>) -> Result<Self> {
        keygroup::validate_max_parallelism(max_parallelism)?;
        Ok(Self {
            max_parallelism,
            scratch: scratch
                .into()
                .join(format!("writer-{:016x}", rand::random::<u64>())),
            memory_budget: 64 << 20,
            operators: Vec::new(),
        })
    }

    /// Sets the memory of each operator's backend (default 64 MiB). Applies to operators
    /// added afterwards.
    pub fn memory_budget(mut self, bytes: usize) -> Self {
        self.memory_budget = bytes;
        self
    }

    /// The savepoint's number of key groups.
    pub fn max_parallelism(&self) -> u32 {
        self.max_parallelism
    }

    /// The operator `uid`, added empty on first use.
    ///
    /// Errors: `InvalidArgument` for an empty uid; engine errors opening its backend.
    pub fn operator(&mut self, uid: &str) -> Result<&mut OperatorWriter> {
        if uid.is_empty() {
            return Err(Error::invalid("an operator uid must not be empty"));
        }
        if let Some(i) = self.operators.iter().position(|o| o.uid == uid) {
            return Ok(&mut self.operators[i]);
        }
        let dir = self.scratch.join(format!(
            "{}-{}",
            crate::hash::operator_uid_hash(uid),
            self.operators.len()
        ));
        let mut options = BackendOptions::new(
            &dir,
            KeyGroupRange::all(self.max_parallelism)?,
            self.max_parallelism,
        );
        options.incremental = false;
        options.memory_budget = self.memory_budget;
        let backend = RocksStateBackend::open(options)?;
        self.operators.push(OperatorWriter {
            uid: uid.to_string(),
            backend: Some(backend),
            operator_state: OperatorState::default(),
            dir,
        });
        Ok(self.operators.last_mut().expect("just added"))
    }

    /// Removes operator `uid` and everything written for it; `false` when there is none.
    pub fn remove_operator(&mut self, uid: &str) -> bool {
        let Some(i) = self.operators.iter().position(|o| o.uid == uid) else {
            return false;
        };
        self.operators.remove(i);
        true
    }

    /// The uids of the operators added, in order.
    pub fn operator_uids(&self) -> Vec<&str> {
        self.operators.iter().map(|o| o.uid.as_str()).collect()
    }

    /// Writes the savepoint into a new folder of `parent` named after `job_id`, like a
    /// triggered savepoint, and returns the folder and its metadata. Each operator is
    /// written with parallelism 1 and every key group; it restores at any parallelism.
    ///
    /// Errors: `InvalidArgument` when no operator was added; engine and storage errors
    /// (the files written are then removed, best effort).
    pub async fn write(
        self,
        parent: &CheckpointStorage,
        job_id: &str,
    ) -> Result<(CheckpointStorage, CheckpointMetadata)> {
        let folder = parent.child(&folder_name(job_id))?;
        let meta = self.write_to(&folder, job_id).await?;
        Ok((folder, meta))
    }

    /// Writes the savepoint into `folder`, which must hold nothing yet.
    ///
    /// Errors: `AlreadyExists` for a folder that holds files (nothing is written or
    /// removed there); otherwise as [`write`](Self::write).
    pub async fn write_to(
        self,
        folder: &CheckpointStorage,
        job_id: &str,
    ) -> Result<CheckpointMetadata> {
        if self.operators.is_empty() {
            return Err(Error::invalid("a savepoint needs at least one operator"));
        }
        if !folder.list("").await?.is_empty() {
            return Err(Error::AlreadyExists(folder.url().to_string()));
        }
        let written = self.write_all(folder, job_id).await;
        if let Err(e) = &written {
            remove_written(folder, e).await;
        }
        written
    }

    async fn write_all(
        mut self,
        folder: &CheckpointStorage,
        job_id: &str,
    ) -> Result<CheckpointMetadata> {
        let now = || crate::clock::Clock::now_millis(&crate::clock::SystemClock);
        let started = now();
        let mut operators = Vec::with_capacity(self.operators.len());
        let mut rest: std::collections::VecDeque<OperatorWriter> =
            std::mem::take(&mut self.operators).into();
        while let Some(op) = rest.pop_front() {
            match self.write_operator(op, folder).await {
                Ok(snapshot) => operators.push(snapshot),
                Err(e) => {
                    // The operators not written yet close their databases and remove
                    // their folders off the async threads.
                    let dropped = tokio::task::spawn_blocking(move || drop(rest)).await;
                    if let Err(join) = dropped {
                        tracing::warn!(error = %join, "cannot close the operators of a failed savepoint");
                    }
                    return Err(e);
                }
            }
        }
        remove_dir_if_exists(&self.scratch).await?;
        let meta = CheckpointMetadata {
            checkpoint_id: 1,
            kind: SnapshotKind::SavepointCanonical,
            job_id: job_id.to_string(),
            triggered_at_ms: started,
            completed_at_ms: now(),
            operators,
            writer_epoch: 0,
        };
        // A write that lands and still reports an error is read back, not taken for failed.
        crate::checkpoint::commit(
            folder,
            METADATA_FILE,
            meta.checkpoint_id,
            &meta.encode()?,
            None,
        )
        .await?;
        tracing::info!(folder = %folder.url(), operators = meta.operators.len(), "savepoint written");
        Ok(meta)
    }
}

impl SavepointWriter {
    /// Writes one operator's keyed state (none for an operator with operator state only)
    /// into `folder`, closes its backend and removes its folder.
    async fn write_operator(
        &self,
        mut op: OperatorWriter,
        folder: &CheckpointStorage,
    ) -> Result<OperatorSnapshot> {
        let uid = op.uid.clone();
        let dir = op.dir.clone();
        let operator_state = std::mem::take(&mut op.operator_state);
        let backend = op.backend.take().expect("present until written");
        drop(op);
        let states = backend.states();
        let (backend, pending) = if states.is_empty() {
            (backend, None)
        } else {
            let (backend, pending) = tokio::task::spawn_blocking(move || {
                let pending = backend.snapshot(1);
                (backend, pending)
            })
            .await
            .map_err(|e| Error::Internal(format!("snapshot a savepoint operator: {e}")))?;
            (backend, Some(pending))
        };
        let keyed = match pending {
            None => Ok(None),
            Some(Ok(p)) => p
                .write_savepoint(
                    folder,
                    &uid,
                    0,
                    SavepointFormat::Canonical,
                    Compression::default(),
                )
                .await
                .map(Some),
            Some(Err(e)) => Err(e),
        };
        let closed = tokio::task::spawn_blocking(move || backend.close())
            .await
            .map_err(|e| Error::Internal(format!("close a savepoint operator: {e}")))
            .and_then(|r| r);
        if let Err(e) = remove_dir_if_exists(&dir).await {
            tracing::warn!(dir = %dir.display(), error = %e.report(), "cannot remove a savepoint writer's directory");
        }
        let keyed: Option<KeyedSnapshot> = keyed?;
        closed?;
        Ok(OperatorSnapshot {
            uid_hash: crate::hash::operator_uid_hash(&uid),
            uid,
            parallelism: 1,
            max_parallelism: self.max_parallelism,
            states,
            subtasks: vec![SubtaskSnapshot {
                keyed,
                operator_state,
            }],
        })
    }
}

impl Drop for SavepointWriter {
    fn drop(&mut self) {
        self.operators.clear();
        super::remove_dir_quietly(&self.scratch, "a savepoint writer's directory");
    }
}

/// Removes what a failed savepoint wrote into `folder`, best effort; never after an
/// `InDoubt` failure (the savepoint may be complete).
pub(crate) async fn remove_written(folder: &CheckpointStorage, failure: &Error) {
    if failure.kind() == ErrorKind::InDoubt {
        return;
    }
    let written: Vec<String> = match folder.list("").await {
        Ok(objects) => objects.into_iter().map(|o| o.path).collect(),
        Err(list) => {
            tracing::warn!(folder = %folder.url(), error = %list.report(), "cannot list the files of a failed savepoint to remove them");
            Vec::new()
        }
    };
    if let Err(cleanup) = folder.delete_many(written).await {
        tracing::warn!(folder = %folder.url(), error = %cleanup.report(), "cannot remove the files of a failed savepoint");
    }
}

impl OperatorWriter {
    /// The operator's uid.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// The backend the operator's keyed state is written into: it holds every key group.
    pub fn backend(&self) -> &RocksStateBackend {
        self.backend
            .as_ref()
            .expect("the backend is taken only when the writer is written, which consumes it")
    }

    /// Registers a state on the operator's backend, as a job does, and returns its handle
    /// to write values with.
    ///
    /// Errors: see [`RocksStateBackend::register`].
    pub fn register<S: StateSpec>(&self, spec: S) -> Result<S::Handle> {
        self.backend().register(spec)
    }

    /// Writes value state `descriptor` from `entries` (key, value); a key given twice keeps
    /// its last value. Returns the number of entries written.
    ///
    /// Errors: see [`register`](Self::register); encoding errors of a key or value.
    pub fn write_values<K, V>(
        &self,
        descriptor: ValueStateDescriptor<K, V>,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Result<u64>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        self.write_each(descriptor, entries, |state, (key, value)| {
            state.put(&key, &value)
        })
    }

    /// Writes list state `descriptor` from `entries` (key, elements), replacing the list
    /// of a key given twice. Returns the number of lists written.
    ///
    /// Errors: as [`write_values`](Self::write_values).
    pub fn write_lists<K, V>(
        &self,
        descriptor: ListStateDescriptor<K, V>,
        entries: impl IntoIterator<Item = (K, Vec<V>)>,
    ) -> Result<u64>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        self.write_each(descriptor, entries, |state, (key, values)| {
            state.update(&key, &values)
        })
    }

    /// Writes map state `descriptor` from `entries` (key, user key, value). Returns the
    /// number of map entries written.
    ///
    /// Errors: as [`write_values`](Self::write_values).
    pub fn write_map_entries<K, UK, UV>(
        &self,
        descriptor: MapStateDescriptor<K, UK, UV>,
        entries: impl IntoIterator<Item = (K, UK, UV)>,
    ) -> Result<u64>
    where
        K: Serialize + DeserializeOwned,
        UK: Serialize + DeserializeOwned,
        UV: Serialize + DeserializeOwned,
    {
        self.write_each(descriptor, entries, |state, (key, user_key, value)| {
            state.put(&key, &user_key, &value)
        })
    }

    /// Registers `spec` and writes each of `entries` through its handle with `write`.
    fn write_each<S: StateSpec, T>(
        &self,
        spec: S,
        entries: impl IntoIterator<Item = T>,
        mut write: impl FnMut(&S::Handle, T) -> Result<()>,
    ) -> Result<u64> {
        let state = self.register(spec)?;
        let mut n = 0;
        for entry in entries {
            write(&state, entry)?;
            n += 1;
        }
        Ok(n)
    }

    /// The operator state (source offsets and other lists) the savepoint will hold.
    pub fn operator_state_mut(&mut self) -> &mut OperatorState {
        &mut self.operator_state
    }

    /// Copies from `from` every state `keep_state` accepts, with its record, entry by
    /// entry as stored (types, time-to-live timestamps and all); `keep_entry(state, raw
    /// key, raw value)` may leave single entries out. Returns the number of entries copied.
    ///
    /// Errors: `InvalidArgument` when `from` has another max parallelism (its key groups
    /// would not be this savepoint's: re-key through typed handles instead), or holds a
    /// state already written here; engine errors.
    pub fn copy_keyed_state(
        &self,
        from: &KeyedStateReader,
        mut keep_state: impl FnMut(&StateMeta) -> bool,
        mut keep_entry: impl FnMut(&str, &[u8], &[u8]) -> bool,
    ) -> Result<u64> {
        let source = from.backend_ref();
        let target = self.backend();
        if source.max_parallelism() != target.max_parallelism() {
            return Err(Error::invalid(format!(
                "the state read has max parallelism {}, the savepoint {}",
                source.max_parallelism(),
                target.max_parallelism()
            )));
        }
        let present: Vec<String> = target.states().into_iter().map(|s| s.name).collect();
        let mut copied = 0u64;
        for meta in source.states() {
            if !keep_state(&meta) {
                continue;
            }
            if present.contains(&meta.name) {
                return Err(Error::invalid(format!(
                    "state {:?} is already written in operator {:?}",
                    meta.name, self.uid
                )));
            }
            let column = target.ensure_state(&meta)?;
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            let mut failed = None;
            source.scan_raw(&meta.name, &[], |key, value| {
                if !keep_entry(&meta.name, key, value) {
                    return true;
                }
                bytes += key.len() + value.len();
                batch.push((column.clone(), key.to_vec(), value.to_vec()));
                if bytes >= COPY_BATCH_BYTES {
                    copied += batch.len() as u64;
                    if let Err(e) = self.backend().core.put_raw(&batch) {
                        failed = Some(e);
                        return false;
                    }
                    batch.clear();
                    bytes = 0;
                }
                true
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
            copied += batch.len() as u64;
            self.backend().core.put_raw(&batch)?;
        }
        Ok(copied)
    }
}

impl Drop for OperatorWriter {
    fn drop(&mut self) {
        // An operator dropped unwritten (or removed) takes its folder with it; once its
        // backend is taken, the savepoint being written removes the folder.
        let Some(backend) = self.backend.take() else {
            return;
        };
        drop(backend);
        super::remove_dir_quietly(&self.dir, "a savepoint writer's directory");
    }
}
