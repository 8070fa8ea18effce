//! Checkpoint storage: a directory in an object store (local files, S3, GCS, Azure, memory).
//!
//! A [`CheckpointStorage`] is rooted at a URL; [`child`](CheckpointStorage::child) descends
//! into a job's directory. Every path given to its methods is relative to the root and is
//! validated so that nothing outside the root is ever read, written or deleted. Files are
//! streamed with bounded memory; each file's size and CRC32 are computed on upload and
//! checked on download.

mod open;
pub(crate) mod path;
mod transfer;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub(crate) use transfer::{check_read, count_fetched, count_restored};
pub use transfer::{fetched_total, transfer_totals, FileInfo};
pub(crate) use transfer::{link_or_copy_checked, remove_local, CheckedLinks};

/// Copies a local file to a new name: a hard link when possible (the files are
/// immutable), else a copy written under a temporary name, synced and renamed.
///
/// A copy must look new: the orphan sweep keeps files younger than its grace period
/// because a checkpoint in flight may still reference them. A hard link shares the
/// source's modification time, so the source's is set to now *before* the link exists
/// (the link never appears with an old time); where that is not allowed, the file is
/// copied instead. The source's content is never changed.
fn local_copy(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    let io = |what: &str, e| Error::io(format!("{what} {} to {}", from.display(), to.display()), e);
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("create the directory to copy", e))?;
    }
    let linked = std::fs::File::open(from)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
        .and_then(|()| std::fs::hard_link(from, to));
    match linked {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(format!("file {}", from.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::AlreadyExists(format!("file {}", to.display())))
        }
        Err(_) => {}
    }
    let tmp = to.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
    let copied = std::fs::copy(from, &tmp)
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, to));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("copy", e));
    }
    Ok(())
}

/// Whether `rel` under `root` passes through a symbolic link (missing parts are not).
fn through_symlink(root: &std::path::Path, rel: &str) -> bool {
    let mut at = root.to_path_buf();
    for segment in rel.split('/').filter(|s| !s.is_empty()) {
        at.push(segment);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// Tuning of transfers. The defaults suit S3.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Files transferred at the same time by one snapshot or restore (default 4).
    pub transfer_concurrency: usize,
    /// Files larger than this are uploaded in parts (default 8 MiB).
    pub multipart_threshold: u64,
    /// Size of each uploaded part (default 8 MiB; S3 needs at least 5 MiB).
    pub part_size: usize,
    /// Further attempts of a request that failed with a transient error (`Unavailable`):
    /// uploads, copies, `_metadata` writes, deletes, listings and metadata reads (default 3).
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one (default 50 ms).
    pub retry_backoff: std::time::Duration,
}

impl Default for StorageOptions {
    fn default() -> Self {
        Self {
            transfer_concurrency: 4,
            multipart_threshold: 8 << 20,
            part_size: 8 << 20,
            retries: 3,
            retry_backoff: std::time::Duration::from_millis(50),
        }
    }
}

/// An object in storage, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredObject {
    /// Path relative to the storage root.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, milliseconds since the Unix epoch.
    pub last_modified_ms: i64,
}

/// A directory in an object store.
#[derive(Clone)]
pub struct CheckpointStorage {
    store: Arc<dyn ObjectStore>,
    root: ObjPath,
    url: String,
    options: StorageOptions,
    /// Identifies the object store: two storages with the same identity can copy objects
    /// between each other without moving the bytes through this process.
    identity: StoreIdentity,
}

/// Which object store a storage lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StoreIdentity {
    /// Local files; the directory of the storage's root.
    Local(std::path::PathBuf),
    /// A store addressed by scheme and bucket (or memory store name).
    Named(String),
    /// A store handed in by the caller; only the same instance counts as the same store.
    Instance,
}

impl fmt::Debug for CheckpointStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointStorage")
            .field("url", &self.url)
            .field("options", &self.options)
            .finish()
    }
}

