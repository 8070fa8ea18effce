//! Reading a snapshot without a running job: [`SavepointReader`] opens any completed
//! checkpoint or savepoint and gives an operator's keyed state (typed, through the same
//! descriptors the job uses, or raw) and its operator state. For debugging, checks and
//! migrations done offline.

use std::path::PathBuf;

use crate::backend::BackendOptions;
use crate::backend::RocksStateBackend;
use crate::engine::ttl;
use crate::error::{Error, Result};
use crate::format::schema::{Node, TypeSchema};
use crate::format::{CheckpointMetadata, OperatorState, StateKind, StateMeta, TypeInfo};
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
        let restored = match RocksStateBackend::builder(options)
            .restore_operator(&self.source, uid, &RestoreOptions::default())
            .await
        {
            // The copy is removed when the reader closes: nothing of it is flushed, synced
            // or marked clean then. (Marking it changes RocksDB's options: file work.)
            Ok(backend) => {
                super::rescale::blocking(move || {
                    backend.core.mark_scratch();
                    Ok(backend)
                })
                .await
            }
            Err(e) => Err(e),
        };
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

    /// Calls `f` with each entry of state `name` whose key starts with `prefix` (see
    /// [`key_prefix`](Self::key_prefix)), decoded into JSON through the type structures
    /// recorded with the state, until `f` returns `false`:
    /// `{"key_group", "key", "namespace" (unless `()`), "user_key" (map state), "value"
    /// (an array of elements for list state), "written_at" (ms, with a time to live; one
    /// per element for lists)}`. Expired entries not yet compacted are included. No
    /// program types are needed; memory stays bounded.
    ///
    /// Errors: `InvalidArgument` for a state that is not stored or whose types were
    /// recorded without a structure (by an earlier version, or types that cannot be
    /// traced: read those through the program's descriptors); `Corrupt` for an entry that
    /// does not decode; engine errors.
    pub fn scan_json(
        &self,
        name: &str,
        prefix: &[u8],
        mut f: impl FnMut(serde_json::Value) -> bool,
    ) -> Result<()> {
        let meta = self.state(name)?;
        let schemas = Schemas::of(&meta)?;
        let mut failed = None;
        self.backend().scan_raw(name, prefix, |key, value| {
            match schemas.entry(&meta, key, value) {
                Ok(v) => f(v),
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })?;
        failed.map_or(Ok(()), Err)
    }

    /// The stored prefix of `key` (given in the JSON form of [`scan_json`](Self::scan_json))
    /// in state `name`: its key group and encoded key, for
    /// [`scan_json`](Self::scan_json) to find every namespace and map entry of that key.
    ///
    /// Errors: `InvalidArgument` for an unknown state, a key type recorded without a
    /// structure, or a key that does not fit the type.
    pub fn key_prefix(&self, name: &str, key: &serde_json::Value) -> Result<Vec<u8>> {
        let meta = self.state(name)?;
        let schema = structure(&meta, &meta.key_type, "key")?;
        let encoded = schema.encode_json(key)?;
        let kg = crate::keygroup::key_group_for_bytes(&encoded, self.backend().max_parallelism());
        Ok([kg.to_be_bytes().as_slice(), &encoded].concat())
    }

    fn state(&self, name: &str) -> Result<StateMeta> {
        self.states()
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                let known: Vec<String> = self.states().into_iter().map(|s| s.name).collect();
                Error::invalid(format!("no state {name:?} (stored: {known:?})"))
            })
    }

    pub(crate) fn backend_ref(&self) -> &RocksStateBackend {
        self.backend()
    }

    /// Closes the local copy, as it is (it is not flushed or synced: it is deleted), and
    /// removes its folder. Drop the state handles taken from it first: the database stays
    /// open while one exists.
    ///
    /// Errors: local I/O errors.
    pub fn close(mut self) -> Result<()> {
        drop(self.backend.take());
        std::fs::remove_dir_all(&self.dir)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| Error::io(format!("remove {}", self.dir.display()), e))
    }
}