impl CheckpointStorage {
    /// Opens the directory at `url`:
    ///
    /// - a plain path or `file:///abs/path`: local files (the directory is created);
    /// - `s3://bucket/prefix`: configured from the `AWS_*` environment variables
    ///   (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `AWS_REGION`, credentials, ...);
    /// - `gs://bucket/prefix` (`GOOGLE_*` variables), `az://container/prefix` (`AZURE_*`);
    /// - `memory://name`: an in-memory store shared by every `open` of the same name in
    ///   this process (for tests).
    ///
    /// Errors: `InvalidArgument` for an unknown scheme or bad configuration; `Io` when a
    /// local directory cannot be created.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, std::iter::empty::<(String, String)>())
    }

    /// Like [`open`](Self::open), with explicit configuration keys (for example
    /// `("aws_endpoint", "http://127.0.0.1:9000")`) that override the environment.
    pub fn open_with<K, V>(url: &str, config: impl IntoIterator<Item = (K, V)>) -> Result<Self>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let config = config
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        Ok(Self::from_opened(open::open_store(url, config, true)?))
    }

    /// Like [`open`](Self::open), for reading what exists: a local directory is not
    /// created.
    ///
    /// Errors: `NotFound` when a local directory does not exist; see [`open`](Self::open).
    pub fn open_existing(url: &str) -> Result<Self> {
        Ok(Self::from_opened(open::open_store(url, Vec::new(), false)?))
    }

    fn from_opened(opened: open::Opened) -> Self {
        Self {
            store: opened.store,
            root: opened.root,
            url: opened.url,
            options: StorageOptions::default(),
            identity: match opened.local_dir {
                Some(dir) => StoreIdentity::Local(dir),
                None => StoreIdentity::Named(opened.store_name),
            },
        }
    }

    /// The local directory of a local-file storage (`None` for other stores).
    pub fn local_dir(&self) -> Option<&std::path::Path> {
        match &self.identity {
            StoreIdentity::Local(dir) => Some(dir),
            _ => None,
        }
    }

    /// A storage over an existing store, rooted at its top. `label` names it in messages.
    /// Use this to wrap stores (throttling, fault injection) around a real one.
    pub fn from_store(store: Arc<dyn ObjectStore>, label: &str) -> Self {
        Self {
            store,
            root: ObjPath::default(),
            url: label.trim_end_matches('/').to_string(),
            options: StorageOptions::default(),
            identity: StoreIdentity::Instance,
        }
    }

    /// Replaces the transfer options.
    pub fn with_options(mut self, options: StorageOptions) -> Self {
        self.options = options;
        self
    }

    /// The transfer options.
    pub fn options(&self) -> &StorageOptions {
        &self.options
    }

    /// The URL of this directory.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The subdirectory `name` (one plain path segment, such as a job id).
    ///
    /// Errors: `InvalidArgument` when `name` is not a plain name.
    pub fn child(&self, name: &str) -> Result<Self> {
        path::validate_segment(name, "directory name")?;
        Ok(Self {
            store: self.store.clone(),
            root: self.root.clone().join(name),
            url: format!("{}/{name}", self.url),
            options: self.options.clone(),
            identity: match &self.identity {
                StoreIdentity::Local(dir) => StoreIdentity::Local(dir.join(name)),
                other => other.clone(),
            },
        })
    }

    /// The directory above this one and the name of this one, or `None` at the top of
    /// the store.
    pub fn parent(&self) -> Option<(Self, String)> {
        let parts: Vec<_> = self.root.parts().collect();
        let identity = match &self.identity {
            StoreIdentity::Local(dir) => StoreIdentity::Local(dir.parent()?.to_path_buf()),
            other => other.clone(),
        };
        if let Some(last) = parts.last() {
            // A subdirectory of a storage ([`child`](Self::child)): the same store, one
            // segment up.
            let name = last.as_ref().to_string();
            let url = self.url.strip_suffix(&format!("/{name}"))?.to_string();
            return Some((
                Self {
                    store: self.store.clone(),
                    root: ObjPath::from_iter(parts[..parts.len() - 1].iter().cloned()),
                    url,
                    options: self.options.clone(),
                    identity,
                },
                name,
            ));
        }
        // A local storage opened at its own directory: open the directory above.
        let StoreIdentity::Local(dir) = &self.identity else {
            return None;
        };
        let StoreIdentity::Local(parent) = &identity else {
            return None;
        };
        let name = dir.file_name()?.to_str()?.to_string();
        let store = Self::open(&parent.display().to_string()).ok()?.store;
        Some((
            Self {
                store,
                root: ObjPath::default(),
                url: format!("file://{}", parent.display()),
                options: self.options.clone(),
                identity,
            },
            name,
        ))
    }

    /// Whether objects of `other` can be copied into this storage without downloading
    /// them ([`copy_from`](Self::copy_from)).
    pub fn can_copy_from(&self, other: &Self) -> bool {
        match (&self.identity, &other.identity) {
            (StoreIdentity::Local(_), StoreIdentity::Local(_)) => true,
            (StoreIdentity::Named(a), StoreIdentity::Named(b)) => a == b,
            (StoreIdentity::Instance, StoreIdentity::Instance) => {
                Arc::ptr_eq(&self.store, &other.store) && self.root == other.root
            }
            _ => false,
        }
    }

    /// Copies the object `src` of `source` to the new object `dst` of this storage inside
    /// the store (a hard link or copy for local files, a server-side copy otherwise).
    ///
    /// Errors: `InvalidArgument` when the stores differ (see
    /// [`can_copy_from`](Self::can_copy_from)); `NotFound`; storage and I/O errors.
    pub async fn copy_from(&self, source: &Self, src: &str, dst: &str) -> Result<()> {
        if !self.can_copy_from(source) {
            return Err(Error::invalid(format!(
                "cannot copy {} into {}: different stores",
                source.url_of(src),
                self.url
            )));
        }
        let from = source.location(src)?;
        let to = self.location(dst)?;
        source.refuse_symlinks(src).await?;
        self.refuse_symlinks(dst).await?;
        if let (StoreIdentity::Local(a), StoreIdentity::Local(b)) =
            (&source.identity, &self.identity)
        {
            let from_file = a.join(src);
            let to_file = b.join(dst);
            return tokio::task::spawn_blocking(move || local_copy(&from_file, &to_file))
                .await
                .map_err(|e| Error::Internal(format!("copy task failed: {e}")))?;
        }
        self.retrying("copy", |_| async {
            self.store
                .copy(&from, &to)
                .await
                .map_err(|e| Error::storage("copy", self.url_of(dst), e))
        })
        .await
    }

    /// Size of the object `rel`.
    ///
    /// Errors: `NotFound`; storage errors.
    pub async fn size_of(&self, rel: &str) -> Result<u64> {
        let loc = self.location(rel)?;
        let meta = self
            .store
            .head(&loc)
            .await
            .map_err(|e| Error::storage("head", self.url_of(rel), e))?;
        Ok(meta.size)
    }

    /// Reads the bytes `range` of the object `rel`.
    ///
    /// Errors: `NotFound`; `Corrupt` when the object is shorter than the range; storage
    /// errors.
    pub async fn read_range(&self, rel: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        let loc = self.location(rel)?;
        self.refuse_symlinks(rel).await?;
        let want = range.end.saturating_sub(range.start);
        let bytes = self
            .store
            .get_range(&loc, range.clone())
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => Error::storage("get", self.url_of(rel), e),
                other => Error::corrupt(
                    format!("file {}", self.url_of(rel)),
                    format!("cannot read bytes {}..{}: {other}", range.start, range.end),
                ),
            })?;
        if bytes.len() as u64 != want {
            return Err(Error::corrupt(
                format!("file {}", self.url_of(rel)),
                format!(
                    "{} bytes read at {}, {want} expected",
                    bytes.len(),
                    range.start
                ),
            ));
        }
        Ok(bytes)
    }

    /// The store location of the relative path `rel`, after validating it.
    pub(crate) fn location(&self, rel: &str) -> Result<ObjPath> {
        path::validate_relative(rel, &format!("path under {}", self.url))?;
        let mut loc = self.root.clone();
        for segment in rel.split('/') {
            loc = loc.join(segment);
        }
        Ok(loc)
    }

    /// The URL of a relative path, for messages and listings.
    pub fn url_of(&self, rel: &str) -> String {
        format!("{}/{rel}", self.url)
    }

    /// On local storage, refuses a path that goes through a symbolic link: a link inside
    /// the directory may point anywhere, and nothing outside it is ever read, written or
    /// deleted. Other stores have no links.
    ///
    /// Errors: `InvalidArgument` naming the path.
    pub(crate) async fn refuse_symlinks(&self, rel: &str) -> Result<()> {
        let StoreIdentity::Local(root) = &self.identity else {
            return Ok(());
        };
        let (root, rel_owned) = (root.clone(), rel.to_string());
        let linked = tokio::task::spawn_blocking(move || through_symlink(&root, &rel_owned))
            .await
            .map_err(|e| Error::io("check for symbolic links", std::io::Error::other(e)))?;
        if linked {
            return Err(Error::invalid(format!(
                "{} goes through a symbolic link; links out of the directory are never followed",
                self.url_of(rel)
            )));
        }
        Ok(())
    }

    /// Runs `op(attempt)` and retries it while it fails with `Unavailable`, up to
    /// [`StorageOptions::retries`] more times with doubling waits. A failure the store's
    /// client already retried on its own (cloud stores retry transient HTTP failures) is
    /// returned as it is: a second loop would only repeat the wait.
    pub(crate) async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        loop {
            match op(attempt).await {
                Err(e)
                    if e.kind() == crate::error::ErrorKind::Unavailable
                        && attempt < self.options.retries
                        && !crate::error::already_retried(&e) =>
                {
                    let wait = self
                        .options
                        .retry_backoff
                        .saturating_mul(1 << attempt.min(16));
                    tracing::debug!(what, attempt, error = %e.report(), ?wait, "retrying a storage request");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Writes `bytes` to `rel` only if nothing is there yet. Transient failures are
    /// retried; when the store answers that the object exists (after a lost answer to an
    /// attempt that stored it, possibly retried inside the store's client), it is read
    /// back and counts as written only if it holds exactly `bytes`.
    ///
    /// Errors: `AlreadyExists` when another object is there; storage errors otherwise.
    pub async fn put_if_absent(&self, rel: &str, bytes: Bytes) -> Result<()> {
        let loc = self.location(rel)?;
        self.refuse_symlinks(rel).await?;
        self.retrying("conditional put", |_| {
            let (loc, bytes) = (loc.clone(), bytes.clone());
            async move {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..PutOptions::default()
                };
                let put = self
                    .store
                    .put_opts(&loc, PutPayload::from_bytes(bytes.clone()), opts)
                    .await
                    .map_err(|e| Error::storage("conditional put", self.url_of(rel), e));
                match put {
                    // An earlier attempt, or the store client's own retry of this one,
                    // may have stored it: it counts as written only if it holds exactly
                    // `bytes`. When that cannot be read, the answer is not definite.
                    Err(e) if e.kind() == crate::error::ErrorKind::AlreadyExists => {
                        match self.read_small_once(rel, bytes.len() as u64).await {
                            Ok(stored) if stored == bytes => Ok(()),
                            Ok(_) => Err(e),
                            Err(read) if read.kind() == crate::error::ErrorKind::Corrupt => Err(e),
                            Err(read) => Err(Error::Storage {
                                op: "conditional put (an object exists; reading it back failed)"
                                    .into(),
                                path: self.url_of(rel),
                                kind: crate::error::ErrorKind::Unavailable,
                                source: std::sync::Arc::new(read),
                            }),
                        }
                    }
                    other => other.map(|_| ()),
                }
            }
        })
        .await
    }

    /// Writes `bytes` to `rel`, replacing what is there, as one object (readers see the
    /// old or the new bytes, never a mix). For small documents that one writer keeps up
    /// to date (a job's status); never for snapshot files, which are written once.
    /// Transient failures are retried.
    ///
    /// Errors: storage errors.
    pub async fn put(&self, rel: &str, bytes: Bytes) -> Result<()> {
        let loc = self.location(rel)?;
        self.refuse_symlinks(rel).await?;
        self.retrying("put", |_| {
            let (loc, bytes) = (loc.clone(), bytes.clone());
            async move {
                self.store
                    .put(&loc, PutPayload::from_bytes(bytes))
                    .await
                    .map(|_| ())
                    .map_err(|e| Error::storage("put", self.url_of(rel), e))
            }
        })
        .await
    }

    /// Reads a whole object of at most `max_len` bytes (metadata, not data files).
    ///
    /// Errors: `NotFound`; `Corrupt` when the object is larger than `max_len`.
    pub async fn read_small(&self, rel: &str, max_len: u64) -> Result<Bytes> {
        self.retrying("get", |_| self.read_small_once(rel, max_len))
            .await
    }

    async fn read_small_once(&self, rel: &str, max_len: u64) -> Result<Bytes> {
        let loc = self.location(rel)?;
        self.refuse_symlinks(rel).await?;
        let result = self
            .store
            .get(&loc)
            .await
            .map_err(|e| Error::storage("get", self.url_of(rel), e))?;
        let too_long = |size: u64| {
            Error::corrupt(
                self.url_of(rel),
                format!("{size} bytes or more, above the {max_len} allowed"),
            )
        };
        if result.meta.size > max_len {
            return Err(too_long(result.meta.size));
        }
        // The store's stated size is not trusted: stop reading past the limit.
        let mut out = Vec::with_capacity(result.meta.size as usize);
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Error::storage("read", self.url_of(rel), e))?;
            if (out.len() + chunk.len()) as u64 > max_len {
                return Err(too_long((out.len() + chunk.len()) as u64));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(out))
    }

    /// Deletes `rel`; deleting a missing object succeeds (deletion is idempotent).
    pub async fn delete(&self, rel: &str) -> Result<()> {
        let loc = self.location(rel)?;
        self.refuse_symlinks(rel).await?;
        self.retrying("delete", |_| async {
            match self.store.delete(&loc).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(Error::storage("delete", self.url_of(rel), e)),
            }
        })
        .await
    }

    /// Deletes every path in `rels`, with bounded concurrency, attempting all of them;
    /// missing objects count as deleted. Returns the first error.
    pub async fn delete_many(&self, rels: Vec<String>) -> Result<()> {
        let concurrency = self.options.transfer_concurrency.max(1);
        let mut deletes = futures::stream::iter(rels)
            .map(|rel| {
                let this = self.clone();
                async move { this.delete(&rel).await }
            })
            .buffer_unordered(concurrency);
        let mut first = None;
        while let Some(result) = deletes.next().await {
            if let Err(e) = result {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Names of the immediate subdirectories of `rel` (of the root when empty).
    pub async fn list_dirs(&self, rel: &str) -> Result<Vec<String>> {
        let prefix = if rel.is_empty() {
            self.root.clone()
        } else {
            self.location(rel)?
        };
        let listing = self
            .retrying("list", |_| async {
                self.store
                    .list_with_delimiter(Some(&prefix))
                    .await
                    .map_err(|e| Error::storage("list", self.url_of(rel), e))
            })
            .await?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Lists every object under `rel_prefix` (or the whole directory when empty), with
    /// paths relative to the root.
    pub async fn list(&self, rel_prefix: &str) -> Result<Vec<StoredObject>> {
        let prefix = if rel_prefix.is_empty() {
            self.root.clone()
        } else {
            self.location(rel_prefix)?
        };
        let root_parts = self.root.parts().count();
        let objects: Vec<_> = self
            .retrying("list", |_| async {
                self.store
                    .list(Some(&prefix))
                    .try_collect()
                    .await
                    .map_err(|e| Error::storage("list", self.url_of(rel_prefix), e))
            })
            .await?;
        let listed: Vec<StoredObject> = objects
            .into_iter()
            .map(|meta| StoredObject {
                path: meta
                    .location
                    .parts()
                    .skip(root_parts)
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/"),
                size: meta.size,
                last_modified_ms: meta.last_modified.timestamp_millis(),
            })
            .collect();
        let StoreIdentity::Local(root) = &self.identity else {
            return Ok(listed);
        };
        // What a local listing finds behind a symbolic link is not in the directory.
        let root = root.clone();
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || {
            listed
                .into_iter()
                .filter(|o| {
                    let linked = through_symlink(&root, &o.path);
                    if linked {
                        tracing::warn!(path = %format!("{url}/{}", o.path), "skipping an object behind a symbolic link");
                    }
                    !linked
                })
                .collect()
        })
        .await
        .map_err(|e| Error::io("check a listing for symbolic links", std::io::Error::other(e)))
    }
}

#[cfg(test)]
mod parent_tests {
    use super::*;

    #[tokio::test]
    async fn the_parent_of_a_child_reads_the_same_files() {
        let dir = tempfile::tempdir().unwrap();
        let top = CheckpointStorage::open(&dir.path().display().to_string()).unwrap();
        let job = top.child("job").unwrap();
        job.put_if_absent("shared/a", Bytes::from_static(b"x"))
            .await
            .unwrap();
        // Opened directly and reached through `child`: both parents see `shared/a`.
        let direct =
            CheckpointStorage::open(&dir.path().join("job/chk-1").display().to_string()).unwrap();
        for folder in [job.child("chk-1").unwrap(), direct] {
            let (parent, name) = folder.parent().unwrap();
            assert_eq!(name, "chk-1");
            assert_eq!(parent.url(), job.url());
            assert_eq!(parent.size_of("shared/a").await.unwrap(), 1);
        }
        let memory = CheckpointStorage::open("memory:///").unwrap();
        let child = memory.child("job").unwrap();
        child
            .put_if_absent("f", Bytes::from_static(b"yz"))
            .await
            .unwrap();
        let (parent, name) = child.child("chk-2").unwrap().parent().unwrap();
        assert_eq!(name, "chk-2");
        assert_eq!(parent.size_of("f").await.unwrap(), 2);
        assert!(
            memory.parent().is_none(),
            "the top of a store has no parent"
        );
    }
}