fn structure<'a>(meta: &StateMeta, t: &'a TypeInfo, part: &str) -> Result<&'a TypeSchema> {
    t.schema.as_ref().ok_or_else(|| {
        Error::invalid(format!(
            "state {:?}: its {part} type {} was recorded without its structure (by an earlier \
             version, or a type that cannot be traced); read it through the program's \
             descriptor, or take a new savepoint with this version",
            meta.name, t.rust_name
        ))
    })
}

/// The recorded structures of a state's parts.
struct Schemas<'a> {
    key: &'a TypeSchema,
    namespace: &'a TypeSchema,
    user_key: Option<&'a TypeSchema>,
    value: &'a TypeSchema,
}

impl<'a> Schemas<'a> {
    fn of(meta: &'a StateMeta) -> Result<Self> {
        Ok(Self {
            key: structure(meta, &meta.key_type, "key")?,
            namespace: structure(meta, &meta.namespace_type, "namespace")?,
            user_key: match &meta.user_key_type {
                Some(t) => Some(structure(meta, t, "user key")?),
                None => None,
            },
            value: structure(meta, &meta.value_type, "value")?,
        })
    }

    fn entry(&self, meta: &StateMeta, key: &[u8], value: &[u8]) -> Result<serde_json::Value> {
        use serde_json::{json, Value};
        let what = || format!("entry of state {:?}", meta.name);
        let Some((kg, rest)) = key.split_first_chunk::<2>() else {
            return Err(Error::corrupt(what(), "key shorter than its key group"));
        };
        let (k, used) = self.key.decode_json(rest)?;
        let rest = &rest[used..];
        let (ns, used) = self.namespace.decode_json(rest)?;
        let rest = &rest[used..];
        let mut out = json!({ "key_group": u16::from_be_bytes(*kg), "key": k });
        if !matches!(self.namespace.nodes.last(), Some(Node::Unit)) {
            out["namespace"] = ns;
        }
        let rest = match self.user_key {
            Some(uk) => {
                let (u, used) = uk.decode_json(rest)?;
                out["user_key"] = u;
                &rest[used..]
            }
            None => rest,
        };
        if !rest.is_empty() {
            return Err(Error::corrupt(
                what(),
                format!("{} bytes after the key", rest.len()),
            ));
        }
        let ttl = meta.ttl_millis.is_some();
        if meta.kind == StateKind::List {
            let mut values = Vec::new();
            let mut written = Vec::new();
            for element in ttl::Elements::new(value, ttl) {
                let element = element.map_err(|e| Error::corrupt(what(), e))?;
                values.push(decode_exact(self.value, element.payload, &what)?);
                if let Some(ts) = element.written {
                    written.push(Value::from(ts));
                }
            }
            out["value"] = Value::Array(values);
            if ttl {
                out["written_at"] = Value::Array(written);
            }
        } else {
            let (ts, payload) = ttl::split_value(value, ttl, &what)?;
            out["value"] = decode_exact(self.value, payload, &what)?;
            if let Some(ts) = ts {
                out["written_at"] = Value::from(ts);
            }
        }
        Ok(out)
    }
}

fn decode_exact(
    schema: &TypeSchema,
    bytes: &[u8],
    what: &dyn Fn() -> String,
) -> Result<serde_json::Value> {
    let (v, used) = schema.decode_json(bytes)?;
    if used != bytes.len() {
        return Err(Error::corrupt(
            what(),
            format!("{} bytes after the value", bytes.len() - used),
        ));
    }
    Ok(v)
}

impl Drop for KeyedStateReader {
    fn drop(&mut self) {
        if let Some(backend) = self.backend.take() {
            drop(backend);
            super::remove_dir_quietly(&self.dir, "a reader's directory");
        }
    }
}
